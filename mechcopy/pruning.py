"""Select copy neurons from their scores, choose k on the probe's dev split, and prune them.

Pruning sets the selected neurons to zero at every position (for mean ablation: to their mean
activation over reference prompts, `neuron_means`; `last_only`: at the last position only). Two
equivalent forms: a named hook (`pruning_hooks`, `pruned`: temporary, composable) and a permanent
weight edit (`prune_weights`: zero the matching rows of `W_out`, or Mamba's `out_proj` input
columns); tests check they give identical logits. `grouped_pruning_hooks` prunes a different set in
each row group of one batch (the evaluator's one pass over all conditions). Baselines: random
neurons matched per layer (`random_matched`, several seeds) and the bottom-score set (`bottom_set`);
`condition_sets` names them all. Every selection takes neurons only from the layers the scores allow
(`CopyScores.allowed_layers`, the IG completeness gate); random sets match the selection's layers.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from mechcopy.progress import tqdm

from mechcopy.attribution import CopyScores
from mechcopy.hooks import Hook, capture, scale_neurons_by_group, set_neurons, zero_neurons
from mechcopy.arch import HookedModel, arch_of
from mechcopy.neurons import NeuronSet, model_fingerprint
from mechcopy.sites import neuron_site, neurons_per_layer

MODES = ("global", "per-layer", "threshold")
DEFAULT_KS = (5, 10, 20, 50, 100, 200, 500, 1000)


# ---------------------------------------------------------------- pruning


def pruning_hooks(model: HookedModel, neurons: NeuronSet, means: dict[int, Tensor] | None = None,
                  last_only: bool = False) -> list[tuple[str, Callable]]:
    """`zero_neurons` at each layer's neuron site (checked against `model` first). With `means`
    (`neuron_means`), mean ablation: `set_neurons` to each neuron's mean activation instead. With
    `last_only`, only the last position is changed (the position IG attributes)."""
    neurons.check(model)
    by_layer = neurons.by_layer().items()
    if means is None and not last_only:
        return [(neuron_site(model, layer), zero_neurons(idx)) for layer, idx in by_layer]
    return [(neuron_site(model, layer),
             set_neurons(idx, torch.zeros(len(idx)) if means is None else means[layer][idx], -1 if last_only else None))
            for layer, idx in by_layer]


def neuron_means(model: HookedModel, prompts: Sequence, last_only: bool = False, batch_size: int = 32,
                 ) -> dict[int, Float[Tensor, "d"]]:
    """Every layer's mean neuron activation over every token position of `prompts`, or over their last
    positions only: the reference for mean ablation (`pruning_hooks(..., means=)`), what a neuron
    carries on average, so ablating to it removes only what varies across prompts."""
    from mechcopy.evaluation import token_batches

    if not prompts:
        raise ValueError("neuron_means needs at least one prompt")
    sites = {neuron_site(model, layer): layer for layer in range(model.cfg.n_layers)}
    sums: dict[int, Tensor] = {}
    count = 0
    ids = [model.to_tokens(p.text)[0] for p in prompts]
    with torch.no_grad():
        for batch in token_batches(ids, [1] * len(ids), batch_size, pad=False):
            store: dict = {}
            model.run_with_hooks(torch.stack([ids[i] for i in batch]),
                                 fwd_hooks=[(name, capture(store)) for name in sites])
            for name, layer in sites.items():
                act = store[name].double()
                act = act[:, -1:] if last_only else act
                total = act.reshape(-1, act.shape[-1]).sum(0)
                sums[layer] = sums[layer] + total if layer in sums else total
            count += len(batch) * (1 if last_only else len(ids[batch[0]]))
    return {layer: (s / count).float() for layer, s in sums.items()}


def grouped_pruning_hooks(model: HookedModel, sets: Sequence[NeuronSet | None]) -> tuple[int, list[tuple[str, Hook]]]:
    """One hook per neuron site that zeroes `sets[g]`'s neurons in row group g (None: none), and the
    first layer any set touches: the rows may share every block before it (n_layers if none)."""
    width, n_layers = neurons_per_layer(model), model.cfg.n_layers
    masks: dict[int, torch.Tensor] = {}
    for g, neurons in enumerate(sets):
        if neurons is None:
            continue
        neurons.check(model)
        for layer, idx in neurons.by_layer().items():
            masks.setdefault(layer, torch.ones(len(sets), width))[g, idx] = 0.0
    hooks = [(neuron_site(model, layer), scale_neurons_by_group(m)) for layer, m in sorted(masks.items())]
    return min(masks, default=n_layers), hooks


@contextmanager
def pruned(model: HookedModel, neurons: NeuronSet):
    """Inside the block, `model` runs with `neurons` zeroed (hooks removed on exit)."""
    with model.hooks(fwd_hooks=pruning_hooks(model, neurons)):
        yield model


def prune_weights(model: HookedModel, neurons: NeuronSet) -> None:
    """Permanently prune: zero `W_out` rows (transformer) or `out_proj` input columns (Mamba)."""
    neurons.check(model)
    arch = arch_of(model)
    for layer, idx in neurons.by_layer().items():
        arch.prune_weights(model, layer, idx)


def random_matched(model: HookedModel, neurons: NeuronSet, seed: int) -> NeuronSet:
    """Random neurons with the same count in every layer (avoiding the set itself where possible)."""
    neurons.check(model)
    width = neurons_per_layer(model)
    gen = torch.Generator().manual_seed(int(seed))
    chosen = []
    for layer, idx in neurons.by_layer().items():
        pool = torch.ones(width, dtype=torch.bool)
        if width - len(idx) >= len(idx):
            pool[idx] = False
        candidates = pool.nonzero()[:, 0]
        pick = candidates[torch.randperm(len(candidates), generator=gen)[: len(idx)]]
        chosen += [(layer, int(i)) for i in pick]
    return NeuronSet(tuple(chosen), neurons.model,
                     {"selection": "random-matched", "seed": int(seed), "matched_to": len(neurons)})


def condition_sets(model: HookedModel, neurons: NeuronSet, n_random: int = 5, seed: int = 0,
                   scores: CopyScores | None = None) -> dict[str, NeuronSet]:
    """{"pruned": neurons, "random-<seed>": matched set x n_random, "bottom": bottom set}: the neuron
    sets of the evaluation's conditions (`evaluation.evaluate_conditions` takes them, with
    "unpruned": None).

    `bottom` needs copy scores: `scores`, or the file named in `neurons.meta["scores_path"]` (see
    `find_scores`). An empty set (find chose k = 0) has nothing to prune: no conditions.
    """
    neurons.check(model)
    if not neurons.neurons:
        return {}
    out = {"pruned": neurons}
    for s in range(seed, seed + n_random):
        out[f"random-{s}"] = random_matched(model, neurons, s)
    scores = scores if scores is not None else find_scores(neurons)
    if scores is not None:
        out["bottom"] = bottom_set(scores, len(neurons))
    return out


def find_scores(neurons: NeuronSet) -> CopyScores | None:
    """The copy scores a neuron file names (meta `scores_path`), or None if it names none.

    If the recorded path is gone, the scores file beside the neuron file is used (a moved folder);
    if neither exists the error says so, rather than the bottom-score baseline quietly going missing.
    """
    from pathlib import Path

    from mechcopy.io import side_file

    recorded = neurons.meta.get("scores_path")
    if not recorded:
        return None
    candidates = [Path(recorded)]
    if neurons.source is not None:
        candidates.append(side_file(neurons.source, ".scores.safetensors"))
    for path in candidates:
        if path.is_file():
            return CopyScores.load(path)
    raise FileNotFoundError(
        f"the bottom-score baseline needs the copy scores of {neurons.source or 'this neuron set'}, which are "
        f"neither at {recorded} nor beside the neuron file; move the scores file back beside it")


def conditions(model: HookedModel, neurons: NeuronSet, n_random: int = 5, seed: int = 0,
               scores: CopyScores | None = None) -> list[tuple[str, list]]:
    """[(name, pruning hooks)] of `condition_sets`, for code that runs one condition at a time."""
    return [(name, pruning_hooks(model, s)) for name, s in condition_sets(model, neurons, n_random, seed, scores).items()]


# ---------------------------------------------------------------- selection


def _eligible_scores(scores: CopyScores, fill: float) -> torch.Tensor:
    """The scores with every neuron of a layer the scores do not allow set to `fill`."""
    return scores.scores.masked_fill(~scores.eligible(), fill)


def select(scores: CopyScores, mode: str = "global", k: int | None = None,
           threshold: float | None = None) -> NeuronSet:
    """Top neurons by copy score: global top-k, top-k in every layer, or score >= threshold
    (only in the layers the scores allow)."""
    s = _eligible_scores(scores, float("-inf"))
    n_layers, width = s.shape
    allowed = sorted(range(n_layers) if scores.allowed_layers is None else scores.allowed_layers)
    n_eligible = len(allowed) * width
    if mode == "global":
        if k is None or not 0 < k <= n_eligible:
            raise ValueError(f"global top-k needs 0 < k <= {n_eligible} (neurons in allowed layers), got {k}")
        flat = torch.topk(s.flatten(), k).indices
        pairs = [(int(i) // width, int(i) % width) for i in flat]
    elif mode == "per-layer":
        if k is None or not 0 < k <= width:
            raise ValueError(f"per-layer top-k needs 0 < k <= {width}, got {k}")
        idx = torch.topk(s, k, dim=1).indices
        pairs = [(l, int(i)) for l in allowed for i in idx[l]]
    elif mode == "threshold":
        if threshold is None:
            raise ValueError("threshold selection needs a threshold")
        pairs = [(int(l), int(i)) for l, i in (s >= threshold).nonzero()]
        if not pairs:
            raise ValueError(f"no neuron scores >= {threshold} (max score {float(s.max()):.4g}); lower it")
    else:
        raise ValueError(f"unknown selection mode {mode!r}; choose one of {', '.join(MODES)}")
    return NeuronSet(tuple(pairs), scores.model,
                     {"selection": mode, "k": k, "threshold": threshold, "n": len(pairs)})


def bottom_set(scores: CopyScores, k: int) -> NeuronSet:
    """The k lowest-scoring neurons (global, allowed layers): the set that pushes hardest *against* copying."""
    n_eligible = int(scores.eligible().sum())
    if not 0 < k <= n_eligible:
        raise ValueError(f"bottom-k needs 0 < k <= {n_eligible} (neurons in allowed layers), got {k}")
    width = scores.scores.shape[1]
    flat = torch.topk(-_eligible_scores(scores, float("inf")).flatten(), k).indices
    return NeuronSet(tuple((int(i) // width, int(i) % width) for i in flat), scores.model,
                     {"selection": "bottom", "k": k})


def select_layer_percent(scores: CopyScores, layer: int, percent: float) -> NeuronSet:
    """The top `percent`% of one layer's neurons by copy score (ceil, at least one): the neurons of
    that layer above its (100 - percent)th score percentile. The layer must be allowed."""
    n_layers, width = scores.scores.shape
    if not 0 <= layer < n_layers:
        raise IndexError(f"layer {layer} out of range: the scores have {n_layers} layers")
    if not 0 < percent <= 100:
        raise ValueError(f"percent must lie in (0, 100], got {percent}")
    if not bool(scores.eligible()[layer, 0]):
        raise ValueError(f"layer {layer} is not allowed by the scores (allowed: {scores.allowed_layers})")
    n = max(1, math.ceil(width * percent / 100 - 1e-9))
    idx = torch.topk(scores.scores[layer], n).indices
    return NeuronSet(tuple((layer, int(i)) for i in idx), scores.model,
                     {"selection": "layer-percent", "layer": layer, "percent": percent, "n": n})


@dataclass(frozen=True)
class LayerPercentSweep:
    """Dev accuracy of every (layer, percent) single-layer selection; the chosen one maximises dev
    accuracy (ties: fewer neurons, then the lower layer) among rows within the perplexity bound."""

    rows: tuple[dict[str, Any], ...]
    baseline: dict[str, Any]
    chosen_layer: int | None
    chosen_percent: float | None
    max_ppl_increase: float | None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"rows": list(self.rows), "baseline": self.baseline, "chosen_layer": self.chosen_layer,
                "chosen_percent": self.chosen_percent, "max_ppl_increase": self.max_ppl_increase, **self.meta}


def sweep_layer_percent(model: HookedModel, scores: CopyScores, dev_prompts: Sequence,
                        percents: Sequence[float] = (1, 2, 5, 10), layers: Sequence[int] | None = None,
                        max_ppl_increase: float | None = None, text: str | None = None, n_tokens: int = 4096,
                        seed: int = 0, progress: bool = False) -> LayerPercentSweep:
    """Single-layer x percentage selection on the probe's dev split: `select_layer_percent` for every
    allowed layer (or `layers`) and percent, scored by dev accuracy, optionally bounded by the relative
    perplexity increase on held-out text (`max_ppl_increase`; None skips perplexity)."""
    from mechcopy.evaluation import evaluate, perplexity

    if not dev_prompts:
        raise ValueError("the layer-percent sweep needs dev prompts (the probe's dev split)")
    scores.check(model)
    allowed = range(scores.scores.shape[0]) if scores.allowed_layers is None else scores.allowed_layers
    layers = sorted(allowed if layers is None else layers)

    def measure(hooks, name: str) -> dict[str, Any]:
        res = evaluate(model, dev_prompts, fwd_hooks=hooks, condition=name, seed=seed, n_boot=200)
        row = {"dev_accuracy": res.accuracy, "dev_copy_rate": res.copy_rate}
        if max_ppl_increase is not None:
            row["ppl"] = perplexity(model, text, fwd_hooks=hooks, n_tokens=n_tokens)
        return row

    baseline = {"n_neurons": 0, **measure([], "unpruned")}
    rows = []
    grid = [(l, pc) for l in layers for pc in percents]
    for layer, percent in tqdm(grid, desc="layer x percent", disable=not progress):
        ns = select_layer_percent(scores, layer, percent)
        row = {"layer": layer, "percent": percent, "n_neurons": len(ns),
               **measure(pruning_hooks(model, ns), f"layer={layer},p={percent}")}
        if max_ppl_increase is not None:
            row["ppl_increase"] = row["ppl"] / baseline["ppl"] - 1.0
        rows.append({**row, "feasible": max_ppl_increase is None or row["ppl_increase"] <= max_ppl_increase})
    feasible = [r for r in rows if r["feasible"]]
    best = max(feasible, key=lambda r: (r["dev_accuracy"], -r["n_neurons"], -r["layer"]), default=None)
    return LayerPercentSweep(tuple(rows), baseline, None if best is None else best["layer"],
                             None if best is None else best["percent"], max_ppl_increase,
                             {"n_dev": len(dev_prompts), "seed": seed, "model": model_fingerprint(model)})


# ---------------------------------------------------------------- the k sweep on the dev split


@dataclass(frozen=True)
class KSweep:
    """Dev accuracy for each k and the cost to general ability. The chosen k is the best feasible k
    (within every bound: perplexity increase and/or accuracy drop on general prompts) if it beats the
    unpruned model's dev accuracy, else 0: pruning nothing is a possible outcome, and `why` says so."""

    rows: tuple[dict[str, Any], ...]
    baseline: dict[str, Any]
    chosen_k: int
    mode: str
    max_ppl_increase: float | None
    text: str | None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    max_general_drop: float | None = None
    why: str = ""

    @property
    def best_pruned_k(self) -> int | None:
        """The feasible k > 0 with the best dev accuracy (the smallest on ties), better than k = 0 or not."""
        best = _best_feasible(self.rows)
        return None if best is None else best["k"]

    def to_json(self) -> dict[str, Any]:
        return {"rows": list(self.rows), "baseline": self.baseline, "chosen_k": self.chosen_k, "why": self.why,
                "mode": self.mode, "max_ppl_increase": self.max_ppl_increase, "text": self.text,
                "max_general_drop": self.max_general_drop, **self.meta}


