"""Clean/corrupted prompt pairs for activation patching, and role labels for their tokens.

Corruptions of a clean k-shot prompt (same query):
- `shuffled_labels`: the demo labels permuted among the demos (a derangement of the label order);
- `other_task`: the demos replaced by demos of another task (matched line by line in token length);
- `gold_label`: one demo's label (one of the same token length) replaced by the query's gold answer.

A *label swap* (`label_swap`, `label_swaps`) is the pair the copy-mechanism study attributes on: the
demos carrying label X replaced by demos of the same token length carrying a label Z that no demo shows
(and not the gold), so the two prompts differ only in whether X appears and every position aligns; the
target is logit(X) - logit(gold) at the last position (`label_swap_target`).

`token_roles` labels every token of a prompt by its role (`x1`, `->1`, `y1`, `\\n1`, ..., `xq`, `->q`),
so positions can be aligned across pairs, and between the two prompts of a pair whose lengths differ
(`align_roles`). What needs a model (token lengths, the reference token) is `mechcopy.patching`
(`make_pairs`, `role_pairs`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

from mechcopy.tasks.prompts import SEPARATOR, TEMPLATE, ICLPrompt, _fill, build_prompts, encode, make_prompt

CORRUPTIONS = ("shuffled_labels", "other_task", "gold_label")


def corrupt_prompt(prompt, kind: str, tokenizer, rng: random.Random, other_task=None):
    """A corrupted copy of `prompt` (same query); raises ValueError when this prompt cannot be corrupted."""
    demos = [tuple(d) for d in prompt.demos]
    query = (prompt.query, prompt.answer)
    if kind == "shuffled_labels":
        labels = [y for _, y in demos]
        if len(set(labels)) < 2:
            raise ValueError("all demo labels are equal: nothing to shuffle")
        for _ in range(100):
            perm = labels[:]
            rng.shuffle(perm)
            if all(a != b for a, b in zip(perm, labels)):
                break
        else:
            raise ValueError("no derangement of the demo labels found")
        new = [(x, y) for (x, _), y in zip(demos, perm)]
    elif kind == "gold_label":
        n_gold = len(prompt.answer_ids)
        same = [i for i, (ids, lab) in enumerate(zip(prompt.demo_label_ids, prompt.demo_labels))
                if len(ids) == n_gold and lab != prompt.answer]
        if not same:
            raise ValueError("no demo label with the gold answer's token length")
        i = rng.choice(same)
        new = [(x, prompt.answer if j == i else y) for j, (x, y) in enumerate(demos)]
    elif kind == "other_task":
        if other_task is None:
            raise ValueError("the other_task corruption needs another task (other_task=...)")

        def n_tok(x, y):
            return len(tokenizer.encode(f"{x} -> {y}", add_special_tokens=False))

        pool = list(other_task.pairs)
        rng.shuffle(pool)
        by_len: dict[int, list] = {}
        for pair in pool:
            if pair[1] != prompt.answer:
                by_len.setdefault(n_tok(*pair), []).append(pair)
        new = []
        for x, y in demos:
            cands = by_len.get(n_tok(x, y), [])
            if not cands:
                raise ValueError(f"no demo of {other_task.name!r} with the token length of {x!r} -> {y!r}")
            new.append(cands.pop())
    else:
        raise ValueError(f"unknown corruption {kind!r}; choose one of {', '.join(CORRUPTIONS)}")
    return make_prompt(new, query, tokenizer, task=f"{prompt.task}:{kind}")


@dataclass(frozen=True)
class LabelSwap:
    """A prompt and its counterfactual that differ only in whether demo label `x` appears: every demo
    carrying `x` (indices `replaced`) is replaced by a demo of the same token length carrying `z`, a
    label no clean demo shows and not the gold. `spans` are the token positions [start, end) of the
    replaced demos (BOS counted, as `model.to_tokens` gives them): the only positions where the two
    prompts' tokens differ. `x_id`, `gold_id`: the one-token labels of the target logit(x) - logit(gold)."""

    clean: ICLPrompt
    counterfactual: ICLPrompt
    x: str
    z: str
    replaced: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]
    x_id: int
    gold_id: int

    def to_json(self) -> dict[str, Any]:
        return {"clean": self.clean.to_json(), "counterfactual": self.counterfactual.to_json(), "x": self.x,
                "z": self.z, "replaced": list(self.replaced), "spans": [list(s) for s in self.spans],
                "x_id": self.x_id, "gold_id": self.gold_id}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "LabelSwap":
        return cls(ICLPrompt.from_json(obj["clean"]), ICLPrompt.from_json(obj["counterfactual"]), obj["x"], obj["z"],
                   tuple(obj["replaced"]), tuple(tuple(s) for s in obj["spans"]), obj["x_id"], obj["gold_id"])


