"""Is the copy-neuron selection stable? Agreement of top-k sets (Jaccard) and of score rankings
(Spearman) across bootstrap resamples of the attribution prompts, across normalisations, and across
IG settings (steps, targets) computed on the same prompts.

Everything starts from per-prompt attributions (`Attributions.values`), so nothing here runs a model:
a bootstrap resample only re-normalises and re-averages. Comparisons are restricted to the layers a
selection may use (`allowed_layers`, e.g. `CopyScores.allowed_layers` from the completeness gate), so
they measure the selection that would actually be made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechcopy.attribution import Attributions, CopyScores, normalise, rank_correlation
from mechcopy.selection import select


def scores_of(values: Float[Tensor, "prompts layers neurons"], normalisation: str) -> Float[Tensor, "layers neurons"]:
    """Copy scores as `attribution.copy_scores` computes them: normalise, then average over prompts."""
    return normalise(values, normalisation).mean(0)


def _eligible(scores: Tensor, allowed_layers: Sequence[int] | None) -> Tensor:
    """The scores of the allowed layers, flattened in (layer, neuron) order."""
    return (scores if allowed_layers is None else scores[list(allowed_layers)]).flatten()


def top_set(scores: Float[Tensor, "layers neurons"], k: int, allowed_layers: Sequence[int] | None = None,
            ) -> frozenset[tuple[int, int]]:
    """The k highest-scoring (layer, neuron) pairs among the allowed layers: `selection.select`'s global top-k."""
    allowed = None if allowed_layers is None else tuple(allowed_layers)
    return frozenset(select(CopyScores(scores, allowed_layers=allowed), "global", k=k).pairs)


def jaccard(a: frozenset, b: frozenset) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if a | b else 1.0


@dataclass(frozen=True)
class Agreement:
    """Two score maps compared: Spearman correlation over the allowed neurons, top-k Jaccard per k."""

    a: str
    b: str
    spearman: float
    jaccard: dict[int, float]

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "spearman": self.spearman,
                "jaccard": {str(k): v for k, v in self.jaccard.items()}}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Agreement":
        return cls(obj["a"], obj["b"], obj["spearman"], {int(k): v for k, v in obj["jaccard"].items()})


def agreement(a: Tensor, b: Tensor, ks: Sequence[int], allowed_layers: Sequence[int] | None = None,
              names: tuple[str, str] = ("a", "b")) -> Agreement:
    """Spearman and top-k Jaccard of two [layers, neurons] score maps."""
    if a.shape != b.shape:
        raise ValueError(f"score maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return Agreement(names[0], names[1], rank_correlation(_eligible(a, allowed_layers), _eligible(b, allowed_layers)),
                     {int(k): jaccard(top_set(a, k, allowed_layers), top_set(b, k, allowed_layers)) for k in ks})


