"""`mechcopy evaluate`: ICL accuracy and copy-error rates per task, optionally under pruning, read by
generation or by label scoring with calibrations.

With --out, every finished (task, condition) is kept in `<out>.partial.jsonl` until the result is
written, so an interrupted run started again with the same flags resumes where it stopped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mechcopy.commands.common import (add_model_args, add_out_args, at_least, files_in, open_model, prepare_out,
                                      saved_in, write_result)
from mechcopy.comparisons import (compare_rows, comparisons_table, results_table, task_level_table,
                                  task_levels)
from mechcopy.components import MATCHES, Components
from mechcopy.conditions import (CALIBRATIONS, GENERATE, LABELS, SCORINGS, UNPRUNED, calibrated_conditions,
                                 find_scores, read_by, standard_conditions)
from mechcopy.io import side_file
from mechcopy.pruning import component_sizes
from mechcopy.suite import build_prompt_sets, copy_effects, run_evaluation
from mechcopy.tasks import load_tasks

#: what the printed comparisons say about their two intervals
UNITS = ("pooled: prompts resampled within these tasks (did these tasks move?); over tasks: each task one "
         "observation (would tasks like these move?). A claim about tasks in general rests on the second.")


def calibrations(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated calibrations (`conditions.CALIBRATIONS`)."""
    items = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    bad = [x for x in items if x not in CALIBRATIONS]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"expected comma-separated calibrations from {', '.join(CALIBRATIONS)}, "
                                         f"got {text!r}")
    return items


