"""The IG completeness gate: a layer whose IG misses completeness can never be selected, by any selection."""

import copy

import pytest
import torch

from mechcopy.attribution import CopyScores, converged_layers, copy_scores, integrated_gradients, normalise
from mechcopy.components import random_matched
from mechcopy.neurons import model_fingerprint
from mechcopy.selection import bottom_set, select, select_layer_percent
from mechcopy.tasks.probe import ProbeConfig, build_probe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unconverged():
    """tiny3 with layer 0's output weights x10: its IG at 2 midpoint steps misses completeness by ~20%
    (like SmolLM2's layer 0), while layers 1 and 2 converge."""
    from mechcopy.models.tiny import tiny_transformer

    model = tiny_transformer(n_layers=3, d_model=32, d_mlp=64, seed=1)
    with torch.no_grad():
        model.blocks[0].mlp.W_out.mul_(10)
    prompts = build_probe(model.tokenizer, ProbeConfig(), 6, 0, 0).attribution
    att = integrated_gradients(model, prompts, steps=2, rule="midpoint")
    return model, prompts, att


def test_converged_layers_is_the_median_completeness_error(unconverged):
    _, _, att = unconverged
    # independently: |sum IG - (T(a) - T(0))| / |T(a) - T(0)| per prompt and layer, median over prompts
    err = (att.values.sum(-1) - (att.target_clean[:, None] - att.target_zero)).abs() / \
        (att.target_clean[:, None] - att.target_zero).abs()
    median = err.median(0).values
    assert median[0] > 0.05 and (median[1:] < 0.05).all(), median
    assert converged_layers(att) == (1, 2)
    assert converged_layers(att, max_error=1.0) == (0, 1, 2)
    assert converged_layers(att, max_error=0.0) == ()


def test_no_selection_takes_an_unconverged_layer(unconverged, tmp_path):
    model, prompts, att = unconverged
    free = copy_scores(model, att)
    gated = copy_scores(model, att, max_completeness_error=0.05)
    assert free.allowed_layers is None and gated.allowed_layers == (1, 2)
    assert torch.equal(free.scores, gated.scores)  # the gate limits selection, not the scores
    assert gated.meta["allowed_layers"] == [1, 2] and gated.meta["max_completeness_error"] == 0.05
    # the gate matters here: without it, layer 0 (x10 weights) wins the top and the bottom
    assert any(l == 0 for l, _ in select(free, "global", k=10).neurons)
    assert any(l == 0 for l, _ in bottom_set(free, 10).neurons)
    gated = CopyScores.load(gated.save(tmp_path / "g.scores.safetensors"))   # the gate survives a round trip
    assert gated.allowed_layers == (1, 2)
    eligible = [(l, i) for l in (1, 2) for i in range(64)]
    chosen = [select(gated, "global", k=k) for k in (1, 10, 128)]
    chosen += [select(gated, "per-layer", k=5), select(gated, "threshold", threshold=float(gated.scores.min())),
               bottom_set(gated, 10), bottom_set(gated, 128), select_layer_percent(gated, 2, 10)]
    for ns in chosen:
        assert ns.neurons and all(l != 0 for l, _ in ns.neurons), ns.meta
        for seed in range(3):
            assert all(l != 0 for l, _ in random_matched(model, ns, seed).neurons)
    # global top-k among the allowed neurons equals an independent ranking of them
    ranked = sorted(eligible, key=lambda n: -float(gated.scores[n]))
    assert set(select(gated, "global", k=10).neurons) == set(ranked[:10])
    assert set(bottom_set(gated, 10).neurons) == set(ranked[-10:])
    assert select(gated, "per-layer", k=5).layer_counts(3) == [0, 5, 5]
    with pytest.raises(ValueError, match="0 < k <= 128"):
        select(gated, "global", k=129)
    with pytest.raises(ValueError, match="layer 0 is not allowed"):
        select_layer_percent(gated, 0, 10)
    with pytest.raises(ValueError, match="no layer's IG meets completeness"):
        copy_scores(model, att, max_completeness_error=1e-9)


def test_select_layer_percent_is_the_layer_percentile():
    import numpy as np

    s = torch.randn(3, 200, generator=torch.Generator().manual_seed(0))
    scores = CopyScores(s, {"model": {}})
    for percent in (1, 2.5, 10, 50, 100):
        ns = select_layer_percent(scores, 1, percent)
        n = int(np.ceil(200 * percent / 100))
        assert len(ns) == n and ns.layer_counts(3) == [0, n, 0]
        cut = np.percentile(s[1].numpy(), 100 - percent, method="higher") if percent < 100 else -np.inf
        assert {i for _, i in ns.neurons} == {i for i in range(200) if s[1, i] >= cut}
    with pytest.raises(ValueError, match="percent"):
        select_layer_percent(scores, 1, 0)
    with pytest.raises(IndexError):
        select_layer_percent(scores, 3, 5)


def test_minmax_neuron_normalisation():
    v = torch.randn(7, 3, 5, generator=torch.Generator().manual_seed(1))
    out = normalise(v, "minmax-neuron")
    for layer in range(3):
        for i in range(5):
            col = v[:, layer, i]
            assert torch.allclose(out[:, layer, i], (col - col.min()) / (col.max() - col.min()), atol=1e-6)
    assert torch.allclose(out.amin(0), torch.zeros(3, 5)) and torch.allclose(out.amax(0), torch.ones(3, 5))
    # scale-free per neuron: a neuron's level and size are gone, only the shape across prompts is left
    shifted = v * (torch.rand(1, 3, 5) + 0.1) * 10 + torch.randn(1, 3, 5) * 5
    assert torch.allclose(normalise(shifted, "minmax-neuron"), out, atol=1e-5)


def test_scores_without_a_gate_allow_every_layer(tiny3):
    scores = CopyScores(torch.rand(3, 64), {"model": model_fingerprint(tiny3)})
    assert scores.eligible().all() and len(select(scores, "per-layer", k=2)) == 6
