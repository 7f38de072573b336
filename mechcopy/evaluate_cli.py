"""`mechcopy evaluate`: ICL accuracy and copy-error rates per task, optionally under pruning."""

from __future__ import annotations

import time
from pathlib import Path


def run_evaluation(model, tasks, shots: int = 4, n: int = 100, seed: int = 0,
                   conditions=(("unpruned", []),), progress: bool = True) -> tuple[list[dict], dict]:
    """Build prompts for every task and evaluate each condition; returns (result rows, dropped counts).

    `conditions` is a list of (name, fwd_hooks). Each row is `TaskResult.to_json()` plus the task kind,
    the number of dropped pairs and the seconds the evaluation took.
    """
    from tqdm.auto import tqdm

    from mechcopy.evaluation import evaluate
    from mechcopy.tasks.prompts import build_prompts

    rows, dropped = [], {}
    todo = [(t, c) for t in tasks for c in conditions]
    bar = tqdm(total=len(todo), desc="evaluate", disable=not progress)
    for task in tasks:
        ps = build_prompts(task, model.tokenizer, k=shots, n=n, seed=seed)
        dropped[task.name] = [[list(pair), reason] for pair, reason in ps.dropped]
        for name, hooks in conditions:
            bar.set_postfix_str(f"{task.name} / {name}")
            t0 = time.perf_counter()
            result = evaluate(model, ps.prompts, fwd_hooks=hooks, condition=name, seed=seed)
            rows.append({**result.to_json(), "kind": task.kind, "n_dropped": len(ps.dropped),
                         "seconds": round(time.perf_counter() - t0, 2)})
            bar.update()
    bar.close()
    return rows, dropped


def results_table(rows: list[dict]):
    """A pandas table: task, condition, n, accuracy and copy rate with their 95% intervals."""
    import pandas as pd

    def fmt(x, ci):
        return f"{x:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"

    return pd.DataFrame([{
        "task": r["task"], "condition": r["condition"], "n": r["n"],
        "accuracy [95% CI]": fmt(r["accuracy"], r["accuracy_ci"]),
        "copy rate [95% CI]": fmt(r["copy_rate"], r["copy_rate_ci"]),
        "copy/errors": round(r["copy_share_of_errors"], 2), "other": round(r["other_rate"], 2),
    } for r in rows])


def _run(args) -> int:
    from mechcopy import load_model
    from mechcopy.sites import NeuronSet, model_fingerprint, write_json_atomic
    from mechcopy.tasks import load_tasks

    tasks = load_tasks(args.tasks)
    if args.random_baseline is not None and not args.prune:
        raise ValueError("--random-baseline needs --prune NEURONS.json (the set whose size and layers to match)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    conditions = [("unpruned", [])]
    settings = {"tasks": [t.name for t in tasks], "shots": args.shots, "n": args.n, "seed": args.seed,
                "template": "{x} -> {y}", "separator": "\n"}
    if args.prune:
        neurons = NeuronSet.load(args.prune)
        neurons.check(model)
        from mechcopy import pruning  # written by the attribution engineer; imported only when needed

        n_random = 5 if args.random_baseline is None else args.random_baseline
        conditions += list(pruning.conditions(model, neurons, n_random, args.seed))
        settings.update(prune=str(args.prune), n_neurons=len(neurons), random_baseline=n_random)
    t0 = time.perf_counter()
    rows, dropped = run_evaluation(model, tasks, args.shots, args.n, args.seed, conditions)
    settings["seconds"] = round(time.perf_counter() - t0, 1)
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(results_table(rows).to_string(index=False))
    print(f"\n{len(rows)} evaluations in {settings['seconds']} s")
    if args.out:
        path = write_json_atomic(args.out, {"model": model_fingerprint(model), "settings": settings,
                                            "results": rows, "dropped": dropped})
        print(f"wrote {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="ICL accuracy and copy-error rates per task (with 95%% bootstrap CIs)")
    p.add_argument("--model", default=None, help="zoo name or model folder (default: the zoo default)")
    p.add_argument("--tasks", default="all", help="'all', comma-separated task names, or a task FILE.json")
    p.add_argument("--shots", type=int, default=4, help="demonstrations per prompt (default 4)")
    p.add_argument("--n", type=int, default=100, help="prompts per task, capped by the data (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    p.add_argument("--prune", type=Path, default=None, help="a neuron file (JSON): also evaluate it pruned")
    p.add_argument("--random-baseline", type=int, default=None,
                   help="with --prune: this many random neuron sets of the same size and layers (default 5)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is often fastest on a machine other jobs share)")
    p.set_defaults(func=lambda args: _run(_default_model(args)))


def _default_model(args):
    if args.model is None:
        from mechcopy.models import DEFAULT_MODEL

        args.model = DEFAULT_MODEL
    return args
