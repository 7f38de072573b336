"""`mechcopy reproduce` end to end on a tiny model: every stage, the report, resume, settings guard."""

import json

import pytest

from mechcopy import reproduce as rp

CFG = rp.ReproduceConfig(model="tiny", find=rp.FindConfig(n=4, n_dev=6, steps=4), tasks="next_letter,copy_probe",
                         n_eval=6, n_random=1, tv_tasks=("next_letter",), n_tv=4, patch_task="next_letter", n_patch=2)


def test_reproduce_tiny_end_to_end(tiny, tmp_path, monkeypatch, best_k_chosen):
    out = tmp_path / "run"
    report = rp.reproduce(tiny, CFG, out)
    assert report.exists() and report.stat().st_size > 10_000
    for name, _ in rp.STAGES:
        assert (out / f"{name}.json").exists(), name
    html = report.read_text()
    assert html.count("<img") >= 6 and "AttentionHeads" in html and "TextNeuronActivations" in html
    # the copy error's top heads by direct logit attribution, their attention with the demo labels marked
    assert "write most of logit(c) - logit(gold) directly on this prompt" in html
    assert "\\u00ab" in html                      # the head view's marked demo-label tokens («...»)

    # the headline is the pooled paired difference, as the evaluation stage computed it
    comps = json.loads((out / "evaluate.json").read_text())["result"]["comparisons"]
    pooled = {(c["condition"], c["baseline"], c["metric"]): c for c in comps["pooled"]}
    head = pooled[("pruned", "unpruned", "accuracy")]
    assert "The answer: paired differences" in html and f"{head['diff']:+.3f}" in html
    assert (out / "figures" / "forest.png").exists()

    # the headline means in the report stage are the means of the evaluation rows
    rows = json.loads((out / "evaluate.json").read_text())["result"]["results"]
    means = {m["family"]: m for m in json.loads((out / "report.json").read_text())["result"]["mean_over_tasks"]}
    unpruned = [r["accuracy"] for r in rows if r["condition"] == "unpruned"]
    assert means["unpruned"]["accuracy"] == pytest.approx(sum(unpruned) / len(unpruned), abs=1e-3)
    assert {r["condition"] for r in rows} == {"unpruned", "pruned", "random-0", "bottom"}

    # resume: a second run redoes nothing
    def boom(*a, **k):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(rp, "STAGES", [(n, boom) for n, _ in rp.STAGES])
    rp.reproduce(tiny, CFG, out)

    # an interrupted run resumes from the first missing stage only
    (out / "report.json").unlink()
    monkeypatch.setattr(rp, "STAGES", [(n, boom) for n, _ in rp.STAGES[:-1]] + [("report", rp.stage_report)])
    rp.reproduce(tiny, CFG, out)
    assert (out / "report.json").exists()


def test_reproduce_refuses_other_settings(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"config": {"model": "other"}}))
    with pytest.raises(ValueError, match="other settings"):
        rp.reproduce(tiny, CFG, out)


def test_reproduce_reports_k0_plainly(tiny, tmp_path):
    """On a random model no k beats the unpruned model on the probe's dev split: find chooses k = 0, and
    every later stage and the report say so instead of failing."""
    out = tmp_path / "run"
    report = rp.reproduce(tiny, CFG, out)
    neurons = json.loads((out / "neurons.json").read_text())
    assert neurons["neurons"] == [] and neurons["meta"]["k"] == 0
    rows = json.loads((out / "evaluate.json").read_text())["result"]["results"]
    assert {r["condition"] for r in rows} == {"unpruned"}
    html = report.read_text()
    assert "k = 0" in html and "nothing was pruned" in html


def test_evaluated_set_is_the_choice_or_says_it_is_not(tiny, tmp_path):
    """The main job prunes find's choice; after k = 0 it prunes the smallest k that beats no pruning with
    the bound lifted, and says that this is not the method's choice; with no such k, nothing."""
    import torch

    from mechcopy.attribution import CopyScores
    from mechcopy.method import evaluated
    from mechcopy.neurons import NeuronSet, model_fingerprint
    from mechcopy.selection import select
    from mechcopy.sweeps import KSweep

    fp = model_fingerprint(tiny)
    scores = CopyScores(torch.rand(tiny.cfg.n_layers, tiny.cfg.d_mlp, generator=torch.Generator().manual_seed(0)),
                        {"model": fp})
    path = scores.save(tmp_path / "s.scores.safetensors")
    rows = [{"k": 2, "dev_accuracy": 0.2, "feasible": False}, {"k": 4, "dev_accuracy": 0.5, "feasible": False},
            {"k": 8, "dev_accuracy": 0.6, "feasible": False}]
    sweep = KSweep(tuple(rows), {"dev_accuracy": 0.3}, 0, "global", 0.05, None)
    assert (sweep.smallest_unbounded_k, sweep.best_unbounded_k, sweep.best_pruned_k) == (4, 8, None)
    assert KSweep.from_json(sweep.to_json()) == sweep
    meta = {"k": 0, "why": "no k stays within the bound on general ability", "selection": "global",
            "scores_path": str(path), "sweep": sweep.to_json()}
    lifted = evaluated(NeuronSet((), fp, meta), sweep, scores)
    assert lifted.neurons == select(scores, "global", k=4).neurons
    assert lifted.meta["basis"].startswith("not the method's choice") and "k = 4" in lifted.meta["basis"]
    worse = KSweep(tuple(rows), {"dev_accuracy": 0.9}, 0, "global", 0.05, None)
    assert worse.smallest_unbounded_k is None and len(evaluated(NeuronSet((), fp, meta), worse, scores)) == 0
    chosen = NeuronSet(((0, 1),), fp, {"k": 1})
    assert evaluated(chosen, sweep, None).neurons == chosen.neurons
    assert evaluated(chosen, sweep, None).meta["basis"] == "chosen on the probe's dev split"
