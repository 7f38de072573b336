"""Conditions: what an evaluation compares, as data. A condition names a set of components and how they
are ablated (zero or mean, at every position or the last), and how the answer is read (`Readout`:
greedy generation, or label scoring with an optional calibration); "unpruned" changes nothing.

Conditions flow through the one-pass evaluator (`evaluation.evaluate_conditions`), the checkpointed
task suite (`suite.run_evaluation`), the paired comparisons (`comparisons.compare_rows`, grouped by
`family`) and the figures: nothing parses a condition's name. A result row keeps the name in its
`condition` field (`unpruned`, `pruned`, `random-0`, `bottom`; `pruned@20` within group 20 of a study)
and the structured fields in `spec` (`Condition.describe`).

`standard_conditions` builds the evaluation's usual set around a selection: the selection itself
(`pruned`), random sets matched on layer (or on layer and size: `components.random_matched`,
`random-<seed>`) and the bottom-score set (`bottom`). `read_by` reads any conditions by another
`Readout` (label scoring), and `calibrated_conditions` adds the calibrations (`contextual`, `batch`,
`domain`, and each combined with pruning: `pruned+contextual`), each with its paired comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from mechcopy.arch import HookedModel
from mechcopy.attribution import CopyScores
from mechcopy.components import Components, Sizes, as_components, component_kind, random_matched
from mechcopy.errors import check_items, check_number
from mechcopy.io import side_file
from mechcopy.selection import bottom_set

ABLATIONS = ("zero", "mean")
#: a condition's other way to act on heads: down-weight the answer position's attention to demo labels
LABEL_ATTENTION = "label-attention"
#: its control: the same heads' attention to as many other demo tokens, drawn per prompt, scaled instead
OTHER_ATTENTION = "other-attention"
ATTENTION_EDITS = (LABEL_ATTENTION, OTHER_ATTENTION)
POSITIONS = ("all", "last")
SCORINGS = ("generate", "labels")
CALIBRATIONS = ("contextual", "batch", "domain")


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


@dataclass(frozen=True)
class Readout:
    """How a condition reads the model's answer, the other thing (beside ablation) a condition may change.

    `scoring`: `generate` (the next token's argmax; greedy generation for answers of several tokens)
    or `labels` (the task's label whose full token sequence has the highest summed log-probability,
    `scoring.score_labels`; closed-label tasks only). `calibration` (label scoring only) re-weights the
    label probabilities before the argmax: `contextual` (content-free queries with the prompt's demos,
    Zhao et al. 2021), `domain` (random in-domain words as the queries, Fei et al. 2023) or `batch`
    (the mean over the task's prompts subtracted, Zhou et al. 2024); see `scoring.LabelScores.weights`.
    """

    scoring: str = "generate"
    calibration: str | None = None

    def __post_init__(self):
        if self.scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {self.scoring!r}; choose one of {', '.join(SCORINGS)}")
        if self.calibration is not None and self.calibration not in CALIBRATIONS:
            raise ValueError(f"unknown calibration {self.calibration!r}; choose from {', '.join(CALIBRATIONS)}")
        if self.calibration is not None and self.scoring != "labels":
            raise ValueError(f"{self.calibration} calibration re-weights label probabilities: it needs "
                             "scoring='labels'")

    @property
    def labels(self) -> bool:
        """True when the answer is read by label scoring."""
        return self.scoring == "labels"

    def to_json(self) -> dict[str, Any]:
        return {"scoring": self.scoring, "calibration": self.calibration}

    @classmethod
    def from_json(cls, obj: dict[str, Any] | None) -> "Readout":
        return cls() if obj is None else cls(obj["scoring"], obj.get("calibration"))


GENERATE = Readout()
LABELS = Readout("labels")


@dataclass(frozen=True)
class ConditionSpec:
    """What a result row records of its condition (`Condition.spec`): its structured fields, without the
    component list or the means' values. Comparisons group rows by `family` (and `group`), never by name."""

    name: str
    family: str
    group: str | int | None = None
    kind: str | None = None
    n_components: int = 0
    ablation: str = "zero"
    positions: str = "all"
    seed: int | None = None
    means: dict[str, Any] | None = None        # `Means.describe()`
    readout: Readout = GENERATE
    versus: tuple[str, ...] = ()
    factor: float | None = None                # label-attention only

    @property
    def label(self) -> str:
        """The name a result row carries: `name`, or `name@group` within a group."""
        return self.name if self.group is None else f"{self.name}@{self.group}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "group": self.group, "kind": self.kind,
                "n_components": self.n_components, "ablation": self.ablation, "positions": self.positions,
                "seed": self.seed, "means": self.means, "readout": self.readout.to_json(), "versus": list(self.versus),
                **({} if self.factor is None else {"factor": self.factor})}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ConditionSpec":
        values = {f.name: obj[f.name] for f in fields(cls) if f.name in obj}
        values["readout"] = Readout.from_json(obj.get("readout"))
        values["versus"] = tuple(obj.get("versus", ()))
        return cls(**values)


@dataclass(frozen=True)
class Condition:
    """One condition of an evaluation: a name, its family (how comparisons group it: `unpruned`,
    `pruned`, `random`, `bottom`, ...), the components it ablates (None: none), the ablation (`zero`, or
    `mean` with `means`), the positions (`all`, or `last`: the last position of every forward pass), the
    seed that drew a random set, the group it belongs to in a study (a k, a method; None outside one),
    the `readout` (generation, or label scoring with an optional calibration), and `versus`: the names
    of other conditions of its group it is compared with besides `unpruned` (a calibration against
    pruning). `label` is the name result rows carry.

    `ablation="label-attention"` does not ablate the heads it names: at the answer position (the
    prompt's last token) it multiplies their attention to the prompt's demo-label tokens by `factor`
    (0 <= factor <= 1; 0 removes it) and renormalises (`pruning.LabelAttention`). Those key positions
    differ per prompt, so it needs label scoring (the label scorer edits the answer position of each
    prompt and of each reference query of a calibration), `positions="last"` and heads. Its control,
    `ablation="other-attention"`, scales the attention to as many other tokens of the demos instead, drawn
    per prompt (`label_attention.other_positions`, seeded by the prompt and `seed`)."""

    name: str
    family: str = ""
    components: Components | None = None
    ablation: str = "zero"
    positions: str = "all"
    means: Means | None = field(default=None, compare=False)
    seed: int | None = None
    group: str | int | None = None
    readout: Readout = GENERATE
    versus: tuple[str, ...] = ()
    factor: float | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a condition needs a name (a non-empty string), got {self.name!r}")
        if self.components is not None:
            as_components(self.components, f"condition {self.name}: components")
        if self.seed is not None:
            check_number(self.seed, f"condition {self.name}: seed", low=0, integer=True)
        object.__setattr__(self, "family", self.family or self.name)
        object.__setattr__(self, "versus", tuple(self.versus))
        if not isinstance(self.readout, Readout):
            raise ValueError(f"condition {self.name}: readout must be a conditions.Readout, got {self.readout!r}")
        if self.ablation not in (*ABLATIONS, *ATTENTION_EDITS):
            raise ValueError(f"unknown ablation {self.ablation!r}; choose one of {', '.join((*ABLATIONS, *ATTENTION_EDITS))}")
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
        if self.ablation in ATTENTION_EDITS:
            self._check_label_attention()
        elif self.factor is not None:
            raise ValueError(f"condition {self.label}: factor is for ablation='label-attention' (or 'other-attention')")

    def _check_label_attention(self) -> None:
        where = f"condition {self.label} ({self.ablation})"
        factor = check_number(self.factor, f"{where}: factor", low=0.0)
        if factor > 1:
            raise ValueError(f"{where}: factor must be at most 1 (it down-weights), got {self.factor}")
        if self.components is None or self.components.kind != "head":
            raise ValueError(f"{where}: down-weights attention, so its components must be heads")
        if self.positions != "last":
            raise ValueError(f"{where}: acts at the answer position only: positions='last'")
        if not self.readout.labels:
            raise ValueError(f"{where}: needs label scoring (readout=Readout('labels'), with any calibration), "
                             f"got {self.readout}")

    @property
    def label(self) -> str:
        """The name a result row carries: `name`, or `name@group` within a group."""
        return self.spec.label

    @property
    def ablates(self) -> bool:
        """True when the condition changes any activation."""
        return self.components is not None and len(self.components) > 0

    @property
    def spec(self) -> ConditionSpec:
        """The structured fields a result row carries beside its name (no component list, no means)."""
        return ConditionSpec(self.name, self.family, self.group,
                             None if self.components is None else self.components.kind,
                             0 if self.components is None else len(self.components), self.ablation, self.positions,
                             self.seed, None if self.means is None else self.means.describe(), self.readout,
                             self.versus, self.factor)

    def describe(self) -> dict[str, Any]:
        """`spec` as JSON."""
        return self.spec.to_json()

    def to_json(self) -> dict[str, Any]:
        """`describe()` with the components and the means' values: enough to rebuild the condition."""
        return {**self.describe(), "components": None if self.components is None else self.components.to_json(),
                "means": None if self.means is None else self.means.to_json()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Condition":
        comps = obj.get("components")
        means = obj.get("means")
        return cls(obj["name"], obj["family"], None if comps is None else Components.from_json(comps),
                   obj["ablation"], obj["positions"], None if means is None else Means.from_json(means),
                   obj.get("seed"), obj.get("group"), Readout.from_json(obj.get("readout")), tuple(obj.get("versus", ())),
                   obj.get("factor"))


UNPRUNED = Condition("unpruned")


def standard_conditions(model: HookedModel, components: Components, n_random: int = 5, seed: int = 0,
                        scores: CopyScores | None = None, group: str | int | None = None, ablation: str = "zero",
                        positions: str = "all", means: Means | None = None, readout: Readout = GENERATE,
                        match: str = "layer", sizes: Sizes | None = None,
                        factor: float | None = None) -> list[Condition]:
    """The evaluation's conditions around a selection (`UNPRUNED` comes first, separately): `pruned`
    (the selection), `random-<s>` (random sets matched on layer, or with `match="size"` on layer and
    size, `components.random_matched` with `sizes`; seeds seed..seed+n_random-1) and `bottom` (the
    lowest-scoring set of the same size, from `scores` or the scores file the set names: see
    `find_scores`), all ablated the same way (an attention edit with its `factor`) and read by
    `readout`. An empty selection (find chose k = 0) gives none."""
    as_components(components)
    check_number(n_random, "n_random", low=0, integer=True)
    check_number(seed, "seed", low=0, integer=True)
    components.check(model)
    if not components.pairs:
        return []

    def condition(name: str, family: str, comps: Components, s: int | None = None) -> Condition:
        return Condition(name, family, comps, ablation, positions, means, s, group, readout, factor=factor)

    out = [condition("pruned", "pruned", components)]
    out += [condition(f"random-{s}", "random", random_matched(model, components, s, match, sizes), s)
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


def read_by(conditions: Sequence[Condition], readout: Readout) -> list[Condition]:
    """`conditions` with their answers read by `readout` (e.g. `LABELS`: label scoring for all)."""
    return [replace(c, readout=readout) for c in conditions]


def calibrated_conditions(conditions: Sequence[Condition], calibrations: Sequence[str]) -> list[Condition]:
    """The conditions that calibrate label scores, to add to `conditions`: for each calibration X
    (`CALIBRATIONS`), `X` (the model unablated, its label probabilities calibrated by X) and, for each
    condition P of the `pruned` family, `P+X` (P's ablation, calibrated; P's group).

    Every condition is compared with `unpruned` (`comparisons.compare_rows`); `X` also with each
    pruned condition (calibration against pruning), `P+X` with P (what calibration adds to pruning)
    and with `X` (what pruning adds to calibration): their `versus`. Label scoring needs a closed-label
    task; `conditions` should be read by `LABELS` too, so that every comparison changes one thing.
    `X` belongs to no group: where the pruned conditions do (a study), `compare_rows(..., group=g)`
    leaves it and the comparisons with it out."""
    conditions = check_items(conditions, Condition, "conditions", "the conditions to calibrate, e.g. standard_conditions(...)")
    calibrations = list(dict.fromkeys(check_items(calibrations, str, "calibrations", "e.g. ['contextual', 'batch']")))
    unknown = [c for c in calibrations if c not in CALIBRATIONS]
    if unknown:
        raise ValueError(f"unknown calibration {unknown[0]!r}; choose from {', '.join(CALIBRATIONS)}")
    pruned = [c for c in conditions if c.family == "pruned"]
    out = []
    for x in calibrations:
        readout = Readout("labels", x)
        out.append(Condition(x, x, readout=readout, versus=tuple(sorted({p.name for p in pruned}))))
        out += [replace(p, name=f"{p.name}+{x}", family=f"{p.family}+{x}", readout=readout, versus=(p.name, x))
                for p in pruned]
    return out


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
