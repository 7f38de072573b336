"""The full copy-neuron method on a model organism, and its summary over training seeds.

`run_method(model)` runs the method's steps (`mechcopy.method`, with the organisms' own `FindConfig`,
`ORGANISM_FIND`) for each probe in `PROBES`: probe attribution split -> IG on every neuron (target
`contrast`) -> copy scores (min-max per prompt, no completeness gate) -> k chosen on the probe's *dev*
split -> evaluation of the pruned set against random layer-matched sets and the bottom-score set
(`mechcopy.conditions.standard_conditions`) on held-out functions, the class family and both probes'
test splits -> task vectors (unpruned and pruned) on class and shift functions.

k comes from `method.choose_k` with the general-ability bound instead of perplexity (the organisms
read no English: `max_ppl_increase=None`): the best dev accuracy among the k that keep query accuracy on
*training-split* map and class episodes within `max_general_drop`. The organisms prune the best
feasible k even where it does not beat k = 0 (the sweep's `chosen_k` is then 0), and the smallest k of
the grid when no k is feasible (recorded as `pruned_k`), so the table still shows what the method's
first step costs.

`seed_summary(results)` turns one result per trained organism into rows with the mean and a 95%
t interval over training seeds (`stats.seed_interval`), per architecture, probe, set and condition,
plus the per-seed paired difference pruned - unpruned.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from mechcopy import method
from mechcopy.arch import HookedModel, arch_of
from mechcopy.conditions import Condition, standard_conditions
from mechcopy.evaluation import evaluate, evaluate_conditions
from mechcopy.fingerprint import model_fingerprint
from mechcopy.method import FindConfig
from mechcopy.organisms.data import PROBES, make_function, organism_prompts, probe_splits
from mechcopy.progress import tqdm
from mechcopy.pruning import pruning_hooks
from mechcopy.selection import select
from mechcopy.stats import seed_interval
from mechcopy.task_vectors import TaskVectorConfig, task_vector_experiment

GENERAL = ("map-train", "class")  # general ability: training-split functions
PER_PROMPT = ("predictions", "correct", "copy")  # TaskResult fields left out of the summaries
HELD_OUT = ("map-heldout", "shift-heldout", "class", "probe-same")  # evaluated besides the probes' test splits
TV_FUNCTIONS = (("class", 0), ("class", 1))  # the family whose ICL works (shifts stay at chance)


def _organism_find() -> FindConfig:
    """The method's settings on an organism: 100 attribution and 200 dev prompts of 4 shots, IG with 20
    steps and no completeness gate, a small k grid, the general-ability bound instead of perplexity, no guard."""
    return FindConfig(n=100, n_dev=200, shots=4, steps=20, ks=(1, 2, 4, 8, 16, 32, 64), max_ppl_increase=None,
                      max_general_drop=0.05, max_completeness_error=None, consistency_random=0)


ORGANISM_FIND = _organism_find()


@dataclass(frozen=True)
class MethodConfig:
    """One run of the method on an organism: the method's own config (`find`: prompts per split, shots,
    IG steps, the k grid, the bound, the seed) and the evaluation's sizes."""

    find: FindConfig = field(default_factory=_organism_find)
    n_eval: int = 400
    n_random: int = 5
    probes: tuple[str, ...] = PROBES
    task_vectors: bool = True

    def __post_init__(self):
        unknown = set(self.probes) - set(PROBES)
        if unknown:
            raise ValueError(f"unknown organism probe(s) {sorted(unknown)}; known: {', '.join(PROBES)}")
        object.__setattr__(self, "probes", tuple(self.probes))


def _cell(res, name: str, condition: "Condition | str") -> dict:
    """One row of the organism's table: a prompt set under a condition (its name and family)."""
    label, family = (condition, condition) if isinstance(condition, str) else (condition.label, condition.family)
    return {"set": name, "condition": label, "family": family, "accuracy": res.accuracy,
            "accuracy_ci": list(res.accuracy_ci), "copy_rate": res.copy_rate, "copy_rate_ci": list(res.copy_rate_ci),
            "n": res.n}


def _task_vectors(model: HookedModel, hooks_by_condition: dict[str, list], seed: int) -> list[dict]:
    config = TaskVectorConfig(shots=4, n_extract=5, n_dev=8, n_test=9, seed=seed)
    out = []
    for family, param in TV_FUNCTIONS:
        task = make_function(family, param).to_task()
        split = config.split(task, model.tokenizer)
        for cond, hooks in hooks_by_condition.items():
            r = task_vector_experiment(model, task, config, hooks, cond, split)
            out.append({"task": r.task, "condition": cond, "best_layer": r.best_layer,
                         "dev_accuracy": list(r.dev_accuracy), "test_accuracy": r.test_accuracy,
                         "zero_shot_accuracy": r.zero_shot_accuracy, "icl_accuracy": r.icl_accuracy,
                         "copy_rate": r.copy_rate, "n_test": r.n_test})
    return out


