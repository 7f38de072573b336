"""Evaluator speed: today's path against the one-pass path, on the same prompts and conditions.

    python benchmarks/eval_speed.py [--model smollm2-135m] [--n 20] [--threads 1] [--batch-size 128]
        [--neurons N.json] [--k 20] [--ablation zero|mean] [--breakdown] [--out results/eval_speed.json]

Every built-in task (20), `--n` prompts each, 6 conditions: unpruned, pruned, 3 random layer-matched
sets, bottom, zeroed or (`--ablation mean`) mean-ablated. The neuron set is the top `--k` of random
copy scores (seeded), or `--neurons` (its bottom set comes from the scores file it names, if any).

- old: today's evaluator, TransformerLens' own weight layout (a transposed copy of every weight
  matrix on every call), only prompts of equal token length in a batch (`predict(..., pad=False)`),
  one run per condition.
- new: weights stored as TransformerLens reads them (`models.loading.store_as_read`, the layout
  `load_model` gives), left-padded batches, every condition in one pass (`predict_conditions`).
- `--breakdown` adds old batching on the new layout, to split the gain between the two.

Prints and writes JSON: wall and CPU seconds per path, prompts per second (prompt x condition pairs),
the ratio, and whether every prediction is identical (exit status 1 if not). Timings on a shared
machine are not comparable: run alone, with `--threads` set (one thread is fastest beside other jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import torch


def stock_layout(model) -> None:
    """Back to TransformerLens' own (contiguous) weight layout: today's evaluator's."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.contiguous()


def neuron_sets(model, neurons_path, k: int, seed: int, ablation: str = "zero", prompts=()) -> list:
    """The 6 conditions: unpruned, pruned, 3 random sets, bottom; zeroed, or mean-ablated (means over
    every position of `prompts`)."""
    from mechcopy.attribution import CopyScores
    from mechcopy.components import Components
    from mechcopy.conditions import UNPRUNED, standard_conditions
    from mechcopy.fingerprint import model_fingerprint
    from mechcopy.pruning import component_means
    from mechcopy.selection import select
    from mechcopy.sites import neurons_per_layer

    scores = None
    if neurons_path:
        neurons = Components.load(neurons_path)
    else:
        gen = torch.Generator().manual_seed(seed)
        scores = CopyScores(torch.rand(model.cfg.n_layers, neurons_per_layer(model), generator=gen),
                            {"model": model_fingerprint(model)})
        neurons = select(scores, "global", k=k)
    means = component_means(model, list(prompts), reference="the benchmark's prompts") if ablation == "mean" else None
    return [UNPRUNED, *standard_conditions(model, neurons, n_random=3, seed=seed, scores=scores, ablation=ablation,
                                           means=means)]


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def old_path(model, prompt_sets: dict, sets: list, batch_size: int) -> dict:
    """The first evaluator: per task, per condition (its own hooks), equal-length batches."""
    from mechcopy.evaluation import predict
    from mechcopy.pruning import condition_hooks

    return {task: {c.label: predict(model, ps, condition_hooks(model, c), batch_size, pad=False) for c in sets}
            for task, ps in prompt_sets.items()}


def new_path(model, prompt_sets: dict, sets: list, batch_size: int) -> dict:
    from mechcopy.evaluation import predict_conditions

    return {task: predict_conditions(model, ps, sets, batch_size) for task, ps in prompt_sets.items()}


def mismatches(a: dict, b: dict) -> list:
    return [(task, name, i) for task in a for name in a[task]
            for i, (x, y) in enumerate(zip(a[task][name], b[task][name])) if x != y]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=20, help="prompts per task (default 20)")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128, help="new path: forked rows per pass (prompts x conditions)")
    p.add_argument("--old-batch-size", type=int, default=32, help="old path: prompts per batch (today's default)")
    p.add_argument("--neurons", default=None, help="a neuron file (default: top-k of random scores)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--ablation", choices=["zero", "mean"], default="zero",
                   help="zero the sets (pruning) or mean-ablate them (means over 2 prompts of every task)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--breakdown", action="store_true", help="also time the old path on the new weight layout")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    from mechcopy import load_model
    from mechcopy.io import write_json_atomic
    from mechcopy.models.loading import store_as_read
    from mechcopy.fingerprint import model_fingerprint
    from mechcopy.provenance import git_revision
    from mechcopy.tasks import load_tasks
    from mechcopy.tasks.prompts import build_prompts

    model, load_s, _ = timed(lambda: load_model(args.model))
    prompt_sets = {t.name: build_prompts(t, model.tokenizer, shots=args.shots, n=args.n, seed=args.seed).prompts
                   for t in load_tasks("all")}
    sets = neuron_sets(model, args.neurons, args.k, args.seed, args.ablation,
                       [p for ps in prompt_sets.values() for p in ps[:2]])
    pairs = sum(len(ps) for ps in prompt_sets.values()) * len(sets)
    res = {"model": model_fingerprint(model), "git_revision": git_revision(), "load_s": round(load_s, 1),
           "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "load_average_at_start": list(os.getloadavg()),
           "tasks": len(prompt_sets), "prompts": sum(len(ps) for ps in prompt_sets.values()),
           "conditions": {c.label: len(c.components) if c.ablates else None for c in sets}, "ablation": args.ablation,
           "fork_layer": min((min(c.components.by_layer()) for c in sets if c.ablates), default=None),
           "batch_size": args.batch_size, "old_batch_size": args.old_batch_size, "paths": {}}

    def run(name, fn, batch_size):
        preds, wall, cpu = timed(lambda: fn(model, prompt_sets, sets, batch_size))
        res["paths"][name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "prompts_per_s": round(pairs / wall, 3)}
        print(json.dumps({name: res["paths"][name]}), file=sys.stderr, flush=True)
        return preds

    warm_up = {t: ps[:2] for t, ps in list(prompt_sets.items())[:2]}
    new_path(model, warm_up, sets, args.batch_size)
    new = run("new", new_path, args.batch_size)
    if args.breakdown:
        res["breakdown_mismatches"] = len(mismatches(run("old_batching_new_layout", old_path, args.old_batch_size), new))
    stock_layout(model)
    old_path(model, warm_up, sets, args.old_batch_size)
    old = run("old", old_path, args.old_batch_size)
    store_as_read(model)
    bad = mismatches(old, new)
    res.update(pairs=pairs, identical=not bad, mismatches=[list(m) for m in bad[:20]], n_mismatches=len(bad),
               speedup=round(res["paths"]["old"]["wall_s"] / res["paths"]["new"]["wall_s"], 2),
               speedup_cpu=round(res["paths"]["old"]["cpu_s"] / res["paths"]["new"]["cpu_s"], 2),
               load_average_at_end=list(os.getloadavg()))
    print(json.dumps(res, indent=2))
    if args.out:
        write_json_atomic(args.out, res)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
