"""Conditions: what an evaluation compares, as data. A condition names a set of components and how they
are ablated (zero or mean, at every position or the last), or, later, a change of how the answer is
read (`Readout`); "unpruned" changes nothing.

Conditions flow through the one-pass evaluator (`evaluation.evaluate_conditions`), the checkpointed
task suite (`suite.run_evaluation`), the paired comparisons (`comparisons.compare_rows`, grouped by
`family`) and the figures: nothing parses a condition's name. A result row keeps the name in its
`condition` field (`unpruned`, `pruned`, `random-0`, `bottom`; `pruned@20` within group 20 of a study)
and the structured fields in `spec` (`Condition.describe`).

`standard_conditions` builds the evaluation's usual set around a selection: the selection itself
(`pruned`), layer-matched random sets (`random-<seed>`) and the bottom-score set (`bottom`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechcopy.arch import HookedModel
from mechcopy.attribution import CopyScores
from mechcopy.components import Components, as_components, component_kind, random_matched
from mechcopy.errors import check_number
from mechcopy.io import side_file
from mechcopy.selection import bottom_set
from mechcopy.tasks.prompts import ICLPrompt

ABLATIONS = ("zero", "mean")
POSITIONS = ("all", "last")


@dataclass(frozen=True)
class Means:
    """Every component's mean activation over a reference set of prompts (what mean ablation sets a
    component to: it keeps the component's usual level and removes only what varies across prompts).

    `values[layer]` is [width, *rest] (neurons: [d_mlp]; heads: [n_heads, d_head]); `positions` says
    whether every token position was averaged or only the last; `reference` names the prompts.
    """

    values: dict[int, Tensor]
    kind: str = "neuron"
    positions: str = "all"
    reference: str = ""
    n_prompts: int = 0

    def __post_init__(self):
        component_kind(self.kind)
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown positions {self.positions!r}; choose one of {', '.join(POSITIONS)}")

    def __getitem__(self, layer: int) -> Tensor:
        return self.values[layer]

    def describe(self) -> dict[str, Any]:
        """What the means are, without their values."""
        return {"kind": self.kind, "positions": self.positions, "reference": self.reference, "n_prompts": self.n_prompts}

    def to_json(self) -> dict[str, Any]:
        return {**self.describe(), "values": {str(l): v.tolist() for l, v in sorted(self.values.items())}}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Means":
        values = {int(l): torch.tensor(v, dtype=torch.float32) for l, v in obj["values"].items()}
        return cls(values, obj["kind"], obj["positions"], obj["reference"], obj["n_prompts"])


@runtime_checkable
class Readout(Protocol):
    """A change of how the answer is read from the logits instead of a change of the activations
    (calibration, restricted label scoring). `choose` takes each row's logits for the first answer
    token and the row's prompt, and returns the token chosen per row; generation continues greedily."""

    name: str

    def choose(self, logits: Float[Tensor, "rows vocab"], prompts: Sequence[ICLPrompt]) -> Int[Tensor, "rows"]: ...

    def to_json(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Condition:
    """One condition of an evaluation: a name, its family (how comparisons group it: `unpruned`,
    `pruned`, `random`, `bottom`, ...), the components it ablates (None: none), the ablation (`zero`, or
    `mean` with `means`), the positions (`all`, or `last`: the last position of every forward pass), the
    seed that drew a random set, the group it belongs to in a study (a k, a method; None outside one),
    and an optional `readout`. `label` is the name result rows carry."""

    name: str
    family: str = ""
    components: Components | None = None
    ablation: str = "zero"
    positions: str = "all"
    means: Means | None = field(default=None, compare=False)
    seed: int | None = None
    group: str | int | None = None
    readout: Readout | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a condition needs a name (a non-empty string), got {self.name!r}")
        if self.components is not None:
            as_components(self.components, f"condition {self.name}: components")
        if self.seed is not None:
            check_number(self.seed, f"condition {self.name}: seed", low=0, integer=True)
        object.__setattr__(self, "family", self.family or self.name)
        if self.ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {self.ablation!r}; choose one of {', '.join(ABLATIONS)}")
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown positions {self.positions!r}; choose one of {', '.join(POSITIONS)}")
        if self.ablation == "mean":
            if self.means is None:
                raise ValueError(f"condition {self.label}: mean ablation needs the means (pruning.component_means)")
            if self.components is not None and self.means.kind != self.components.kind:
                raise ValueError(f"condition {self.label}: means of {self.means.kind}s for a set of "
                                 f"{self.components.kind}s")
        elif self.means is not None:
            raise ValueError(f"condition {self.label}: means are for mean ablation (ablation='mean')")

    @property
    def label(self) -> str:
        """The name a result row carries: `name`, or `name@group` within a group."""
        return self.name if self.group is None else f"{self.name}@{self.group}"

    @property
    def ablates(self) -> bool:
        """True when the condition changes any activation."""
        return self.components is not None and len(self.components) > 0

    def describe(self) -> dict[str, Any]:
        """The structured fields a result row carries beside its name (no component list, no means)."""
        return {"name": self.name, "family": self.family, "group": self.group,
                "kind": None if self.components is None else self.components.kind,
                "n_components": 0 if self.components is None else len(self.components),
                "ablation": self.ablation, "positions": self.positions, "seed": self.seed,
                "means": None if self.means is None else self.means.describe(),
                "readout": None if self.readout is None else self.readout.to_json()}

    def to_json(self) -> dict[str, Any]:
        """`describe()` with the components and the means' values: enough to rebuild the condition
        (a readout is recorded, not rebuilt)."""
        return {**self.describe(), "components": None if self.components is None else self.components.to_json(),
                "means": None if self.means is None else self.means.to_json()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Condition":
        if obj.get("readout") is not None:
            raise ValueError(f"condition {obj['name']!r} changes the readout; a readout cannot be rebuilt from JSON")
        comps = obj.get("components")
        means = obj.get("means")
        return cls(obj["name"], obj["family"], None if comps is None else Components.from_json(comps),
                   obj["ablation"], obj["positions"], None if means is None else Means.from_json(means),
                   obj.get("seed"), obj.get("group"))


UNPRUNED = Condition("unpruned")


def standard_conditions(model: HookedModel, components: Components, n_random: int = 5, seed: int = 0,
                        scores: CopyScores | None = None, group: str | int | None = None, ablation: str = "zero",
                        positions: str = "all", means: Means | None = None) -> list[Condition]:
    """The evaluation's conditions around a selection (`UNPRUNED` comes first, separately): `pruned`
    (the selection), `random-<s>` (layer-matched random sets, seeds seed..seed+n_random-1) and `bottom`
    (the lowest-scoring set of the same size, from `scores` or the scores file the set names: see
    `find_scores`), all ablated the same way. An empty selection (find chose k = 0) gives none."""
    as_components(components)
    check_number(n_random, "n_random", low=0, integer=True)
    check_number(seed, "seed", low=0, integer=True)
    components.check(model)
    if not components.pairs:
        return []

    def condition(name: str, family: str, comps: Components, s: int | None = None) -> Condition:
        return Condition(name, family, comps, ablation, positions, means, s, group)

    out = [condition("pruned", "pruned", components)]
    out += [condition(f"random-{s}", "random", random_matched(model, components, s), s)
            for s in range(seed, seed + n_random)]
    scores = scores if scores is not None else find_scores(components)
    if scores is not None:
        out.append(condition("bottom", "bottom", bottom_set(scores, len(components))))
    return out


def check_scores_belong(scores: CopyScores, components: Components, path: str | Path = "the copy scores") -> None:
    """Refuse copy scores that are not the ones `components` was chosen from, without a model: a shape
    other than the sizes its fingerprint records, a kind of its own, or another `find` run (meta `run`)."""
    where = components.source or f"the {components.kind} set"
    kind = component_kind(components.kind)
    want = (components.model.get("n_layers"), components.model.get(kind.size_key))
    if scores.kind != components.kind:
        raise ValueError(f"{path}: these are scores of {component_kind(scores.kind).plural}, but {where} holds "
                         f"{kind.plural}; use the scores `mechcopy find` wrote beside it")
    if all(isinstance(w, int) for w in want) and tuple(scores.scores.shape) != want:
        raise ValueError(f"{path}: copy scores of shape {tuple(scores.scores.shape)}, but {where} names a model of "
                         f"{want[0]} layers of {want[1]} {kind.plural}: they belong to another model; run "
                         "`mechcopy find` again")
    runs = (scores.meta.get("run"), components.meta.get("run"))
    if all(runs) and runs[0] != runs[1]:
        raise ValueError(f"{path}: these copy scores are of another `find` run than {where} (run {runs[0]} vs "
                         f"{runs[1]}: an interrupted `find --force`?); run `mechcopy find` again")


def find_scores(components: Components) -> CopyScores | None:
    """The copy scores a component file names (meta `scores_path`), or None if it names none.

    If the recorded path is gone, the scores file beside the component file is used (a moved folder);
    if neither exists the error says so, rather than the bottom-score baseline quietly going missing.
    """
    recorded = components.meta.get("scores_path")
    if not recorded:
        return None
    candidates = [Path(recorded)]
    if components.source is not None:
        candidates.append(side_file(components.source, ".scores.safetensors"))
    for path in candidates:
        if path.is_file():
            scores = CopyScores.load(path)
            check_scores_belong(scores, components, path)
            return scores
    raise FileNotFoundError(
        f"the bottom-score baseline needs the copy scores of {components.source or 'this neuron set'}, which are "
        f"neither at {recorded} nor beside the neuron file; move the scores file back beside it")
