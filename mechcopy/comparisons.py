"""Paired comparisons of an evaluation's result rows (`compare_rows`), with the task as the unit
(`task_levels`), the evaluation as a whole (`Evaluation`: rows, dropped pairs, comparisons, task
levels), and its pandas tables.

Rows are `suite.ResultRow`s (`suite.run_evaluation`'s, or read back with `ResultRow.from_json`).
Conditions are grouped by their spec's family, never by their names: the `random` family is compared as
one set of baselines, every `pruned` condition against it, every condition against `unpruned`, and each
against the conditions its spec's `versus` names (a calibration against pruning).

Two intervals answer two questions. The pooled comparison (`compare_rows`' "pooled") resamples
prompts within the tasks and holds the tasks fixed: did *these* tasks move? `task_levels` takes each
task's difference as one observation (t interval, bootstrap over tasks, sign test): would a task drawn
like these move? A claim about tasks in general rests on the second.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from mechcopy import stats
from mechcopy.stats import Comparison, TaskLevel
from mechcopy.suite import ResultRow


def compare_rows(rows: Sequence[ResultRow], n_boot: int = 2000, seed: int = 0, group: str | int | None = None
                 ) -> dict[str, list[Comparison]]:
    """Paired comparisons of the conditions in `rows` (from `run_evaluation`), per task and pooled.

    For each task: every condition against `unpruned`, the `random` family as one set of baselines
    against `unpruned`, each `pruned` condition against the random family, and each condition against
    those its spec's `versus` names (`mechcopy.stats.compare_task`), on accuracy and on copy rate. With
    `group`, only that group's conditions (and the ungrouped `unpruned`), labelled by their names within
    the group (`pruned`, not `pruned@20`). "pooled" weighs every task the same and leaves out the probe
    (`kind == "probe"`), on which the neurons were chosen. Returns {task or "pooled": [Comparison, ...]}.
    """
    by_task: dict[str, dict[str, ResultRow]] = defaultdict(dict)
    kinds: dict[str, str] = {}
    families: dict[str, str] = {}
    versus: dict[str, list[str]] = {}
    for r in rows:
        spec = r.spec
        if spec.group != group and not (spec.family == "unpruned" and spec.group is None):
            continue
        by_task[r.task][spec.name] = r
        families[spec.name] = spec.family
        versus[spec.name] = list(spec.versus)
        kinds[r.task] = r.kind
    out: dict[str, list[Comparison]] = {}
    for metric, key in (("accuracy", "correct"), ("copy_rate", "copy")):
        outcomes = {t: {c: np.asarray(getattr(r.result, key), dtype=bool) for c, r in conds.items()}
                    for t, conds in by_task.items()}
        held_out = {t: o for t, o in outcomes.items() if kinds[t] != "probe"}
        for t, o in outcomes.items():
            if t not in held_out:
                out.setdefault(t, []).extend(stats.compare_task(t, o, metric, families, n_boot=n_boot, seed=seed,
                                                                versus=versus))
        for c in stats.compare_all(held_out, metric, families, n_boot=n_boot, seed=seed, versus=versus):
            out.setdefault(c.task, []).append(c)
    return out


def task_levels(comparisons: Mapping[str, Sequence[Comparison]], seed: int = 0) -> list[TaskLevel]:
    """Every pooled comparison of `compare_rows`' output again with the task as the unit
    (`stats.task_level`: each task's difference one observation; t interval, bootstrap over tasks,
    exact sign test), over the same tasks (the pooled comparison's `tasks`), in the same order."""
    out = []
    for c in comparisons.get("pooled", []):
        pair = (c.condition, c.baseline, c.metric)
        diffs = {t: d.diff for t in c.tasks for d in comparisons[t] if (d.condition, d.baseline, d.metric) == pair}
        out.append(stats.task_level(diffs, c.metric, c.condition, c.baseline, seed=seed))
    return out


def comparisons_json(comparisons: Mapping[str, Sequence[Comparison]]) -> dict[str, list[dict[str, Any]]]:
    """`compare_rows`' answer as JSON: {task or "pooled": [Comparison.to_json(), ...]}."""
    return {task: [c.to_json() for c in cs] for task, cs in comparisons.items()}


def comparisons_from_json(obj: Mapping[str, Sequence[dict[str, Any]]]) -> dict[str, list[Comparison]]:
    """`comparisons_json`, read back."""
    return {task: [Comparison.from_json(c) for c in cs] for task, cs in obj.items()}


@dataclass(frozen=True)
class Evaluation:
    """Every task under every condition: the result rows, the pairs each task's prompt builder dropped
    (task -> [[pair, reason], ...]), the paired comparisons of the rows (`compare_rows`; empty when
    there is nothing to compare) and the pooled ones again with the task as the unit (`task_levels`).
    Its JSON is the main job's `evaluate.json` result."""

    rows: tuple[ResultRow, ...]
    dropped: dict[str, list] = field(default_factory=dict)
    comparisons: dict[str, list[Comparison]] = field(default_factory=dict)
    task_level: tuple[TaskLevel, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"results": [r.to_json() for r in self.rows], "dropped": self.dropped,
                "comparisons": comparisons_json(self.comparisons), "task_level": [t.to_json() for t in self.task_level]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Evaluation":
        return cls(tuple(ResultRow.from_json(r) for r in obj["results"]), obj.get("dropped", {}),
                   comparisons_from_json(obj.get("comparisons", {})),
                   tuple(TaskLevel.from_json(t) for t in obj.get("task_level") or ()))


def results_table(rows: Sequence[ResultRow]):
    """A pandas table: task, condition, n, accuracy and copy rate with their 95% intervals, and beside
    the copy rate the copy effect (`-` where the row has none, `n/a` where it is null: its
    `copy_effect.reason` says why, e.g. an open task, or 2 labels with no gold among the demos)."""
    import pandas as pd

    def fmt(x, ci):
        return f"{x:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"

    def effect(r: ResultRow) -> str:
        ce = r.result.copy_effect
        if ce is None:
            return "-"
        return "n/a" if ce["effect"] is None else f"{ce['effect']:+.2f} [{ce['ci'][0]:+.2f}, {ce['ci'][1]:+.2f}]"

    return pd.DataFrame([{
        "task": r.task, "condition": r.condition, "n": r.result.n,
        "accuracy [95% CI]": fmt(r.result.accuracy, r.result.accuracy_ci),
        "copy rate [95% CI]": fmt(r.result.copy_rate, r.result.copy_rate_ci), "copy effect [95% CI]": effect(r),
        "copy/errors": round(r.result.copy_share_of_errors, 2), "other": round(r.result.other_rate, 2),
    } for r in rows])


def task_level_table(levels: Sequence[TaskLevel]):
    """A pandas table of `task_levels`: mean difference over tasks, t interval, p, sign test."""
    import pandas as pd

    return pd.DataFrame([{
        "comparison": f"{t.condition} - {t.baseline}", "metric": t.metric, "mean over tasks": f"{t.mean:+.3f}",
        "95% CI (t)": f"[{t.ci[0]:+.3f}, {t.ci[1]:+.3f}]", "p (t)": f"{t.p_value:.3g}",
        "tasks up/down": f"{t.n_up}/{t.n_down}", "p (sign)": f"{t.sign_p:.3g}", "tasks": t.n_tasks,
    } for t in levels])


def comparisons_table(comparisons: Sequence[Comparison]):
    """A pandas table of comparisons (`compare_rows` values): difference, 95% interval, p, MDE, n."""
    import pandas as pd

    return pd.DataFrame([{
        "comparison": f"{c.condition} - {c.baseline}", "metric": c.metric, "diff": f"{c.diff:+.3f}",
        "95% CI": f"[{c.ci[0]:+.3f}, {c.ci[1]:+.3f}]", "p": f"{c.p_value:.3g}", "MDE": f"{c.mde:.3f}",
        "n": c.n, **({"tasks up/down (Holm)": f"{c.n_up}/{c.n_down}"} if c.n_up is not None else {}),
    } for c in comparisons])
