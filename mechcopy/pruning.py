"""Ablating components, as hooks (temporary, composable) and as weight edits (permanent), tested equal.

Pruning sets the selected components to zero at every position; mean ablation sets them to their mean
activation over reference prompts instead (`component_means`); either may act at the last position
only. `pruning_hooks` gives one set's hooks, `condition_hooks` a `Condition`'s, and `grouped_hooks`
the hooks that ablate a different condition in each row group of one batch (the evaluator's one pass
over all conditions: `evaluation.predict_conditions`). `prune_weights` edits the weights instead
(zero the rows of `W_out` / columns of Mamba's `out_proj` / a head's rows of `W_O`; for mean ablation
their mean's output goes into the bias). Every function asks the component kind
(`components.component_kind`) where its components live and how to act on them. `component_sizes`
measures what size-matched random baselines match (`components.random_matched`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechcopy.arch import HookedModel, arch_of
from mechcopy.batching import left_pad, token_batches
from mechcopy.components import Components, Sizes, as_components, component_kind
from mechcopy.conditions import ABLATIONS, ATTENTION_EDITS, POSITIONS, Condition, Means
from mechcopy.errors import check_number
from mechcopy.hooks import Hook, ablate_by_group, capture, set_units, zero_units
from mechcopy.tasks.prompts import PromptSet


def pruning_hooks(model: HookedModel, components: Components, ablation: str = "zero", positions: str = "all",
                  means: Means | None = None) -> list[tuple[str, Hook]]:
    """One hook per layer at the components' site (checked against `model` first): zero ablation
    (`zero_units`, i.e. pruning), or with `ablation="mean"` mean ablation to `means`
    (`component_means`); with `positions="last"` only the last position is changed (the position IG
    attributes; in generation, every new token)."""
    as_components(components).check(model)
    if ablation not in ABLATIONS or positions not in POSITIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS} and positions one of {POSITIONS}, "
                         f"got {ablation!r}, {positions!r}")
    if (ablation == "mean") != (means is not None):
        raise ValueError("mean ablation needs means (component_means), and only mean ablation takes them")
    kind, by_layer = component_kind(components.kind), components.by_layer().items()
    if ablation == "zero" and positions == "all":
        return [(kind.site(model, layer), zero_units(idx, kind.axis)) for layer, idx in by_layer]
    position = -1 if positions == "last" else None
    return [(kind.site(model, layer),
             set_units(idx, _values(model, kind.name, layer, idx, means), position, kind.axis))
            for layer, idx in by_layer]


def _values(model: HookedModel, kind: str, layer: int, idx: Tensor, means: Means | None) -> Tensor:
    """What ablation sets components `idx` of `layer` to: their means, or zeros of the means' shape."""
    if means is not None:
        return means[layer][idx]
    spec = component_kind(kind)
    rest = () if spec.axis == -1 else (arch_of(model).attention_shape(model)[1],) * (-spec.axis - 1)
    return torch.zeros(len(idx), *rest)


def condition_hooks(model: HookedModel, condition: Condition) -> list[tuple[str, Hook]]:
    """The hooks of one condition run on its own (none for a condition that ablates nothing). An
    attention edit (`conditions.ATTENTION_EDITS`: label or other attention) has none to give: its key
    positions are each prompt's own demo tokens (the label scorer applies it, `label_attention.attention_edits`)."""
    if condition.components is None or not condition.ablates:
        return []
    if condition.ablation in ATTENTION_EDITS:
        raise ValueError(f"condition {condition.label} ({condition.ablation}) down-weights each prompt's attention to "
                         "some of its demo tokens: it has no prompt-free hooks; score it with "
                         "evaluation.evaluate_conditions (label scoring)")
    return pruning_hooks(model, condition.components, condition.ablation, condition.positions, condition.means)


def grouped_hooks(model: HookedModel, conditions: Sequence[Condition]) -> tuple[int, list[tuple[str, Hook]]]:
    """One hook per site that ablates, in row group g, what `conditions[g]` ablates (zero or mean, at
    every position or the last), and the first layer any condition touches: the rows may share every
    block before it (n_layers if none). Each group gets exactly what `condition_hooks` give it alone.
    Label-attention conditions get no hook here (their edit depends on the prompt:
    `label_attention.attention_edits`), but the fork comes before their first layer too."""
    groups, n_layers = len(conditions), model.cfg.n_layers
    scales: dict[tuple[int, str], Tensor] = {}
    adds: dict[tuple[int, str], Tensor] = {}
    edited = [layer for c in conditions if c.ablation in ATTENTION_EDITS and c.components is not None
              for layer in c.components.by_layer()]
    for g, cond in enumerate(conditions):
        comps = cond.components
        if comps is None or not cond.ablates or cond.ablation in ATTENTION_EDITS:
            continue
        comps.check(model)
        kind = component_kind(comps.kind)
        width = kind.width(model)
        for layer, idx in comps.by_layer().items():
            key = (layer, kind.name)
            scales.setdefault(key, torch.ones(groups, width))[g, idx] = 0.0
            if cond.means is not None:          # mean ablation (a condition holds means only then)
                values = cond.means[layer]
                adds.setdefault(key, torch.zeros(groups, *values.shape))[g, idx] = values[idx].float()
    last = [c.positions == "last" for c in conditions]
    hooks = [(component_kind(kind).site(model, layer),
              ablate_by_group(scale, adds.get((layer, kind)), last, component_kind(kind).axis))
             for (layer, kind), scale in sorted(scales.items())]
    return min([layer for layer, _ in scales] + edited, default=n_layers), hooks


