"""Every intervention as a named hook function `fn(activation, hook)`.

Factories build the functions, so a notebook reads
`model.run_with_hooks(tokens, fwd_hooks=[(site, zero_neurons(idx))])`. Hooks return a new
tensor rather than editing in place, so they compose with autograd.
"""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor

Hook = Callable[[Tensor, object], Tensor | None]


def _named(fn: Hook, name: str) -> Hook:
    fn.__name__ = fn.__qualname__ = name
    return fn


def _as_index(idx, what: str = "indices") -> Tensor:
    """Indices as a LongTensor. Fractions and booleans are refused: torch would truncate 1.7 to 1 and
    read booleans as a mask, without a word."""
    try:
        index = torch.as_tensor(idx).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{what} must be integers, got {idx!r}") from e
    if index.numel() and (index.dtype == torch.bool or index.is_floating_point() or index.is_complex()):
        raise TypeError(f"{what} must be integers, got {idx!r}")
    return index.long()


def _neuron_index(idx) -> Tensor:
    """Neuron indices: integers >= 0 (torch would count -1 from the end, so -1 would prune the last neuron)."""
    index = _as_index(idx, "neuron indices")
    if index.numel() and int(index.min()) < 0:
        raise IndexError(f"neuron indices must be >= 0, got {int(index.min())}")
    return index


def _check_width(top: int, act: Tensor, hook) -> None:
    if top >= act.shape[-1]:
        raise IndexError(f"neuron index {top} out of range at {hook.name}: it has {act.shape[-1]} neurons")


def scale_neurons(idx, factor: float) -> Hook:
    """Multiply neurons `idx` (last dimension) by `factor` at every position."""
    index = _neuron_index(idx)
    top = int(index.max()) if index.numel() else -1
    masks: dict[tuple, Tensor] = {}      # built once per width, device and dtype: no copy to the device per call

    def hook(act: Float[Tensor, "... d"], hook) -> Float[Tensor, "... d"]:
        _check_width(top, act, hook)
        key = (act.shape[-1], act.device, act.dtype)
        if key not in masks:
            masks[key] = torch.ones(act.shape[-1], dtype=act.dtype, device=act.device)
            masks[key][index.to(act.device)] = factor
        return act * masks[key]

    return _named(hook, f"scale_neurons[{len(index)}x{factor}]")


def zero_neurons(idx) -> Hook:
    """Set neurons `idx` (last dimension) to zero at every position: pruning as a hook."""
    index = _neuron_index(idx)
    return _named(scale_neurons(index, 0.0), f"zero_neurons[{len(index)}]")


def set_neurons(idx, values: Float[Tensor, "n"], position: int | None = None) -> Hook:
    """Set neurons `idx` (last dimension) to `values` (one per index) at every position, or only at
    `position` (e.g. -1, the last): mean ablation when `values` are the neurons' mean activations
    (`pruning.neuron_means`)."""
    index = _neuron_index(idx)
    vals = torch.as_tensor(values).reshape(-1)
    if len(vals) != len(index):
        raise ValueError(f"set_neurons needs one value per index, got {len(vals)} values for {len(index)} indices")
    top = int(index.max()) if index.numel() else -1

    def hook(act: Float[Tensor, "batch pos d"], hook) -> Float[Tensor, "batch pos d"]:
        _check_width(top, act, hook)
        out = act.clone()
        where = out if position is None else out[:, position]
        where[..., index.to(act.device)] = vals.to(act.device, act.dtype)
        return out

    return _named(hook, f"set_neurons[{len(index)}" + ("" if position is None else f"@{position}") + "]")


def scale_neurons_by_group(masks: Float[Tensor, "groups d"]) -> Hook:
    """Multiply row group g by `masks[g]` (last dimension) at every position. The batch is `groups`
    equal blocks of rows (group-major, as `Arch.decoder` forks it): several neuron interventions,
    one per group, in one pass; each group gets exactly what `scale_neurons` gives it alone."""

    def hook(act: Float[Tensor, "rows ... d"], hook) -> Float[Tensor, "rows ... d"]:
        groups = masks.shape[0]
        m = masks.to(act.device, act.dtype).reshape(groups, 1, *([1] * (act.ndim - 2)), act.shape[-1])
        return (act.reshape(groups, -1, *act.shape[1:]) * m).reshape(act.shape)

    return _named(hook, f"scale_neurons_by_group[{masks.shape[0]}]")


def patch_from_cache(cache, positions=None, idx=None) -> Hook:
    """Replace the activation with the same hook's activation in `cache` (e.g. a clean run).

    `positions` (ints, default all) and `idx` (last-dimension indices, default all) limit the patch.
    """

    def hook(act: Tensor, hook) -> Tensor:
        src = cache[hook.name].to(act.device, act.dtype)
        where_pos = torch.zeros(act.shape[1], dtype=torch.bool, device=act.device)
        where_pos[slice(None) if positions is None else _as_index(positions).to(act.device)] = True
        where_dim = torch.zeros(act.shape[-1], dtype=torch.bool, device=act.device)
        where_dim[slice(None) if idx is None else _as_index(idx).to(act.device)] = True
        where = (where_pos[:, None] & where_dim[None, :]).reshape(
            1, act.shape[1], *([1] * (act.ndim - 3)), act.shape[-1])
        return torch.where(where, src, act)

    return _named(hook, "patch_from_cache")


def inject_vector(vector: Float[Tensor, "d"] | Float[Tensor, "batch d"], position: int | Tensor = -1) -> Hook:
    """Overwrite the activation at `position` (int, or one per batch row) with `vector`."""

    def hook(act: Float[Tensor, "batch pos d"], hook) -> Float[Tensor, "batch pos d"]:
        out = act.clone()
        rows = torch.arange(act.shape[0], device=act.device)
        pos = torch.as_tensor(position, device=act.device).expand(act.shape[0])
        out[rows, pos] = vector.to(act.device, act.dtype).expand(act.shape[0], -1)
        return out

    return _named(hook, "inject_vector")


def capture(store: dict) -> Hook:
    """Record the activation under its hook name in `store` (detached); changes nothing."""

    def hook(act: Tensor, hook) -> None:
        store[hook.name] = act.detach()

    return _named(hook, "capture")
