"""`HookedMamba`: neurons at `blocks.{l}.mixer.hook_gated` (y*SiLU(z), the input to `out_proj`, d_inner
channels); the recurrent state (conv window and SSM state) continues a prefix for decoding and for
the fast IG path."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence, cast

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mechcopy.arch.base import Arch, HookedModel, State, Stepper, rows_per_prompt

if TYPE_CHECKING:
    from mechcopy.models.mamba import MambaBlock, MambaConfig


def _block(model: HookedModel, layer: int) -> MambaBlock:
    """Block `layer` as what it is on a Mamba (`mechcopy.models.mamba.MambaBlock`)."""
    return cast("MambaBlock", model.blocks[layer])


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
        return int(cast("MambaConfig", model.cfg).d_inner)

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

    def ig_cache_names(self, model: HookedModel) -> list[str]:
        return [f"blocks.{l}.{name}" for l in range(model.cfg.n_layers)
                for name in ("hook_resid_pre", "mixer.hook_x", "mixer.hook_ssm_state")]

    def ig_stepper(self, model: HookedModel, tokens: Sequence[Int[Tensor, "1 _pos"]],
                   caches: Sequence[Any]) -> Stepper:
        return MambaRows(model, caches)

    def prune_weights(self, model: HookedModel, layer: int, idx: Tensor, values: Tensor | None = None) -> None:
        proj = _block(model, layer).mixer.out_proj
        w, idx = proj.weight, idx.to(proj.weight.device)   # [d_model, d_inner]
        with torch.no_grad():
            if values is not None:
                if proj.bias is None:
                    raise ValueError("mean ablation as a weight edit needs a bias in out_proj, and this Mamba has "
                                     "none (use_bias=False); mean-ablate with hooks instead (pruning.pruning_hooks)")
                proj.bias.add_(w[:, idx] @ values.to(w))
            w[:, idx] = 0

    def neuron_direction(self, model: HookedModel, layer: int, idx: int) -> Tensor:
        """Column `idx` of the layer's `out_proj`."""
        self.check_neuron(model, layer, idx)
        return _block(model, layer).mixer.out_proj.weight[:, idx].detach()

class MambaRows:
    """One recurrent step per row from its prompt's state after the prefix: the conv window (the last
    d_conv - 1 inputs of the conv, `hook_x`) and the SSM state (`hook_ssm_state` before the last
    position), both read from the clean run's cache."""

    def __init__(self, model: HookedModel, caches: Sequence[Any]):
        self.model, self.n_prompts = model, len(caches)
        layers = range(model.cfg.n_layers)
        self.resid_pre = [torch.cat([c[f"blocks.{l}.hook_resid_pre"][:, -1:] for c in caches]) for l in layers]
        self.conv = [torch.cat([self._window(c[f"blocks.{l}.mixer.hook_x"]) for c in caches]) for l in layers]
        self.ssm = [torch.cat([self._state(c[f"blocks.{l}.mixer.hook_ssm_state"]) for c in caches]) for l in layers]

    def _window(self, x: Float[Tensor, "1 pos d_inner"]) -> Float[Tensor, "1 d_inner d_conv_minus_1"]:
        """The conv inputs before the last position, zero-padded on the left as the mixer starts."""
        keep = cast("MambaConfig", self.model.cfg).d_conv - 1
        prefix = F.pad(x[:, :-1].transpose(1, 2), (keep, 0))
        return prefix[..., prefix.shape[-1] - keep:]

    @staticmethod
    def _state(states: Float[Tensor, "1 pos d_inner d_state"]) -> Float[Tensor, "1 d_inner d_state"]:
        """The SSM state after the prefix (zero for an empty prefix)."""
        return states[:, -2] if states.shape[1] > 1 else torch.zeros_like(states[:, 0])

    def step(self, layer: int, x: Float[Tensor, "rows 1 d_model"]) -> Float[Tensor, "rows 1 d_model"]:
        rows = x.shape[0] // self.n_prompts
        conv, ssm = rows_per_prompt(self.conv[layer], rows), rows_per_prompt(self.ssm[layer], rows)
        return _block(self.model, layer)(x, conv, ssm, False)

    def enter(self, layer: int, neurons: Float[Tensor, "rows neurons"]) -> Float[Tensor, "rows 1 d_model"]:
        block = _block(self.model, layer)
        mixer = block.mixer
        out = mixer.hook_out(mixer.out_proj(mixer.hook_gated(neurons.to(self.model.cfg.dtype)[:, None])))
        resid = rows_per_prompt(self.resid_pre[layer], neurons.shape[0] // self.n_prompts)
        return block.hook_resid_post(resid + out)
