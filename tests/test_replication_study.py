"""The study's script (analyses/replication.py) end to end on a tiny model folder, at --smoke sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = "probe,attribution,selection,consistency,stability,ablation,cards,kcurve-tasks,evaluate-methods,evaluate-standard"


@pytest.mark.parametrize("variant", ["default"])
def test_study_stages_run_and_resume(tiny_llama_dir, tmp_path, variant, tiny_cache):
    cmd = [sys.executable, str(ROOT / "analyses" / "replication.py"), "--model", str(tiny_llama_dir),
           "--variant", variant, "--smoke", "--stages", STAGES, "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True, timeout=900,
                   env={**os.environ, "MECHCOPY_CACHE": str(tiny_cache)})
    out = tmp_path / tiny_llama_dir.name / variant
    res = {s: json.loads((out / f"{s}.json").read_text())["result"] for s in STAGES.split(",")}
    # every stage's result reads back as its type, and that writes the same JSON again
    sys.path.insert(0, str(ROOT / "analyses"))
    try:
        from study_results import STAGE_TYPES
    finally:
        sys.path.remove(str(ROOT / "analyses"))
    for stage, result in res.items():
        again = STAGE_TYPES[stage].from_json(result).to_json()
        assert json.dumps(again, sort_keys=True, default=str) == json.dumps(result, sort_keys=True), stage
    chosen = res["selection"]["chosen_k"]
    # ablation: zeroing and mean ablation at the k curve and the chosen k; zeroing repeats `consistency`
    assert res["ablation"]["ks"] == sorted({5, 10} | ({chosen} if chosen else set()))
    assert [res["ablation"][a]["ablation"] for a in ("zero", "mean", "zero, last position", "mean, last position")] == [
        "zero", "mean", "zero at the last position", "mean at the last position"]
    by_k = {r["k"]: r for r in res["ablation"]["zero"]["rows"]}
    for row in res["consistency"]["ig (variant)"]["rows"]:
        assert by_k[row["k"]]["per_prompt_chosen"] == row["per_prompt_chosen"]
    # the k curve on the tasks: every k of the dev sweep, unpruned + top-k + one random set per k
    ks = [r["k"] for r in res["selection"]["sweep"]["rows"]]
    assert res["kcurve-tasks"]["ks"] == ks and set(res["kcurve-tasks"]["pooled"]) == {str(k) for k in ks}
    conditions = {r["condition"] for r in res["kcurve-tasks"]["rows"]}
    assert conditions == {"unpruned"} | {f"{c}@{k}" for k in ks for c in ("pruned", "random-0")}
    tasks = {r["task"] for r in res["kcurve-tasks"]["rows"]}
    assert tasks == {"antonyms", "sentiment_binary"}
    assert all(len(r["correct"]) == 3 for r in res["kcurve-tasks"]["rows"])
    assert (out / "kcurve-tasks.png").stat().st_size > 10_000
    # each attribution's top-k set and its own random set at one k, beside unpruned
    methods = res["evaluate-methods"]
    assert methods["methods"] == list(res["consistency"]) and set(methods["pooled"]) == set(methods["methods"])
    assert {r["condition"] for r in methods["rows"]} == {"unpruned"} | {
        f"{c}@{name}" for name in methods["methods"] for c in ("pruned", "random-0")}
    assert methods["k"] == (chosen or methods["k"]) and methods["k"] > 0
    # the same set on the same prompts answers the same in both stages (each its own one-pass evaluation)
    curve = {(r["task"], r["condition"]): r["predictions"] for r in res["kcurve-tasks"]["rows"]}
    for r in methods["rows"]:
        if r["condition"] == "pruned@ig (variant)" and methods["k"] in ks:
            assert r["predictions"] == curve[(r["task"], f"pruned@{methods['k']}")]
        if r["condition"] == "unpruned":
            assert r["predictions"] == curve[(r["task"], "unpruned")]
    # the stability of every attribution compared; the variant's own overlap with itself is 1
    stab = res["stability"]["methods"]
    assert set(stab) == set(res["consistency"])
    assert all(v == 1.0 for v in stab["ig (variant)"]["jaccard_with_variant"].values())
    assert stab["ig (variant)"]["bootstrap"]["jaccard"] == res["stability"]["bootstrap_and_normalisations"][
        "bootstrap"][0]["jaccard"]
    # a second run skips every stage (resumes) and changes nothing
    before = {s: (out / f"{s}.json").read_bytes() for s in STAGES.split(",")}
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True, timeout=900,
                   env={**os.environ, "MECHCOPY_CACHE": str(tiny_cache)})
    assert before == {s: (out / f"{s}.json").read_bytes() for s in STAGES.split(",")}
    # the tables render every stage that ran, and nothing reads as broken
    tables = subprocess.run([sys.executable, str(ROOT / "analyses" / "replication_tables.py"), "--root", str(tmp_path),
                             "--models", tiny_llama_dir.name, "--variants", variant],
                            check=True, cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
    assert "unreadable" not in tables
    assert f"| {tiny_llama_dir.name} | {variant} | ig (variant), mean | 5 |" in tables
    assert f"| {tiny_llama_dir.name} | {variant} | ig (variant), mean, last position | 5 |" in tables
    assert f"| {tiny_llama_dir.name} | {variant} | 0 (unpruned)" in tables
    assert f"| {tiny_llama_dir.name} | {variant} | gradxact | {methods['k']} |" in tables
    for k in ks:
        assert f"| {tiny_llama_dir.name} | {variant} | {f'**{k}**' if k == chosen else k} |" in tables


def test_study_random_sets_matched_on_size(tiny_llama_dir, tmp_path, tiny_cache):
    """--random-match size reaches the guard, the consistency check and the evaluations, in its own folder."""
    stages = "probe,attribution,selection,consistency,evaluate-methods"
    cmd = [sys.executable, str(ROOT / "analyses" / "replication.py"), "--model", str(tiny_llama_dir),
           "--variant", "default", "--smoke", "--stages", stages, "--out", str(tmp_path), "--random-match", "size"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True, timeout=900,
                   env={**os.environ, "MECHCOPY_CACHE": str(tiny_cache)})
    out = tmp_path / tiny_llama_dir.name / "default-size"
    res = {s: json.loads((out / f"{s}.json").read_text())["result"] for s in stages.split(",")}
    assert {c["random_match"] for c in res["consistency"].values()} == {"size"}
    guard = res["selection"]["guard"]
    assert guard is None or guard["self_consistency"]["random_match"] == "size"
    assert json.loads((out / "settings.json").read_text())["variant"]["random_match"] == "size"
    assert {r["condition"] for r in res["evaluate-methods"]["rows"]} >= {"unpruned", "random-0@gradxact"}