def spread(x: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Mean, median and the 5% / 95% quantiles of `x`."""
    v = np.asarray(x, dtype=float)
    q05, q50, q95 = np.quantile(v, [0.05, 0.5, 0.95])
    return {"mean": float(v.mean()), "q05": float(q05), "median": float(q50), "q95": float(q95)}


@dataclass(frozen=True)
class BootstrapStability:
    """Each bootstrap resample's scores against the full set's: Spearman and top-k Jaccard per resample.

    Resample b takes prompts `np.random.default_rng(seed).integers(0, n_prompts, (n_boot, n_prompts))[b]`.
    """

    normalisation: str
    n_prompts: int
    n_boot: int
    seed: int
    spearman: tuple[float, ...]
    jaccard: dict[int, tuple[float, ...]]

    def summary(self) -> dict[str, Any]:
        """Mean, median and 5%/95% quantiles over resamples."""
        return {"spearman": spread(self.spearman), "jaccard": {str(k): spread(v) for k, v in self.jaccard.items()}}

    def to_json(self) -> dict[str, Any]:
        return {"normalisation": self.normalisation, "n_prompts": self.n_prompts, "n_boot": self.n_boot,
                "seed": self.seed, **self.summary(), "per_resample": {
                    "spearman": list(self.spearman), "jaccard": {str(k): list(v) for k, v in self.jaccard.items()}}}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "BootstrapStability":
        """From the per-resample values `to_json` wrote (its summary is recomputed from them)."""
        per = obj["per_resample"]
        return cls(obj["normalisation"], obj["n_prompts"], obj["n_boot"], obj["seed"], tuple(per["spearman"]),
                   {int(k): tuple(v) for k, v in per["jaccard"].items()})


def bootstrap_stability(values: Attributions | Float[Tensor, "prompts layers neurons"], ks: Sequence[int],
                        normalisation: str = "minmax", n_boot: int = 20, seed: int = 0,
                        allowed_layers: Sequence[int] | None = None) -> BootstrapStability:
    """How much the selection depends on which attribution prompts were drawn: resample the prompts
    with replacement `n_boot` times and compare each resample's scores with the full set's."""
    values = values.toward_copying if isinstance(values, Attributions) else values
    n = values.shape[0]
    if n < 2 or n_boot < 1:
        raise ValueError(f"a bootstrap needs at least 2 prompts and 1 resample, got {n} and {n_boot}")
    full = scores_of(values, normalisation)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    parts = [agreement(full, scores_of(values[torch.as_tensor(i)], normalisation), ks, allowed_layers) for i in idx]
    return BootstrapStability(normalisation, n, n_boot, seed, tuple(p.spearman for p in parts),
                              {int(k): tuple(p.jaccard[int(k)] for p in parts) for k in ks})


def setting_name(att: Attributions) -> str:
    """`ig contrast m=20` / `gradxact contrast`: how `stability_report` names an attribution setting."""
    return f"{att.attribution} {att.target}" + (f" m={att.steps}" if att.attribution == "ig" else "")


@dataclass(frozen=True)
class StabilityReport:
    """Stability of one selection: bootstrap per normalisation (on the reference attributions),
    agreement between normalisations, and agreement between attribution settings of the same prompts."""

    ks: tuple[int, ...]
    allowed_layers: tuple[int, ...] | None
    reference: str
    bootstrap: tuple[BootstrapStability, ...]
    normalisations: tuple[Agreement, ...]
    settings: tuple[Agreement, ...]

    def to_json(self) -> dict[str, Any]:
        return {"ks": list(self.ks), "reference": self.reference,
                "allowed_layers": None if self.allowed_layers is None else list(self.allowed_layers),
                "bootstrap": [b.to_json() for b in self.bootstrap],
                "normalisations": [a.to_json() for a in self.normalisations],
                "settings": [a.to_json() for a in self.settings]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "StabilityReport":
        allowed = obj["allowed_layers"]
        return cls(tuple(obj["ks"]), None if allowed is None else tuple(allowed), obj["reference"],
                   tuple(BootstrapStability.from_json(b) for b in obj["bootstrap"]),
                   tuple(Agreement.from_json(a) for a in obj["normalisations"]),
                   tuple(Agreement.from_json(a) for a in obj["settings"]))


def stability_report(attributions: Attributions | Mapping[str, Attributions], ks: Sequence[int] = (5, 30, 100),
                     normalisations: Sequence[str] = ("minmax", "minmax-neuron", "none"), n_boot: int = 20,
                     seed: int = 0, allowed_layers: Sequence[int] | None = None) -> StabilityReport:
    """All three stabilities. `attributions`: one result, or several settings of the same prompts by name
    (the first is the reference for the bootstrap and the normalisations; settings are compared with the
    first normalisation)."""
    named = {setting_name(attributions): attributions} if isinstance(attributions, Attributions) else dict(attributions)
    if not named or not normalisations:
        raise ValueError("stability_report needs at least one Attributions and one normalisation")
    ref_name, ref = next(iter(named.items()))
    for name, att in named.items():
        if att.values.shape != ref.values.shape or att.gold_tokens != ref.gold_tokens:
            raise ValueError(f"setting {name!r} was not computed on the same prompts as {ref_name!r}")
    ks = tuple(int(k) for k in ks)
    allowed = None if allowed_layers is None else tuple(sorted(int(l) for l in allowed_layers))
    boot = tuple(bootstrap_stability(ref, ks, how, n_boot, seed, allowed) for how in normalisations)
    by_norm = {how: scores_of(ref.toward_copying, how) for how in normalisations}
    norms = tuple(agreement(by_norm[a], by_norm[b], ks, allowed, (a, b))
                  for i, a in enumerate(normalisations) for b in normalisations[i + 1:])
    first = normalisations[0]
    by_setting = {name: scores_of(att.toward_copying, first) for name, att in named.items()}
    names = list(by_setting)
    settings = tuple(agreement(by_setting[a], by_setting[b], ks, allowed, (a, b))
                     for i, a in enumerate(names) for b in names[i + 1:])
    return StabilityReport(ks, allowed, ref_name, boot, norms, settings)
