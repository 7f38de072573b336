"""The copy-mechanism study's driver (analyses/copy_mechanism.py) on a tiny model: the dev sweep against
separate label-scoring runs, the held-out conditions, both criteria by hand, and the paired copy-effect
difference (`copy_effect.copy_effect_difference`) against two separate `copy_effect` calls."""

from dataclasses import replace

import numpy as np
import pytest

from mechcopy.conditions import ConditionSpec
from mechcopy.copy_effect import copy_effect, copy_effect_difference
from mechcopy.evaluation import TaskResult
from mechcopy.suite import ResultRow
from mechcopy.tasks.copy_probe import CopyProbeConfig, build_copy_probe
from mechcopy.tasks.prompts import make_prompt
from conftest import analysis_script

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def study():
    return analysis_script("copy_mechanism")


def tiny_settings(study):
    return {**study.SETTINGS, "probe_tasks": ["max_digit", "repeated_symbol"], "n_attr": 3, "n_dev": 4, "n_test": 8,
            "steps": 2, "ks": [2, 4], "ppl_tokens": 64, "max_ppl_increase": 10.0,
            "heldout_tasks": ["chemical_state", "sentiment_binary"], "n": 6}


def test_copy_effect_difference_matches_two_effects(tiny):
    char_tok = tiny.tokenizer
    probe = build_copy_probe(char_tok, CopyProbeConfig(("max_digit", "repeated_symbol"), "copy-control", n_attr=24,
                                                       n_dev=0, n_test=0))
    rng = np.random.default_rng(0)
    per_task = {}
    for t in ("max_digit", "repeated_symbol"):
        ps = list(probe.split("attribution", t))
        labels = ps[0].label_space
        a = [rng.choice(p.demo_labels) if rng.random() < 0.6 else rng.choice(labels) for p in ps]
        b = [rng.choice(labels) for _ in ps]
        per_task[t] = (ps, a, b, labels)
    got = copy_effect_difference(per_task, n_boot=500)
    by_hand = {t: copy_effect(ps, a, labels).effect - copy_effect(ps, b, labels).effect
               for t, (ps, a, b, labels) in per_task.items()}
    assert got["tasks"] == pytest.approx(by_hand)
    assert got["diff"] == pytest.approx(np.mean(list(by_hand.values())))
    assert got["ci"][0] <= got["diff"] <= got["ci"][1]
    same = copy_effect_difference({t: (ps, a, a, labels) for t, (ps, a, _, labels) in per_task.items()}, n_boot=200)
    assert same["diff"] == 0 and same["ci"] == [0, 0]


def test_select_seed_dev_sweep_by_hand(study, tiny):
    """Every (ablation, k) of the dev sweep recomputed on its own: IG scores, top-k, hooks, label scoring
    task by task, perplexity; and the choice is the best feasible one, only if it beats unpruned."""
    from mechcopy import method
    from mechcopy.evaluation import perplexity
    from mechcopy.pruning import component_means, pruning_hooks
    from mechcopy.scoring import score_labels
    from mechcopy.selection import select

    s = tiny_settings(study)
    res = study.select_seed(tiny, 1, s)
    assert [(r["ablation"], r["k"]) for r in res["sweep"]] == [(a, k) for a in s["ablations"] for k in s["ks"]]
    probe = study._probe(tiny.tokenizer, "no-gold", 1, s)
    config = method.FindConfig(n=len(probe.attribution), steps=2, seed=1)
    scores = method.score(tiny, method.attribute(tiny, probe.attribution, config), config)
    means = component_means(tiny, probe.attribution, "neuron", "all")
    base_ppl = perplexity(tiny, n_tokens=64)
    assert res["base_ppl"] == pytest.approx(base_ppl)

    def dev_accuracy(hooks):
        accs = []
        for t, ps in study._by_task(probe.dev).items():
            answers = score_labels(tiny, ps, ps[0].label_space, fwd_hooks=hooks).predict()
            accs.append(np.mean([a == p.answer for a, p in zip(answers, ps)]))
        return np.mean(accs)

    assert res["dev_unpruned_accuracy"] == pytest.approx(dev_accuracy([]))
    for row in res["sweep"]:
        hooks = pruning_hooks(tiny, select(scores, "global", k=row["k"]), row["ablation"], "all",
                              means if row["ablation"] == "mean" else None)
        assert row["dev_accuracy"] == pytest.approx(dev_accuracy(hooks))
        assert row["ppl_increase"] == pytest.approx(perplexity(tiny, fwd_hooks=hooks, n_tokens=64) / base_ppl - 1, rel=1e-4)
    best = max((r for r in res["sweep"] if r["feasible"]), key=lambda r: (r["dev_accuracy"], -r["k"]))
    if best["dev_accuracy"] > res["dev_unpruned_accuracy"]:
        assert (res["chosen"]["ablation"], res["chosen"]["k"]) == (best["ablation"], best["k"])
        assert res["chosen"]["components"]["neurons"] == [list(n) for n in select(scores, "global", k=best["k"]).pairs]
    else:
        assert res["chosen"] is None and "beats the unpruned" in res["why"]


def _forced_selection(study, tiny, seed, s):
    """A selection as select_seed writes it, with a chosen set whatever the dev split says."""
    from mechcopy import method
    from mechcopy.pruning import component_means, component_sizes
    from mechcopy.selection import select

    probe = study._probe(tiny.tokenizer, "no-gold", seed, s)
    config = method.FindConfig(n=len(probe.attribution), steps=2, seed=seed)
    scores = method.score(tiny, method.attribute(tiny, probe.attribution, config), config)
    comps = select(scores, "global", k=4)
    return {"seed": seed, "chosen": {"condition": "mean-k4", "ablation": "mean", "k": 4, "dev_accuracy": 0.5,
                                     "components": comps.to_json()},
            "means": component_means(tiny, probe.attribution, "neuron", "all").to_json(),
            "sizes": component_sizes(tiny, probe.attribution, "neuron").to_json()}


