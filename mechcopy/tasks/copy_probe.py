"""The label-copy probe: generated closed-label tasks where copying a demo label competes with a rule.

The vowel probe (`mechcopy.tasks.probe`) does not show copying (docs/replication.md section 1: a
wrong in-range answer is a demo label no more often than chance). This probe is built where copying can
happen: small closed label sets (3-6 labels), a rule the demos show, and answers the model must infer
rather than read off. Its tasks are *generated* (seeded, never stored) from digits and symbols only, so
they share no data with any evaluation task (whose inputs all hold letters; `tests/test_copy_probe.py`
checks that no probe input equals or contains one, and that no label set equals one).

Tasks (`PROBE_TASKS`; each has a `rule`, computed independently of how inputs are drawn):

| task | input | answer | labels |
|---|---|---|---|
| `last_digit` | a four-digit number | its last digit | 2..7 |
| `max_digit` | four digits | the largest (it occurs once) | 4..9 |
| `star_count` | seven symbols | how many are `*`, as a word | two..six |
| `distinct_symbols` | six symbols | how many different ones, as a word | two..five |
| `odd_position` | four digits, three equal | where the odd one is | first..fourth |
| `repeated_symbol` | four symbols, one twice | the repeated one | # @ % * & $ |

Constructions (`CONSTRUCTIONS`), all through `tasks.prompts.build_prompts`: `no-gold` (no demo carries
the query's gold label: every demo label the model answers is a copy), `copy-control` (each label
present among the demos and absent equally often over a task's prompts, the gold never present: the
copy effect's construction, `build_prompts(..., copy_control=True)`), and `standard` (demos as they
fall, gold included: is the rule learnable at all?).

Splits (`build_copy_probe`): per task, attribution / dev / test prompts whose query items are disjoint;
each split draws its own items (its demos too) with its own seeded generator, so `attribution_seed`
redraws the attribution split alone (the study's selection seeds) while dev and test stay fixed, and
the split sizes do not change each other's items.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

from mechcopy.tasks.probe import _quotas
from mechcopy.tasks.prompts import ICLPrompt, build_prompts
from mechcopy.tasks.task import Task

#: symbols of the symbol tasks: none is part of the template's arrow (`-`, `>`) or a separator
SYMBOLS: tuple[str, ...] = ("#", "@", "%", "*", "&", "$", "+", "=", "~", "^")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ORDINALS: tuple[str, ...] = ("first", "second", "third", "fourth")
CONSTRUCTIONS = ("no-gold", "copy-control", "standard")
SPLITS = ("attribution", "dev", "test")


@dataclass(frozen=True)
class ProbeTaskSpec:
    """A generated closed-label task: `draw(rng, label)` gives a random input whose answer is `label`;
    `rule(input)` computes the answer from the input alone (the check of `draw`)."""

    name: str
    labels: tuple[str, ...]
    draw: Callable[[random.Random, str], str]
    rule: Callable[[str], str]
    description: str


def _draw_last_digit(rng: random.Random, label: str) -> str:
    return str(rng.randint(1, 9)) + str(rng.randint(0, 9)) + str(rng.randint(0, 9)) + label


def _draw_max_digit(rng: random.Random, label: str) -> str:
    items = [str(rng.randint(0, int(label) - 1)) for _ in range(3)]
    items.insert(rng.randint(0, 3), label)
    return " ".join(items)


def _draw_star_count(rng: random.Random, label: str) -> str:
    stars = NUMBER_WORDS.index(label)
    items = ["*"] * stars + [rng.choice([s for s in SYMBOLS if s != "*"]) for _ in range(7 - stars)]
    rng.shuffle(items)
    return " ".join(items)


def _draw_distinct_symbols(rng: random.Random, label: str) -> str:
    chosen = rng.sample(SYMBOLS, NUMBER_WORDS.index(label))
    items = chosen + [rng.choice(chosen) for _ in range(6 - len(chosen))]
    rng.shuffle(items)
    return " ".join(items)


def _draw_odd_position(rng: random.Random, label: str) -> str:
    same, odd = rng.sample("0123456789", 2)
    items = [same] * 4
    items[ORDINALS.index(label)] = odd
    return " ".join(items)


def _draw_repeated_symbol(rng: random.Random, label: str) -> str:
    items = [label, label] + rng.sample([s for s in SYMBOLS if s != label], 2)
    rng.shuffle(items)
    return " ".join(items)


def _odd_position(x: str) -> str:
    items = x.split()
    (odd,) = [i for i, v in enumerate(items) if items.count(v) == 1]
    return ORDINALS[odd]


def _repeated_symbol(x: str) -> str:
    items = x.split()
    (twice,) = {v for v in items if items.count(v) == 2}
    return twice


#: every task's inputs have one length (characters and items), whatever the label, so a label swap
#: (`tasks.pairs.label_swap`) finds a replacement demo of the same token length
PROBE_TASKS: dict[str, ProbeTaskSpec] = {s.name: s for s in (
    ProbeTaskSpec("last_digit", tuple("234567"), _draw_last_digit, lambda x: x[-1],
                  "the last digit of a four-digit number"),
    ProbeTaskSpec("max_digit", tuple("456789"), _draw_max_digit, lambda x: max(x.split()),
                  "the largest of four digits (it occurs once)"),
    ProbeTaskSpec("star_count", NUMBER_WORDS[2:7], _draw_star_count, lambda x: NUMBER_WORDS[x.split().count("*")],
                  "how many of seven symbols are stars, as a number word"),
    ProbeTaskSpec("distinct_symbols", NUMBER_WORDS[2:6], _draw_distinct_symbols,
                  lambda x: NUMBER_WORDS[len(set(x.split()))], "how many different symbols among six, as a number word"),
    ProbeTaskSpec("odd_position", ORDINALS, _draw_odd_position, _odd_position,
                  "the position of the one digit that differs from the other three"),
    ProbeTaskSpec("repeated_symbol", SYMBOLS[:6], _draw_repeated_symbol, _repeated_symbol,
                  "the symbol that occurs twice among four"),
)}
#: the tasks the probe uses unless told otherwise (every task of `PROBE_TASKS` until the pilot says otherwise)
DEFAULT_TASKS: tuple[str, ...] = tuple(PROBE_TASKS)


def probe_spec(name: str) -> ProbeTaskSpec:
    if name not in PROBE_TASKS:
        raise ValueError(f"unknown copy-probe task {name!r}; choose from {', '.join(PROBE_TASKS)}")
    return PROBE_TASKS[name]


def _rng(*parts: Any) -> random.Random:
    """A generator seeded from `parts` (stable across runs and Python versions)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def draw_items(name: str, per_label: int | Mapping[str, int], rng: random.Random,
               exclude: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """Distinct (input, label) pairs of task `name`: `per_label` of each label (a number, or one per label),
    none of whose inputs is in `exclude`; labels interleaved in a random order. Refused when the task has
    too few inputs."""
    spec = probe_spec(name)
    wanted = per_label if isinstance(per_label, Mapping) else dict.fromkeys(spec.labels, per_label)
    seen, pairs = set(exclude), []
    for label in spec.labels:
        got, tries = 0, 0
        while got < wanted.get(label, 0):
            tries += 1
            if tries > 200 * wanted[label] + 1000:
                raise ValueError(f"copy-probe task {name!r} has too few distinct inputs for label {label!r}: "
                                 f"{got} found, {wanted[label]} wanted (besides {len(exclude)} excluded); "
                                 "ask for smaller splits")
            x = spec.draw(rng, label)
            if x not in seen:
                seen.add(x)
                pairs.append((x, label))
                got += 1
    rng.shuffle(pairs)
    return pairs


def probe_label_task(name: str, pairs: Sequence[tuple[str, str]]) -> Task:
    """The `Task` of copy-probe task `name` over `pairs`, with its full label set."""
    return Task(name=name, pairs=tuple(pairs), kind="algorithmic", labels=probe_spec(name).labels)


@dataclass(frozen=True)
class CopyProbeConfig:
    """Which tasks, which construction, `shots` demos per prompt, and prompts per task in each split."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    construction: str = "no-gold"
    shots: int = 4
    n_attr: int = 50
    n_dev: int = 30
    n_test: int = 30

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        for name in self.tasks:
            probe_spec(name)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"give each copy-probe task once, at least one; got {self.tasks}")
        if self.construction not in CONSTRUCTIONS:
            raise ValueError(f"unknown construction {self.construction!r}; choose one of {', '.join(CONSTRUCTIONS)}")
        if self.construction == "copy-control":
            few = [t for t in self.tasks if len(PROBE_TASKS[t].labels) < 3]
            if few:
                raise ValueError(f"the copy-control construction needs at least 3 labels; {few} have fewer")
        if self.shots < 1 or min(self.n_attr, self.n_dev, self.n_test) < 0:
            raise ValueError(f"shots must be >= 1 and split sizes >= 0, got shots={self.shots}, "
                             f"sizes {self.n_attr}/{self.n_dev}/{self.n_test}")

    def size(self, split: str) -> int:
        return {"attribution": self.n_attr, "dev": self.n_dev, "test": self.n_test}[split]

    def to_json(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "construction": self.construction, "shots": self.shots,
                "n_attr": self.n_attr, "n_dev": self.n_dev, "n_test": self.n_test}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "CopyProbeConfig":
        return cls(**{**obj, "tasks": tuple(obj["tasks"])})


@dataclass(frozen=True)
class CopyProbe:
    """The copy probe's attribution, dev and test prompts (every task's, in task order), disjoint by query
    item within each task, and the (task, input, reason) of every pair the prompt builder dropped."""

    config: CopyProbeConfig
    seed: int
    attribution_seed: int
    attribution: tuple[ICLPrompt, ...]
    dev: tuple[ICLPrompt, ...]
    test: tuple[ICLPrompt, ...]
    dropped: tuple[tuple[str, str, str], ...] = ()

    def split(self, name: str, task: str | None = None) -> tuple[ICLPrompt, ...]:
        """The prompts of split `name` (one of `SPLITS`), of one task if `task` is given."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        prompts = getattr(self, name)
        return prompts if task is None else tuple(p for p in prompts if p.task == task)

    def gold_counts(self, split: str) -> dict[str, dict[str, int]]:
        """Prompts per gold label, per task, in `split` (every label, zeros included)."""
        return {t: {y: sum(p.answer == y for p in self.split(split, t)) for y in PROBE_TASKS[t].labels}
                for t in self.config.tasks}

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config.to_json(), "seed": self.seed, "attribution_seed": self.attribution_seed,
                "sizes": {s: len(getattr(self, s)) for s in SPLITS},
                "gold_counts": {s: self.gold_counts(s) for s in SPLITS},
                "dropped": [list(d) for d in self.dropped],
                "prompts": {s: [p.to_json() for p in getattr(self, s)] for s in SPLITS}}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "CopyProbe":
        attribution, dev, test = (tuple(ICLPrompt.from_json(p) for p in obj["prompts"][s]) for s in SPLITS)
        return cls(CopyProbeConfig.from_json(obj["config"]), obj["seed"], obj["attribution_seed"], attribution, dev,
                   test, tuple((t, x, why) for t, x, why in obj["dropped"]))


