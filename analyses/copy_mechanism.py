"""The copy-mechanism study (issue 26; criterion and frozen settings in docs/copy_mechanism.md).

    python analyses/copy_mechanism.py --model smollm2-135m --stage select      # per selection seed
    python analyses/copy_mechanism.py --model smollm2-135m --stage probe       # the probe's test split
    python analyses/copy_mechanism.py --model smollm2-135m --stage heldout --construction no-gold
    python analyses/copy_mechanism.py --model smollm2-135m --stage heldout --construction copy-control
    python analyses/copy_mechanism.py --model smollm2-135m --stage summary     # docs/data/copy_mechanism_<model>.json

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
- **summary**: the tables and both criteria (`criteria`) from the saved state, into the docs JSON.
"""

from __future__ import annotations

import argparse
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
}
CONSTRUCTIONS = ("no-gold", "copy-control")


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


def _work(args) -> Path:
    return Path(args.work or f"results/copy_mechanism/{args.model}")


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


def select_seed(model, seed: int, settings: dict = SETTINGS, progress: bool = False) -> dict[str, Any]:
    """One selection seed: IG scores on the probe's attribution split, the dev sweep over k and
    ablation (label scoring, perplexity bound), the chosen set, its means and the sizes."""
    from mechcopy import method
    from mechcopy.conditions import LABELS, UNPRUNED, Condition
    from mechcopy.evaluation import perplexity
    from mechcopy.pruning import component_means, component_sizes, condition_hooks
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
    unpruned = replace(UNPRUNED, readout=LABELS)
    conditions = [unpruned] + [
        Condition(f"{ab}-k{k}", "pruned", select(scores, "global", k=k), ab, s["positions"],
                  means if ab == "mean" else None, readout=LABELS)
        for ab in s["ablations"] for k in s["ks"]]
    preds = _predict_tasks(model, probe.dev, conditions)
    dev = _by_task(probe.dev)

    def accuracy(label: str) -> float:   # every task weighs the same
        return float(np.mean([np.mean([a.strip() == p.answer.strip() for a, p in zip(preds[label][t], ps)])
                              for t, ps in dev.items()]))

    base_ppl = perplexity(model, n_tokens=s["ppl_tokens"])
    rows = []
    for c in conditions[1:]:
        ppl = perplexity(model, fwd_hooks=condition_hooks(model, c), n_tokens=s["ppl_tokens"])
        rows.append({"condition": c.name, "ablation": c.ablation, "k": len(c.components), "dev_accuracy": accuracy(c.label),
                     "ppl_increase": ppl / base_ppl - 1, "feasible": ppl / base_ppl - 1 <= s["max_ppl_increase"]})
    baseline = accuracy(unpruned.label)
    feasible = [r for r in rows if r["feasible"]]
    best = max(feasible, key=lambda r: (r["dev_accuracy"], -r["k"])) if feasible else None
    if best is None or best["dev_accuracy"] <= baseline:
        chosen, why = None, ("no (k, ablation) within the perplexity bound" if best is None else
                             f"no (k, ablation) beats the unpruned dev accuracy {baseline:.3f} "
                             f"(best: {best['condition']}, {best['dev_accuracy']:.3f})")
    else:
        chosen, why = best, ""
    comps = None if chosen is None else select(scores, "global", k=chosen["k"])
    return {"seed": seed, "n_attribution": len(probe.attribution), "n_dev": len(probe.dev),
            "allowed_layers": None if scores.allowed_layers is None else list(scores.allowed_layers),
            "dev_unpruned_accuracy": baseline, "base_ppl": base_ppl, "sweep": rows,
            "chosen": None if chosen is None else {**chosen, "components": comps.to_json()}, "why": why,
            "layers_of_chosen": None if comps is None else comps.layer_counts(model.cfg.n_layers),
            "means": means.to_json() if chosen and chosen["ablation"] == "mean" else None,
            "sizes": sizes.to_json(), "seconds": {"attribution": round(t_attr, 1),
                                                  "total": round(time.perf_counter() - t0, 1)}}


def seed_conditions(model, selections: Sequence[dict], settings: dict = SETTINGS) -> tuple[list, list]:
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
        group = f"s{sel['seed']}"
        pruned.append(Condition("pruned", "pruned", comps, ab, settings["positions"], means, None, group, LABELS))
        sizes = Sizes.from_json(sel["sizes"])
        for r in range(settings["n_random_per_seed"]):
            rseed = 1000 * sel["seed"] + r
            random.append(Condition(f"random-{rseed}", "random", random_matched(model, comps, rseed, settings["random_match"],
                                    sizes), ab, settings["positions"], means, rseed, group, LABELS))
    return pruned, random


