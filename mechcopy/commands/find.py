"""`mechcopy find`: copy neurons by attribution on the probe, k chosen on its dev split."""

from __future__ import annotations

import time

from mechcopy.attribution import METHODS, NORMALISATIONS, RULES, TARGETS
from mechcopy.commands.common import (add_config_args, add_model_args, add_out_args, config_from_args, open_model,
                                      prepare_out, saved_in)
from mechcopy.components import MATCHES
from mechcopy.find import ATTRIBUTIONS, PROBES, SELECTIONS, FindConfig, find_copy_neurons
from mechcopy.io import side_file
from mechcopy.tasks.probe import FORMATS, ITEM_SETS

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
    "ks": "k grid of the sweep, comma-separated (default 5,10,20,50,100,200,500,1000)",
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
SIDE_FILES = (".scores.safetensors", ".scores.json", ".attributions.safetensors")


def run(args) -> int:
    config = config_from_args(FindConfig, args)
    out = prepare_out(args.out, {"--text": config.text, "--model": args.model}, args.force,
                      side=[side_file(args.out, s) for s in SIDE_FILES])
    args.saved = saved_in(side_file(out, ".attributions.safetensors"), "the attributions done so far are")
    t0 = time.perf_counter()
    model = open_model(args)
    neurons = find_copy_neurons(model, out, config)
    sw = neurons.meta["sweep"]
    print(f"k sweep on {sw['n_dev']} dev prompts (perplexity bound +{sw['max_ppl_increase']:.0%}):")
    print(f"  k=0: dev accuracy {sw['baseline']['dev_accuracy']:.3f}, copy rate "
          f"{sw['baseline']['dev_copy_rate']:.3f}, ppl {sw['baseline']['ppl']:.2f}"
          + ("  <- chosen" if sw["chosen_k"] == 0 else ""))
    for r in sw["rows"]:
        mark = "  <- chosen" if r["k"] == sw["chosen_k"] else ("" if r["feasible"] else "  (ppl bound)")
        print(f"  k={r['k']}: dev accuracy {r['dev_accuracy']:.3f}, copy rate {r['dev_copy_rate']:.3f}, "
              f"ppl {r['ppl']:.2f} ({r['ppl_increase']:+.1%}){mark}")
    if neurons.pairs:
        counts = {l: c for l, c in enumerate(neurons.meta["layer_counts"]) if c}
        print(f"{len(neurons)} neurons, by layer {counts}")
    else:
        why = neurons.meta.get("refused") or sw["why"]
        print(f"k = 0 chosen: {why}. The neuron file holds no neurons: there is nothing to prune.")
    print(f"wrote {out} (scores: {neurons.meta['scores_path']}) in {time.perf_counter() - t0:.0f} s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("find", help="find copy neurons: IG attribution on the probe, k chosen on its dev split")
    add_model_args(p)
    add_config_args(p, FindConfig, HELPS, choices={
        "attribution": ATTRIBUTIONS, "target": TARGETS, "method": METHODS, "rule": RULES,
        "normalisation": NORMALISATIONS, "mode": SELECTIONS, "probe": PROBES, "probe_items": ITEM_SETS,
        "probe_format": tuple(FORMATS), "random_match": MATCHES})
    add_out_args(p, "neuron file to write (JSON); an interrupted run started again resumes", required=True)
    p.set_defaults(run=run)
