"""`HookedMamba`: neurons at `blocks.{l}.mixer.hook_gated` (y*SiLU(z), the input to `out_proj`, d_inner
channels); the recurrent state (conv window and SSM state) continues a prefix for decoding and for
the fast IG path."""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from mechcopy.arch.base import Arch, HookedModel, State, Stepper


class MambaArch(Arch):
    name = "mamba"
    neuron_template = "blocks.{layer}.mixer.hook_gated"
    components = {
        "resid_pre": "blocks.{layer}.hook_resid_pre",
        "mixer_out": "blocks.{layer}.mixer.hook_out",
    }
    has_attention = False
    tl_patching = False

    def neurons_per_layer(self, model: HookedModel) -> int:
        return int(model.cfg.d_inner)

    def architecture_name(self, model: HookedModel) -> str:
        return "mamba"

    def context_limit(self, model: HookedModel) -> int | None:
        """None: a recurrent state has no context limit (`cfg.n_ctx` is nominal)."""
        return None

    def run_blocks(self, model: HookedModel, x: Tensor, mask: Tensor | None, state: State, start: int | None = None,
                   stop: int | None = None) -> tuple[Tensor, State]:
        """The recurrent state continues the prefix; HookedMamba keeps left padding out of it."""
        stop = model.cfg.n_layers if stop is None else stop
        return model(x, start_at_layer=start, stop_at_layer=stop, state=state, return_state=True, attention_mask=mask)

    def select_rows(self, state: State, rows: Tensor) -> State:
        return state.index(rows)

    def ig_stepper(self, model: HookedModel, tokens: Int[Tensor, "1 pos"]) -> Stepper:
        """One-token rows continuing the clean prefix's conv window and SSM state."""
        with torch.no_grad():
            _, state = model(tokens[:, :-1], return_type=None, return_state=True)

        def step(layer: int, x: Tensor) -> Tensor:
            n = x.shape[0]
            conv = state.conv[layer].expand(n, -1, -1).contiguous()
            ssm = state.ssm[layer].expand(n, -1, -1).contiguous()
            return model.blocks[layer](x, conv, ssm, False)

        return step

    def prune_weights(self, model: HookedModel, layer: int, idx: Tensor) -> None:
        w = model.blocks[layer].mixer.out_proj.weight      # [d_model, d_inner]
        with torch.no_grad():
            w[:, idx.to(w.device)] = 0

    def neuron_direction(self, model: HookedModel, layer: int, idx: int) -> Tensor:
        """Column `idx` of the layer's `out_proj`."""
        self.check_neuron(model, layer, idx)
        return model.blocks[layer].mixer.out_proj.weight[:, idx].detach()
