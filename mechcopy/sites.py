"""Where the "neurons" live in each architecture, by hook name.

Transformer neurons are `blocks.{l}.mlp.hook_post` (for gated MLPs act(gate)*up, the input to
W_out). Mamba neurons are the gated SSM output y*SiLU(z), the input to `out_proj`, which
HookedMamba exposes as `blocks.{l}.mixer.hook_gated`. Every analysis goes through `neuron_site`
and `neurons_per_layer`, so it runs unchanged on both (`mechcopy.arch` holds the per-architecture
names).
"""

from __future__ import annotations

from mechcopy.arch import HookedModel, arch_of


def neuron_site(model: HookedModel, layer: int) -> str:
    """The hook name of layer `layer`'s neurons for this model's architecture."""
    return arch_of(model).neuron_site(model, layer)


def neurons_per_layer(model: HookedModel) -> int:
    return arch_of(model).neurons_per_layer(model)


def components(model: HookedModel) -> dict[str, str]:
    """Patching component name -> hook-name template (with `{layer}`) for this model's architecture."""
    return dict(arch_of(model).components)