def probe_test(model, selections: Sequence[dict], settings: dict = SETTINGS) -> dict[str, Any]:
    """The probe's test split (copy-control), unpruned and every seed's set and random sets: answers."""
    from mechcopy.conditions import LABELS, UNPRUNED

    probe = _probe(model.tokenizer, "copy-control", settings["probe_seed"], settings)
    pruned, random = seed_conditions(model, selections, settings)
    conditions = [replace(UNPRUNED, readout=LABELS)] + pruned + random
    t0 = time.perf_counter()
    preds = _predict_tasks(model, probe.test, conditions)
    return {"predictions": preds, "seconds": round(time.perf_counter() - t0, 1), "n": len(probe.test)}


def heldout(model, selections: Sequence[dict], construction: str, checkpoint: Path, settings: dict = SETTINGS,
            progress: bool = True) -> tuple[list[ResultRow], dict]:
    """The held-out label tasks in one construction: every condition of the study, label scoring."""
    from mechcopy.conditions import LABELS, UNPRUNED, calibrated_conditions
    from mechcopy.suite import run_evaluation
    from mechcopy.tasks import load_tasks

    pruned, random = seed_conditions(model, selections, settings)
    conditions = [replace(UNPRUNED, readout=LABELS)] + pruned + random
    conditions += calibrated_conditions(pruned, settings["calibrations"])
    tasks = load_tasks(",".join(settings["heldout_tasks"]))
    if construction == "copy-control":   # two labels and no gold among the demos: no copy effect to estimate
        tasks = [t for t in tasks if len(t.label_set()) >= 3]
    return run_evaluation(model, tasks, shots=settings["shots"], n=settings["n"], seed=settings["prompt_seed"],
                          conditions=conditions, progress=progress, batch_size=64, checkpoint=checkpoint,
                          gold_in_demos=False, copy_control=construction == "copy-control")


def ablation_costs(model, selections: Sequence[dict], settings: dict = SETTINGS) -> dict[str, float]:
    """Relative perplexity increase of every ablation condition (label -> increase)."""
    from mechcopy.evaluation import perplexity
    from mechcopy.pruning import condition_hooks

    pruned, random = seed_conditions(model, selections, settings)
    base = perplexity(model, n_tokens=settings["ppl_tokens"])
    return {c.label: perplexity(model, fwd_hooks=condition_hooks(model, c), n_tokens=settings["ppl_tokens"]) / base - 1
            for c in pruned + random}


# ---------------------------------------------------------------- the summary: tables and criteria


def _rows_by(rows: Sequence[ResultRow]) -> dict[str, dict[str, ResultRow]]:
    out: dict[str, dict[str, ResultRow]] = {}
    for r in rows:
        out.setdefault(r.condition, {})[r.task] = r
    return out


def _ce(row: ResultRow) -> float | None:
    return (row.result.copy_effect or {}).get("effect")


def compare(rows_no_gold: Sequence[ResultRow], rows_cc: Sequence[ResultRow], condition: str, baseline: str,
            seed: int = 0) -> dict[str, Any]:
    """condition - baseline on the held-out tasks: accuracy and copy rate (no-gold; pooled with its
    prompt-level interval, `stats.pooled`, and with the task as the unit, `stats.task_level`) and the
    copy effect (copy-control; per-task differences, task-level)."""
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
    return out


def _level(diffs: dict[str, float], what: str, seed: int = 0) -> dict[str, Any]:
    from mechcopy import stats

    level = stats.task_level(diffs, what, "", "", seed=seed)
    return {"mean": level.mean, "task_ci": list(level.ci), "task_p": level.p_value, "n_up": level.n_up,
            "n_down": level.n_down, "n_tasks": level.n_tasks, "per_task": level.diffs}


def criteria(selections: Sequence[dict], probe: dict | None, rows_no_gold: Sequence[ResultRow],
             rows_cc: Sequence[ResultRow],
             probe_prompts=None, settings: dict = SETTINGS, seed: int = 0) -> dict[str, Any]:
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

    seeds = [f"s{sel['seed']}" for sel in selections if sel["chosen"] is not None]
    ng, cc = _rows_by(rows_no_gold), _rows_by(rows_cc)
    empty = [f"s{sel['seed']}" for sel in selections if sel["chosen"] is None]
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
                    out["versus_calibration"].setdefault(g, {})[f"{name} vs {cal}"] = r
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
                r["seeds_holding"] = sum(out["versus_calibration"].get(g, {}).get(f"{stem}@{g} vs {cal}", {}).get("holds", False)
                                         for g in seeds)
                vs_mean[f"{stem} vs {cal}"] = r
    out["versus_calibration"]["mean_over_seeds"] = vs_mean
    return out