def test_heldout_and_criteria_by_hand(study, tiny, tmp_path):
    s = tiny_settings(study)
    sels = [_forced_selection(study, tiny, seed, s) for seed in (0, 1)]
    rows, _ = study.heldout(tiny, sels, "no-gold", tmp_path / "ng.jsonl", s, progress=False)
    names = {r.condition for r in rows}
    assert names == {"unpruned", "pruned@s0", "pruned@s1", "random-0@s0", "random-1000@s1", "contextual", "batch",
                     "pruned+contextual@s0", "pruned+contextual@s1", "pruned+batch@s0", "pruned+batch@s1"}
    again, _ = study.heldout(tiny, sels, "no-gold", tmp_path / "ng.jsonl", s, progress=False)   # resumed: same rows
    assert [r.result.predictions for r in again] == [r.result.predictions for r in rows]
    cc, _ = study.heldout(tiny, sels, "copy-control", tmp_path / "cc.jsonl", s, progress=False)
    assert {r.task for r in cc} == {"chemical_state"}     # 2 labels: no copy effect to estimate
    probe = study.probe_test(tiny, sels, s)
    prompts = study._probe(tiny.tokenizer, "copy-control", 0, s).test
    crit = study.criteria(sels, probe, rows, cc, prompts, s)
    by = study._rows_by(rows)
    for g in ("s0", "s1"):
        for cal in ("contextual", "batch"):
            r = crit["versus_calibration"][g][f"pruned@{g}_vs_{cal}"]
            for t, d in r["per_task"].items():
                assert d == pytest.approx(np.mean(by[f"pruned@{g}"][t].result.correct) - np.mean(by[cal][t].result.correct))
        pt = crit["mechanism"][g]["probe_test"]
        rand = [k for k in probe["predictions"] if k.startswith("random-") and k.endswith(f"@{g}")]
        for t, ps in study._by_task(prompts).items():
            ce = lambda name: copy_effect(ps, probe["predictions"][name][t], ps[0].label_space).effect
            if ce(f"pruned@{g}") is not None:
                assert pt["tasks"][f"{t}#0"] == pytest.approx(ce(f"pruned@{g}") - ce(rand[0]))
    mean = crit["versus_calibration"]["mean_over_seeds"]["pruned_vs_contextual"]
    for t, d in mean["per_task"].items():
        assert d == pytest.approx(np.mean([np.mean(by[f"pruned@{g}"][t].result.correct) for g in ("s0", "s1")])
                                  - np.mean(by["contextual"][t].result.correct))
    # a seed whose dev sweep chose nothing enters the mean over seeds as the unpruned model
    with_empty = study.criteria(sels + [{"seed": 2, "chosen": None}], probe, rows, cc, prompts, s)
    assert with_empty["no_selection"] == ["s2"]
    mean = with_empty["versus_calibration"]["mean_over_seeds"]["pruned_vs_batch"]
    for t, d in mean["per_task"].items():
        accs = [np.mean(by[c][t].result.correct) for c in ("pruned@s0", "pruned@s1", "unpruned")]
        assert d == pytest.approx(np.mean(accs) - np.mean(by["batch"][t].result.correct))
    both = crit["mechanism"]["mean_over_seeds"]["probe_test"]
    third = with_empty["mechanism"]["mean_over_seeds"]["probe_test"]
    assert third["diff"] == pytest.approx(both["diff"] * len(both["tasks"]) / len(third["tasks"]))
    table = study.compare(rows, cc, "pruned@s0", "unpruned")
    for t, d in table["accuracy"]["per_task"].items():
        assert d == pytest.approx(np.mean(by["pruned@s0"][t].result.correct) - np.mean(by["unpruned"][t].result.correct))

    # the summary reads the same state back from the work folder
    import json
    for sel in sels:
        (tmp_path / f"select_seed{sel['seed']}.json").write_text(json.dumps(sel))
    (tmp_path / "probe_test.json").write_text(json.dumps(probe))
    import shutil
    shutil.copy(tmp_path / "ng.jsonl", tmp_path / "heldout_no-gold.jsonl")
    shutil.copy(tmp_path / "cc.jsonl", tmp_path / "heldout_copy-control.jsonl")
    (tmp_path / "costs.json").write_text(json.dumps(study.ablation_costs(tiny, sels, s)))
    doc = study.summary("tiny", tmp_path, s, tokenizer=tiny.tokenizer)
    assert {r["condition"] for r in doc["table"]} == names - {"unpruned"}
    assert doc["criteria"]["neurons"] == json.loads(json.dumps(crit))
    # no head arm: every seed's best mechanism is its neuron set, read under its own group names
    assert doc["best_arm"] == {"s0": "neurons", "s1": "neurons"} and "heads" not in doc["criteria"]
    best = doc["criteria"]["best"]["versus_calibration"]["mean_over_seeds"]
    assert best == doc["criteria"]["neurons"]["versus_calibration"]["mean_over_seeds"]
    assert {r["condition"]: r["ppl_increase"] for r in doc["table"]}["pruned+batch@s1"] == doc["ppl_increase"]["pruned@s1"]
    # the copy effect's paired prompt-level interval, on the copy-control prompts rebuilt from their seed
    row = {r["condition"]: r for r in doc["table"]}["pruned@s0"]["copy_effect"]
    assert row["prompt_diff"] == pytest.approx(row["diff"])
    assert row["prompt_ci"][0] <= row["prompt_diff"] <= row["prompt_ci"][1]
    assert len(json.dumps(doc)) < 64 * 1024
    assert doc["unpruned"]["accuracy"] == pytest.approx(np.mean([np.mean(r.result.correct) for r in by["unpruned"].values()]))
    paths = study.write_docs(doc, tmp_path / "docs.json")
    parts = [json.loads(p.read_text()) for p in paths]
    assert [p.name for p in paths] == ["docs.json", "docs_tasks.json", "docs_criteria_neurons.json", "docs_criteria_best.json"]
    assert parts[2]["criteria"]["mechanism"]["s0"]["holds"] == crit["mechanism"]["s0"]["holds"]
    assert set(parts[1]["rows"]) == {"no-gold", "copy-control"} and "per_task" not in parts[0]["table"]["pruned@s0"]["accuracy"]
    assert doc["standard"] is None      # the standard construction has not run

    # the standard construction: demos drawn freely (the gold may be among them), the same conditions
    std, _ = study.heldout(tiny, sels, "standard", tmp_path / "heldout_standard.jsonl", s, progress=False)
    assert {r.condition for r in std} == names and {r.task for r in std} == {"chemical_state", "sentiment_binary"}
    from mechcopy.tasks import load_tasks
    from mechcopy.tasks.prompts import build_prompts
    built = [build_prompts(t, tiny.tokenizer, shots=s["shots"], n=s["n"], seed=0, gold_in_demos=True).prompts
             for t in load_tasks("chemical_state,sentiment_binary")]
    assert any(p.answer in p.demo_labels for ps in built for p in ps)   # unlike no-gold
    by_std = study._rows_by(std)
    check = study.standard_check(std, {"neurons": sels + [{"seed": 2, "chosen": None}]})
    for t, d in check["table"]["pruned@s1"]["accuracy"]["per_task"].items():
        assert d == pytest.approx(np.mean(by_std["pruned@s1"][t].result.correct) - np.mean(by_std["unpruned"][t].result.correct))
    row = check["table"]["batch"]
    assert row["harms"] == (row["accuracy"]["task_ci"][1] < 0)
    over = check["over_seeds"]["neurons"]
    for t, d in over["per_task"].items():   # the seed that chose nothing counts as unpruned
        acc = lambda c: np.mean(by_std[c][t].result.correct)
        assert d == pytest.approx((acc("pruned@s0") + acc("pruned@s1") + acc("unpruned")) / 3 - acc("unpruned"))
    assert (over["seeds"], over["chose"]) == (3, 2)
    doc = study.summary("tiny", tmp_path, s, tokenizer=tiny.tokenizer)
    assert doc["standard"]["table"].keys() == check["table"].keys() and doc["finished"]["neurons"]["heldout_standard"]
    paths = study.write_docs(doc, tmp_path / "docs.json")
    assert paths[2].name == "docs_standard.json" and "over_seeds" in json.loads(paths[2].read_text())


