"""TransformerLens `HookedTransformer`: neurons at `blocks.{l}.mlp.hook_post` (for gated MLPs
act(gate)*up, the input to `W_out`), a key/value cache for decoding, and the hand-written blocks of the
fast IG path.

Fast IG rows are single tokens at the last position of their prompt. `OneTokenBlocks` computes each
layer's prefix keys and values once per prompt (normalised, rotated relative to the rows' position so
that the rows need no rotation, key/value heads not repeated) and attends every row's queries to them
by broadcasting; the blocks' weights are used as stored (only the per-head query/key/value weights,
which have no 2-D view, are packed into one matrix once per prompt). The clean run goes through the
same block code with causal attention (`run_blocks`). A configuration it does not implement, or a hook
on a hook point it does not fire, selects TransformerLens' own blocks instead: `TLBlocks` on a frozen
key/value cache, and `run_with_cache` for the clean run (`one_token_block_unsupported` says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Collection, Sequence, cast

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechcopy.arch.base import Arch, HookedModel, State, Stepper, rows_per_prompt
from mechcopy.hooks import capture

if TYPE_CHECKING:   # TransformerLens takes seconds to import: at run time only where a model is built
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.components import MLP, GatedMLP, TransformerBlock

#: hook points of a block that `OneTokenBlocks` does not fire: the attention's internals and the
#: per-head input hooks (`use_attn_in`, `use_split_qkv_input`); a hook on one selects `TLBlocks`
UNFIRED_HOOKS = (".attn.", ".hook_attn_in", ".hook_q_input", ".hook_k_input", ".hook_v_input")


def transformer_cfg(model: HookedModel) -> HookedTransformerConfig:
    """The model's config as what it is on a transformer (heads, MLP width, positions, norms): what code that
    runs on transformers only (after `Arch.has_attention`, e.g. `mechcopy.heads`) reads."""
    return cast("HookedTransformerConfig", model.cfg)


def transformer_block(model: HookedModel, layer: int) -> TransformerBlock:
    """Block `layer` as what it is on a transformer (TransformerLens' `TransformerBlock`: its attention,
    norms and MLP), for code that runs on transformers only."""
    return cast("TransformerBlock", model.blocks[layer])


def _mlp(block: TransformerBlock) -> MLP | GatedMLP:
    """The block's MLP: plain or gated (what mechcopy's neurons are the hidden units of)."""
    return cast("MLP | GatedMLP", block.mlp)


class TransformerArch(Arch):
    name = "transformer"
    neuron_template = "blocks.{layer}.mlp.hook_post"
    components = {
        "resid_pre": "blocks.{layer}.hook_resid_pre",
        "attn_out": "blocks.{layer}.hook_attn_out",
        "mlp_out": "blocks.{layer}.hook_mlp_out",
    }
    has_attention = True
    tl_patching = True

    def neurons_per_layer(self, model: HookedModel) -> int:
        d_mlp = transformer_cfg(model).d_mlp
        if d_mlp is None:
            raise ValueError("this transformer has no MLP, so no neurons (attention only)")
        return int(d_mlp)

    def attention_shape(self, model: HookedModel) -> tuple[int, int]:
        cfg = transformer_cfg(model)
        return int(cfg.n_heads), int(cfg.d_head)

    def architecture_name(self, model: HookedModel) -> str:
        return transformer_cfg(model).original_architecture or "transformer"

    def run_blocks(self, model: HookedModel, x: Tensor, mask: Tensor | None, state: State, start: int | None = None,
                   stop: int | None = None) -> tuple[Tensor, State]:
        """A key/value cache continues the prefix. TransformerLens masks the padding and counts each
        row's rotary positions from its first token; the mask is always given, as without one it
        would guess padding from pad-token ids in the input."""
        from transformer_lens import TransformerLensKeyValueCache

        cache = state if state is not None else TransformerLensKeyValueCache.init_cache(
            transformer_cfg(model), model.cfg.device, x.shape[0])
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        stop = model.cfg.n_layers if stop is None else stop
        return model(x, start_at_layer=start, stop_at_layer=stop, past_kv_cache=cache, attention_mask=mask), cache

    def select_rows(self, state: State, rows: Tensor) -> State:
        from transformer_lens import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        entries = [TransformerLensKeyValueCacheEntry(e.past_keys[rows], e.past_values[rows]) for e in state.entries]
        return TransformerLensKeyValueCache(entries, state.previous_attention_mask[rows])

    def clean_run(self, model: HookedModel, tokens: Int[Tensor, "1 pos"], names: Collection[str]):
        """`run_blocks` where the hand-written blocks apply (no weight copies), else TransformerLens'."""
        if one_token_block_unsupported(model) is None:
            return run_blocks(model, tokens, names)
        return super().clean_run(model, tokens, names)

    def ig_cache_names(self, model: HookedModel) -> list[str]:
        return [f"blocks.{l}.hook_{name}" for l in range(model.cfg.n_layers) for name in ("resid_pre", "resid_mid")]

    def ig_stepper(self, model: HookedModel, tokens: Sequence[Int[Tensor, "1 _pos"]],
                   caches: Sequence[Any]) -> Stepper:
        """`OneTokenBlocks` where it applies, else `TLBlocks`."""
        cfg = transformer_cfg(model)
        if cfg.attention_dir != "causal" or cfg.positional_embedding_type == "shortformer":
            raise ValueError(f"the fast IG path continues a causal prefix one token at a time; this model has "
                             f"{cfg.attention_dir} attention and {cfg.positional_embedding_type} positions: "
                             "use method='reference'")
        if one_token_block_unsupported(model) is None:
            return OneTokenBlocks(model, caches)
        return TLBlocks(model, tokens, caches)

    def prune_weights(self, model: HookedModel, layer: int, idx: Tensor, values: Tensor | None = None) -> None:
        mlp = _mlp(transformer_block(model, layer))
        w, idx = mlp.W_out, idx.to(mlp.W_out.device)       # W_out: [d_mlp, d_model]
        with torch.no_grad():
            if values is not None:
                mlp.b_out.add_(values.to(w) @ w[idx])
            w[idx] = 0

    def neuron_direction(self, model: HookedModel, layer: int, idx: int) -> Tensor:
        """Row `idx` of the layer's `W_out`."""
        self.check_neuron(model, layer, idx)
        return _mlp(transformer_block(model, layer)).W_out[idx].detach()

