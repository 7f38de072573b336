"""Components: the units an intervention acts on (MLP neurons, Mamba channels, attention heads), as
(layer, index) pairs of one kind, tied to the model they were found on.

A kind (`ComponentKind`, registered in `KINDS`) says, for a model and a layer, where its components
live and how to act on them: the hook site, how many there are per layer, which axis of the site's
activation the index selects, and the weight edit that removes them for good. Everything that
ablates, matches or checks components (hooks, one-pass evaluation, random baselines, means, weight
edits) asks the kind, so a new kind is one registry entry:

* `neuron`: transformers `blocks.{l}.mlp.hook_post` (for gated MLPs act(gate)*up, the input to
  `W_out`), Mamba `blocks.{l}.mixer.hook_gated` (the input to `out_proj`); the last axis; the weight
  edit zeroes rows of `W_out` (Mamba: columns of `out_proj`); its size is |activation|.
* `head`: `blocks.{l}.attn.hook_z` ([batch pos head d_head]), models with attention only; axis -2;
  the weight edit zeroes the head's rows of `W_O` (and for mean ablation adds mean_z @ W_O to `b_O`);
  its size is the norm of its output z_h @ W_O[h].

Random baselines (`random_matched`) draw the same number of components in every layer as a set, and
with `match="size"` also components of about the same size: each component's mean size at the answer
position over reference prompts (`Sizes`, computed by `pruning.component_sizes`).

A component file is JSON: `{"model": fingerprint, "<kind plural>": [[layer, index], ...], "meta": {...}}`
(`"neurons"` for the neuron kind, so every neuron file written before components had kinds loads
unchanged; `NeuronSet` is the name it had).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from jaxtyping import Float
from torch import Tensor

from mechcopy.arch import HookedModel, arch_of
from mechcopy.fingerprint import IDENTITY_KEYS, model_fingerprint
from mechcopy.errors import check_number, input_file, note
from mechcopy.io import read_json, write_json_atomic

if TYPE_CHECKING:   # TransformerLens takes seconds to import: at run time only where a model is built
    from transformer_lens.components import TransformerBlock


class ComponentKind:
    """One kind of component: its site, width and axis per layer, and its weight edit."""

    #: the kind's name (`Components.kind`), and the key of its list in a component file
    name: str = ""
    plural: str = ""
    #: the axis of the site's activation that a component index selects (-1: the last)
    axis: int = -1
    #: the model fingerprint's key holding the components per layer (a file is checked against it on loading)
    size_key: str = ""

    def unsupported(self, model: HookedModel) -> str | None:
        """Why `model` has no components of this kind (None: it has)."""
        return None

    def site(self, model: HookedModel, layer: int) -> str:
        """The hook name of layer `layer`'s components."""
        raise NotImplementedError

    def width(self, model: HookedModel) -> int:
        """Components per layer."""
        raise NotImplementedError

    def edit_weights(self, model: HookedModel, layer: int, idx: Tensor, means: Tensor | None = None) -> None:
        """Remove components `idx` of `layer` by editing weights: what the zero-ablation hook does at every
        position, or with `means` (the layer's `Means.values`) what mean ablation does."""
        raise NotImplementedError

    def size(self, model: HookedModel, layer: int, activation: Tensor) -> Float[Tensor, "batch width"]:
        """Each component's size in `activation`, the site's activation at one position ([batch, width,
        *rest]): what a size-matched random set matches (`random_matched`)."""
        raise NotImplementedError

    def check(self, model: HookedModel) -> None:
        why = self.unsupported(model)
        if why:
            raise ValueError(f"this model has no {self.plural}: {why}")

    def __repr__(self) -> str:
        return f"<component kind {self.name}>"


class NeuronKind(ComponentKind):
    name, plural, axis, size_key = "neuron", "neurons", -1, "neurons_per_layer"

    def site(self, model: HookedModel, layer: int) -> str:
        return arch_of(model).neuron_site(model, layer)

    def width(self, model: HookedModel) -> int:
        return arch_of(model).neurons_per_layer(model)

    def edit_weights(self, model: HookedModel, layer: int, idx: Tensor, means: Tensor | None = None) -> None:
        arch_of(model).prune_weights(model, layer, idx, None if means is None else means[idx])

    def size(self, model: HookedModel, layer: int, activation: Tensor) -> Float[Tensor, "batch width"]:
        return activation.abs()                                 # |activation|