@contextmanager
def pruned(model: HookedModel, components: Components):
    """Inside the block, `model` runs with `components` zeroed (hooks removed on exit)."""
    with model.hooks(fwd_hooks=pruning_hooks(model, components)):
        yield model


def prune_weights(model: HookedModel, components: Components, means: Means | None = None) -> None:
    """Permanently prune by editing weights (`ComponentKind.edit_weights`): what `pruning_hooks` does at
    every position, zeroing, or with `means` mean-ablating."""
    as_components(components).check(model)
    kind = component_kind(components.kind)
    for layer, idx in components.by_layer().items():
        kind.edit_weights(model, layer, idx, None if means is None else means[layer])


def _reference_prompts(prompts: Any, batch_size: int, what: str) -> list:
    """The reference prompts of `what` as a list, each with a `text` (ICLPrompts), at least one; the batch
    size an integer >= 1 (errors name the argument)."""
    if isinstance(prompts, PromptSet):
        prompts = prompts.prompts
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
        raise TypeError(f"prompts must be a list of ICLPrompts (tasks.prompts.build_prompts(...).prompts), got "
                        f"{type(prompts).__name__} {prompts!r:.60}")
    prompts = list(prompts)
    stray = next((p for p in prompts if not isinstance(getattr(p, "text", None), str)), None)
    if stray is not None:
        raise TypeError(f"prompts must be ICLPrompts (or anything with a `text`), got {type(stray).__name__} {stray!r:.60}")
    check_number(batch_size, "batch_size", low=1, integer=True)
    if not prompts:
        raise ValueError(f"{what} needs at least one prompt")
    return prompts


def component_means(model: HookedModel, prompts: Sequence, kind: str = "neuron", positions: str = "all",
                    reference: str = "", batch_size: int = 32) -> Means:
    """Every layer's mean component activation over every token position of `prompts`, or over their
    last positions only (`positions="last"`): the reference for mean ablation, what a component carries
    on average, so ablating to it removes only what varies across prompts. `reference` names the
    prompts in the result (e.g. "probe attribution split")."""
    prompts = _reference_prompts(prompts, batch_size, "component_means")
    if positions not in POSITIONS:
        raise ValueError(f"unknown positions {positions!r}; choose one of {', '.join(POSITIONS)}")
    spec = component_kind(kind)
    spec.check(model)
    sites = {spec.site(model, layer): layer for layer in range(model.cfg.n_layers)}
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
                act = act[:, -1:] if positions == "last" else act
                total = act.reshape(-1, *act.shape[2:]).sum(0)
                sums[layer] = sums[layer] + total if layer in sums else total
            count += len(batch) * (1 if positions == "last" else len(ids[batch[0]]))
    values: dict[int, Float[Tensor, "..."]] = {layer: (s / count).float() for layer, s in sums.items()}
    return Means(values, kind, positions, reference, len(prompts))


def component_sizes(model: HookedModel, prompts: Sequence, kind: str = "neuron", reference: str = "",
                    batch_size: int = 32) -> Sizes:
    """Every component's mean size at the answer position (each prompt's last position) over `prompts`:
    what size-matched random sets match (`components.random_matched`). The size is the kind's
    (`ComponentKind.size`: neurons |activation|, heads the norm of their output). Prompts of any lengths
    share a batch, left-padded (`Arch.run_blocks` keeps padding out of every real position)."""
    prompts = _reference_prompts(prompts, batch_size, "component_sizes")
    spec = component_kind(kind)
    spec.check(model)
    arch = arch_of(model)
    sites = {spec.site(model, layer): layer for layer in range(model.cfg.n_layers)}
    sums: dict[int, Tensor] = {}

    def add(activation: Tensor, hook) -> None:
        layer = sites[hook.name]
        total = spec.size(model, layer, activation[:, -1]).double().sum(0)
        sums[layer] = sums[layer] + total if layer in sums else total

    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = [arch.tokens(model, p.text, what=f"prompt {i}")[0] for i, p in enumerate(prompts)]
    with torch.no_grad(), model.hooks(fwd_hooks=[(name, add) for name in sites]):
        for batch in token_batches(ids, [1] * len(ids), batch_size, pad=True):
            tokens, mask = left_pad([ids[i] for i in batch], pad_id)
            arch.run_blocks(model, tokens, mask, None)
    return Sizes({layer: (v / len(prompts)).float().cpu() for layer, v in sorted(sums.items())}, kind, reference,
                 len(prompts))
