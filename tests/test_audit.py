"""Self-consistency, the k curve, the layer x percent sweep and find's guard, against direct computations."""

import numpy as np
import pytest
import torch

from mechcopy.attribution import CopyScores, copy_scores, integrated_gradients, make_target
from mechcopy.audit import SelfConsistency, k_curve, self_consistency
from mechcopy.components import random_matched
from mechcopy.evaluation import evaluate
from mechcopy.pruning import component_means, pruning_hooks
from mechcopy.selection import select, select_layer_percent
from mechcopy.stats import paired_means
from mechcopy.sweeps import sweep_layer_percent
from mechcopy.tasks.outcomes import outcome_rates
from mechcopy.tasks.probe import ProbeConfig, build_probe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def case(tiny3):
    splits = build_probe(tiny3.tokenizer, ProbeConfig(), 12, 12, 0)
    att = integrated_gradients(tiny3, splits.attribution, steps=8)
    return tiny3, splits.attribution, splits.dev, copy_scores(tiny3, att, "none")


def _contrast(model, prompt, hooks):
    """logit(c) - logit(gold) of one prompt run alone under `hooks`, c fixed on its clean run."""
    tokens = model.to_tokens(prompt.text)
    with torch.no_grad():
        clean = model(tokens)[0, -1]
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)[0, -1]
    spec = make_target("contrast", prompt, clean)
    return float(logits[spec.copy] - logits[spec.gold])


def test_self_consistency_against_direct_runs(case):
    model, prompts, _, scores = case
    res = self_consistency(model, prompts, scores, ks=(2, 30), n_random=3, seed=4)
    unpruned = np.array([_contrast(model, p, []) for p in prompts])
    assert np.allclose(res.per_prompt_unpruned, unpruned, atol=1e-5)
    for row in res.rows:
        chosen_set = select(scores, "global", k=row.k)
        chosen = np.array([_contrast(model, p, pruning_hooks(model, chosen_set)) for p in prompts])
        rand = np.array([[_contrast(model, p, pruning_hooks(model, random_matched(model, chosen_set, s)))
                          for p in prompts] for s in (4, 5, 6)])
        assert np.allclose(row.per_prompt_chosen, chosen, atol=1e-5)
        assert np.allclose(row.per_prompt_random, rand, atol=1e-5)
        assert (row.unpruned, row.chosen, row.random) == pytest.approx((unpruned.mean(), chosen.mean(), rand.mean()),
                                                                       abs=1e-5)
        expect = paired_means(np.array(row.per_prompt_chosen), np.array(row.per_prompt_random), "probe",
                              f"top-{row.k}", "random", "contrast", seed=4)
        assert row.chosen_vs_random == expect
        assert row.passed == (expect.ci[1] < 0)
        assert row.chosen_vs_unpruned.diff == pytest.approx(chosen.mean() - unpruned.mean(), abs=1e-5)
    assert res.to_json()["rows"][1]["k"] == 30


def test_self_consistency_with_size_matched_random_sets(case):
    """match="size": the random sets are `random_matched(..., "size", sizes)` with the sizes of the check's own
    prompts; the result says so, and the guard of `find` passes its config's choice through."""
    from mechcopy import method
    from mechcopy.pruning import component_sizes

    model, prompts, _, scores = case
    res = self_consistency(model, prompts, scores, ks=(6,), n_random=2, seed=1, match="size")
    sizes = component_sizes(model, prompts)
    chosen_set = select(scores, "global", k=6)
    rand = np.array([[_contrast(model, p, pruning_hooks(model, random_matched(model, chosen_set, s, "size", sizes)))
                      for p in prompts] for s in (1, 2)])
    assert np.allclose(res.rows[0].per_prompt_random, rand, atol=1e-5)
    assert res.to_json()["random_match"] == "size" and SelfConsistency.from_json(res.to_json()).match == "size"
    config = method.FindConfig(consistency_random=2, seed=1, random_match="size")
    assert method.guard(model, prompts, scores, 6, config).check.rows[0].per_prompt_random == res.rows[0].per_prompt_random
    with pytest.raises(ValueError, match="unknown random_match"):
        method.FindConfig(random_match="norm")


def test_self_consistency_verdict(case):
    """IG's own top set lowers the contrast beyond random sets; the set IG ranks lowest raises it."""
    model, prompts, _, scores = case
    good = self_consistency(model, prompts, scores, ks=(10, 30), n_random=4)
    assert good.passed and all(r.chosen < r.random for r in good.rows)
    bad = self_consistency(model, prompts, CopyScores(-scores.scores, scores.meta), ks=(10, 30), n_random=4)
    assert not bad.passed and not any(r.passed for r in bad.rows)
    # gold_logprob counts the other way: pruning the copy-pushers must raise it
    up = self_consistency(model, prompts, scores, ks=(30,), target="gold_logprob", n_random=4)
    assert up.rows[0].chosen_vs_random.diff > 0 and up.rows[0].passed == (up.rows[0].chosen_vs_random.ci[0] > 0)


