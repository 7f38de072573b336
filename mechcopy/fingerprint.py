"""A model's identity: name, architecture, sizes and a hash of its weights (`model_fingerprint`).

Every saved result names the model it came from, and a component file is checked against it
(`Components.check`). The fingerprint is computed once per model object and recomputed only when a
parameter is replaced or edited in place (`prune_weights`, `.to(...)`), so checking many sets
against one model costs one hash.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

import torch

from mechcopy.arch import HookedModel, arch_of

IDENTITY_KEYS = ("name", "architecture", "n_layers", "d_model", "neurons_per_layer", "weight_hash")

_FINGERPRINTS: "weakref.WeakKeyDictionary[Any, tuple[tuple, dict[str, Any]]]" = weakref.WeakKeyDictionary()


def weight_hash(model: HookedModel) -> str:
    """A cheap, deterministic SHA-256 over every parameter's name, shape and a strided sample.

    The sample is hashed at bfloat16 precision, so float32, float64 and bfloat16 copies of the same
    weights share a hash, while any real change of the weights changes it.
    """
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        digest.update(name.encode())
        digest.update(str(tuple(p.shape)).encode())
        sample = flat[::step].to(torch.bfloat16).view(torch.int16) if flat.is_floating_point() else flat[::step]
        digest.update(sample.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _weights_state(model: HookedModel) -> tuple:
    """Changes whenever a parameter or buffer is replaced or edited in place."""
    return tuple((t.data_ptr(), t._version) for t in model.state_dict().values())


def model_fingerprint(model: HookedModel) -> dict[str, Any]:
    """Name, architecture and sizes (what a component file is checked against, also before the model
    loads: layers, neurons per layer, attention heads) plus a weight hash."""
    state = _weights_state(model)
    cached = _FINGERPRINTS.get(model)
    if cached is not None and cached[0] == state:
        return dict(cached[1])
    arch, cfg = arch_of(model), model.cfg
    fp = {
        "name": cfg.model_name,
        "architecture": arch.architecture_name(model),
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "neurons_per_layer": arch.neurons_per_layer(model),
        "weight_hash": weight_hash(model),
    }
    if arch.has_attention:     # the sizes a head file is checked against on loading
        fp["n_heads"] = arch.attention_shape(model)[0]
    _FINGERPRINTS[model] = (state, fp)
    return dict(fp)


def numerics(model: HookedModel) -> dict[str, str]:
    """What changes a model's numbers without changing its weights' identity (the weight hash is the same
    in float32 and bfloat16): the parameters' dtype and the kind of device. Part of every checkpoint's
    and journal's key, so work done in one precision is never reused in another."""
    p = next(iter(model.parameters()), None)
    return {"dtype": str(p.dtype).removeprefix("torch.") if p is not None else "none",
            "device": p.device.type if p is not None else "cpu"}
