"""The per-prompt analysis of mean ablation (analyses/copy_per_prompt.py) against hand-computed examples, a
journal round trip through its command, and its committed SmolLM2 figures against the study's own pooled
differences (computed there from the same rows by another path). No model."""

import json
from pathlib import Path

import pytest

from mechcopy.suite import ResultRow
from conftest import analysis_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pp():
    return analysis_script("copy_per_prompt")


def row_json(task, condition, predictions, gold, demos, family=None, group=None, prompts=None):
    """A result row as the study's journals hold it: correct = the gold label, copy = a wrong demo label."""
    correct = [p == g for p, g in zip(predictions, gold)]
    copy = [not c and p in d for p, c, d in zip(predictions, correct, demos)]
    n = len(predictions)
    name = condition.split("@")[0]
    spec = {"name": name, "family": family or name, "group": group, "readout": {"scoring": "labels"}}
    out = {"task": task, "condition": condition, "n": n, "accuracy": sum(correct) / n, "copy_rate": sum(copy) / n,
           "copy_share_of_errors": 0.0, "other_rate": 0.0, "accuracy_ci": [0, 1], "copy_rate_ci": [0, 1],
           "predictions": list(predictions), "correct": correct, "copy": copy, "spec": spec}
    if prompts is not None:
        out["per_prompt"] = [{"prompt": t, "answer": g, "demo_labels": list(d), "prediction": p}
                             for t, g, d, p in zip(prompts, gold, demos, predictions)]
    return out


def rows(*objs):
    return [ResultRow.from_json(o) for o in objs]


def test_opposite_moves_cancel_in_the_mean_not_in_the_flips(pp):
    """Two prompts, one gained and one lost: mean Δ 0, mean |Δ| 1, ratio 0, both predictions changed."""
    gold, demos = ["a", "b"], [("c",), ("c",)]
    base = row_json("t", "unpruned", ["a", "c"], gold, demos)       # right, copy
    cond = row_json("t", "pruned@s0", ["c", "b"], gold, demos, group="s0")   # copy, right
    counts = pp.prompt_counts(*rows(base, cond))
    assert counts == {"n": 2, "changed": 2, "gold_gained": 1, "gold_lost": 1, "copy_gained": 1, "copy_lost": 1}
    p = pp.pooled({"t": counts})
    assert p["gold"]["mean"] == 0 and p["gold"]["mean_abs"] == 1 and p["gold"]["ratio"] == 0
    assert p["gold"]["gained"] == p["gold"]["lost"] == 0.5 and p["changed"] == 1
    assert p["gold"]["mcnemar_p"] == 1.0


def test_a_change_between_wrong_answers_is_a_change_not_a_gold_flip(pp):
    """Wrong -> other wrong: `changed` counts it, gold does not move; a copy turned into a non-demo answer is a
    copy lost; an unchanged prompt counts nowhere."""
    gold, demos = ["a", "a", "a"], [("b",), ("b",), ("b",)]
    base = row_json("t", "unpruned", ["b", "c", "a"], gold, demos)
    cond = row_json("t", "random-0@s0", ["d", "c", "a"], gold, demos, family="random", group="s0")
    counts = pp.prompt_counts(*rows(base, cond))
    assert counts == {"n": 3, "changed": 1, "gold_gained": 0, "gold_lost": 0, "copy_gained": 0, "copy_lost": 1}
    p = pp.pooled({"t": counts})
    assert p["gold"]["ratio"] is None and p["copy"]["ratio"] == 1 and p["copy"]["mean"] == pytest.approx(-1 / 3)


def test_pooled_weighs_each_task_the_same(pp):
    """Task A (n = 2): both gained, mean 1. Task B (n = 4): one gained, one lost, mean 0, |Δ| 0.5. Pooled over
    tasks: mean 0.5, mean |Δ| 0.75, ratio 2/3; between tasks |0.5| / mean(|1|, |0|) = 1; McNemar over the
    prompts: 3 gained, 1 lost, p = (1 + 4 + 4 + 1) / 16."""
    a = {"n": 2, "changed": 2, "gold_gained": 2, "gold_lost": 0, "copy_gained": 0, "copy_lost": 0}
    b = {"n": 4, "changed": 2, "gold_gained": 1, "gold_lost": 1, "copy_gained": 0, "copy_lost": 0}
    p = pp.pooled({"A": a, "B": b})
    g = p["gold"]
    assert (g["mean"], g["mean_abs"], g["gained"], g["lost"]) == pytest.approx((0.5, 0.75, 0.625, 0.125))
    assert g["ratio"] == pytest.approx(2 / 3) and g["between_tasks_ratio"] == pytest.approx(1.0)
    assert g["mcnemar_p"] == pytest.approx(10 / 16) and (g["n_gained"], g["n_lost"]) == (3, 1)
    assert p["changed"] == pytest.approx((1 + 0.5) / 2) and p["n_prompts"] == 6


def test_unpaired_rows_are_refused(pp):
    gold, demos = ["a", "b"], [("c",), ("c",)]
    base = row_json("t", "unpruned", ["a", "c"], gold, demos, prompts=["x", "y"])
    with pytest.raises(ValueError, match="not paired"):
        pp.prompt_counts(*rows(base, row_json("t", "pruned", ["a"], ["a"], [("c",)])))
    with pytest.raises(ValueError, match="other prompts"):
        pp.prompt_counts(*rows(base, row_json("t", "pruned", ["a", "c"], gold, demos, prompts=["x", "z"])))
    with pytest.raises(ValueError, match="no 'unpruned' row of that task"):
        pp.analyse(rows(base, row_json("u", "pruned", ["a", "c"], gold, demos)))


def write_journal(path, objs):
    path.write_text("".join(json.dumps({"key": str(i), "row": o}) + "\n" for i, o in enumerate(objs)))


