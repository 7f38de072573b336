"""Shared fixtures: tiny random models (fast) and the real zoo models (session-scoped)."""

import warnings

import pytest

warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")


@pytest.fixture(scope="module")
def annotations_unchecked():
    """The API as users call it: annotations unchecked at run time (the tests check them everywhere else,
    through jaxtyping's pytest hook), so what a function says of a bad argument is its own refusal, not
    its annotation's. For the tests that pin those refusals (tests/test_hostile.py, tests/test_fuzz.py)."""
    from jaxtyping import config

    before = config.jaxtyping_disable
    config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        config.update("jaxtyping_disable", before)


@pytest.fixture(scope="session")
def tiny():
    from mechcopy.models.tiny import tiny_transformer

    return tiny_transformer(n_layers=2, d_model=32, d_mlp=64, seed=0)


@pytest.fixture(scope="session")
def smollm2():
    from mechcopy import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma():
    from mechcopy import load_model

    return load_model("gemma-3-270m")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one torch thread (and do not fight other jobs for the cores)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny3():
    from mechcopy.models.tiny import tiny_transformer

    return tiny_transformer(n_layers=3, d_model=32, d_mlp=64, seed=1)


@pytest.fixture(scope="module")
def mamba():
    from mechcopy.models.mamba import tiny_mamba

    return tiny_mamba(n_layers=2, d_model=32, seed=0)


def write_tiny_llama(folder, seed: int = 0, jitter: float = 0.0, **config):
    """Save a tiny random Llama (2 layers of 64 neurons, 512-token context; `config` overrides) with the
    character tokenizer in `folder`; `jitter` adds noise to every weight (norms too, so folding matters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mechcopy.models.tiny import char_tokenizer

    tok = char_tokenizer()
    cfg = LlamaConfig(**{**dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id, tie_word_embeddings=False), **config})
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(cfg)
    if jitter:
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * jitter)
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A Hugging Face folder holding a tiny random Llama with the character tokenizer (`write_tiny_llama`):
    `load_model(folder)` loads it as a real user's folder is loaded, and a subprocess can load it too.
    Its name contains "llama" on purpose (see `_tl_config`)."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """The tests' own cache folder: `MECHCOPY_CACHE` for a subprocess that loads a tiny model folder, so
    that its processed entry (`mechcopy.models.processed`) is never written into the user's cache."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def private_processed_cache(request, monkeypatch, tiny_cache):
    """Tiny tests' model folders get their processed entries in the tests' own cache; tests marked slow
    (real models) use the user's, which the suite fills once."""
    if request.node.get_closest_marker("slow") is None:
        from mechcopy.models import processed

        monkeypatch.setattr(processed, "processed_root", lambda: tiny_cache / "processed")


@pytest.fixture
def best_k_chosen(monkeypatch):
    """The k sweep prunes its best k even where it does not beat k = 0. A random model gains nothing
    from pruning, so find would choose k = 0; tests of what comes after the selection use this."""
    from mechcopy import sweeps

    def best(rows, baseline):
        return max(rows, key=lambda r: r["dev_accuracy"])["k"], ""

    monkeypatch.setattr(sweeps, "_choose_k", best)


def analysis_script(name: str):
    """The module of `analyses/<name>.py` (the analyses are scripts, not a package), loaded once per call."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "analyses" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