def run(args) -> int:
    tasks = load_tasks(args.tasks)
    if args.n_random is not None and not args.prune:
        raise ValueError("--n-random needs --prune NEURONS.json (the set whose size and layers to match)")
    if args.random_match != "layer" and not args.prune:
        raise ValueError("--random-match needs --prune NEURONS.json (the set the random sets are matched to)")
    if args.calibrate and args.scoring != "labels":
        raise ValueError("--calibrate re-weights label probabilities: add --scoring labels (so that every "
                         "condition reads its answer the same way and each comparison changes one thing)")
    if args.scoring == "labels" or args.copy_control:
        for task in tasks:
            task.require_labels()
    neurons = Components.load(args.prune) if args.prune else None
    scores = find_scores(neurons) if neurons is not None and neurons.pairs else None
    checkpoint = side_file(args.out, ".partial.jsonl") if args.out else None
    out = prepare_out(args.out, {"--tasks": files_in(args.tasks), "--prune": args.prune, "--model": args.model},
                      args.force, side=[checkpoint] if checkpoint else [])
    if checkpoint:
        args.saved = saved_in(checkpoint, "the finished (task, condition) rows are")
    model = open_model(args)
    readout = LABELS if args.scoring == "labels" else GENERATE
    conditions = read_by([UNPRUNED], readout)
    settings = {"tasks": [t.name for t in tasks], "shots": args.shots, "n": args.n, "seed": args.seed,
                "template": "{x} -> {y}", "separator": "\n", "gold_in_demos": args.gold_in_demos,
                "copy_control": args.copy_control, "scoring": args.scoring, "calibrate": list(args.calibrate or ())}
    prompt_sets = build_prompt_sets(model, tasks, args.shots, args.n, args.seed, args.gold_in_demos, args.copy_control)
    if neurons is not None:
        neurons.check(model)
        n_random = 5 if args.n_random is None else args.n_random
        if not neurons.pairs:
            print(f"{args.prune} holds no neurons ({neurons.why_empty}): nothing to prune, so only the unpruned "
                  "model is evaluated")
        sizes = None
        if args.random_match == "size" and neurons.pairs and n_random:
            prompts = [p for ps in prompt_sets.values() for p in ps.prompts]
            sizes = component_sizes(model, prompts, neurons.kind, f"the {len(prompts)} evaluated prompts")
        conditions += standard_conditions(model, neurons, n_random, args.seed, scores=scores, readout=readout,
                                          match=args.random_match, sizes=sizes)
        settings.update(prune=str(args.prune), n_neurons=len(neurons), n_random=n_random,
                        random_match=args.random_match, sizes=None if sizes is None else sizes.describe(),
                        random_sets={c.label: {k: c.components.meta.get(k) for k in ("seed", "match", "size_ratio",
                                                                                      "size_mismatch")}
                                     for c in conditions if c.family == "random"})
    conditions += calibrated_conditions(conditions, args.calibrate or ())
    t0 = time.perf_counter()
    rows, dropped = run_evaluation(model, tasks, args.shots, args.n, args.seed, conditions, checkpoint=checkpoint,
                                   gold_in_demos=args.gold_in_demos, copy_control=args.copy_control)
    settings["seconds"] = round(time.perf_counter() - t0, 1)
    import pandas as pd  # heavy: imported when a table is printed

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(results_table(rows).to_string(index=False))
    print(f"\n{len(rows)} evaluations in {settings['seconds']} s")
    for task, items in dropped.items():
        if items:
            (pair, reason), where = items[0], "under \"dropped\" in the results" if out else "(use --out to list them)"
            print(f"{task}: {len(items)} pairs not used, e.g. {pair}: {reason}; all listed {where}")
    payload = {"settings": settings, "results": rows, "dropped": dropped,
               "copy_effect": copy_effects(rows, prompt_sets, tasks, args.seed)}
    if len(conditions) > 1:
        payload["comparisons"] = compare_rows(rows, seed=args.seed)
        payload["task_level"] = task_levels(payload["comparisons"], seed=args.seed)
        if payload["comparisons"].get("pooled"):
            with pd.option_context("display.width", 200, "display.max_columns", 20):
                print("\npaired comparisons, pooled over the held-out tasks (each task weighs the same):")
                print(comparisons_table(payload["comparisons"]["pooled"]).to_string(index=False))
                print("\nthe same with the task as the unit:")
                print(task_level_table(payload["task_level"]).to_string(index=False))
            print(UNITS)
    if out:
        print(f"wrote {write_result(out, model, payload)}")
        checkpoint.unlink(missing_ok=True)
    return 0


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="ICL accuracy and copy-error rates per task (with 95%% intervals)")
    add_model_args(p)
    p.add_argument("--tasks", default="all", help="'all', comma-separated task names, or a task FILE.json")
    p.add_argument("--shots", type=at_least(0), default=4, help="demonstrations per prompt (default 4)")
    p.add_argument("--n", type=at_least(1), default=100, help="prompts per task, capped by the data (default 100)")
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--gold-in-demos", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-gold-in-demos: no demo carries its query's gold label, so every prediction equal "
                        "to a demo label is a copy error (default: demos drawn freely)")
    p.add_argument("--copy-control", action="store_true",
                   help="closed-label tasks only: demos built so that every label is among them as often as it is "
                        "absent, the construction the copy effect is estimated from")
    p.add_argument("--scoring", choices=SCORINGS, default="generate",
                   help="generate: greedy generation (default); labels: the task's label with the highest summed "
                        "log-probability (closed-label tasks only)")
    p.add_argument("--calibrate", type=calibrations, default=None, metavar="CALIBRATIONS",
                   help=f"with --scoring labels: also these calibrations (comma-separated: {', '.join(CALIBRATIONS)}),"
                        " alone and with pruning (pruned+contextual, ...)")
    p.add_argument("--prune", type=Path, default=None, help="a neuron file (JSON): also evaluate it pruned")
    p.add_argument("--n-random", type=at_least(0), default=None,
                   help="with --prune: this many random neuron sets of the same size and layers (default 5)")
    p.add_argument("--random-match", choices=MATCHES, default="layer",
                   help="with --prune: random sets matched on layer (default), or on layer and mean |activation| "
                        "at the answer position over the evaluated prompts (size)")
    add_out_args(p, "write the results JSON here (an interrupted run started again resumes)")
    p.set_defaults(run=run)