def test_command_on_two_journals_by_hand(pp, tmp_path):
    """Two tasks, a neuron journal (chosen set, random set) and a heads-last journal (its own unpruned rows,
    equal to the first's): every pooled figure and the set-versus-random difference by hand; the file records
    its command and revision."""
    gold, demos = ["a", "a", "a", "a"], [("b",)] * 4
    base = {t: row_json(t, "unpruned", ["a", "a", "b", "b"], gold, demos) for t in ("t1", "t2")}
    neurons = [base["t1"], base["t2"],
               row_json("t1", "pruned@s0", ["b", "a", "a", "a"], gold, demos, group="s0"),      # +2 -1
               row_json("t2", "pruned@s0", ["a", "a", "b", "b"], gold, demos, group="s0"),      # nothing
               row_json("t1", "random-0@s0", ["a", "a", "b", "b"], gold, demos, family="random", group="s0"),
               row_json("t2", "random-0@s0", ["b", "a", "b", "b"], gold, demos, family="random", group="s0")]  # -1
    heads = [base["t1"], base["t2"],
             row_json("t1", "pruned@heads-last-s2", ["a", "a", "a", "b"], gold, demos, group="heads-last-s2"),
             row_json("t2", "pruned@heads-last-s2", ["a", "a", "a", "b"], gold, demos, group="heads-last-s2")]
    write_journal(tmp_path / "heldout_no-gold.jsonl", neurons)
    write_journal(tmp_path / "heads-last_heldout_no-gold.jsonl", heads)
    out = tmp_path / "pp.json"
    assert pp.main(["--work", str(tmp_path), "--model", "m", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["command"].startswith("python analyses/copy_per_prompt.py --work") and doc["git_revision"]
    assert "copy-control" not in doc
    ng = doc["no-gold"]
    assert ng["unpruned_predictions_agree"] is True and ng["tasks"] == ["t1", "t2"]
    assert set(ng["conditions"]) == {"pruned@s0", "random-0@s0", "pruned@heads-last-s2"}
    chosen = ng["conditions"]["pruned@s0"]
    assert chosen["tasks"] == {"t1": [4, 3, 2, 1, 1, 2], "t2": [4, 0, 0, 0, 0, 0]}
    g = chosen["pooled"]["gold"]          # t1: mean 1/4, |Δ| 3/4; t2: 0, 0
    assert (g["mean"], g["mean_abs"], g["ratio"], g["between_tasks_ratio"]) == pytest.approx((0.125, 0.375, 1 / 3, 1.0), rel=1e-3)   # 4 digits written
    r = ng["conditions"]["random-0@s0"]["pooled"]["gold"]   # t1: 0; t2: mean -1/4, |Δ| 1/4
    assert (r["mean"], r["mean_abs"], r["ratio"]) == pytest.approx((-0.125, 0.125, 1.0))
    v = ng["versus_random"]["pruned@s0_vs_random-0@s0"]
    # flips: t1 3/4 - 0, t2 0 - 1/4 -> mean 1/4; mean Δ: t1 1/4 - 0, t2 0 + 1/4 -> 1/4 on both tasks
    assert v["flips"]["diff"] == pytest.approx(0.25) and (v["flips"]["n_up"], v["flips"]["n_down"]) == (1, 1)
    assert v["mean"]["diff"] == pytest.approx(0.25) and v["mean"]["task_ci"] == pytest.approx([0.25, 0.25])
    assert "pruned@heads-last-s2_vs_random-0@s0" not in ng["versus_random"]   # another group
    h = ng["conditions"]["pruned@heads-last-s2"]["pooled"]["gold"]
    assert (h["mean"], h["ratio"], h["n_gained"]) == pytest.approx((0.25, 1.0, 2))
    # a journal whose unpruned predictions differ is said, not hidden
    heads[0] = row_json("t1", "unpruned", ["a", "b", "b", "b"], gold, demos)
    write_journal(tmp_path / "heads-last_heldout_no-gold.jsonl", heads)
    assert pp.per_prompt_report(tmp_path)["no-gold"]["unpruned_predictions_agree"] is False


def test_no_journal_is_refused(pp, tmp_path):
    with pytest.raises(SystemExit, match="no held-out journal"):
        pp.per_prompt_report(tmp_path)


COMMITTED = sorted(p.stem.removeprefix("copy_mechanism_per_prompt_")
                   for p in (ROOT / "docs/data").glob("copy_mechanism_per_prompt_*.json"))


def test_smollm2_figures_are_committed():
    assert "smollm2-135m" in COMMITTED


@pytest.mark.parametrize("model", COMMITTED)
def test_committed_figures_agree_with_the_study(model):
    """The committed per-prompt file's pooled mean Δ of the gold and copy outcomes equals the study's pooled
    accuracy and copy-rate differences (docs/data/copy_mechanism_<model>.json, from the same rows through
    `stats`), for every condition both hold, on the no-gold construction."""
    mine = json.loads((ROOT / f"docs/data/copy_mechanism_per_prompt_{model}.json").read_text())
    summary = ROOT / f"docs/data/copy_mechanism_{model}.json"
    if not summary.exists():
        pytest.skip(f"{summary.name} (the study's summary of {model}) is not committed yet")
    study = json.loads(summary.read_text())["table"]
    both = sorted(set(mine["no-gold"]["conditions"]) & set(study))
    assert len(both) >= 10
    for name in both:
        pooled = mine["no-gold"]["conditions"][name]["pooled"]
        assert pooled["gold"]["mean"] == pytest.approx(study[name]["accuracy"]["diff"], abs=1e-3), name
        assert pooled["copy"]["mean"] == pytest.approx(study[name]["copy_rate"]["diff"], abs=1e-3), name
