"""Few-shot prompts that are exact about tokens.

A prompt is `demo_1 SEP demo_2 SEP ... SEP query-part-of-template`, and it ends right before the
answer's first token. The builder tokenizes the full text `demos + query + answer` and the prefix with
the model's BOS convention (what `model.to_tokens(text)` gives), checks that the prefix tokens are a
prefix of the full tokens, and takes the rest as the answer ids. When the first answer token is only
whitespace (SmolLM2 splits `" 3"` into `" "`, `"3"`), that token moves into the prompt (which then
ends with `"-> "`), and demo labels are tokenized the same way so `demo_label_ids` compare with
`answer_ids`. Pairs that cannot be made exact are dropped and reported with the reason.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any, Sequence

from mechcopy.errors import check_number
from mechcopy.tasks.task import Task

TEMPLATE = "{x} -> {y}"
SEPARATOR = "\n"


@dataclass(frozen=True)
class ICLPrompt:
    """One few-shot prompt; `text` is exactly what the model sees, `answer_ids` its gold continuation."""

    task: str
    text: str
    query: str
    answer: str
    answer_ids: tuple[int, ...]
    demos: tuple[tuple[str, str], ...]
    demo_labels: tuple[str, ...]
    demo_label_ids: tuple[tuple[int, ...], ...]
    #: every label the task can give (the probe's counts), when known: tells a wrong in-range answer
    #: that no demo carries from a copy (`mechcopy.tasks.outcomes.outcomes`)
    label_space: tuple[str, ...] = ()
    #: what separates the demonstrations (the evaluator stops a generated answer there)
    sep: str = SEPARATOR

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "text": self.text, "query": self.query, "answer": self.answer,
                "answer_ids": list(self.answer_ids), "demos": [list(d) for d in self.demos],
                "demo_labels": list(self.demo_labels), "demo_label_ids": [list(i) for i in self.demo_label_ids],
                "label_space": list(self.label_space), "sep": self.sep}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ICLPrompt":
        return cls(obj["task"], obj["text"], obj["query"], obj["answer"], tuple(obj["answer_ids"]),
                   tuple((x, y) for x, y in obj["demos"]), tuple(obj["demo_labels"]),
                   tuple(tuple(ids) for ids in obj["demo_label_ids"]), tuple(obj.get("label_space", ())),
                   obj.get("sep", SEPARATOR))


@dataclass(frozen=True)
class PromptSet:
    """The prompts built for one task, and the (pair, reason) of every pair that had to be dropped."""

    task: str
    prompts: tuple[ICLPrompt, ...]
    dropped: tuple[tuple[tuple[str, str], str], ...] = ()

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    def __getitem__(self, i):
        return self.prompts[i]


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with the model's BOS convention: BOS (if the tokenizer has one) + tokens.

    This equals `model.to_tokens(text)[0]` for HookedTransformer's default `prepend_bos=True`.
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if bos is not None else []) + ids


def _split_template(template: str) -> tuple[str, str]:
    if template.count("{x}") != 1 or template.count("{y}") != 1 or template.index("{x}") > template.index("{y}"):
        raise ValueError(f"template {template!r} must contain '{{x}}' once, then '{{y}}' once (e.g. {TEMPLATE!r})")
    head, tail = template.split("{y}")
    return head, tail


def _fill(template: str, x: str, y: str) -> str:
    return template.replace("{x}", x).replace("{y}", y)


def _continuation(tokenizer, prefix: str, rest: str, what: str) -> list[int]:
    """Ids that `rest` adds after `prefix`, checking the prefix tokens are unchanged by it."""
    p_ids, f_ids = encode(tokenizer, prefix), encode(tokenizer, prefix + rest)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in f_ids:
        raise ValueError(f"the tokenizer does not know some characters of {what} (it maps them to the unknown token)")
    if f_ids[: len(p_ids)] != p_ids:
        raise ValueError(f"{what} merges with the end of the prompt into other tokens "
                         f"({len(p_ids)} prompt tokens are not a prefix of the full text's tokens)")
    cont = f_ids[len(p_ids):]
    if not cont:
        raise ValueError(f"{what} adds no tokens")
    return cont


def _is_blank(tokenizer, tok: int) -> bool:
    return tokenizer.decode([tok]).strip() == ""


def make_prompt(demos: Sequence[tuple[str, str]], query_pair: tuple[str, str], tokenizer,
                template: str = TEMPLATE, sep: str = SEPARATOR, task: str = "") -> ICLPrompt:
    """Build one prompt; raise ValueError (with the reason) if the answer is not one exact continuation."""
    head, _ = _split_template(template)
    x, y = query_pair
    lead = head.replace("{x}", x)
    stem = lead.rstrip(" ")
    spaces = lead[len(stem):]
    context = sep.join(_fill(template, dx, dy) for dx, dy in demos) + (sep if demos else "")
    prefix = context + stem
    cont = _continuation(tokenizer, prefix, spaces + y, f"answer {y!r}")
    moved = None
    if len(cont) > 1 and _is_blank(tokenizer, cont[0]):
        # The answer starts with a whitespace-only token: it belongs to the prompt, so the model's
        # next token is the first piece of the answer proper (as in every demo).
        moved = cont[0]
        ws = tokenizer.decode([moved])
        if not (spaces + y).startswith(ws) or encode(tokenizer, prefix + ws) != encode(tokenizer, prefix)[:] + [moved]:
            raise ValueError(f"answer {y!r} starts with a whitespace token {ws!r} that does not tokenize "
                             "the same at the end of the prompt")
        prefix, cont = prefix + ws, cont[1:]
    if tokenizer.decode(cont).strip() != y.strip():
        raise ValueError(f"answer {y!r} tokens decode to {tokenizer.decode(cont)!r}")
    label_ids = []
    for dx, dy in demos:
        ids = _continuation(tokenizer, context + stem, spaces + dy, f"demo label {dy!r}")
        if moved is not None:
            if ids[0] != moved or len(ids) < 2:
                raise ValueError(f"demo label {dy!r} does not start with the whitespace token that answer "
                                 f"{y!r} starts with, so their ids are not comparable")
            ids = ids[1:]
        label_ids.append(tuple(ids))
    return ICLPrompt(
        task=task, text=prefix, query=x, answer=y, answer_ids=tuple(cont), demos=tuple((dx, dy) for dx, dy in demos),
        demo_labels=tuple(dy for _, dy in demos), demo_label_ids=tuple(label_ids), sep=sep,
    )


def build_prompts(task, tokenizer, shots: int = 4, n: int = 100, seed: int = 0,
                  template: str = TEMPLATE, sep: str = SEPARATOR, gold_in_demos: bool = True,
                  copy_control: bool = False) -> PromptSet:
    """Up to `n` prompts of `shots` demonstrations each for `task`, seeded; each query is a distinct pair.

    Repeated pairs and inputs with several outputs are left out (`Task.distinct_pairs`) and listed
    in `dropped`. Demos never contain the query, nor any pair with the same input. With
    `gold_in_demos=False` no demo has the query's label either, so every prediction equal to a demo
    label is a copy error; the copy probe (`task.kind == "probe"`) is always built that way. Pairs
    whose answer does not tokenize exactly are dropped (with the reason) and never used, as query or
    demo. `n` is capped by the number of usable pairs.

    With `copy_control` (closed-label tasks only) the labels the demos show are drawn first, so that
    every label is among a prompt's demos as often as it is absent (`_present_sets`); this is the
    construction the copy effect (`mechcopy.copy_effect`) is estimated from.
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a Task (e.g. mechcopy.tasks.load_task('antonyms')), got {type(task).__name__}")
    check_number(shots, "shots", low=0, integer=True)
    check_number(n, "n", low=0, integer=True)
    check_number(seed, "seed", low=0, integer=True)
    if not isinstance(sep, str) or not sep.strip(" "):
        raise ValueError(f"sep must be a string that is more than spaces (it separates the demonstrations), got {sep!r}")
    labels = task.require_labels() if copy_control else ()
    rng = random.Random(seed)
    pairs, dropped = task.distinct_pairs()
    usable: list[tuple[str, str]] = []
    for pair in pairs:
        try:
            make_prompt([], pair, tokenizer, template, sep, task.name)
        except ValueError as e:
            dropped.append((pair, str(e)))
        else:
            usable.append(pair)
    if len(usable) < shots + 1:
        raise ValueError(f"task {task.name!r} has {len(usable)} usable pairs ({len(dropped)} dropped); "
                         f"{shots} shots need at least {shots + 1}. Add pairs or use fewer shots.")
    no_gold = task.kind == "probe" or not gold_in_demos
    prompts: list[ICLPrompt] = []
    cycles: dict = {}
    for query in rng.sample(usable, len(usable)):
        if len(prompts) >= n:
            break
        pool = [p for p in usable if p[0] != query[0] and not (no_gold and p[1] == query[1])]
        if len(pool) < shots:
            dropped.append((query, f"only {len(pool)} pairs can be demonstrations for it; {shots} needed"))
            continue
        if copy_control:
            choice = tuple(y for y in labels if not (no_gold and y == query[1]))
            present = next(cycles.setdefault(choice, _present_sets(choice, shots, rng)))
            shown = list(present) + [rng.choice(present) for _ in range(shots - len(present))]
            by_label = {y: [p for p in pool if p[1] == y] for y in present}
            if any(len(by_label[y]) < shown.count(y) for y in present):
                dropped.append((query, f"too few demonstration pairs for the labels {list(present)}"))
                continue
            demos = [d for y in present for d in rng.sample(by_label[y], shown.count(y))]
            rng.shuffle(demos)
        else:
            demos = rng.sample(pool, shots)
        try:
            prompts.append(make_prompt(demos, query, tokenizer, template, sep, task.name))
        except ValueError as e:
            dropped.append((query, str(e)))
    return PromptSet(task=task.name, prompts=tuple(prompts), dropped=tuple(dropped))


def _present_sets(labels: tuple[str, ...], shots: int, rng: random.Random):
    """The label sets a copy-control prompt's demos show, in turn: subsets of `labels` of half their
    number (alternately rounded down and up when it is odd; at least 1, at most shots), each subset of a
    size equally often, so every label is present in as many prompts as it is absent where shots allow."""
    sizes = sorted({min(shots, max(1, len(labels) // 2)), min(shots, max(1, (len(labels) + 1) // 2))})
    passes = [list(itertools.combinations(labels, size)) for size in sizes]
    queues: list[list] = [[] for _ in sizes]
    for turn in itertools.count():
        i = turn % len(sizes)
        if not queues[i]:
            queues[i] = rng.sample(passes[i], len(passes[i]))
        yield queues[i].pop()
