"""What each stage of the copy-neuron study (analyses/replication.py) writes, as typed results: the
stages build them, `to_json` is the stage's JSON (ROOT/MODEL/VARIANT/<stage>.json, under "result"),
and the tables (analyses/replication_tables.py) read them back with `from_json` (`STAGE_TYPES`).

The JSON is the one the study wrote before these types existed, so earlier result folders read back.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from mechcopy.audit import SelfConsistency
from mechcopy.cards import NeuronCard
from mechcopy.comparisons import comparisons_from_json, comparisons_json
from mechcopy.method import Guard
from mechcopy.stability import BootstrapStability, StabilityReport
from mechcopy.stats import Comparison
from mechcopy.suite import ResultRow
from mechcopy.sweeps import KSweep


def _layers(x) -> tuple[int, ...] | None:
    return None if x is None else tuple(x)


def _layers_json(x: tuple[int, ...] | None) -> list[int] | None:
    return None if x is None else list(x)


@dataclass(frozen=True)
class ProbeRates:
    """The unpruned model on one probe split: rates with intervals, label counts, and (where the probe
    has a label space) the share of each outcome (`tasks.outcomes.outcome_rates`)."""

    accuracy: float
    accuracy_ci: tuple[float, float]
    copy_rate: float
    copy_rate_ci: tuple[float, float]
    n: int
    gold_labels: dict[str, int]
    predicted: dict[str, int]
    outcomes: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "accuracy_ci": list(self.accuracy_ci), "copy_rate": self.copy_rate,
                "copy_rate_ci": list(self.copy_rate_ci), "n": self.n, "gold_labels": self.gold_labels,
                "predicted": self.predicted, **self.outcomes}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ProbeRates":
        own = {f.name for f in fields(cls)}
        return cls(obj["accuracy"], tuple(obj["accuracy_ci"]), obj["copy_rate"], tuple(obj["copy_rate_ci"]), obj["n"],
                   obj["gold_labels"], obj["predicted"], {k: v for k, v in obj.items() if k not in own})


@dataclass(frozen=True)
class ProbeStage:
    dev: ProbeRates
    test: ProbeRates
    n_attr: int
    example: str

    def to_json(self) -> dict[str, Any]:
        return {"dev": self.dev.to_json(), "test": self.test.to_json(), "n_attr": self.n_attr, "example": self.example}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ProbeStage":
        return cls(ProbeRates.from_json(obj["dev"]), ProbeRates.from_json(obj["test"]), obj["n_attr"], obj["example"])


@dataclass(frozen=True)
class AttributionStage:
    n: int
    ig_seconds: float
    gradxact_seconds: float
    completeness_error_median_per_layer: tuple[float, ...]
    mean_target_clean: float

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "ig_seconds": self.ig_seconds, "gradxact_seconds": self.gradxact_seconds,
                "completeness_error_median_per_layer": list(self.completeness_error_median_per_layer),
                "mean_target_clean": self.mean_target_clean}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "AttributionStage":
        return cls(obj["n"], obj["ig_seconds"], obj["gradxact_seconds"],
                   tuple(obj["completeness_error_median_per_layer"]), obj["mean_target_clean"])


@dataclass(frozen=True)
class SelectionStage:
    """The method's choice on the dev split: the sweep, the guard's verdict, and the sweep without its bound."""

    sweep: KSweep
    chosen_k: int
    sweep_k: int
    guard: Guard | None
    why: str
    unbounded_k: int | None
    smallest_better_k: int | None
    allowed_layers: tuple[int, ...] | None

    def to_json(self) -> dict[str, Any]:
        return {"sweep": self.sweep.to_json(), "chosen_k": self.chosen_k, "sweep_k": self.sweep_k,
                "guard": None if self.guard is None else self.guard.to_json(), "why": self.why,
                "unbounded_k": self.unbounded_k, "smallest_better_k": self.smallest_better_k,
                "allowed_layers": _layers_json(self.allowed_layers)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "SelectionStage":
        return cls(KSweep.from_json(obj["sweep"]), obj["chosen_k"], obj["sweep_k"],
                   None if obj["guard"] is None else Guard.from_json(obj["guard"]), obj["why"], obj["unbounded_k"],
                   obj["smallest_better_k"], _layers(obj["allowed_layers"]))


@dataclass(frozen=True)
class TimedChecks:
    """Self-consistency checks by name, each with its seconds (the consistency stage: one per attribution;
    the ablation stage: one per ablation, with the k grid and where the means came from)."""

    checks: dict[str, SelfConsistency]
    seconds: dict[str, float]
    ks: tuple[int, ...] | None = None
    chosen_k: int | None = None
    means_from: str | None = None

    def to_json(self) -> dict[str, Any]:
        head = {} if self.ks is None else {"ks": list(self.ks), "chosen_k": self.chosen_k, "means_from": self.means_from}
        return {**head, **{name: {**c.to_json(), "seconds": self.seconds[name]} for name, c in self.checks.items()}}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "TimedChecks":
        checks = {k: v for k, v in obj.items() if k not in ("ks", "chosen_k", "means_from")}
        ks = obj.get("ks")
        return cls({k: SelfConsistency.from_json(v) for k, v in checks.items()},
                   {k: v["seconds"] for k, v in checks.items()}, None if ks is None else tuple(ks), obj.get("chosen_k"),
                   obj.get("means_from"))


@dataclass(frozen=True)
class CardsStage:
    cards: tuple[NeuronCard, ...]
    neurons: tuple[tuple[int, int], ...]

    def to_json(self) -> dict[str, Any]:
        return {"cards": [c.to_json() for c in self.cards], "neurons": [list(n) for n in self.neurons]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "CardsStage":
        return cls(tuple(NeuronCard.from_json(c) for c in obj["cards"]), tuple((l, i) for l, i in obj["neurons"]))


@dataclass(frozen=True)
class MethodStability:
    """One attribution's own bootstrap, and the top-k overlap of its selection with the variant's."""

    allowed_layers: tuple[int, ...] | None
    bootstrap: BootstrapStability
    jaccard_with_variant: dict[int, float]

    def to_json(self) -> dict[str, Any]:
        return {"allowed_layers": _layers_json(self.allowed_layers), "bootstrap": self.bootstrap.to_json(),
                "jaccard_with_variant": {str(k): v for k, v in self.jaccard_with_variant.items()}}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "MethodStability":
        return cls(_layers(obj["allowed_layers"]), BootstrapStability.from_json(obj["bootstrap"]),
                   {int(k): v for k, v in obj["jaccard_with_variant"].items()})


@dataclass(frozen=True)
class StabilityStage:
    bootstrap_and_normalisations: StabilityReport
    ig_settings: StabilityReport
    allowed_layers: tuple[int, ...] | None
    methods: dict[str, MethodStability]

    def to_json(self) -> dict[str, Any]:
        return {"bootstrap_and_normalisations": self.bootstrap_and_normalisations.to_json(),
                "ig_settings": self.ig_settings.to_json(), "allowed_layers": _layers_json(self.allowed_layers),
                "methods": {k: m.to_json() for k, m in self.methods.items()}}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "StabilityStage":
        return cls(StabilityReport.from_json(obj["bootstrap_and_normalisations"]),
                   StabilityReport.from_json(obj["ig_settings"]), _layers(obj["allowed_layers"]),
                   {k: MethodStability.from_json(m) for k, m in obj["methods"].items()})


def _rows(obj: list[dict[str, Any]]) -> tuple[ResultRow, ...]:
    return tuple(ResultRow.from_json(r) for r in obj)


def _pooled_json(pooled: dict[Any, list[Comparison]]) -> dict[str, list[dict[str, Any]]]:
    return {str(k): [c.to_json() for c in cs] for k, cs in pooled.items()}


def _pooled(obj: dict[str, list[dict[str, Any]]], key=str) -> dict[Any, list[Comparison]]:
    return {key(k): [Comparison.from_json(c) for c in cs] for k, cs in obj.items()}


@dataclass(frozen=True)
class HeldOutStage:
    """evaluate-standard / evaluate-nogold: every held-out task unpruned and, per k of the grid, its top-k
    set and random sets; the comparisons per k ({k: {task or "pooled": [Comparison]}})."""

    grid: tuple[int, ...]
    chosen_k: int
    unbounded_k: int | None
    smallest_better_k: int | None
    rows: tuple[ResultRow, ...]
    dropped: dict[str, int]
    comparisons: dict[int, dict[str, list[Comparison]]]

    def to_json(self) -> dict[str, Any]:
        return {"grid": list(self.grid), "chosen_k": self.chosen_k, "unbounded_k": self.unbounded_k,
                "smallest_better_k": self.smallest_better_k, "rows": [r.to_json() for r in self.rows],
                "dropped": self.dropped,
                "comparisons": {str(k): comparisons_json(c) for k, c in self.comparisons.items()}}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "HeldOutStage":
        return cls(tuple(obj["grid"]), obj["chosen_k"], obj["unbounded_k"], obj["smallest_better_k"],
                   _rows(obj["rows"]), obj["dropped"],
                   {int(k): comparisons_from_json(c) for k, c in obj["comparisons"].items()})


@dataclass(frozen=True)
class MethodsStage:
    """evaluate-methods: each attribution's top-k set and its random set at one k; pooled comparisons per method."""

    k: int
    chosen_k: int
    n_per_task: int
    methods: tuple[str, ...]
    rows: tuple[ResultRow, ...]
    dropped: dict[str, int]
    pooled: dict[str, list[Comparison]]

    def to_json(self) -> dict[str, Any]:
        return {"k": self.k, "chosen_k": self.chosen_k, "n_per_task": self.n_per_task, "methods": list(self.methods),
                "rows": [r.to_json() for r in self.rows], "dropped": self.dropped, "pooled": _pooled_json(self.pooled)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "MethodsStage":
        return cls(obj["k"], obj["chosen_k"], obj["n_per_task"], tuple(obj["methods"]), _rows(obj["rows"]),
                   obj["dropped"], _pooled(obj["pooled"]))


@dataclass(frozen=True)
class KCurveStage:
    """kcurve-tasks: every k of the dev sweep on the tasks; pooled comparisons per k."""

    ks: tuple[int, ...]
    chosen_k: int
    n_per_task: int
    rows: tuple[ResultRow, ...]
    dropped: dict[str, int]
    pooled: dict[int, list[Comparison]]

    def to_json(self) -> dict[str, Any]:
        return {"ks": list(self.ks), "chosen_k": self.chosen_k, "n_per_task": self.n_per_task,
                "rows": [r.to_json() for r in self.rows], "dropped": self.dropped, "pooled": _pooled_json(self.pooled)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "KCurveStage":
        return cls(tuple(obj["ks"]), obj["chosen_k"], obj["n_per_task"], _rows(obj["rows"]), obj["dropped"],
                   _pooled(obj["pooled"], int))


#: stage name -> the type its result is read back as
STAGE_TYPES: dict[str, Any] = {
    "probe": ProbeStage, "attribution": AttributionStage, "selection": SelectionStage, "consistency": TimedChecks,
    "ablation": TimedChecks, "cards": CardsStage, "stability": StabilityStage, "evaluate-standard": HeldOutStage,
    "evaluate-nogold": HeldOutStage, "evaluate-methods": MethodsStage, "kcurve-tasks": KCurveStage}
