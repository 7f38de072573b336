"""`mechcopy reproduce` end to end on a tiny model: every stage, the report, resume, settings guard."""

import json

import pytest
import torch

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

    # the report is a view of the folder: rebuilt from the files alone, with no model loaded or run
    _report_is_a_view(out, monkeypatch, tiny.tokenizer)

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


def _report_is_a_view(out, monkeypatch, tokenizer):
    """`build_report(out)` takes no model, loads none and runs none (every torch module call, model
    constructor and loader fails here), and draws the same report the report stage drew. What it shows of
    the model was saved by the views stage, from the run's own probe."""
    import inspect
    import re

    import torch
    import transformer_lens

    import mechcopy
    from mechcopy import method
    from mechcopy.job import Run
    from mechcopy.models import loading
    from mechcopy.report import build_report

    assert list(inspect.signature(build_report).parameters) == ["out_dir"]
    before = (out / "report.html").read_text()
    run = Run.read(out)
    probe = method.prompts(tokenizer, CFG.find)
    assert run.views is not None and run.views.prompt in probe.dev[:16]      # the run's own (balanced) probe
    assert run.views.prompt.task.startswith("copy_probe:balanced")

    def no_model(*a, **k):
        raise AssertionError("the report touched a model")

    with monkeypatch.context() as m:
        m.setattr(torch.nn.Module, "__call__", no_model)
        m.setattr(transformer_lens.HookedTransformer, "__init__", no_model)
        m.setattr(mechcopy, "load_model", no_model)
        m.setattr(loading, "load_model", no_model)
        for f in (out / "figures").iterdir():
            f.unlink()
        (out / "report.html").unlink()
        result = build_report(out)
    after = (out / "report.html").read_text()
    same = lambda h: re.sub(r"circuits-vis-\w+|generated</strong></td><td>[^<]*", "X", h)
    assert same(after) == same(before) and len(result["figures"]) >= 5
    # every number the report's text shows has at most 3 decimals (the run details in the footer aside)
    text = re.sub(r"<script.*?</script>|<footer.*?</footer>|src=\"data:[^\"]*\"", "", after, flags=re.S)
    assert not re.findall(r"\d\.\d{4,}", text)


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


def test_views_hold_what_the_model_has(tiny, mamba):
    """The views stage saves attention only where the architecture has it, the neurons' activations only
    where there are neurons, and the report draws a view from the saved data as the model view would."""
    from mechcopy import viz
    from mechcopy.neurons import NeuronSet, model_fingerprint
    from mechcopy.label_attention import label_positions
    from mechcopy.views import MARK, copy_error_views, marked_tokens, top_heads

    find = rp.FindConfig(n=2, n_dev=4, steps=2)
    on_mamba = copy_error_views(mamba, find, NeuronSet(((0, 1), (1, 7)), model_fingerprint(mamba)))
    assert on_mamba.attention == () and on_mamba.neurons.labels == ("L0N1", "L1N7")
    assert len(on_mamba.neurons.activations) == len(on_mamba.tokens)
    empty = NeuronSet((), model_fingerprint(tiny), {"k": 0, "why": "no k helps"})
    on_tiny = copy_error_views(tiny, find, empty)
    assert on_tiny.neurons is None and len(on_tiny.attention) == 2
    att, dla = on_tiny.attention
    assert att.heads == tuple((0, h) for h in range(tiny.cfg.n_heads)) and "no neurons were evaluated" in att.chosen_by
    from_data = viz.to_json_props(viz.attention_heads_view(on_tiny.tokens, att.pattern, att.names))
    from_model = viz.to_json_props(viz.attention_view(tiny, on_tiny.prompt.text, 0))
    assert from_data["tokens"] == from_model["tokens"] and from_data["attentionHeadNames"] == from_model["attentionHeadNames"]
    assert torch.allclose(torch.tensor(from_data["attention"]), torch.tensor(from_model["attention"]), atol=1e-4)
    # the heads with the largest direct logit attribution, their demo-label tokens marked: as the model view draws them
    prompt = on_tiny.prompt
    assert dla.heads == tuple(sorted(top_heads(tiny, prompt))) and "direct logit attribution" in dla.chosen_by
    assert dla.marked == tuple(p for demo in label_positions(tiny, prompt) for p in demo)
    from_data = viz.to_json_props(viz.attention_heads_view(marked_tokens(on_tiny.tokens, dla.marked), dla.pattern,
                                                           dla.names))
    from_model = viz.to_json_props(viz.head_attention_view(tiny, prompt, top_heads(tiny, prompt)))
    assert from_data["tokens"] == from_model["tokens"] and from_data["attentionHeadNames"] == from_model["attentionHeadNames"]
    assert sum(t.startswith(MARK[0]) for t in from_data["tokens"]) == len(dla.marked) > 0
    assert torch.allclose(torch.tensor(from_data["attention"]), torch.tensor(from_model["attention"]), atol=1e-4)