def test_mechanism_criterion_on_made_rows(study):
    """A set that removes the copy effect on every task beside a random set that keeps it: criterion 1's
    held-out half holds; swapped, it fails."""
    def row(task, cond, ce):
        result = TaskResult(task, cond, 1, 1.0, 0.0, 0.0, 0.0, (1.0, 1.0), (0.0, 0.0), ("a",), (True,), (False,),
                            {"effect": ce})
        return ResultRow(result, "algorithmic", 0, 0.0, ConditionSpec(cond.split("@")[0], "pruned"))

    tasks = ["a", "b", "c", "d"]
    rows = [row(t, "unpruned", 0.3) for t in tasks]
    rows += [row(t, "pruned@s0", 0.02 * i) for i, t in enumerate(tasks)]
    rows += [row(t, "random-0@s0", 0.3 - 0.01 * i) for i, t in enumerate(tasks)]
    sel = [{"seed": 0, "chosen": {"k": 1}}]
    crit = study.criteria(sel, None, [], rows, settings=study.SETTINGS)
    held = crit["mechanism"]["s0"]["heldout"]
    assert held["per_task"] == pytest.approx({t: (0.3 - 0.01 * i) - 0.02 * i for i, t in enumerate(tasks)})
    assert held["holds"] and not crit["mechanism"]["s0"]["holds"]        # no probe half: not a mechanism
    swap = {"pruned@s0": "random-0@s0", "random-0@s0": "pruned@s0"}
    swapped = [replace(r, result=replace(r.result, condition=swap.get(r.condition, r.condition))) for r in rows]
    assert not study.criteria(sel, None, [], swapped, settings=study.SETTINGS)["mechanism"]["s0"]["heldout"]["holds"]


