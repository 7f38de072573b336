"""Every intervention as a named hook function `fn(activation, hook)`.

Factories build the functions, so a notebook reads
`model.run_with_hooks(tokens, fwd_hooks=[(site, zero_neurons(idx))])`. Hooks return a new
tensor rather than editing in place, so they compose with autograd.

Neuron hooks select the last axis of a [batch pos neurons] activation; head hooks (`*_units` with
axis -2, or `zero_heads`/`set_heads`/`scale_heads`) select axis -2 of a per-head activation
[batch pos head d_head] (`blocks.{l}.attn.hook_z`, and `hook_q`/`hook_k`/`hook_v`, whose head axis
counts key/value heads on grouped-query models). A neuron hook refuses a per-head activation, so
`zero_neurons([8])` on `hook_z` cannot silently zero `d_head` index 8 of every head, and a head hook
refuses anything but a per-head activation.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechcopy.errors import check_number

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


def _neuron_index(idx, what: str = "neuron") -> Tensor:
    """Neuron (or head) indices: integers >= 0 (torch would count -1 from the end, so -1 would prune the
    last neuron)."""
    index = _as_index(idx, f"{what} indices")
    if index.numel() and int(index.min()) < 0:
        raise IndexError(f"{what} indices must be >= 0, got {int(index.min())}")
    return index


def _head_index(idx) -> Tensor:
    return _neuron_index(idx, "head")


def _check_width(top: int, act: Tensor, hook, axis: int = -1) -> None:
    """Refuse a per-head activation (4-D) for a neuron hook (axis -1), anything but a per-head
    activation for a head hook (axis -2), and an index beyond the axis."""
    name = getattr(hook, "name", None) or "this hook point"
    if axis == -1 and act.ndim > 3:
        raise ValueError(f"a neuron hook acts on the last axis of a [batch pos neurons] activation; {name} has "
                         f"shape {list(act.shape)} (a per-head site, [batch pos head d_head]): use the head hooks "
                         "(hooks.zero_heads, hooks.set_heads, or *_units with axis=-2) or a neuron site "
                         "(mechcopy.sites.neuron_site)")
    if axis == -2:
        _check_head_site(act, hook)
    if top >= act.shape[axis]:
        what = {-1: "neuron", -2: "head"}.get(axis, f"axis {axis}")
        unit = {-1: "neurons", -2: "heads"}.get(axis, "entries")
        raise IndexError(f"{what} index {top} out of range at {name}: it has {act.shape[axis]} {unit}")


def _finite_values(values, what: str) -> Tensor:
    """`values` as a float tensor with no NaN or infinity (a NaN would spread through every later layer)."""
    try:
        t = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{what} must be numbers, got {type(values).__name__}") from e
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{what} must be real numbers, got dtype {t.dtype}")
    t = t.float() if not t.is_floating_point() else t
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} must be finite numbers: {int((~torch.isfinite(t)).sum())} of {t.numel()} are NaN or "
                         "infinite")
    return t


def _position(position, what: str):
    """An int position, or one per batch row (a tensor of ints)."""
    if isinstance(position, Tensor):
        return _as_index(position, f"{what} positions")
    return check_number(position, f"{what} position", integer=True)


def _check_position(pos: Tensor, act: Tensor, hook, what: str) -> None:
    n = act.shape[1]
    if pos.numel() and not bool(((pos >= -n) & (pos < n)).all()):
        raise IndexError(f"{what}: position {pos.tolist()} out of range at {hook.name}, which has {n} positions")


def check_hook_points(model, fwd_hooks: Iterable[tuple[str | Callable, Hook]]) -> None:
    """Refuse hook names that `model` lacks (TransformerLens would fail with a bare KeyError), naming
    the name and the nearest kinds that exist. A callable name filter is left to TransformerLens."""
    points = getattr(model, "hook_dict", {})
    for item in fwd_hooks:
        if not isinstance(item, (tuple, list)) or len(item) != 2 or not callable(item[1]):
            raise TypeError(f"each hook must be a (hook point name, function) pair, got {item!r}")
        name = item[0]
        if callable(name):
            continue
        if not isinstance(name, str):
            raise TypeError(f"a hook point name must be a string, got {type(name).__name__} {name!r}")
        if name not in points:
            tail = name.split(".", 2)[-1] if name.startswith("blocks.") else name
            like = [p for p in points if p.endswith(tail)][:3] or sorted(points)[:3]
            raise ValueError(f"the model has no hook point {name!r} (it has {len(points)}, e.g. {', '.join(like)})")


def _at(index: Tensor, axis: int) -> tuple:
    """The subscript that selects `index` on `axis` (a negative axis: counted from the end)."""
    return (Ellipsis, index) + (slice(None),) * (-axis - 1)


def scale_units(idx, factor: float, axis: int = -1) -> Hook:
    """Multiply entries `idx` of axis `axis` by `factor` at every position: neurons on the last axis,
    attention heads on axis -2 of `attn.hook_z` ([batch pos head d_head])."""
    index = _neuron_index(idx)
    factor = float(check_number(factor, "factor"))
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
    name = "set_neurons" if axis == -1 else "set_units"
    index = _neuron_index(idx)
    vals = _finite_values(values, f"{name} values")
    vals = vals.reshape(-1) if axis == -1 else vals
    if position is not None:
        position = _position(position, name)
    if len(vals) != len(index):
        if axis == -2:
            raise ValueError(f"set_heads needs one row of d_head values per head, got shape {list(vals.shape)} "
                             f"for {len(index)} heads")
        raise ValueError(f"{name} needs one value per index, got {len(vals)} values for {len(index)} indices")
    top = int(index.max()) if index.numel() else -1

    def hook(act: Float[Tensor, "batch pos ..."], hook) -> Float[Tensor, "batch pos ..."]:
        _check_width(top, act, hook, axis)
        if position is not None:
            _check_position(torch.tensor([position]), act, hook, name)
        out = act.clone()
        where = out if position is None else out[:, position]
        where[_at(index.to(act.device), axis)] = vals.to(act.device, act.dtype)
        return out

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
        if act.shape[0] % groups or scale.shape[1] != act.shape[axis]:
            raise ValueError(f"ablate_by_group: a scale of shape {tuple(scale.shape)} does not fit the activation at "
                             f"{hook.name} ({act.shape[0]} rows, {act.shape[axis]} on axis {axis}): rows must be "
                             "groups x prompts")
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


def patch_from_cache(cache, positions=None, idx=None, heads=None, source_positions=None) -> Hook:
    """Replace the activation with the same hook's activation in `cache` (e.g. a clean run).

    `positions` (ints, default all) and either `idx` (last-dimension indices: neurons) or, on a
    per-head activation [batch pos head d_head], `heads` (axis -2) limit the patch (default: all).
    With `source_positions` (one per position, same order), position `positions[i]` takes the cached
    `source_positions[i]`: prompts of different lengths aligned by role (`mechcopy.tasks.pairs`).
    """
    if idx is not None and heads is not None:
        raise ValueError("patch_from_cache takes neuron indices (idx) or head indices (heads), not both")
    if source_positions is not None and (positions is None or len(_as_index(positions)) != len(_as_index(source_positions))):
        raise ValueError("source_positions needs positions of the same length (one target position per source position)")
    neuron = None if idx is None else _neuron_index(idx)
    head = None if heads is None else _head_index(heads)

    def hook(act: Tensor, hook) -> Tensor:
        if neuron is not None:
            _check_width(int(neuron.max()) if neuron.numel() else -1, act, hook)
        if head is not None:
            _check_width(int(head.max()) if head.numel() else -1, act, hook, -2)
        try:
            src = cache[hook.name].to(act.device, act.dtype)
        except KeyError:
            raise ValueError(f"patch_from_cache: the cache holds no activation at {hook.name}; run the source "
                             "with that hook point cached") from None
        same_length = source_positions is not None or src.shape[1] == act.shape[1]
        if src.shape[2:] != act.shape[2:] or not same_length or src.shape[0] not in (1, act.shape[0]):
            raise ValueError(f"patch_from_cache: the cached activation at {hook.name} has shape {tuple(src.shape)}, "
                             f"the activation patched has {tuple(act.shape)}")
        if positions is not None:
            target = _as_index(positions, "positions").to(act.device)
            _check_position(target, act, hook, "patch_from_cache")
            source = target
            if source_positions is not None:
                source = _as_index(source_positions, "source_positions").to(act.device)
                _check_position(source, src, hook, "patch_from_cache (source)")
            src = src[:, source]
        out = act.clone()
        view = out if positions is None else out[:, target]
        if head is not None:
            h = head.to(act.device)
            view[..., h, :] = src[..., h, :]
        elif neuron is not None:
            i = neuron.to(act.device)
            view[..., i] = src[..., i]
        else:
            view = src.expand(view.shape).clone()
        if positions is None:
            return view
        out[:, target] = view
        return out

    return _named(hook, "patch_from_cache")


# ---------------------------------------------------------------- heads


def _check_head_site(act: Tensor, hook) -> None:
    if act.ndim != 4:
        name = getattr(hook, "name", None) or "this hook point"
        raise ValueError(f"a head hook acts on axis -2 of a per-head activation [batch pos head d_head] "
                         f"(blocks.{{l}}.attn.hook_z); {name} has shape {list(act.shape)}: "
                         "use mechcopy.heads.head_site for the site")


def scale_heads(idx, factor: float) -> Hook:
    """Multiply heads `idx` (axis -2 of [batch pos head d_head]) by `factor` at every position."""
    return scale_units(idx, factor, -2)


def zero_heads(idx) -> Hook:
    """Set heads `idx` to zero at every position (at `hook_z`: the head writes nothing but `b_O`'s share,
    which is the weight edit zeroing the head's rows of `W_O`, `components.HeadKind.edit_weights`)."""
    return zero_units(idx, -2)


def set_heads(idx, values: Float[Tensor, "n d_head"], position: int | None = None) -> Hook:
    """Set heads `idx` to `values` (one row of d_head per index) at every position, or only at `position`
    (e.g. -1): mean ablation when `values` are the heads' mean outputs
    (`pruning.component_means(model, prompts, "head")`)."""
    vals = torch.as_tensor(values)
    if vals.ndim != 2:
        raise ValueError(f"set_heads needs one row of d_head values per head, got shape {list(vals.shape)}")
    return set_units(idx, vals, position, -2)


def patch_heads_by_group(source: Float[Tensor, "batch pos head d_head"],
                         groups: Sequence[tuple[int, object, object]]) -> Hook:
    """Row group g (the batch is len(groups) equal blocks of rows, group-major) takes head `groups[g][0]`
    from `source` at positions `groups[g][1]` (None: all) read from source positions `groups[g][2]`
    (None: the same): one patch per group, many patches in one pass; each group gets exactly what
    `patch_from_cache(..., heads=[h])` gives it alone. `source` is shared by the groups ([batch, ...])
    or has one block of rows per group ([groups * batch, ...])."""
    n = len(groups)

    def hook(act: Float[Tensor, "rows pos head d_head"], hook) -> Float[Tensor, "rows pos head d_head"]:
        _check_head_site(act, hook)
        src = source.to(act.device, act.dtype)
        per_group = n > 1 and src.shape[0] == act.shape[0]
        src = src.reshape(n, -1, *src.shape[1:]) if per_group else src
        out = act.clone().reshape(n, -1, *act.shape[1:])
        for g, (head, positions, source_positions) in enumerate(groups):
            s_g = src[g] if per_group else src
            if positions is None:
                out[g, :, :, head] = s_g[:, :, head]
            else:
                t = _as_index(positions).to(act.device)
                s = t if source_positions is None else _as_index(source_positions).to(act.device)
                out[g, :, t, head] = s_g[:, s, head]
        return out.reshape(act.shape)

    return _named(hook, f"patch_heads_by_group[{n}]")


def scale_attention(keys, factor: float, heads=None, query: int = -1, renormalise: bool = True) -> Hook:
    """At `blocks.{l}.attn.hook_pattern` [batch head query key]: scale the attention of query position
    `query` (default the last) to key positions `keys` (ints, or a boolean mask [batch, key]) by
    `factor`, for `heads` (default all). With `renormalise` the row is divided by its new sum, which is
    adding log(factor) to those scores before the softmax (factor 0: the keys are masked out);
    without it the other keys keep their weights."""
    head_index = None if heads is None else _head_index(heads)

    def hook(pattern: Float[Tensor, "batch head q k"], hook) -> Float[Tensor, "batch head q k"]:
        if pattern.ndim != 4:
            raise ValueError(f"scale_attention acts on an attention pattern [batch head query key]; "
                             f"{getattr(hook, 'name', 'this hook point')} has shape {list(pattern.shape)}")
        k = torch.as_tensor(keys, device=pattern.device)
        if k.dtype == torch.bool:
            mask = k.reshape(-1, pattern.shape[-1]).expand(pattern.shape[0], -1)
        else:
            mask = torch.zeros(pattern.shape[0], pattern.shape[-1], dtype=torch.bool, device=pattern.device)
            mask[:, _as_index(k, "key positions").to(pattern.device)] = True
        scale = torch.where(mask, torch.tensor(factor, dtype=pattern.dtype, device=pattern.device),
                            torch.ones((), dtype=pattern.dtype, device=pattern.device))[:, None]   # [batch 1 key]
        if head_index is not None:
            keep = torch.ones(pattern.shape[1], dtype=torch.bool, device=pattern.device)
            keep[head_index.to(pattern.device)] = False
            scale = torch.where(keep[None, :, None], torch.ones_like(scale), scale)          # [batch head key]
        out = pattern.clone()
        row = out[:, :, query] * scale
        if renormalise:
            row = row / row.sum(-1, keepdim=True).clamp_min(torch.finfo(row.dtype).tiny)
        out[:, :, query] = row
        return out

    return _named(hook, f"scale_attention[x{factor}]")


def scale_last_query(scale: Float[Tensor, "rows head key"]) -> Hook:
    """At `blocks.{l}.attn.hook_pattern` [rows head query key]: the last query's attention multiplied by
    `scale` (1 where untouched) and renormalised, i.e. log(scale) added to its scores before the softmax.
    One scale per row, head and key: several prompts, each with its own key positions, and several row
    groups, each with its own heads (`label_attention.AttentionEdits`)."""

    def hook(pattern: Float[Tensor, "rows head q k"], hook) -> Float[Tensor, "rows head q k"]:
        if pattern.ndim != 4 or tuple(scale.shape) != (pattern.shape[0], pattern.shape[1], pattern.shape[-1]):
            raise ValueError(f"scale_last_query: a scale of shape {tuple(scale.shape)} does not fit the attention "
                             f"pattern at {getattr(hook, 'name', 'this hook point')} {list(pattern.shape)} "
                             "([rows head query key] needs a scale [rows head key])")
        row = pattern[:, :, -1] * scale.to(pattern.device, pattern.dtype)
        row = row / row.sum(-1, keepdim=True).clamp_min(torch.finfo(row.dtype).tiny)
        return torch.cat([pattern[:, :, :-1], row[:, :, None]], dim=2)

    return _named(hook, f"scale_last_query[{scale.shape[0]}]")


def inject_vector(vector: Float[Tensor, "d"] | Float[Tensor, "batch d"], position: int | Tensor = -1) -> Hook:
    """Overwrite the activation at `position` (int, or one per batch row) with `vector`."""
    vector = _finite_values(vector, "inject_vector's vector")
    if vector.ndim not in (1, 2):
        raise ValueError(f"inject_vector needs a vector [d] or one per batch row [batch, d], got shape "
                         f"{tuple(vector.shape)}")
    position = _position(position, "inject_vector")

    def hook(act: Float[Tensor, "batch pos d"], hook) -> Float[Tensor, "batch pos d"]:
        if vector.shape[-1] != act.shape[-1] or (vector.ndim == 2 and vector.shape[0] not in (1, act.shape[0])):
            raise ValueError(f"inject_vector: the vector has shape {tuple(vector.shape)}, but the activation at "
                             f"{hook.name} has {act.shape[-1]} values per position for {act.shape[0]} rows")
        out = act.clone()
        rows = torch.arange(act.shape[0], device=act.device)
        pos = torch.as_tensor(position, device=act.device).expand(act.shape[0])
        _check_position(pos, act, hook, "inject_vector")
        out[rows, pos] = vector.to(act.device, act.dtype).expand(act.shape[0], -1)
        return out

    return _named(hook, "inject_vector")


def add_vector(vector: Float[Tensor, "d"], position: int = -1) -> Hook:
    """Add `vector` to the activation at `position` (e.g. a function vector to the residual stream)."""

    def hook(act: Float[Tensor, "batch pos d"], hook) -> Float[Tensor, "batch pos d"]:
        out = act.clone()
        out[:, position] = out[:, position] + vector.to(act.device, act.dtype)
        return out

    return _named(hook, "add_vector")


def capture(store: dict) -> Hook:
    """Record the activation under its hook name in `store` (detached); changes nothing."""

    def hook(act: Tensor, hook) -> None:
        store[hook.name] = act.detach()

    return _named(hook, "capture")
