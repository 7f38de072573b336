"""`load_model`: one entry point for zoo names, local HF folders, official names and tiny models."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mechcopy.errors import UnknownName
from mechcopy.models import zoo

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

# TransformerLens is imported where a model is built: importing it takes seconds, and a command
# refuses bad input before that.


def _hooked_from_hf_dir(
    path: Path, name: str, device: str | None, dtype: torch.dtype, tl_name: str | None = None
) -> HookedTransformer:
    """Build a HookedTransformer from a local Hugging Face folder without touching any hub.

    TransformerLens' own config and weight converters do the work; the tokenizer is loaded from
    the same folder so that TransformerLens never re-fetches it by name. `tl_name` names a
    TransformerLens model whose config TransformerLens builds by name (Gemma 3, which it does not
    infer from a config.json); the sizes are checked against the folder's config either way.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as tl_loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = path.resolve()
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    cfg_dict = tl_loading.convert_hf_model_config(tl_name, trust_remote_code=False) if tl_name else _tl_config(path)
    cfg_dict.update(
        model_name=name,
        original_architecture=_architecture(hf_model.config, path),
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        dtype=dtype,
        tokenizer_name=str(path),
    )
    # convert_hf_model_config infers the config from the folder's config.json; check the sizes
    # that matter against the HF model so a name-based guess inside TransformerLens cannot slip by.
    hc = hf_model.config
    for key, hf_val in [("n_layers", hc.num_hidden_layers), ("d_model", hc.hidden_size),
                        ("d_mlp", hc.intermediate_size), ("d_vocab", hc.vocab_size)]:
        if cfg_dict[key] != hf_val:
            raise ValueError(f"config mismatch for {name}: {key}={cfg_dict[key]} vs HF {hf_val}")
    cfg = HookedTransformerConfig(**cfg_dict)
    state_dict = tl_loading.get_pretrained_state_dict(tl_name or str(path), cfg, hf_model=hf_model, dtype=torch.float32)
    del hf_model
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="left")
    # Logits stay equal to the HF model's: fold norms (exact), but do not centre the unembedding.
    model.load_and_process_state_dict(
        state_dict, fold_ln=True, center_writing_weights=False, center_unembed=False,
        fold_value_biases=True,
    )
    model.to(cfg.device or "cpu")
    model.to(dtype)
    model.eval()
    return store_as_read(model)


def store_as_read(model: HookedTransformer) -> HookedTransformer:
    """Store the weights in the memory layout TransformerLens 3.9 reads them in; returns `model`.

    Its forward transposes the gated MLP's W_gate, W_in, W_out, the unembedding W_U and the attention
    W_Q, W_K, W_V, W_O and copies them (`.contiguous()`, `rearrange`) on every call: about half of
    the evaluator's time on SmolLM2, most of a one-token decoding step. Stored as their transposes'
    views, those copies become no-ops. The values do not change and every matmul receives the same
    contiguous operand as before, so outputs are bitwise equal (tests/test_models.py).
    """
    # parameters reached as module attributes, which torch types `Tensor | Module`
    reads: list[tuple[Any, tuple[int, ...]]] = [(model.unembed.W_U, (1, 0))]
    for block in model.blocks:
        if model.cfg.gated_mlp:
            reads += [(block.mlp.W_gate, (1, 0)), (block.mlp.W_in, (1, 0)), (block.mlp.W_out, (1, 0))]
        if not (model.cfg.use_split_qkv_input or model.cfg.use_attn_in):
            params = block.attn._parameters
            reads += [(params[n], (0, 2, 1)) for n in ("W_Q", "W_K", "W_V", "_W_K", "_W_V") if n in params]
            reads.append((block.attn.W_O, (2, 0, 1)))
    with torch.no_grad():
        for param, order in reads:
            back = sorted(range(len(order)), key=order.__getitem__)
            param.data = param.data.permute(*order).contiguous().permute(*back)
    return model


def _architecture(config: Any, path: Path) -> str:
    """The model class a Hugging Face config names (its first `architectures` entry)."""
    if not config.architectures:
        raise ValueError(f"{path}/config.json names no architectures: add \"architectures\": [\"<ModelClass>\"] "
                         "as Hugging Face writes it")
    return config.architectures[0]


def _tl_config(path: Path) -> dict:
    """TransformerLens' config of a local folder, read from its config.json alone.

    TransformerLens guesses the architecture from the name when it contains "llama" or "gemma" and
    then fails on a folder such as ~/models/tiny-llama; a copy of config.json in a neutrally named
    temporary folder makes it read the file instead.
    """
    import shutil
    import tempfile

    from transformer_lens import loading_from_pretrained as tl_loading

    with tempfile.TemporaryDirectory(prefix="mechcopy-config-") as tmp:
        shutil.copy(path / "config.json", Path(tmp) / "config.json")
        return tl_loading.convert_hf_model_config(tmp, trust_remote_code=False)


def load_model(name: str | Path = zoo.DEFAULT_MODEL, device: str | None = None, dtype: torch.dtype | None = None):
    """Load a model as a hooked model (HookedTransformer, or HookedMamba for Mamba checkpoints).

    `name` is a zoo name (see `mechcopy models`), a local Hugging Face model folder, the name of a
    mechcopy model-organism folder, or a TransformerLens official name (needs the hub or a filled HF
    cache). Tiny random models for tests come from `mechcopy.models.tiny`. Code shipped inside a
    model folder is never run (`trust_remote_code=False`).
    """
    if not isinstance(name, (str, Path)):
        raise TypeError(f"load_model expects a model name or folder (str or Path), got {type(name).__name__} {name!r}")
    if not str(name).strip():
        raise ValueError(f"empty model name; known zoo models: {', '.join(zoo.ZOO)} (default {zoo.DEFAULT_MODEL})")
    dtype = dtype or torch.float32
    name = str(name)
    if name in zoo.ZOO:
        folder = zoo.fetch(name)
        return _hooked_from_hf_dir(folder, name, device, dtype, zoo.ZOO[name].tl_name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is a folder but has no config.json (not a Hugging Face model folder)")
        model_type = _json(path / "config.json").get("model_type", "")
        if model_type == "mamba":
            from mechcopy.models.mamba import HookedMamba

            return HookedMamba.from_pretrained(path, device=device, dtype=dtype)
        return _hooked_from_hf_dir(path, path.name, device, dtype)
    if path.exists() or _looks_like_path(name):
        raise FileNotFoundError(f"model folder {name} " + ("is not a folder" if path.exists() else "does not exist"))
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES, MODEL_ALIASES

    known_tl = set(OFFICIAL_MODEL_NAMES) | {a for aliases in MODEL_ALIASES.values() for a in aliases}
    if name in known_tl:
        logging.info("loading %s through TransformerLens (needs the hub or a filled HF cache)", name)
        return store_as_read(HookedTransformer.from_pretrained(name, device=device, dtype=dtype))
    raise UnknownName(
        f"unknown model {name!r}: not a zoo model ({', '.join(zoo.ZOO)}; default {zoo.DEFAULT_MODEL}), "
        "not a model folder, not a TransformerLens official name."
    )


def _looks_like_path(name: str) -> bool:
    """A name written as a path (./x, ~/x, /x, a/b/c, x/) names a folder, never a zoo or hub model."""
    return name.startswith((".", "~", "/")) or name.endswith("/") or name.count("/") > 1


def _json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())
