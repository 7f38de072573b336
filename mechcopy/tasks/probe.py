"""The copy probe: count the vowels of a common word ("lemon -> 2"), with `shots` demonstrations whose
labels never include the query's gold label, so every prediction equal to a demo label is a copy
error by construction. Attribution and dev splits are disjoint by query word.

Two versions. The *classic* probe (`probe_task`, `probe_prompts`, `probe_splits`) takes the words
below and their natural label distribution (2 vowels: about half the words). The *balanced* probe
(`ProbeConfig`, `build_probe`) draws items from `data/probe_items.json` (words, places, people) so
that every gold count is equally frequent, and gives each prompt `shots` distinct demo labels out of the
non-gold counts, so a wrong in-range answer that no demo carries exists: `tasks.outcomes.outcomes`
tells a copy from "any wrong digit".
"""

from __future__ import annotations

import itertools
import json
import numbers
import random
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Hashable, Sequence, TypeVar

from mechcopy.errors import check_number
from mechcopy.tasks.task import DATA_DIR, PROBE_ITEMS, PROBE_NAME, Task
from mechcopy.tasks.prompts import TEMPLATE, ICLPrompt, PromptSet, build_prompts, make_prompt

VOWELS = "aeiou"

#: Common English single words (lower case, letters only), chosen for this project.
WORDS: tuple[str, ...] = tuple("""
apple table river mountain garden window lemon doctor pencil flower orange banana house water
chair bottle forest island summer winter spring autumn yellow purple green black white brown
silver golden music paper letter number animal family friend mother father sister brother
teacher student school market village city country ocean desert valley castle bridge tower
road street train plane boat ship truck bicycle engine rocket planet moon star cloud storm
thunder rain snow wind fire stone metal glass wood cotton leather button pocket jacket shirt
dress shoe hat glove scarf blanket pillow candle mirror picture camera radio phone computer
keyboard screen kitchen bedroom bathroom garage office library museum theater hospital airport
station factory farm barn horse cow sheep goat pig chicken duck rabbit tiger lion monkey
elephant giraffe zebra kangaroo dolphin whale shark turtle snake spider butterfly bee ant
eagle parrot penguin potato tomato carrot onion garlic pepper cucumber pumpkin melon cherry
grape peach pear plum coconut avocado bread butter cheese honey sugar salt coffee tea juice
cookie pizza pasta noodle rice soup salad sandwich dinner lunch breakfast picnic holiday
birthday journey adventure story history science language nature energy people animal idea
problem answer question reason moment minute second hour morning evening evening afternoon
tomorrow yesterday today calendar umbrella envelope elevator vegetable tornado volcano
hurricane potato diamond emerald ruby pearl crystal magnet battery rainbow shadow silence
voice song dance party game puzzle riddle secret treasure pirate captain soldier police
farmer baker painter writer singer dancer pilot sailor hunter king queen prince princess
giant dragon monster robot wizard angel hero hand foot head nose mouth ear eye finger
shoulder elbow knee ankle tooth heart brain stomach blood bone skin hair beard
circle square triangle line point corner edge center middle bottom top side front back
happy sad angry funny quiet loud gentle brave clever lazy busy easy heavy light dark bright
cold warm hot cool dry wet clean dirty empty full early late fast slow young old new
open close begin finish travel visit remember forget imagine discover explore protect
decide create describe listen answer repeat notice follow borrow deliver continue
radio video piano guitar violin trumpet drum ticket basket bucket hammer ladder rope
coin ring necklace bracelet tunnel canal harbor lighthouse meadow prairie jungle canyon
glacier lagoon galaxy universe education information television university celebration
dictionary refrigerator opportunity imagination definition population organization
calculator helicopter motorcycle submarine caterpillar alligator avocado banana
""".split())
WORDS = tuple(dict.fromkeys(w for w in WORDS if 1 <= sum(c in VOWELS for c in w) <= 9))


def vowel_count(word: str) -> int:
    return sum(c in VOWELS for c in word.lower())


