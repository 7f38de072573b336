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


def _as_index(idx) -> Tensor:
    return torch.as_tensor(idx, dtype=torch.long).reshape(-1)


def scale_neurons(idx, factor: float) -> Hook:
    """Multiply neurons `idx` (last dimension) by `factor` at every position."""
    index = _as_index(idx)
    masks: dict[tuple, Tensor] = {}      # built once per width, device and dtype: no copy to the device per call

    def hook(act: Float[Tensor, "... d"], hook) -> Float[Tensor, "... d"]:
        key = (act.shape[-1], act.device, act.dtype)
        if key not in masks:
            masks[key] = torch.ones(act.shape[-1], dtype=act.dtype, device=act.device)
            masks[key][index.to(act.device)] = factor
        return act * masks[key]

    return _named(hook, f"scale_neurons[{len(index)}x{factor}]")


def zero_neurons(idx) -> Hook:
    """Set neurons `idx` (last dimension) to zero at every position: pruning as a hook."""
    return _named(scale_neurons(idx, 0.0), f"zero_neurons[{len(_as_index(idx))}]")


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
