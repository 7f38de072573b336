"""The copy-mechanism study (issue 26; criterion and frozen settings in docs/copy_mechanism.md).

    python analyses/copy_mechanism.py --model smollm2-135m --stage select      # per selection seed
    python analyses/copy_mechanism.py --model smollm2-135m --stage probe       # the probe's test split
    python analyses/copy_mechanism.py --model smollm2-135m --stage heldout --construction no-gold
    python analyses/copy_mechanism.py --model smollm2-135m --stage heldout --construction copy-control
    python analyses/copy_mechanism.py --model smollm2-135m --components heads --stage select   # the head arm, each stage
    python analyses/copy_mechanism.py --model smollm2-135m --stage summary     # docs/data/copy_mechanism_<model>*.json
    python analyses/copy_mechanism.py --model smollm2-135m --n 100 --stage heldout ...   # the held-out stages at another n

Every stage is resumable: its state goes to `--work` (default `results/copy_mechanism/<model>/`, not
committed) as soon as it is made, and a stage started again skips what is there (the held-out stages
through `suite.run_evaluation`'s journal, one task at a time). Stages may run one at a time, under
the CPU lock, in any order after `select`.

- **select** (per selection seed: the probe's attribution split redrawn): IG of every neuron on the
  copy probe's attribution split (no-gold, `method.attribute` / `method.score`: the contrast target,
  IG's completeness gate), then on the dev split (label scoring) every k of `SETTINGS["ks"]` under
  zero and mean ablation (means over the attribution split's positions); the best dev accuracy within
  the perplexity bound wins, if it beats the unpruned model (else nothing is pruned for that seed).
  Also the component sizes at the answer position, for size-matched random sets.
- **probe**: the probe's test split, copy-control construction: unpruned, each seed's selection and
  its size-matched random set (label scoring), for criterion 1's probe half.
- **heldout**: the held-out label tasks (`SETTINGS["heldout_tasks"]`) by `suite.run_evaluation`, one
  construction per run: unpruned, each seed's selection (`pruned@s<seed>`) and its size-matched
  random set (`random-<seed>@s<seed>`), contextual and batch calibration, each selection plus each
  calibration; all read by label scoring. Perplexity of every ablation is measured once.
- **summary**: the tables and both criteria (`criteria`) from the saved state of both arms, into the docs
  JSON (`write_docs`: the table, the criteria per arm, the per-task figures).

`--components heads` runs a stage for the head arm (docs/copy_mechanism.md, "Heads, added after the
neuron run"; exploratory): IG over heads from each attribution prompt's label-swap counterfactual
(`head_attributions`), the top-h heads mean-ablated, h chosen by the same dev rule (`_dev_sweep`),
size-matched random heads, heads + calibration; its state files are prefixed `heads_`, its conditions
grouped `heads-s<seed>`. `--components heads-last` is the same at the last position only (post hoc,
exploratory; `heads-last_`, `heads-last-s<seed>`). The summary also reads each seed's dev-best of neurons
and heads (`best_arm`) as an arm of its own (`best-s<seed>`).

The third session's arms (docs/copy_mechanism.md, "Third session"; exploratory) run the same stages, and
`--stage summary` with `--components <arm>` writes each into docs JSON of its own
(`copy_mechanism_<model>[-n<N>]_<arm>*.json`, `only_arm`): `--components heads-attn` down-weights the answer
position's attention to the demo-label tokens (`Condition(ablation="label-attention")`) in the top h heads of
each seed's `heads-last` ranking, (h, f) chosen on dev (`select_attention_seed`; run after `heads-last`'s
select); `--components unibias` zeroes at the last position the heads or neurons whose direct push favours
one label (`unibias_candidates`, `select_unibias_seed`).

The fourth session's stages (docs/copy_mechanism.md, "Fourth session"): `--stage heldout --construction
standard` (demos drawn freely: what an intervention costs ordinary ICL; `standard_check`, into
`<docs JSON>_standard.json`), and `--stage recipe`, which runs `mechcopy find --recipe copy-mechanism` and
`mechcopy evaluate --prune` with its file as a user would and checks their predictions against the study's
journals (`recipe_check`, into `docs/data/copy_mechanism_recipe_<model>.json`); and the arm `--components
vowel`, the set `mechcopy find` chose on the paper's vowel probe (`VOWEL_SETS`, `select_vowel_seed`), one
selection, its later stages as the other arms'.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:   # mechcopy (torch, TransformerLens) is imported where a stage runs
    from mechcopy.suite import ResultRow

#: the settings frozen before the first result (docs/copy_mechanism.md, "Frozen before the first run")
SETTINGS: dict[str, Any] = {
    # the probe tasks the pilot's keep rule (analyses/copy_probe_pilot.py, fixed before the pilot ran) keeps
    # for this model alone (`probe_tasks`); all six when it keeps fewer than two
    "probe_tasks": ["last_digit", "max_digit", "star_count", "distinct_symbols", "odd_position", "repeated_symbol"],
    "shots": 4, "n_attr": 8, "n_dev": 12, "n_test": 30, "probe_seed": 0,
    "selection_seeds": [0, 1, 2],
    "attribution": "ig", "target": "contrast", "steps": 20,
    "ks": [10, 20, 50, 100, 200], "ablations": ["zero", "mean"], "positions": "all",
    "max_ppl_increase": 0.05, "ppl_tokens": 4096,
    "heldout_tasks": ["animal_class", "chemical_state", "food_group", "location_continent", "location_religion",
                      "object_color", "object_counting", "sentiment_binary", "sentiment_five", "word_language"],
    "n": 30, "prompt_seed": 0, "constructions": ["no-gold", "copy-control"],
    "calibrations": ["contextual", "batch"], "random_match": "size", "n_random_per_seed": 1,
    # the head arm (docs/copy_mechanism.md, "Heads, added after the neuron run"; exploratory): top-h heads by
    # IG from the label-swap counterfactual, mean-ablated at every position, h chosen on dev by the same rule
    "hs": [5, 10, 20],
}
#: the arms: `neurons` (frozen), `heads` (the addendum's, exploratory), `heads-last` (post hoc, exploratory: the
#: head arm's attribution with mean ablation at the last position only); their groups `<arm>-s<seed>`
#: (neurons: `s<seed>`), their state files prefixed `<arm>_` (neurons: none)
ARMS = ("neurons", "heads", "heads-last")
#: the third session's arms (docs/copy_mechanism.md, "Third session"; exploratory), each summarised into docs
#: JSON of its own beside the unpruned and calibration rows (`summary(..., arm=...)`): `heads-attn` down-weights
#: the answer position's attention to the demo labels in the top heads of the `heads-last` ranking; `unibias`
#: zeroes, at the last position, the heads or neurons whose direct push favours one label
EXTRA_ARMS = ("heads-attn", "unibias", "vowel")
#: the `vowel` arm's set per model (fourth session; docs/replication.md): the neurons `mechcopy find` chose on
#: the paper's vowel probe (SmolLM2's `find` chose none)
VOWEL_SETS = {"gemma-3-270m": Path("docs/data/gemma-3-270m-k10-neurons.json")}
#: the third session's settings (its plan, before its results): the down-weighting factors of `heads-attn`,
#: the set sizes of `unibias`
THIRD = {"attn_factors": [0.0, 0.5], "unibias_hs": [5, 10, 20], "unibias_ks": [10, 20, 50, 100, 200]}
#: the held-out constructions: the two the criteria read, and `standard` (demos drawn freely: ordinary ICL,
#: where copying is often right; docs/copy_mechanism.md, "Fourth session": the cost check `standard_check`)
CRITERIA_CONSTRUCTIONS = ("no-gold", "copy-control")
CONSTRUCTIONS = (*CRITERIA_CONSTRUCTIONS, "standard")


def probe_tasks(model_name: str, pilot: Path = Path("docs/data/copy_probe_pilot.json")) -> tuple[list[str], str]:
    """The probe tasks of the study for `model_name`: those the pilot's keep rule keeps on this model's
    pilot alone (all six when fewer than two), and why."""
    import importlib.util
    import json

    doc = json.loads(pilot.read_text())
    if model_name not in doc.get("models", {}):
        raise SystemExit(f"{pilot} has no pilot of {model_name}: run analyses/copy_probe_pilot.py --models {model_name}")
    spec = importlib.util.spec_from_file_location("copy_probe_pilot", Path(__file__).with_name("copy_probe_pilot.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kept, dropped = module.keep({model_name: doc["models"][model_name]})
    if len(kept) >= 2:
        return kept, f"kept by the pilot's rule on {model_name}; dropped: {dropped}"
    return list(SETTINGS["probe_tasks"]), f"the pilot's rule kept {kept} on {model_name} (fewer than two): all six used"


def _name(args) -> str:
    """The study's name for its work folder and docs JSON: the model's, `-n<N>` added for another n."""
    return args.model if args.n is None else f"{args.model}-n{args.n}"


def _work(args) -> Path:
    return Path(args.work or f"results/copy_mechanism/{_name(args)}")


#: the state files that do not depend on n, which a rerun at another n reuses from the frozen run's folder
N_FREE = ("select_seed*.json", "*_select_seed*.json", "probe_test.json", "*_probe_test.json", "costs.json", "*_costs.json")


def reuse_n_free(source: Path, work: Path) -> list[str]:
    """Copy the n-free state (selections, probe test, costs) of the frozen run into a rerun's work folder,
    where not already there; the names copied."""
    import shutil

    copied = []
    for pattern in N_FREE:
        for path in sorted(source.glob(pattern)):
            if not (work / path.name).exists():
                shutil.copyfile(path, work / path.name)
                copied.append(path.name)
    return copied


def _probe(tokenizer, construction: str, seed: int, settings: dict = SETTINGS):
    from mechcopy.tasks.copy_probe import CopyProbeConfig, build_copy_probe

    s = settings
    config = CopyProbeConfig(tuple(s["probe_tasks"]), construction, s["shots"], s["n_attr"], s["n_dev"], s["n_test"])
    return build_copy_probe(tokenizer, config, seed=s["probe_seed"], attribution_seed=seed)


def _by_task(prompts) -> dict[str, list]:
    out: dict[str, list] = {}
    for p in prompts:
        out.setdefault(p.task, []).append(p)
    return out


def _predict_tasks(model, prompts, conditions, batch_size: int = 32) -> dict[str, dict[str, list[str]]]:
    """{condition label: {task: answers}} on probe prompts, each task read over its own label set."""
    from mechcopy.evaluation import predict_conditions

    out: dict[str, dict[str, list[str]]] = {c.label: {} for c in conditions}
    for task, ps in _by_task(prompts).items():
        got = predict_conditions(model, ps, conditions, batch_size=batch_size, labels=ps[0].label_space)
        for label, answers in got.items():
            out[label][task] = answers
    return out


def _ppl_increase(model, condition, base_ppl: float, settings: dict = SETTINGS) -> float:
    """The relative perplexity increase of `condition` on the plain-text sample. An attention edit
    (`conditions.ATTENTION_EDITS`) acts on demo tokens, which plain text has none of: cost 0."""
    from mechcopy.conditions import ATTENTION_EDITS
    from mechcopy.evaluation import perplexity
    from mechcopy.pruning import condition_hooks

    if condition.ablation in ATTENTION_EDITS:
        return 0.0
    return perplexity(model, fwd_hooks=condition_hooks(model, condition), n_tokens=settings["ppl_tokens"]) / base_ppl - 1


def _dev_sweep(model, probe, candidates: Sequence[Any], settings: dict = SETTINGS) -> dict[str, Any]:
    """The dev rule (docs/copy_mechanism.md): each candidate `Condition` (an ablation) read by label
    scoring on the probe's dev split (each probe task weighing the same) and its perplexity increase;
    the best dev accuracy within the perplexity bound wins (ties to the smaller set, then the larger
    down-weighting factor), if it beats the unpruned model (else nothing is chosen, and `why` says so)."""
    from mechcopy.conditions import LABELS, UNPRUNED
    from mechcopy.evaluation import perplexity

    s = settings
    unpruned = replace(UNPRUNED, readout=LABELS)
    preds = _predict_tasks(model, probe.dev, [unpruned, *candidates])
    dev = _by_task(probe.dev)

    def accuracy(label: str) -> float:   # every task weighs the same
        return float(np.mean([np.mean([a.strip() == p.answer.strip() for a, p in zip(preds[label][t], ps)])
                              for t, ps in dev.items()]))

    base_ppl = perplexity(model, n_tokens=s["ppl_tokens"])
    rows = []
    for c in candidates:
        cost = _ppl_increase(model, c, base_ppl, s)
        rows.append({"condition": c.name, "ablation": c.ablation, "positions": c.positions, "k": len(c.components),
                     **({} if c.factor is None else {"factor": c.factor}), "dev_accuracy": accuracy(c.label),
                     "ppl_increase": cost, "feasible": cost <= s["max_ppl_increase"]})
    baseline = accuracy(unpruned.label)
    feasible = [r for r in rows if r["feasible"]]
    best = max(feasible, key=lambda r: (r["dev_accuracy"], -r["k"], r.get("factor", 0.0))) if feasible else None
    if best is None or best["dev_accuracy"] <= baseline:
        chosen, why = None, ("no (k, ablation) within the perplexity bound" if best is None else
                             f"no (k, ablation) beats the unpruned dev accuracy {baseline:.3f} "
                             f"(best: {best['condition']}, {best['dev_accuracy']:.3f})")
    else:
        chosen, why = best, ""
    return {"dev_unpruned_accuracy": baseline, "base_ppl": base_ppl, "sweep": rows, "chosen": chosen, "why": why}


def _selection(model, seed: int, n_attr: int, n_dev: int, scores, sweep: dict, means, sizes, t0: float,
               t_attr: float, extra: dict | None = None) -> dict[str, Any]:
    """What a select stage saves for one seed (neurons or heads)."""
    from mechcopy.selection import select

    chosen = sweep["chosen"]
    comps = None if chosen is None else select(scores, "global", k=chosen["k"])
    return {"seed": seed, "kind": scores.kind, "n_attribution": n_attr, "n_dev": n_dev,
            "allowed_layers": None if scores.allowed_layers is None else list(scores.allowed_layers),
            **{k: sweep[k] for k in ("dev_unpruned_accuracy", "base_ppl", "sweep")},
            "chosen": None if chosen is None else {**chosen, "components": comps.to_json()}, "why": sweep["why"],
            "layers_of_chosen": None if comps is None else comps.layer_counts(model.cfg.n_layers),
            "means": means.to_json() if chosen and chosen["ablation"] == "mean" else None,
            "sizes": sizes.to_json(), **(extra or {}),
            "seconds": {"attribution": round(t_attr, 1), "total": round(time.perf_counter() - t0, 1)}}


def select_seed(model, seed: int, settings: dict = SETTINGS, progress: bool = False) -> dict[str, Any]:
    """One selection seed, neurons: IG scores on the probe's attribution split, the dev sweep over k and
    ablation (`_dev_sweep`), the chosen set, its means and the sizes."""
    from mechcopy import method
    from mechcopy.conditions import LABELS, Condition
    from mechcopy.pruning import component_means, component_sizes
    from mechcopy.selection import select

    s = settings
    t0 = time.perf_counter()
    probe = _probe(model.tokenizer, "no-gold", seed, s)
    config = method.FindConfig(n=len(probe.attribution), shots=s["shots"], steps=s["steps"],
                               attribution=s["attribution"], target=s["target"], seed=seed)
    attributions = method.attribute(model, probe.attribution, config, progress=progress)
    scores = method.score(model, attributions, config, prompts=probe.attribution)
    t_attr = time.perf_counter() - t0
    reference = f"copy probe attribution split (no-gold), selection seed {seed}"
    means = component_means(model, probe.attribution, "neuron", s["positions"], reference=reference)
    sizes = component_sizes(model, probe.attribution, "neuron", reference=reference)
    candidates = [Condition(f"{ab}-k{k}", "pruned", select(scores, "global", k=k), ab, s["positions"],
                            means if ab == "mean" else None, readout=LABELS)
                  for ab in s["ablations"] for k in s["ks"]]
    sweep = _dev_sweep(model, probe, candidates, s)
    return _selection(model, seed, len(probe.attribution), len(probe.dev), scores, sweep, means, sizes, t0, t_attr)


def preferred_demo_label(model, prompt) -> str:
    """The demo label (not the gold) whose first token the clean run's last position prefers: the X of
    the contrast target (`attribution.make_target("contrast")`)."""
    import torch

    from mechcopy.attribution import make_target

    with torch.no_grad():
        logits = model(prompt.text)[0, -1]
    copy = make_target("contrast", prompt, logits).copy
    return next(y for y, ids in zip(prompt.demo_labels, prompt.demo_label_ids) if ids[0] == copy)


def head_attributions(model, prompts, seed: int, settings: dict = SETTINGS, progress: bool = False):
    """IG over heads from the label-swap counterfactual (docs/copy_mechanism.md, "Heads"): each prompt's
    swap of its preferred demo label X (`tasks.pairs.label_swaps`), target logit(X) - logit(gold);
    returns (attributions, the clean prompts attributed, the reasons of the prompts dropped)."""
    from mechcopy.head_attribution import head_integrated_gradients, label_swap_target
    from mechcopy.tasks.pairs import label_swaps

    swaps, dropped = label_swaps(prompts, model.tokenizer, seed=seed,
                                 choose_x=lambda p: preferred_demo_label(model, p))
    if not swaps:
        raise ValueError(f"no label swap on the attribution split: {dropped[:3]}")
    clean = [w.clean for w in swaps]
    targets = [label_swap_target(w.clean, w.clean.demo_labels[w.replaced[0]]) for w in swaps]
    attributions = head_integrated_gradients(model, clean, target=targets, steps=settings["steps"],
                                             baseline=[w.counterfactual for w in swaps], progress=progress)
    return attributions, clean, dropped


def score_heads(model, attributions, clean: Sequence, seed: int, settings: dict = SETTINGS):
    """Head attributions of the prompts `clean` scored as the study scores them (`method.score`: min-max per
    prompt, IG's completeness gate)."""
    from mechcopy import method

    config = method.FindConfig(n=len(clean), shots=settings["shots"], steps=settings["steps"], attribution="ig",
                               target="contrast", seed=seed, components="heads")
    return method.score(model, attributions, config, prompts=clean)


def head_scores(model, probe, seed: int, settings: dict = SETTINGS, progress: bool = False):
    """The head arm's scores of one selection seed: `head_attributions` on the probe's attribution split,
    `score_heads`; returns (scores, the clean prompts attributed, the reasons of the prompts dropped)."""
    attributions, clean, dropped = head_attributions(model, probe.attribution, seed, settings, progress)
    return score_heads(model, attributions, clean, seed, settings), clean, dropped


def select_heads_seed(model, seed: int, settings: dict = SETTINGS, progress: bool = False,
                      positions: str | None = None) -> dict[str, Any]:
    """One selection seed, heads: `head_scores` on the probe's attribution split, the dev sweep over h
    (mean ablation at `positions`, by default the frozen every-position, `_dev_sweep`), the chosen set,
    its means and the sizes."""
    from mechcopy.conditions import LABELS, Condition
    from mechcopy.pruning import component_means, component_sizes
    from mechcopy.selection import select

    s = settings
    t0 = time.perf_counter()
    probe = _probe(model.tokenizer, "no-gold", seed, s)
    scores, clean, dropped = head_scores(model, probe, seed, s, progress)
    t_attr = time.perf_counter() - t0
    reference = f"copy probe attribution split (no-gold), selection seed {seed}"
    positions = positions or s["positions"]
    means = component_means(model, probe.attribution, "head", positions, reference=reference)
    sizes = component_sizes(model, probe.attribution, "head", reference=reference)
    eligible = int(scores.eligible().sum())
    candidates = [Condition(f"mean-h{h}", "pruned", select(scores, "global", k=h), "mean", positions, means,
                            readout=LABELS) for h in s["hs"] if h <= eligible]
    sweep = _dev_sweep(model, probe, candidates, s)
    extra = {"n_dropped": len(dropped), "dropped": dropped[:20], "n_eligible": eligible,
             "scores_top": sorted(([int(l), int(h), float(scores.scores[l, h])] for l, h in
                                   select(scores, "global", k=min(20, eligible)).pairs), key=lambda r: -r[2])}
    return _selection(model, seed, len(clean), len(probe.dev), scores, sweep, means, sizes, t0, t_attr, extra)


def unibias_candidates(model, probe, seed: int, settings: dict = SETTINGS) -> tuple[list, dict[str, Any]]:
    """The UniBias-style arm's candidates for one selection seed (docs/copy_mechanism.md, "A UniBias-style
    selection"): every head's and neuron's direct label push on the probe's attribution split (no-gold,
    `label_push.label_push`), scored by `label_push.unibias_scores`; the top k heads (k in `unibias_hs`)
    and the top k neurons (k in `unibias_ks`), each zeroed at the last position, read by label scoring.
    Returns (candidates, extras: per kind the top 20 with their scores, how many score above 0, seconds)."""
    from mechcopy.conditions import LABELS, Condition
    from mechcopy.label_push import label_push, unibias_scores
    from mechcopy.selection import select

    candidates, extra = [], {"seed": seed, "n_attribution": len(probe.attribution)}
    for kind, ks, tag in (("head", settings.get("unibias_hs", [5, 10, 20]), "h"),
                          ("neuron", settings.get("unibias_ks", [10, 20, 50, 100, 200]), "k")):
        t0 = time.perf_counter()
        scores = unibias_scores(label_push(model, probe.attribution, kind))
        eligible = int(scores.eligible().sum())
        candidates += [Condition(f"zero-{tag}{k}", "pruned", select(scores, "global", k=k), "zero", "last",
                                 readout=LABELS) for k in ks if k <= eligible]
        extra[kind] = {"seconds": round(time.perf_counter() - t0, 1), "n_positive": int((scores.scores > 0).sum()),
                       "n_consistent_by_task": scores.meta["n_consistent_by_task"],
                       "scores_top": sorted(([int(l), int(c), float(scores.scores[l, c])] for l, c in
                                             select(scores, "global", k=min(20, eligible)).pairs), key=lambda r: -r[2])}
    return candidates, extra


def _chosen(model, seed: int, probe, sweep: dict, candidates: Sequence[Any], t0: float, extra: dict) -> dict[str, Any]:
    """What a select stage of a third-session arm saves for one seed: the dev sweep, the chosen candidate's
    components (and its kind's sizes at the answer position, for size-matched random sets)."""
    from mechcopy.pruning import component_sizes

    chosen = sweep["chosen"]
    cond = None if chosen is None else next(c for c in candidates if c.name == chosen["condition"])
    comps = None if cond is None else cond.components
    sizes = None if comps is None else component_sizes(
        model, probe.attribution, comps.kind, reference=f"copy probe attribution split (no-gold), selection seed {seed}")
    return {"seed": seed, "kind": None if comps is None else comps.kind, "n_attribution": len(probe.attribution),
            "n_dev": len(probe.dev), **{k: sweep[k] for k in ("dev_unpruned_accuracy", "base_ppl", "sweep")},
            "chosen": None if comps is None else {**chosen, "components": comps.to_json()}, "why": sweep["why"],
            "layers_of_chosen": None if comps is None else comps.layer_counts(model.cfg.n_layers),
            "means": None, "sizes": None if sizes is None else sizes.to_json(), **extra,
            "seconds": {"total": round(time.perf_counter() - t0, 1)}}


def select_attention_seed(model, seed: int, work: Path, settings: dict = SETTINGS) -> dict[str, Any]:
    """One selection seed, `heads-attn`: the top h heads of the seed's last-position head ranking (its
    `heads-last` select file, not recomputed), the answer position's attention to the demo labels times f;
    (h, f) by the dev rule (`_dev_sweep`; cost 0 by construction)."""
    from mechcopy.conditions import LABEL_ATTENTION, LABELS, Condition
    from mechcopy.heads import head_set

    path = work / _file("heads-last", f"select_seed{seed}.json")
    if not path.exists():
        raise FileNotFoundError(f"{path}: heads-attn takes the heads-last ranking of seed {seed}; run "
                                "`--components heads-last --stage select` first")
    ranking = [(int(l), int(h)) for l, h, _ in json.loads(path.read_text())["scores_top"]]
    t0 = time.perf_counter()
    probe = _probe(model.tokenizer, "no-gold", seed, settings)
    candidates = [Condition(f"attn-h{h}-f{f:g}", "pruned", head_set(model, ranking[:h]), LABEL_ATTENTION, "last",
                            readout=LABELS, factor=f)
                  for h in settings["hs"] if h <= len(ranking) for f in THIRD["attn_factors"]]
    sweep = _dev_sweep(model, probe, candidates, settings)
    return _chosen(model, seed, probe, sweep, candidates, t0, {"ranking_from": path.name, "ranking_top": ranking})


def select_unibias_seed(model, seed: int, settings: dict = SETTINGS) -> dict[str, Any]:
    """One selection seed, `unibias`: the UniBias-style candidates (`unibias_candidates`, heads and neurons
    zeroed at the last position), one chosen by the dev rule (`_dev_sweep`)."""
    t0 = time.perf_counter()
    probe = _probe(model.tokenizer, "no-gold", seed, settings)
    candidates, extra = unibias_candidates(model, probe, seed, {**settings, **THIRD})
    sweep = _dev_sweep(model, probe, candidates, settings)
    return _chosen(model, seed, probe, sweep, candidates, t0, extra)


def select_vowel_seed(model, model_name: str, seed: int = 0, settings: dict = SETTINGS) -> dict[str, Any]:
    """`vowel` (fourth session): the paper's method as it ran, not chosen on the copy probe: the neurons
    `mechcopy find` chose on the vowel probe (`VOWEL_SETS`), zeroed at every position as `find` applies
    them. Its dev accuracy and cost on the copy probe are recorded (`_dev_sweep` of that one set), but it is
    the chosen set whatever they say; sizes on the seed's attribution split, for its size-matched random set."""
    from mechcopy.components import Components
    from mechcopy.conditions import LABELS, Condition

    if model_name not in VOWEL_SETS:
        raise ValueError(f"no vowel-probe set for {model_name}: `mechcopy find` chose k = 0 on it (docs/replication.md), "
                         f"so the vowel arm has nothing to run; sets exist for {', '.join(VOWEL_SETS)}")
    t0 = time.perf_counter()
    comps = Components.load(VOWEL_SETS[model_name])
    comps.check(model)
    probe = _probe(model.tokenizer, "no-gold", seed, settings)
    candidate = Condition(f"zero-k{len(comps)}", "pruned", comps, "zero", "all", readout=LABELS)
    sweep = _dev_sweep(model, probe, [candidate], settings)
    sweep = {**sweep, "chosen": sweep["sweep"][0],
             "why": "not chosen by the dev rule: the set find chose on the vowel probe, evaluated as it is"}
    return _chosen(model, seed, probe, sweep, [candidate], t0, {"source": str(VOWEL_SETS[model_name])})


def group_of(arm: str, seed: int) -> str:
    """The group of an arm's conditions for one selection seed: `s0` (neurons, the frozen names), `heads-s0`."""
    return f"s{seed}" if arm == "neurons" else f"{arm}-s{seed}"


def seed_conditions(model, selections: Sequence[dict], settings: dict = SETTINGS,
                    arm: str = "neurons") -> tuple[list, list]:
    """(pruned conditions, size-matched random conditions), one group per seed that chose a set."""
    from mechcopy.components import Components, Sizes, random_matched
    from mechcopy.conditions import LABELS, Condition, Means

    pruned, random = [], []
    for sel in selections:
        if sel["chosen"] is None:
            continue
        comps = Components.from_json(sel["chosen"]["components"])
        ab = sel["chosen"]["ablation"]
        means = Means.from_json(sel["means"]) if ab == "mean" else None
        group = group_of(arm, sel["seed"])
        positions = sel["chosen"].get("positions", settings["positions"])   # the frozen neuron state has none: all
        factor = sel["chosen"].get("factor")           # heads-attn only
        pruned.append(Condition("pruned", "pruned", comps, ab, positions, means, None, group, LABELS, factor=factor))
        sizes = Sizes.from_json(sel["sizes"])
        for r in range(settings["n_random_per_seed"]):
            rseed = 1000 * sel["seed"] + r
            random.append(Condition(f"random-{rseed}", "random", random_matched(model, comps, rseed, settings["random_match"],
                                    sizes), ab, positions, means, rseed, group, LABELS, factor=factor))
    return pruned, random


def probe_test(model, selections: Sequence[dict], settings: dict = SETTINGS, arm: str = "neurons") -> dict[str, Any]:
    """The probe's test split (copy-control), unpruned and every seed's set and random sets: answers."""
    from mechcopy.conditions import LABELS, UNPRUNED

    probe = _probe(model.tokenizer, "copy-control", settings["probe_seed"], settings)
    pruned, random = seed_conditions(model, selections, settings, arm)
    conditions = [replace(UNPRUNED, readout=LABELS)] + pruned + random
    t0 = time.perf_counter()
    preds = _predict_tasks(model, probe.test, conditions)
    return {"predictions": preds, "seconds": round(time.perf_counter() - t0, 1), "n": len(probe.test)}


def heldout(model, selections: Sequence[dict], construction: str, checkpoint: Path, settings: dict = SETTINGS,
            progress: bool = True, arm: str = "neurons") -> tuple[list[ResultRow], dict]:
    """The held-out label tasks in one construction (`CONSTRUCTIONS`): every condition of the study, label
    scoring. The neuron arm runs the calibrations alone too; the head arm only its sets, their random sets
    and the sets + calibration (and the unpruned model again, to check it reproduces the neuron arm's);
    heads-attn also its control `others` (the same heads' attention to as many other demo tokens removed)."""
    from mechcopy.conditions import LABEL_ATTENTION, LABELS, OTHER_ATTENTION, UNPRUNED, calibrated_conditions
    from mechcopy.suite import run_evaluation
    from mechcopy.tasks import load_tasks

    pruned, random = seed_conditions(model, selections, settings, arm)
    conditions = [replace(UNPRUNED, readout=LABELS)] + pruned + random
    conditions += [c for c in calibrated_conditions(pruned, settings["calibrations"])
                   if arm == "neurons" or c.name not in settings["calibrations"]]
    # heads-attn's control that keeps the heads: as much attention to other demo tokens removed instead,
    # drawn with the selection's seed (`pruned` holds one condition per seed that chose a set, in order)
    chose = [sel for sel in selections if sel["chosen"] is not None]
    conditions += [replace(p, name="others", family="others", ablation=OTHER_ATTENTION, seed=sel["seed"])
                   for p, sel in zip(pruned, chose, strict=True) if p.ablation == LABEL_ATTENTION]
    tasks = load_tasks(",".join(settings["heldout_tasks"]))
    if construction == "copy-control":   # two labels and no gold among the demos: no copy effect to estimate
        tasks = [t for t in tasks if len(t.label_set()) >= 3]
    return run_evaluation(model, tasks, shots=settings["shots"], n=settings["n"], seed=settings["prompt_seed"],
                          conditions=conditions, progress=progress, batch_size=64, checkpoint=checkpoint,
                          gold_in_demos=construction == "standard", copy_control=construction == "copy-control")


def ablation_costs(model, selections: Sequence[dict], settings: dict = SETTINGS, arm: str = "neurons") -> dict[str, float]:
    """Relative perplexity increase of every ablation condition (label -> increase)."""
    from mechcopy.evaluation import perplexity

    pruned, random = seed_conditions(model, selections, settings, arm)
    base = perplexity(model, n_tokens=settings["ppl_tokens"])
    return {c.label: _ppl_increase(model, c, base, settings) for c in pruned + random}


# ---------------------------------------------------------------- the summary: tables and criteria


def _rows_by(rows: Sequence[ResultRow]) -> dict[str, dict[str, ResultRow]]:
    out: dict[str, dict[str, ResultRow]] = {}
    for r in rows:
        out.setdefault(r.condition, {})[r.task] = r
    return out


def _ce(row: ResultRow) -> float | None:
    return (row.result.copy_effect or {}).get("effect")


def compare(rows_no_gold: Sequence[ResultRow], rows_cc: Sequence[ResultRow], condition: str, baseline: str,
            seed: int = 0, cc_prompts: dict[str, Sequence] | None = None) -> dict[str, Any]:
    """condition - baseline on the held-out tasks: accuracy and copy rate (no-gold; pooled with its
    prompt-level interval, `stats.pooled`, and with the task as the unit, `stats.task_level`) and the
    copy effect (copy-control; per-task differences, task-level; with the copy-control prompts of every
    task, `cc_prompts`, also the paired prompt-level interval of `copy_effect.copy_effect_difference`)."""
    from mechcopy import stats

    out: dict[str, Any] = {"condition": condition, "baseline": baseline}
    by = _rows_by(rows_no_gold)
    if condition in by and baseline in by:
        tasks = sorted(set(by[condition]) & set(by[baseline]))
        for metric, key in (("accuracy", "correct"), ("copy_rate", "copy")):
            per_task = {t: (np.asarray(getattr(by[condition][t].result, key), bool),
                            np.asarray(getattr(by[baseline][t].result, key), bool)) for t in tasks}
            pooled = stats.pooled(per_task, condition, baseline, metric, seed=seed)
            level = stats.task_level({t: float(x.mean() - y.mean()) for t, (x, y) in per_task.items()}, metric,
                                     condition, baseline, seed=seed)
            out[metric] = {"diff": pooled.diff, "prompt_ci": list(pooled.ci), "task_ci": list(level.ci),
                           "task_p": level.p_value, "sign_p": level.sign_p, "n_up": level.n_up, "n_down": level.n_down,
                           "n_tasks": level.n_tasks, "per_task": level.diffs}
    by = _rows_by(rows_cc)
    if condition in by and baseline in by:
        diffs = {t: _ce(by[condition][t]) - _ce(by[baseline][t]) for t in sorted(set(by[condition]) & set(by[baseline]))
                 if _ce(by[condition][t]) is not None and _ce(by[baseline][t]) is not None}
        if diffs:
            level = stats.task_level(diffs, "copy_effect", condition, baseline, seed=seed)
            out["copy_effect"] = {"diff": level.mean, "task_ci": list(level.ci), "task_p": level.p_value,
                                  "sign_p": level.sign_p, "n_tasks": level.n_tasks, "per_task": level.diffs}
            if cc_prompts is not None:
                from mechcopy.copy_effect import copy_effect_difference

                paired = copy_effect_difference({t: (cc_prompts[t], by[condition][t].result.predictions,
                                                     by[baseline][t].result.predictions,
                                                     (by[baseline][t].result.copy_effect or {})["labels"])
                                                 for t in diffs}, seed=seed)
                out["copy_effect"]["prompt_ci"] = paired["ci"]
                out["copy_effect"]["prompt_diff"] = paired["diff"]
    return out


def standard_check(rows: Sequence[ResultRow], selections: dict[str, Sequence[dict]], seed: int = 0) -> dict[str, Any] | None:
    """The standard construction (docs/copy_mechanism.md, "Fourth session"): does an intervention cost
    ordinary ICL? Every condition against unpruned (accuracy and the rate of wrong answers that are a demo
    label, `compare`), and per arm of `selections` the mean over its seeds of acc(set) - acc(unpruned) per
    task (a seed that chose nothing counts as the unpruned model, 0), task-level; `harms`: the task-level
    interval of Δ accuracy lies below 0. None when the construction has not run."""
    by = _rows_by(rows)
    if "unpruned" not in by:
        return None
    base = {t: float(np.mean(r.result.correct)) for t, r in by["unpruned"].items()}
    table = {}
    for name in sorted(by):
        row = compare(rows, [], name, "unpruned", seed=seed) if name != "unpruned" else {}
        if "accuracy" in row:
            table[name] = {**row, "harms": row["accuracy"]["task_ci"][1] < 0}
    over = {}
    for arm, sels in selections.items():   # each seed's set; a seed that chose nothing is the unpruned model
        names = [f"pruned@{group_of(arm, sel['seed'])}" if sel["chosen"] is not None else "unpruned" for sel in sels]
        chose = len(names) - names.count("unpruned")
        if not chose or any(set(by.get(n, {})) != set(base) for n in names):
            continue   # nothing chosen, or not run on every task
        diffs = {t: float(np.mean([np.mean(by[n][t].result.correct) for n in names])) - b for t, b in base.items()}
        level = _level(diffs, "accuracy", seed)
        over[arm] = {**level, "harms": level["task_ci"][1] < 0, "seeds": len(sels), "chose": chose}
    return {"what": "the standard construction (demos drawn freely): every condition against the unpruned model, "
                    "and each arm over its seeds; harms = the task-level 95% interval of Δ accuracy below 0",
            "unpruned": {"accuracy": float(np.mean(list(base.values()))),
                         "copy_rate": float(np.mean([r.result.copy_rate for r in by["unpruned"].values()]))},
            "table": table, "over_seeds": over}


def _level(diffs: dict[str, float], what: str, seed: int = 0) -> dict[str, Any]:
    from mechcopy import stats

    level = stats.task_level(diffs, what, "", "", seed=seed)
    return {"mean": level.mean, "task_ci": list(level.ci), "task_p": level.p_value, "n_up": level.n_up,
            "n_down": level.n_down, "n_tasks": level.n_tasks, "per_task": level.diffs}


def criteria(selections: Sequence[dict], probe: dict | None, rows_no_gold: Sequence[ResultRow],
             rows_cc: Sequence[ResultRow],
             probe_prompts=None, settings: dict = SETTINGS, seed: int = 0, arm: str = "neurons") -> dict[str, Any]:
    """Both criteria of docs/copy_mechanism.md, per seed and for the mean over seeds.

    1. Copying mechanism: on the probe's test split, CE(set) - CE(random) (= dCE(set) - dCE(random)) with a
       paired prompt-level interval below 0; on the held-out tasks, per task |CE(random)| - |CE(set)|
       (= [|CE0| - |CE(set)|] - [|CE0| - |CE(random)|]) with a task-level interval above 0.
    2. Better than calibration: per task acc(set) - acc(calibration) (= the difference of their gains),
       no-gold, task-level interval above 0, against each calibration separately.

    The mean over seeds counts every selection seed: one whose dev sweep chose nothing prunes nothing
    (`no_selection`), so it enters as the unpruned model (copy-effect differences 0; its accuracy the
    unpruned model's, its "set + calibration" the calibration's)."""
    from mechcopy.copy_effect import copy_effect_difference

    seeds = [group_of(arm, sel["seed"]) for sel in selections if sel["chosen"] is not None]
    ng, cc = _rows_by(rows_no_gold), _rows_by(rows_cc)
    empty = [group_of(arm, sel["seed"]) for sel in selections if sel["chosen"] is None]
    out: dict[str, Any] = {"seeds": seeds, "no_selection": empty, "mechanism": {}, "versus_calibration": {}}

    def randoms(group: str, by: dict) -> list[str]:
        return [c for c in by if c.startswith("random-") and c.endswith(f"@{group}")]

    probe_parts, held_parts = {}, {}
    for g in seeds:
        res: dict[str, Any] = {}
        if probe is not None and probe_prompts is not None:
            per_task = {}
            for t, ps in _by_task(probe_prompts).items():
                rand = [probe["predictions"][r][t] for r in probe["predictions"] if r.startswith("random-") and r.endswith(f"@{g}")]
                for i, r in enumerate(rand):
                    per_task[f"{t}#{i}"] = (ps, probe["predictions"][f"pruned@{g}"][t], r, ps[0].label_space)
            probe_parts.update({f"{k}#{g}": v for k, v in per_task.items()})
            res["probe_test"] = copy_effect_difference(per_task, seed=seed)
            ci = res["probe_test"]["ci"]
            res["probe_test"]["holds"] = bool(ci is not None and ci[1] < 0)
        diffs = {}
        for t in sorted(cc.get(f"pruned@{g}", {})):
            ce_set = _ce(cc[f"pruned@{g}"][t])
            ce_rand = [_ce(cc[r][t]) for r in randoms(g, cc)]
            if ce_set is not None and ce_rand and all(x is not None for x in ce_rand):
                diffs[t] = float(abs(np.mean(ce_rand)) - abs(ce_set)) if len(ce_rand) == 1 else \
                    float(np.mean([abs(x) for x in ce_rand]) - abs(ce_set))
        if len(diffs) >= 2:
            res["heldout"] = _level(diffs, "|CE(random)| - |CE(set)|", seed)
            res["heldout"]["holds"] = bool(res["heldout"]["task_ci"][0] > 0)
            held_parts[g] = diffs
        res["holds"] = bool(res.get("probe_test", {}).get("holds") and res.get("heldout", {}).get("holds"))
        out["mechanism"][g] = res
        for cal in settings["calibrations"]:
            for name in (f"pruned@{g}", f"pruned+{cal}@{g}"):
                if name in ng and cal in ng:
                    d = {t: float(np.mean(ng[name][t].result.correct) - np.mean(ng[cal][t].result.correct))
                         for t in sorted(set(ng[name]) & set(ng[cal]))}
                    r = _level(d, f"acc({name}) - acc({cal})", seed)
                    r["holds"] = bool(r["task_ci"][0] > 0)
                    out["versus_calibration"].setdefault(g, {})[f"{name}_vs_{cal}"] = r
    for g in empty:   # nothing pruned: the set is the unpruned model, and so is its random counterpart
        if probe is not None and probe_prompts is not None and probe_parts:
            for t, ps in _by_task(probe_prompts).items():
                same = probe["predictions"]["unpruned"][t]
                probe_parts[f"{t}#0#{g}"] = (ps, same, same, ps[0].label_space)
        if held_parts and "unpruned" in cc:
            held_parts[g] = {t: 0.0 for t, r in cc["unpruned"].items() if _ce(r) is not None}
    mean: dict[str, Any] = {}
    if probe_parts:
        mean["probe_test"] = copy_effect_difference(probe_parts, seed=seed)
        ci = mean["probe_test"]["ci"]
        mean["probe_test"]["holds"] = bool(ci is not None and ci[1] < 0)
    if held_parts:
        tasks = sorted(set.intersection(*(set(d) for d in held_parts.values())))
        if len(tasks) >= 2:
            mean["heldout"] = _level({t: float(np.mean([d[t] for d in held_parts.values()])) for t in tasks},
                                     "|CE(random)| - |CE(set)|, mean over seeds", seed)
            mean["heldout"]["holds"] = bool(mean["heldout"]["task_ci"][0] > 0)
    mean["holds"] = bool(mean.get("probe_test", {}).get("holds") and mean.get("heldout", {}).get("holds"))
    mean["seeds_holding"] = sum(out["mechanism"][g]["holds"] for g in seeds)
    out["mechanism"]["mean_over_seeds"] = mean
    vs_mean = {}
    for cal in settings["calibrations"]:
        for stem in ("pruned", f"pruned+{cal}"):
            names = [f"{stem}@{g}" for g in seeds if f"{stem}@{g}" in ng]
            names += [("unpruned" if stem == "pruned" else cal) for g in empty] if names else []
            if names and cal in ng:
                tasks = sorted(set(ng[cal]).intersection(*(set(ng[n]) for n in names)))
                d = {t: float(np.mean([np.mean(ng[n][t].result.correct) for n in names]) - np.mean(ng[cal][t].result.correct))
                     for t in tasks}
                r = _level(d, f"acc({stem}, mean over seeds) - acc({cal})", seed)
                r["holds"] = bool(r["task_ci"][0] > 0)
                r["seeds_holding"] = sum(out["versus_calibration"].get(g, {}).get(f"{stem}@{g}_vs_{cal}", {}).get("holds", False)
                                         for g in seeds)
                vs_mean[f"{stem}_vs_{cal}"] = r
    out["versus_calibration"]["mean_over_seeds"] = vs_mean
    others = [g for g in seeds if f"others@{g}" in ng]
    if others:   # heads-attn: the label edit against the same heads' edit of other demo tokens
        out["versus_others"] = {}
        acc = {g: {t: float(np.mean(ng[f"pruned@{g}"][t].result.correct) - np.mean(ng[f"others@{g}"][t].result.correct))
                   for t in sorted(set(ng[f"pruned@{g}"]) & set(ng[f"others@{g}"]))} for g in others}
        ce = {g: {t: float(abs(_ce(cc[f"others@{g}"][t])) - abs(_ce(cc[f"pruned@{g}"][t])))
                  for t in sorted(set(cc.get(f"pruned@{g}", {})) & set(cc.get(f"others@{g}", {})))
                  if _ce(cc[f"pruned@{g}"][t]) is not None and _ce(cc[f"others@{g}"][t]) is not None} for g in others}
        for g in others:
            out["versus_others"][g] = {"accuracy": _level(acc[g], "acc(set) - acc(others)", seed)}
            if len(ce[g]) >= 2:
                out["versus_others"][g]["copy_effect"] = _level(ce[g], "|CE(others)| - |CE(set)|", seed)
        mean_others: dict[str, Any] = {}
        for key, per in (("accuracy", acc), ("copy_effect", ce)):
            tasks = sorted(set.intersection(*(set(d) for d in per.values())))
            if len(tasks) >= 2:
                mean_others[key] = _level({t: float(np.mean([per[g][t] for g in others])) for t in tasks},
                                          f"{key}, mean over seeds", seed)
        out["versus_others"]["mean_over_seeds"] = mean_others
    return out


def _file(arm: str, name: str) -> str:
    """An arm's state file in the work folder: the neuron arm's frozen names, the others prefixed."""
    return name if arm == "neurons" else f"{arm}_{name}"


def load_state(work: Path, arm: str) -> dict[str, Any]:
    """An arm's saved state: selections, probe test predictions, held-out rows per construction, costs."""
    import json

    from mechcopy.io import read_jsonl
    from mechcopy.suite import ResultRow

    read = lambda name: json.loads((work / _file(arm, name)).read_text()) if (work / _file(arm, name)).exists() else None
    return {"selections": [json.loads(p.read_text()) for p in sorted(work.glob(_file(arm, "select_seed*.json")))],
            "probe": read("probe_test.json"), "costs": read("costs.json") or {},
            "rows": {c: [ResultRow.from_json(e["row"]) for e in read_jsonl(work / _file(arm, f"heldout_{c}.jsonl")) if isinstance(e, dict)
                         and "row" in e] if (work / _file(arm, f"heldout_{c}.jsonl")).exists() else []
                     for c in CONSTRUCTIONS}}


def best_arm(neurons: Sequence[dict], heads: Sequence[dict]) -> dict[int, str | None]:
    """Per selection seed, the arm whose chosen set has the higher dev accuracy (a tie goes to neurons,
    the frozen arm; None: neither chose a set)."""
    acc = lambda sels, seed: next((s["chosen"]["dev_accuracy"] for s in sels if s["seed"] == seed and s["chosen"]), None)
    out = {}
    for seed in sorted({s["seed"] for s in [*neurons, *heads]}):
        n, h = acc(neurons, seed), acc(heads, seed)
        out[seed] = None if n is None and h is None else "heads" if n is None or (h is not None and h > n) else "neurons"
    return out


def as_best(states: dict[str, dict], best: dict[int, str | None]) -> dict[str, Any]:
    """The best mechanistic intervention of each seed as an arm of its own (`best`): its selections, and
    its rows and probe predictions copied from the winning arm under the group `best-s<seed>`."""
    def rename(name: str) -> str | None:
        if "@" not in name:
            return None
        stem, group = name.rsplit("@", 1)
        for seed, arm in best.items():
            if arm is not None and group == group_of(arm, seed):
                return f"{stem}@{group_of('best', seed)}"
        return None

    sels = [next(s for s in states[arm]["selections"] if s["seed"] == seed) if arm else {"seed": seed, "chosen": None}
            for seed, arm in best.items()]
    rows = {c: [replace(r, result=replace(r.result, condition=rename(r.condition))) for arm in ARMS
                for r in states[arm]["rows"][c] if rename(r.condition)] for c in CONSTRUCTIONS}
    probe = None
    if states["neurons"]["probe"] is not None:
        preds = {"unpruned": states["neurons"]["probe"]["predictions"]["unpruned"]}
        for arm in ARMS:
            for name, p in ((states[arm]["probe"] or {}).get("predictions") or {}).items():
                if rename(name):
                    preds[rename(name)] = p
        probe = {"predictions": preds}
    return {"selections": sels, "rows": rows, "probe": probe}


def _selection_json(s: dict) -> dict:
    return {k: v for k, v in s.items() if k not in ("means", "sizes")} | {
        "chosen": None if s["chosen"] is None else {k: v for k, v in s["chosen"].items() if k != "components"}
        | {"components": [p for key, p in s["chosen"]["components"].items() if key in ("neurons", "heads")][0]}}


def summary(model_name: str, work: Path, settings: dict = SETTINGS, tokenizer=None,
            arm: str | None = None) -> dict[str, Any]:
    """The docs JSON from the saved state of every arm (no model needed beyond the tokenizer for the probe
    prompts): the table of every condition against unpruned, both criteria for the neuron arm (the frozen
    one), the head arms (exploratory) and each seed's dev-best of neurons and heads. With `arm` (one of
    `EXTRA_ARMS`): that arm alone, against the neuron arm's unpruned and calibration rows (`only_arm`)."""
    arms = ARMS if arm is None else ("neurons", arm)
    states = {a: load_state(work, a) for a in arms}
    neurons = states["neurons"]
    probe_prompts = (_probe(tokenizer, "copy-control", settings["probe_seed"], settings).test
                     if tokenizer and neurons["probe"] else None)
    reproduced = {}
    for a in arms[1:]:   # every other arm's unpruned rows must equal the neuron arm's
        for c in CONSTRUCTIONS:
            mine = {r.task: r.result.predictions for r in states[a]["rows"][c] if r.condition == "unpruned"}
            theirs = {r.task: r.result.predictions for r in neurons["rows"][c] if r.condition == "unpruned"}
            if mine:
                reproduced[f"{a} {c}"] = all(mine[t] == theirs.get(t) for t in mine)
    rows = {c: neurons["rows"][c] + [r for a in arms[1:] for r in states[a]["rows"][c] if r.condition != "unpruned"]
            for c in CONSTRUCTIONS}
    costs = {k: v for a in arms for k, v in states[a]["costs"].items()}
    ng = _rows_by(rows["no-gold"])
    cc_prompts = None
    if tokenizer is not None:   # the held-out copy-control prompts again (seeded), checked against the rows' effects
        from mechcopy.copy_effect import copy_effect
        from mechcopy.tasks import load_tasks
        from mechcopy.tasks.prompts import build_prompts

        cc_prompts = {t.name: build_prompts(t, tokenizer, shots=settings["shots"], n=settings["n"],
                                            seed=settings["prompt_seed"], gold_in_demos=False, copy_control=True).prompts
                      for t in load_tasks(",".join(sorted(_rows_by(rows["copy-control"]).get("unpruned", {}))))} \
            if rows["copy-control"] else None
        for t, r in (_rows_by(rows["copy-control"]).get("unpruned", {}) if cc_prompts else {}).items():
            again = copy_effect(cc_prompts[t], r.result.predictions, (r.result.copy_effect or {})["labels"]).effect
            if again is None or abs(again - _ce(r)) > 1e-9:
                raise ValueError(f"the copy-control prompts of {t} rebuilt here do not give the saved copy effect "
                                 f"({again} vs {_ce(r)}): the prompts changed since the run")
    table = []
    for name in sorted(ng):
        if name == "unpruned":
            continue
        c = compare(rows["no-gold"], rows["copy-control"], name, "unpruned", cc_prompts=cc_prompts)
        ablation = name
        for cal in settings["calibrations"]:
            ablation = ablation.replace(f"+{cal}", "")
        c["ppl_increase"] = costs.get(ablation, 0.0)     # calibration alone changes no activation
        c["seconds_per_task"] = float(np.mean([r.seconds for r in ng[name].values()]))
        table.append(c)
    levels = {c: {name: {t: {"n": r.result.n, "accuracy": r.result.accuracy, "copy_rate": r.result.copy_rate,
                              "copy_effect": _ce(r)}
                          for t, r in per.items()} for name, per in _rows_by(rows[c]).items()} for c in CRITERIA_CONSTRUCTIONS}
    best = best_arm(neurons["selections"], states["heads"]["selections"]) if arm is None else {}
    crit = {}
    read = list(states.items()) + ([("best", as_best(states, best))] if arm is None else [])
    for a, state in read:
        if state["selections"]:   # every arm is read against the same unpruned and calibration rows
            extra = state["rows"] if a == "best" else {c: [] for c in CONSTRUCTIONS}
            crit[a] = criteria(state["selections"], state["probe"], rows["no-gold"] + extra["no-gold"],
                               rows["copy-control"] + extra["copy-control"], probe_prompts, settings, arm=a)
    doc = {
        "what": "the copy-mechanism study (issue 26): the frozen neuron arm, calibration, and the head arm "
                "(exploratory); settings in docs/copy_mechanism.md",
        "model": model_name, "settings": settings,
        "selections": {arm: [_selection_json(s) for s in st["selections"]] for arm, st in states.items()},
        "shared": {arm: {f"s{a['seed']}-s{b['seed']}": len({tuple(n) for n in _selection_json(a)["chosen"]["components"]}
                                                          & {tuple(n) for n in _selection_json(b)["chosen"]["components"]})
                         for i, a in enumerate(st["selections"]) for b in st["selections"][i + 1:]
                         if a["chosen"] and b["chosen"]} for arm, st in states.items()},
        "best_arm": {f"s{seed}": arm for seed, arm in best.items()},
        "unpruned_reproduced": reproduced,
        "finished": {arm: {"select": [s["seed"] for s in st["selections"]], "probe_test": st["probe"] is not None,
                           **{f"heldout_{c}": sorted({r.task for r in st["rows"][c]}) for c in CONSTRUCTIONS}}
                     for arm, st in states.items()},
        "unpruned": {"accuracy": float(np.mean([r.result.accuracy for r in ng.get("unpruned", {}).values()] or [np.nan])),
                     "copy_rate": float(np.mean([r.result.copy_rate for r in ng.get("unpruned", {}).values()] or [np.nan])),
                     "copy_effect": float(np.mean([_ce(r) for r in _rows_by(rows["copy-control"]).get("unpruned", {}).values()
                                                   if _ce(r) is not None] or [np.nan])),
                     "what": "pooled over the held-out tasks, each weighing the same (no-gold; copy effect: copy-control)"},
        "rows": levels, "table": table, "ppl_increase": costs,
        "criteria": crit,
        "standard": standard_check(rows["standard"], {a: st["selections"] for a, st in states.items()}),
    }
    return doc if arm is None else only_arm(doc, arm, settings)


def only_arm(doc: dict[str, Any], arm: str, settings: dict = SETTINGS) -> dict[str, Any]:
    """A summary of `arm` beside the neuron arm cut to `arm`'s own conditions, selections and criteria, and
    the rows it is compared with (unpruned, each calibration alone), so that its docs JSON stays small."""
    keep = lambda name: name in ("unpruned", *settings["calibrations"]) or name.split("@")[-1].startswith(f"{arm}-s")
    return {**doc, "what": f"the copy-mechanism study's {arm} arm (exploratory), against the unpruned "
                           "model and calibration; settings in docs/copy_mechanism.md",
            "selections": {arm: doc["selections"][arm]}, "shared": {arm: doc["shared"][arm]},
            "finished": {arm: doc["finished"][arm]}, "criteria": {arm: doc["criteria"].get(arm, {})},
            "table": [row for row in doc["table"] if keep(row["condition"])],
            "ppl_increase": {k: v for k, v in doc["ppl_increase"].items() if keep(k)},
            "rows": {c: {name: per for name, per in by.items() if keep(name)} for c, by in doc["rows"].items()},
            "standard": doc.get("standard") and {**doc["standard"],
                                                 "table": {k: v for k, v in doc["standard"]["table"].items() if keep(k)},
                                                 "over_seeds": {k: v for k, v in doc["standard"]["over_seeds"].items()
                                                                if k == arm}}}


def _rounded(obj: Any, digits: int = 4) -> Any:
    """`obj` with every float at `digits` significant digits (the docs JSON stays small)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, digits) for v in obj]
    return obj


def write_docs(doc: dict[str, Any], out: Path) -> list[Path]:
    """The summary as small JSON files (docs/data holds files under 64 KiB): `out` (settings, selections,
    the table of every condition against unpruned by name, without its per-task lists), `<out>_criteria_<arm>`
    (both criteria for one arm, per task), `<out>_tasks` (every condition's per-task figures) and, once the
    standard construction has run, `<out>_standard` (`standard_check`, per task)."""
    from mechcopy.io import write_atomic

    doc = _rounded(doc)
    what = {"neurons": "the frozen arm", "heads": "exploratory", "heads-last": "post hoc, exploratory",
            "best": "each seed's dev-best of neurons and heads", "heads-attn": "third session, exploratory",
            "unibias": "third session, exploratory", "vowel": "fourth session, the paper's vowel-probe set"}
    parts = {"": doc, "_tasks": {"what": "per held-out task and condition: n, accuracy, copy rate (no-gold), copy "
                                         "effect (copy-control)", "model": doc["model"], "rows": doc.pop("rows")}}
    standard = doc.pop("standard", None)
    if standard is not None:
        parts["_standard"] = {"model": doc["model"], **standard}
    for arm, crit in doc.pop("criteria").items():
        parts[f"_criteria_{arm}"] = {"what": f"both criteria of docs/copy_mechanism.md for the {arm} arm ({what[arm]})",
                                     "model": doc["model"], "criteria": crit}
    for row in doc["table"]:
        for metric in ("accuracy", "copy_rate", "copy_effect"):
            (row.get(metric) or {}).pop("per_task", None)
    doc["table"] = {row["condition"]: row for row in doc["table"]}   # by name: docs cite `table.<condition>.<metric>`
    paths = [out.with_name(out.stem + suffix + ".json") for suffix in parts]
    for path, part in zip(paths, parts.values()):
        write_atomic(path, json.dumps(part, indent=1) + "\n")
    return paths


def recipe_check(model_name: str, work: Path, n: int, settings: dict = SETTINGS) -> dict[str, Any]:
    """The recipe end to end as a user runs it (docs/copy_mechanism.md, "The recipe"): `mechcopy find --recipe
    copy-mechanism`, then `mechcopy evaluate --prune` with its file on the held-out tasks (no-gold, label
    scoring, both calibrations, two random sets); its pooled gains over unpruned beside calibration's, and its
    predictions against the study's own of the same prompts (the work folder's no-gold journals)."""
    from mechcopy.commands import main as cli
    from mechcopy.components import Components
    from mechcopy.io import read_jsonl
    from mechcopy.suite import ResultRow

    folder = work / "recipe"
    folder.mkdir(parents=True, exist_ok=True)
    comp, result = folder / "c.json", folder / "eval.json"
    find = ["find", "--model", model_name, "--recipe", "copy-mechanism", "--out", str(comp), "--threads", "1"]
    evaluate = ["evaluate", "--model", model_name, "--tasks", ",".join(settings["heldout_tasks"]), "--n", str(n),
                "--shots", str(settings["shots"]), "--seed", str(settings["prompt_seed"]), "--no-gold-in-demos",
                "--scoring", "labels", "--calibrate", ",".join(settings["calibrations"]), "--prune", str(comp),
                "--n-random", "2", "--out", str(result), "--threads", "1"]
    seconds = {}
    for what, argv in (("find_recipe", find), ("evaluate", evaluate)):
        t0 = time.perf_counter()
        if cli([*argv, "--force"]) != 0:
            raise RuntimeError(f"mechcopy {' '.join(argv)} failed (its message is above)")
        seconds[what] = time.perf_counter() - t0
    meta = Components.load(comp).meta
    data = json.loads(result.read_text())
    study: dict[tuple[str, str], tuple[str, ...]] = {}
    arms = ["neurons"] + ([meta["arm"]] if meta.get("arm", "neurons") != "neurons" else [])
    for arm in arms:
        for e in read_jsonl(work / _file(arm, "heldout_no-gold.jsonl")):
            if isinstance(e, dict) and "row" in e:
                r = ResultRow.from_json(e["row"])
                study[(r.task, r.condition)] = r.result.predictions
    group = group_of(meta["arm"], meta["seed"]) if meta.get("k") else None
    as_study = lambda c: c if c in ("unpruned", *settings["calibrations"]) else \
        f"{c}@{group}" if group and (c == "pruned" or c.startswith("pruned+")) else None
    comparison = []
    for row in data["results"]:
        name = as_study(row["condition"])
        theirs = study.get((row["task"], name)) if name else None
        if theirs is not None:
            comparison.append({"task": row["task"], "evaluate_condition": row["condition"], "study_condition": name,
                               "n": row["n"], "same_predictions": sum(a == b for a, b in zip(row["predictions"], theirs)),
                               "accuracy": row["accuracy"]})
    gains = {t["condition"]: t for t in data.get("task_level", [])
             if t["metric"] == "accuracy" and t["baseline"] == "unpruned"}
    pooled = {c["condition"]: c for c in data.get("comparisons", {}).get("pooled", [])
              if c["metric"] == "accuracy" and c["baseline"] == "unpruned"}
    return {"what": f"find --recipe copy-mechanism then evaluate --prune on {model_name}, against the study's held-out "
                    f"predictions of the same prompts ({work}/*heldout_no-gold.jsonl)",
            "commands": [f"mechcopy {' '.join(find)}", f"mechcopy {' '.join(evaluate)}"],
            "machine": "2 CPU cores, under the CPU lock, one thread",
            "recipe": {k: v for k, v in meta.items() if k != "intervention"}
            | {k: v for k, v in (meta.get("intervention") or {}).items() if k != "means"},
            "seconds": seconds, "comparison": comparison,
            "gain_over_unpruned": {c: {"pooled": pooled[c]["diff"], "prompt_ci": pooled[c]["ci"],
                                       "task_mean": gains[c]["mean"], "task_ci": gains[c]["ci"]}
                                   for c in gains if c in pooled},
            "unpruned_accuracy": float(np.mean([r["accuracy"] for r in data["results"] if r["condition"] == "unpruned"]))}


def main(argv=None) -> int:
    from mechcopy.commands.common import at_least

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--stage", required=True, choices=("select", "probe", "heldout", "costs", "summary", "recipe"))
    ap.add_argument("--construction", choices=CONSTRUCTIONS, default="no-gold")
    ap.add_argument("--components", choices=ARMS + EXTRA_ARMS, default="neurons",
                    help="the arm a stage runs: neurons (frozen), heads, heads-last (exploratory); summary reads these "
                         "three together. heads-attn, unibias (third session), vowel (fourth session: the paper's "
                         "vowel-probe set; one selection): summary writes each alone")
    ap.add_argument("--seeds", default=None, help="selection seeds for --stage select (default: the frozen ones)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=at_least(1), default=1)
    ap.add_argument("--n", type=at_least(1), default=None,
                    help="held-out prompts per task, to rerun the held-out stages at another n than the frozen one "
                         "(work folder and docs JSON get -n<N>; the selections, probe test and costs are reused from "
                         "the frozen run's folder)")
    args = ap.parse_args(argv)
    if args.n is not None and args.stage in ("select", "probe", "costs"):
        ap.error(f"--n reruns the held-out stages only: run --stage {args.stage} without it")
    if args.components == "vowel" and args.stage != "summary" and args.model not in VOWEL_SETS:
        ap.error(f"--components vowel: no vowel-probe set for {args.model} (`mechcopy find` chose k = 0 on it); "
                 f"sets exist for {', '.join(VOWEL_SETS)}")
    import json

    import torch

    from mechcopy import load_model
    from mechcopy.io import write_json_atomic

    torch.set_num_threads(args.threads)
    kept, why = probe_tasks(args.model)
    SETTINGS.update(probe_tasks=kept, probe_tasks_why=why)
    work = _work(args)
    work.mkdir(parents=True, exist_ok=True)
    if args.n is not None:
        SETTINGS.update(n=args.n)
        frozen = Path(f"results/copy_mechanism/{args.model}")
        copied = reuse_n_free(frozen, work)
        if copied:
            print(f"reused from {frozen}: {', '.join(copied)}", file=sys.stderr)
    if args.stage == "summary":
        from transformers import AutoTokenizer

        from mechcopy.models.zoo import cache_root

        tok = AutoTokenizer.from_pretrained(cache_root() / "models" / args.model)
        extra = args.components if args.components in EXTRA_ARMS else None
        out = args.out or Path(f"docs/data/copy_mechanism_{_name(args)}{'' if extra is None else '_' + extra}.json")
        doc = summary(args.model, work, tokenizer=tok, arm=extra)
        stages = lambda arm: ("select", "probe", "heldout --construction no-gold", "heldout --construction copy-control",
                              "costs") + (("heldout --construction standard",) if doc["finished"][arm].get("heldout_standard")
                                          else ())
        ran = [arm for arm in doc["finished"] if doc["finished"][arm]["select"]]   # the arms with saved selections
        n = "" if args.n is None else f" --n {args.n}"
        doc["commands"] = [f"python analyses/copy_mechanism.py --model {args.model}"
                           + ("" if arm == "neurons" else f" --components {arm}") + f" --stage {s}"
                           + (n if s.startswith("heldout") else "") for arm in ran for s in stages(arm)] + [
            f"python analyses/copy_mechanism.py --model {args.model}{n}"
            + ("" if extra is None else f" --components {extra}") + " --stage summary"]
        print(f"wrote {', '.join(map(str, write_docs(doc, out)))}", file=sys.stderr)
        return 0
    if args.stage == "recipe":
        doc = recipe_check(args.model, work, SETTINGS["n"])
        out = args.out or Path(f"docs/data/copy_mechanism_recipe_{args.model}.json")
        write_json_atomic(out, _rounded(doc))
        print(f"wrote {out}", file=sys.stderr)
        return 0
    model = load_model(args.model)
    arm = args.components
    selections = lambda: load_state(work, arm)["selections"]
    if args.stage == "select":
        choose = {"neurons": select_seed, "heads": select_heads_seed,
                  "heads-last": lambda *a, **k: select_heads_seed(*a, **k, positions="last"),
                  "heads-attn": lambda m, seed, progress: select_attention_seed(m, seed, work),
                  "unibias": lambda m, seed, progress: select_unibias_seed(m, seed),
                  "vowel": lambda m, seed, progress: select_vowel_seed(m, args.model, seed)}[arm]
        seeds = SETTINGS["selection_seeds"] if args.seeds is None else [int(s) for s in args.seeds.split(",")]
        seeds = seeds[:1] if arm == "vowel" else seeds     # one set: one selection
        for seed in seeds:
            path = work / _file(arm, f"select_seed{seed}.json")
            if path.exists():
                continue
            res = choose(model, seed, progress=True)
            write_json_atomic(path, res)
            print(f"{arm} seed {seed}: chosen {res['chosen'] and (res['chosen']['condition'], res['chosen']['dev_accuracy'])} "
                  f"vs unpruned {res['dev_unpruned_accuracy']:.3f}; {res['seconds']}", file=sys.stderr)
    elif arm != "neurons" and not any(sel["chosen"] for sel in selections()):
        # the arm's rows would be the unpruned model's alone, which the neuron arm's stages already hold
        print(f"{arm}: no selection seed chose a set, so --stage {args.stage} has nothing to run", file=sys.stderr)
    elif args.stage == "probe":
        t0 = time.perf_counter()
        write_json_atomic(work / _file(arm, "probe_test.json"), probe_test(model, selections(), arm=arm))
        print(f"{arm} probe test: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    elif args.stage == "costs":
        write_json_atomic(work / _file(arm, "costs.json"), ablation_costs(model, selections(), arm=arm))
    else:
        t0 = time.perf_counter()
        heldout(model, selections(), args.construction, work / _file(arm, f"heldout_{args.construction}.jsonl"), arm=arm)
        print(f"{arm} held-out {args.construction}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