def build_copy_probe(tokenizer, config: CopyProbeConfig = CopyProbeConfig(), seed: int = 0,
                     attribution_seed: int | None = None) -> CopyProbe:
    """The copy probe's splits for `tokenizer`, seeded.

    Per task and split, the split's own items (n / labels per label, the remainder spread over random
    labels; at least `shots` per label, so every construction finds its demos) are drawn by a generator
    seeded from (seed, task, split), and `build_prompts` makes n of them queries, with demos from the
    others, under the config's construction. Demos never come from another split, and the gold labels
    are exactly as uniform as n allows when n >= shots x labels (each item is then a query once), about
    uniform below that; the test split is drawn
    first, then dev, then attribution (from `attribution_seed`, default `seed`), each excluding the
    inputs drawn before, so query items and demos never cross splits. Every prompt carries its task's
    label set (`label_space`). A split that comes out smaller than asked (pairs dropped as not
    token-exact) is refused with the reasons.
    """
    c = config
    attribution_seed = seed if attribution_seed is None else attribution_seed
    out: dict[str, list[ICLPrompt]] = {s: [] for s in SPLITS}
    dropped: list[tuple[str, str, str]] = []
    for name in c.tasks:
        labels = PROBE_TASKS[name].labels
        used: frozenset[str] = frozenset()
        for split in ("test", "dev", "attribution"):
            n = c.size(split)
            if n == 0:
                continue
            split_seed = attribution_seed if split == "attribution" else seed
            rng = _rng("copy-probe", split_seed, name, split)
            pairs = draw_items(name, _quotas(max(n, c.shots * len(labels)), labels, rng), rng, used)
            used = used | {x for x, _ in pairs}
            build_seed = _rng("copy-probe-prompts", split_seed, name, split).randrange(2 ** 31)
            ps = build_prompts(probe_label_task(name, pairs), tokenizer, shots=c.shots, n=n, seed=build_seed,
                               gold_in_demos=c.construction == "standard",
                               copy_control=c.construction == "copy-control")
            dropped += [(name, pair[0], reason) for pair, reason in ps.dropped]
            if len(ps) < n:
                reasons = sorted({reason for _, reason in ps.dropped})[:3]
                raise ValueError(f"copy-probe task {name!r}: {len(ps)} of {n} {split} prompts could be built "
                                 f"for this tokenizer ({len(ps.dropped)} pairs dropped: {reasons}); "
                                 "leave the task out or ask for fewer prompts")
            out[split] += [replace(p, label_space=labels) for p in ps.prompts]
    attribution, dev, test = (tuple(out[s]) for s in SPLITS)
    return CopyProbe(c, seed, attribution_seed, attribution, dev, test, tuple(dropped))