def one_token_block_unsupported(model: HookedModel) -> str | None:
    """Why `OneTokenBlocks` cannot stand in for `model`'s blocks now (None: it can).

    It implements pre-norm blocks with any norm (also after attention and MLP, as Gemma has), standard
    or rotary positions (any base, local and global layers, sliding windows), grouped-query attention,
    per-head q/k norms, soft-capped scores, plain and gated MLPs; it fires every hook point of a block
    except `UNFIRED_HOOKS`.
    """
    from transformer_lens.components import MLP, Attention, GatedMLP, GroupedQueryAttention, TransformerBlock
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = transformer_cfg(model)
    blocks = [transformer_block(model, layer) for layer in range(cfg.n_layers)]
    if cfg.attn_only:
        return "attention-only blocks"
    hooked = [name for name, point in model.hook_dict.items()
              if name.startswith("blocks.") and any(part in name for part in UNFIRED_HOOKS) and point.has_hooks()]
    checks = [
        (any(type(b) is not TransformerBlock for b in blocks), "a block class other than TransformerBlock"),
        (any(type(b.attn) not in (Attention, GroupedQueryAttention) for b in blocks), "an attention class"),
        (any(type(b.mlp) not in (MLP, GatedMLP) for b in blocks) or cfg.is_layer_norm_activation(),
         "an MLP other than a plain or gated one"),
        (cfg.original_architecture in POST_NORM_ARCHITECTURES, "post-norm blocks"),
        (cfg.parallel_attn_mlp, "parallel attention and MLP"),
        (cfg.attention_dir != "causal", f"{cfg.attention_dir} attention"),
        (cfg.positional_embedding_type not in ("standard", "rotary"), f"{cfg.positional_embedding_type} positions"),
        (cfg.use_dynamic_ntk_rope, "dynamic NTK rotary scaling"),
        (cfg.use_yarn_rope and cfg.yarn_attention_factor != 1, "YaRN attention scaling"),
        (cfg.use_logn_attn, "log-n query scaling"),
        (cfg.clip_qkv is not None, "clipped queries, keys and values"),
        (cfg.use_attention_sinks, "attention sinks"),
        (any(b.attn.q_norm is not None for b in blocks) and not cfg.use_qk_norm, "q/k norms over all heads"),
        (cfg.n_key_value_heads is not None and cfg.ungroup_grouped_query_attention, "ungrouped key/value heads"),
        (cfg.load_in_4bit, "4-bit weights"),
        (bool(hooked), f"a hook on {hooked[0] if hooked else ''}"),
    ]
    return next((why for bad, why in checks if bad), None)


