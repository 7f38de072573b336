"""What every architecture provides: the `HookedModel` protocol and the `Arch` interface.

An analysis never asks which class a model is. It asks `arch_of(model)` for the one object that
knows the architecture, and calls it: where the neurons are, which components patching can swap,
how to continue a prefix one token at a time, how to prune by editing weights. What both
architectures share (the forward tail: final norm, unembedding, logit soft cap, last position
only) lives here once.
"""

from __future__ import annotations

import numbers
from contextlib import AbstractContextManager
from typing import Any, Callable, Collection, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import ActivationCache

#: activations by hook point name: TransformerLens' `ActivationCache` (not a `Mapping`) or a plain mapping
Cache = ActivationCache | Mapping[str, Tensor]


@runtime_checkable
class ModelConfig(Protocol):
    """What every hooked model's `cfg` holds and mechcopy reads whatever the architecture
    (`HookedTransformerConfig`, `MambaConfig`). Fields of one architecture only (a transformer's heads,
    Mamba's conv width) are read by that architecture's own code (`arch/`), or asked of it
    (`Arch.attention_shape`)."""

    @property
    def n_layers(self) -> int: ...

    @property
    def d_model(self) -> int: ...

    @property
    def d_vocab(self) -> int: ...

    @property
    def n_ctx(self) -> int: ...

    @property
    def device(self) -> Any: ...          # str, torch.device or None

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def model_name(self) -> str: ...


@runtime_checkable
class Tokenizer(Protocol):
    """The tokenizer a hooked model carries (a Hugging Face tokenizer), as far as mechcopy uses it."""

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def eos_token_id(self) -> int | None: ...

    @property
    def pad_token_id(self) -> int | None: ...

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any: ...

    def decode(self, token_ids: Any, *args: Any, **kwargs: Any) -> str: ...


@runtime_checkable
class Unembedding(Protocol):
    """The unembedding: logits = resid @ W_U + b_U."""

    @property
    def W_U(self) -> Tensor: ...

    @property
    def b_U(self) -> Tensor: ...


@runtime_checkable
class HookedModel(Protocol):
    """A TransformerLens-style hooked language model: `HookedTransformer` or `HookedMamba`.

    Both take tokens or (with `start_at_layer`) the residual stream, stop early with
    `stop_at_layer`, expose hook points by name, and tokenise text the same way. What a block holds
    differs by architecture: only `arch/` (and a component kind that needs it) reaches into `blocks`.
    """

    @property
    def cfg(self) -> ModelConfig: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def blocks(self) -> nn.ModuleList: ...

    @property
    def ln_final(self) -> nn.Module: ...

    @property
    def unembed(self) -> Unembedding: ...

    @property
    def hook_dict(self) -> dict[str, Any]: ...

    def __call__(self, input: Any, *args: Any, **kwargs: Any) -> Any: ...

    def run_with_cache(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]: ...

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def hooks(self, fwd_hooks: Any = ..., bwd_hooks: Any = ..., reset_hooks_end: bool = ...,
              clear_contexts: bool = ...) -> AbstractContextManager: ...

    def to_tokens(self, input: Any, *args: Any, **kwargs: Any) -> Tensor: ...

    def to_str_tokens(self, input: Any, *args: Any, **kwargs: Any) -> Any: ...

    def to_string(self, tokens: Any) -> Any: ...

    def parameters(self, recurse: bool = ...) -> Iterator[nn.Parameter]: ...

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def eval(self) -> Any: ...

    def train(self, mode: bool = ...) -> Any: ...


#: `decode(tokens, mask=None)`: logits at the last position of every row, continuing what earlier
#: calls saw (`mask`: 1 = token, 0 = left padding; only the first call may pad).
Decoder = Callable[..., Float[Tensor, "rows d_vocab"]]
#: what a decoder carries between calls: a key/value cache, or a recurrent state
State = Any
@runtime_checkable
class Stepper(Protocol):
    """Blocks for one-token rows at the last position of some prompts, continuing each prompt's clean
    prefix (the fast IG path). Rows are grouped by prompt: with P prompts and n rows, row i belongs to
    prompt i // (n // P). Everything at earlier positions, and everything not computed from a row, is
    the clean run's."""

    def enter(self, layer: int, neurons: Float[Tensor, "rows neurons"]) -> Float[Tensor, "rows 1 d_model"]:
        """Block `layer` from its neuron site on, for rows whose neurons there are `neurons`
        (the neuron site's hook point fires on them); the rest of the block is clean."""
        ...

    def step(self, layer: int, x: Float[Tensor, "rows 1 d_model"]) -> Float[Tensor, "rows 1 d_model"]:
        """Block `layer` applied to rows whose residual stream entering it is `x`."""
        ...