def _demo_token_spans(prompt: ICLPrompt, tokenizer, template: str, sep: str) -> list[tuple[int, int]]:
    """Token positions [start, end) of each demo of `prompt` (BOS counted), refused where the demo's
    tokens do not start and end at token boundaries of the whole prompt."""
    lines = [_fill(template, x, y) for x, y in prompt.demos]
    if not prompt.text.startswith(sep.join(lines) + sep):
        raise ValueError(f"the prompt was not built with template {template!r} and separator {sep!r}")
    full, spans, at = encode(tokenizer, prompt.text), [], 0
    for line in lines:
        bounds = []
        for cut in (at, at + len(line)):
            head = encode(tokenizer, prompt.text[:cut])
            if full[:len(head)] != head:
                raise ValueError(f"demo {line!r} does not start or end at a token boundary of the prompt")
            bounds.append(len(head))
        spans.append((bounds[0], bounds[1]))
        at += len(line) + len(sep)
    return spans


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def label_swap(prompt: ICLPrompt, x: str, z: str, candidates: Sequence[tuple[str, str]], tokenizer,
               rng: random.Random, template: str = TEMPLATE, sep: str = SEPARATOR) -> LabelSwap:
    """The label swap of `prompt` from demo label `x` to the absent label `z`, each demo carrying `x`
    replaced by a pair of `candidates` labelled `z` (tried in a seeded order; never the query's input or
    another demo's) whose demo has the same token length; raises ValueError with the reason when no such
    swap keeps every position aligned or a label of the target is not one token."""
    labels = [y.strip() for y in prompt.demo_labels]
    gold = prompt.answer.strip()
    if x.strip() not in labels or x.strip() == gold:
        raise ValueError(f"label {x!r} must be a demo label other than the gold {gold!r} (demos: {labels})")
    if z.strip() in labels or z.strip() == gold:
        raise ValueError(f"label {z!r} must be absent from the demos and not the gold {gold!r} (demos: {labels})")
    if len(prompt.answer_ids) != 1:
        raise ValueError(f"the gold {gold!r} is {len(prompt.answer_ids)} tokens; the target needs one-token labels")
    replaced = tuple(i for i, y in enumerate(labels) if y == x.strip())
    spans = _demo_token_spans(prompt, tokenizer, template, sep)
    taken = {prompt.query} | {dx for dx, _ in prompt.demos}
    pool = [(cx, cy) for cx, cy in candidates if cy.strip() == z.strip() and cx not in taken]
    rng.shuffle(pool)
    demos: list[tuple[str, str]] = [(dx, dy) for dx, dy in prompt.demos]
    for i in replaced:
        width = _n_tokens(tokenizer, _fill(template, *demos[i]))
        fits = [c for c in pool if c[0] not in taken and _n_tokens(tokenizer, _fill(template, *c)) == width]
        if not fits:
            raise ValueError(f"no {z!r} demo of the token length of {demos[i]!r} among {len(pool)} candidates")
        demos[i] = fits[0]
        taken.add(fits[0][0])
    cf = make_prompt(demos, (prompt.query, prompt.answer), tokenizer, template, sep, prompt.task)
    cf = replace(cf, label_space=prompt.label_space)
    clean_ids, cf_ids = encode(tokenizer, prompt.text), encode(tokenizer, cf.text)
    if len(clean_ids) != len(cf_ids) or _demo_token_spans(cf, tokenizer, template, sep) != spans:
        raise ValueError("the swapped demos change the token positions of the prompt")
    inside = {t for i in replaced for t in range(*spans[i])}
    outside = [t for t, (a, b) in enumerate(zip(clean_ids, cf_ids)) if a != b and t not in inside]
    if outside:
        raise ValueError(f"the prompts differ outside the swapped demos (positions {outside})")
    ids = [prompt.demo_label_ids[i] for i in replaced] + [cf.demo_label_ids[i] for i in replaced]
    if any(len(t) != 1 for t in ids):
        raise ValueError(f"label {x!r} or {z!r} is more than one token; the target needs one-token labels")
    return LabelSwap(prompt, cf, x.strip(), z.strip(), replaced, tuple(spans[i] for i in replaced),
                     int(prompt.demo_label_ids[replaced[0]][0]), int(prompt.answer_ids[0]))


