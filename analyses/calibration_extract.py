"""The small extract of a calibration evaluation that docs/calibration.md's numbers come from.

    python analyses/calibration_extract.py results/calibration/calibration_smollm2_nogold.json \
        docs/data/calibration_smollm2_nogold.json

Reads the JSON of `mechcopy evaluate --scoring labels --calibrate ... --prune ...` and keeps, without
per-prompt lists (the full file is far over the 64 KB a docs/data file may hold):

- `settings`, the model's name and weight hash, the git revision;
- `tasks`: per task and condition, n, accuracy and copy rate, and the copy effect (null with its
  reason where the prompts cannot estimate it) and demo share;
- `comparisons`: per metric (accuracy, copy_rate), per comparison named `CONDITION_vs_BASELINE`, the
  pooled paired difference (`pooled`: diff, ci, p_value, mde, n, n_up, n_down), the same with the task as
  the unit (`task_level`: mean, ci, p_value, bootstrap_ci, n_up, n_down, sign_p) and each task's
  difference (`tasks`: diff, ci, p_value);
- `per_task`: per task and metric, each comparison's difference again (the rows of the doc's per-task table);
- `copy_effect`: per condition, pooled over tasks and with the task as the unit.

    python analyses/calibration_extract.py --markdown docs/data/calibration_smollm2_nogold.json

prints docs/calibration.md's tables of an extract, each with its `Source:` line and the check comment
of `tests/test_docs_numbers.py`, so that the tables are written from the JSON and checked against it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROUND = 4


def _r(x):
    if isinstance(x, float):
        return round(x, ROUND)
    if isinstance(x, list):
        return [_r(v) for v in x]
    if isinstance(x, dict):
        return {k: _r(v) for k, v in x.items()}
    return x


def _pick(d: dict | None, keys) -> dict | None:
    return None if d is None else {k: d.get(k) for k in keys}


def _kept(spec: dict) -> bool:
    """Conditions kept per task: all but the random and bottom-score sets (their pooled comparisons stay)."""
    return spec["family"] not in ("random", "bottom")


def extract(data: dict) -> dict:
    rows = data["results"]
    tasks: dict[str, dict] = {}
    for r in (r for r in rows if _kept(r["spec"])):
        tasks.setdefault(r["task"], {})[r["condition"]] = {
            "n": r["n"], "accuracy": r["accuracy"], "copy_rate": r["copy_rate"],
            "copy_effect": _pick(r.get("copy_effect"), ("effect", "ci", "reason")),
            "demo_share": _pick(r.get("demo_share"), ("share", "chance", "p_value"))}
    comparisons: dict[str, dict] = {}
    levels = {(t["condition"], t["baseline"], t["metric"]): t for t in data.get("task_level", [])}
    for c in data.get("comparisons", {}).get("pooled", []):
        key = (c["condition"], c["baseline"], c["metric"])
        per_task = {t: next(d for d in cs if (d["condition"], d["baseline"], d["metric"]) == key)
                    for t, cs in data["comparisons"].items() if t in c["tasks"]}
        comparisons.setdefault(c["metric"], {})[f"{c['condition']}_vs_{c['baseline']}"] = {
            "pooled": _pick(c, ("diff", "ci", "p_value", "mde", "n", "n_tasks", "n_up", "n_down")),
            "task_level": _pick(levels[key], ("mean", "ci", "p_value", "bootstrap_ci", "n_tasks", "n_up", "n_down",
                                              "sign_p")),
            "tasks": ({t: _pick(d, ("diff", "ci", "p_value")) for t, d in per_task.items()}
                      if "random" not in key and "bottom" not in key else None)}
    effects = {cond: {"pooled": _pick(v["pooled"], ("effect", "ci", "present_rate", "absent_rate", "n", "reason")),
                      "task_level": _pick(v["task_level"], ("mean", "ci", "p_value", "n_tasks", "n_up", "n_down",
                                                            "sign_p")),
                      "tasks": v["tasks"]}
               for cond, v in data.get("copy_effect", {}).items()}
    per_task = {t: {m: {k: v["tasks"][t]["diff"] for k, v in comparisons.get(m, {}).items()
                        if v["tasks"] and t in v["tasks"]} for m in comparisons} for t in tasks}
    settings = {k: v for k, v in data["settings"].items() if k != "random_sets"}
    return _r({"model": {k: data["model"][k] for k in ("name", "weight_hash")}, "git_revision": data["git_revision"],
               "settings": settings, "random_sets": data["settings"].get("random_sets"), "tasks": tasks,
               "comparisons": comparisons, "per_task": per_task, "copy_effect": effects})


def _dump(obj, depth: int = 0) -> str:
    """JSON with one line per entry of the first three levels, compact below (small, and still diffable)."""
    if depth >= 3 or not isinstance(obj, dict) or not obj:
        return json.dumps(obj, separators=(",", ":"))
    pad = " " * (depth + 1)
    items = [f"{pad}{json.dumps(k)}: {_dump(v, depth + 1)}" for k, v in obj.items()]
    return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"


#: the comparisons the doc's tables show, in order: (condition, baseline)
SHOWN = (("pruned", "unpruned"), ("contextual", "unpruned"), ("batch", "unpruned"), ("pruned+contextual", "unpruned"),
         ("pruned+batch", "unpruned"), ("contextual", "pruned"), ("batch", "pruned"),
         ("pruned+contextual", "pruned"), ("pruned+batch", "pruned"), ("pruned+contextual", "contextual"),
         ("pruned+batch", "batch"))
#: the per-task table's comparisons: each fix against doing nothing and against the other, and pruning on top
PER_TASK = (("pruned", "unpruned"), ("contextual", "unpruned"), ("batch", "unpruned"), ("contextual", "pruned"),
            ("batch", "pruned"), ("pruned+contextual", "contextual"))
CONDITIONS = ("unpruned", "pruned", "contextual", "batch", "pruned+contextual", "pruned+batch")


def _f(x, signed=True, d=3) -> str:
    if x is None or x != x:
        return "n/a"
    return (f"{x:+.{d}f}" if signed else f"{x:.{d}f}").replace("-", "−")


def _p(x) -> str:
    return "n/a" if x is None or x != x else (f"{x:.2g}" if x >= 0.001 else f"{x:.1e}").replace("-", "−")


def markdown(ext: dict, path: str) -> str:
    """docs/calibration.md's tables of one extract (per-task accuracy and copy rate, pooled and task-level
    comparisons, per-task differences), each with its Source line and check comment."""
    src = f"Source: `{path}` (the command above, then `analyses/calibration_extract.py`)"
    tasks = list(ext["tasks"])
    conds = [c for c in CONDITIONS if all(c in ext["tasks"][t] for t in tasks)]
    out = []
    for metric in ("accuracy", "copy_rate"):
        spec = "\n".join(f"{c}: {c}.{metric}" for c in conds)
        head = "| task | n | " + " | ".join(conds) + " |\n|---|---|" + "---|" * len(conds)
        body = "\n".join(f"| {t} | {ext['tasks'][t]['unpruned']['n']} | " +
                         " | ".join(_f(ext['tasks'][t][c][metric], False) for c in conds) + " |" for t in tasks)
        out.append(f"{src}\n<!-- check rows=tasks key=@key\nn: unpruned.n\n{spec}\n-->\n{head}\n{body}")
    for metric in ("accuracy", "copy_rate"):
        comps = ext["comparisons"][metric]
        keys = [f"{c}_vs_{b}" for c, b in SHOWN if f"{c}_vs_{b}" in comps]
        head = ("| comparison | pooled Δ [95% CI] | p | tasks up/down (Holm) | over tasks, mean Δ [t interval] | p (t) "
                "| tasks up/down | sign test p |\n|---|---|---|---|---|---|---|---|")
        rows = []
        for k in keys:
            c, lv = comps[k]["pooled"], comps[k]["task_level"]
            rows.append(f"| `{k}` | {_f(c['diff'])} [{_f(c['ci'][0])}, {_f(c['ci'][1])}] | {_p(c['p_value'])} | "
                        f"{c['n_up']}/{c['n_down']} | {_f(lv['mean'])} [{_f(lv['ci'][0])}, {_f(lv['ci'][1])}] | "
                        f"{_p(lv['p_value'])} | {lv['n_up']}/{lv['n_down']} | {_p(lv['sign_p'])} |")
        spec = ("pooled Δ [95% CI]: pooled.diff, pooled.ci.0, pooled.ci.1\np: pooled.p_value\n"
                "tasks up/down (Holm): pooled.n_up, pooled.n_down\n"
                "over tasks, mean Δ [t interval]: task_level.mean, task_level.ci.0, task_level.ci.1\n"
                "p (t): task_level.p_value\ntasks up/down: task_level.n_up, task_level.n_down\nsign test p: task_level.sign_p")
        out.append(f"{src}\n<!-- check rows=comparisons.{metric} key=@key\n{spec}\n-->\n{head}\n" + "\n".join(rows))
    vs = [k for k in (f"{c}_vs_{b}" for c, b in PER_TASK) if k in ext["per_task"][tasks[0]]["accuracy"]]
    names = [k.replace("_vs_", " − ") for k in vs]
    for metric in ("accuracy", "copy_rate"):
        spec = "\n".join(f"{n}: {metric}.{k}" for n, k in zip(names, vs))
        head = "| task | " + " | ".join(names) + " |\n|---|" + "---|" * len(vs)
        body = "\n".join(f"| {t} | " + " | ".join(_f(ext["per_task"][t][metric][k]) for k in vs) + " |" for t in tasks)
        out.append(f"{src}\n<!-- check rows=per_task key=@key\n{spec}\n-->\n{head}\n{body}")
    eff = ext["copy_effect"]
    spec = ("copy effect [95% CI]: pooled.effect, pooled.ci.0, pooled.ci.1\nP(X), X shown: pooled.present_rate\n"
            "P(X), X not shown: pooled.absent_rate\nover tasks, mean [t interval]: task_level.mean, task_level.ci.0, "
            "task_level.ci.1\np (t): task_level.p_value\ntasks up/down: task_level.n_up, task_level.n_down\n"
            "sign test p: task_level.sign_p")
    head = ("| condition | copy effect [95% CI] | P(X), X shown | P(X), X not shown | over tasks, mean [t interval] "
            "| p (t) | tasks up/down | sign test p |\n|---|---|---|---|---|---|---|---|")
    rows = []
    for c in (c for c in CONDITIONS if c in eff and eff[c]["pooled"]["effect"] is not None):
        e, lv = eff[c]["pooled"], eff[c]["task_level"]
        rows.append(f"| {c} | {_f(e['effect'])} [{_f(e['ci'][0])}, {_f(e['ci'][1])}] | {_f(e['present_rate'], False)} | "
                    f"{_f(e['absent_rate'], False)} | {_f(lv['mean'])} [{_f(lv['ci'][0])}, {_f(lv['ci'][1])}] | "
                    f"{_p(lv['p_value'])} | {lv['n_up']}/{lv['n_down']} | {_p(lv['sign_p'])} |")
    out.append(f"{src}\n<!-- check rows=copy_effect key=@key\n{spec}\n-->\n{head}\n" + "\n".join(rows))
    return "\n\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="the JSON mechcopy evaluate wrote (with --markdown: an extract)")
    p.add_argument("out", type=Path, nargs="?", help="the extract to write (docs/data/calibration_*.json)")
    p.add_argument("--markdown", action="store_true", help="print the doc's tables of an extract instead")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.source.read_text(encoding="utf-8")), args.source.as_posix()))
        return 0
    if args.out is None:
        p.error("give the extract to write (OUT)")
    out = extract(json.loads(args.source.read_text(encoding="utf-8")))
    text = _dump(out) + "\n"
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text.encode()) / 1024:.1f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
