"""Tasks as the unit of inference, from a result JSON's per-task comparisons.

    python analyses/task_level.py RESULT.json [--condition pruned] [--baseline unpruned]
        [--exclude copy_probe] [--out TASK_LEVEL.json]

RESULT.json is what `mechcopy evaluate --out` writes (or any JSON with `comparisons`: task ->
[Comparison.to_json(), ...], as `comparisons.compare_rows` returns). For each metric (accuracy, copy
rate), the per-task differences `condition - baseline` become one observation per task
(`mechcopy.stats.task_level`): the mean over tasks, a t interval and t-test, a bootstrap over tasks,
and the exact sign test. Prints and writes JSON beside the pooled comparison (which holds the tasks
fixed), so a report can say which of the two a claim rests on. No model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys


def task_level_report(result: dict, condition: str, baseline: str, exclude: tuple[str, ...]) -> dict:
    from mechcopy.stats import task_level_of

    comparisons = {t: cs for t, cs in result["comparisons"].items() if t not in exclude}
    out = {"condition": condition, "baseline": baseline, "excluded": list(exclude)}
    for metric in ("accuracy", "copy_rate"):
        pooled = next((c for c in comparisons.get("pooled", [])
                       if (c["condition"], c["baseline"], c["metric"]) == (condition, baseline, metric)), None)
        out[metric] = {"task_level": task_level_of(comparisons, condition, baseline, metric).to_json(),
                       "pooled": pooled}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result")
    p.add_argument("--condition", default="pruned")
    p.add_argument("--baseline", default="unpruned")
    p.add_argument("--exclude", default="copy_probe", help="comma-separated tasks left out (default: the probe)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from mechcopy.io import write_json_atomic

    with open(args.result, encoding="utf-8") as f:
        result = json.load(f)
    exclude = tuple(t for t in args.exclude.split(",") if t)
    out = {"source": args.result, "command": "python analyses/task_level.py " + " ".join(argv or sys.argv[1:]),
           **task_level_report(result, args.condition, args.baseline, exclude)}
    print(json.dumps(out, indent=2))
    if args.out:
        write_json_atomic(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