def test_head_arm_by_hand(study, tiny, tmp_path):
    """The head arm: IG over heads from each prompt's label-swap counterfactual recomputed on its own, the
    dev sweep over h against separate label-scoring runs, and the arm's held-out conditions and criteria
    under its own group names beside the neuron arm's."""
    import torch

    from mechcopy.attribution import make_target
    from mechcopy.evaluation import perplexity
    from mechcopy.head_attribution import head_integrated_gradients
    from mechcopy.pruning import component_means, pruning_hooks
    from mechcopy.scoring import score_labels
    from mechcopy.selection import select
    from mechcopy.tasks.pairs import label_swaps

    s = {**tiny_settings(study), "hs": [2, 3]}
    res = study.select_heads_seed(tiny, 1, s)
    probe = study._probe(tiny.tokenizer, "no-gold", 1, s)

    def preferred(p):   # by hand: the demo label whose first token the clean last position scores highest
        with torch.no_grad():
            logits = tiny(p.text)[0, -1]
        ids = [int(t[0]) for t in p.demo_label_ids]
        return p.demo_labels[int(np.argmax([float(logits[i]) for i in ids]))]

    swaps, dropped = label_swaps(probe.attribution, tiny.tokenizer, seed=1, choose_x=preferred)
    assert res["n_attribution"] == len(swaps) and res["n_dropped"] == len(dropped)
    for w in swaps:   # the target's X is the preferred label, and it is gone from the counterfactual
        assert w.x == preferred(w.clean).strip() and w.x not in [y.strip() for y in w.counterfactual.demo_labels]
        assert make_target("contrast", w.clean, tiny(w.clean.text)[0, -1]).copy == w.x_id
    ig = head_integrated_gradients(tiny, [w.clean for w in swaps], target="contrast", steps=2,
                                   baseline=[w.counterfactual for w in swaps], method="reference")
    mine, _, _ = study.head_attributions(tiny, probe.attribution, 1, s)
    assert mine.values == pytest.approx(ig.values, abs=1e-4)   # the fast path against the reference path
    assert mine.baseline == "counterfactual"
    means = component_means(tiny, probe.attribution, "head", "all")
    base_ppl = perplexity(tiny, n_tokens=64)
    assert [r["k"] for r in res["sweep"]] == [2, 3] and all(r["ablation"] == "mean" for r in res["sweep"])
    assert res["dev_unpruned_accuracy"] == pytest.approx(np.mean(
        [np.mean([a == p.answer for a, p in zip(score_labels(tiny, ps, ps[0].label_space).predict(), ps)])
         for ps in study._by_task(probe.dev).values()]))
    from mechcopy import method
    config = method.FindConfig(n=len(swaps), steps=2, seed=1, components="heads")
    scores = method.score(tiny, mine, config)
    for row in res["sweep"]:
        heads = select(scores, "global", k=row["k"])
        assert heads.kind == "head"
        hooks = pruning_hooks(tiny, heads, "mean", "all", means)
        accs = [np.mean([a == p.answer for a, p in zip(score_labels(tiny, ps, ps[0].label_space, fwd_hooks=hooks).predict(), ps)])
                for ps in study._by_task(probe.dev).values()]
        assert row["dev_accuracy"] == pytest.approx(np.mean(accs))
        assert row["ppl_increase"] == pytest.approx(perplexity(tiny, fwd_hooks=hooks, n_tokens=64) / base_ppl - 1, rel=1e-4)

    # the post-hoc arm: the same heads, mean-ablated at the last position only (means over last positions);
    # perplexity scores no window's last position, so the cost is 0 by construction
    last = study.select_heads_seed(tiny, 1, s, positions="last")
    means_last = component_means(tiny, probe.attribution, "head", "last")
    for row, frozen in zip(last["sweep"], res["sweep"]):
        assert (row["positions"], row["k"]) == ("last", frozen["k"]) and row["ppl_increase"] == pytest.approx(0, abs=1e-9)
        hooks = pruning_hooks(tiny, select(scores, "global", k=row["k"]), "mean", "last", means_last)
        accs = [np.mean([a == p.answer for a, p in zip(score_labels(tiny, ps, ps[0].label_space, fwd_hooks=hooks).predict(), ps)])
                for ps in study._by_task(probe.dev).values()]
        assert row["dev_accuracy"] == pytest.approx(np.mean(accs))

    # a forced head selection per seed runs through the held-out stage under its own names
    from mechcopy.pruning import component_sizes
    sel = {"seed": 0, "kind": "head", "chosen": {"condition": "mean-h2", "ablation": "mean", "k": 2, "dev_accuracy": 0.5,
                                                  "components": select(scores, "global", k=2).to_json()},
           "means": means.to_json(), "sizes": component_sizes(tiny, probe.attribution, "head").to_json()}
    rows, _ = study.heldout(tiny, [sel], "no-gold", tmp_path / "h.jsonl", s, progress=False, arm="heads")
    assert {r.condition for r in rows} == {"unpruned", "pruned@heads-s0", "random-0@heads-s0",
                                              "pruned+contextual@heads-s0", "pruned+batch@heads-s0"}
    nrows, _ = study.heldout(tiny, [], "no-gold", tmp_path / "n.jsonl", s, progress=False)
    by = study._rows_by(rows + nrows)
    assert by["unpruned"]["chemical_state"].result.predictions == study._rows_by(rows)["unpruned"]["chemical_state"].result.predictions
    crit = study.criteria([sel], None, [r for r in rows if r.condition != "unpruned"] + nrows, [], settings=s, arm="heads")
    r = crit["versus_calibration"]["heads-s0"]["pruned@heads-s0_vs_batch"]
    for t, d in r["per_task"].items():
        assert d == pytest.approx(np.mean(by["pruned@heads-s0"][t].result.correct) - np.mean(by["batch"][t].result.correct))
    # the dev-best arm per seed: the higher dev accuracy, ties to neurons
    n = [{"seed": 0, "chosen": {"dev_accuracy": 0.5}}, {"seed": 1, "chosen": {"dev_accuracy": 0.4}}, {"seed": 2, "chosen": None}]
    h = [{"seed": 0, "chosen": {"dev_accuracy": 0.5}}, {"seed": 1, "chosen": {"dev_accuracy": 0.6}}, {"seed": 2, "chosen": None}]
    assert study.best_arm(n, h) == {0: "neurons", 1: "heads", 2: None}


