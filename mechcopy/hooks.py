"""Every intervention as a named hook function `fn(activation, hook)`.

Factories build the functions, so a notebook reads
`model.run_with_hooks(tokens, fwd_hooks=[(site, zero_neurons(idx))])`. Hooks return a new
tensor rather than editing in place, so they compose with autograd.
"""

from __future__ import annotations

from typing import Callable, Sequence

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


def _check_width(top: int, act: Tensor, hook, axis: int = -1) -> None:
    if top >= act.shape[axis]:
        what = "neuron" if axis == -1 else f"axis {axis}"
        raise IndexError(f"{what} index {top} out of range at {hook.name}: it has {act.shape[axis]} "
                         + ("neurons" if axis == -1 else "entries"))


def _at(index: Tensor, axis: int) -> tuple:
    """The subscript that selects `index` on `axis` (a negative axis: counted from the end)."""
    return (Ellipsis, index) + (slice(None),) * (-axis - 1)


def scale_units(idx, factor: float, axis: int = -1) -> Hook:
    """Multiply entries `idx` of axis `axis` by `factor` at every position: neurons on the last axis,
    attention heads on axis -2 of `attn.hook_z` ([batch pos head d_head])."""
    index = _neuron_index(idx)
    top = int(index.max()) if index.numel() else -1
    masks: dict[tuple, Tensor] = {}      # built once per width, device and dtype: no copy to the device per call

    def hook(act: Float[Tensor, "batch pos ..."], hook) -> Float[Tensor, "batch pos ..."]:
        _check_width(top, act, hook, axis)
        key = (act.shape[axis], act.device, act.dtype)
        if key not in masks:
            mask = torch.ones(act.shape[axis], dtype=act.dtype, device=act.device)
            mask[index.to(act.device)] = factor
            masks[key] = mask.reshape(-1, *([1] * (-axis - 1)))
        return act * masks[key]

    return _named(hook, f"scale_units[{len(index)}x{factor}]" if axis != -1 else f"scale_neurons[{len(index)}x{factor}]")


def scale_neurons(idx, factor: float) -> Hook:
    """Multiply neurons `idx` (last dimension) by `factor` at every position."""
    return scale_units(idx, factor, -1)


def zero_units(idx, axis: int = -1) -> Hook:
    """Set entries `idx` of axis `axis` to zero at every position: zero ablation as a hook."""
    index = _neuron_index(idx)
    return _named(scale_units(index, 0.0, axis), f"zero_neurons[{len(index)}]" if axis == -1 else f"zero_units[{len(index)}]")


def zero_neurons(idx) -> Hook:
    """Set neurons `idx` (last dimension) to zero at every position: pruning as a hook."""
    return zero_units(idx, -1)


def set_units(idx, values: Tensor, position: int | None = None, axis: int = -1) -> Hook:
    """Set entries `idx` of axis `axis` to `values` (one per index, each of the trailing shape after
    the axis) at every position, or only at `position` (e.g. -1, the last)."""
    index = _neuron_index(idx)
    vals = torch.as_tensor(values)
    vals = vals.reshape(-1) if axis == -1 else vals
    if len(vals) != len(index):
        raise ValueError(f"set_neurons needs one value per index, got {len(vals)} values for {len(index)} indices")
    top = int(index.max()) if index.numel() else -1

    def hook(act: Float[Tensor, "batch pos ..."], hook) -> Float[Tensor, "batch pos ..."]:
        _check_width(top, act, hook, axis)
        out = act.clone()
        where = out if position is None else out[:, position]
        where[_at(index.to(act.device), axis)] = vals.to(act.device, act.dtype)
        return out

    name = "set_neurons" if axis == -1 else "set_units"
    return _named(hook, f"{name}[{len(index)}" + ("" if position is None else f"@{position}") + "]")


def set_neurons(idx, values: Float[Tensor, "n"], position: int | None = None) -> Hook:
    """Set neurons `idx` (last dimension) to `values` (one per index) at every position, or only at
    `position` (e.g. -1, the last): mean ablation when `values` are the neurons' mean activations
    (`pruning.component_means`)."""
    return set_units(idx, values, position, -1)


def ablate_by_group(scale: Float[Tensor, "groups width"], add: Tensor | None = None,
                    last_only: Sequence[bool] | None = None, axis: int = -1) -> Hook:
    """Row group g's activation becomes `act * scale[g] + add[g]` on axis `axis` (entries not ablated:
    scale 1, add 0), at every position, or at the last position only where `last_only[g]`. The batch
    is `groups` equal blocks of rows (group-major, as `Arch.decoder` forks it): several ablations, zero
    or mean, one per group, in one pass; each group gets exactly what `scale_units` or `set_units`
    give it alone (`add[g]` has the trailing shape after the axis: [groups, width, *rest])."""
    groups, rest = scale.shape[0], -axis - 1
    last = None if last_only is None or not any(last_only) else torch.tensor(list(last_only), dtype=torch.bool)

    def hook(act: Float[Tensor, "rows pos ..."], hook) -> Float[Tensor, "rows pos ..."]:
        a = act.reshape(groups, -1, *act.shape[1:])
        lead = [1] * (act.ndim - 1 - rest)
        new = a * scale.to(act.device, act.dtype).reshape(groups, *lead, scale.shape[1], *([1] * rest))
        if add is not None:
            new = new + add.to(act.device, act.dtype).reshape(groups, *lead, *add.shape[1:])
        if last is not None:
            keep = torch.ones(groups, act.shape[1], dtype=torch.bool, device=act.device)
            keep[last.to(act.device), :-1] = False
            new = torch.where(keep.reshape(groups, 1, act.shape[1], *([1] * (act.ndim - 2))), new, a)
        return new.reshape(act.shape)

    return _named(hook, f"ablate_by_group[{groups}]")


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
