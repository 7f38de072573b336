"""`load_model`: one entry point for zoo names, local HF folders, official names and tiny models."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from mechcopy.errors import UnknownName, check_device, check_dtype
from mechcopy.models import zoo
from mechcopy.models.processed import Processed, load_processed
from mechcopy.progress import library_bars

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

# TransformerLens is imported where a model is built: importing it takes seconds, and a command
# refuses bad input before that.


#: TransformerLens' processing of loaded weights. Logits stay equal to the HF model's: fold norms
#: (exact), but do not centre the writing weights or the unembedding.
PROCESSING = {"fold_ln": True, "center_writing_weights": False, "center_unembed": False,
              "fold_value_biases": True}
#: config fields that belong to one load (its name, device, dtype, tokenizer), not to the stored weights
PER_LOAD = ("model_name", "device", "dtype", "tokenizer_name", "tokenizer_prepends_bos")


def _hooked_from_hf_dir(
    path: Path, name: str, device: str | None, dtype: torch.dtype, tl_name: str | None = None,
    prepare: Callable[[], object] = lambda: None,
) -> HookedTransformer:
    """Build a HookedTransformer from a local Hugging Face folder without touching any hub.

    The first load processes the folder (`process_hf_dir`) and caches the result
    (`mechcopy.models.processed`); later loads memory-map it. The tokenizer is loaded from the
    folder itself so that TransformerLens never re-fetches it by name. `prepare` runs before the
    folder is processed (the zoo checks and, if damaged, fetches the weights again).
    """
    from transformers import AutoTokenizer  # noqa: F401  (imported here: transformers' lazy imports are not thread-safe)

    path = path.resolve()

    def build():
        tokenizer.exception()   # wait for it: nothing else imports from transformers meanwhile
        prepare()
        built = process_hf_dir(path, tl_name)   # the model's errors (custom code, weights) before the tokenizer's
        tokenizer.result()
        return built

    # The tokenizer (Python-bound: 2.7 s for Gemma's) loads while the weights' digest is checked
    # (hashing releases the GIL).
    with ThreadPoolExecutor(max_workers=1) as pool:
        tokenizer = pool.submit(_tokenizer, path)
        processed = load_processed(path, "HookedTransformer", build, tl_name=tl_name, layout="store_as_read",
                                   **PROCESSING)
        return hooked_from_processed(processed, tokenizer.result(), name=name, tokenizer_name=str(path),
                                     device=device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype=dtype)


def _tokenizer(path: Path):
    """The folder's tokenizer, loaded once as TransformerLens keeps it.

    TransformerLens wants a tokenizer made with add_bos_token=True and loads a second one when it gets
    another (`get_tokenizer_with_bos`): seconds for Gemma's 262k-token vocabulary. Where the folder's
    tokenizer has a BOS token it is made so here; the result is the same tokenizer (tests/test_processed.py).
    """
    from transformers import AutoTokenizer

    try:
        conf = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        conf = None
    bos = {"add_bos_token": True} if isinstance(conf, dict) and conf.get("bos_token") else {}
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False, **bos)


def process_hf_dir(path: Path, tl_name: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """TransformerLens' processing of a local Hugging Face folder: (config, tensors as stored).

    TransformerLens' own config and weight converters and `load_and_process_state_dict` do the work,
    in float32 on the CPU, into a model that skips random initialisation. `tl_name` names a
    TransformerLens model whose config TransformerLens builds by name (Gemma 3, which it does not
    infer from a config.json); the sizes are checked against the folder's config either way. The
    tensors are in the layout `store_as_read` gives (each read-permuted tensor stored contiguous).
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as tl_loading
    from transformers import AutoModelForCausalLM

    with library_bars():
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
    cfg_dict = tl_loading.convert_hf_model_config(tl_name, trust_remote_code=False) if tl_name else _tl_config(path)
    init_weights = cfg_dict.get("init_weights", True)
    cfg_dict.update(model_name=path.name, original_architecture=_architecture(hf_model.config, path), device="cpu",
                    dtype=torch.float32, tokenizer_name=None, init_weights=False)
    # convert_hf_model_config infers the config from the folder's config.json; check the sizes
    # that matter against the HF model so a name-based guess inside TransformerLens cannot slip by.
    hc = hf_model.config
    for key, hf_val in [("n_layers", hc.num_hidden_layers), ("d_model", hc.hidden_size),
                        ("d_mlp", hc.intermediate_size), ("d_vocab", hc.vocab_size)]:
        if cfg_dict[key] != hf_val:
            raise ValueError(f"config mismatch for {path.name}: {key}={cfg_dict[key]} vs HF {hf_val}")
    cfg = HookedTransformerConfig(**cfg_dict)
    state_dict = tl_loading.get_pretrained_state_dict(tl_name or str(path), cfg, hf_model=hf_model, dtype=torch.float32)
    del hf_model
    model = HookedTransformer(cfg, move_to_device=False)
    # Without random initialisation a weight the converter did not deliver would be uninitialised
    # memory (TransformerLens fills it from the model, with a warning): refuse it.
    unfilled = sorted(k for k, _ in model.named_parameters() if k not in state_dict and "W_" in k)
    if unfilled:
        raise ValueError(f"{path}: TransformerLens' converter gives no weights for {unfilled[:5]}; "
                         "this architecture is not supported")
    model.load_and_process_state_dict(state_dict, **PROCESSING)
    del state_dict
    store_as_read(model)
    orders = read_orders(model)
    tensors = {k: (p.detach().permute(*orders[k]) if k in orders else p.detach()) for k, p in model.named_parameters()}
    config = {k: v for k, v in model.cfg.to_dict().items() if k not in PER_LOAD}
    config["init_weights"] = init_weights
    return json.loads(json.dumps(config)), tensors


