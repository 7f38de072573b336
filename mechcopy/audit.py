"""Does a selection do what its scores claim? The chosen set pruned against layer-matched random sets
of the same size and unpruned, paired per prompt, along k.

* `self_consistency`: on the attribution prompts themselves, the attribution target (`contrast` =
  logit(copied label) - logit(gold), the copied label fixed on the clean run). IG claims the top-k
  neurons push towards copying, so pruning them must lower the target more than random sets do: a
  k passes when the 95% interval of chosen - random lies below 0 (above 0 for `gold_logprob`).
  `find` can refuse a selection that fails (`FindConfig.consistency_random`).
* `k_curve`: ICL outcomes (accuracy, copy rate, and for probe prompts the in-range non-copy rate) on
  given prompts, the probe's dev or test split, along k: the whole curve beside the guarded choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechcopy.arch import HookedModel, arch_of
from mechcopy.attribution import COPY_SIGN, TARGETS, CopyScores, make_target
from mechcopy.batching import token_batches
from mechcopy.components import random_matched
from mechcopy.conditions import Means
from mechcopy.evaluation import predict
from mechcopy.progress import tqdm
from mechcopy.pruning import component_sizes, pruning_hooks
from mechcopy.selection import select
from mechcopy.stats import Comparison, paired, paired_means, versus_sets
from mechcopy.tasks.outcomes import outcome_arrays


def last_logits(model: HookedModel, prompts: Sequence, fwd_hooks=(), batch_size: int = 32,
                ) -> Float[Tensor, "prompts vocab"]:
    """Last-position logits of every prompt under `fwd_hooks` (prompts of equal token length batched
    together, `batching.token_batches`)."""
    arch = arch_of(model)
    ids = [model.to_tokens(p.text)[0] for p in prompts]
    out: list[Tensor | None] = [None] * len(prompts)
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        for batch in token_batches(ids, [1] * len(ids), batch_size, pad=False):
            for i, row in zip(batch, arch.last_logits(model, torch.stack([ids[i] for i in batch]))):
                out[i] = row
    return torch.stack(out)  # type: ignore[arg-type]


def target_values(model: HookedModel, prompts: Sequence, target: str = "contrast", fwd_hooks=(),
                  specs: Sequence | None = None) -> np.ndarray:
    """The attribution target of each prompt under `fwd_hooks`; `specs` (from the clean run) fix the
    copied label, as IG does."""
    logits = last_logits(model, prompts, fwd_hooks).float()
    if specs is None:
        specs = [make_target(target, p, row) for p, row in zip(prompts, logits)]
    return np.array([float(spec(row[None])[0]) for spec, row in zip(specs, logits)])


@dataclass(frozen=True)
class ConsistencyRow:
    """One k: mean target unpruned / chosen pruned / random sets pruned, the paired differences, and
    the verdict (chosen moves the target away from copying more than random sets do)."""

    k: int
    n_neurons: int
    unpruned: float
    chosen: float
    random: float
    chosen_vs_random: Comparison
    chosen_vs_unpruned: Comparison
    passed: bool
    per_prompt_chosen: tuple[float, ...]
    per_prompt_random: tuple[tuple[float, ...], ...]

    def to_json(self) -> dict[str, Any]:
        return {"k": self.k, "n_neurons": self.n_neurons, "unpruned": self.unpruned, "chosen": self.chosen,
                "random": self.random, "chosen_vs_random": self.chosen_vs_random.to_json(),
                "chosen_vs_unpruned": self.chosen_vs_unpruned.to_json(), "passed": self.passed,
                "per_prompt_chosen": list(self.per_prompt_chosen),
                "per_prompt_random": [list(r) for r in self.per_prompt_random]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ConsistencyRow":
        return cls(obj["k"], obj["n_neurons"], obj["unpruned"], obj["chosen"], obj["random"],
                   Comparison.from_json(obj["chosen_vs_random"]), Comparison.from_json(obj["chosen_vs_unpruned"]),
                   obj["passed"], tuple(obj["per_prompt_chosen"]), tuple(tuple(r) for r in obj["per_prompt_random"]))


@dataclass(frozen=True)
class SelfConsistency:
    """`self_consistency`'s result: one row per k, and the per-prompt unpruned target."""

    target: str
    mode: str
    n_prompts: int
    n_random: int
    seed: int
    per_prompt_unpruned: tuple[float, ...]
    rows: tuple[ConsistencyRow, ...]
    ablation: str = "zero"        # "zero" (pruning) or "mean" (`pruning.component_means`), "... at the last position"
    match: str = "layer"          # the random sets: matched on layer, or on layer and size

    @property
    def passed(self) -> bool:
        """Every k passed."""
        return all(r.passed for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "mode": self.mode, "n_prompts": self.n_prompts, "n_random": self.n_random,
                "seed": self.seed, "ablation": self.ablation, "random_match": self.match, "passed": self.passed,
                "per_prompt_unpruned": list(self.per_prompt_unpruned),
                "rows": [r.to_json() for r in self.rows]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "SelfConsistency":
        return cls(obj["target"], obj["mode"], obj["n_prompts"], obj["n_random"], obj["seed"],
                   tuple(obj["per_prompt_unpruned"]), tuple(ConsistencyRow.from_json(r) for r in obj["rows"]),
                   obj.get("ablation", "zero"), obj.get("random_match", "layer"))


def self_consistency(model: HookedModel, prompts: Sequence, scores: CopyScores, ks: Sequence[int] = (5, 30, 100),
                     mode: str = "global", target: str = "contrast", n_random: int = 5, seed: int = 0,
                     n_boot: int = 2000, progress: bool = False, ablation: str = "zero", positions: str = "all",
                     means: Means | None = None, match: str = "layer") -> SelfConsistency:
    """The target on `prompts` (the attribution prompts) unpruned, with `select(scores, mode, k)` pruned and
    with `n_random` layer-matched random sets pruned (seeds seed..seed+n_random-1), for every k. With
    `match="size"` the random sets are matched on size too (`components.random_matched`: each
    component's mean size at the answer position of `prompts`, `pruning.component_sizes`). With
    `ablation="mean"` every set is mean-ablated to `means` (`pruning.component_means`) instead of
    zeroed; with `positions="last"`, at the last position only (`pruning.pruning_hooks`).

    chosen - random: `stats.paired_means` over the random family (prompts and sets resampled);
    chosen - unpruned: `stats.paired_means` against the single baseline.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if n_random < 1 or not prompts:
        raise ValueError(f"the check needs prompts and n_random >= 1 random sets, got {len(prompts)} and {n_random}")
    scores.check(model)
    sizes = component_sizes(model, prompts, scores.kind, "the attribution prompts") if match == "size" else None
    clean = last_logits(model, prompts).float()
    specs = [make_target(target, p, row) for p, row in zip(prompts, clean)]
    unpruned = np.array([float(spec(row[None])[0]) for spec, row in zip(specs, clean)])
    sign = COPY_SIGN[target]
    rows = []
    for k in tqdm(list(ks), desc="self-consistency", disable=not progress):
        chosen_set = select(scores, mode, k=int(k))
        chosen = target_values(model, prompts, target, pruning_hooks(model, chosen_set, ablation, positions, means),
                               specs)
        rand = np.stack([target_values(model, prompts, target,
                                       pruning_hooks(model, random_matched(model, chosen_set, s, match, sizes), ablation,
                                                     positions, means), specs)
                         for s in range(seed, seed + n_random)])
        vs_random = paired_means(chosen, rand, "probe", f"top-{k}", "random", target, n_boot, seed)
        vs_unpruned = paired_means(chosen, unpruned, "probe", f"top-{k}", "unpruned", target, n_boot, seed)
        passed = vs_random.ci[1] < 0 if sign > 0 else vs_random.ci[0] > 0
        rows.append(ConsistencyRow(int(k), len(chosen_set), float(unpruned.mean()), float(chosen.mean()),
                                   float(rand.mean()), vs_random, vs_unpruned, bool(passed),
                                   tuple(chosen.tolist()), tuple(map(tuple, rand.tolist()))))
    return SelfConsistency(target, mode, len(prompts), n_random, seed, tuple(unpruned.tolist()), tuple(rows),
                           ablation + (" at the last position" if positions == "last" else ""), match)


# ---------------------------------------------------------------- the k curve on ICL prompts


@dataclass(frozen=True)
class KCurve:
    """ICL outcomes along k on one prompt set: per k the rates of the chosen set, the mean of the random
    sets and unpruned, with paired comparisons (chosen vs random sets, chosen vs unpruned) per metric."""

    metrics: tuple[str, ...]
    unpruned: dict[str, float]
    rows: tuple[dict[str, Any], ...]
    mode: str
    n_prompts: int
    n_random: int
    seed: int

    def to_json(self) -> dict[str, Any]:
        return {"metrics": list(self.metrics), "unpruned": self.unpruned, "rows": list(self.rows), "mode": self.mode,
                "n_prompts": self.n_prompts, "n_random": self.n_random, "seed": self.seed}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "KCurve":
        return cls(tuple(obj["metrics"]), dict(obj["unpruned"]), tuple(obj["rows"]), obj["mode"], obj["n_prompts"],
                   obj["n_random"], obj["seed"])


def k_curve(model: HookedModel, prompts: Sequence, scores: CopyScores, ks: Sequence[int] = (5, 10, 20, 50, 100),
            mode: str = "global", n_random: int = 5, seed: int = 0, n_boot: int = 2000,
            progress: bool = False, match: str = "layer") -> KCurve:
    """Accuracy and copy rate (and the in-range non-copy rate on probe prompts) on `prompts` for every k:
    `select(scores, mode, k)` pruned, `n_random` layer-matched random sets pruned (`match="size"`: on
    size too, as `self_consistency`), and unpruned.

    Per metric: chosen vs random sets (`stats.versus_sets`) and chosen vs unpruned (`stats.paired`).
    """
    if n_random < 1 or not prompts:
        raise ValueError(f"the k curve needs prompts and n_random >= 1 random sets, got {len(prompts)} and {n_random}")
    scores.check(model)
    sizes = component_sizes(model, prompts, scores.kind, "the k curve's prompts") if match == "size" else None
    base = outcome_arrays(prompts, predict(model, prompts))
    metrics = tuple(base)
    rows = []
    for k in tqdm(list(ks), desc="k curve", disable=not progress):
        chosen_set = select(scores, mode, k=int(k))
        chosen = outcome_arrays(prompts, predict(model, prompts, fwd_hooks=pruning_hooks(model, chosen_set)))
        rand = [outcome_arrays(prompts, predict(model, prompts, fwd_hooks=pruning_hooks(
            model, random_matched(model, chosen_set, s, match, sizes)))) for s in range(seed, seed + n_random)]
        row: dict[str, Any] = {"k": int(k), "n_neurons": len(chosen_set)}
        for m in metrics:
            Y = np.stack([r[m] for r in rand])
            row[m] = {"chosen": float(chosen[m].mean()), "random": float(Y.mean()), "unpruned": float(base[m].mean()),
                      "chosen_vs_random": versus_sets(chosen[m], Y, "probe", f"top-{k}", "random", m,
                                                      n_boot, seed).to_json(),
                      "chosen_vs_unpruned": paired(chosen[m], base[m], "probe", f"top-{k}", "unpruned", m,
                                                   n_boot, seed).to_json()}
        rows.append(row)
    return KCurve(metrics, {m: float(v.mean()) for m, v in base.items()}, tuple(rows), mode, len(prompts),
                  n_random, seed)
