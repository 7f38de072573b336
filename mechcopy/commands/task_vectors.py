"""`mechcopy task-vectors`: task vectors (Hendel et al.) per layer, unpruned vs pruned."""

from __future__ import annotations

import time
from pathlib import Path

from mechcopy.commands.common import (add_config_args, add_model_args, add_out_args, config_from_args, files_in,
                                      load_neurons, model_path, open_model, prepare_out, write_result)
from mechcopy.task_vectors import TaskVectorConfig, run_task_vectors
from mechcopy.tasks import check_shots, load_tasks

HELPS = {
    "shots": "demonstrations per extraction / ICL prompt",
    "n_extract": "extraction prompts averaged into the vector",
    "n_dev": "zero-shot dev prompts for choosing the layer",
    "n_test": "zero-shot test prompts per task",
    "seed": "seed of the split",
    "layers": "comma-separated layers to sweep (default: all)",
}


def run(args) -> int:
    t0 = time.time()
    tasks = load_tasks(args.tasks)
    check_shots(tasks, args.shots, "--shots")
    neurons, read = load_neurons("--prune", args.prune)
    config = config_from_args(TaskVectorConfig, args)
    out = prepare_out(args.out, {"--tasks": files_in(args.tasks), **read, "--model": model_path(args.model)},
                      args.force)
    model = open_model(args)
    if neurons is not None:
        neurons.check(model)
        if not neurons.pairs:
            print(f"{args.prune} holds no neurons ({neurons.why_empty}): nothing to prune, unpruned results only")
    results = run_task_vectors(model, tasks, config, neurons)
    for r in results:
        lo, hi = r.test_accuracy_ci
        print(f"{r.task:28s} {r.condition:9s} best layer {r.best_layer:2d}  task vector {r.test_accuracy:.2f} "
              f"[{lo:.2f}, {hi:.2f}]  copy {r.copy_rate:.2f}  zero-shot {r.zero_shot_accuracy:.2f}  "
              f"ICL {r.icl_accuracy:.2f}  (n={r.n_test})")
        if r.condition == "unpruned" and (r.n_dev < config.n_dev or r.n_test < config.n_test):
            print(f"{r.task}: only {r.n_dev} dev and {r.n_test} test prompts (asked {config.n_dev} and "
                  f"{config.n_test}): the task has too few usable pairs ({r.n_dropped} dropped); "
                  "its intervals are wide")
    if out:
        payload = {"command": "task-vectors", "config": config.to_json(), "tasks": args.tasks,
                   "prune": str(args.prune) if args.prune else None, "neurons": len(neurons) if neurons else 0,
                   "seconds": round(time.time() - t0, 1), "results": [r.to_json() for r in results]}
        print(f"-> {write_result(out, model, payload)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("task-vectors", help="task vectors (Hendel et al.): accuracy by layer, unpruned vs pruned")
    add_model_args(p)
    p.add_argument("--tasks", default="all", help="all | name,name | FILE.json")
    p.add_argument("--prune", type=Path, help="neurons.json (from `mechcopy find`): also run with these neurons pruned")
    add_config_args(p, TaskVectorConfig, HELPS)
    add_out_args(p, "results JSON")
    p.set_defaults(run=run)
