"""Synthetic in-context-learning data for the model organisms, over the character tokenizer.

Every sequence is written in the same template as the real models' prompts
(`"k -> q\\nb -> r\\nd -> "` then the answer character), so the organisms are scored by the same
prompt builder and evaluator. Three families of functions over the 26 lowercase letters:

- ``map``: a random bijection letters -> letters; the query is one of the demo inputs, so the
  model must *retrieve* the matching demo's output (associative recall, an induction task).
- ``shift``: ``y = x + s (mod 26)``; the query is a new input, so the model must infer ``s``
  from the demos and apply it (a rule task, every answer a new letter).
- ``class``: ``y = alphabet_o[index(x) mod 4]``, a few-label function whose four labels come from
  one of two label alphabets (``0123`` or ``5678``): the letter's class is fixed knowledge the model
  learns in training (as vowel counting is for a language model), the alphabet ``o`` must be read
  off the demos. The copy *probe* is this family with demos drawn only from the other classes, so
  the gold label is never among the demo labels (as in vowel counting) and every prediction equal
  to a demo label is a copy error.

A second probe, ``probe-shift``, is the shift family on *training* shifts: a shift is a bijection
and the query is new, so its answer is never a demo label either, and a model that has not learnt
to infer the shift can fall back on copying a demo label (where the organisms do copy).

Held-out functions, never sampled in training: maps whose table hash falls in one residue class,
and the shift amounts in ``HELD_OUT_SHIFTS``. All randomness goes through explicit seeds.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass
from typing import Sequence

import torch

from mechcopy.tasks.prompts import SEPARATOR, TEMPLATE, PromptSet, make_prompt
from mechcopy.tasks.task import Task

LETTERS = string.ascii_lowercase
N_CLASSES = 4
CLASS_ALPHABETS = ("0123", "5678")
FAMILIES = ("map", "shift", "class")
HELD_OUT_SHIFTS = (3, 10, 17, 24)
MAP_HELD_OUT_MOD = 4  # a map is held out when its table hash is 0 mod this (a quarter of all maps)
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Function:
    """One function of a family, as its full table over the 26 letters."""

    family: str
    param: str  # map: the image of a..z; shift: s; class: the label alphabet's number
    table: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return f"{self.family}-{self.param}"

    def __call__(self, x: str) -> str:
        return dict(self.table)[x]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(sorted({y for _, y in self.table}))

    def to_task(self, kind: str = "algorithmic"):
        """The function as a `mechcopy.tasks.Task` (every input once)."""
        return Task(name=f"organism-{self.name}", pairs=self.table, kind=kind)


def make_function(family: str, param: int | str) -> Function:
    """Build a function from its family and parameter (shift s, class alphabet o, or a map's image)."""
    if family == "shift":
        s = int(param) % 26
        table = tuple((x, LETTERS[(i + s) % 26]) for i, x in enumerate(LETTERS))
    elif family == "class":
        o = int(param)
        if not 0 <= o < len(CLASS_ALPHABETS):
            raise ValueError(f"class functions are numbered 0..{len(CLASS_ALPHABETS) - 1}, got {param!r}")
        table = tuple((x, CLASS_ALPHABETS[o][i % N_CLASSES]) for i, x in enumerate(LETTERS))
    elif family == "map":
        image = str(param)
        if sorted(image) != list(LETTERS):
            raise ValueError(f"a map's parameter must be a permutation of a..z, got {image!r}")
        table = tuple(zip(LETTERS, image))
    else:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return Function(family, str(param), table)


def is_held_out(fn: Function) -> bool:
    """Whether `fn` belongs to the evaluation split (never sampled in training)."""
    if fn.family == "shift":
        return int(fn.param) % 26 in HELD_OUT_SHIFTS
    if fn.family == "map":
        digest = hashlib.sha256(fn.param.encode()).digest()
        return int.from_bytes(digest[:8], "big") % MAP_HELD_OUT_MOD == 0
    return False  # class: only 2 functions; its probe prompts are new episodes, not new functions


def sample_function(family: str, rng: random.Random, split: str = "train") -> Function:
    """A random function of `family` from `split` ("train" or "heldout")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if family == "shift":
        pool = [s for s in range(1, 26) if (s in HELD_OUT_SHIFTS) == (split == "heldout")]
        return make_function("shift", rng.choice(pool))
    if family == "class":
        if split == "heldout":
            raise ValueError("the class family has no held-out functions (use the probe)")
        return make_function("class", rng.randrange(len(CLASS_ALPHABETS)))
    if family == "map":
        while True:  # rejection sampling: a quarter of maps are held out
            image = list(LETTERS)
            rng.shuffle(image)
            fn = make_function("map", "".join(image))
            if is_held_out(fn) == (split == "heldout"):
                return fn
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


@dataclass(frozen=True)
class Episode:
    """`shots` demonstrations and one query of one function."""

    function: Function
    demos: tuple[tuple[str, str], ...]
    query: tuple[str, str]

    @property
    def demo_labels(self) -> tuple[str, ...]:
        return tuple(y for _, y in self.demos)


def sample_episode(fn: Function, shots: int, rng: random.Random, probe: bool = False,
                   repeats: bool = False, same_label: bool = False) -> Episode:
    """Demos then a query. `map`: the query repeats a demo input (retrieval); otherwise the query is new.

    `probe=True` (class family only): demos are drawn from inputs whose label differs from the
    query's, so the gold label is never among the demo labels. `repeats=True` (map, training):
    demo inputs are drawn with replacement from a small pool, so many outputs in one sequence are
    retrievals (a denser learning signal for the induction mechanism). `same_label=True` (probe
    only): every demo has the same (wrong) label, the strongest pull to copy ("lemon -> 2, garden -> 2").
    """
    if shots < 1 and fn.family == "map":
        raise ValueError("a map episode needs at least one demo (the query repeats a demo input)")
    if fn.family == "map":
        if repeats:
            pool = rng.sample(LETTERS, max(1, (shots + 1) // 2))
            demos = tuple((x, fn(x)) for x in (rng.choice(pool) for _ in range(shots)))
            return Episode(fn, demos, demos[rng.randrange(shots)])
        xs = rng.sample(LETTERS, shots)
        demos = tuple((x, fn(x)) for x in xs)
        return Episode(fn, demos, demos[rng.randrange(shots)])
    q = rng.choice(LETTERS)
    gold = fn(q)
    if probe:
        if fn.family != "class":
            raise ValueError("the probe is defined on the class family only")
        pool = [x for x in LETTERS if fn(x) != gold]
        if same_label:
            label = rng.choice(sorted({fn(x) for x in pool}))
            pool = [x for x in pool if fn(x) == label]
    else:
        pool = [x for x in LETTERS if x != q]
    xs = rng.sample(pool, shots)
    return Episode(fn, tuple((x, fn(x)) for x in xs), (q, gold))


def episode_text(ep: Episode, with_answer: bool = True) -> str:
    """The episode in the shared template; without the answer it ends with "-> " (before the answer)."""
    lines = [TEMPLATE.format(x=x, y=y) for x, y in ep.demos]
    q, a = ep.query
    last = TEMPLATE.format(x=q, y=a)
    lines.append(last if with_answer else last[: len(last) - len(a)])
    return SEPARATOR.join(lines)


def episode_length(k: int) -> int:
    """Tokens of the longest episode with `k` demonstrations (BOS + one token per character)."""
    line = len(TEMPLATE.format(x="a", y="b"))
    return 1 + (k + 1) * line + k * len(SEPARATOR)


class CharCodec:
    """Text <-> ids for the character tokenizer without a tokenizer call per sequence (fast batches)."""

    def __init__(self, tokenizer):
        charset = LETTERS + string.digits + " ->" + SEPARATOR
        ids = tokenizer(charset, add_special_tokens=False)["input_ids"]
        if len(ids) != len(charset):
            raise ValueError("the organisms need a character tokenizer (one token per character): "
                             "use mechcopy.models.tiny.char_tokenizer()")
        self.char_to_id = dict(zip(charset, ids))
        self.bos_id = tokenizer.bos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, text: str) -> list[int]:
        """BOS + one id per character: the same ids as `model.to_tokens(text)`."""
        return [self.bos_id] + [self.char_to_id[c] for c in text]


def answer_positions(ep: Episode) -> list[int]:
    """Token positions (with BOS at 0) whose next token is an output character (every demo's and the query's)."""
    positions, offset = [], 0
    for x, y in (*ep.demos, ep.query):
        line = TEMPLATE.format(x=x, y=y)
        positions.append(offset + len(line) - len(y))  # BOS shifts by one, predicting shifts back by one
        offset += len(line) + len(SEPARATOR)
    return positions


@dataclass(frozen=True)
class Batch:
    tokens: torch.Tensor  # [batch, pos] right-padded
    loss_mask: torch.Tensor  # [batch, pos] True where the next token is an output to predict
    query_mask: torch.Tensor  # [batch, pos] True only at the query's answer position


def make_batch(codec: CharCodec, rng: random.Random, batch_size: int, k_range: tuple[int, int] = (2, 8),
               families: Sequence[str] = FAMILIES, split: str = "train") -> Batch:
    """A training batch: each row samples a family, a function of `split`, a number of shots in `k_range`, an episode."""
    rows, masks, qmasks = [], [], []
    for _ in range(batch_size):
        fam = rng.choice(list(families))
        fn = sample_function(fam, rng, split)
        ep = sample_episode(fn, rng.randint(*k_range), rng, repeats=fam == "map" and rng.random() < 0.5)
        ids = codec.encode(episode_text(ep))
        pos = answer_positions(ep)
        rows.append(ids)
        masks.append(pos)
        qmasks.append(pos[-1])
    width = max(map(len, rows))
    tokens = torch.full((batch_size, width), codec.pad_id, dtype=torch.long)
    loss_mask = torch.zeros(batch_size, width, dtype=torch.bool)
    query_mask = torch.zeros(batch_size, width, dtype=torch.bool)
    for i, (ids, pos, qp) in enumerate(zip(rows, masks, qmasks)):
        tokens[i, : len(ids)] = torch.tensor(ids)
        loss_mask[i, pos] = True
        query_mask[i, qp] = True
    return Batch(tokens, loss_mask, query_mask)


# ---- prompts for evaluation, through the shared prompt builder ----------------------------------

EVAL_SETS = ("map-heldout", "map-train", "shift-heldout", "class", "probe", "probe-same", "probe-shift")
PROBES = ("probe", "probe-shift")  # the prompt sets whose gold is never a demo label (attribution, k choice)


def episodes(name: str, n: int, shots: int = 4, seed: int = 0) -> list[Episode]:
    """`n` evaluation episodes of set `name` (see `EVAL_SETS`), deterministic in `seed`."""
    if name not in EVAL_SETS:
        raise ValueError(f"unknown organism prompt set {name!r}; known: {', '.join(EVAL_SETS)}")
    rng = random.Random(f"organism-{name}-{shots}-{seed}")
    out = []
    for _ in range(n):
        if name == "probe":
            out.append(sample_episode(sample_function("class", rng), shots, rng, probe=True))
        elif name == "probe-same":
            out.append(sample_episode(sample_function("class", rng), shots, rng, probe=True, same_label=True))
        elif name == "class":
            out.append(sample_episode(sample_function("class", rng), shots, rng))
        elif name == "probe-shift":  # training shifts, new query: gold is never a demo label
            out.append(sample_episode(sample_function("shift", rng, "train"), shots, rng))
        else:
            fam, split = name.split("-")
            out.append(sample_episode(sample_function(fam, rng, "heldout" if split == "heldout" else "train"), shots, rng))
    return out


def organism_prompts(name: str, tokenizer, n: int = 200, shots: int = 4, seed: int = 0):
    """A `PromptSet` of set `name` built with `mechcopy.tasks.prompts.make_prompt` (the shared builder)."""
    prompts = tuple(
        make_prompt(ep.demos, ep.query, tokenizer, template=TEMPLATE, sep=SEPARATOR, task=f"organism-{name}")
        for ep in episodes(name, n, shots, seed)
    )
    return PromptSet(task=f"organism-{name}", prompts=prompts, dropped=())


def probe_splits(tokenizer, n_attr: int = 100, n_dev: int = 100, n_test: int = 100, shots: int = 4, seed: int = 0,
                 probe: str = "probe"):
    """Disjoint attribution, dev and test prompts of probe `probe` (see `PROBES`).

    Each split comes from its own seed; prompts already in an earlier split are removed.
    """
    if probe not in PROBES:
        raise ValueError(f"unknown organism probe {probe!r}; known: {', '.join(PROBES)}")
    splits, seen = [], set()
    for i, n in enumerate((n_attr, n_dev, n_test)):  # twice as many drawn, so duplicates can be dropped
        fresh = [p for p in organism_prompts(probe, tokenizer, 2 * n, shots, seed + 10_000 * i).prompts
                 if p.text not in seen][:n]
        seen |= {p.text for p in fresh}
        splits.append(fresh)
    return tuple(splits)
