"""Selection stability against independent computations (numpy ranks and sets, scipy's Spearman)."""

import numpy as np
import pytest
import torch
from scipy import stats as st

from mechcopy.attribution import integrated_gradients
from mechcopy.stability import (
    agreement, bootstrap_stability, jaccard, setting_name, stability_report, top_set,
)
from mechcopy.tasks.probe import ProbeConfig, build_probe

pytestmark = pytest.mark.usefixtures("one_thread")


def _norm(v: np.ndarray, how: str) -> np.ndarray:
    """The normalisations by hand: per prompt over all neurons, or per neuron over the prompts."""
    flat = v.reshape(len(v), -1)
    if how == "minmax":
        lo, hi = flat.min(1, keepdims=True), flat.max(1, keepdims=True)
    elif how == "minmax-neuron":
        lo, hi = flat.min(0, keepdims=True), flat.max(0, keepdims=True)
    else:
        return flat
    return (flat - lo) / (hi - lo)


def _top(flat_scores: np.ndarray, k: int, layers, width) -> set:
    order = np.argsort(-flat_scores, kind="stable")[:k]
    return {(layers[i // width], i % width) for i in order}


@pytest.mark.parametrize("how", ["minmax", "minmax-neuron", "none"])
def test_bootstrap_against_hand_computation(how):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(9, 3, 20))
    values[:, 1, :4] += 3.0                      # four neurons that matter on every prompt
    allowed = (1, 2)
    res = bootstrap_stability(torch.tensor(values), ks=(4, 10), normalisation=how, n_boot=15, seed=5,
                              allowed_layers=allowed)
    idx = np.random.default_rng(5).integers(0, 9, size=(15, 9))
    full = _norm(values, how).mean(0).reshape(3, 20)[list(allowed)].ravel()
    for b in range(15):
        sample = _norm(values[idx[b]], how).mean(0).reshape(3, 20)[list(allowed)].ravel()
        assert res.spearman[b] == pytest.approx(st.spearmanr(full, sample).statistic, abs=1e-9)
        for k in (4, 10):
            a, c = _top(full, k, allowed, 20), _top(sample, k, allowed, 20)
            assert res.jaccard[k][b] == pytest.approx(len(a & c) / len(a | c))
    if how != "minmax-neuron":                   # per-neuron min-max removes a neuron's level (test_gating)
        assert np.mean(res.jaccard[4]) > 0.9    # the planted neurons are found in (nearly) every resample
    summary = res.to_json()
    assert summary["jaccard"]["4"]["mean"] == pytest.approx(np.mean(res.jaccard[4]))
    assert len(summary["per_resample"]["spearman"]) == 15


def test_top_set_and_agreement():
    s = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.7, 0.0]])
    assert top_set(s, 2) == {(0, 0), (1, 0)}
    assert top_set(s, 2, allowed_layers=[1]) == {(1, 0), (1, 1)}
    assert jaccard(frozenset({1, 2}), frozenset({2, 3})) == pytest.approx(1 / 3)
    a = agreement(s, s * 2 + 1, ks=(1, 3))
    assert a.spearman == pytest.approx(1.0) and a.jaccard == {1: 1.0, 3: 1.0}
    b = agreement(s, -s, ks=(3,))
    assert b.spearman == pytest.approx(-1.0) and b.jaccard[3] == 0.0
    with pytest.raises(ValueError, match="shape"):
        agreement(s, s[:1], ks=(1,))


def test_report_across_normalisations_and_ig_settings(tiny3):
    prompts = build_probe(tiny3.tokenizer, ProbeConfig(), 6, 0, 0).attribution
    settings = {"m=2": integrated_gradients(tiny3, prompts, steps=2),
                "m=8": integrated_gradients(tiny3, prompts, steps=8),
                "gold": integrated_gradients(tiny3, prompts, target="gold_logprob", steps=4)}
    rep = stability_report(settings, ks=(5, 20), normalisations=("minmax", "minmax-neuron"), n_boot=4, seed=1,
                           allowed_layers=[1, 2])
    assert rep.reference == "m=2" and [b.normalisation for b in rep.bootstrap] == ["minmax", "minmax-neuron"]
    assert [(a.a, a.b) for a in rep.settings] == [("m=2", "m=8"), ("m=2", "gold"), ("m=8", "gold")]
    # each agreement equals a hand computation on the allowed layers (gold_logprob falls as copying grows)
    sign = {"m=2": 1, "m=8": 1, "gold": -1}
    mm = {n: _norm(sign[n] * a.values.numpy(), "minmax").mean(0).reshape(3, 64)[[1, 2]].ravel()
          for n, a in settings.items()}
    for a in rep.settings:
        assert a.spearman == pytest.approx(st.spearmanr(mm[a.a], mm[a.b]).statistic, abs=1e-9)
        for k in (5, 20):
            x, y = _top(mm[a.a], k, (1, 2), 64), _top(mm[a.b], k, (1, 2), 64)
            assert a.jaccard[k] == pytest.approx(len(x & y) / len(x | y))
    ref = settings["m=2"].values.numpy()
    (norms,) = rep.normalisations
    x, y = (_norm(ref, h).mean(0).reshape(3, 64)[[1, 2]].ravel() for h in ("minmax", "minmax-neuron"))
    assert norms.spearman == pytest.approx(st.spearmanr(x, y).statistic, abs=1e-9)
    assert rep.to_json()["allowed_layers"] == [1, 2]
    # a single Attributions is named by its setting; prompts must match across settings
    single = stability_report(settings["m=8"], ks=(5,), n_boot=2)
    assert single.reference == setting_name(settings["m=8"]) == "ig contrast m=8"
    other = integrated_gradients(tiny3, prompts[:5], steps=2)
    with pytest.raises(ValueError, match="same prompts"):
        stability_report({"a": settings["m=2"], "b": other}, ks=(5,), n_boot=2)