def run_method(model: HookedModel, config: MethodConfig = MethodConfig(), progress: bool = True) -> dict:
    """Every number of the organism write-up for one trained organism (see the module docstring)."""
    t0 = time.time()
    c, f, tok = config, config.find, model.tokenizer
    torch.manual_seed(f.seed)
    splits = {p: probe_splits(tok, f.n, f.n_dev, c.n_eval, f.shots, f.seed, probe=p) for p in PROBES}
    sets = {name: list(organism_prompts(name, tok, c.n_eval, f.shots, f.seed).prompts) for name in HELD_OUT}
    sets.update({f"{p}-test": splits[p][2] for p in PROBES})
    general = [p for name in GENERAL for p in organism_prompts(name, tok, f.n_dev, f.shots, f.seed + 30_000).prompts]

    unpruned = {name: evaluate(model, ps, condition="unpruned", seed=f.seed) for name, ps in sets.items()}
    out: dict[str, Any] = {
        "model": model_fingerprint(model), "arch": arch_of(model).name,
        "config": asdict(c),
        "unpruned": {name: {k: v for k, v in r.to_json().items() if k not in PER_PROMPT} for name, r in unpruned.items()},
        "methods": {},
    }
    tv_hooks: dict[str, list] = {"unpruned": []}
    for probe in tqdm(c.probes, desc="organism method", disable=not progress):
        attr, dev, _ = splits[probe]
        ig = method.attribute(model, attr, f)
        scores = method.score(model, ig, f)
        sweep = method.choose_k(model, scores, dev, f, general_prompts=general)
        pruned_k = sweep.best_pruned_k or min(sweep.ks)
        neurons = select(scores, f.mode, k=pruned_k)
        table = [_cell(r, name, "unpruned") for name, r in unpruned.items()]
        conditions = standard_conditions(model, neurons, n_random=c.n_random, seed=f.seed, scores=scores)
        results = {name: evaluate_conditions(model, ps, conditions, seed=f.seed) for name, ps in sets.items()}
        table += [_cell(results[name][cond.label], name, cond) for cond in conditions for name in sets]
        tv_hooks[f"pruned ({probe})"] = pruning_hooks(model, neurons)
        out["methods"][probe] = {
            "ig": {"completeness_error_median": float(ig.completeness_error().median()),
                   "target_clean_mean": float(ig.target_clean.mean())},
            "scores_per_layer": scores.scores.tolist(),
            "top16_per_layer": select(scores, "global", k=min(16, scores.scores.numel())).layer_counts(model.cfg.n_layers),
            "sweep": sweep.to_json(),
            "pruned_k": pruned_k,
            "neurons": [list(n) for n in neurons.pairs],
            "neurons_per_layer_selected": neurons.layer_counts(model.cfg.n_layers),
            "table": table,
        }
    if c.task_vectors:
        out["task_vectors"] = _task_vectors(model, tv_hooks, f.seed)
    out["seconds"] = time.time() - t0
    return out


# ------------------------------------------------------------------------------ over training seeds


def seed_summary(results: Sequence[dict]) -> list[dict]:
    """Mean and 95% t interval over training seeds per (arch, probe, set, condition); random sets are
    first averaged within a seed. Also the per-seed difference pruned - unpruned (`condition` "pruned - unpruned")."""
    per_seed: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for res in results:
        for probe, m in res["methods"].items():
            cells: dict[tuple, list[dict]] = defaultdict(list)
            for row in m["table"]:
                cells[(row["set"], row["family"])].append(row)
            for (name, cond), rows in cells.items():
                acc = sum(r["accuracy"] for r in rows) / len(rows)
                copy = sum(r["copy_rate"] for r in rows) / len(rows)
                per_seed[(res["arch"], probe, name, cond)].append((acc, copy))
            for name in {n for n, _ in cells}:  # the paired difference within this seed
                (pruned,), (base,) = cells[(name, "pruned")], cells[(name, "unpruned")]
                per_seed[(res["arch"], probe, name, "pruned - unpruned")].append(
                    (pruned["accuracy"] - base["accuracy"], pruned["copy_rate"] - base["copy_rate"]))
    rows = []
    for (arch, probe, name, cond), vals in sorted(per_seed.items()):
        acc, copy = seed_interval([a for a, _ in vals]), seed_interval([c for _, c in vals])
        rows.append({"arch": arch, "probe": probe, "set": name, "condition": cond, "seeds": len(vals),
                     "accuracy": acc[0], "acc_lo": acc[1], "acc_hi": acc[2],
                     "copy_rate": copy[0], "copy_lo": copy[1], "copy_hi": copy[2],
                     "accuracy_per_seed": [a for a, _ in vals], "copy_rate_per_seed": [c for _, c in vals]})
    return rows


def task_vector_summary(results: Sequence[dict]) -> list[dict]:
    """Task-vector test accuracy (and zero-shot / ICL baselines) per (arch, task, condition) over seeds."""
    per_seed: dict[tuple, list[dict]] = defaultdict(list)
    for res in results:
        for r in res.get("task_vectors", []):
            per_seed[(res["arch"], r["task"], r["condition"])].append(r)
    rows = []
    for (arch, task, cond), rs in sorted(per_seed.items()):
        row = {"arch": arch, "task": task, "condition": cond, "seeds": len(rs),
               "best_layers": [r["best_layer"] for r in rs]}
        for key in ("test_accuracy", "zero_shot_accuracy", "icl_accuracy", "copy_rate"):
            mean, lo, hi = seed_interval([r[key] for r in rs])
            row.update({key: mean, f"{key}_lo": lo, f"{key}_hi": hi})
        rows.append(row)
    return rows
