"""Architectures: `arch_of(model)` is the only place that asks which class a model is.

Everything that differs between architectures lives in one module each (`transformer.py`,
`mamba.py`), behind the `Arch` interface of `base.py`. To add an architecture, subclass `Arch`,
register it in `arch_of`, and make `tests/test_arch_contract.py` pass for a tiny model of it
(see docs/architecture.md).
"""

from __future__ import annotations

from mechcopy.arch.base import Arch, Decoder, HookedModel, State, Stepper
from mechcopy.arch.mamba import MambaArch
from mechcopy.arch.transformer import TransformerArch

TRANSFORMER = TransformerArch()
MAMBA = MambaArch()


def arch_of(model: object) -> Arch:
    """The architecture of `model` (a HookedTransformer or a HookedMamba; anything else is refused here,
    in one line, so the parameter takes any object)."""
    # imported here: TransformerLens (and HookedMamba, built on it) take seconds to import, and every
    # command imports this package before it checks its flags
    from transformer_lens import HookedTransformer

    from mechcopy.models.mamba import HookedMamba

    if isinstance(model, HookedMamba):
        return MAMBA
    if isinstance(model, HookedTransformer):
        return TRANSFORMER
    raise TypeError(f"expected a hooked model (HookedTransformer or HookedMamba), got {type(model).__name__}; "
                    "load one with mechcopy.load_model")


__all__ = ["Arch", "Decoder", "HookedModel", "State", "Stepper", "arch_of", "TRANSFORMER", "MAMBA"]
