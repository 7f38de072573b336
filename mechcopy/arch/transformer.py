"""TransformerLens `HookedTransformer`: neurons at `blocks.{l}.mlp.hook_post` (for gated MLPs
act(gate)*up, the input to `W_out`), a key/value cache for decoding and for the fast IG path."""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from mechcopy.arch.base import Arch, HookedModel, State, Stepper


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
        return int(model.cfg.d_mlp)

    def architecture_name(self, model: HookedModel) -> str:
        return model.cfg.original_architecture or "transformer"

    def run_blocks(self, model: HookedModel, x: Tensor, mask: Tensor | None, state: State, start: int | None = None,
                   stop: int | None = None) -> tuple[Tensor, State]:
        """A key/value cache continues the prefix. TransformerLens masks the padding and counts each
        row's rotary positions from its first token; the mask is always given, as without one it
        would guess padding from pad-token ids in the input."""
        from transformer_lens import TransformerLensKeyValueCache

        cache = state if state is not None else TransformerLensKeyValueCache.init_cache(
            model.cfg, model.cfg.device, x.shape[0])
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        stop = model.cfg.n_layers if stop is None else stop
        return model(x, start_at_layer=start, stop_at_layer=stop, past_kv_cache=cache, attention_mask=mask), cache

    def select_rows(self, state: State, rows: Tensor) -> State:
        from transformer_lens import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        entries = [TransformerLensKeyValueCacheEntry(e.past_keys[rows], e.past_values[rows]) for e in state.entries]
        return TransformerLensKeyValueCache(entries, state.previous_attention_mask[rows])

    def ig_stepper(self, model: HookedModel, tokens: Int[Tensor, "1 pos"]) -> Stepper:
        """One-token rows attending to the clean prefix's frozen keys and values."""
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        prefix = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
        with torch.no_grad():
            model(tokens[:, :-1], past_kv_cache=prefix, return_type=None)
        prefix.freeze()

        def step(layer: int, x: Tensor) -> Tensor:
            entry, n = prefix[layer], x.shape[0]
            rows_entry = TransformerLensKeyValueCacheEntry(
                entry.past_keys.expand(n, -1, -1, -1), entry.past_values.expand(n, -1, -1, -1), frozen=True)
            return model.blocks[layer](x, past_kv_cache_entry=rows_entry)

        return step

    def prune_weights(self, model: HookedModel, layer: int, idx: Tensor) -> None:
        w = model.blocks[layer].mlp.W_out                  # [d_mlp, d_model]
        with torch.no_grad():
            w[idx.to(w.device)] = 0

    def neuron_direction(self, model: HookedModel, layer: int, idx: int) -> Tensor:
        """Row `idx` of the layer's `W_out`."""
        self.check_neuron(model, layer, idx)
        return model.blocks[layer].mlp.W_out[idx].detach()