def probe_task(words: tuple[str, ...] = WORDS) -> Task:
    """The vowel-counting task: (word, number of vowels as one digit) for every word."""
    return Task(name=PROBE_NAME, pairs=tuple((w, str(vowel_count(w))) for w in words), kind="probe")


def probe_prompts(tokenizer, n: int = 150, shots: int = 4, seed: int = 0) -> PromptSet:
    """`n` probe prompts (distinct query words), `shots` demos each; the gold label is never a demo label."""
    return build_prompts(probe_task(), tokenizer, shots=shots, n=n, seed=seed)


def probe_splits(tokenizer, n_attr: int = 100, n_dev: int = 50, shots: int = 4,
                 seed: int = 0) -> tuple[list[ICLPrompt], list[ICLPrompt]]:
    """Attribution and dev prompts whose query words are disjoint (demos come from all words)."""
    full = probe_prompts(tokenizer, n=len(WORDS), shots=shots, seed=seed)
    prompts = list(full.prompts)
    random.Random(seed + 1).shuffle(prompts)
    if len(prompts) < n_attr + n_dev:
        raise ValueError(f"the probe has {len(prompts)} usable query words for this tokenizer; "
                         f"n_attr + n_dev = {n_attr + n_dev} is too many")
    return prompts[:n_attr], prompts[n_attr:n_attr + n_dev]


# ---------------------------------------------------------------- the balanced probe

#: prompt formats: (template, separator). `comma` is the paper's one line ("New York -> 2, Lyon -> 1, Florida ->").
FORMATS = {"newline": (TEMPLATE, "\n"), "comma": (TEMPLATE, ", ")}
ITEM_SETS = ("words", "places", "people", "names", "mixed")
SPLITS = ("attribution", "dev", "test")


@dataclass(frozen=True)
class ProbeConfig:
    """A variant of the vowel-counting probe.

    `counts` are the gold labels used (single digits); `items` the pool (`mixed`: all three lists);
    `template` a key of `FORMATS`; `shots` demos per prompt. `balanced`: gold counts exactly uniform and
    `shots` distinct demo labels per prompt, each such subset of the non-gold counts equally often;
    otherwise the items' natural gold distribution and `shots` demos drawn from all non-gold items
    (labels may repeat).
    """

    counts: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    items: str = "mixed"
    template: str = "newline"
    shots: int = 4
    balanced: bool = True

    def __post_init__(self):
        if not isinstance(self.counts, (tuple, list)) or not all(
                isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in self.counts):
            raise TypeError(f"counts must be single digits (0..9), got {self.counts!r}")
        check_number(self.shots, "shots", low=1, integer=True)
        counts = tuple(int(c) for c in self.counts)
        object.__setattr__(self, "counts", counts)
        if len(set(counts)) != len(counts) or len(counts) < 2 or not all(0 <= c <= 9 for c in counts):
            raise ValueError(f"counts must be at least two distinct single digits (0..9), got {self.counts}")
        if self.items not in ITEM_SETS:
            raise ValueError(f"unknown item set (items) {self.items!r}; choose one of {', '.join(ITEM_SETS)}")
        if not isinstance(self.template, str) or self.template not in FORMATS:
            raise ValueError(f"unknown probe format (template) {self.template!r}; choose one of {', '.join(FORMATS)}")
        if self.shots < 1:
            raise ValueError(f"the probe needs shots >= 1 demos, got {self.shots}")
        if self.balanced and self.shots > len(counts) - 1:
            raise ValueError(f"a balanced probe gives each prompt `shots` distinct non-gold labels: shots = {self.shots} "
                             f"needs at least {self.shots + 1} counts, got {len(counts)}")

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(str(c) for c in self.counts)

    @property
    def name(self) -> str:
        """The task name its prompts carry, e.g. `copy_probe:balanced:mixed:newline`."""
        return ":".join([PROBE_NAME, "balanced" if self.balanced else "natural", self.items, self.template])

    def to_json(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "items": self.items, "template": self.template, "shots": self.shots,
                "balanced": self.balanced, "name": self.name}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ProbeConfig":
        return cls(tuple(obj["counts"]), obj["items"], obj["template"], obj["shots"], obj["balanced"])


