"""Tasks as the unit of inference (`stats.task_level`) against scipy and hand computations, and on the
committed result JSON of the Gemma no-gold replicate (docs/data/replication_gemma_nogold_seed1.json)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as st

from mechcopy.stats import TaskLevel, task_level, task_level_of

ROOT = Path(__file__).resolve().parents[1]
DIFFS = {"a": 0.05, "b": -0.01, "c": 0.02, "d": 0.0, "e": 0.07, "f": 0.03}


def test_task_level_against_scipy_and_hand():
    r = task_level(DIFFS, "accuracy", "pruned", "unpruned", seed=1)
    x = np.array(list(DIFFS.values()))
    assert r.n_tasks == 6 and math.isclose(r.mean, sum(DIFFS.values()) / 6)
    sd = math.sqrt(sum((v - r.mean) ** 2 for v in x) / 5)
    half = st.t.ppf(0.975, 5) * sd / math.sqrt(6)                          # by hand
    assert r.ci == pytest.approx((r.mean - half, r.mean + half), abs=1e-12)
    assert r.ci == pytest.approx(st.t.interval(0.95, 5, loc=x.mean(), scale=st.sem(x)), abs=1e-12)
    assert r.p_value == pytest.approx(st.ttest_1samp(x, 0.0).pvalue, rel=1e-12)
    assert (r.n_up, r.n_down, r.n_zero) == (4, 1, 1)
    assert r.sign_p == pytest.approx(st.binomtest(4, 5, 0.5).pvalue) == pytest.approx(12 / 32)  # 2*(1+5)/32
    lo, hi = r.bootstrap_ci
    assert min(x) <= lo < r.mean < hi <= max(x)
    assert TaskLevel.from_json(json.loads(json.dumps(r.to_json()))) == r


def test_task_level_edges():
    one = task_level({"a": 0.1}, "accuracy", "x", "y")
    assert math.isnan(one.p_value) and math.isnan(one.ci[0]) and one.sign_p == 1.0
    flat = task_level({"a": 0.0, "b": 0.0}, "accuracy", "x", "y")
    assert flat.p_value == 1.0 and flat.sign_p == 1.0 and flat.n_zero == 2
    with pytest.raises(ValueError, match="at least one"):
        task_level({}, "accuracy", "x", "y")
    with pytest.raises(ValueError, match="finite"):
        task_level({"a": float("nan"), "b": 0.1}, "accuracy", "x", "y")


def test_task_level_of_the_committed_gemma_replicate():
    """The issue's figure: taking the task as the unit, Gemma's no-gold gain on the second draw has
    p = 0.13, where the pooled interval (tasks held fixed) lies above zero."""
    data = json.loads((ROOT / "docs/data/replication_gemma_nogold_seed1.json").read_text())["comparisons"]
    held_out = {t: cs for t, cs in data.items() if t != "copy_probe"}
    r = task_level_of(held_out, "pruned", "unpruned", "accuracy")
    pooled = next(c for c in data["pooled"] if (c["condition"], c["baseline"], c["metric"]) ==
                  ("pruned", "unpruned", "accuracy"))
    assert r.n_tasks == 21 and r.mean == pytest.approx(pooled["diff"], abs=1e-12)
    assert round(r.p_value, 2) == 0.13 and pooled["ci"][0] > 0 > r.ci[0]
    with pytest.raises(ValueError, match="no task has"):
        task_level_of(held_out, "pruned", "bottom", "accuracy")
