"""Per-prompt effects of mean ablation in the copy-mechanism study (issue 26, Deliver 3): what a mean over
prompts hides.

    python analyses/copy_per_prompt.py --work results/copy_mechanism/smollm2-135m --model smollm2-135m

Reads the study's held-out journals in `--work` (`[<arm>_]heldout_<construction>.jsonl`, written by
`analyses/copy_mechanism.py --stage heldout`; no model is loaded) and compares, prompt by prompt, every
condition with the `unpruned` row of the same journal (the same prompts, in the same order):

- `changed`: the share of prompts whose prediction changes; `gold`: gained (wrong -> right) and lost
  (right -> wrong); `copy`: gained (not a copy -> a copy, i.e. a wrong answer equal to a demo label) and lost.
- Per prompt Δ: the records hold each prompt's prediction (label scoring), not its log-probabilities,
  so Δ is the change of the 0/1 outcome (Δ = 1[condition right] - 1[unpruned right]; for `copy` the same
  with the copy outcome). Then mean Δ = gained - lost, mean |Δ| = gained + lost, the share with Δ > 0 is
  `gained` and with Δ < 0 `lost`, and `ratio` = |mean Δ| / mean |Δ| (1: every moved prompt moved the same
  way; 0: the moves cancel, which a mean over prompts cannot tell from no effect). `mcnemar_p`: the exact
  McNemar test of gained against lost over all prompts.
- Pooled over tasks, each task weighing the same (the mean of the tasks' shares; the ratio of the pooled
  means); `between_tasks_ratio` = |mean over tasks of mean Δ| / mean over tasks of |mean Δ| (the same
  question one level up: do tasks move in opposite directions?).
- `versus_random`: each chosen set (`pruned@G`) against its size-matched random set(s) of the same group,
  per task: the difference in the share of prompts whose gold outcome flips (mean |Δ|) and in mean Δ,
  with the task-level t interval (`stats.task_level`).

Writes `--out` (default `docs/data/copy_mechanism_per_prompt_<model>.json`) atomically, with the command
and the git revision. Descriptive: no criterion of docs/copy_mechanism.md rests on it.
"""

from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from mechcopy.suite import ResultRow

CONSTRUCTIONS = ("no-gold", "copy-control")
#: journal prefixes of the study's arms (analyses/copy_mechanism.py `_file`): neurons, heads, heads-last
ARM_PREFIXES = ("", "heads_", "heads-last_")
BASELINE = "unpruned"
#: per task, the counts stored (every per-task figure follows from them: Δ is a difference of 0/1 outcomes)
COUNTS = ("n", "changed", "gold_gained", "gold_lost", "copy_gained", "copy_lost")


def prompt_counts(base: "ResultRow", cond: "ResultRow") -> dict[str, int]:
    """One task's counts (`COUNTS`) of `cond` against `base`, prompt by prompt; refused when the two rows
    are not of the same prompts (other n, or other prompt texts where both rows record them)."""
    a, b = base.result, cond.result
    if a.task != b.task or a.n != b.n or len(a.predictions) != len(b.predictions):
        raise ValueError(f"{b.condition!r} on {b.task!r} (n={b.n}) is not paired with {a.condition!r} on {a.task!r} "
                         f"(n={a.n}): compare rows of one journal (the same prompts)")
    if base.per_prompt and cond.per_prompt and [r.prompt for r in base.per_prompt] != [r.prompt for r in cond.per_prompt]:
        raise ValueError(f"{b.condition!r} and {a.condition!r} on {a.task!r} were evaluated on other prompts")
    gold, copy = list(zip(a.correct, b.correct)), list(zip(a.copy, b.copy))
    return {"n": a.n, "changed": sum(x != y for x, y in zip(a.predictions, b.predictions)),
            "gold_gained": sum(y and not x for x, y in gold), "gold_lost": sum(x and not y for x, y in gold),
            "copy_gained": sum(y and not x for x, y in copy), "copy_lost": sum(x and not y for x, y in copy)}