class HeadKind(ComponentKind):
    name, plural, axis, size_key = "head", "heads", -2, "n_heads"

    def unsupported(self, model: HookedModel) -> str | None:
        arch = arch_of(model)
        return None if arch.has_attention else f"a {arch.name} model has no attention"

    def site(self, model: HookedModel, layer: int) -> str:
        self.check(model)
        arch_of(model).neuron_site(model, layer)        # the same layer check
        return f"blocks.{int(layer)}.attn.hook_z"

    def width(self, model: HookedModel) -> int:
        self.check(model)
        return arch_of(model).attention_shape(model)[0]

    def edit_weights(self, model: HookedModel, layer: int, idx: Tensor, means: Tensor | None = None) -> None:
        attn = cast("TransformerBlock", model.blocks[layer]).attn    # heads exist on transformers only
        idx = idx.to(attn.W_O.device)
        with torch.no_grad():
            if means is not None:        # what the mean of z writes through W_O, now a constant
                attn.b_O.add_(torch.einsum("hd,hdm->m", means[idx.cpu()].to(attn.W_O), attn.W_O[idx]))
            attn.W_O[idx] = 0

    def size(self, model: HookedModel, layer: int, activation: Tensor) -> Float[Tensor, "batch width"]:
        W_O = cast("TransformerBlock", model.blocks[layer]).attn.W_O    # the norm of what the head writes: z_h @ W_O[h]
        return torch.einsum("bhd,hdm->bhm", activation.to(W_O), W_O).norm(dim=-1)


KINDS: dict[str, ComponentKind] = {kind.name: kind for kind in (NeuronKind(), HeadKind())}


def component_kind(name: str) -> ComponentKind:
    """The registered kind `name` (an error that lists the kinds otherwise)."""
    if name not in KINDS:
        raise ValueError(f"unknown component kind {name!r}; known: {', '.join(KINDS)}")
    return KINDS[name]


def _size(model: dict[str, Any], key: str) -> int | None:
    """A size the fingerprint records (None where it records none, or not as a count)."""
    value = model.get(key) if key else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _as_index(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def _as_pairs(pairs: Any, kind: str) -> tuple[tuple[int, int], ...]:
    """`pairs` as sorted, distinct (layer, index) integer pairs (a ValueError naming the first that is not)."""
    out = set()
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"{kind} {i} must be a (layer, index) pair, got {pair!r}")
        out.add((_as_index(pair[0], f"{kind} {i}'s layer"), _as_index(pair[1], f"{kind} {i}'s index")))
    return tuple(sorted(out))


