"""A small, committable extract of a `mechcopy reproduce` run folder: what docs/reproduce.md quotes.

    python analyses/reproduce_extract.py RUN_DIR [--time-log TIME.err] [--revision 81a615e]
        [--out docs/data/reproduce_smollm2.json]

Reads the stage files of RUN_DIR (`neurons.json`, `find.json`, `evaluated.json`, `evaluate.json`,
`task_vectors.json`, `patching.json`, `settings.json`) and keeps the figures, not the predictions:
find's k sweep and its choice, the evaluated set, every pooled comparison and each task's pruned -
unpruned comparisons, the task vectors' best layer and test accuracy per task and condition (with
pruned - unpruned), and the neuron-set patching result. With `--time-log` (the stderr of
`/usr/bin/time -v`) it adds the peak resident memory and the wall time. Stage seconds are copied as
recorded; whether the machine was quiet is not in the files, so say it where they are quoted.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

COMPARISON = ("condition", "baseline", "metric", "diff", "ci", "p_value", "mde", "n", "n_up", "n_down")


def _stage(run: Path, name: str) -> dict:
    return json.loads((run / f"{name}.json").read_text(encoding="utf-8"))


def _compact(c: dict) -> dict:
    return {k: c[k] for k in COMPARISON if k in c}


def extract(run: Path, time_log: Path | None = None, revision: str | None = None) -> dict:
    meta = json.loads((run / "neurons.json").read_text(encoding="utf-8"))["meta"]
    sweep = meta["sweep"]
    find = _stage(run, "find")
    evaluated = json.loads((run / "evaluated.json").read_text(encoding="utf-8"))
    comparisons = _stage(run, "evaluate")["result"]["comparisons"]
    vectors = _stage(run, "task_vectors")["result"]["results"]
    patch = _stage(run, "patching")["result"]
    by_task: dict[str, dict] = {}
    for r in vectors:
        by_task.setdefault(r["task"], {})[r["condition"]] = {
            "best_layer": r["best_layer"], "test_accuracy": r["test_accuracy"], "n_test": r["n_test"]}
    for t, conds in by_task.items():
        if {"pruned", "unpruned"} <= set(conds):
            conds["pruned_minus_unpruned"] = conds["pruned"]["test_accuracy"] - conds["unpruned"]["test_accuracy"]
    out = {
        "source": "mechcopy reproduce --model MODEL --out RUN_DIR, extracted by analyses/reproduce_extract.py",
        "git_revision": revision, "model": sweep["model"],
        "settings": json.loads((run / "settings.json").read_text(encoding="utf-8")),
        "find": {"chosen_k": sweep["chosen_k"], "why": sweep["why"], "n_dev": sweep["n_dev"],
                 "max_ppl_increase": sweep["max_ppl_increase"], "baseline": sweep["baseline"],
                 "sweep": [{k: r[k] for k in ("k", "dev_accuracy", "dev_copy_rate", "ppl_increase", "feasible")}
                           for r in sweep["rows"]],
                 "least_ppl_increase": min(r["ppl_increase"] for r in sweep["rows"]),
                 "evaluated_k": find["result"].get("evaluated_k"), "evaluated_note": find["result"].get("evaluated"),
                 "evaluated_neurons": evaluated["neurons"]},
        "evaluate": {"pooled": [_compact(c) for c in comparisons["pooled"]],
                     "per_task": {t: [_compact(c) for c in cs if (c["condition"], c["baseline"]) == ("pruned", "unpruned")]
                                  for t, cs in comparisons.items() if t != "pooled"}},
        "task_vectors": by_task,
        "patching": {k: patch[k] for k in ("task", "corruption", "n_pairs", "n_dropped", "ld_clean", "ld_corrupt",
                                           "neurons", "neuron_all_positions")},
        "stage_seconds": {s: _stage(run, s)["seconds"] for s in ("find", "evaluate", "task_vectors", "patching")},
    }
    if time_log:
        text = time_log.read_text(encoding="utf-8", errors="replace")
        peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
        if peak:
            out["peak_rss_kb"] = int(peak.group(1))
        if wall:
            parts = [float(x) for x in wall.group(1).split(":")]
            out["wall_s"] = round(sum(v * 60 ** i for i, v in enumerate(reversed(parts))), 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--time-log", type=Path, default=None)
    p.add_argument("--revision", default=None, help="the git revision the run was made with")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from mechcopy.io import write_json_atomic

    out = extract(args.run, args.time_log, args.revision)
    if args.out:
        write_json_atomic(args.out, out)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