# ---------------------------------------------------------------- the hand-written blocks


def _packed_qkv(attn) -> tuple[Float[Tensor, "qkv d_model"], Float[Tensor, "qkv"]]:
    """W_Q, W_K, W_V (one entry per key/value head) as one nn.Linear weight, and their biases: a copy,
    made once per prompt (TransformerLens stores them per head, [heads, d_model, d_head], which has no
    2-D view, and copies them on every call)."""
    from transformer_lens.components import GroupedQueryAttention

    grouped = isinstance(attn, GroupedQueryAttention)
    weights = (attn.W_Q, attn._W_K, attn._W_V) if grouped else (attn.W_Q, attn.W_K, attn.W_V)
    biases = (attn.b_Q, attn._b_K, attn._b_V) if grouped else (attn.b_Q, attn.b_K, attn.b_V)
    return (torch.cat([w.permute(0, 2, 1).reshape(-1, w.shape[1]) for w in weights]),
            torch.cat([b.reshape(-1) for b in biases]))


def _heads(x: Float[Tensor, "batch pos hd"], d_head: int, norm) -> Float[Tensor, "batch pos heads d_head"]:
    """Split a projection into heads and apply the per-head q/k norm, if any."""
    x = x.reshape(*x.shape[:-1], -1, d_head)
    return x if norm is None else norm(x.reshape(-1, d_head)).reshape(x.shape)


def _qkv(attn, w: Tensor, b: Tensor, x: Float[Tensor, "batch pos d_model"]) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values [batch, pos, heads, d_head] from the packed projection, q/k normed."""
    cfg = attn.cfg
    n_q = cfg.n_heads * cfg.d_head
    n_kv = (w.shape[0] - n_q) // 2
    q, k, v = F.linear(x, w, b).split([n_q, n_kv, n_kv], -1)
    q_norm, k_norm = (attn.q_norm, attn.k_norm) if cfg.use_qk_norm else (None, None)
    return _heads(q, cfg.d_head, q_norm), _heads(k, cfg.d_head, k_norm), _heads(v, cfg.d_head, None)


def _in_window(attn, queries: Int[Tensor, "q"], keys: Int[Tensor, "k"]) -> Bool[Tensor, "q k"]:
    """TransformerLens' sliding window: the key positions each query position sees on a local layer."""
    if attn.attn_type != "local":
        return torch.ones(len(queries), len(keys), dtype=torch.bool)
    return keys[None] > queries[:, None] - attn.cfg.window_size


def _relative_keys(attn, k: Float[Tensor, "1 pos kv_heads d_head"], position: int) -> Float[Tensor, "1 pos kv_heads d_head"]:
    """Keys rotated by their position minus `position`: a query at `position` then needs no rotation
    (rotary scores depend on relative positions only), nor does its own key (the same rotation on both
    sides of a dot product cancels). TransformerLens' rotary first, then the inverse rotation at
    `position` from the same tables."""
    k = attn.apply_rotary(k, 0)
    dim = attn.cfg.rotary_dim
    cos, sin = attn.rotary_cos[position], attn.rotary_sin[position]
    back = k[..., :dim] * cos - attn.rotate_every_two(k[..., :dim]) * sin
    return torch.cat([back, k[..., dim:]], -1)