def test_attention_arm_by_hand(study, tiny, tmp_path):
    """heads-attn: the top h heads of the seed's heads-last ranking, the answer position's attention to the
    demo labels times f; each (h, f) of the dev sweep against a separate label-scoring run of that one
    condition, cost 0, the dev rule's choice (ties to the smaller h, then the larger f); the held-out stage
    under the arm's names with both calibrations, its random heads down-weighted by the same f."""
    import json

    from mechcopy.conditions import LABEL_ATTENTION, LABELS, Condition
    from mechcopy.heads import head_set
    from mechcopy.pruning import component_sizes
    from mechcopy.scoring import score_labels_conditions

    s = {**tiny_settings(study), "hs": [1, 2]}
    ranking = [[1, 0, 0.9], [0, 2, 0.8], [1, 3, 0.7]]
    (tmp_path / "heads-last_select_seed1.json").write_text(json.dumps({"scores_top": ranking}))
    res = study.select_attention_seed(tiny, 1, tmp_path, s)
    probe = study._probe(tiny.tokenizer, "no-gold", 1, s)
    assert [(r["k"], r["factor"]) for r in res["sweep"]] == [(1, 0.0), (1, 0.5), (2, 0.0), (2, 0.5)]
    for row in res["sweep"]:
        heads = head_set(tiny, [(l, h) for l, h, _ in ranking[:row["k"]]])
        c = Condition("x", components=heads, ablation=LABEL_ATTENTION, positions="last", factor=row["factor"], readout=LABELS)
        accs = [np.mean([a == p.answer for a, p in zip(score_labels_conditions(tiny, ps, ps[0].label_space, [c])["x"].predict(), ps)])
                for ps in study._by_task(probe.dev).values()]
        assert row["dev_accuracy"] == pytest.approx(np.mean(accs)) and row["ppl_increase"] == 0.0
    best = max(res["sweep"], key=lambda r: (r["dev_accuracy"], -r["k"], r["factor"]))
    if best["dev_accuracy"] > res["dev_unpruned_accuracy"]:
        assert res["chosen"]["condition"] == best["condition"] and res["chosen"]["factor"] == best["factor"]
    else:
        assert res["chosen"] is None and "beats the unpruned" in res["why"]
    with pytest.raises(FileNotFoundError, match="heads-last"):
        study.select_attention_seed(tiny, 2, tmp_path, s)

    sel = {"seed": 0, "kind": "head", "chosen": {"condition": "attn-h2-f0", "ablation": LABEL_ATTENTION, "positions": "last",
                                                  "k": 2, "factor": 0.0, "dev_accuracy": 0.5,
                                                  "components": head_set(tiny, [(1, 0), (0, 2)]).to_json()},
           "means": None, "sizes": component_sizes(tiny, probe.attribution, "head").to_json()}
    rows, _ = study.heldout(tiny, [sel], "no-gold", tmp_path / "a.jsonl", s, progress=False, arm="heads-attn")
    assert {r.condition for r in rows} == {"unpruned", "pruned@heads-attn-s0", "random-0@heads-attn-s0",
                                              "pruned+contextual@heads-attn-s0", "pruned+batch@heads-attn-s0",
                                              "others@heads-attn-s0"}
    assert {r.spec.factor for r in rows if r.condition != "unpruned"} == {0.0}
    assert {(r.spec.ablation, r.spec.seed) for r in rows if r.condition == "others@heads-attn-s0"} == {("other-attention", 0)}
    by = study._rows_by(rows)
    crit = study.criteria([sel], None, rows, [], settings=s, arm="heads-attn")["versus_others"]
    for t, d in crit["heads-attn-s0"]["accuracy"]["per_task"].items():   # the label edit against its control
        assert d == pytest.approx(np.mean(by["pruned@heads-attn-s0"][t].result.correct)
                                  - np.mean(by["others@heads-attn-s0"][t].result.correct))
    assert study.ablation_costs(tiny, [sel], s, arm="heads-attn") == {"pruned@heads-attn-s0": 0.0, "random-0@heads-attn-s0": 0.0}


def test_the_vowel_arm_takes_finds_set_as_it_is(study, tiny, tmp_path, monkeypatch):
    """`vowel`: the set `find` chose on the vowel probe, zeroed at every position, chosen whatever the copy
    probe's dev split says; its dev accuracy against a separate label-scoring run; refused for a model
    without a set."""
    from mechcopy.components import Components
    from mechcopy.conditions import LABELS, Condition
    from mechcopy.fingerprint import model_fingerprint
    from mechcopy.scoring import score_labels_conditions

    s = tiny_settings(study)
    path = Components(((0, 3), (1, 5), (1, 7)), model_fingerprint(tiny), {"k": 3}).save(tmp_path / "v.json")
    monkeypatch.setitem(study.VOWEL_SETS, "tiny", path)
    sel = study.select_vowel_seed(tiny, "tiny", 0, s)
    ch = sel["chosen"]
    assert (ch["ablation"], ch["positions"], ch["k"], sel["kind"]) == ("zero", "all", 3, "neuron")
    assert Components.from_json(ch["components"]).pairs == ((0, 3), (1, 5), (1, 7)) and sel["source"] == str(path)
    probe = study._probe(tiny.tokenizer, "no-gold", 0, s)
    c = Condition("x", components=Components.load(path), ablation="zero", positions="all", readout=LABELS)
    accs = [np.mean([a == p.answer for a, p in zip(score_labels_conditions(tiny, ps, ps[0].label_space, [c])["x"].predict(), ps)])
            for ps in study._by_task(probe.dev).values()]
    assert ch["dev_accuracy"] == pytest.approx(np.mean(accs)) and ch["ppl_increase"] > 0
    rows, _ = study.heldout(tiny, [sel], "no-gold", tmp_path / "h.jsonl", s, progress=False, arm="vowel")
    assert {"pruned@vowel-s0", "random-0@vowel-s0", "pruned+batch@vowel-s0"} <= {r.condition for r in rows}
    with pytest.raises(ValueError, match="chose k = 0"):
        study.select_vowel_seed(tiny, "smollm2-135m", 0, s)


def test_an_extra_arm_is_summarised_alone(study):
    """only_arm keeps the arm's own conditions, selections and criteria, and the rows it is compared with."""
    doc = {"selections": {"neurons": [1], "unibias": [2]}, "shared": {"neurons": {}, "unibias": {"a": 1}},
           "finished": {"neurons": {}, "unibias": {"select": [0]}}, "criteria": {"neurons": {"x": 1}, "unibias": {"y": 2}},
           "table": [{"condition": c} for c in ("contextual", "batch", "pruned@s0", "pruned@unibias-s0",
                                                "random-0@unibias-s1", "pruned+batch@unibias-s0", "pruned@heads-last-s0")],
           "ppl_increase": {"pruned@s0": 0.1, "pruned@unibias-s0": 0.0},
           "rows": {"no-gold": {"unpruned": 1, "pruned@s0": 2, "pruned@unibias-s0": 3}}}
    out = study.only_arm(doc, "unibias")
    assert [r["condition"] for r in out["table"]] == ["contextual", "batch", "pruned@unibias-s0", "random-0@unibias-s1",
                                                      "pruned+batch@unibias-s0"]
    assert out["selections"] == {"unibias": [2]} and out["criteria"] == {"unibias": {"y": 2}}
    assert out["ppl_increase"] == {"pruned@unibias-s0": 0.0} and out["rows"]["no-gold"] == {"unpruned": 1, "pruned@unibias-s0": 3}


