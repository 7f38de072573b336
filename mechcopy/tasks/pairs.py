"""Clean/corrupted prompt pairs for activation patching, and role labels for their tokens.

Corruptions of a clean k-shot prompt (same query):
- `shuffled_labels`: the demo labels permuted among the demos (a derangement of the label order);
- `other_task`: the demos replaced by demos of another task (matched line by line in token length);
- `gold_label`: one demo's label (one of the same token length) replaced by the query's gold answer.

`token_roles` labels every token of a prompt by its role (`x1`, `->1`, `y1`, `\\n1`, ..., `xq`, `->q`),
so positions can be aligned across pairs, and between the two prompts of a pair whose lengths differ
(`align_roles`). What needs a model (token lengths, the reference token) is `mechcopy.patching`
(`make_pairs`, `role_pairs`).
"""

from __future__ import annotations

import random
from typing import Sequence

from mechcopy.tasks.prompts import ICLPrompt, build_prompts, make_prompt

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
    t_at, s_at = {}, {}
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