def _best_feasible(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The sweep row within every bound with the best dev accuracy (the smallest k on ties), or None."""
    feasible = [r for r in rows if r["feasible"]]
    return max(feasible, key=lambda r: (r["dev_accuracy"], -r["k"])) if feasible else None


def _choose_k(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> tuple[int, str]:
    """(chosen k, why k = 0 when it is): the best feasible k only if it beats no pruning on the dev split."""
    best = _best_feasible(rows)
    if best is None:
        return 0, f"no k in {[r['k'] for r in rows]} stays within the bound on general ability"
    if best["dev_accuracy"] > baseline["dev_accuracy"]:
        return best["k"], ""
    return 0, (f"no k improves dev accuracy over the unpruned model ({baseline['dev_accuracy']:.3f}; "
               f"best pruned: k = {best['k']}, {best['dev_accuracy']:.3f})")


def smallest_unbounded_k(sweep: dict[str, Any]) -> int | None:
    """The smallest k of a sweep (`KSweep.to_json()`) whose dev accuracy beats no pruning when the bound
    on general ability is ignored; None when no k does. Not a choice of the method: what it would prune
    if its bound were lifted."""
    base = sweep["baseline"]["dev_accuracy"]
    better = [r["k"] for r in sweep["rows"] if r["dev_accuracy"] > base]
    return min(better) if better else None


def valid_ks(model: HookedModel, ks: Sequence[int], mode: str = "global") -> list[int]:
    """The k of the grid that `mode` can select on this model (sorted); an error if none can."""
    width = neurons_per_layer(model)
    most = width if mode == "per-layer" else width * model.cfg.n_layers
    valid = sorted({int(k) for k in ks if 0 < k <= most})
    if not valid:
        raise ValueError(f"no k in {list(ks)} can be selected on this model ({mode} top-k: 1 <= k <= {most})")
    return valid


def sweep_k(model: HookedModel, scores: CopyScores, dev_prompts: Sequence, ks: Sequence[int] = DEFAULT_KS,
            mode: str = "global", max_ppl_increase: float | None = 0.05, text: str | None = None,
            text_name: str = "pydoc_data.topics", n_tokens: int = 4096, seed: int = 0,
            progress: bool = False, general_prompts: Sequence | None = None,
            max_general_drop: float = 0.05) -> KSweep:
    """For each k: dev accuracy under pruning and its cost to general ability; k = 0 (no pruning)
    is the baseline every k must beat (`KSweep.chosen_k`).

    The cost is the relative perplexity increase on held-out text (bound `max_ppl_increase`; None
    skips it), and, with `general_prompts`, the accuracy drop on those prompts (bound
    `max_general_drop`): the bound for models that read no English, such as the model organisms.
    Never pass evaluation-task prompts here: the dev split of the probe is the only tuning data.
    """
    from mechcopy.evaluation import evaluate, perplexity

    if not dev_prompts:
        raise ValueError("the k sweep needs dev prompts (the probe's dev split)")
    if max_ppl_increase is None and general_prompts is None:
        raise ValueError("the k sweep needs a bound: max_ppl_increase and/or general_prompts")
    scores.check(model)
    ks = valid_ks(model, ks, mode)

    def measure(hooks, name: str) -> dict[str, Any]:
        res = evaluate(model, dev_prompts, fwd_hooks=hooks, condition=name, seed=seed, n_boot=200)
        row = {"dev_accuracy": res.accuracy, "dev_copy_rate": res.copy_rate}
        if max_ppl_increase is not None:
            row["ppl"] = perplexity(model, text, fwd_hooks=hooks, n_tokens=n_tokens)
        if general_prompts is not None:
            row["general_accuracy"] = evaluate(model, general_prompts, fwd_hooks=hooks, condition=name,
                                               seed=seed, n_boot=200).accuracy
        return row

    baseline = {"k": 0, "n_neurons": 0, **measure([], "unpruned")}
    rows = []
    for k in tqdm(ks, desc="k sweep", disable=not progress):
        ns = select(scores, mode, k=k)
        row = {"k": k, "n_neurons": len(ns), **measure(pruning_hooks(model, ns), f"k={k}")}
        feasible = True
        if max_ppl_increase is not None:
            row["ppl_increase"] = row["ppl"] / baseline["ppl"] - 1.0
            feasible &= row["ppl_increase"] <= max_ppl_increase
        if general_prompts is not None:
            row["general_drop"] = baseline["general_accuracy"] - row["general_accuracy"]
            feasible &= row["general_accuracy"] >= baseline["general_accuracy"] - max_general_drop
        rows.append({**row, "feasible": feasible})
    if max_ppl_increase is not None:
        baseline["ppl_increase"] = 0.0
    chosen, why = _choose_k(rows, baseline)
    meta = {"n_dev": len(dev_prompts), "seed": seed, "model": model_fingerprint(model)}
    if max_ppl_increase is not None:
        meta["n_tokens"] = n_tokens
    if general_prompts is not None:
        meta["n_general"] = len(general_prompts)
    return KSweep(tuple(rows), baseline, chosen, mode, max_ppl_increase,
                  text_name if max_ppl_increase is not None else None, meta,
                  max_general_drop if general_prompts is not None else None, why)