def test_best_arm_takes_each_seeds_winner(study):
    """`as_best`: each seed's dev-best arm's rows and probe predictions under `best-s<seed>`, nothing else
    (rows made by hand; the arm a row came from is marked in its `kind`)."""
    def rows(arm, seed):
        g = study.group_of(arm, seed)
        return [ResultRow(TaskResult("t", f"{c}@{g}", 1, 1.0, 0.0, 0.0, 0.0, (1.0, 1.0), (0.0, 0.0), ("a",), (True,),
                                     (False,)), arm, 0, 0.0, ConditionSpec(c, "pruned")) for c in ("pruned", "random-0", "pruned+batch")]

    sel = lambda seed, acc: {"seed": seed, "chosen": None if acc is None else {"dev_accuracy": acc}}
    states = {
        "neurons": {"selections": [sel(0, 0.5), sel(1, 0.4), sel(2, None)],
                    "rows": {c: rows("neurons", 0) + rows("neurons", 1) for c in study.CONSTRUCTIONS},
                    "probe": {"predictions": {"unpruned": {"t": ["a"]}, "pruned@s0": {"t": ["n0"]}, "pruned@s1": {"t": ["n1"]}}}},
        "heads": {"selections": [sel(0, 0.5), sel(1, 0.6), sel(2, None)],
                  "rows": {c: rows("heads", 0) + rows("heads", 1) for c in study.CONSTRUCTIONS},
                  "probe": {"predictions": {"unpruned": {"t": ["a"]}, "pruned@heads-s1": {"t": ["h1"]}}}},
        "heads-last": {"selections": [], "rows": {c: [] for c in study.CONSTRUCTIONS}, "probe": None},
    }
    best = study.best_arm(states["neurons"]["selections"], states["heads"]["selections"])
    assert best == {0: "neurons", 1: "heads", 2: None}
    got = study.as_best(states, best)
    assert [s["seed"] for s in got["selections"]] == [0, 1, 2] and got["selections"][2]["chosen"] is None
    by = {(r.condition, r.kind) for r in got["rows"]["no-gold"]}   # the arm it came from, in `kind` here
    assert by == {("pruned@best-s0", "neurons"), ("random-0@best-s0", "neurons"), ("pruned+batch@best-s0", "neurons"),
                  ("pruned@best-s1", "heads"), ("random-0@best-s1", "heads"), ("pruned+batch@best-s1", "heads")}
    assert got["probe"]["predictions"] == {"unpruned": {"t": ["a"]}, "pruned@best-s0": {"t": ["n0"]},
                                           "pruned@best-s1": {"t": ["h1"]}}


def test_recipe_replays_the_dev_best_selection(study, tiny, tmp_path):
    """`find --recipe copy-mechanism` (`mechcopy.copy_mechanism`): the dev-best chosen set over the seeds of
    every arm, with its ablation, positions and means over the same attribution prompts recorded so that
    `evaluate --prune` applies it as the study did; k = 0 with the reason when no seed chose one."""
    from mechcopy.commands.evaluate import intervention
    from mechcopy.components import Components
    from mechcopy.copy_mechanism import best_selection, recipe_components
    from mechcopy.pruning import component_means

    s = tiny_settings(study)
    chosen = lambda comps, acc, ab="mean", pos="all": {"condition": f"{ab}-k{len(comps)}", "ablation": ab, "positions": pos,
                                                        "k": len(comps), "dev_accuracy": acc, "ppl_increase": 0.01,
                                                        "components": [list(p) for p in comps]}
    doc = {"model": "tiny", "settings": s, "selections": {
        "neurons": [{"seed": 0, "dev_unpruned_accuracy": 0.3, "chosen": chosen([(1, 3), (0, 5)], 0.4)},
                    {"seed": 1, "dev_unpruned_accuracy": 0.3, "chosen": None}],
        "heads": [{"seed": 0, "dev_unpruned_accuracy": 0.3, "chosen": chosen([(1, 2)], 0.45, pos="last")},
                  {"seed": 1, "dev_unpruned_accuracy": 0.3, "chosen": chosen([(0, 1)], 0.45)}],
        "heads-last": [{"seed": 2, "dev_unpruned_accuracy": 0.3, "chosen": chosen([(0, 0)], 0.3)}]}}
    arm, sel = best_selection(doc)          # a tie goes to the lower seed
    assert (arm, sel["seed"]) == ("heads", 0)
    comps = recipe_components(tiny, doc)
    assert comps.kind == "head" and comps.pairs == ((1, 2),) and comps.meta["seed"] == 0
    probe = study._probe(tiny.tokenizer, "no-gold", 0, s)
    by_hand = component_means(tiny, probe.attribution, "head", "last")
    path = comps.save(tmp_path / "c.json")
    how = intervention(Components.load(path), None, None)
    assert (how["ablation"], how["positions"], how["source"], how["factor"]) == ("mean", "last", "the file", None)
    assert all(np.allclose(how["means"].values[l].numpy(), by_hand.values[l].numpy()) for l in by_hand.values)
    # neurons win a tie with heads
    doc["selections"]["neurons"][0]["chosen"]["dev_accuracy"] = 0.45
    assert best_selection(doc)[0] == "neurons" and recipe_components(tiny, doc).pairs == ((0, 5), (1, 3))
    # every arm counts: a later arm with a higher dev accuracy wins, its attention edit recorded with its factor
    doc["selections"]["heads-last"][0]["chosen"]["dev_accuracy"] = 0.5
    assert best_selection(doc)[0] == "heads-last"
    attn = {**chosen([(1, 0), (0, 2)], 0.5, ab="label-attention", pos="last"), "factor": 0.0}
    doc["selections"]["heads-attn"] = [{"seed": 1, "kind": "head", "dev_unpruned_accuracy": 0.3, "chosen": attn}]
    assert best_selection(doc)[0] == "heads-last"          # a tie goes to the earlier arm
    attn["dev_accuracy"] = 0.55
    comps = recipe_components(tiny, doc)
    assert comps.meta["arm"] == "heads-attn" and comps.pairs == ((0, 2), (1, 0))
    assert comps.meta["intervention"] == {"ablation": "label-attention", "positions": "last", "factor": 0.0}
    how = intervention(Components.load(comps.save(tmp_path / "a.json")), None, None)
    assert (how["ablation"], how["positions"], how["factor"]) == ("label-attention", "last", 0.0)
    assert intervention(comps, "zero", None)["factor"] is None     # flags that ablate the heads drop the factor
    # unibias records its own kind
    doc["selections"]["unibias"] = [{"seed": 0, "kind": "neuron", "dev_unpruned_accuracy": 0.3,
                                     "chosen": chosen([(1, 4)], 0.6, ab="zero", pos="last")}]
    comps = recipe_components(tiny, doc)
    assert (comps.kind, comps.meta["arm"], comps.meta["intervention"]) == ("neuron", "unibias",
                                                                          {"ablation": "zero", "positions": "last"})
    # nothing chosen anywhere: an empty file that says why
    for arm in doc["selections"]:
        for sel in doc["selections"][arm]:
            sel["chosen"] = None
    empty = recipe_components(tiny, doc)
    assert not empty.pairs and empty.meta["k"] == 0 and "nothing to prune" in empty.meta["why"]
    assert Components.load(empty.save(tmp_path / "e.json")).meta["k"] == 0