@dataclass(frozen=True)
class Components:
    """A set of (layer, index) components of one kind, tied to the model it was found on.

    An empty set is legitimate only as `find`'s answer that no k helps (meta `k` = 0, with the reason
    in meta `why`); a component file holding none without saying so is refused on loading.
    """

    pairs: tuple[tuple[int, int], ...]
    model: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    source: Path | None = field(default=None, compare=False)   # the file it was loaded from
    kind: str = "neuron"

    def __post_init__(self):
        kind = component_kind(self.kind)
        if not isinstance(self.model, dict):
            raise TypeError(f"model must be a model fingerprint (a dict), got {type(self.model).__name__}")
        if not isinstance(self.pairs, (tuple, list)):
            raise TypeError(f"pairs must be a list of (layer, index) pairs, got {type(self.pairs).__name__}")
        object.__setattr__(self, "pairs", _as_pairs(self.pairs, self.kind))
        # what the fingerprint says about the model's sizes is checked now, before any model loads
        n_layers, width = _size(self.model, "n_layers"), _size(self.model, kind.size_key)
        for layer, idx in self.pairs:
            if layer < 0 or idx < 0:
                raise ValueError(f"{self.kind} ({layer}, {idx}) has a negative layer or index (they count from 0; "
                                 "-1 does not mean the last)")
            if (n_layers is not None and layer >= n_layers) or (width is not None and idx >= width):
                raise ValueError(f"{self.kind} ({layer}, {idx}) is out of range: the model the set names has "
                                 f"{n_layers if n_layers is not None else '?'} layers of "
                                 f"{width if width is not None else '?'} {kind.plural}")

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def neurons(self) -> tuple[tuple[int, int], ...]:
        """The (layer, index) pairs of a neuron set (`pairs`, under the name `NeuronSet` gave them)."""
        if self.kind != "neuron":
            raise AttributeError(f"a set of {component_kind(self.kind).plural} has no neurons; use .pairs")
        return self.pairs

    @property
    def why_empty(self) -> str:
        """For an empty set, why `find` chose k = 0 (as recorded in its meta)."""
        return self.meta.get("why") or "find chose k = 0"

    def by_layer(self) -> dict[int, torch.Tensor]:
        """Layer -> LongTensor of component indices in that layer (only layers with components)."""
        out: dict[int, list[int]] = {}
        for layer, idx in self.pairs:
            out.setdefault(layer, []).append(idx)
        return {l: torch.tensor(ix, dtype=torch.long) for l, ix in sorted(out.items())}

    def layer_counts(self, n_layers: int | None = None) -> list[int]:
        n = n_layers if n_layers is not None else self.model.get("n_layers", 0)
        check_number(n, "n_layers", low=max((l + 1 for l, _ in self.pairs), default=0), integer=True)
        counts = [0] * n
        for layer, _ in self.pairs:
            counts[layer] += 1
        return counts

    def check(self, model: HookedModel) -> None:
        """Raise a clear error unless this set belongs to `model` and every index is in range."""
        where = f" ({self.source})" if self.source else ""
        noun = "neuron set" if self.kind == "neuron" else f"{self.kind} set"
        missing = [k for k in IDENTITY_KEYS if k not in self.model]
        if missing:
            raise ValueError(f"the {noun}{where} does not name the model it was found on "
                             f"(missing {', '.join(missing)}); it cannot be checked against this model")
        fp = model_fingerprint(model)
        diff = [f"{k}: file has {self.model[k]!r}, model has {fp[k]!r}"
                for k in IDENTITY_KEYS if self.model[k] != fp[k]]
        if diff:
            raise ValueError(f"the {noun}{where} was found on another model (" + "; ".join(diff) + ")")
        kind = component_kind(self.kind)
        kind.check(model)
        n_layers, width = fp["n_layers"], kind.width(model)
        for layer, idx in self.pairs:
            if not (0 <= layer < n_layers and 0 <= idx < width):
                raise IndexError(f"{self.kind} ({layer}, {idx}){where} out of range: the model has {n_layers} layers "
                                 f"of {width} {kind.plural}")

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, component_kind(self.kind).plural: [list(n) for n in self.pairs],
                "meta": self.meta}

    @classmethod
    def from_json(cls, obj: dict[str, Any], source: Path | None = None) -> "Components":
        what = f"{source}: not a neuron file" if source else "not a neuron file"
        if not isinstance(obj, dict):
            raise ValueError(f"{what}: the top level must be a JSON object, got {type(obj).__name__}")
        kinds = [k for k in KINDS.values() if k.plural in obj]
        if len(kinds) > 1:
            raise ValueError(f"{what}: it lists {' and '.join(k.plural for k in kinds)}; a file holds one kind")
        kind = kinds[0] if kinds else KINDS["neuron"]
        for key in ("model", kind.plural):
            if key not in obj:
                raise ValueError(f"{what}: missing field {key!r}")
        model, pairs, meta = obj["model"], obj[kind.plural], obj.get("meta", {})
        if not isinstance(model, dict):
            raise ValueError(f"{what}: field 'model' must be an object, got {model!r}")
        missing = [k for k in IDENTITY_KEYS if k not in model]
        if missing:
            raise ValueError(f"{what}: field 'model' lacks {', '.join(missing)} (a neuron file names the model "
                             "it was found on)")
        if not isinstance(pairs, list):
            raise ValueError(f"{what}: field {kind.plural!r} must be a list of [layer, index] pairs, got {pairs!r}")
        if not isinstance(meta, dict):
            raise ValueError(f"{what}: field 'meta' must be an object, got {meta!r}")
        if not pairs and meta.get("k") != 0:
            raise ValueError(f"{what}: it holds no {kind.plural} and does not say why (a file from `mechcopy find` "
                             "that chose k = 0 says so in meta.k)")
        try:                     # an entry that is no pair of integers: not a neuron file
            pairs = _as_pairs(pairs, kind.name)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from e
        try:                     # pairs past the sizes the file's own fingerprint records
            return cls(pairs, model, meta, source, kind.name)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: {e}" if source else str(e)) from e

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Components":
        path = input_file(path, "neuron file")
        return cls.from_json(read_json(path, "neuron file"), path)


def as_components(value: Any, name: str = "components") -> Components:
    """`value` if it is a `Components` set, else a TypeError naming `name` and saying how to get one."""
    if not isinstance(value, Components):
        raise TypeError(f"{name} must be Components (e.g. Components.load('neurons.json'), or selection.select), "
                        f"got {type(value).__name__} {value!r:.60}")
    return value


MATCHES = ("layer", "size")
#: a size-matched component is drawn from this many unused components nearest in size to its target
SIZE_POOL = 5
#: a size-matched set whose mean size in a layer misses the set's by more than this share is noted
SIZE_TOLERANCE = 0.1


