"""Tiny random models for tests: a character-level tokenizer and a small gated HookedTransformer."""

from __future__ import annotations

import string
from functools import lru_cache
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mechcopy.models.zoo import cache_root

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARS = tuple(sorted(set(string.printable) - set("\t\r\x0b\x0c")))


@lru_cache(maxsize=1)
def char_tokenizer_dir() -> Path:
    """Write the character tokenizer once to the cache (TransformerLens re-loads tokenizers by path)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    folder = cache_root() / "tiny-char-tokenizer"
    if not (folder / "tokenizer.json").exists():
        vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
        tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        tk.decoder = decoders.Fuse()
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                      pad_token="<pad>", unk_token="<unk>")
        tok.save_pretrained(folder)
    return folder


def char_tokenizer():
    """A character-level tokenizer: every printable ASCII character is one token."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(char_tokenizer_dir(), trust_remote_code=False)


def tiny_transformer(
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    d_mlp: int = 64,
    gated: bool = True,
    seed: int = 0,
    n_ctx: int = 512,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    **config,
) -> HookedTransformer:
    """A small random Llama-style HookedTransformer (RMSNorm, rotary, gated SiLU MLP) for tests.

    `config` overrides or adds HookedTransformerConfig fields (e.g. `n_key_value_heads=2`, or the
    options of another family, such as Gemma's `use_normalization_before_and_after=True`).
    """
    tok = char_tokenizer()
    fields = dict(
        model_name=f"tiny-transformer-l{n_layers}-d{d_model}-s{seed}",
        n_layers=n_layers, d_model=d_model, n_ctx=n_ctx, d_head=d_model // n_heads, n_heads=n_heads,
        d_mlp=d_mlp, d_vocab=len(tok), act_fn="silu" if gated else "gelu", gated_mlp=gated,
        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=d_model // n_heads,
        seed=seed, device=device, dtype=dtype, original_architecture="tiny",
        init_weights=True, initializer_range=0.5 / d_model**0.5,
    )
    model = HookedTransformer(HookedTransformerConfig(**{**fields, **config}), tokenizer=tok,
                              default_padding_side="left")
    model.eval()
    return model
