"""The head maps' script (analyses/heads.py) end to end on a tiny model folder: every stage, the merged
JSON and the figure, and a rerun that resumes from the stage files."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_heads_script_on_a_tiny_model(tiny_llama_dir, tiny_cache, tmp_path):
    cmd = [sys.executable, str(ROOT / "analyses" / "heads.py"), "--model", str(tiny_llama_dir), "--task", "probe",
           "--n", "4", "--out-dir", str(tmp_path / "out"), "--data", str(tmp_path / "data"),
           "--figures", str(tmp_path / "fig")]
    env = {**os.environ, "MECHCOPY_CACHE": str(tiny_cache)}     # the tiny folder's processed entry stays in the tests' cache
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    (data,) = (tmp_path / "data").glob("heads_*_probe.json")
    d = json.loads(data.read_text())
    assert d["n_prompts"] == 4 and sum(d["outcomes"].values()) == 4
    for stage in ("dla", "ig", "patch"):
        assert len(d[stage]["mean"]) == 2 and len(d[stage]["mean"][0]) == 4
    assert d["dla"]["max_abs_error"] < 1e-4
    assert len(d["label"]["to_labels_all"]) == 2 and d["patch"]["n_pairs"] >= 1
    assert len(d["top"]["dla"]) == 5 and (tmp_path / "fig" / data.with_suffix(".png").name).exists()
    # a rerun reads the stage files instead of computing them again
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert again.returncode == 0 and " s\n" not in again.stdout
