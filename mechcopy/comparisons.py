"""Paired comparisons of an evaluation's result rows (`compare_rows`), and its pandas tables.

Rows come from `suite.run_evaluation` (or its JSON). Conditions are grouped by their `spec`'s family,
never by their names: the `random` family is compared as one set of baselines, every `pruned`
condition against it, and every condition against `unpruned`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from mechcopy import stats


def _spec(row: dict[str, Any]) -> dict[str, Any]:
    if "spec" not in row:
        raise ValueError(f"result row ({row.get('task')!r}, {row.get('condition')!r}) carries no condition spec: it "
                         "was written by an older mechcopy; evaluate again to compare its conditions")
    return row["spec"]


def compare_rows(rows: list[dict], n_boot: int = 2000, seed: int = 0, group: str | int | None = None
                 ) -> dict[str, list[dict]]:
    """Paired comparisons of the conditions in `rows` (from `run_evaluation`), per task and pooled.

    For each task: every condition against `unpruned`, the `random` family as one set of baselines
    against `unpruned`, and each `pruned` condition against the random family
    (`mechcopy.stats.compare_task`), on accuracy and on copy rate. With `group`, only that group's
    conditions (and the ungrouped `unpruned`), labelled by their names within the group (`pruned`, not
    `pruned@20`). "pooled" weighs every task the same and leaves out the probe (`kind == "probe"`), on
    which the neurons were chosen. Returns {task or "pooled": [Comparison.to_json(), ...]}.
    """
    by_task: dict[str, dict[str, dict]] = defaultdict(dict)
    kinds: dict[str, str] = {}
    families: dict[str, str] = {}
    for r in rows:
        spec = _spec(r)
        if spec["group"] != group and not (spec["family"] == "unpruned" and spec["group"] is None):
            continue
        by_task[r["task"]][spec["name"]] = r
        families[spec["name"]] = spec["family"]
        kinds[r["task"]] = r.get("kind", "")
    out: dict[str, list[dict]] = {}
    for metric, key in (("accuracy", "correct"), ("copy_rate", "copy")):
        outcomes = {t: {c: np.asarray(r[key], dtype=bool) for c, r in conds.items()} for t, conds in by_task.items()}
        held_out = {t: o for t, o in outcomes.items() if kinds[t] != "probe"}
        for t, o in outcomes.items():
            if t not in held_out:
                out.setdefault(t, []).extend(c.to_json() for c in stats.compare_task(t, o, metric, families,
                                                                                       n_boot=n_boot, seed=seed))
        for c in stats.compare_all(held_out, metric, families, n_boot=n_boot, seed=seed):
            out.setdefault(c.task, []).append(c.to_json())
    return out


def results_table(rows: list[dict]):
    """A pandas table: task, condition, n, accuracy and copy rate with their 95% intervals."""
    import pandas as pd

    def fmt(x, ci):
        return f"{x:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"

    return pd.DataFrame([{
        "task": r["task"], "condition": r["condition"], "n": r["n"],
        "accuracy [95% CI]": fmt(r["accuracy"], r["accuracy_ci"]),
        "copy rate [95% CI]": fmt(r["copy_rate"], r["copy_rate_ci"]),
        "copy/errors": round(r["copy_share_of_errors"], 2), "other": round(r["other_rate"], 2),
    } for r in rows])


def comparisons_table(comparisons: list[dict]):
    """A pandas table of comparisons (`compare_rows` values): difference, 95% interval, p, MDE, n."""
    import pandas as pd

    return pd.DataFrame([{
        "comparison": f"{c['condition']} - {c['baseline']}", "metric": c["metric"], "diff": f"{c['diff']:+.3f}",
        "95% CI": f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]", "p": f"{c['p_value']:.3g}", "MDE": f"{c['mde']:.3f}",
        "n": c["n"], **({"tasks up/down (Holm)": f"{c['n_up']}/{c['n_down']}"} if "n_up" in c else {}),
    } for c in comparisons])
