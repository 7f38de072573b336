"""Neuron cards: what one neuron writes, when it fires, and what removing it does, to tell a copy
mechanism from a label prior ("say 2").

For neuron i of layer l, on probe prompts:

* **writes**: the tokens its output direction promotes and suppresses through the unembedding,
  `(direction * g) @ W_U`, with g the final norm's gain where the model keeps one (zoo models fold it
  into `W_U`), and that direct effect on every label's token;
* **fires**: its activation at the last position, grouped by gold label and by copied label (the clean
  prediction when it is a wrong demo label);
* **pruned alone**: the predicted labels' counts with the neuron zeroed against unpruned.

A copy neuron fires with what the demos carry and pruning it moves predictions off demo labels; a
label-prior neuron promotes one label whatever the demos say, and pruning it shifts mass off that label.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechcopy.arch import HookedModel, arch_of
from mechcopy.attribution import CopyScores
from mechcopy.components import Components
from mechcopy.evaluation import predict
from mechcopy.hooks import capture, zero_neurons
from mechcopy.sites import neuron_site
from mechcopy.tasks.outcomes import copy_error

NO_COPY = "no copy"


@dataclass(frozen=True)
class NeuronCard:
    """One neuron on one prompt set. Per-prompt fields line up with the prompts; `copied[p]` is the
    predicted label when prompt p's clean prediction is a copy error, else None."""

    layer: int
    index: int
    score: float | None
    promoted: tuple[tuple[str, float], ...]
    suppressed: tuple[tuple[str, float], ...]
    label_logits: dict[str, float]
    activations: tuple[float, ...]
    gold: tuple[str, ...]
    predicted: tuple[str, ...]
    copied: tuple[str | None, ...]
    predicted_pruned: tuple[str, ...]

    def activation_by_gold(self) -> dict[str, float]:
        """Mean activation per gold label."""
        return _means(self.gold, self.activations)

    def activation_by_copied(self) -> dict[str, float]:
        """Mean activation per copied label, and over the prompts without a copy (`NO_COPY`)."""
        return _means([NO_COPY if c is None else c for c in self.copied], self.activations)

    def label_counts(self, pruned: bool = False) -> dict[str, int]:
        """How often each answer is predicted, unpruned or with this neuron alone pruned."""
        return dict(sorted(Counter(self.predicted_pruned if pruned else self.predicted).items()))

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "index": self.index, "score": self.score,
                "promoted": [list(t) for t in self.promoted], "suppressed": [list(t) for t in self.suppressed],
                "label_logits": self.label_logits, "activation_by_gold": self.activation_by_gold(),
                "activation_by_copied": self.activation_by_copied(), "label_counts": self.label_counts(),
                "label_counts_pruned": self.label_counts(pruned=True), "activations": list(self.activations),
                "gold": list(self.gold), "predicted": list(self.predicted), "copied": list(self.copied),
                "predicted_pruned": list(self.predicted_pruned)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "NeuronCard":
        """The card `to_json` wrote (its summaries by label are recomputed from the per-prompt fields)."""
        return cls(obj["layer"], obj["index"], obj["score"], tuple((t, v) for t, v in obj["promoted"]),
                   tuple((t, v) for t, v in obj["suppressed"]), dict(obj["label_logits"]), tuple(obj["activations"]),
                   tuple(obj["gold"]), tuple(obj["predicted"]), tuple(obj["copied"]), tuple(obj["predicted_pruned"]))


def _means(keys: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for k, v in zip(keys, values):
        groups[k].append(v)
    return {k: float(np.mean(v)) for k, v in sorted(groups.items())}


def direction_logits(model: HookedModel, layer: int, idx: int) -> Float[Tensor, "d_vocab"]:
    """The neuron's direct effect on every logit per unit of activation: (direction * gain) @ W_U."""
    direction = arch_of(model).neuron_direction(model, layer, idx)
    gain = getattr(model.ln_final, "w", None)
    if gain is not None:
        direction = direction * gain.detach()
    return direction @ model.unembed.W_U.detach()


def label_tokens(prompts: Sequence) -> dict[str, int]:
    """Every answer and demo label of the prompts -> its first answer token."""
    out = {}
    for p in prompts:
        out[p.answer.strip()] = int(p.answer_ids[0])
        for label, ids in zip(p.demo_labels, p.demo_label_ids):
            out[label.strip()] = int(ids[0])
    return dict(sorted(out.items()))


def last_activations(model: HookedModel, prompts: Sequence, layers: Sequence[int]) -> dict[int, Tensor]:
    """Layer -> [prompts, neurons] neuron activations at each prompt's last position."""
    sites = {layer: neuron_site(model, layer) for layer in layers}
    rows: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    for p in prompts:
        store: dict[str, Tensor] = {}
        with torch.no_grad():
            model.run_with_hooks(model.to_tokens(p.text), return_type=None,
                                 fwd_hooks=[(site, capture(store)) for site in sites.values()])
        for layer, site in sites.items():
            rows[layer].append(store[site][0, -1].float())
    return {layer: torch.stack(r) for layer, r in rows.items()}


def neuron_cards(model: HookedModel, neurons: Components | Sequence[tuple[int, int]], prompts: Sequence,
                 top: int = 10, scores: CopyScores | None = None) -> tuple[NeuronCard, ...]:
    """One card per neuron on `prompts` (probe prompts: the copied label is a wrong demo label)."""
    pairs = list(neurons.neurons if isinstance(neurons, Components) else neurons)
    if isinstance(neurons, Components):
        neurons.check(model)
    if not pairs or not prompts:
        raise ValueError("neuron cards need at least one neuron and one prompt")
    tok = model.tokenizer
    labels = label_tokens(prompts)
    predicted = predict(model, prompts)
    copied = tuple(pred if copy_error(pred, p.answer, p.demo_labels) else None for p, pred in zip(prompts, predicted))
    acts = last_activations(model, prompts, sorted({layer for layer, _ in pairs}))
    cards = []
    for layer, idx in pairs:
        logits = direction_logits(model, layer, idx)
        up, down = torch.topk(logits, top), torch.topk(-logits, top)
        pruned = predict(model, prompts, fwd_hooks=[(neuron_site(model, layer), zero_neurons([idx]))])
        cards.append(NeuronCard(
            layer=layer, index=idx, score=None if scores is None else float(scores.scores[layer, idx]),
            promoted=tuple((tok.decode([int(i)]), float(v)) for v, i in zip(up.values, up.indices)),
            suppressed=tuple((tok.decode([int(i)]), -float(v)) for v, i in zip(down.values, down.indices)),
            label_logits={label: float(logits[t]) for label, t in labels.items()},
            activations=tuple(acts[layer][:, idx].tolist()), gold=tuple(p.answer.strip() for p in prompts),
            predicted=tuple(predicted), copied=copied, predicted_pruned=tuple(pruned)))
    return tuple(cards)
