"""Where the "neurons" live in each architecture, model fingerprints, and `NeuronSet`.

Transformer neurons are `blocks.{l}.mlp.hook_post` (for gated MLPs act(gate)*up, the input to
W_out). Mamba neurons are the gated SSM output y*SiLU(z), the input to `out_proj`, which
HookedMamba exposes as `blocks.{l}.mixer.hook_gated`. Every analysis goes through
`neuron_site` and `neurons_per_layer`, so it runs unchanged on both.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TRANSFORMER_SITE = "blocks.{layer}.mlp.hook_post"
MAMBA_SITE = "blocks.{layer}.mixer.hook_gated"


def is_mamba(model) -> bool:
    return getattr(model.cfg, "architecture", None) == "mamba" or type(model).__name__ == "HookedMamba"


def neuron_site(model, layer: int) -> str:
    """The hook name of layer `layer`'s neurons for this model's architecture."""
    n = model.cfg.n_layers
    if not 0 <= layer < n:
        raise IndexError(f"layer {layer} out of range: the model has {n} layers (0..{n - 1})")
    return (MAMBA_SITE if is_mamba(model) else TRANSFORMER_SITE).format(layer=layer)


def neurons_per_layer(model) -> int:
    return model.cfg.d_inner if is_mamba(model) else model.cfg.d_mlp


def weight_hash(model) -> str:
    """A cheap, deterministic SHA-256 over every parameter's name, shape and a strided sample."""
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        digest.update(name.encode())
        digest.update(str(tuple(p.shape)).encode())
        digest.update(flat[::step].to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model) -> dict[str, Any]:
    """Name, architecture and sizes (what a neuron file is checked against) plus a weight hash."""
    cfg = model.cfg
    return {
        "name": cfg.model_name,
        "architecture": "mamba" if is_mamba(model) else (cfg.original_architecture or "transformer"),
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "neurons_per_layer": neurons_per_layer(model),
        "weight_hash": weight_hash(model),
    }


_IDENTITY_KEYS = ("name", "architecture", "n_layers", "d_model", "neurons_per_layer")


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to a temporary file beside `path`, then rename, so no reader
    ever sees half a file; the temporary file is removed if writing fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically (see `write_atomic`)."""
    return write_atomic(path, json.dumps(obj, indent=2, default=str))


@dataclass(frozen=True)
class NeuronSet:
    """A set of (layer, index) neurons, tied to the model it was found on."""

    neurons: tuple[tuple[int, int], ...]
    model: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "neurons", tuple(sorted({(int(l), int(i)) for l, i in self.neurons})))

    def __len__(self) -> int:
        return len(self.neurons)

    def by_layer(self) -> dict[int, torch.Tensor]:
        """Layer -> LongTensor of neuron indices in that layer (only layers with neurons)."""
        out: dict[int, list[int]] = {}
        for layer, idx in self.neurons:
            out.setdefault(layer, []).append(idx)
        return {l: torch.tensor(ix, dtype=torch.long) for l, ix in sorted(out.items())}

    def layer_counts(self, n_layers: int | None = None) -> list[int]:
        n = n_layers if n_layers is not None else self.model.get("n_layers", 0)
        counts = [0] * n
        for layer, _ in self.neurons:
            counts[layer] += 1
        return counts

    def check(self, model) -> None:
        """Raise a clear error unless this set belongs to `model` and every index is in range."""
        if not self.neurons:
            raise ValueError("the neuron set is empty: nothing to prune or patch")
        fp = model_fingerprint(model)
        diff = [f"{k}: file has {self.model.get(k)!r}, model has {fp[k]!r}"
                for k in _IDENTITY_KEYS if k in self.model and self.model[k] != fp[k]]
        if diff:
            raise ValueError("this neuron set was found on another model (" + "; ".join(diff) + ")")
        n_layers, width = fp["n_layers"], fp["neurons_per_layer"]
        for layer, idx in self.neurons:
            if not (0 <= layer < n_layers and 0 <= idx < width):
                raise IndexError(
                    f"neuron ({layer}, {idx}) out of range: the model has {n_layers} layers of {width} neurons"
                )

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "neurons": [list(n) for n in self.neurons], "meta": self.meta}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "NeuronSet":
        for key in ("model", "neurons"):
            if key not in obj:
                raise ValueError(f"not a neuron file: missing field {key!r}")
        return cls(tuple(tuple(n) for n in obj["neurons"]), obj["model"], obj.get("meta", {}))

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "NeuronSet":
        try:
            obj = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_json(obj)
