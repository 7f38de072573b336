"""The copy-neuron study of docs/replication.md: are the selected neurons copy neurons, and does
pruning them change in-context learning beyond what removing any neurons does?

    python analyses/replication.py --model smollm2-135m --variant default [--out results/replication]

One variant of the method on one model, in stages; each stage writes OUT/MODEL/VARIANT/<stage>.json
(atomically) and is skipped when that file exists, so an interrupted run resumes.

- `probe`: the variant's probe (balanced, gold never a demo label) unpruned, dev and test splits:
  accuracy, copy rate, and the in-range non-copy rate (a wrong count that no demo shows).
- `attribution`: IG (m = 20, target `contrast`, fast path) and gradient x activation on the
  attribution split, saved as safetensors; per-layer IG completeness.
- `stability`: top-k Jaccard and Spearman across bootstrap resamples of the attribution prompts,
  across normalisations, and across IG settings (steps 10 / 20 / 40; targets contrast, gold_logprob,
  copy_prob) on the first `--n-settings` prompts; and, on all prompts, the bootstrap of each attribution
  that the consistency stage compares, with its overlap with the variant's selection.
- `selection`: the k sweep on the probe's dev split (k = 0 allowed, 5% perplexity bound) and, beside
  it, the sweep without the bound.
- `consistency`: on the attribution prompts, the target with the top-k set pruned vs layer-matched
  random sets, paired, along the k curve, for IG (as the variant selects), IG without the completeness
  gate, and gradient x activation.
- `cards`: neuron cards of the top neurons.
- `ablation`: mean ablation beside zeroing: the self-consistency check of the variant's IG along the k
  curve and at the dev split's choice, with every set zeroed, and with every set set to its mean
  activation over the dev split (`pruning.neuron_means`); each at every position and at the last
  position only (there with the last position's mean: the position IG attributes). A neuron that only
  carries a large constant moves the target when zeroed but not when mean-ablated.
- `evaluate-methods`: the held-out effect of each attribution of the consistency stage (IG as the
  variant selects, IG with the other gate setting, gradient x activation): every task at `--n-curve`
  prompts (standard construction), unpruned and, at one k (the dev split's choice, else the smallest k
  that beats no pruning without the bound, else 20), each method's top-k set and one random set matched
  to its layers.
- `kcurve-tasks`: the k curve on the tasks: every task at `--n-curve` prompts (standard construction)
  unpruned and, for every k of the dev sweep, the top-k set and one layer-matched random set; pooled
  paired comparisons per k, beside the dev split's choice.
- `evaluate-standard`, `evaluate-nogold`: every task at `--n-eval` prompts, standard construction and
  gold never among the demos, under unpruned and, for each k of the grid (the dev split's choice; without
  the perplexity bound, the k it prefers and the smallest k that beats no pruning), the top-k set and 2
  layer-matched random sets;
  paired comparisons per k (`evaluation.compare_rows`).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from mechcopy.attribution import MAX_COMPLETENESS_ERROR

VARIANTS = {
    # what the evidence supports: a balanced probe, IG gated by completeness, min-max per prompt
    "default": dict(template="newline", items="mixed", normalisation="minmax", gate=MAX_COMPLETENESS_ERROR),
    # the paper as far as it is known: one-line comma format, names of places and people, the
    # min-max normalisation per neuron across prompts (its Eq. 7 as the reviewers read it), no gate
    "faithful": dict(template="comma", items="names", normalisation="minmax-neuron", gate=None),
    # today's `find` before this study: the classic probe (imbalanced labels), no gate
    "classic": dict(template=None, items=None, normalisation="minmax", gate=None),
}


@dataclass(frozen=True)
class StudyConfig:
    model: str
    variant: str
    n_attr: int = 200
    n_dev: int = 100
    n_test: int = 100
    steps: int = 20
    n_settings: int = 40          # prompts for the IG-settings part of the stability stage
    n_boot: int = 50              # bootstrap resamples of the attribution prompts
    ks: tuple[int, ...] = (5, 20, 100)   # the self-consistency check's k curve
    n_eval: int = 100
    n_random: int = 2
    n_consistency: int = 100      # attribution prompts for the self-consistency check
    n_cards: int = 5
    n_curve: int = 50             # prompts per task for the k curve on the tasks
    seed: int = 0
    tasks: str = "all"


def _probe(model, cfg: StudyConfig):
    from mechcopy.tasks.probe import ProbeConfig, build_probe, probe_splits

    v = VARIANTS[cfg.variant]
    if v["template"] is None:
        attr, dev = probe_splits(model.tokenizer, n_attr=cfg.n_attr, n_dev=cfg.n_dev + cfg.n_test, seed=cfg.seed)
        return attr, dev[:cfg.n_dev], dev[cfg.n_dev:]
    probe = ProbeConfig(template=v["template"], items=v["items"])
    splits = build_probe(model.tokenizer, probe, cfg.n_attr, cfg.n_dev, cfg.n_test, cfg.seed)
    return list(splits.attribution), list(splits.dev), list(splits.test)


def _rates(model, prompts, hooks=()):
    from mechcopy.evaluation import evaluate, predict
    from mechcopy.tasks.probe import outcome_rates

    preds = predict(model, prompts, fwd_hooks=hooks)
    res = evaluate(model, prompts, fwd_hooks=hooks)
    out = {"accuracy": res.accuracy, "accuracy_ci": res.accuracy_ci, "copy_rate": res.copy_rate,
           "copy_rate_ci": res.copy_rate_ci, "n": res.n,
           "gold_labels": {g: sum(p.answer == g for p in prompts) for g in sorted({p.answer for p in prompts})},
           "predicted": {g: preds.count(g) for g in sorted(set(preds))}}
    if all(p.label_space for p in prompts):
        out.update(outcome_rates(prompts, preds))
    return out


def stage_probe(model, cfg, out):
    attr, dev, test = _probe(model, cfg)
    return {"dev": _rates(model, dev), "test": _rates(model, test), "n_attr": len(attr),
            "example": dev[0].text}


_LOADED: dict[Path, object] = {}     # attributions read from disk, once per process


def _attributions(model, cfg, out, prompts, kind, target="contrast", steps=None, name=None):
    from mechcopy.attribution import Attributions, grad_x_act, integrated_gradients

    path = out / f"{name or kind}.safetensors"
    if path in _LOADED:
        return _LOADED[path]
    if path.exists():
        _LOADED[path] = Attributions.load(path)[0]
        return _LOADED[path]
    t0 = time.perf_counter()
    if kind == "ig":
        att = integrated_gradients(model, prompts, target=target, steps=steps or cfg.steps, progress=True)
    else:
        att = grad_x_act(model, prompts, target=target, progress=True)
    att.save(path, {"seconds": round(time.perf_counter() - t0, 1), "n": len(prompts)})
    return att


def _variant_scores(model, cfg, out, attr):
    """The copy scores the variant selects by: IG on the attribution prompts, its normalisation and gate."""
    return _scores(model, cfg, _attributions(model, cfg, out, attr, "ig"))


def _scores(model, cfg, att, gate="variant"):
    from mechcopy.attribution import copy_scores

    v = VARIANTS[cfg.variant]
    return copy_scores(model, att, v["normalisation"], seed=cfg.seed,
                       max_completeness_error=v["gate"] if gate == "variant" else gate)


def stage_attribution(model, cfg, out):
    from mechcopy.attribution import Attributions

    attr, _, _ = _probe(model, cfg)
    ig = _attributions(model, cfg, out, attr, "ig")
    gx = _attributions(model, cfg, out, attr, "gradxact")
    err = ig.completeness_error().median(0).values
    return {"n": len(attr), "ig_seconds": Attributions.load(out / "ig.safetensors")[1]["seconds"],
            "gradxact_seconds": Attributions.load(out / "gradxact.safetensors")[1]["seconds"],
            "completeness_error_median_per_layer": [round(float(e), 6) for e in err],
            "mean_target_clean": float(ig.target_clean.mean())}


def stage_stability(model, cfg, out):
    from mechcopy.stability import stability_report

    attr, _, _ = _probe(model, cfg)
    ig = _attributions(model, cfg, out, attr, "ig")
    gate = _scores(model, cfg, ig).allowed_layers
    ks = (5, 30, 100)
    prompts = attr[:cfg.n_settings]
    settings = {"ig m=20 contrast": _attributions(model, cfg, out, prompts, "ig", name="ig-sub")}
    for steps in (10, 40):
        settings[f"ig m={steps} contrast"] = _attributions(model, cfg, out, prompts, "ig", steps=steps,
                                                            name=f"ig-sub-m{steps}")
    for target in ("gold_logprob", "copy_prob"):
        settings[f"ig m=20 {target}"] = _attributions(model, cfg, out, prompts, "ig", target=target,
                                                       name=f"ig-sub-{target}")
    settings["gradxact contrast"] = _attributions(model, cfg, out, prompts, "gradxact", name="gradxact-sub")
    full = stability_report(ig, ks=ks, n_boot=cfg.n_boot, seed=cfg.seed, allowed_layers=gate)
    across = stability_report(settings, ks=ks, n_boot=cfg.n_boot, seed=cfg.seed, allowed_layers=gate)
    return {"bootstrap_and_normalisations": full.to_json(), "ig_settings": across.to_json(),
            "allowed_layers": None if gate is None else list(gate), "methods": _method_stability(model, cfg, out, attr, ks)}


def _method_stability(model, cfg, out, attr, ks):
    """For each attribution of `_methods`, on all attribution prompts: the bootstrap of its own
    selection (its gate, the variant's normalisation) and the Jaccard overlap of its top-k set with the
    variant's IG top-k set."""
    from mechcopy.pruning import select
    from mechcopy.stability import bootstrap_stability, jaccard

    methods = _methods(model, cfg, out, attr)
    atts = {"ig": _attributions(model, cfg, out, attr, "ig"), "gradxact": _attributions(model, cfg, out, attr, "gradxact")}
    reference = methods["ig (variant)"]
    res = {}
    for name, scores in methods.items():
        att = atts["gradxact" if name == "gradxact" else "ig"]
        boot = bootstrap_stability(att, ks, VARIANTS[cfg.variant]["normalisation"], cfg.n_boot, cfg.seed,
                                   scores.allowed_layers)
        res[name] = {"allowed_layers": None if scores.allowed_layers is None else list(scores.allowed_layers),
                     "bootstrap": boot.to_json(),
                     "jaccard_with_variant": {str(k): jaccard(frozenset(select(scores, "global", k=k).neurons),
                                                              frozenset(select(reference, "global", k=k).neurons))
                                              for k in ks}}
    return res


def stage_selection(model, cfg, out):
    from mechcopy.pruning import sweep_k

    attr, dev, _ = _probe(model, cfg)
    scores = _variant_scores(model, cfg, out, attr)
    bound = sweep_k(model, scores, dev, (5, 10, 20, 50, 100, 200, 500), seed=cfg.seed, progress=True)
    return {"sweep": bound.to_json(), "chosen_k": bound.chosen_k,
            "allowed_layers": None if scores.allowed_layers is None else list(scores.allowed_layers)}


def _methods(model, cfg, out, attr):
    """The attributions compared: IG as the variant selects, IG with the other gate setting, and
    gradient x activation (no gate: its gradients need no convergence)."""
    ig = _attributions(model, cfg, out, attr, "ig")
    gx = _attributions(model, cfg, out, attr, "gradxact")
    gated = VARIANTS[cfg.variant]["gate"] is not None
    return {"ig (variant)": _variant_scores(model, cfg, out, attr),
            "ig, no gate" if gated else "ig, gated": _scores(model, cfg, ig, gate=None if gated else MAX_COMPLETENESS_ERROR),
            "gradxact": _scores(model, cfg, gx, gate=None)}


def stage_consistency(model, cfg, out):
    from mechcopy.audit import self_consistency

    attr, _, _ = _probe(model, cfg)
    prompts = attr[:cfg.n_consistency]
    res = {}
    for name, scores in _methods(model, cfg, out, attr).items():
        t0 = time.perf_counter()
        res[name] = self_consistency(model, prompts, scores, cfg.ks, n_random=cfg.n_random, seed=cfg.seed,
                                     progress=True).to_json()
        res[name]["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def stage_cards(model, cfg, out):
    from mechcopy import viz
    from mechcopy.cards import neuron_cards
    from mechcopy.pruning import select

    attr, dev, _ = _probe(model, cfg)
    scores = _variant_scores(model, cfg, out, attr)
    top = select(scores, "global", k=cfg.n_cards)
    cards = neuron_cards(model, top, dev, scores=scores)
    viz.save_figure(viz.plot_neuron_cards(cards), out / "cards.png")
    return {"cards": [c.to_json() for c in cards], "neurons": [list(n) for n in top.neurons]}


def stage_ablation(model, cfg, out):
    from mechcopy.audit import self_consistency
    from mechcopy.pruning import neuron_means

    attr, dev, _ = _probe(model, cfg)
    scores = _variant_scores(model, cfg, out, attr)
    chosen = _selection(out)["chosen_k"]
    ks = sorted(set(cfg.ks) | ({chosen} if chosen else set()))
    prompts = attr[:cfg.n_consistency]
    res = {"ks": ks, "chosen_k": chosen, "means_from": f"dev split, {len(dev)} prompts"}
    ablations = {"zero": (None, False), "mean": (neuron_means(model, dev), False),
                 "zero, last position": (None, True), "mean, last position": (neuron_means(model, dev, last_only=True), True)}
    for name, (means, last_only) in ablations.items():
        t0 = time.perf_counter()
        res[name] = self_consistency(model, prompts, scores, ks, n_random=cfg.n_random, seed=cfg.seed,
                                     progress=True, means=means, last_only=last_only).to_json()
        res[name]["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def _selection(out):
    return json.loads((out / "selection.json").read_text())["result"]


def _conditions(model, cfg, out):
    """unpruned, and per k of the grid: the top-k set and layer-matched random sets, named `pruned@k`,
    `random-s@k`. The grid holds the dev split's choice under the perplexity bound (when not 0) and, with
    no bound, the k the dev split prefers and the smallest k that beats the unpruned model on it (when
    some k does), else k = 20."""
    from mechcopy.pruning import select, smallest_unbounded_k

    attr, _, _ = _probe(model, cfg)
    scores = _variant_scores(model, cfg, out, attr)
    sweep = _selection(out)["sweep"]
    base = sweep["baseline"]["dev_accuracy"]
    better = [r for r in sweep["rows"] if r["dev_accuracy"] > base]
    unbounded = max(better, key=lambda r: (r["dev_accuracy"], -r["k"]))["k"] if better else None
    smallest = smallest_unbounded_k(sweep)
    grid = sorted({k for k in (sweep["chosen_k"], smallest, unbounded) if k} or {20})
    conds = _with_random(model, {k: select(scores, "global", k=k) for k in grid}, cfg.n_random, cfg.seed)
    return conds, grid, {"chosen_k": sweep["chosen_k"], "unbounded_k": unbounded, "smallest_better_k": smallest}


def _with_random(model, sets, n_random, seed):
    """unpruned, and per tag (a k or a method) its set `pruned@tag` and `n_random` layer-matched random
    sets `random-s@tag` (seeds seed..seed+n_random-1)."""
    from mechcopy.pruning import random_matched

    conds = {"unpruned": None}
    for tag, ns in sets.items():
        conds[f"pruned@{tag}"] = ns
        for s in range(n_random):
            conds[f"random-{s}@{tag}"] = random_matched(model, ns, seed + s)
    return conds


def _evaluate_tasks(model, cfg, out, stage, conds, n, gold_in_demos):
    """Every held-out task (the probe left out) under `conds`, checkpointed as the stage goes:
    (tasks, rows, prompts dropped per task)."""
    from mechcopy.evaluation import run_evaluation
    from mechcopy.tasks import load_tasks

    tasks = [t for t in load_tasks(cfg.tasks) if t.kind != "probe"]
    rows, dropped = run_evaluation(model, tasks, 4, n, cfg.seed, conds, checkpoint=out / f"{stage}.partial.jsonl",
                                   gold_in_demos=gold_in_demos)
    return tasks, rows, {t: len(d) for t, d in dropped.items()}


def _per_k(rows, k):
    """The rows of one k (or one method: any suffix after "@") renamed to the standard conditions
    (pruned, random-s) beside unpruned."""
    out = []
    for r in rows:
        name = r["condition"]
        if name == "unpruned":
            out.append(r)
        elif name.endswith(f"@{k}"):
            out.append({**r, "condition": name.rsplit("@", 1)[0]})
    return out


def _stage_evaluate(model, cfg, out, gold_in_demos):
    from mechcopy.evaluation import compare_rows

    conds, grid, ks = _conditions(model, cfg, out)
    stage = "evaluate-standard" if gold_in_demos else "evaluate-nogold"
    _, rows, dropped = _evaluate_tasks(model, cfg, out, stage, conds, cfg.n_eval, gold_in_demos)
    return {"grid": grid, **ks, "rows": rows, "dropped": dropped,
            "comparisons": {str(k): compare_rows(_per_k(rows, k), seed=cfg.seed) for k in grid}}


def stage_evaluate_methods(model, cfg, out):
    from mechcopy.evaluation import compare_rows
    from mechcopy.pruning import select, smallest_unbounded_k

    attr, _, _ = _probe(model, cfg)
    selection = _selection(out)
    k = selection["chosen_k"] or smallest_unbounded_k(selection["sweep"]) or 20
    methods = _methods(model, cfg, out, attr)
    conds = _with_random(model, {name: select(scores, "global", k=k) for name, scores in methods.items()}, 1, cfg.seed)
    _, rows, dropped = _evaluate_tasks(model, cfg, out, "evaluate-methods", conds, cfg.n_curve, True)
    return {"k": k, "chosen_k": selection["chosen_k"], "n_per_task": cfg.n_curve, "methods": list(methods),
            "rows": rows, "dropped": dropped,
            "pooled": {name: compare_rows(_per_k(rows, name), seed=cfg.seed)["pooled"] for name in methods}}


def stage_kcurve_tasks(model, cfg, out):
    from mechcopy import viz
    from mechcopy.evaluation import compare_rows
    from mechcopy.pruning import select

    attr, _, _ = _probe(model, cfg)
    scores = _variant_scores(model, cfg, out, attr)
    selection = _selection(out)
    ks = [r["k"] for r in selection["sweep"]["rows"]]
    conds = _with_random(model, {k: select(scores, "global", k=k) for k in ks}, 1, cfg.seed)
    tasks, rows, dropped = _evaluate_tasks(model, cfg, out, "kcurve-tasks", conds, cfg.n_curve, True)
    pooled = {str(k): compare_rows(_per_k(rows, k), seed=cfg.seed)["pooled"] for k in ks}
    viz.save_figure(viz.plot_k_curve(pooled, selection["chosen_k"], title=f"{Path(cfg.model).name} / {cfg.variant}: "
                                     f"the k curve on {len(tasks)} tasks, {cfg.n_curve} prompts each"),
                    out / "kcurve-tasks.png")
    return {"ks": ks, "chosen_k": selection["chosen_k"], "n_per_task": cfg.n_curve, "rows": rows,
            "dropped": dropped, "pooled": pooled}


def stage_evaluate_standard(model, cfg, out):
    return _stage_evaluate(model, cfg, out, True)


def stage_evaluate_nogold(model, cfg, out):
    return _stage_evaluate(model, cfg, out, False)


STAGES = {"probe": stage_probe, "attribution": stage_attribution, "selection": stage_selection,
          "consistency": stage_consistency, "cards": stage_cards, "stability": stage_stability,
          "evaluate-standard": stage_evaluate_standard, "evaluate-nogold": stage_evaluate_nogold,
          "ablation": stage_ablation, "kcurve-tasks": stage_kcurve_tasks, "evaluate-methods": stage_evaluate_methods}


def main() -> None:
    from mechcopy import load_model
    from mechcopy.io import write_json_atomic
    from mechcopy.reproduce import git_revision, run_stages

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--variant", choices=list(VARIANTS), default="default")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run, in order")
    ap.add_argument("--n-eval", type=int, default=StudyConfig.n_eval)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to check the stages run end to end")
    ap.add_argument("--out", type=Path, default=Path("results/replication"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    cfg = StudyConfig(model=args.model, variant=args.variant, n_eval=args.n_eval)
    if args.smoke:
        cfg = replace(cfg, n_attr=6, n_dev=6, n_test=6, n_settings=3, n_boot=3, ks=(5, 10), n_eval=3,
                      n_consistency=4, n_cards=2, n_curve=3, tasks="antonyms,sentiment_binary")
    out = args.out / Path(args.model).name / args.variant
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    write_json_atomic(out / "settings.json", {"config": asdict(cfg), "variant": VARIANTS[cfg.variant],
                                              "git_revision": git_revision()})
    run_stages([(name, STAGES[name]) for name in args.stages.split(",")], model, cfg, out)


if __name__ == "__main__":
    main()