def summary(model_name: str, work: Path, settings: dict = SETTINGS, tokenizer=None) -> dict[str, Any]:
    """The docs JSON from the saved state (no model needed beyond the tokenizer for the probe prompts)."""
    import json

    from mechcopy.io import read_jsonl
    from mechcopy.suite import ResultRow

    selections = [json.loads(p.read_text()) for p in sorted(work.glob("select_seed*.json"))]
    probe = json.loads((work / "probe_test.json").read_text()) if (work / "probe_test.json").exists() else None
    rows = {c: [ResultRow.from_json(e["row"]) for e in read_jsonl(work / f"heldout_{c}.jsonl")
                if isinstance(e, dict) and "row" in e] for c in CONSTRUCTIONS}
    costs = json.loads((work / "costs.json").read_text()) if (work / "costs.json").exists() else {}
    probe_prompts = _probe(tokenizer, "copy-control", settings["probe_seed"], settings).test if tokenizer and probe else None
    ng = _rows_by(rows["no-gold"])
    table = []
    for name in sorted(ng):
        if name == "unpruned":
            continue
        c = compare(rows["no-gold"], rows["copy-control"], name, "unpruned")
        ablation = name
        for cal in settings["calibrations"]:
            ablation = ablation.replace(f"+{cal}", "")
        c["ppl_increase"] = costs.get(ablation, 0.0)     # calibration alone changes no activation
        c["seconds_per_task"] = float(np.mean([r.seconds for r in ng[name].values()]))
        table.append(c)
    levels = {c: {name: {t: {"n": r.result.n, "accuracy": r.result.accuracy, "copy_rate": r.result.copy_rate,
                              "copy_effect": _ce(r)}
                          for t, r in per.items()} for name, per in _rows_by(rows[c]).items()} for c in CONSTRUCTIONS}
    return {
        "what": "the copy-mechanism study (issue 26), neurons only; settings frozen in docs/copy_mechanism.md",
        "model": model_name, "settings": settings,
        "selections": [{k: v for k, v in s.items() if k not in ("means", "sizes")} |
                       {"chosen": None if s["chosen"] is None else {k: v for k, v in s["chosen"].items() if k != "components"}
                        | {"neurons": s["chosen"]["components"]["neurons"] if "neurons" in s["chosen"]["components"]
                           else s["chosen"]["components"]}} for s in selections],
        "shared_neurons": {f"s{a['seed']}-s{b['seed']}": len({tuple(n) for n in a["chosen"]["components"]["neurons"]}
                                                            & {tuple(n) for n in b["chosen"]["components"]["neurons"]})
                           for i, a in enumerate(selections) for b in selections[i + 1:] if a["chosen"] and b["chosen"]},
        "finished": {"select": [s["seed"] for s in selections], "probe_test": probe is not None,
                     **{f"heldout_{c}": sorted({r.task for r in rows[c]}) for c in CONSTRUCTIONS}},
        "rows": levels, "table": table, "ppl_increase": costs,
        "criteria": criteria(selections, probe, rows["no-gold"], rows["copy-control"], probe_prompts, settings),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--stage", required=True, choices=("select", "probe", "heldout", "costs", "summary"))
    ap.add_argument("--construction", choices=CONSTRUCTIONS, default="no-gold")
    ap.add_argument("--seeds", default=None, help="selection seeds for --stage select (default: the frozen ones)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import json

    import torch

    from mechcopy import load_model
    from mechcopy.io import write_json_atomic

    torch.set_num_threads(args.threads)
    kept, why = probe_tasks(args.model)
    SETTINGS.update(probe_tasks=kept, probe_tasks_why=why)
    work = _work(args)
    work.mkdir(parents=True, exist_ok=True)
    if args.stage == "summary":
        from transformers import AutoTokenizer

        from mechcopy.models.zoo import cache_root

        tok = AutoTokenizer.from_pretrained(cache_root() / "models" / args.model)
        out = args.out or Path(f"docs/data/copy_mechanism_{args.model}.json")
        doc = summary(args.model, work, tokenizer=tok)
        doc["commands"] = [f"python analyses/copy_mechanism.py --model {args.model} --stage {s}" for s in
                           ("select", "probe", "heldout --construction no-gold", "heldout --construction copy-control",
                            "costs", "summary")]
        write_json_atomic(out, doc)
        print(f"wrote {out}", file=sys.stderr)
        return 0
    model = load_model(args.model)
    selections = lambda: [json.loads(p.read_text()) for p in sorted(work.glob("select_seed*.json"))]
    if args.stage == "select":
        seeds = SETTINGS["selection_seeds"] if args.seeds is None else [int(s) for s in args.seeds.split(",")]
        for seed in seeds:
            path = work / f"select_seed{seed}.json"
            if path.exists():
                continue
            res = select_seed(model, seed, progress=True)
            write_json_atomic(path, res)
            print(f"seed {seed}: chosen {res['chosen'] and (res['chosen']['condition'], res['chosen']['dev_accuracy'])} "
                  f"vs unpruned {res['dev_unpruned_accuracy']:.3f}; {res['seconds']}", file=sys.stderr)
    elif args.stage == "probe":
        write_json_atomic(work / "probe_test.json", probe_test(model, selections()))
    elif args.stage == "costs":
        write_json_atomic(work / "costs.json", ablation_costs(model, selections()))
    else:
        heldout(model, selections(), args.construction, work / f"heldout_{args.construction}.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
