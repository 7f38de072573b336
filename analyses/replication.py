"""The copy-neuron study of docs/replication.md: are the selected neurons copy neurons, and does
pruning them change in-context learning beyond what removing any neurons does?

    python analyses/replication.py --model smollm2-135m --variant default [--random-match size] [--out results/replication]

One variant of the method (a `FindConfig`: `VARIANTS`) on one model, in stages; each stage writes
OUT/MODEL/VARIANT/<stage>.json (atomically) and is skipped when that file exists, so an interrupted run
resumes. Every stage calls the method's steps (`mechcopy.method`: prompts, attribute, score, choose_k,
decide) on one `Study`, which builds the probe once and keeps each attribution it read or computed.

- `probe`: the variant's probe (balanced, gold never a demo label) unpruned, dev and test splits:
  accuracy, copy rate, and the in-range non-copy rate (a wrong count that no demo shows).
- `attribution`: IG (m = 20, target `contrast`, fast path) and gradient x activation on the
  attribution split, saved as safetensors; per-layer IG completeness.
- `stability`: top-k Jaccard and Spearman across bootstrap resamples of the attribution prompts,
  across normalisations, and across IG settings (steps 10 / 20 / 40; targets contrast, gold_logprob,
  copy_prob) on the first `--n-settings` prompts; and, on all prompts, the bootstrap of each attribution
  that the consistency stage compares, with its overlap with the variant's selection.
- `selection`: the method's choice: the k sweep on the probe's dev split (the variant's k grid, k = 0
  allowed, 5% perplexity bound) and the guard (self-consistency of the chosen k); beside it, what the
  sweep says without the bound.
- `consistency`: on the attribution prompts, the target with the top-k set pruned vs layer-matched
  random sets, paired, along the k curve, for IG (as the variant selects), IG without the completeness
  gate, and gradient x activation.
- `cards`: neuron cards of the top neurons.
- `ablation`: mean ablation beside zeroing: the self-consistency check of the variant's IG along the k
  curve and at the dev split's choice, with every set zeroed, and with every set set to its mean
  activation over the dev split (`pruning.component_means`); each at every position and at the last
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
  paired comparisons per k (`comparisons.compare_rows`).

Every random set is matched on layer; with `--random-match size` (into OUT/MODEL/VARIANT-size) also on
size, each neuron's mean |activation| at the answer position of the consistency stage's attribution
prompts (`components.random_matched`), in the guard, the consistency and ablation stages and every
evaluation.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mechcopy import load_model, method, viz
from mechcopy.attribution import MAX_COMPLETENESS_ERROR, Attributions, CopyScores
from mechcopy.audit import self_consistency
from mechcopy.cards import neuron_cards
from mechcopy.comparisons import compare_rows
from mechcopy.components import MATCHES, Components, Sizes, random_matched
from mechcopy.conditions import UNPRUNED, Condition
from mechcopy.evaluation import evaluate
from mechcopy.io import write_json_atomic
from mechcopy.method import FindConfig
from mechcopy.provenance import git_revision, read_stage, run_stages
from mechcopy.pruning import component_means, component_sizes
from mechcopy.selection import select
from mechcopy.stability import bootstrap_stability, jaccard, stability_report
from mechcopy.suite import run_evaluation
from mechcopy.sweeps import KSweep
from mechcopy.tasks import load_tasks
from mechcopy.tasks.outcomes import outcome_rates
from study_results import (AttributionStage, CardsStage, HeldOutStage, KCurveStage, MethodsStage, MethodStability,
                           ProbeRates, ProbeStage, SelectionStage, StabilityStage, TimedChecks)

VARIANTS: dict[str, FindConfig] = {
    # what the evidence supports: a balanced probe, IG gated by completeness, min-max per prompt
    "default": FindConfig(probe="balanced", probe_items="mixed", probe_format="newline", normalisation="minmax",
                          max_completeness_error=MAX_COMPLETENESS_ERROR),
    # the paper as far as it is known: one-line comma format, names of places and people, the
    # min-max normalisation per neuron across prompts (its Eq. 7 as the reviewers read it), no gate
    "faithful": FindConfig(probe="balanced", probe_items="names", probe_format="comma", normalisation="minmax-neuron",
                           max_completeness_error=None),
    # today's `find` before this study: the classic probe (imbalanced labels), no gate
    "classic": FindConfig(probe="classic", normalisation="minmax", max_completeness_error=None),
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
    ks: tuple[int, ...] = (5, 20, 100)   # the k curve of the self-consistency check and of stability
    n_eval: int = 100
    n_random: int = 2
    n_consistency: int = 100      # attribution prompts for the self-consistency check
    n_cards: int = 5
    n_curve: int = 50             # prompts per task for the k curve on the tasks
    seed: int = 0
    tasks: str = "all"
    random_match: str = "layer"   # every random set: matched on layer, or on layer and size (components.MATCHES)

    @property
    def find(self) -> FindConfig:
        """The variant's method at this study's sizes."""
        return replace(VARIANTS[self.variant], n=self.n_attr, n_dev=self.n_dev, steps=self.steps, seed=self.seed,
                       random_match=self.random_match)


@dataclass
class Study:
    """One variant of the study on one model: the probe, built once, and every attribution read from
    disk or computed (then saved) once, for the stages of one process."""

    model: Any
    cfg: StudyConfig
    out: Path
    _probe: method.Probe | None = field(default=None, init=False)
    _attributions: dict[str, Attributions] = field(default_factory=dict, init=False)
    _sizes: Sizes | None = field(default=None, init=False)

    @property
    def find(self) -> FindConfig:
        return self.cfg.find

    def sizes(self) -> Sizes:
        """Every neuron's mean |activation| at the answer position of the consistency stage's attribution
        prompts: what size-matched random sets match (`StudyConfig.random_match`)."""
        if self._sizes is None:
            prompts = self.probe.attribution[:self.cfg.n_consistency]
            self._sizes = component_sizes(self.model, prompts, reference=f"{len(prompts)} attribution prompts")
        return self._sizes

    @property
    def probe(self) -> method.Probe:
        if self._probe is None:
            self._probe = method.prompts(self.model.tokenizer, self.find, n_test=self.cfg.n_test)
        return self._probe

    def attributions(self, name: str, config: FindConfig, prompts) -> Attributions:
        """`method.attribute` of `prompts` under `config`, saved as OUT/<name>.safetensors (with its
        seconds) and read from there when it exists."""
        if name not in self._attributions:
            path = self.out / f"{name}.safetensors"
            if path.exists():
                self._attributions[name] = Attributions.load(path)[0]
            else:
                t0 = time.perf_counter()
                att = method.attribute(self.model, prompts, config, progress=True)
                att.save(path, {"seconds": round(time.perf_counter() - t0, 1), "n": len(prompts)})
                self._attributions[name] = att
        return self._attributions[name]

    def ig(self) -> Attributions:
        return self.attributions("ig", self.find, self.probe.attribution)

    def gradxact(self) -> Attributions:
        return self.attributions("gradxact", replace(self.find, attribution="gradxact"), self.probe.attribution)

    def scores(self) -> CopyScores:
        """The copy scores the variant selects by: IG on the attribution prompts, its normalisation and gate."""
        return method.score(self.model, self.ig(), self.find)

    def methods(self) -> dict[str, CopyScores]:
        """The attributions compared: IG as the variant selects, IG with the other gate setting, and
        gradient x activation (no gate: its gradients need no convergence)."""
        gated = self.find.max_completeness_error is not None
        other = replace(self.find, max_completeness_error=None if gated else MAX_COMPLETENESS_ERROR)
        return {"ig (variant)": self.scores(),
                "ig, no gate" if gated else "ig, gated": method.score(self.model, self.ig(), other),
                "gradxact": method.score(self.model, self.gradxact(),
                                         replace(self.find, attribution="gradxact", max_completeness_error=None))}

    def selection(self) -> SelectionStage:
        return SelectionStage.from_json(read_stage(self.out, "selection"))

    def sweep(self) -> KSweep:
        return self.selection().sweep


def _rates(model, prompts) -> ProbeRates:
    res = evaluate(model, prompts)
    preds = list(res.predictions)
    return ProbeRates(res.accuracy, res.accuracy_ci, res.copy_rate, res.copy_rate_ci, res.n,
                      {g: sum(p.answer == g for p in prompts) for g in sorted({p.answer for p in prompts})},
                      {g: preds.count(g) for g in sorted(set(preds))},
                      outcome_rates(prompts, preds) if all(p.label_space for p in prompts) else {})


def stage_probe(study: Study) -> ProbeStage:
    probe = study.probe
    return ProbeStage(_rates(study.model, list(probe.dev)), _rates(study.model, list(probe.test)),
                      len(probe.attribution), probe.dev[0].text)


def stage_attribution(study: Study) -> AttributionStage:
    ig, gx = study.ig(), study.gradxact()
    err = ig.completeness_error().median(0).values
    return AttributionStage(len(study.probe.attribution), Attributions.load(study.out / "ig.safetensors")[1]["seconds"],
                            Attributions.load(study.out / "gradxact.safetensors")[1]["seconds"],
                            tuple(round(float(e), 6) for e in err), float(ig.target_clean.mean()))


def stage_stability(study: Study) -> StabilityStage:
    cfg, find = study.cfg, study.find
    ig = study.ig()
    gate = study.scores().allowed_layers
    ks = cfg.ks
    prompts = study.probe.attribution[:cfg.n_settings]
    settings = {"ig m=20 contrast": study.attributions("ig-sub", find, prompts)}
    for steps in (10, 40):
        settings[f"ig m={steps} contrast"] = study.attributions(f"ig-sub-m{steps}", replace(find, steps=steps), prompts)
    for target in ("gold_logprob", "copy_prob"):
        settings[f"ig m=20 {target}"] = study.attributions(f"ig-sub-{target}", replace(find, target=target), prompts)
    settings["gradxact contrast"] = study.attributions("gradxact-sub", replace(find, attribution="gradxact"), prompts)
    full = stability_report(ig, ks=ks, n_boot=cfg.n_boot, seed=cfg.seed, allowed_layers=gate)
    across = stability_report(settings, ks=ks, n_boot=cfg.n_boot, seed=cfg.seed, allowed_layers=gate)
    return StabilityStage(full, across, gate, _method_stability(study, ks))


def _method_stability(study: Study, ks) -> dict[str, MethodStability]:
    """For each attribution of `Study.methods`, on all attribution prompts: the bootstrap of its own
    selection (its gate, the variant's normalisation) and the Jaccard overlap of its top-k set with the
    variant's IG top-k set."""
    methods = study.methods()
    atts = {"ig": study.ig(), "gradxact": study.gradxact()}
    reference = methods["ig (variant)"]
    res = {}
    for name, scores in methods.items():
        att = atts["gradxact" if name == "gradxact" else "ig"]
        boot = bootstrap_stability(att, ks, study.find.normalisation, study.cfg.n_boot, study.cfg.seed,
                                   scores.allowed_layers)
        res[name] = MethodStability(scores.allowed_layers, boot,
                                    {int(k): jaccard(frozenset(select(scores, "global", k=k).pairs),
                                                     frozenset(select(reference, "global", k=k).pairs)) for k in ks})
    return res


def stage_selection(study: Study) -> SelectionStage:
    """The method's choice on the dev split (`method.choose_k`, then `method.decide`: the guard), and what
    the sweep says without its bound."""
    scores = study.scores()
    sweep = method.choose_k(study.model, scores, study.probe.dev, study.find, progress=True)
    choice = method.decide(study.model, scores, sweep, study.probe.attribution, study.find)
    return SelectionStage(sweep, choice.k, sweep.chosen_k, choice.guard, choice.components.meta.get("why", ""),
                          sweep.best_unbounded_k, sweep.smallest_unbounded_k, scores.allowed_layers)


def stage_consistency(study: Study) -> TimedChecks:
    cfg = study.cfg
    prompts = study.probe.attribution[:cfg.n_consistency]
    checks, seconds = {}, {}
    for name, scores in study.methods().items():
        t0 = time.perf_counter()
        checks[name] = self_consistency(study.model, prompts, scores, cfg.ks, n_random=cfg.n_random, seed=cfg.seed,
                                        progress=True, match=cfg.random_match)
        seconds[name] = round(time.perf_counter() - t0, 1)
    return TimedChecks(checks, seconds)


def stage_cards(study: Study) -> CardsStage:
    scores = study.scores()
    top = select(scores, "global", k=study.cfg.n_cards)
    cards = neuron_cards(study.model, top, list(study.probe.dev), scores=scores)
    viz.save_figure(viz.plot_neuron_cards(cards), study.out / "cards.png")
    return CardsStage(cards, top.pairs)


def stage_ablation(study: Study) -> TimedChecks:
    cfg, model = study.cfg, study.model
    dev = list(study.probe.dev)
    scores = study.scores()
    chosen = study.selection().chosen_k
    ks = sorted(set(cfg.ks) | ({chosen} if chosen else set()))
    prompts = study.probe.attribution[:cfg.n_consistency]
    reference = f"dev split, {len(dev)} prompts"
    checks, seconds = {}, {}
    ablations = {"zero": ("zero", "all", None),
                 "mean": ("mean", "all", component_means(model, dev, positions="all", reference=reference)),
                 "zero, last position": ("zero", "last", None),
                 "mean, last position": ("mean", "last", component_means(model, dev, positions="last",
                                                                           reference=reference))}
    for name, (ablation, positions, means) in ablations.items():
        t0 = time.perf_counter()
        checks[name] = self_consistency(model, prompts, scores, ks, n_random=cfg.n_random, seed=cfg.seed,
                                        progress=True, ablation=ablation, positions=positions, means=means,
                                        match=cfg.random_match)
        seconds[name] = round(time.perf_counter() - t0, 1)
    return TimedChecks(checks, seconds, tuple(ks), chosen, reference)


def _with_random(study: Study, sets: dict[Any, Components], n_random: int) -> list[Condition]:
    """unpruned, and per group (a k or a method) its set (`pruned@group`) and `n_random` random sets
    matched on layer (or on size too: `StudyConfig.random_match`, sizes on the consistency stage's
    attribution prompts) (`random-s@group`, seeds seed..seed+n_random-1)."""
    cfg = study.cfg
    sizes = study.sizes() if cfg.random_match == "size" else None
    conds = [UNPRUNED]
    for group, comps in sets.items():
        conds.append(Condition("pruned", "pruned", comps, group=group))
        conds += [Condition(f"random-{s}", "random", random_matched(study.model, comps, cfg.seed + s, cfg.random_match,
                                                                    sizes), seed=cfg.seed + s, group=group)
                  for s in range(n_random)]
    return conds


def _evaluate_tasks(study: Study, stage: str, conds: list[Condition], n: int, gold_in_demos: bool):
    """Every held-out task (the probe left out) under `conds`, checkpointed as the stage goes:
    (tasks, rows, prompts dropped per task)."""
    tasks = [t for t in load_tasks(study.cfg.tasks) if t.kind != "probe"]
    rows, dropped = run_evaluation(study.model, tasks, 4, n, study.cfg.seed, conds,
                                   checkpoint=study.out / f"{stage}.partial.jsonl", gold_in_demos=gold_in_demos)
    return tasks, rows, {t: len(d) for t, d in dropped.items()}


def _stage_evaluate(study: Study, gold_in_demos: bool) -> HeldOutStage:
    """unpruned, and per k of the grid its top-k set and layer-matched random sets. The grid holds the
    method's choice (when not 0) and, with no bound, the k the dev split prefers and the smallest k that
    beats the unpruned model on it (when some k does), else k = 20."""
    cfg, selection, sweep = study.cfg, study.selection(), study.sweep()
    scores = study.scores()
    grid = sorted({k for k in (selection.chosen_k, sweep.smallest_unbounded_k, sweep.best_unbounded_k) if k} or {20})
    conds = _with_random(study, {k: select(scores, "global", k=k) for k in grid}, cfg.n_random)
    stage = "evaluate-standard" if gold_in_demos else "evaluate-nogold"
    _, rows, dropped = _evaluate_tasks(study, stage, conds, cfg.n_eval, gold_in_demos)
    return HeldOutStage(tuple(grid), selection.chosen_k, sweep.best_unbounded_k, sweep.smallest_unbounded_k,
                        tuple(rows), dropped, {k: compare_rows(rows, seed=cfg.seed, group=k) for k in grid})


def stage_evaluate_methods(study: Study) -> MethodsStage:
    cfg, selection = study.cfg, study.selection()
    k = selection.chosen_k or study.sweep().smallest_unbounded_k or 20
    methods = study.methods()
    conds = _with_random(study, {name: select(scores, "global", k=k) for name, scores in methods.items()}, 1)
    _, rows, dropped = _evaluate_tasks(study, "evaluate-methods", conds, cfg.n_curve, True)
    return MethodsStage(k, selection.chosen_k, cfg.n_curve, tuple(methods), tuple(rows), dropped,
                        {name: compare_rows(rows, seed=cfg.seed, group=name)["pooled"] for name in methods})


def stage_kcurve_tasks(study: Study) -> KCurveStage:
    cfg, selection = study.cfg, study.selection()
    scores = study.scores()
    ks = study.sweep().ks
    conds = _with_random(study, {k: select(scores, "global", k=k) for k in ks}, 1)
    tasks, rows, dropped = _evaluate_tasks(study, "kcurve-tasks", conds, cfg.n_curve, True)
    pooled = {k: compare_rows(rows, seed=cfg.seed, group=k)["pooled"] for k in ks}
    viz.save_figure(viz.plot_k_curve(pooled, selection.chosen_k, title=f"{Path(cfg.model).name} / {cfg.variant}: "
                                     f"the k curve on {len(tasks)} tasks, {cfg.n_curve} prompts each"),
                    study.out / "kcurve-tasks.png")
    return KCurveStage(tuple(ks), selection.chosen_k, cfg.n_curve, tuple(rows), dropped, pooled)


def stage_evaluate_standard(study: Study) -> HeldOutStage:
    return _stage_evaluate(study, True)


def stage_evaluate_nogold(study: Study) -> HeldOutStage:
    return _stage_evaluate(study, False)


STAGES = {"probe": stage_probe, "attribution": stage_attribution, "selection": stage_selection,
          "consistency": stage_consistency, "cards": stage_cards, "stability": stage_stability,
          "evaluate-standard": stage_evaluate_standard, "evaluate-nogold": stage_evaluate_nogold,
          "ablation": stage_ablation, "kcurve-tasks": stage_kcurve_tasks, "evaluate-methods": stage_evaluate_methods}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--variant", choices=list(VARIANTS), default="default")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run, in order")
    ap.add_argument("--n-eval", type=int, default=StudyConfig.n_eval)
    ap.add_argument("--random-match", choices=MATCHES, default="layer",
                    help="random sets matched on layer (default) or on layer and size; size writes to VARIANT-size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to check the stages run end to end")
    ap.add_argument("--out", type=Path, default=Path("results/replication"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = StudyConfig(model=args.model, variant=args.variant, n_eval=args.n_eval, random_match=args.random_match)
    if args.smoke:
        cfg = replace(cfg, n_attr=6, n_dev=6, n_test=6, n_settings=3, n_boot=3, ks=(5, 10), n_eval=3,
                      n_consistency=4, n_cards=2, n_curve=3, tasks="antonyms,sentiment_binary")
    out = args.out / Path(args.model).name / (args.variant + ("" if args.random_match == "layer" else "-size"))
    out.mkdir(parents=True, exist_ok=True)
    study = Study(load_model(args.model), cfg, out)
    write_json_atomic(out / "settings.json", {"config": asdict(cfg), "variant": asdict(cfg.find),
                                              "git_revision": git_revision()})
    run_stages([(name, lambda fn=STAGES[name]: fn(study)) for name in args.stages.split(",")], out)


if __name__ == "__main__":
    main()