def _neurons(mlp, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_mlp"]:
    """The MLP's neurons (its `hook_post`): act(x W_gate) * (x W_in) + b_in, or act(x W_in + b_in)."""
    if mlp.cfg.gated_mlp:
        pre = mlp.hook_pre(F.linear(x, mlp.W_gate.T))
        return mlp.hook_post(mlp.act_fn(pre) * mlp.hook_pre_linear(F.linear(x, mlp.W_in.T)) + mlp.b_in)
    return mlp.hook_post(mlp.act_fn(mlp.hook_pre(F.linear(x, mlp.W_in.T, mlp.b_in))))


def _from_neurons(block, resid_mid: Float[Tensor, "batch pos d_model"],
                  post: Float[Tensor, "batch pos d_mlp"]) -> Float[Tensor, "batch pos d_model"]:
    """The block from its neurons on: `W_out`, the norm after the MLP (if any), the residual add."""
    out = F.linear(post, block.mlp.W_out.T, block.mlp.b_out)
    if block.cfg.use_normalization_before_and_after:
        out = block.ln2_post(out)
    return block.hook_resid_post(resid_mid + block.hook_mlp_out(out))


def _run_block(block, x: Float[Tensor, "batch pos d_model"], attention) -> Float[Tensor, "batch pos d_model"]:
    """TransformerLens' pre-norm block around `attention` (normalised input -> attention output), with
    the weights as stored, firing the block's hook points except `UNFIRED_HOOKS`."""
    cfg = block.cfg
    resid_pre = block.hook_resid_pre(x)
    attn_out = attention(block.ln1(resid_pre))
    if cfg.use_normalization_before_and_after:
        attn_out = block.ln1_post(attn_out)
    resid_mid = block.hook_resid_mid(resid_pre + block.hook_attn_out(attn_out))
    mlp_in = block.hook_mlp_in(resid_mid.clone()) if cfg.use_hook_mlp_in else resid_mid
    return _from_neurons(block, resid_mid, _neurons(block.mlp, block.ln2(mlp_in)))


def _causal_attention(attn, w: Tensor, b: Tensor, x: Float[Tensor, "1 pos d_model"]) -> Float[Tensor, "1 pos d_model"]:
    """Causal self-attention over one sequence (the clean run), grouped heads by reshaping."""
    from transformer_lens.utilities.activation_functions import apply_softcap

    cfg = attn.cfg
    q, k, v = _qkv(attn, w, b, x)
    if cfg.positional_embedding_type == "rotary":
        q, k = attn.apply_rotary(q, 0), attn.apply_rotary(k, 0)
    pos, heads, kv_heads = q.shape[1], q.shape[2], k.shape[2]
    q = q[0].reshape(pos, kv_heads, heads // kv_heads, cfg.d_head).permute(1, 2, 0, 3)   # [kv, group, pos, d]
    k, v = k[0].transpose(0, 1)[:, None], v[0].transpose(0, 1)[:, None]                 # [kv, 1, pos, d]
    scores = apply_softcap(q @ k.transpose(-1, -2) / attn.attn_scale, cfg.attn_scores_soft_cap)
    at = torch.arange(pos)
    visible = (at[None] <= at[:, None]) & _in_window(attn, at, at)
    pattern = scores.masked_fill(~visible.to(scores.device), float("-inf")).softmax(-1).to(v.dtype)
    z = (pattern @ v).permute(2, 0, 1, 3).reshape(1, pos, heads * cfg.d_head)
    return F.linear(z, attn.W_O.reshape(-1, cfg.d_model).T, attn.b_O)


def run_blocks(model: HookedModel, tokens: Int[Tensor, "1 pos"], names: Collection[str],
               ) -> tuple[Float[Tensor, "1 pos d_model"], dict[str, Tensor]]:
    """The clean run through the hand-written blocks (TransformerLens' embedding, then `_block` with
    causal attention): the last block's output and the activations at the hook points `names`.
    TransformerLens' own blocks copy their weight matrices on every call, half the time of a forward
    pass over a short prompt."""
    store: dict[str, Tensor] = {}
    with torch.no_grad(), model.hooks(fwd_hooks=[(lambda name: name in names, capture(store))]):
        x = model(tokens, stop_at_layer=0)
        for block in (transformer_block(model, layer) for layer in range(model.cfg.n_layers)):
            x = _run_block(block, x, partial(_causal_attention, block.attn, *_packed_qkv(block.attn)))
    return x, store


@dataclass(frozen=True)
class _Prefix:
    """One layer's attention state shared by every row: the packed projection and the prefix's keys."""

    w_qkv: Float[Tensor, "qkv d_model"]     # [(n_heads + 2 n_kv_heads) * d_head, d_model], nn.Linear layout
    b_qkv: Float[Tensor, "qkv"]
    keys: Float[Tensor, "prompts kv_heads prefix d_head"]      # normalised, rotated relative to the row
    values: Float[Tensor, "prompts kv_heads prefix d_head"]
    visible: Bool[Tensor, "prompts 1 1 prefix_plus_1"] | None   # keys a row sees, itself last (None: all)


class OneTokenBlocks:
    """TransformerLens blocks written out for one-token rows (see the module docstring).

    Same hook points as `TransformerBlock.forward` except `UNFIRED_HOOKS`; same arithmetic up to the
    order of rotations, so the rows equal TransformerLens' to rounding (tests compare them on tiny
    models of every configuration implemented).
    """

    def __init__(self, model: HookedModel, caches: Sequence[Any]):
        self.model, self.n_prompts = model, len(caches)
        layers = range(model.cfg.n_layers)
        self.resid_mid = [torch.cat([c[f"blocks.{l}.hook_resid_mid"][:, -1:] for c in caches]) for l in layers]
        clean = [[c[f"blocks.{l}.hook_resid_pre"][0] for c in caches] for l in layers]
        self.positions = [r.shape[0] - 1 for r in clean[0]]                  # of the rows: each prompt's last
        with torch.no_grad():
            self.prefix = [self._prefix(transformer_block(model, l), resid) for l, resid in zip(layers, clean)]

    def _prefix(self, block, clean: list[Float[Tensor, "_pos d_model"]]) -> _Prefix:
        """Pack the layer's q/k/v weights and compute each prompt's prefix keys and values once."""
        attn, width = block.attn, max(self.positions)
        w, b = _packed_qkv(attn)
        keys, values = [], []
        for resid, position in zip(clean, self.positions):
            _, k, v = _qkv(attn, w, b, block.ln1(resid[None]))             # every clean position
            if transformer_cfg(self.model).positional_embedding_type == "rotary":
                k = _relative_keys(attn, k, position)
            pad = (0, 0, 0, width - position)                               # prefix positions up to width
            keys.append(F.pad(k[0, :position].transpose(0, 1), pad))        # [kv_heads, width, d_head]
            values.append(F.pad(v[0, :position].transpose(0, 1), pad))
        return _Prefix(w, b, torch.stack(keys), torch.stack(values), self._visible(attn, width))

    def _visible(self, attn, width: int) -> Bool[Tensor, "prompts 1 1 prefix_plus_1"] | None:
        """Which prefix keys each prompt's rows see (padding and sliding windows hide some), then itself."""
        at = torch.arange(width)
        rows = torch.tensor(self.positions)
        seen = (at[None] < rows[:, None]) & _in_window(attn, rows, at)
        visible = torch.cat([seen, torch.ones(len(rows), 1, dtype=torch.bool)], 1)
        return None if bool(visible.all()) else visible[:, None, None].to(self.model.cfg.device)

    def step(self, layer: int, x: Float[Tensor, "rows 1 d_model"]) -> Float[Tensor, "rows 1 d_model"]:
        return _run_block(transformer_block(self.model, layer), x, partial(self._attention, layer))

    def enter(self, layer: int, neurons: Float[Tensor, "rows neurons"]) -> Float[Tensor, "rows 1 d_model"]:
        block = transformer_block(self.model, layer)
        post = _mlp(block).hook_post(neurons.to(self.model.cfg.dtype)[:, None])
        return _from_neurons(block, rows_per_prompt(self.resid_mid[layer], neurons.shape[0] // self.n_prompts), post)

    def _attention(self, layer: int, x: Float[Tensor, "rows 1 d_model"]) -> Float[Tensor, "rows 1 d_model"]:
        """One query per row against its prompt's prefix keys and its own key (no rotation: see
        `_relative_keys`)."""
        attn, p = transformer_block(self.model, layer).attn, self.prefix[layer]
        z = self._attend(attn, p, *_qkv(attn, p.w_qkv, p.b_qkv, x))         # [rows, n_heads * d_head]
        return F.linear(z[:, None], attn.W_O.reshape(-1, self.model.cfg.d_model).T, attn.b_O)

    def _attend(self, attn, p: _Prefix, q: Float[Tensor, "rows 1 heads d_head"],
                k: Float[Tensor, "rows 1 kv_heads d_head"], v: Float[Tensor, "rows 1 kv_heads d_head"],
                ) -> Float[Tensor, "rows heads_d_head"]:
        """Softmax attention of each query over its prompt's prefix and its own key; query heads are
        grouped by the key/value head they share (a reshape, no repeated keys)."""
        from transformer_lens.utilities.activation_functions import apply_softcap

        n, _, heads, d_head = q.shape
        prompts, kv_heads = p.keys.shape[:2]
        rows, group = n // prompts, heads // kv_heads
        q = q.reshape(prompts, rows, kv_heads, group, d_head)
        k = k.reshape(prompts, rows, kv_heads, 1, d_head)
        v = v.reshape(prompts, rows, kv_heads, d_head).transpose(1, 2)[..., None, :]   # [P, kv, rows, 1, d]
        to_prefix = q.transpose(1, 2).reshape(prompts, kv_heads, rows * group, d_head) @ p.keys.transpose(-1, -2)
        to_self = (q * k).sum(-1).transpose(1, 2).reshape(prompts, kv_heads, rows * group, 1)
        scores = apply_softcap(torch.cat([to_prefix, to_self], -1) / attn.attn_scale, attn.cfg.attn_scores_soft_cap)
        if p.visible is not None:
            scores = scores.masked_fill(~p.visible, float("-inf"))
        pattern = scores.softmax(-1).to(v.dtype)
        z = (pattern[..., :-1] @ p.values).reshape(prompts, kv_heads, rows, group, d_head)
        z = z + pattern[..., -1:].reshape(prompts, kv_heads, rows, group, 1) * v
        return z.permute(0, 2, 1, 3, 4).reshape(n, heads * d_head)


# ---------------------------------------------------------------- the fallback: TransformerLens' blocks


class TLBlocks:
    """TransformerLens' own blocks on a frozen key/value cache of each prompt's prefix, expanded to its
    rows: whatever TransformerLens runs, several times slower than `OneTokenBlocks`."""

    def __init__(self, model: HookedModel, tokens: Sequence[Int[Tensor, "1 _pos"]], caches: Sequence[Any]):
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        self.model, self.prefixes = model, []
        for t in tokens:
            prefix = TransformerLensKeyValueCache.init_cache(transformer_cfg(model), model.cfg.device, 1)
            with torch.no_grad():
                model(t[:, :-1], past_kv_cache=prefix, return_type=None)
            prefix.freeze()
            self.prefixes.append(prefix)
        self.resid_pre = [torch.cat([c[f"blocks.{l}.hook_resid_pre"][:, -1:] for c in caches])
                          for l in range(model.cfg.n_layers)]

    def step(self, layer: int, x: Float[Tensor, "rows 1 d_model"]) -> Float[Tensor, "rows 1 d_model"]:
        return torch.cat([self._block(layer, b, rows) for b, rows in enumerate(x.chunk(len(self.prefixes)))])

    def enter(self, layer: int, neurons: Float[Tensor, "rows neurons"]) -> Float[Tensor, "rows 1 d_model"]:
        parts = neurons.chunk(len(self.prefixes))
        return torch.cat([self._block(layer, b, self.resid_pre[layer][b:b + 1].expand(len(a), 1, -1), a)
                          for b, a in enumerate(parts)])

    def _block(self, layer: int, prompt: int, x: Tensor, neurons: Tensor | None = None) -> Tensor:
        """Block `layer` on rows of `prompt`; with `neurons`, those replace the neuron site's output
        before any other hook on it runs."""
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        entry, n, block = self.prefixes[prompt][layer], x.shape[0], transformer_block(self.model, layer)
        rows = TransformerLensKeyValueCacheEntry(entry.past_keys.expand(n, -1, -1, -1),
                                                 entry.past_values.expand(n, -1, -1, -1), frozen=True)
        if neurons is None:
            return block(x, past_kv_cache_entry=rows)
        handle = _mlp(block).hook_post.register_forward_hook(
            lambda module, inputs, out: neurons[:, None].to(out.dtype), prepend=True)
        try:
            return block(x, past_kv_cache_entry=rows)
        finally:
            handle.remove()
