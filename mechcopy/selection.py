"""Selecting components from their copy scores: global top-k, top-k per layer, a threshold, the
bottom-k set (the baseline that pushes hardest against copying), and the top percent of one layer.

Every selection takes components only from the layers the scores allow (`CopyScores.allowed_layers`,
the IG completeness gate), and returns a `Components` set of the scores' kind tied to their model.
"""

from __future__ import annotations

import math

import torch

from mechcopy.attribution import CopyScores
from mechcopy.components import Components
from mechcopy.errors import check_number

MODES = ("global", "per-layer", "threshold")


def _check_scores(scores: CopyScores) -> None:
    if not isinstance(scores, CopyScores):
        raise TypeError(f"scores must be CopyScores (attribution.copy_scores, or CopyScores.load), got "
                        f"{type(scores).__name__}")


def _eligible_scores(scores: CopyScores, fill: float) -> torch.Tensor:
    """The scores with every neuron of a layer the scores do not allow set to `fill`."""
    return scores.scores.masked_fill(~scores.eligible(), fill)


def select(scores: CopyScores, mode: str = "global", k: int | None = None,
           threshold: float | None = None) -> Components:
    """Top neurons by copy score: global top-k, top-k in every layer, or score >= threshold
    (only in the layers the scores allow)."""
    _check_scores(scores)
    if k is not None:
        check_number(k, "k", low=1, integer=True)
    if threshold is not None:
        check_number(threshold, "threshold")
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
    return Components(tuple(pairs), scores.model, {"selection": mode, "k": k, "threshold": threshold, "n": len(pairs)},
                      kind=scores.kind)


def bottom_set(scores: CopyScores, k: int) -> Components:
    """The k lowest-scoring neurons (global, allowed layers): the set that pushes hardest *against* copying."""
    _check_scores(scores)
    check_number(k, "k", low=1, integer=True)
    n_eligible = int(scores.eligible().sum())
    if not 0 < k <= n_eligible:
        raise ValueError(f"bottom-k needs 0 < k <= {n_eligible} (neurons in allowed layers), got {k}")
    width = scores.scores.shape[1]
    flat = torch.topk(-_eligible_scores(scores, float("inf")).flatten(), k).indices
    return Components(tuple((int(i) // width, int(i) % width) for i in flat), scores.model,
                      {"selection": "bottom", "k": k}, kind=scores.kind)


def select_layer_percent(scores: CopyScores, layer: int, percent: float) -> Components:
    """The top `percent`% of one layer's neurons by copy score (ceil, at least one): the neurons of
    that layer above its (100 - percent)th score percentile. The layer must be allowed."""
    _check_scores(scores)
    check_number(layer, "layer", low=0, integer=True)
    check_number(percent, "percent")
    n_layers, width = scores.scores.shape
    if not 0 <= layer < n_layers:
        raise IndexError(f"layer {layer} out of range: the scores have {n_layers} layers")
    if not 0 < percent <= 100:
        raise ValueError(f"percent must lie in (0, 100], got {percent}")
    if not bool(scores.eligible()[layer, 0]):
        raise ValueError(f"layer {layer} is not allowed by the scores (allowed: {scores.allowed_layers})")
    n = max(1, math.ceil(width * percent / 100 - 1e-9))
    idx = torch.topk(scores.scores[layer], n).indices
    return Components(tuple((layer, int(i)) for i in idx), scores.model,
                      {"selection": "layer-percent", "layer": layer, "percent": percent, "n": n}, kind=scores.kind)
