"""Attention heads as components: where a head is, ablating it (hook or weight edit), its mean output,
and what it writes into the residual stream.

A head is a pair (layer, query head). Its site is `blocks.{l}.attn.hook_z`, shape
[batch pos head d_head]: the head's mix of values, before `W_O`. On grouped-query models (both zoo
models: SmolLM2 9 query heads over 3 key/value heads per layer, Gemma-3-270M 4 over 1) `hook_z` is per
query head, and query head h reads key/value head `kv_head(model, h)` (TransformerLens repeats each
key/value head for its group of consecutive query heads).

What head h of layer l adds to the residual stream at a position is `z[h] @ W_O[l, h]`, then, on
models that normalise the attention output again before the residual add (Gemma 3:
`cfg.use_normalization_before_and_after`, `blocks.{l}.ln1_post`), that norm with its scale frozen at
the value the whole attention output gave it (`head_writes`).

Heads are the `head` kind of `mechcopy.components` (`KINDS["head"]`): a set of heads is a `Components`
of that kind (`head_set`), ablated like neurons by `pruning.pruning_hooks` (zero or mean, all positions
or the last), `pruning.prune_weights` (zeroing a head's `z` equals zeroing its rows of `W_O`; setting it
to a mean equals also adding mean @ W_O[h] to `b_O`), a `conditions.Condition` in the one-pass
evaluator, and a component file (`"heads": [[layer, head], ...]`). Means: `pruning.component_means(
model, prompts, "head")`.

Heads exist only where the architecture has attention (`arch_of(model).has_attention`); every head
function refuses a Mamba model with one line (`require_heads`).
"""

from __future__ import annotations

import numbers
from typing import Iterable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechcopy.arch import HookedModel, arch_of
from mechcopy.arch.base import Cache
from mechcopy.arch.transformer import transformer_block, transformer_cfg
from mechcopy.components import Components, component_kind
from mechcopy.conditions import Means
from mechcopy.fingerprint import model_fingerprint
from mechcopy.hooks import Hook
from mechcopy.pruning import pruning_hooks

Head = tuple[int, int]


# ---------------------------------------------------------------- sites and checks


def require_heads(model: HookedModel, what: str = "this head analysis") -> None:
    """Raise ValueError (one line) unless `model` has attention heads."""
    arch = arch_of(model)
    if not arch.has_attention:
        raise ValueError(f"{what} needs attention heads, and a {arch.name} model has none; "
                         "use the neuron analyses (mechcopy.sites.neuron_site) on it")


def n_heads(model: HookedModel) -> int:
    """Query heads per layer."""
    require_heads(model)
    return arch_of(model).attention_shape(model)[0]


def kv_head(model: HookedModel, head: int) -> int:
    """The key/value head that query head `head` reads (itself without grouped-query attention)."""
    cfg = transformer_cfg(model)
    n_kv = cfg.n_key_value_heads
    if n_kv is None or cfg.ungroup_grouped_query_attention:
        return int(head)
    return int(head) // (cfg.n_heads // n_kv)


def head_site(model: HookedModel, layer: int) -> str:
    """`blocks.{layer}.attn.hook_z`, the site of layer `layer`'s heads (checked against the model): the
    head component kind's site."""
    require_heads(model)
    return component_kind("head").site(model, layer)


def check_heads(model: HookedModel, heads: Iterable[Sequence[int]]) -> tuple[Head, ...]:
    """`heads` as sorted, distinct (layer, head) pairs; IndexError/TypeError for a pair not in the model."""
    require_heads(model)
    out = set()
    for pair in heads:
        if len(pair) != 2:
            raise TypeError(f"a head is a pair (layer, head), got {pair!r}")
        layer, head = pair
        for v, what in ((layer, "layer"), (head, "head")):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{what} must be an integer, got {type(v).__name__} {v!r}")
        head_site(model, layer)
        if not 0 <= head < n_heads(model):
            raise IndexError(f"head {head} out of range: layer {layer} has {n_heads(model)} heads "
                             f"(0..{n_heads(model) - 1})")
        out.add((int(layer), int(head)))
    return tuple(sorted(out))


def all_heads(model: HookedModel) -> tuple[Head, ...]:
    """Every (layer, head) of the model, layer-major."""
    return tuple((l, h) for l in range(model.cfg.n_layers) for h in range(n_heads(model)))


def heads_by_layer(heads: Iterable[Head]) -> dict[int, list[int]]:
    """{layer: [heads]} in layer order."""
    out: dict[int, list[int]] = {}
    for layer, head in sorted(set(map(tuple, heads))):
        out.setdefault(layer, []).append(head)
    return out


# ---------------------------------------------------------------- heads as components


def head_set(model: HookedModel, heads: Iterable[Head], meta: dict | None = None) -> Components:
    """`heads` as a `Components` set of the head kind (`components.KINDS["head"]`), tied to `model`: what
    `pruning.pruning_hooks` / `prune_weights`, a `conditions.Condition` and a component file take."""
    return Components(check_heads(model, heads), model_fingerprint(model), dict(meta or {}), kind="head")


