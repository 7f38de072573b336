"""Select copy neurons from their scores, choose k on the probe's dev split, and prune them.

Pruning sets the selected neurons to zero at every position. Two equivalent forms: a named hook
(`pruning_hooks`, `pruned`: temporary, composable) and a permanent weight edit (`prune_weights`: zero
the matching rows of `W_out`, or Mamba's `out_proj` input columns); tests check they give identical
logits. `grouped_pruning_hooks` prunes a different set in each row group of one batch (the
evaluator's one pass over all conditions). Baselines: random neurons matched per layer
(`random_matched`, several seeds) and the bottom-score set (`bottom_set`); `condition_sets` names
them all.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from mechcopy.attribution import CopyScores
from mechcopy.hooks import Hook, scale_neurons_by_group, zero_neurons
from mechcopy.arch import HookedModel, arch_of
from mechcopy.neurons import NeuronSet, model_fingerprint
from mechcopy.sites import neuron_site, neurons_per_layer

MODES = ("global", "per-layer", "threshold")
DEFAULT_KS = (5, 10, 20, 50, 100, 200, 500, 1000)


# ---------------------------------------------------------------- pruning


def pruning_hooks(model: HookedModel, neurons: NeuronSet) -> list[tuple[str, Callable]]:
    """`zero_neurons` at each layer's neuron site (checked against `model` first)."""
    neurons.check(model)
    return [(neuron_site(model, layer), zero_neurons(idx)) for layer, idx in neurons.by_layer().items()]


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

    `bottom` needs copy scores: `scores`, or the file named in `neurons.meta["scores_path"]`.
    """
    neurons.check(model)
    out = {"pruned": neurons}
    for s in range(seed, seed + n_random):
        out[f"random-{s}"] = random_matched(model, neurons, s)
    if scores is None and neurons.meta.get("scores_path"):
        from pathlib import Path

        path = Path(neurons.meta["scores_path"])
        if path.exists():
            scores = CopyScores.load(path)
    if scores is not None:
        out["bottom"] = bottom_set(scores, len(neurons))
    return out


def conditions(model: HookedModel, neurons: NeuronSet, n_random: int = 5, seed: int = 0,
               scores: CopyScores | None = None) -> list[tuple[str, list]]:
    """[(name, pruning hooks)] of `condition_sets`, for code that runs one condition at a time."""
    return [(name, pruning_hooks(model, s)) for name, s in condition_sets(model, neurons, n_random, seed, scores).items()]


# ---------------------------------------------------------------- selection


def select(scores: CopyScores, mode: str = "global", k: int | None = None,
           threshold: float | None = None) -> NeuronSet:
    """Top neurons by copy score: global top-k, top-k in every layer, or score >= threshold."""
    s = scores.scores
    n_layers, width = s.shape
    if mode == "global":
        if k is None or not 0 < k <= s.numel():
            raise ValueError(f"global top-k needs 0 < k <= {s.numel()}, got {k}")
        flat = torch.topk(s.flatten(), k).indices
        pairs = [(int(i) // width, int(i) % width) for i in flat]
    elif mode == "per-layer":
        if k is None or not 0 < k <= width:
            raise ValueError(f"per-layer top-k needs 0 < k <= {width}, got {k}")
        idx = torch.topk(s, k, dim=1).indices
        pairs = [(l, int(i)) for l in range(n_layers) for i in idx[l]]
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
    """The k lowest-scoring neurons (global): the set that pushes hardest *against* copying."""
    if not 0 < k <= scores.scores.numel():
        raise ValueError(f"bottom-k needs 0 < k <= {scores.scores.numel()}, got {k}")
    width = scores.scores.shape[1]
    flat = torch.topk(-scores.scores.flatten(), k).indices
    return NeuronSet(tuple((int(i) // width, int(i) % width) for i in flat), scores.model,
                     {"selection": "bottom", "k": k})


# ---------------------------------------------------------------- the k sweep on the dev split


@dataclass(frozen=True)
class KSweep:
    """Dev accuracy for each k and the cost to general ability; the chosen k maximises dev accuracy
    among the k within every bound (perplexity increase and/or accuracy drop on general prompts)."""

    rows: tuple[dict[str, Any], ...]
    baseline: dict[str, Any]
    chosen_k: int | None
    mode: str
    max_ppl_increase: float | None
    text: str | None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    max_general_drop: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"rows": list(self.rows), "baseline": self.baseline, "chosen_k": self.chosen_k,
                "mode": self.mode, "max_ppl_increase": self.max_ppl_increase, "text": self.text,
                "max_general_drop": self.max_general_drop, **self.meta}


def sweep_k(model: HookedModel, scores: CopyScores, dev_prompts: Sequence, ks: Sequence[int] = DEFAULT_KS,
            mode: str = "global", max_ppl_increase: float | None = 0.05, text: str | None = None,
            text_name: str = "pydoc_data.topics", n_tokens: int = 4096, seed: int = 0,
            progress: bool = False, general_prompts: Sequence | None = None,
            max_general_drop: float = 0.05) -> KSweep:
    """For each k: dev accuracy under pruning and its cost to general ability.

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
    width = neurons_per_layer(model)
    ks = sorted({int(k) for k in ks if 0 < k <= (width if mode == "per-layer" else scores.scores.numel())})
    if not ks:
        raise ValueError("no valid k in the sweep grid for this model")

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
    feasible_rows = [r for r in rows if r["feasible"]]
    chosen = max(feasible_rows, key=lambda r: (r["dev_accuracy"], -r["k"]))["k"] if feasible_rows else None
    meta = {"n_dev": len(dev_prompts), "seed": seed, "model": model_fingerprint(model)}
    if max_ppl_increase is not None:
        meta["n_tokens"] = n_tokens
    if general_prompts is not None:
        meta["n_general"] = len(general_prompts)
    return KSweep(tuple(rows), baseline, chosen, mode, max_ppl_increase,
                  text_name if max_ppl_increase is not None else None, meta,
                  max_general_drop if general_prompts is not None else None)
