"""`mechcopy evaluate`: ICL accuracy and copy-error rates per task, optionally under pruning."""

from __future__ import annotations

import time
from pathlib import Path

from mechcopy.commands.common import add_model_args, open_model, prepare_out, write_result


def run(args) -> int:
    import pandas as pd

    from mechcopy.evaluation import results_table, run_evaluation
    from mechcopy.neurons import NeuronSet
    from mechcopy.tasks import load_tasks

    tasks = load_tasks(args.tasks)
    if args.n_random is not None and not args.prune:
        raise ValueError("--n-random needs --prune NEURONS.json (the set whose size and layers to match)")
    neurons = NeuronSet.load(args.prune) if args.prune else None
    out = prepare_out(args.out, inputs=[args.tasks, args.prune])
    model = open_model(args)
    conditions = {"unpruned": None}
    settings = {"tasks": [t.name for t in tasks], "shots": args.shots, "n": args.n, "seed": args.seed,
                "template": "{x} -> {y}", "separator": "\n"}
    if neurons is not None:
        from mechcopy import pruning

        neurons.check(model)
        n_random = 5 if args.n_random is None else args.n_random
        conditions.update(pruning.condition_sets(model, neurons, n_random, args.seed))
        settings.update(prune=str(args.prune), n_neurons=len(neurons), n_random=n_random)
    t0 = time.perf_counter()
    rows, dropped = run_evaluation(model, tasks, args.shots, args.n, args.seed, conditions)
    settings["seconds"] = round(time.perf_counter() - t0, 1)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(results_table(rows).to_string(index=False))
    print(f"\n{len(rows)} evaluations in {settings['seconds']} s")
    if out:
        print(f"wrote {write_result(out, model, {'settings': settings, 'results': rows, 'dropped': dropped})}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="ICL accuracy and copy-error rates per task (with 95%% bootstrap CIs)")
    add_model_args(p)
    p.add_argument("--tasks", default="all", help="'all', comma-separated task names, or a task FILE.json")
    p.add_argument("--shots", type=int, default=4, help="demonstrations per prompt (default 4)")
    p.add_argument("--n", type=int, default=100, help="prompts per task, capped by the data (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prune", type=Path, default=None, help="a neuron file (JSON): also evaluate it pruned")
    p.add_argument("--n-random", type=int, default=None,
                   help="with --prune: this many random neuron sets of the same size and layers (default 5)")
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    p.set_defaults(run=run)