def test_k_curve_against_evaluate(case):
    model, _, dev, scores = case
    curve = k_curve(model, dev, scores, ks=(3, 40), n_random=2, seed=1, n_boot=200)
    assert curve.metrics == ("accuracy", "copy_rate", "in_range_rate")
    base = evaluate(model, dev)
    assert curve.unpruned["accuracy"] == base.accuracy and curve.unpruned["copy_rate"] == base.copy_rate
    assert curve.unpruned["in_range_rate"] == outcome_rates(dev, base.predictions)["in_range"]
    for row in curve.rows:
        chosen_set = select(scores, "global", k=row["k"])
        chosen = evaluate(model, dev, fwd_hooks=pruning_hooks(model, chosen_set))
        rand = [evaluate(model, dev, fwd_hooks=pruning_hooks(model, random_matched(model, chosen_set, s)))
                for s in (1, 2)]
        assert row["accuracy"]["chosen"] == chosen.accuracy and row["copy_rate"]["chosen"] == chosen.copy_rate
        assert row["accuracy"]["random"] == pytest.approx(np.mean([r.accuracy for r in rand]))
        assert row["copy_rate"]["chosen_vs_random"]["diff"] == pytest.approx(
            chosen.copy_rate - np.mean([r.copy_rate for r in rand]))
        assert row["accuracy"]["chosen_vs_unpruned"]["diff"] == pytest.approx(chosen.accuracy - base.accuracy)


def test_layer_percent_sweep_against_evaluate(case):
    model, _, dev, scores = case
    gated = CopyScores(scores.scores, scores.meta, allowed_layers=(1, 2))
    sw = sweep_layer_percent(model, gated, dev, percents=(5, 25))
    assert [(r["layer"], r["percent"]) for r in sw.rows] == [(1, 5), (1, 25), (2, 5), (2, 25)]
    for r in sw.rows:
        ns = select_layer_percent(gated, r["layer"], r["percent"])
        assert r["n_neurons"] == len(ns)
        assert r["dev_accuracy"] == evaluate(model, dev, fwd_hooks=pruning_hooks(model, ns)).accuracy
    best = max(sw.rows, key=lambda r: (r["dev_accuracy"], -r["n_neurons"], -r["layer"]))
    assert (sw.chosen_layer, sw.chosen_percent) == (best["layer"], best["percent"])
    assert sw.baseline["dev_accuracy"] == evaluate(model, dev).accuracy and "ppl" not in sw.baseline
    with_ppl = sweep_layer_percent(model, gated, dev, percents=(5,), layers=[2], max_ppl_increase=-1.0, n_tokens=128)
    assert with_ppl.chosen_layer is None and all(not r["feasible"] for r in with_ppl.rows)


def test_find_guard(tiny3, tmp_path, monkeypatch, best_k_chosen):
    """find with consistency_random > 0 records the check; a failing check means k = 0, said in meta."""
    import mechcopy.method as method
    from mechcopy.find import FindConfig, find_copy_neurons

    config = FindConfig(n=6, n_dev=4, shots=2, steps=4, ks=(2, 4), max_ppl_increase=10.0, ppl_tokens=128,
                        consistency_random=2)
    ns = find_copy_neurons(tiny3, tmp_path / "a.json", config, progress=False)
    check = ns.meta["self_consistency"]
    guard = method.Guard.from_json(ns.meta)                  # the guard reads back from the neuron file
    assert guard.to_json() == {k: ns.meta[k] for k in ("self_consistency", "refused") if k in ns.meta}
    assert guard.passed == check["passed"] and SelfConsistency.from_json(check).to_json() == check
    assert check["rows"][0]["k"] == ns.meta["sweep"]["chosen_k"] and check["n_random"] == 2
    assert (len(ns) > 0) == check["passed"] and ("refused" in ns.meta) == (not check["passed"])

    real = method.self_consistency

    def failing(*args, **kwargs):
        res = real(*args, **kwargs)
        from dataclasses import replace

        return replace(res, rows=tuple(replace(r, passed=False) for r in res.rows))

    monkeypatch.setattr(method, "self_consistency", failing)
    refused = find_copy_neurons(tiny3, tmp_path / "b.json", config, progress=False)
    assert len(refused) == 0 and refused.meta["k"] == 0
    assert "fails the self-consistency check" in refused.meta["refused"]
    assert refused.meta["layer_counts"] == [0, 0, 0]
    off = find_copy_neurons(tiny3, tmp_path / "c.json", FindConfig(**{**config.__dict__, "consistency_random": 0}),
                            progress=False)
    assert "self_consistency" not in off.meta and len(off) == off.meta["sweep"]["chosen_k"]


def test_self_consistency_with_mean_ablation(case):
    """`ablation="mean"` mean-ablates the chosen and the random sets; the values match direct runs."""
    model, prompts, dev, scores = case
    means = component_means(model, dev)
    res = self_consistency(model, prompts, scores, ks=(10,), n_random=2, seed=1, ablation="mean", means=means)
    assert res.ablation == "mean" and res.to_json()["ablation"] == "mean"
    chosen_set = select(scores, "global", k=10)
    chosen = np.array([_contrast(model, p, pruning_hooks(model, chosen_set, "mean", means=means)) for p in prompts])
    rand = np.array([[_contrast(model, p, pruning_hooks(model, random_matched(model, chosen_set, s), "mean", means=means))
                      for p in prompts] for s in (1, 2)])
    assert np.allclose(res.rows[0].per_prompt_chosen, chosen, atol=1e-5)
    assert np.allclose(res.rows[0].per_prompt_random, rand, atol=1e-5)
    zeroed = self_consistency(model, prompts, scores, ks=(10,), n_random=2, seed=1)
    assert zeroed.ablation == "zero" and not np.allclose(zeroed.rows[0].per_prompt_chosen, chosen)
    last = component_means(model, dev, positions="last")
    at_last = self_consistency(model, prompts, scores, ks=(10,), n_random=1, seed=1, ablation="mean", positions="last",
                               means=last)
    assert at_last.ablation == "mean at the last position"
    direct = np.array([_contrast(model, p, pruning_hooks(model, chosen_set, "mean", "last", last)) for p in prompts])
    assert np.allclose(at_last.rows[0].per_prompt_chosen, direct, atol=1e-5)