def test_the_recipe_end_to_end_gives_the_studys_predictions(study, tiny, tmp_path, monkeypatch):
    """`--stage recipe` (`recipe_check`): `find --recipe` then `evaluate --prune` on the held-out tasks, as a
    user runs them, give the study's own predictions of the same prompts for a heads-attn selection (the
    attention edit, its calibrations) and the unpruned model; the gains over unpruned come from the same run."""
    import json

    import mechcopy.models
    from mechcopy.components import Components
    from mechcopy.heads import head_set
    from mechcopy.pruning import component_sizes

    s = tiny_settings(study)
    heads = head_set(tiny, [(1, 0), (0, 2)])
    probe = study._probe(tiny.tokenizer, "no-gold", 0, s)
    sel = {"seed": 0, "kind": "head", "dev_unpruned_accuracy": 0.3,
           "chosen": {"condition": "attn-h2-f0", "ablation": "label-attention", "positions": "last", "k": 2,
                      "factor": 0.0, "dev_accuracy": 0.5, "ppl_increase": 0.0, "components": heads.to_json()},
           "means": None, "sizes": component_sizes(tiny, probe.attribution, "head").to_json()}
    work = tmp_path / "work"
    work.mkdir()
    study.heldout(tiny, [{"seed": 0, "chosen": None}], "no-gold", work / "heldout_no-gold.jsonl", s, progress=False)
    study.heldout(tiny, [sel], "no-gold", work / "heads-attn_heldout_no-gold.jsonl", s, progress=False, arm="heads-attn")
    data = tmp_path / "docs" / "data"
    data.mkdir(parents=True)
    (data / "copy_mechanism_smollm2-135m.json").write_text(json.dumps(
        {"model": "smollm2-135m", "settings": s, "selections": {"neurons": [{"seed": 0, "chosen": None}]}}))
    (data / "copy_mechanism_smollm2-135m-n6_heads-attn.json").write_text(json.dumps(
        {"selections": {"heads-attn": [study._selection_json(sel)]}}))
    monkeypatch.setattr(mechcopy.models, "load_model", lambda name, **kw: tiny)
    monkeypatch.chdir(tmp_path)
    doc = study.recipe_check("smollm2-135m", work, s["n"], s)
    assert (doc["recipe"]["arm"], doc["recipe"]["ablation"], doc["recipe"]["factor"]) == ("heads-attn", "label-attention", 0.0)
    assert Components.load(work / "recipe" / "c.json").pairs == heads.pairs
    got = {(c["task"], c["evaluate_condition"]): c for c in doc["comparison"]}
    conditions = ("unpruned", "pruned", "contextual", "pruned+contextual", "batch", "pruned+batch")
    assert set(got) == {(t, c) for t in s["heldout_tasks"] for c in conditions}
    assert all(c["same_predictions"] == c["n"] == s["n"] for c in got.values())
    assert {"pruned", "contextual", "batch", "random"} <= set(doc["gain_over_unpruned"])
    rows = json.loads((work / "recipe" / "eval.json").read_text())["results"]
    acc = lambda c: np.mean([r["accuracy"] for r in rows if r["condition"] == c])
    assert doc["gain_over_unpruned"]["pruned"]["task_mean"] == pytest.approx(acc("pruned") - acc("unpruned"))


def test_the_recipe_reads_the_arms_summarised_beside_the_study(study, tmp_path):
    """`load_study`: the selections of `copy_mechanism_<model>*_<arm>.json` beside the study join it; two
    files that disagree on an arm are refused."""
    import json

    from mechcopy.copy_mechanism import load_study

    sel = lambda acc: [{"seed": 0, "dev_unpruned_accuracy": 0.3, "chosen": {"dev_accuracy": acc}}]
    (tmp_path / "copy_mechanism_m.json").write_text(json.dumps({"model": "m", "settings": {},
                                                                "selections": {"neurons": sel(0.4)}}))
    (tmp_path / "copy_mechanism_m-n100_heads-attn.json").write_text(json.dumps({"selections": {"heads-attn": sel(0.5)}}))
    (tmp_path / "copy_mechanism_m-n100_heads-attn_criteria_heads-attn.json").write_text(json.dumps({"criteria": {}}))
    (tmp_path / "copy_mechanism_other_unibias.json").write_text(json.dumps({"selections": {"unibias": sel(0.9)}}))
    got = load_study(tmp_path / "copy_mechanism_m.json")
    assert got["selections"] == {"neurons": sel(0.4), "heads-attn": sel(0.5)}
    (tmp_path / "copy_mechanism_m_heads-attn.json").write_text(json.dumps({"selections": {"heads-attn": sel(0.6)}}))
    with pytest.raises(ValueError, match="other heads-attn selections"):
        load_study(tmp_path / "copy_mechanism_m.json")