def label_swaps(prompts: Sequence[ICLPrompt], tokenizer, seed: int = 0,
                choose_x: Callable[[ICLPrompt], str] | None = None,
                candidates: Mapping[str, Sequence[tuple[str, str]]] | None = None,
                template: str = TEMPLATE, sep: str = SEPARATOR) -> tuple[list[LabelSwap], list[str]]:
    """A label swap for each prompt that has one, and the reason for each that has none.

    X is `choose_x(prompt)` (e.g. the demo label the clean run prefers), by default a seeded choice
    among the demo labels; Z is tried, in a seeded order, among the labels of the prompt's
    `label_space` that no demo shows and that are not the gold. Replacement demos come from
    `candidates[task]` (pairs), by default every (input, label) pair the prompts of the same task show
    (queries and demos), so a split's swaps use its own items only.
    """
    if candidates is None:
        found: dict[str, dict[tuple[str, str], None]] = {}
        for p in prompts:
            found.setdefault(p.task, {}).update(dict.fromkeys([(p.query, p.answer), *p.demos]))
        candidates = {task: list(pairs) for task, pairs in found.items()}
    rng = random.Random(seed)
    swaps, dropped = [], []
    for p in prompts:
        if not p.label_space:
            raise ValueError(f"prompt {p.query!r} of task {p.task!r} has no label_space; label swaps need the "
                             "task's label set (build it with build_copy_probe, or give the prompts one)")
        demo_labels = sorted({y.strip() for y in p.demo_labels} - {p.answer.strip()})
        try:
            if choose_x is not None:
                x = choose_x(p)
            elif demo_labels:
                x = rng.choice(demo_labels)
            else:
                raise ValueError("no demo label other than the gold")
            zs = sorted(set(p.label_space) - {y.strip() for y in p.demo_labels} - {p.answer.strip()})
            if not zs:
                raise ValueError("every non-gold label is among the demos: no absent label to swap in")
            rng.shuffle(zs)
            reasons = []
            for z in zs:
                try:
                    swaps.append(label_swap(p, x, z, candidates.get(p.task, ()), tokenizer, rng, template, sep))
                    break
                except ValueError as e:
                    reasons.append(f"{z!r}: {e}")
            else:
                raise ValueError("; ".join(reasons))
        except ValueError as e:
            dropped.append(f"{p.task} {p.query!r}: {e}")
    return swaps, dropped


def label_swap_target(logits, swaps: Sequence[LabelSwap]):
    """logit(x) - logit(gold) per swap, from last-position logits [batch, vocab] in swap order."""
    rows = list(range(len(swaps)))
    return logits[rows, [s.x_id for s in swaps]] - logits[rows, [s.gold_id for s in swaps]]


