"""`mechcopy find`: copy neurons (or, with `--components heads`, attention heads) by attribution on the
probe, k chosen on its dev split."""

from __future__ import annotations

import time

from mechcopy.attribution import METHODS, NORMALISATIONS, RULES, TARGETS
from mechcopy.commands.common import (NEURON_SIDE_SUFFIXES, add_config_args, add_model_args, add_out_args,
                                      config_from_args, existing_file, model_path, open_model, prepare_out, saved_in)
from mechcopy.components import MATCHES
from mechcopy.components import component_kind
from mechcopy.find import ATTRIBUTIONS, CHECKPOINT_SUFFIX, PROBES, SELECTIONS, FindConfig, find_copy_neurons
from mechcopy.method import COMPONENTS
from mechcopy.io import side_file
from mechcopy.method import Choice
from mechcopy.tasks.probe import FORMATS, ITEM_SETS, ProbeConfig, check_probe_size

HELPS = {
    "n": "probe prompts for attribution",
    "n_dev": "probe dev prompts for the k sweep",
    "shots": "demonstrations per probe prompt",
    "steps": "IG integration steps",
    "attribution": "attribution method",
    "target": "what is attributed",
    "method": "IG implementation",
    "batch_size": "prompts per batch of attribution rows (fast path: 1 suits a CPU, raise it on a GPU)",
    "rule": "quadrature rule",
    "normalisation": "per-prompt normalisation of the attributions",
    "mode": "top-k selection",
    "components": "what to attribute and prune: MLP neurons, or attention heads (each head's hook_z; "
                  "transformers only)",
    "ks": "k grid of the sweep, comma-separated (default 5,10,20,50,100,200,500,1000; with --components heads "
          "1,2,3,5,10,20,50,100, within the model's head count)",
    "max_ppl_increase": "relative perplexity bound of the sweep",
    "text": "held-out text file for perplexity (default: the standard library's pydoc_data.topics)",
    "ppl_tokens": "tokens of held-out text",
    "seed": "seed of the probe prompts",
    "checkpoint_every": "prompts between checkpoints",
    "probe": "the copy probe: classic (words, labels as they fall) or balanced (uniform gold, distinct demo labels)",
    "probe_items": "balanced probe's inputs",
    "probe_format": "balanced probe's layout: one pair per line, or one line of comma-separated pairs",
    "max_completeness_error": "IG completeness gate: select only in layers whose median error is below it",
    "consistency_random": "random sets of the self-consistency check that may refuse the choice (0: off)",
    "random_match": "the check's random sets: matched on layer, or on layer and mean |activation| at the answer "
                    "position of the attribution prompts (size)",
}


def check_probe(config: FindConfig, sizes: str = "--n + --n-dev") -> None:
    """What the probe can give, checked before the model loads: shots that a balanced probe can fill
    with distinct labels, and no more prompts (`sizes`) than its items hold."""
    probe = None
    if config.probe == "balanced":
        try:
            probe = ProbeConfig(items=config.probe_items, template=config.probe_format, shots=config.shots)
        except ValueError as e:
            raise ValueError(f"--shots {config.shots}: {e}") from None
    check_probe_size(probe, config.n + config.n_dev, sizes)


RECIPES = ("copy-mechanism",)


def run_recipe(args) -> int:
    """`--recipe copy-mechanism`: the copy-mechanism study's best mechanistic selection for the model
    (`mechcopy.copy_mechanism`), written as a component file that `evaluate --prune` applies as recorded."""
    from mechcopy.copy_mechanism import load_study, recipe_components, study_path
    from mechcopy.models import zoo

    if args.study is None and args.model not in zoo.ZOO:
        raise ValueError(f"--recipe copy-mechanism finds the study of a zoo model by name; for {args.model!r} pass "
                         "--study PATH (a docs/data/copy_mechanism_<model>.json)")
    study = load_study(args.study or study_path(args.model))
    if args.model in zoo.ZOO and study["model"] != args.model:
        raise ValueError(f"the study at {args.study} is of {study['model']!r}, not --model {args.model!r}")
    out = prepare_out(args.out, {"--model": model_path(args.model), "--study": args.study or study_path(args.model)},
                      args.force)
    assert out is not None      # --out is required
    t0 = time.perf_counter()
    comps = recipe_components(open_model(args), study)
    comps.save(out)
    m = comps.meta
    if comps.pairs:
        how = m["intervention"]
        print(f"the study's best mechanistic selection ({m['arm']}, selection seed {m['seed']}, {m['condition']}: dev "
              f"accuracy {m['dev_accuracy']:.3f} against {m['dev_unpruned_accuracy']:.3f} unpruned, perplexity "
              f"{m['ppl_increase']:+.1%}): {len(comps)} {comps.kind}s, {how['ablation']}"
              f"{'' if how.get('factor') is None else ' x ' + str(how['factor'])} at {how['positions']} positions")
    else:
        print(f"k = 0: {m['why']}")
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s (apply it: mechcopy evaluate --prune {out})")
    return 0


