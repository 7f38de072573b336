"""The processed-weights cache: a cached load is bitwise today's load, and a bad cache is rebuilt."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mechcopy.models import processed as pc
from mechcopy.models import zoo

PROMPTS = ["hot -> cold\nbig -> small\nfast ->", "ab -> 1\ncd -> 2\nef ->", "The quick brown fox."]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch, request):
    """Every tiny test writes its processed entries into a folder of its own; the real models' tests use
    the shared cache (the suite's other loads fill it)."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setattr(pc, "processed_root", lambda: tmp_path / "processed")


def reference_load(path, name, dtype=torch.float32):
    from mechcopy.models.loading import tl_reference_load

    return tl_reference_load(path, name, dtype=dtype)


def assert_same_model(got, ref):
    """Bitwise: every tensor (values, dtype, layout), the config, the hook points and the logits."""
    assert type(got) is type(ref)
    a, b = got.state_dict(), ref.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].stride() == b[k].stride() and torch.equal(a[k], b[k]), k
    assert got.cfg.to_dict() == ref.cfg.to_dict() if hasattr(got.cfg, "to_dict") else got.cfg == ref.cfg
    assert sorted(got.hook_dict) == sorted(ref.hook_dict)
    if getattr(ref, "tokenizer", None) is not None:   # the same tokenizer, loaded once instead of twice
        assert got.tokenizer.init_kwargs == ref.tokenizer.init_kwargs
        assert torch.equal(got.to_tokens(PROMPTS), ref.to_tokens(PROMPTS))
        tokens = ref.to_tokens(PROMPTS[0])[0]
        assert got.to_str_tokens(tokens) == ref.to_str_tokens(tokens)
    tokens = ref.to_tokens(PROMPTS) if getattr(ref, "tokenizer", None) is not None else torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.equal(got(tokens), ref(tokens))