@dataclass(frozen=True)
class Sizes:
    """Every component's mean size at the answer position (each prompt's last position) over
    reference prompts (`pruning.component_sizes`): `values[layer]` is [width] (neurons: mean |a|;
    heads: mean norm of the head's output). `reference` names the prompts."""

    values: dict[int, Tensor]
    kind: str = "neuron"
    reference: str = ""
    n_prompts: int = 0

    def __post_init__(self):
        component_kind(self.kind)

    def __getitem__(self, layer: int) -> Tensor:
        return self.values[layer]

    def describe(self) -> dict[str, Any]:
        """What the sizes are, without their values."""
        return {"kind": self.kind, "reference": self.reference, "n_prompts": self.n_prompts}

    def to_json(self) -> dict[str, Any]:
        return {**self.describe(), "values": {str(l): v.tolist() for l, v in sorted(self.values.items())}}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Sizes":
        return cls({int(l): torch.tensor(v, dtype=torch.float32) for l, v in obj["values"].items()}, obj["kind"],
                   obj["reference"], obj["n_prompts"])


def random_matched(model: HookedModel, components: Components, seed: int, match: str = "layer",
                   sizes: Sizes | None = None) -> Components:
    """Random components of the same kind with the same count in every layer (avoiding the set itself
    where possible): the layer-matched baseline. With `match="size"` each is also matched on size
    (`sizes`: `pruning.component_sizes` on reference prompts): the set's components, largest first,
    each get one drawn at random from the `SIZE_POOL` unused components of their layer nearest in size
    to a target, the component's own size plus what the draws so far fell short of the set (so the
    layer's mean size is kept). Meta `size_ratio` gives, per layer, the drawn set's mean size over
    the set's; a layer off by more than `SIZE_TOLERANCE` (the set's components are the layer's
    largest, say) is noted and listed in meta `size_mismatch`."""
    check_number(seed, "seed", low=0, integer=True)
    components.check(model)
    if match not in MATCHES:
        raise ValueError(f"unknown match {match!r}; choose one of {', '.join(MATCHES)}")
    if match == "size" and (sizes is None or sizes.kind != components.kind):
        raise ValueError(f"size matching needs the sizes of the {component_kind(components.kind).plural} "
                         "(pruning.component_sizes)")
    width = component_kind(components.kind).width(model)
    gen = torch.Generator().manual_seed(int(seed))
    chosen, ratios = [], {}
    for layer, idx in components.by_layer().items():
        pool = torch.ones(width, dtype=torch.bool)
        if width - len(idx) >= len(idx):
            pool[idx] = False
        candidates = pool.nonzero()[:, 0]
        if match == "layer":
            pick = candidates[torch.randperm(len(candidates), generator=gen)[: len(idx)]]
        else:
            assert sizes is not None     # refused above
            pick = _size_matched(sizes[layer].double(), idx, candidates, gen)
            ratios[layer] = float(sizes[layer][pick].double().mean() / sizes[layer][idx].double().mean())
        chosen += [(layer, int(i)) for i in pick]
    meta = {"selection": "random-matched", "seed": int(seed), "matched_to": len(components), "match": match}
    if sizes is not None and match == "size":
        off = [l for l, r in ratios.items() if not abs(r - 1) <= SIZE_TOLERANCE]
        meta.update(sizes=sizes.describe(), size_ratio={str(l): round(r, 4) for l, r in ratios.items()},
                    size_mismatch=off)
        if off:
            note(f"random set {seed}: mean size off by more than {SIZE_TOLERANCE:.0%} in layer(s) {off} "
                 f"(ratios {', '.join(f'{ratios[l]:.2f}' for l in off)}): the set's components there are "
                 "larger or smaller than any others")
    return Components(tuple(chosen), components.model, meta, kind=components.kind)


def _size_matched(size: Tensor, idx: Tensor, candidates: Tensor, gen: torch.Generator) -> Tensor:
    """One candidate per component of `idx`, largest first, drawn from the SIZE_POOL unused candidates
    nearest in `size` to the component's size plus the running shortfall of the draws so far."""
    free = torch.ones(len(candidates), dtype=torch.bool)
    shortfall, out = 0.0, []
    for i in sorted(idx.tolist(), key=lambda i: -float(size[i])):
        target = float(size[i]) + shortfall
        gap = (size[candidates] - target).abs()
        gap[~free] = float("inf")
        near = torch.argsort(gap)[: min(SIZE_POOL, int(free.sum()))]
        j = int(near[torch.randint(len(near), (1,), generator=gen)])
        free[j] = False
        out.append(int(candidates[j]))
        shortfall = target - float(size[candidates[j]])
    return torch.tensor(out, dtype=torch.long)
