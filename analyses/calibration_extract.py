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
- `copy_effect`: per condition, pooled over tasks and with the task as the unit.
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
    settings = {k: v for k, v in data["settings"].items() if k != "random_sets"}
    return _r({"model": {k: data["model"][k] for k in ("name", "weight_hash")}, "git_revision": data["git_revision"],
               "settings": settings, "random_sets": data["settings"].get("random_sets"), "tasks": tasks,
               "comparisons": comparisons, "copy_effect": effects})


def _dump(obj, depth: int = 0) -> str:
    """JSON with one line per entry of the first three levels, compact below (small, and still diffable)."""
    if depth >= 3 or not isinstance(obj, dict) or not obj:
        return json.dumps(obj, separators=(",", ":"))
    pad = " " * (depth + 1)
    items = [f"{pad}{json.dumps(k)}: {_dump(v, depth + 1)}" for k, v in obj.items()]
    return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="the JSON mechcopy evaluate wrote")
    p.add_argument("out", type=Path, help="the extract to write (docs/data/calibration_*.json)")
    args = p.parse_args(argv)
    out = extract(json.loads(args.source.read_text(encoding="utf-8")))
    text = _dump(out) + "\n"
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text.encode()) / 1024:.1f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