def load_items(which: str = "mixed") -> tuple[str, ...]:
    """The balanced probe's item pool: `words`, `places`, `people`, both kinds of names (`names`: the
    paper's "New York -> 2, Lyon -> 1"), or all three (`mixed`)."""
    if which not in ITEM_SETS:
        raise ValueError(f"unknown item set {which!r}; choose one of {', '.join(ITEM_SETS)}")
    data = json.loads((DATA_DIR / f"{PROBE_ITEMS}.json").read_text(encoding="utf-8"))
    keys = {"mixed": ("words", "places", "people"), "names": ("places", "people")}.get(which, (which,))
    return tuple(dict.fromkeys(x for key in keys for x in data[key]))


@dataclass(frozen=True)
class ProbeSplits:
    """Attribution, dev and test prompts of one probe variant, disjoint by query item, and every
    (item, reason) that was dropped because its prompt could not be made token-exact."""

    config: ProbeConfig
    attribution: tuple[ICLPrompt, ...]
    dev: tuple[ICLPrompt, ...]
    test: tuple[ICLPrompt, ...]
    dropped: tuple[tuple[str, str], ...]
    seed: int

    def gold_counts(self, split: str) -> dict[str, int]:
        """Prompts per gold label in `split` (every label of the config, zeros included)."""
        counts = Counter(p.answer for p in getattr(self, split))
        return {label: counts[label] for label in self.config.labels}

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config.to_json(), "seed": self.seed,
                "sizes": {s: len(getattr(self, s)) for s in SPLITS},
                "gold_counts": {s: self.gold_counts(s) for s in SPLITS},
                "dropped": [list(d) for d in self.dropped],
                "prompts": {s: [p.to_json() for p in getattr(self, s)] for s in SPLITS}}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ProbeSplits":
        """The splits `to_json` wrote (sizes and gold counts are recomputed from the prompts)."""
        prompts = {s: tuple(ICLPrompt.from_json(p) for p in obj["prompts"][s]) for s in SPLITS}
        return cls(ProbeConfig.from_json(obj["config"]), prompts["attribution"], prompts["dev"], prompts["test"],
                   tuple((item, why) for item, why in obj["dropped"]), obj["seed"])


L = TypeVar("L", bound=Hashable)


def _quotas(n: int, labels: Sequence[L], rng: random.Random) -> dict[L, int]:
    """n split over labels as evenly as possible; the remainder goes to a random subset of labels."""
    base, extra = divmod(n, len(labels))
    lucky = set(rng.sample(list(labels), extra))
    return {c: base + (c in lucky) for c in labels}


def _demo_label_cycle(others: Sequence[int], k: int, rng: random.Random):
    """k-subsets of `others`, each equally often: passes over all subsets, each pass in a new order."""
    subsets = list(itertools.combinations(others, k))
    while True:
        rng.shuffle(subsets)
        yield from subsets


