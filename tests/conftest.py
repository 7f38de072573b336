"""Shared fixtures: tiny random models (fast) and the real zoo models (session-scoped)."""

import warnings

import pytest

warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")


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