def token_roles(strs: Sequence[str], prompt: ICLPrompt) -> list[str]:
    """A role label per string token `strs` of `prompt.text` (BOS, `x1`, `->1`, `y1`, `\\n1`, ..., `xq`, `->q`).

    A token takes the role of its last character; if the tokens do not spell the text back (e.g.
    split multi-byte characters) the raw string tokens are returned instead.
    """
    strs = list(strs)
    text = prompt.text
    has_bos = len(strs) > 0 and "".join(strs[1:]) == text and "".join(strs) != text
    body = strs[1:] if has_bos else strs
    if "".join(body) != text:
        return [repr(s)[1:-1] for s in strs]
    role = [""] * len(text)
    cur = 0

    def mark(start, end, name):
        for c in range(start, end):
            role[c] = name

    for i, (x, y) in enumerate(prompt.demos, 1):
        xs = text.index(x, cur)
        mark(cur, xs, f"\\n{i - 1}" if i > 1 else "pre")
        mark(xs, xs + len(x), f"x{i}")
        ys = text.index(y, xs + len(x))
        mark(xs + len(x), ys, f"->{i}")
        mark(ys, ys + len(y), f"y{i}")
        cur = ys + len(y)
    qs = text.index(prompt.query, cur)
    mark(cur, qs, f"\\n{len(prompt.demos)}" if prompt.demos else "pre")
    mark(qs, qs + len(prompt.query), "xq")
    mark(qs + len(prompt.query), len(text), "->q")
    out, pos = (["BOS"] if has_bos else []), 0
    for s in body:
        pos += len(s)
        out.append(role[pos - 1] if s else "")
    return out


def corrupted_pairs(task, tokenizer, corruption: str, n: int, shots: int = 4, seed: int = 0,
                    other_task=None, gold_in_demos: bool = True) -> tuple[list[tuple[ICLPrompt, ICLPrompt]], list[str]]:
    """Up to `n` (clean, corrupted) prompt pairs of `task` and the reasons candidates were dropped; clean
    prompts as `build_prompts` makes them (`gold_in_demos=False`: no demo carries the query's label)."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; choose one of {', '.join(CORRUPTIONS)}")
    rng = random.Random(seed)
    pairs, dropped = [], []
    for p in build_prompts(task, tokenizer, shots=shots, n=n, seed=seed, gold_in_demos=gold_in_demos).prompts:
        try:
            pairs.append((p, corrupt_prompt(p, corruption, tokenizer, rng, other_task)))
        except ValueError as e:
            dropped.append(f"{p.query!r}: {e}")
    return pairs, dropped


def align_roles(target_roles: Sequence[str], source_roles: Sequence[str], roles: Sequence[str] | None = None,
                ) -> tuple[list[int], list[int]]:
    """Positions of two prompts that play the same role: (target positions, source positions), one
    to one. Each role's tokens are paired from the end of the role (its last token with the other's
    last token, ...), so the final position always pairs with the final position, and a demo label of
    three tokens pairs its last token with a one-token label. `roles` limits the roles paired (default
    every role both prompts have); positions with an empty role are never paired."""
    wanted = None if roles is None else set(roles)
    t_at: dict[str, list[int]] = {}
    s_at: dict[str, list[int]] = {}
    for at, rs in ((t_at, target_roles), (s_at, source_roles)):
        for i, r in enumerate(rs):
            if r and (wanted is None or r in wanted):
                at.setdefault(r, []).append(i)
    t_pos, s_pos = [], []
    for role, ts in t_at.items():
        ss = s_at.get(role, [])
        n = min(len(ts), len(ss))
        t_pos += ts[len(ts) - n:]
        s_pos += ss[len(ss) - n:]
    order = sorted(range(len(t_pos)), key=t_pos.__getitem__)
    return [t_pos[i] for i in order], [s_pos[i] for i in order]
