"""`mechcopy evaluate`: ICL accuracy and copy-error rates per task, optionally under pruning, read by
generation or by label scoring with calibrations.

With --out, every finished (task, condition) is kept in `<out>.partial.jsonl` until the result is
written, so an interrupted run started again with the same flags resumes where it stopped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mechcopy.commands.common import (add_model_args, add_out_args, at_least, files_in, load_neurons, model_path,
                                      open_model, prepare_out, saved_in, write_result)
from mechcopy.comparisons import (compare_rows, comparisons_json, comparisons_table, results_table, task_level_table,
                                  task_levels)
from mechcopy.components import MATCHES, Components
from mechcopy.conditions import (ABLATIONS, ATTENTION_EDITS, CALIBRATIONS, GENERATE, LABELS, POSITIONS, SCORINGS,
                                 UNPRUNED, Means, calibrated_conditions, find_scores, read_by, standard_conditions)
from mechcopy.io import side_file
from mechcopy.pruning import component_means, component_sizes
from mechcopy.stats import POOLED
from mechcopy.suite import build_prompt_sets, copy_effects, run_evaluation
from mechcopy.tasks import check_shots, load_tasks

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


def intervention(components: Components, ablation: str | None, positions: str | None) -> dict:
    """How a component file's set is ablated: the flags where given, else what the file records in meta
    `intervention` (`ablation`, `positions`, optionally the `means` as `Means.to_json`, or the `factor` of
    an attention edit), else zero at every position. Recorded means are used only for mean ablation at
    the positions they were taken at."""
    recorded = components.meta.get("intervention") or {}
    out = {"ablation": ablation or recorded.get("ablation", "zero"),
           "positions": positions or recorded.get("positions", "all"), "means": None, "source": "flags",
           "factor": recorded.get("factor") if ablation is None and recorded.get("ablation") in ATTENTION_EDITS else None}
    if ablation is None and positions is None:
        out["source"] = "the file" if recorded else "the default (zero at every position)"
    if out["ablation"] == "mean" and recorded.get("means") is not None:
        means = Means.from_json(recorded["means"])
        out["means"] = means if means.positions == out["positions"] else None
    return out


def run(args) -> int:
    tasks = load_tasks(args.tasks)
    check_shots(tasks, args.shots, "--shots")
    if args.n_random is not None and not args.prune:
        raise ValueError("--n-random needs --prune NEURONS.json (the set whose size and layers to match)")
    if args.random_match != "layer" and not args.prune:
        raise ValueError("--random-match needs --prune NEURONS.json (the set the random sets are matched to)")
    if (args.ablation or args.positions) and not args.prune:
        raise ValueError("--ablation and --positions say how the --prune set is ablated: add --prune FILE.json")
    if args.calibrate and args.scoring != "labels":
        raise ValueError("--calibrate re-weights label probabilities: add --scoring labels (so that every "
                         "condition reads its answer the same way and each comparison changes one thing)")
    if args.scoring == "labels" or args.copy_control:
        for task in tasks:
            task.require_labels()
    neurons, read = load_neurons("--prune", args.prune)
    how = intervention(neurons, args.ablation, args.positions) if neurons is not None else None
    if how is not None and how["ablation"] in ATTENTION_EDITS and neurons.pairs and args.scoring != "labels":
        raise ValueError(f"{args.prune} records an attention edit ({how['ablation']}, factor {how['factor']}): it acts "
                         "at each prompt's answer position on its demo-label tokens, which only label scoring "
                         "follows; add --scoring labels (or --ablation zero|mean to ablate the heads instead)")
    scores = find_scores(neurons) if neurons is not None and neurons.pairs else None
    checkpoint = side_file(args.out, ".partial.jsonl") if args.out else None
    out = prepare_out(args.out, {"--tasks": files_in(args.tasks), **read, "--model": model_path(args.model)},
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
        prompts = [p for ps in prompt_sets.values() for p in ps.prompts]
        if args.random_match == "size" and neurons.pairs and n_random:
            sizes = component_sizes(model, prompts, neurons.kind, f"the {len(prompts)} evaluated prompts")
        assert how is not None
        means = how["means"]
        if how["ablation"] == "mean" and means is None and neurons.pairs:
            means = component_means(model, prompts, neurons.kind, how["positions"],
                                    f"the {len(prompts)} evaluated prompts")
        conditions += standard_conditions(model, neurons, n_random, args.seed, scores=scores, readout=readout,
                                          match=args.random_match, sizes=sizes, ablation=how["ablation"],
                                          positions=how["positions"], means=means, factor=how["factor"])
        settings.update(prune=str(args.prune), kind=neurons.kind, n_neurons=len(neurons), n_random=n_random,
                        ablation=how["ablation"], positions=how["positions"], intervention_from=how["source"],
                        **({} if how["factor"] is None else {"factor": how["factor"]}),
                        means=None if means is None else means.describe(),
                        random_match=args.random_match, sizes=None if sizes is None else sizes.describe(),
                        random_sets={c.label: {k: c.components.meta.get(k) for k in ("seed", "match", "size_ratio",
                                                                                      "size_mismatch")}
                                     for c in conditions if c.family == "random" and c.components is not None})
    conditions += calibrated_conditions(conditions, args.calibrate or ())
    t0 = time.perf_counter()
    rows, dropped = run_evaluation(model, tasks, args.shots, args.n, args.seed, conditions, checkpoint=checkpoint,
                                   gold_in_demos=args.gold_in_demos, copy_control=args.copy_control)
    settings["seconds"] = round(time.perf_counter() - t0, 1)
    import pandas as pd  # heavy: imported when a table is printed

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(results_table(rows).to_string(index=False))
    print(f"\n{len(rows)} evaluations in {settings['seconds']} s")
    for name, items in dropped.items():
        if items:
            (pair, reason), where = items[0], "under \"dropped\" in the results" if out else "(use --out to list them)"
            print(f"{name}: {len(items)} pairs not used, e.g. {pair}: {reason}; all listed {where}")
    payload = {"settings": settings, "results": [r.to_json() for r in rows], "dropped": dropped,
               "copy_effect": copy_effects(rows, prompt_sets, tasks, args.seed)}
    if len(conditions) > 1:
        comparisons = compare_rows(rows, seed=args.seed)
        levels = task_levels(comparisons, seed=args.seed)
        payload["comparisons"] = comparisons_json(comparisons)
        payload["task_level"] = [t.to_json() for t in levels]
        pooled = comparisons.get(POOLED)
        if pooled:
            with pd.option_context("display.width", 200, "display.max_columns", 20):
                print("\npaired comparisons, pooled over the held-out tasks (each task weighs the same):")
                print(comparisons_table(pooled).to_string(index=False))
                print("\nthe same with the task as the unit:")
                print(task_level_table(levels).to_string(index=False))
            print(UNITS)
        else:
            print("\nno pooled comparison: every task is the probe the neurons were chosen on (the per-task "
                  "comparisons are in the results)")
    if out:
        print(f"wrote {write_result(out, model, payload)}")
        side_file(out, ".partial.jsonl").unlink(missing_ok=True)
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
    p.add_argument("--prune", type=Path, default=None,
                   help="a component file (JSON: neurons, or heads from find --components heads): also evaluate it "
                        "ablated, as the file records (default zero at every position) unless --ablation/--positions")
    p.add_argument("--ablation", choices=ABLATIONS, default=None,
                   help="with --prune: zero the components, or set them to their means (from the file if it "
                        "records them, else over the evaluated prompts)")
    p.add_argument("--positions", choices=POSITIONS, default=None,
                   help="with --prune: ablate at every position, or at the last position of every forward pass")
    p.add_argument("--n-random", type=at_least(0), default=None,
                   help="with --prune: this many random sets of the same kind, size and layers (default 5)")
    p.add_argument("--random-match", choices=MATCHES, default="layer",
                   help="with --prune: random sets matched on layer (default), or on layer and size at the answer "
                        "position over the evaluated prompts (size: neurons |activation|, heads the norm of their "
                        "output z_h @ W_O[h])")
    add_out_args(p, "write the results JSON here (an interrupted run started again resumes)")
    p.set_defaults(run=run)