def test_evaluate_applies_a_recorded_attention_edit(tiny, tmp_path, monkeypatch, capsys):
    """`evaluate --prune` with a heads-attn file: the pruned condition is the label-attention edit with the
    recorded factor (its predictions those of a separate label-scoring run of that condition), its random
    heads get the same edit; generation is refused before the model loads."""
    import json

    import mechcopy.models
    from mechcopy.commands import main
    from mechcopy.conditions import LABEL_ATTENTION, LABELS, Condition
    from mechcopy.heads import head_set
    from mechcopy.scoring import score_labels_conditions
    from mechcopy.tasks import load_tasks
    from mechcopy.tasks.prompts import build_prompts

    loads = []
    monkeypatch.setattr(mechcopy.models, "load_model", lambda name, **kw: loads.append(name) or tiny)
    heads = head_set(tiny, [(1, 0), (0, 2)])
    comps = type(heads)(heads.pairs, heads.model, {"intervention": {"ablation": LABEL_ATTENTION, "positions": "last",
                                                                    "factor": 0.5}}, kind="head")
    path = comps.save(tmp_path / "c.json")
    out = tmp_path / "r.json"
    argv = ["evaluate", "--model", "tiny", "--tasks", "chemical_state", "--shots", "3", "--n", "6", "--prune", str(path),
            "--n-random", "1", "--no-gold-in-demos", "--out", str(out)]
    assert main(argv) != 0 and "add --scoring labels" in capsys.readouterr().err and not loads
    assert main([*argv, "--scoring", "labels", "--calibrate", "contextual"]) == 0
    data = json.loads(out.read_text())
    rows = {r["condition"]: r for r in data["results"]}
    assert data["settings"]["factor"] == 0.5 and data["settings"]["ablation"] == LABEL_ATTENTION
    assert {(rows[c]["spec"]["ablation"], rows[c]["spec"]["factor"]) for c in ("pruned", "random-0", "pruned+contextual")} \
        == {(LABEL_ATTENTION, 0.5)}
    (task,) = load_tasks("chemical_state")
    prompts = build_prompts(task, tiny.tokenizer, shots=3, n=6, seed=0, gold_in_demos=False).prompts
    c = Condition("x", components=heads, ablation=LABEL_ATTENTION, positions="last", factor=0.5, readout=LABELS)
    by_hand = score_labels_conditions(tiny, prompts, task.require_labels(), [c])["x"].predict()
    assert rows["pruned"]["predictions"] == list(by_hand)


def test_recipe_on_the_command_line(study, tiny, tmp_path, monkeypatch, capsys):
    """`mechcopy find --recipe copy-mechanism --study FILE` writes what `recipe_components` makes, and refuses
    a study of another model."""
    import json

    import mechcopy.models
    from mechcopy.commands import main
    from mechcopy.components import Components
    from mechcopy.copy_mechanism import recipe_components

    monkeypatch.setattr(mechcopy.models, "load_model", lambda name, **kw: tiny)
    s = tiny_settings(study)
    doc = {"model": "smollm2-135m", "settings": s, "selections": {"neurons": [
        {"seed": 0, "dev_unpruned_accuracy": 0.3, "chosen": {"condition": "zero-k2", "ablation": "zero", "k": 2,
                                                             "dev_accuracy": 0.4, "ppl_increase": 0.01,
                                                             "components": [[0, 1], [1, 2]]}}]}}
    path = tmp_path / "study.json"
    path.write_text(json.dumps(doc))
    assert main(["find", "--model", "smollm2-135m", "--recipe", "copy-mechanism", "--study", str(path),
                 "--out", str(tmp_path / "c.json")]) == 0
    got = Components.load(tmp_path / "c.json")
    want = recipe_components(tiny, doc)
    assert got.pairs == want.pairs == ((0, 1), (1, 2)) and got.meta["intervention"] == {"ablation": "zero", "positions": "all"}
    assert "neurons, selection seed 0" in capsys.readouterr().out
    assert main(["find", "--model", "gemma-3-270m", "--recipe", "copy-mechanism", "--study", str(path),
                 "--out", str(tmp_path / "d.json")]) != 0
    assert "is of 'smollm2-135m', not --model 'gemma-3-270m'" in capsys.readouterr().err


def test_a_rerun_at_another_n_reuses_only_the_n_free_state(study, tmp_path):
    """`--n`: the selections, probe test and costs of every arm are copied from the frozen run's folder
    (none depends on n); the held-out journals (which do) are not, and what is already there is kept."""
    frozen, work = tmp_path / "frozen", tmp_path / "work"
    frozen.mkdir()
    work.mkdir()
    names = ["select_seed0.json", "heads-last_select_seed2.json", "probe_test.json", "heads-last_probe_test.json",
             "costs.json", "heads-last_costs.json", "heldout_no-gold.jsonl", "heads-last_heldout_copy-control.jsonl"]
    for name in names:
        (frozen / name).write_text(name)
    (work / "costs.json").write_text("mine")
    copied = study.reuse_n_free(frozen, work)
    assert sorted(copied) == sorted(n for n in names if not n.endswith(".jsonl") and n != "costs.json")
    assert (work / "costs.json").read_text() == "mine"
    assert not list(work.glob("*.jsonl"))
    assert study.reuse_n_free(frozen, work) == []


@pytest.mark.parametrize("argv, says", [(["--stage", "heldout", "--n", "0"], "--n: must be an integer >= 1"),
                                        (["--stage", "select", "--n", "100"], "reruns the held-out stages only"),
                                        (["--stage", "summary", "--threads", "0"], "--threads: must be an integer >= 1"),
                                        (["--stage", "select", "--components", "vowel"], "--components vowel: no vowel-probe set for smollm2-135m")])
def test_the_driver_refuses_a_bad_option_before_anything_runs(study, argv, says, capsys, monkeypatch):
    import mechcopy

    monkeypatch.setattr(mechcopy, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        study.main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["probe", "costs", "heldout"])
def test_an_arm_that_chose_nothing_runs_no_later_stage(study, stage, tmp_path, capsys, monkeypatch):
    """A third-session arm whose every seed chose nothing: its later stages would only score the unpruned
    model again, so they write nothing and say why."""
    import json

    import mechcopy

    monkeypatch.setattr(mechcopy, "load_model", lambda *a, **k: object())
    for seed in (0, 1):
        (tmp_path / f"unibias_select_seed{seed}.json").write_text(json.dumps({"seed": seed, "chosen": None}))
    assert study.main(["--components", "unibias", "--stage", stage, "--work", str(tmp_path)]) == 0
    assert "no selection seed chose a set" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unibias_select_seed0.json", "unibias_select_seed1.json"]