def check_probe_size(config: ProbeConfig | None, n: int, what: str = "n_attr + n_dev") -> None:
    """Refuse, before any tokenizer or model, more probe prompts than the item pool can give: `n`
    query items in all, split evenly over the counts when balanced (None: the classic probe's words).
    Items a tokenizer cannot make exact are dropped later, so passing this is necessary, not sufficient."""
    if config is None:
        have, source = len(WORDS), "the classic probe's words"
        enough = n <= have
    else:
        items = load_items(config.items)
        per_count = {c: sum(vowel_count(x) == c for x in items) for c in config.counts}
        have, source = sum(per_count.values()), f"the {config.items!r} items"
        # a balanced split asks n // len(counts) items of every count (the remainder spread over counts)
        enough = n <= have and (not config.balanced or n // len(per_count) <= min(per_count.values()))
    if not enough:
        raise ValueError(f"{what} = {n} probe prompts, but {source} give at most {have} query items"
                         + ("" if config is None or not config.balanced else
                            f" ({min(per_count.values())} of the rarest count)") + "; ask for fewer prompts")


def build_probe(tokenizer, config: ProbeConfig = ProbeConfig(), n_attr: int = 100, n_dev: int = 50,
                n_test: int = 50, seed: int = 0) -> ProbeSplits:
    """Attribution, dev and test prompts of the probe variant `config`, seeded.

    Query items are disjoint across splits; demos may use any item but the query (their counts
    differ from the gold count, so the query item is never a demo). Every answer and demo label is one
    exact token after the prompt; an item whose prompt cannot be made so is dropped and reported, and
    another item of the same count takes its place, so a balanced split stays exactly balanced
    (per gold count: n // len(counts), the remainder spread over random counts).
    """
    c = config
    template, sep = FORMATS[c.template]
    rng = random.Random(seed)
    dropped: list[tuple[str, str]] = []
    by_count: dict[int, list[str]] = {n: [] for n in c.counts}
    for item in load_items(c.items):
        n = vowel_count(item)
        if n not in by_count:
            continue
        try:
            make_prompt([], (item, str(n)), tokenizer, template, sep)
        except ValueError as e:
            dropped.append((item, str(e)))
        else:
            by_count[n].append(item)
    empty = [n for n, items in by_count.items() if not items]
    if empty:
        raise ValueError(f"no usable {c.items!r} item has {empty} vowels; choose counts the pool covers")
    # query queues: one per gold count (balanced), or one over all items (natural label distribution)
    pools = by_count if c.balanced else {None: [x for items in by_count.values() for x in items]}
    queues = {n: rng.sample(items, len(items)) for n, items in pools.items()}

    def prompt_for(query: str, gold: int, cycles: dict) -> ICLPrompt:
        if c.balanced:
            cycle = cycles.setdefault(gold, _demo_label_cycle([n for n in c.counts if n != gold], c.shots, rng))
            labels = list(next(cycle))
            rng.shuffle(labels)
            demos = [(rng.choice(by_count[d]), str(d)) for d in labels]
        else:
            pool = [x for n, items in by_count.items() if n != gold for x in items]
            demos = [(x, str(vowel_count(x))) for x in rng.sample(pool, c.shots)]
        p = make_prompt(demos, (query, str(gold)), tokenizer, template, sep, c.name)
        if len(p.answer_ids) != 1 or any(len(ids) != 1 for ids in p.demo_label_ids):
            raise ValueError(f"answer or a demo label is more than one token ({p.answer_ids}, {p.demo_label_ids})")
        return replace(p, label_space=c.labels)

    splits = []
    for split, size in zip(SPLITS, (n_attr, n_dev, n_test)):
        if size < 0:
            raise ValueError(f"split sizes must be >= 0, got {split} = {size}")
        cycles: dict = {}
        wanted = _quotas(size, c.counts, rng) if c.balanced else {None: size}
        prompts = []
        for gold, quota in wanted.items():
            queue = queues[gold]
            built = 0
            while built < quota:
                if not queue:
                    have = {n: len(v) for n, v in by_count.items()}
                    raise ValueError(
                        f"the {c.items!r} items run out{'' if gold is None else f' for gold count {gold}'}: "
                        f"n_attr + n_dev + n_test = {n_attr + n_dev + n_test} prompts need more query items than "
                        f"the pool has (usable items per count: {have}); ask for fewer prompts or use items='mixed'")
                query = queue.pop()
                try:
                    prompts.append(prompt_for(query, vowel_count(query), cycles))
                except ValueError as e:
                    dropped.append((query, str(e)))
                else:
                    built += 1
        rng.shuffle(prompts)
        splits.append(tuple(prompts))
    attribution, dev, test = splits
    return ProbeSplits(c, attribution, dev, test, dropped=tuple(dropped), seed=seed)