def _gqa_llama_dir(root):
    """A tiny random Llama as SmolLM2 is built: grouped-query attention and tied embeddings."""
    from conftest import write_tiny_llama

    return write_tiny_llama(root / "tiny-gqa", seed=1, jitter=0.05, num_key_value_heads=2, tie_word_embeddings=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_load_is_bitwise_todays_load(tiny_llama_dir, dtype):
    from mechcopy import load_model

    ref = reference_load(tiny_llama_dir, "tiny-llama", dtype)
    cold = load_model(tiny_llama_dir, device="cpu", dtype=dtype)        # processes and writes the entry
    folder = pc.entry_dir(tiny_llama_dir)
    assert pc.entry_problem(folder, json.loads((folder / pc.MANIFEST).read_text())["key"]) is None
    warm = load_model(tiny_llama_dir, device="cpu", dtype=dtype)        # reads it
    assert_same_model(cold, ref)
    assert_same_model(warm, ref)


def test_grouped_query_tied_is_bitwise_todays_load(tmp_path):
    from mechcopy import load_model

    folder = _gqa_llama_dir(tmp_path)
    ref = reference_load(folder, folder.name)
    assert ref.cfg.n_key_value_heads == 2 and "blocks.0.attn._W_K" in ref.state_dict()
    for _ in range(2):
        assert_same_model(load_model(folder, device="cpu"), ref)


def test_warm_load_reads_the_file_and_never_builds(tiny_llama_dir, monkeypatch):
    """A warm load memory-maps the entry (float32: the parameters are views of the file) and neither
    loads the HF model nor initialises random weights; a weight edit does not reach the file."""
    import transformers
    from transformer_lens import HookedTransformer

    from mechcopy import load_model
    from mechcopy.components import Components
    from mechcopy.fingerprint import model_fingerprint
    from mechcopy.pruning import prune_weights

    load_model(tiny_llama_dir, device="cpu")
    weights = pc.entry_dir(tiny_llama_dir) / pc.WEIGHTS
    digest = zoo.sha256_file(weights)

    def forbidden(*a, **k):
        raise AssertionError("a warm load must not build the model again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    monkeypatch.setattr(HookedTransformer, "init_weights", forbidden)
    model = load_model(tiny_llama_dir, device="cpu")
    w_u = model.unembed.W_U
    assert not w_u.is_contiguous() and w_u.T.is_contiguous()          # stored as TransformerLens reads it
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        assert torch.equal(f.get_tensor("unembed.W_U"), w_u.T)
    prune_weights(model, Components(((0, 1), (1, 5)), model_fingerprint(model)))
    assert not model.blocks[0].mlp.W_out[1].any()
    assert zoo.sha256_file(weights) == digest                          # copy-on-write: the file is unchanged
    assert load_model(tiny_llama_dir, device="cpu").blocks[0].mlp.W_out[1].all()


def _damage(kind, folder):
    """Damage an entry. The weights are rewritten as a new file (a model still maps the old one, and a
    file truncated in place under a live mapping would kill the process; the cache never does that)."""
    weights, manifest = folder / pc.WEIGHTS, folder / pc.MANIFEST
    data = weights.read_bytes()
    if kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "corrupt":
        data = data[:-200] + b"\x7f" * 64 + data[-136:]
    elif kind == "manifest":
        manifest.write_text("{not json")
    elif kind == "half-written":            # what a build killed before its rename would leave in place
        manifest.unlink()
    weights.unlink()
    if kind != "missing":
        weights.write_bytes(data)


@pytest.mark.parametrize("kind,says", [("truncated", "truncated"), ("corrupt", "SHA-256"),
                                       ("manifest", "unreadable"), ("missing", "missing"), ("half-written", None)])
def test_damaged_entry_is_rebuilt(tiny_llama_dir, kind, says, capsys):
    from mechcopy import load_model

    first = load_model(tiny_llama_dir, device="cpu")
    folder = pc.entry_dir(tiny_llama_dir)
    _damage(kind, folder)
    capsys.readouterr()
    again = load_model(tiny_llama_dir, device="cpu")
    err = capsys.readouterr().err
    assert ("unusable" in err and says in err) if says else "unusable" not in err, err
    assert_same_model(again, reference_load(tiny_llama_dir, "tiny-llama"))
    assert_same_model(first, again)
    key = json.loads((folder / pc.MANIFEST).read_text())["key"]
    assert pc.entry_problem(folder, key) is None


def test_stale_entry_is_rebuilt(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """New weights in the folder, or another TransformerLens version: the entry is rebuilt."""
    from safetensors.torch import load_file, save_file

    from mechcopy import load_model

    folder = tmp_path / "tiny-llama-copy"
    shutil.copytree(tiny_llama_dir, folder)
    first = load_model(folder, device="cpu")
    sd = load_file(str(folder / "model.safetensors"))
    sd = {k: v * 1.5 if k.endswith("mlp.down_proj.weight") else v for k, v in sd.items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    second = load_model(folder, device="cpu")
    assert "stale" in capsys.readouterr().err
    assert_same_model(second, reference_load(folder, folder.name))
    tokens = first.to_tokens(PROMPTS[0])
    with torch.no_grad():
        assert not torch.equal(first(tokens), second(tokens))
    # touched but unchanged: hashed again, found equal, nothing rebuilt
    from mechcopy.models import loading

    (folder / "model.safetensors").touch()
    with monkeypatch.context() as m:
        m.setattr(loading, "process_hf_dir", lambda *a: (_ for _ in ()).throw(AssertionError("rebuilt")))
        load_model(folder, device="cpu")
        m.setattr(pc, "sha256_file", lambda p: "read again" if p.parent == folder else zoo.sha256_file(p))
        load_model(folder, device="cpu")          # the touch is remembered: the source is not read again
    capsys.readouterr()
    real = pc.versions
    monkeypatch.setattr(pc, "versions", lambda: {**real(), "transformer-lens": "3.9.1"})
    load_model(folder, device="cpu")
    assert "stale" in capsys.readouterr().err


def test_unwritable_cache_builds_in_memory(tiny_llama_dir, monkeypatch, capsys):
    from mechcopy import load_model

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pc, "write_entry", refuse)
    model = load_model(tiny_llama_dir, device="cpu")
    assert "cannot write the processed-weights cache" in capsys.readouterr().err
    assert not pc.entry_dir(tiny_llama_dir).exists()
    assert_same_model(model, reference_load(tiny_llama_dir, "tiny-llama"))


def test_orphaned_entries_are_removed(tiny_llama_dir, tmp_path):
    from mechcopy import load_model

    gone = tmp_path / "tiny-llama-gone"
    shutil.copytree(tiny_llama_dir, gone)
    load_model(gone, device="cpu")
    assert pc.entry_dir(gone).exists()
    shutil.rmtree(gone)
    load_model(tiny_llama_dir, device="cpu")     # any build removes entries whose folder is gone
    assert not pc.entry_dir(gone).exists() and pc.entry_dir(tiny_llama_dir).exists()
    kept = pc.entry_dir(tiny_llama_dir).name
    assert sorted(p.name for p in pc.processed_root().iterdir()) == [f".{kept}.lock", kept]   # its lock went too


def test_mamba_folder_uses_the_same_cache(tmp_path, monkeypatch):
    """A Mamba folder: the cached load equals the uncached conversion bit for bit, cold and warm."""
    from transformers import MambaConfig as HFConfig, MambaForCausalLM

    from mechcopy import load_model
    from mechcopy.models import mamba
    from mechcopy.models.tiny import char_tokenizer

    torch.manual_seed(0)
    hf = MambaForCausalLM(HFConfig(vocab_size=104, hidden_size=32, state_size=8, num_hidden_layers=2)).eval()
    folder = tmp_path / "tiny-mamba"
    hf.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    ref = mamba.HookedMamba.from_hf(hf, model_name=folder.name, device="cpu")
    ref.tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(folder.resolve())
    ref.cfg = mamba.replace(ref.cfg, tokenizer_name=str(folder.resolve()))
    cold = load_model(folder, device="cpu")
    assert (pc.entry_dir(folder) / pc.WEIGHTS).exists()
    monkeypatch.setattr(mamba, "_load_weights", lambda *a: (_ for _ in ()).throw(AssertionError("rebuilt")))
    warm = load_model(folder, device="cpu")
    for model in (cold, warm):
        assert_same_model(model, ref)
    assert warm.embed.W_E.untyped_storage().data_ptr() != cold.embed.W_E.untyped_storage().data_ptr()
    half = load_model(folder, device="cpu", dtype=torch.bfloat16)
    assert half.cfg.dtype == torch.bfloat16 and torch.equal(half.embed.W_E, ref.embed.W_E.to(torch.bfloat16))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_cached_load_is_bitwise_todays_load(name):
    """SmolLM2 and Gemma 3: a load through the cache (cold where the cache has no entry yet, then warm)
    equals the plain TransformerLens path bit for bit. Costs the plain load (about 11 s for SmolLM2;
    31 s and 9 GB for Gemma) and two cached ones (about 1 and 4 s when the entry exists)."""
    from mechcopy import load_model
    from mechcopy.models.loading import tl_reference_load

    ref = tl_reference_load(zoo.fetch(name), name, tl_name=zoo.ZOO[name].tl_name)
    first = load_model(name, device="cpu")
    assert_same_model(first, ref)
    del first
    folder = pc.entry_dir(zoo.model_dir(name))
    assert pc.entry_problem(folder, json.loads((folder / pc.MANIFEST).read_text())["key"]) is None
    warm = load_model(name, device="cpu")
    assert_same_model(warm, ref)
    assert not warm.unembed.W_U.is_contiguous()     # the stored layout, memory-mapped


@pytest.mark.parametrize("text,says", [("[]", "holds a JSON list"), ("{", "is not valid JSON")])
def test_bad_config_json_is_named(tmp_path, text, says):
    from mechcopy import load_model

    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=says):
        load_model(tmp_path)
