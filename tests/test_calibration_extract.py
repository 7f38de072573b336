"""analyses/calibration_extract.py: the extract docs/calibration.md's numbers come from keeps the figures of
`mechcopy evaluate`'s JSON (checked against the per-prompt outcomes of its rows), and its Markdown tables
pass the docs' number check against the extract."""

import json
from pathlib import Path

import numpy as np
import pytest

from mechcopy.neurons import NeuronSet, model_fingerprint
from mechcopy.tasks.task import Task
from tests.test_docs_numbers import blocks, check_block
from tests.test_evaluation import ANSWERS
from conftest import analysis_script

ROOT = Path(__file__).resolve().parents[1]


def _module():
    return analysis_script("calibration_extract")


def _task(name: str, shift: int) -> Task:
    words = ("cat", "moon", "sky", "river", "stone", "apple", "tree", "house", "lamp", "road", "bird", "fish",
             "rain", "sand", "wolf")
    return Task(name, tuple((w, ANSWERS[(i + shift) % 3]) for i, w in enumerate(words)))


@pytest.fixture(scope="module")
def evaluated(tiny, tmp_path_factory):
    """`mechcopy evaluate --scoring labels --calibrate contextual,batch --prune` on the tiny model, three tasks."""
    import mechcopy
    from mechcopy.commands import main

    tmp = tmp_path_factory.mktemp("calib")
    mp = pytest.MonkeyPatch()
    mp.setattr(mechcopy.models, "load_model", lambda name, **kw: tiny)
    files = []
    for i, name in enumerate(("a", "b", "c")):
        f = tmp / f"{name}.json"
        f.write_text(json.dumps(_task(name, i).to_json()))
        files.append(str(f))
    neurons = tmp / "n.json"
    NeuronSet(((0, 1), (1, 2), (1, 7)), model_fingerprint(tiny)).save(neurons)
    out = tmp / "r.json"
    try:
        assert main(["evaluate", "--model", "tiny", "--tasks", ",".join(files), "--shots", "3", "--n", "12",
                     "--prune", str(neurons), "--n-random", "1", "--scoring", "labels",
                     "--calibrate", "contextual,batch", "--no-gold-in-demos", "--out", str(out)]) == 0
    finally:
        mp.undo()
    return json.loads(out.read_text()), tmp


def test_extract_keeps_the_figures_of_the_rows(evaluated):
    data, _ = evaluated
    ext = _module().extract(data)
    rows = {(r["task"], r["condition"]): r for r in data["results"]}
    assert set(ext["tasks"]) == {"a", "b", "c"}
    for (task, cond), r in rows.items():
        if r["spec"]["family"] in ("random", "bottom"):
            assert cond not in ext["tasks"][task]
            continue
        kept = ext["tasks"][task][cond]
        assert kept["n"] == len(r["correct"]) == 12
        assert kept["accuracy"] == pytest.approx(np.mean(r["correct"]), abs=1e-4)
        assert kept["copy_rate"] == pytest.approx(np.mean(r["copy"]), abs=1e-4)
    acc = {k: np.mean(r["correct"]) for k, r in rows.items()}
    for task in "abc":
        for key, want in (("contextual_vs_unpruned", acc[(task, "contextual")] - acc[(task, "unpruned")]),
                          ("pruned+batch_vs_pruned", acc[(task, "pruned+batch")] - acc[(task, "pruned")]),
                          ("batch_vs_pruned", acc[(task, "batch")] - acc[(task, "pruned")])):
            assert ext["per_task"][task]["accuracy"][key] == pytest.approx(want, abs=1e-4)
            assert ext["comparisons"]["accuracy"][key]["tasks"][task]["diff"] == pytest.approx(want, abs=1e-4)
    pooled = next(c for c in data["comparisons"]["pooled"]
                  if (c["condition"], c["baseline"], c["metric"]) == ("contextual", "pruned", "accuracy"))
    got = ext["comparisons"]["accuracy"]["contextual_vs_pruned"]
    assert got["pooled"]["diff"] == pytest.approx(pooled["diff"], abs=1e-4)
    assert got["pooled"]["diff"] == pytest.approx(np.mean([acc[(t, "contextual")] - acc[(t, "pruned")] for t in "abc"]),
                                                  abs=1e-4)
    assert got["task_level"]["n_tasks"] == 3
    assert got["task_level"]["mean"] == pytest.approx(got["pooled"]["diff"], abs=1e-4)   # equal weights: same mean
    assert ext["comparisons"]["accuracy"]["pruned_vs_random"]["tasks"] is None           # baselines: pooled only
    assert set(ext["copy_effect"]) >= {"unpruned", "pruned", "contextual", "pruned+batch"}


def test_markdown_tables_pass_the_docs_check(evaluated):
    data, tmp = evaluated
    mod = _module()
    ext = json.loads(json.dumps(mod.extract(data)))        # as read back from the file
    md = mod.markdown(ext, "docs/data/calibration_x.json")
    found = blocks(ROOT / "README.md", md)
    assert len(found) == 7                                  # accuracy, copy rate x (per task, comparisons, diffs) + copy effect
    for b in found:
        assert b.source == "docs/data/calibration_x.json" and check_block(b, ext) == []
    wrong = md.replace("| a | 12 |", "| a | 13 |", 1)
    assert any(check_block(b, ext) for b in blocks(ROOT / "README.md", wrong))