def _unembed(model: HookedModel, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """`model.unembed(resid)` with `W_U` used as stored (TransformerLens' `Unembed` copies it on every
    call: 670 MB on Gemma 3, more time than the matmul); its hook points fire where it has them."""
    unembed = model.unembed
    hook_in, hook_out = (getattr(unembed, name, lambda x: x) for name in ("hook_in", "hook_out"))
    return hook_out(F.linear(hook_in(resid), unembed.W_U.T, unembed.b_U))


def rows_per_prompt(x: Float[Tensor, "prompts *shape"], rows: int) -> Float[Tensor, "prompts_rows *shape"]:
    """Each prompt's entry of `x` repeated for its `rows` consecutive rows (a view for one prompt)."""
    return x[:, None].expand(x.shape[0], rows, *x.shape[1:]).reshape(-1, *x.shape[1:])


class Arch:
    """The architecture-specific half of every analysis. Subclasses fill in the class attributes
    and the methods that raise NotImplementedError; the rest is shared."""

    name: str = ""
    #: hook name of layer l's neurons, with `{layer}`
    neuron_template: str = ""
    #: patching component -> hook-name template with `{layer}`
    components: Mapping[str, str] = {}
    #: attention patterns exist (circuitsvis attention views)
    has_attention: bool = False
    #: `transformer_lens.patching` works on it
    tl_patching: bool = False

    # -- sites -------------------------------------------------------------------------------------

    def neuron_site(self, model: HookedModel, layer: int) -> str:
        n = model.cfg.n_layers
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"layer must be an integer, got {type(layer).__name__} {layer!r}")
        if not 0 <= layer < n:
            raise IndexError(f"layer {layer!r} out of range: the model has {n} layers (0..{n - 1})")
        return self.neuron_template.format(layer=int(layer))

    def neurons_per_layer(self, model: HookedModel) -> int:
        raise NotImplementedError

    def attention_shape(self, model: HookedModel) -> tuple[int, int]:
        """(query heads per layer, d_head); a ValueError that says so on a model without attention."""
        raise ValueError(f"a {self.name} model has no attention")

    def architecture_name(self, model: HookedModel) -> str:
        """The name a neuron file records (and is checked against)."""
        raise NotImplementedError

    # -- context ------------------------------------------------------------------------------------

    def context_limit(self, model: HookedModel) -> int | None:
        """The most tokens the model can read (positional embeddings), or None where there is no limit."""
        return int(model.cfg.n_ctx)

    def tokens(self, model: HookedModel, text: str, extra: int = 0, what: str = "the prompt") -> Int[Tensor, "1 pos"]:
        """`text` as tokens [1, pos], refusing text that, with `extra` tokens to generate, exceeds the
        context. `model.to_tokens` would silently cut it to the context and drop the query."""
        tokens = model.to_tokens(text, truncate=False)
        limit = self.context_limit(model)
        if limit is not None and tokens.shape[1] + extra > limit:
            plus = f" (+{extra} to generate)" if extra else ""
            raise ValueError(f"{what} has {tokens.shape[1]} tokens{plus}, more than the model's context of "
                             f"{limit}; use fewer shots or shorter pairs")
        return tokens

    def str_tokens(self, model: HookedModel, text: str) -> list[str]:
        """The tokens `model` reads for `text` (`tokens`), as strings. TransformerLens' `to_str_tokens`
        on a string fails on Gemma's tokenizer (a batch axis added twice); on the token ids it works."""
        return list(model.to_str_tokens(self.tokens(model, text)[0]))

    # -- the forward tail --------------------------------------------------------------------------

    def final_logits(self, model: HookedModel, resid: Float[Tensor, "... d_model"],
                     rows: Sequence[int] | None = None) -> Float[Tensor, "... vocab"]:
        """Final norm, unembedding (only vocabulary `rows` if given) and the logit soft cap.

        With `rows` the unembedding runs in at least float32 (a few columns: cheap), so a target read
        from a bfloat16 model is not rounded to bfloat16's 8 bits.
        """
        from transformer_lens.utilities.activation_functions import apply_softcap

        if getattr(model.cfg, "normalization_type", None) is not None:
            resid = model.ln_final(resid)
        if rows is None:
            logits = _unembed(model, resid)
        else:
            rows = list(rows)
            dtype = torch.promote_types(resid.dtype, torch.float32)
            logits = resid.to(dtype) @ model.unembed.W_U[:, rows].to(dtype) + model.unembed.b_U[rows].to(dtype)
        return apply_softcap(logits, getattr(model.cfg, "output_logits_soft_cap", None))

    def last_logits(self, model: HookedModel, x: Tensor, start_at_layer: int | None = None,
                    ) -> Float[Tensor, "batch d_vocab"]:
        """Logits at the last position only (`x`: tokens, or the residual stream entering block
        `start_at_layer`). Every hook point still runs; only the unembedding is cut to one position."""
        resid = model(x, start_at_layer=start_at_layer, stop_at_layer=model.cfg.n_layers)
        return self.final_logits(model, resid[:, -1:])[:, -1]

    # -- architecture-specific machinery -----------------------------------------------------------

    def decoder(self, model: HookedModel, groups: int = 1, fork_at: int = 0) -> Decoder:
        """An incremental decoder: the first call takes the prompts (left-padded, with their mask),
        later calls one new token per row; each returns the last position's logits.

        With `groups` > 1 the prompts run once through blocks [0, fork_at), then fork: the residual
        stream and the state are repeated once per row group (group-major: row g * batch + i is
        prompt i in group g), so a hook on block `fork_at` or later can treat each group differently,
        e.g. one pruning condition per group, all in one pass. The first call returns, and later
        calls take, groups * batch rows.
        """
        state = None

        def decode(tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"] | None = None
                   ) -> Float[Tensor, "rows d_vocab"]:
            nonlocal state
            if state is not None:
                resid, state = self.run_blocks(model, tokens, mask, state)
            else:
                resid, state = self.run_blocks(model, tokens, mask, None, stop=fork_at)
                rows = torch.arange(tokens.shape[0], device=resid.device).repeat(groups)
                resid, state = self.run_blocks(model, resid[rows], None if mask is None else mask[rows],
                                               self.select_rows(state, rows), start=fork_at)
            return self.final_logits(model, resid[:, -1:])[:, -1]

        return decode

    def run_blocks(self, model: HookedModel, x: Tensor, mask: Int[Tensor, "batch pos"] | None, state: State,
                   start: int | None = None, stop: int | None = None) -> tuple[Float[Tensor, "batch pos d_model"], State]:
        """Blocks [start, stop) (default: all) on new positions: `x` is tokens, or with `start` the
        residual stream entering block `start` (whose cache or state must not hold a position yet);
        `mask` marks left padding (None: none); `state` is what earlier calls left (None: empty).
        Returns the residual stream after block stop - 1 and the updated state."""
        raise NotImplementedError

    def select_rows(self, state: State, rows: Int[Tensor, "rows"]) -> State:
        """The state of batch rows `rows` (repeats allowed: a fork repeats every row)."""
        raise NotImplementedError

    def clean_run(self, model: HookedModel, tokens: Int[Tensor, "1 pos"], names: Collection[str],
                  ) -> tuple[Float[Tensor, "1 pos d_model"], Mapping[str, Tensor] | ActivationCache]:
        """One forward pass of `tokens` to the last block's output, with the activations at the hook
        points `names` (no gradient; TransformerLens' `ActivationCache` or a plain mapping)."""
        with torch.no_grad():
            return model.run_with_cache(tokens, stop_at_layer=model.cfg.n_layers, names_filter=lambda n: n in names)

    def ig_cache_names(self, model: HookedModel) -> list[str]:
        """Hook points `ig_stepper` reads from each prompt's clean run."""
        raise NotImplementedError

    def ig_stepper(self, model: HookedModel, tokens: Sequence[Int[Tensor, "1 _pos"]],
                   caches: Sequence[Any]) -> Stepper:
        """Blocks for one-token rows at the last position of each of `tokens` (one prompt each), whose
        clean runs cached at least `ig_cache_names(model)` in `caches` (the fast IG path)."""
        raise NotImplementedError

    def prune_weights(self, model: HookedModel, layer: int, idx: Tensor, values: Tensor | None = None) -> None:
        """Zero the weights that read neurons `idx` of `layer` (a permanent pruning); with `values` (one
        per index: their mean activations), add what those values write to the output bias instead of
        losing it (a permanent mean ablation)."""
        raise NotImplementedError

    def neuron_direction(self, model: HookedModel, layer: int, idx: int) -> Float[Tensor, "d_model"]:
        """What neuron `idx` of `layer` writes into the residual stream per unit of activation: zeroing
        the neuron changes the block's output by exactly activation x direction."""
        raise NotImplementedError

    def check_neuron(self, model: HookedModel, layer: int, idx: int) -> None:
        """Raise IndexError unless (layer, idx) is a neuron of `model`."""
        self.neuron_site(model, layer)
        width = self.neurons_per_layer(model)
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < width:
            raise IndexError(f"neuron index {idx!r} out of range: layer {layer} has {width} neurons (0..{width - 1})")

    def __repr__(self) -> str:
        return f"<arch {self.name}>"