def run(args) -> int:
    if args.recipe is not None:
        return run_recipe(args)
    config = config_from_args(FindConfig, args)
    check_probe(config)
    out = prepare_out(args.out, {"--text": config.text, "--model": model_path(args.model)}, args.force,
                      side=[side_file(args.out, s) for s in NEURON_SIDE_SUFFIXES])
    assert out is not None      # --out is required
    args.saved = saved_in(side_file(out, CHECKPOINT_SUFFIX), "the attributions done so far are")
    t0 = time.perf_counter()
    model = open_model(args)
    neurons = find_copy_neurons(model, out, config)
    choice = Choice.from_components(neurons)
    sw = choice.sweep
    print(f"k sweep on {sw.meta['n_dev']} dev prompts (perplexity bound +{sw.max_ppl_increase:.0%}):")
    print(f"  k=0: dev accuracy {sw.baseline['dev_accuracy']:.3f}, copy rate "
          f"{sw.baseline['dev_copy_rate']:.3f}, ppl {sw.baseline['ppl']:.2f}"
          + ("  <- chosen" if sw.chosen_k == 0 else ""))
    for r in sw.rows:
        mark = "  <- chosen" if r["k"] == sw.chosen_k else ("" if r["feasible"] else "  (ppl bound)")
        print(f"  k={r['k']}: dev accuracy {r['dev_accuracy']:.3f}, copy rate {r['dev_copy_rate']:.3f}, "
              f"ppl {r['ppl']:.2f} ({r['ppl_increase']:+.1%}){mark}")
    plural = component_kind(neurons.kind).plural
    if neurons.pairs:
        counts = {l: c for l, c in enumerate(neurons.layer_counts(model.cfg.n_layers)) if c}
        listed = f": {[list(p) for p in neurons.pairs]}" if neurons.kind == "head" else ""
        print(f"{len(neurons)} {plural}, by layer {counts}{listed}")
    else:
        why = choice.guard.refused if choice.guard is not None and choice.guard.refused else sw.why
        print(f"k = 0 chosen: {why}. The {neurons.kind} file holds no {plural}: there is nothing to prune.")
    print(f"wrote {out} (scores: {neurons.meta['scores_path']}) in {time.perf_counter() - t0:.0f} s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("find", help="find copy neurons (or heads): IG attribution on the probe, k chosen on its dev "
                                    "split")
    add_model_args(p)
    add_config_args(p, FindConfig, HELPS, choices={
        "attribution": ATTRIBUTIONS, "target": TARGETS, "method": METHODS, "rule": RULES,
        "normalisation": NORMALISATIONS, "mode": SELECTIONS, "probe": PROBES, "probe_items": ITEM_SETS,
        "probe_format": tuple(FORMATS), "random_match": MATCHES, "components": tuple(COMPONENTS)},
        types={"text": existing_file("text file")})
    add_out_args(p, "neuron file to write (JSON); an interrupted run started again resumes", required=True)
    p.add_argument("--recipe", choices=RECIPES, default=None,
                   help="copy-mechanism: write the copy-mechanism study's best mechanistic selection for --model "
                        "(docs/copy_mechanism.md) instead of searching; the other search flags are ignored")
    p.add_argument("--study", type=existing_file("study summary"), default=None,
                   help="with --recipe: the study's summary JSON (default docs/data/copy_mechanism_<model>.json)")
    p.set_defaults(run=run)