def hooked_from_processed(processed: Processed, tokenizer, name: str, tokenizer_name: str | None, device: str,
                          dtype: torch.dtype) -> HookedTransformer:
    """A HookedTransformer holding `processed`'s tensors, built without random weights.

    Its parameters are the stored tensors themselves (memory-mapped when `dtype` is float32 and the
    device the CPU), each viewed back in the layout TransformerLens reads (`store_as_read`).
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    fields = dict(processed.config)
    init_weights = fields.get("init_weights", True)
    cfg = HookedTransformerConfig(**{**fields, "model_name": name, "device": device, "dtype": dtype,
                                     "tokenizer_name": tokenizer_name, "init_weights": False})
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="left")
    model.cfg.init_weights = init_weights
    orders = read_orders(model)
    state = {}
    for key, t in processed.tensors.items():
        if key in orders:
            t = t.permute(*sorted(range(t.ndim), key=orders[key].__getitem__))
        state[key] = t.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    params = dict(model.named_parameters())
    missing = [k for k in missing if k in params]
    if missing or unexpected:
        raise ValueError(f"processed weights of {name} do not fit its config (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}); delete {processed.folder} and load again")
    # nn.Module.to, not HookedTransformer.to: the config already says this device and dtype, and
    # TransformerLens' `to(dtype)` also builds the state dict once per tensor for nothing (2.5 s on
    # SmolLM2) and prints. The buffers (attention's IGNORE) take the dtype, as its loading leaves them.
    torch.nn.Module.to(model, device)
    torch.nn.Module.to(model, dtype)
    model.eval()
    return model


def tl_reference_load(path: Path, name: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                      tl_name: str | None = None) -> HookedTransformer:
    """TransformerLens' plain path, as `load_model` took it before the processed cache (81a615e): the
    HF model, TransformerLens' converter, a randomly initialised HookedTransformer,
    `load_and_process_state_dict`, `store_as_read`. The reference the cached load is compared with,
    bit for bit (tests/test_processed.py), and timed against (benchmarks/load.py); slow and heavy.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as tl_loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).resolve()
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    cfg_dict = tl_loading.convert_hf_model_config(tl_name, trust_remote_code=False) if tl_name else _tl_config(path)
    cfg_dict.update(model_name=name, original_architecture=_architecture(hf_model.config, path), device=device,
                    dtype=dtype, tokenizer_name=str(path))
    cfg = HookedTransformerConfig(**cfg_dict)
    state_dict = tl_loading.get_pretrained_state_dict(tl_name or str(path), cfg, hf_model=hf_model, dtype=torch.float32)
    del hf_model
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="left")
    model.load_and_process_state_dict(state_dict, **PROCESSING)
    model.to(cfg.device or "cpu")
    model.to(dtype)
    model.eval()
    return store_as_read(model)


def read_orders(model: HookedTransformer) -> dict[str, tuple[int, ...]]:
    """Parameter name -> the permutation under which TransformerLens 3.9 reads it (see `store_as_read`)."""
    orders: dict[str, tuple[int, ...]] = {"unembed.W_U": (1, 0)}
    for i, block in enumerate(model.blocks):
        if model.cfg.gated_mlp:
            orders.update({f"blocks.{i}.mlp.{n}": (1, 0) for n in ("W_gate", "W_in", "W_out")})
        if not (model.cfg.use_split_qkv_input or model.cfg.use_attn_in):
            orders.update({f"blocks.{i}.attn.{n}": (0, 2, 1)
                           for n in ("W_Q", "W_K", "W_V", "_W_K", "_W_V") if n in block.attn._parameters})
            orders[f"blocks.{i}.attn.W_O"] = (2, 0, 1)
    return orders


def store_as_read(model: HookedTransformer) -> HookedTransformer:
    """Store the weights in the memory layout TransformerLens 3.9 reads them in; returns `model`.

    Its forward transposes the gated MLP's W_gate, W_in, W_out, the unembedding W_U and the attention
    W_Q, W_K, W_V, W_O and copies them (`.contiguous()`, `rearrange`) on every call: about half of
    the evaluator's time on SmolLM2, most of a one-token decoding step. Stored as their transposes'
    views, those copies become no-ops. The values do not change and every matmul receives the same
    contiguous operand as before, so outputs are bitwise equal (tests/test_models.py).
    """
    with torch.no_grad():
        for name, order in read_orders(model).items():
            param = model.get_parameter(name)
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
    dtype = torch.float32 if dtype is None else check_dtype(dtype)
    device = None if device is None else check_device(device)
    name = str(name)
    if name in zoo.ZOO:
        # The weights are hashed when they are processed (`zoo.fetch` before `process_hf_dir`), not
        # at every load: a load reads the processed cache, which is verified itself.
        folder = zoo.model_dir(name) if zoo.cache_problem(name, weights=False) is None else zoo.fetch(name)
        return _hooked_from_hf_dir(folder, name, device, dtype, zoo.ZOO[name].tl_name,
                                   prepare=lambda: zoo.fetch(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is a folder but has no config.json (not a Hugging Face model folder)")
        conf = folder_config(path)
        if conf.get("model_type") == "mamba" or ("ssm_cfg" in conf and "n_layer" in conf):   # HF or mamba-ssm
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


def folder_config(path: Path) -> dict:
    """A model folder's config.json as a dict, or a ValueError that says what is wrong with it."""
    file = path / "config.json"
    try:
        conf = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}); a Hugging Face model folder's config.json is a JSON object")
    if not isinstance(conf, dict):
        raise ValueError(f"{file} holds a JSON {type(conf).__name__}, not an object of settings; "
                         "is this a Hugging Face model folder?")
    return conf
