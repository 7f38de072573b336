"""`mechcopy task-vectors`: task vectors (Hendel et al.) per layer, unpruned vs pruned."""

from __future__ import annotations

import time
from pathlib import Path

from mechcopy.commands.common import add_config_args, add_model_args, config_from_args, open_model, prepare_out, write_result
from mechcopy.task_vectors import TaskVectorConfig

HELPS = {
    "shots": "demonstrations per extraction / ICL prompt",
    "n_extract": "extraction prompts averaged into the vector",
    "n_dev": "zero-shot dev prompts for choosing the layer",
    "n_test": "zero-shot test prompts per task",
    "seed": "seed of the split",
    "layers": "comma-separated layers to sweep (default: all)",
}


def run(args) -> int:
    from mechcopy.neurons import NeuronSet
    from mechcopy.task_vectors import run_task_vectors
    from mechcopy.tasks import load_tasks

    t0 = time.time()
    tasks = load_tasks(args.tasks)
    neurons = NeuronSet.load(args.prune) if args.prune else None
    config = config_from_args(TaskVectorConfig, args)
    out = prepare_out(args.out, inputs=[args.tasks, args.prune])
    model = open_model(args)
    results = []
    for task in tasks:
        try:
            res = run_task_vectors(model, [task], config, neurons)
        except ValueError as e:
            print(f"{task.name}: skipped ({e})")
            continue
        for r in res:
            results.append(r)
            print(f"{r.task:28s} {r.condition:9s} best layer {r.best_layer:2d}  task vector {r.test_accuracy:.2f}  "
                  f"copy {r.copy_rate:.2f}  zero-shot {r.zero_shot_accuracy:.2f}  ICL {r.icl_accuracy:.2f}  "
                  f"(n={r.n_test})")
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
    p.add_argument("--out", type=Path, help="results JSON")
    p.set_defaults(run=run)
