"""`mechcopy function-vectors`: function vectors (Todd et al.) per layer beside Hendel task vectors,
unpruned vs pruned (`mechcopy.function_vectors`)."""

from __future__ import annotations

import time
from pathlib import Path

from mechcopy.commands.common import (add_config_args, add_model_args, add_out_args, at_least, config_from_args,
                                      files_in, load_neurons, model_path, open_model, prepare_out, write_result)
from mechcopy.commands.task_vectors import HELPS
from mechcopy.function_vectors import run_function_vectors
from mechcopy.task_vectors import TaskVectorConfig
from mechcopy.tasks import check_shots, load_tasks


def run(args) -> int:
    t0 = time.time()
    tasks = load_tasks(args.tasks)
    check_shots(tasks, args.shots, "--shots")
    components, read = load_neurons("--prune", args.prune)
    config = config_from_args(TaskVectorConfig, args)
    out = prepare_out(args.out, {"--tasks": files_in(args.tasks), **read, "--model": model_path(args.model)},
                      args.force)
    model = open_model(args)
    if components is not None:
        components.check(model)
        if not components.pairs:
            print(f"{args.prune} holds nothing to prune ({components.why_empty}): unpruned results only")
    results = run_function_vectors(model, tasks, config, args.n_heads, components)
    for r in results:
        heads = ", ".join(f"L{l}H{h}" for l, h in r.heads[:5])
        print(f"{r.task:28s} {r.condition:9s} best layer {r.best_layer:2d}  function vector {r.fv_test_accuracy:.2f}  "
              f"copy {r.fv_copy_rate:.2f}  zero-shot {r.zero_shot_accuracy:.2f}  ICL {r.icl_accuracy:.2f}  "
              f"top heads {heads}")
    if out:
        payload = {"command": "function-vectors", "config": config.to_json(), "n_heads": args.n_heads,
                   "tasks": args.tasks, "prune": str(args.prune) if args.prune else None,
                   "seconds": round(time.time() - t0, 1), "results": [r.to_json() for r in results]}
        print(f"-> {write_result(out, model, payload)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("function-vectors",
                       help="function vectors (Todd et al.): top heads by indirect effect, accuracy by layer beside "
                            "task vectors, unpruned vs pruned")
    add_model_args(p)
    p.add_argument("--tasks", default="all", help="all | name,name | FILE.json")
    p.add_argument("--prune", type=Path, help="a component file (neurons or heads): also run with it pruned")
    p.add_argument("--n-heads", type=at_least(1), default=10, help="heads summed into the vector (default 10)")
    add_config_args(p, TaskVectorConfig, HELPS)
    add_out_args(p, "results JSON")
    p.set_defaults(run=run)