def _ratio(mean: Fraction, mean_abs: Fraction) -> float | None:
    """|mean Δ| / mean |Δ| (None where nothing moved)."""
    return float(abs(mean) / mean_abs) if mean_abs > 0 else None


def pooled(per_task: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The figures of one condition over tasks, each task weighing the same (see the module's docstring);
    the shares are exact fractions until they are written, so moves that cancel give a ratio of exactly 0."""
    from mechcopy.stats import mcnemar_exact

    tasks = list(per_task.values())

    def mean(values: list[Fraction]) -> Fraction:
        return sum(values, Fraction(0)) / len(values)

    out: dict[str, Any] = {"n_tasks": len(tasks), "n_prompts": sum(t["n"] for t in tasks),
                           "changed": float(mean([Fraction(t["changed"], t["n"]) for t in tasks]))}
    for outcome in ("gold", "copy"):
        gained = [Fraction(t[f"{outcome}_gained"], t["n"]) for t in tasks]
        lost = [Fraction(t[f"{outcome}_lost"], t["n"]) for t in tasks]
        delta, moved = mean(gained) - mean(lost), mean(gained) + mean(lost)
        between = mean([abs(g - x) for g, x in zip(gained, lost)])
        n_gained, n_lost = sum(t[f"{outcome}_gained"] for t in tasks), sum(t[f"{outcome}_lost"] for t in tasks)
        out[outcome] = {"gained": float(mean(gained)), "lost": float(mean(lost)), "mean": float(delta),
                        "mean_abs": float(moved), "ratio": _ratio(delta, moved),
                        "between_tasks_ratio": _ratio(delta, between),
                        "n_gained": n_gained, "n_lost": n_lost, "mcnemar_p": mcnemar_exact(n_gained, n_lost)}
    return out


def _gold(condition: dict[str, Any], task: str, what: str) -> float:
    """One task's gold figure from its counts: `flips` (mean |Δ| = gained + lost) or `mean` (gained - lost)."""
    k = dict(zip(COUNTS, condition["tasks"][task]))
    return (k["gold_gained"] + (1 if what == "flips" else -1) * k["gold_lost"]) / k["n"]


def versus_random(conditions: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each chosen set against each random set of its group, task by task: the difference in the share of
    prompts whose gold outcome flips (`flips`: mean |Δ|) and in mean Δ (`mean`), each with its task-level
    95% t interval over the tasks both were evaluated on."""
    from mechcopy.stats import task_level

    out: dict[str, dict[str, Any]] = {}
    for name, c in conditions.items():
        if c["family"] != "pruned":
            continue
        for rname, r in conditions.items():
            if r["family"] != "random" or r["group"] != c["group"]:
                continue
            tasks = [t for t in c["tasks"] if t in r["tasks"]]
            entry: dict[str, Any] = {"n_tasks": len(tasks)}
            for what in ("flips", "mean"):
                level = task_level({t: _gold(c, t, what) - _gold(r, t, what) for t in tasks}, what, name, rname)
                entry[what] = {"diff": level.mean, "task_ci": list(level.ci), "n_up": level.n_up, "n_down": level.n_down}
            out[f"{name}_vs_{rname}"] = entry
    return out


def analyse(rows: Sequence["ResultRow"]) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[str, ...]]]:
    """Every condition of one journal's rows against its `unpruned` rows: ({condition: {family, group,
    kind, n_components, ablation, positions, calibration, tasks: {task: [COUNTS]}, pooled}}, {task: unpruned predictions})."""
    base = {r.task: r for r in rows if r.condition == BASELINE}
    if not base:
        raise ValueError(f"no {BASELINE!r} row among {sorted({r.condition for r in rows})}: nothing to compare with")
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.condition == BASELINE:
            continue
        if r.task not in base:
            raise ValueError(f"{r.condition!r} on {r.task!r} has no {BASELINE!r} row of that task in the same journal")
        c = out.setdefault(r.condition, {"family": r.spec.family, "group": r.spec.group, "kind": r.spec.kind,
                                         "n_components": r.spec.n_components, "ablation": r.spec.ablation, "positions": r.spec.positions,
                                         "calibration": r.spec.readout.calibration, "tasks": {}})
        counts = prompt_counts(base[r.task], r)
        c["tasks"][r.task] = [counts[k] for k in COUNTS]
    for c in out.values():
        c["pooled"] = pooled({t: dict(zip(COUNTS, v)) for t, v in c["tasks"].items()})
    return out, {t: r.result.predictions for t, r in base.items()}


def load_journal(path: Path) -> list["ResultRow"]:
    """The result rows of a `suite.run_evaluation` journal (one per (task, condition); a later line wins)."""
    from mechcopy.io import read_jsonl
    from mechcopy.suite import ResultRow

    rows: dict[tuple[str, str], ResultRow] = {}
    for entry in read_jsonl(path):
        if isinstance(entry, dict) and isinstance(entry.get("row"), dict):
            row = ResultRow.from_json(entry["row"])
            rows[(row.task, row.condition)] = row
    if not rows:
        raise ValueError(f"{path} holds no result row: is it a held-out journal of analyses/copy_mechanism.py?")
    return list(rows.values())


def per_prompt_report(work: Path) -> dict[str, Any]:
    """Both constructions, every arm's journal found in `work`: the conditions, their comparison with
    random sets, the journals read and whether their unpruned predictions agree."""
    out: dict[str, Any] = {}
    for construction in CONSTRUCTIONS:
        paths = [work / f"{p}heldout_{construction}.jsonl" for p in ARM_PREFIXES]
        paths = [p for p in paths if p.exists()]
        if not paths:
            continue
        conditions: dict[str, dict[str, Any]] = {}
        unpruned: list[dict[str, tuple[str, ...]]] = []
        for path in paths:
            found, base = analyse(load_journal(path))
            clash = sorted(set(found) & set(conditions))
            if clash:
                raise ValueError(f"{path} repeats the conditions {clash} of another journal of {work}")
            conditions.update(found)
            unpruned.append(base)
        same = all(u.get(t) == unpruned[0][t] for u in unpruned[1:] for t in unpruned[0])
        out[construction] = {"journals": [p.name for p in paths], "unpruned_predictions_agree": same,
                             "tasks": sorted(unpruned[0]), "conditions": conditions,
                             "versus_random": versus_random(conditions)}
    if not out:
        raise SystemExit(f"{work} holds no held-out journal ([<arm>_]heldout_<construction>.jsonl): run "
                         "analyses/copy_mechanism.py --stage heldout first")
    return out


def _rounded(obj: Any) -> Any:
    """The study's rounding (`analyses/copy_mechanism.py` `_rounded`: 4 significant digits)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("copy_mechanism", Path(__file__).with_name("copy_mechanism.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._rounded(obj)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None,
                    help="the study's work folder (default: results/copy_mechanism/<model>, as the study's)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from mechcopy.io import write_atomic
    from mechcopy.provenance import git_revision

    work = args.work or Path(f"results/copy_mechanism/{args.model}")
    out = args.out or Path(f"docs/data/copy_mechanism_per_prompt_{args.model}.json")
    doc = {"what": "per-prompt effects of every condition against unpruned on the same held-out prompts "
                   "(analyses/copy_per_prompt.py's docstring); Δ is the change of each prompt's 0/1 outcome "
                   "(the records hold predictions, not log-probabilities)",
           "model": args.model, "git_revision": git_revision(), "work": str(work),
           "command": f"python analyses/copy_per_prompt.py --work {work} --model {args.model}",
           "task_columns": list(COUNTS), **per_prompt_report(work)}
    write_atomic(out, json.dumps(_rounded(doc), indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