def head_hooks(model: HookedModel, heads: Iterable[Head], means: Means | None = None,
               positions: str = "all") -> list[tuple[str, Hook]]:
    """One hook per layer touched: zero the heads' `hook_z` (`means` None), or set it to their means
    (`pruning.component_means(model, prompts, "head")`), at every position or only the last
    (`positions="last"`): `pruning.pruning_hooks` on `head_set(model, heads)`."""
    return pruning_hooks(model, head_set(model, heads), "zero" if means is None else "mean", positions, means)


# ---------------------------------------------------------------- what a head writes


def frozen_norm(norm, scale: Tensor | None, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """`norm` (a TransformerLens norm module) applied to `x` as a linear map: its scale frozen at `scale`
    (the value it took on the whole input, [..., 1]), its bias left out (LayerNorm's `b` is a term of
    its own). Summing this over the parts of an input gives the norm's output minus its bias."""
    kind = type(norm).__name__
    if kind == "Identity":
        return x
    if kind not in ("RMSNorm", "RMSNormPre", "LayerNorm", "LayerNormPre"):
        raise NotImplementedError(f"frozen_norm does not know the norm {kind}")
    if scale is None:
        raise ValueError(f"frozen_norm of a {kind} needs the scale it took (its hook_scale in the cache)")
    if kind.startswith("LayerNorm"):
        x = x - x.mean(-1, keepdim=True)
    x = x / scale
    return x * norm.w if hasattr(norm, "w") else x


def final_norm(model: HookedModel):
    """The model's final norm (`ln_final`), or an `Identity` on a model without one."""
    return model.ln_final if transformer_cfg(model).normalization_type is not None else torch.nn.Identity()


def require_direct_effects(model: HookedModel, what: str) -> None:
    """Raise (one line) unless a component's direct effect on a logit is a term of a sum: refuses
    post-norm blocks (they normalise after the residual add) and soft-capped output logits."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = transformer_cfg(model)
    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        raise NotImplementedError(f"{cfg.original_architecture} normalises after the residual add: a component's "
                                  f"direct effect is not a sum of terms there, so {what} cannot run on it")
    if getattr(cfg, "output_logits_soft_cap", None) and cfg.output_logits_soft_cap > 0:
        raise ValueError(f"the model soft-caps its logits, so a logit is not a sum of direct effects: {what} "
                         "refuses it")


def norm_bias(norm) -> Tensor | float:
    """The bias a norm adds after scaling (LayerNorm's `b`), else 0."""
    return norm.b if hasattr(norm, "b") else 0.0


def post_attention_norm(model: HookedModel, layer: int):
    """The norm applied to layer `layer`'s attention output before the residual add (Gemma 3's
    `ln1_post`), or None."""
    if not transformer_cfg(model).use_normalization_before_and_after:
        return None
    return transformer_block(model, layer).ln1_post


def head_writes(model: HookedModel, cache: Cache, layer: int, position: int = -1,
                ) -> tuple[Float[Tensor, "batch heads d_model"], Float[Tensor, "batch d_model"]]:
    """What each head of `layer` and the output bias add to the residual stream at `position`, from a
    cache holding `blocks.{layer}.attn.hook_z` (and, on models with a post-attention norm,
    `blocks.{layer}.ln1_post.hook_scale`): (per head [batch, heads, d_model], bias [batch, d_model]).

    Without a post-attention norm: `z[h] @ W_O[h]` and `b_O`. With it: both through the norm with its
    scale frozen at the value the whole attention output gave it, and the norm's own bias added to the
    bias term, so heads + bias = `hook_attn_out` exactly.
    """
    attn = transformer_block(model, layer).attn
    z = cache[head_site(model, layer)][:, position]                            # [batch, heads, d_head]
    per_head = torch.einsum("bhd,hdm->bhm", z.to(attn.W_O.dtype), attn.W_O)
    bias = attn.b_O.expand(z.shape[0], -1)
    return through_post_norm(post_attention_norm(model, layer), f"blocks.{layer}.ln1_post.hook_scale", cache, position,
                             per_head, bias)


def through_post_norm(norm, scale_name: str, cache: Cache, position: int, parts: Float[Tensor, "batch n d_model"],
                      bias: Float[Tensor, "batch d_model"]
                      ) -> tuple[Float[Tensor, "batch n d_model"], Float[Tensor, "batch d_model"]]:
    """The parts and bias term of a sublayer's output, after the norm it goes through before the residual
    add (`norm`; None: none, returned as given): each through `norm` with its scale frozen at the value
    the whole output gave it (`cache[scale_name]` at `position`), the norm's own bias added to the bias
    term, so that parts + bias = the normed output exactly."""
    if norm is None:
        return parts, bias
    scale = cache[scale_name][:, position] if hasattr(norm, "hook_scale") else None
    return (frozen_norm(norm, None if scale is None else scale[:, None], parts),
            frozen_norm(norm, scale, bias) + norm_bias(norm))


def head_cache_names(model: HookedModel, layers: Iterable[int] | None = None) -> list[str]:
    """The hook points `head_writes` reads for `layers` (default all)."""
    layers = range(model.cfg.n_layers) if layers is None else layers
    names = []
    for l in layers:
        names.append(head_site(model, l))
        post = post_attention_norm(model, l)
        if post is not None and hasattr(post, "hook_scale"):
            names.append(f"blocks.{l}.ln1_post.hook_scale")
    return names
