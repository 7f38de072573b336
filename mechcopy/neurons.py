"""`NeuronSet` (a set of neurons tied to the model it was found on) and model fingerprints.

A fingerprint names a model's identity (name, architecture, sizes) and a hash of its weights. It is
computed once per model object and recomputed only when a parameter is replaced or edited in place
(`prune_weights`, `.to(...)`), so checking many neuron sets against one model costs one hash.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechcopy.arch import HookedModel, arch_of
from mechcopy.io import write_json_atomic

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
    """Name, architecture and sizes (what a neuron file is checked against) plus a weight hash."""
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
    _FINGERPRINTS[model] = (state, fp)
    return dict(fp)


def _as_index(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


@dataclass(frozen=True)
class NeuronSet:
    """A set of (layer, index) neurons, tied to the model it was found on.

    An empty set is legitimate only as `find`'s answer that no k helps (meta `k` = 0, with the reason
    in meta `why`); a neuron file holding no neurons without saying so is refused on loading.
    """

    neurons: tuple[tuple[int, int], ...]
    model: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    source: Path | None = field(default=None, compare=False)   # the file it was loaded from

    def __post_init__(self):
        pairs = set()
        for i, pair in enumerate(self.neurons):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"neuron {i} must be a (layer, index) pair, got {pair!r}")
            pairs.add((_as_index(pair[0], f"neuron {i}'s layer"), _as_index(pair[1], f"neuron {i}'s index")))
        object.__setattr__(self, "neurons", tuple(sorted(pairs)))

    def __len__(self) -> int:
        return len(self.neurons)

    @property
    def why_empty(self) -> str:
        """For an empty set, why `find` chose k = 0 (as recorded in its meta)."""
        return self.meta.get("why") or "find chose k = 0"

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

    def check(self, model: HookedModel) -> None:
        """Raise a clear error unless this set belongs to `model` and every index is in range."""
        where = f" ({self.source})" if self.source else ""
        missing = [k for k in IDENTITY_KEYS if k not in self.model]
        if missing:
            raise ValueError(f"the neuron set{where} does not name the model it was found on "
                             f"(missing {', '.join(missing)}); it cannot be checked against this model")
        fp = model_fingerprint(model)
        diff = [f"{k}: file has {self.model[k]!r}, model has {fp[k]!r}"
                for k in IDENTITY_KEYS if self.model[k] != fp[k]]
        if diff:
            raise ValueError(f"the neuron set{where} was found on another model (" + "; ".join(diff) + ")")
        n_layers, width = fp["n_layers"], fp["neurons_per_layer"]
        for layer, idx in self.neurons:
            if not (0 <= layer < n_layers and 0 <= idx < width):
                raise IndexError(
                    f"neuron ({layer}, {idx}){where} out of range: the model has {n_layers} layers of {width} neurons"
                )

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "neurons": [list(n) for n in self.neurons], "meta": self.meta}

    @classmethod
    def from_json(cls, obj: dict[str, Any], source: Path | None = None) -> "NeuronSet":
        what = f"{source}: not a neuron file" if source else "not a neuron file"
        if not isinstance(obj, dict):
            raise ValueError(f"{what}: the top level must be a JSON object, got {type(obj).__name__}")
        for key in ("model", "neurons"):
            if key not in obj:
                raise ValueError(f"{what}: missing field {key!r}")
        model, neurons, meta = obj["model"], obj["neurons"], obj.get("meta", {})
        if not isinstance(model, dict):
            raise ValueError(f"{what}: field 'model' must be an object, got {model!r}")
        missing = [k for k in IDENTITY_KEYS if k not in model]
        if missing:
            raise ValueError(f"{what}: field 'model' lacks {', '.join(missing)} (a neuron file names the model "
                             "it was found on)")
        if not isinstance(neurons, list):
            raise ValueError(f"{what}: field 'neurons' must be a list of [layer, index] pairs, got {neurons!r}")
        if not isinstance(meta, dict):
            raise ValueError(f"{what}: field 'meta' must be an object, got {meta!r}")
        if not neurons and meta.get("k") != 0:
            raise ValueError(f"{what}: it holds no neurons and does not say why (a file from `mechcopy find` "
                             "that chose k = 0 says so in meta.k)")
        try:
            return cls(tuple(tuple(n) if isinstance(n, list) else n for n in neurons), model, meta, source)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from e

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "NeuronSet":
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"neuron file {path} " + ("is a folder" if path.is_dir() else "does not exist"))
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a neuron file (not valid JSON: {e})") from e
        return cls.from_json(obj, path)
