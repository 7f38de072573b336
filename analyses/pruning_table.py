"""Pruning table: every task of the suite, unpruned vs pruned vs random-matched (5 seeds) vs bottom.

    python analyses/pruning_table.py --neurons results/attribution/smollm2-135m.neurons.json \
        [--model smollm2-135m] [--tasks all] [--n 50] [--shots 4] [--random 5] [--seed 0] \
        [--out results/attribution/smollm2-135m.pruning]

Writes <out>.json (every TaskResult, settings, fingerprint, wall times), <out>.csv and <out>.md (the
summary table: accuracy and copy rate with 95% bootstrap intervals; random = mean and standard
deviation over seeds) and prints the markdown. The neurons were chosen on the probe only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from mechcopy.conditions import UNPRUNED, standard_conditions
from mechcopy.fingerprint import model_fingerprint
from mechcopy.suite import run_evaluation


def pruning_table(model, neurons, tasks, n: int = 50, shots: int = 4, seed: int = 0, n_random: int = 5,
                  progress: bool = True) -> dict[str, Any]:
    """Evaluate every task under every condition; returns rows and a per-task summary (no printing)."""
    conds = [UNPRUNED, *standard_conditions(model, neurons, n_random=n_random, seed=seed)]
    t0 = time.perf_counter()
    rows, dropped = run_evaluation(model, tasks, shots=shots, n=n, seed=seed, conditions=conds, progress=progress)
    seconds = time.perf_counter() - t0
    summary = []
    for task in dict.fromkeys(r.task for r in rows):
        by = {r.spec.family: r for r in rows if r.task == task and r.spec.family != "random"}
        rand = [r.result for r in rows if r.task == task and r.spec.family == "random"]
        entry = {"task": task, "kind": by["unpruned"].kind, "n": by["unpruned"].result.n}
        for cond in ("unpruned", "pruned", "bottom"):
            if cond in by:
                res = by[cond].result
                entry[cond] = {"accuracy": res.accuracy, "accuracy_ci": list(res.accuracy_ci),
                               "copy_rate": res.copy_rate, "copy_rate_ci": list(res.copy_rate_ci)}
        if rand:
            accs, copies = [r.accuracy for r in rand], [r.copy_rate for r in rand]
            entry["random"] = {"accuracy_mean": statistics.mean(accs),
                               "accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                               "copy_rate_mean": statistics.mean(copies),
                               "copy_rate_sd": statistics.stdev(copies) if len(copies) > 1 else 0.0,
                               "seeds": len(rand)}
        summary.append(entry)
    return {"model": model_fingerprint(model), "n_neurons": len(neurons),
            "layer_counts": neurons.layer_counts(model.cfg.n_layers), "neurons": [list(x) for x in neurons.pairs],
            "settings": {"n": n, "shots": shots, "seed": seed, "n_random": n_random,
                         "tasks": [t.name for t in tasks], "selection": {k: v for k, v in neurons.meta.items()
                                                                        if k not in ("sweep",)}},
            "sweep": neurons.meta.get("sweep"), "rows": [r.to_json() for r in rows], "dropped": dropped,
            "summary": summary,
            "seconds": round(seconds, 1)}


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Join results computed on disjoint task subsets (e.g. in parallel processes) into one."""
    first = dict(parts[0])
    for key in ("rows", "summary"):
        first[key] = [x for part in parts for x in part[key]]
    first["dropped"] = {k: v for part in parts for k, v in part["dropped"].items()}
    first["settings"] = {**first["settings"], "tasks": [t for part in parts for t in part["settings"]["tasks"]]}
    first["seconds"] = round(sum(part["seconds"] for part in parts), 1)
    first["wall_s_parts"] = [part.get("wall_s") for part in parts]
    return first


def _ci(d: dict, key: str) -> str:
    lo, hi = d[key + "_ci"]
    return f"{d[key]:.2f} [{lo:.2f}, {hi:.2f}]"


def markdown(result: dict[str, Any]) -> str:
    """The summary as a markdown table (accuracy, then copy rate)."""
    head = ("| task | n | unpruned acc | pruned acc | random acc (mean ± sd) | bottom acc | "
            "unpruned copy | pruned copy | random copy | bottom copy |")
    lines = [head, "|" + "---|" * 10]
    for e in result["summary"]:
        r = e.get("random", {})
        lines.append(
            f"| {e['task']} | {e['n']} | {_ci(e['unpruned'], 'accuracy')} | {_ci(e['pruned'], 'accuracy')} | "
            f"{r.get('accuracy_mean', float('nan')):.2f} ± {r.get('accuracy_sd', float('nan')):.2f} | "
            f"{_ci(e['bottom'], 'accuracy') if 'bottom' in e else '-'} | "
            f"{_ci(e['unpruned'], 'copy_rate')} | {_ci(e['pruned'], 'copy_rate')} | "
            f"{r.get('copy_rate_mean', float('nan')):.2f} ± {r.get('copy_rate_sd', float('nan')):.2f} | "
            f"{_ci(e['bottom'], 'copy_rate') if 'bottom' in e else '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--neurons", type=Path, required=True)
    p.add_argument("--merge", type=Path, nargs="*", default=None,
                   help="instead of evaluating, join these result JSONs (disjoint task subsets) into --out")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="all")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--random", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import warnings

    import pandas as pd
    import torch

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    from mechcopy import load_model
    from mechcopy.components import Components
    from mechcopy.io import write_json_atomic
    from mechcopy.tasks import load_tasks

    t0 = time.perf_counter()
    neurons = Components.load(args.neurons)
    if args.merge:
        import json

        result = merge([json.loads(Path(f).read_text()) for f in args.merge])
    else:
        model = load_model(args.model)
        result = pruning_table(model, neurons, load_tasks(args.tasks), args.n, args.shots, args.seed, args.random)
        result["wall_s"] = round(time.perf_counter() - t0, 1)
    out = args.out or args.neurons.with_name(args.neurons.name.replace(".neurons.json", "") + ".pruning")
    write_json_atomic(out.with_name(out.name + ".json"), result)
    pd.DataFrame(result["rows"]).drop(columns=["predictions", "correct", "copy"]).to_csv(out.with_name(out.name + ".csv"), index=False)
    md = markdown(result)
    out.with_name(out.name + ".md").write_text(md + "\n")
    print(md)
    print(f"\n{len(neurons)} neurons; layer counts {result['layer_counts']}; {result['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
