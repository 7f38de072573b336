"""`mechcopy reproduce`: the main job, from model to report.

probe -> attribution -> selection (k sweep on the probe's dev split) -> evaluation of every task
with baselines -> task vectors -> activation patching -> one offline HTML report.

Every stage writes its result to OUT/<stage>.json (atomically). A stage whose result exists is
skipped, so an interrupted run resumes where it stopped (and `find` itself resumes per prompt).
Settings live in a frozen `ReproduceConfig`; changing them needs a fresh OUT folder.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from mechcopy.arch import HookedModel
from mechcopy.errors import check_minimums
from mechcopy.find import FindConfig
from mechcopy.io import write_json_atomic
from mechcopy.models.zoo import DEFAULT_MODEL
from mechcopy.neurons import NeuronSet, model_fingerprint

# tasks with enough single-token answers on SmolLM2 and Gemma (task vectors score single tokens)
TV_TASKS = ("person_language", "to_lower", "next_letter", "present_past", "antonyms", "fr_en")


@dataclass(frozen=True)
class ReproduceConfig:
    """Every setting of the main job (defaults sized for ~15 minutes on 2 CPU cores)."""

    model: str = DEFAULT_MODEL
    n_probe: int = 40            # attribution prompts of the probe (fast IG: ~6 s CPU each on SmolLM2)
    n_dev: int = 50              # dev prompts of the probe (the k sweep)
    steps: int = 20              # IG steps
    attribution: str = "ig"      # ig | gradxact
    target: str = "contrast"
    probe: str = FindConfig.probe                  # the copy probe find attributes on (see FindConfig)
    max_completeness_error: float | None = FindConfig.max_completeness_error   # find's IG completeness gate
    consistency_random: int = FindConfig.consistency_random  # find's self-consistency guard (0: off)
    tasks: str = "all"
    shots: int = 4
    n_eval: int = 50             # prompts per task in the evaluation (`mechcopy evaluate` for more)
    n_random: int = 3            # random-neuron baselines
    tv_tasks: tuple[str, ...] = TV_TASKS
    n_tv: int = 30               # zero-shot test prompts per task for task vectors
    n_tv_dev: int = 15           # zero-shot dev prompts per task (choose the layer)
    tv_layer_step: int = 2       # task vectors after every 2nd layer (and the last)
    patch_task: str = "antonyms"
    patch_corruption: str = "shuffled_labels"
    patch_shots: int = 3
    n_patch: int = 4
    seed: int = 0

    MINIMUM: ClassVar[dict[str, int]] = {
        "n_probe": 1, "n_dev": 1, "steps": 1, "shots": 1, "n_eval": 1, "n_random": 0, "n_tv": 1, "n_tv_dev": 1,
        "tv_layer_step": 1, "patch_shots": 2, "n_patch": 1, "seed": 0}

    def __post_init__(self):
        check_minimums(self)


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# ------------------------------------------------------------------------------------------ stages


def stage_find(model: HookedModel, cfg: ReproduceConfig, out: Path) -> dict:
    """Copy neurons: IG on the probe's attribution split, k chosen on its dev split; and the set the later
    stages evaluate (`evaluated_set`), saved as OUT/evaluated.json."""
    from mechcopy.find import FindConfig, find_copy_neurons

    config = FindConfig(n=cfg.n_probe, n_dev=cfg.n_dev, shots=cfg.shots, steps=cfg.steps, attribution=cfg.attribution,
                        target=cfg.target, seed=cfg.seed, probe=cfg.probe,
                        max_completeness_error=cfg.max_completeness_error, consistency_random=cfg.consistency_random)
    neurons = find_copy_neurons(model, out / "neurons.json", config)
    evaluated = evaluated_set(neurons)
    evaluated.save(out / "evaluated.json")
    return {"neurons_path": str(out / "neurons.json"), "n_neurons": len(neurons),
            "layer_counts": neurons.layer_counts(model.cfg.n_layers), "evaluated": evaluated.meta["basis"],
            "evaluated_k": len(evaluated)}


def evaluated_set(neurons: NeuronSet) -> NeuronSet:
    """The neurons the main job prunes: find's choice; when find chose k = 0, the smallest k whose dev
    accuracy beats no pruning if the bound on general ability is lifted (said so in `meta["basis"]`,
    never presented as the method's choice); empty when no k beats no pruning at all."""
    from mechcopy.pruning import find_scores, select, smallest_unbounded_k

    if neurons.neurons:
        return NeuronSet(neurons.neurons, neurons.model, {**neurons.meta, "basis": "chosen on the probe's dev split"})
    sweep = neurons.meta["sweep"]
    k = smallest_unbounded_k(sweep)
    if k is None:
        return NeuronSet((), neurons.model, {**neurons.meta, "basis": f"nothing to prune: {neurons.why_empty}"})
    chosen = select(find_scores(neurons), neurons.meta.get("selection", "global"), k=k)
    basis = (f"not the method's choice: find chose k = 0 ({neurons.why_empty}); k = {k} is the smallest k that "
             "beats no pruning on the dev split when the bound on general ability is lifted")
    return NeuronSet(chosen.neurons, neurons.model, {**chosen.meta, "scores_path": neurons.meta["scores_path"],
                                                     "sweep": sweep, "basis": basis})


def stage_evaluate(model: HookedModel, cfg: ReproduceConfig, out: Path) -> dict:
    """Every task: unpruned, pruned, random-matched baselines and the bottom-score set."""
    from mechcopy.evaluation import compare_rows, run_evaluation
    from mechcopy.pruning import condition_sets
    from mechcopy.tasks import load_tasks

    neurons = NeuronSet.load(out / "evaluated.json")
    conds = {"unpruned": None, **condition_sets(model, neurons, cfg.n_random, cfg.seed)}
    rows, dropped = run_evaluation(model, load_tasks(cfg.tasks), cfg.shots, cfg.n_eval, cfg.seed, conds,
                                   checkpoint=out / "evaluate.partial.jsonl")
    return {"results": rows, "dropped": dropped, "comparisons": compare_rows(rows, seed=cfg.seed)}


def stage_task_vectors(model: HookedModel, cfg: ReproduceConfig, out: Path) -> dict:
    """Task vectors per layer, unpruned vs pruned (pruning active in extraction and injection)."""
    from mechcopy.task_vectors import TaskVectorConfig, run_task_vectors
    from mechcopy.tasks import load_task

    neurons = NeuronSet.load(out / "evaluated.json")
    n = model.cfg.n_layers
    layers = tuple(sorted(set(range(0, n, cfg.tv_layer_step)) | {n - 1}))
    tv_cfg = TaskVectorConfig(shots=cfg.shots, n_dev=cfg.n_tv_dev, n_test=cfg.n_tv, seed=cfg.seed, layers=layers)
    results = run_task_vectors(model, [load_task(t) for t in cfg.tv_tasks], tv_cfg, neurons)
    return {"results": [r.to_json() for r in results]}


def stage_patching(model: HookedModel, cfg: ReproduceConfig, out: Path) -> dict:
    """Clean-into-corrupted patching of the residual stream on one task, and of the copy neurons."""
    from mechcopy.patching import activation_patching
    from mechcopy.tasks import load_task

    neurons = NeuronSet.load(out / "evaluated.json")
    res = activation_patching(model, load_task(cfg.patch_task), cfg.patch_corruption, n=cfg.n_patch,
                              shots=cfg.patch_shots, seed=cfg.seed, neurons=neurons, comps=["resid_pre"],
                              progress=True)
    return res.to_json()


def stage_report(model: HookedModel, cfg: ReproduceConfig, out: Path) -> dict:
    """Figures, circuitsvis views and OUT/report.html (`mechcopy.report.build_report`)."""
    from mechcopy.report import build_report

    return build_report(out, model)


STAGES = [
    ("find", stage_find),
    ("evaluate", stage_evaluate),
    ("task_vectors", stage_task_vectors),
    ("patching", stage_patching),
    ("report", stage_report),
]


def check_out(cfg: ReproduceConfig, out: str | Path) -> None:
    """Refuse an output folder that holds a run with other settings (before any model is loaded)."""
    settings_path = Path(out) / "settings.json"
    if settings_path.exists():
        try:
            before = json.loads(settings_path.read_text())["config"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{settings_path} is damaged ({e!r}); use a fresh --out folder") from e
        if before != json.loads(json.dumps(asdict(cfg))):
            raise ValueError(f"{out} holds a run with other settings ({settings_path}); "
                             "use a fresh --out folder, or delete it to start over")


def run_stages(stages, model: HookedModel, cfg, out: Path) -> None:
    """Run each (name, fn) of `stages` whose OUT/<name>.json does not exist yet, in order, and write its
    result there (atomically, with its time): an interrupted run resumes at the first missing stage."""
    for name, stage in stages:
        path = out / f"{name}.json"
        if path.exists():
            print(f"[{name}] done already ({path.name}); skipping")
            continue
        print(f"[{name}] running ...", flush=True)
        t0 = time.time()
        result = stage(model, cfg, out)
        seconds = round(time.time() - t0, 1)
        write_json_atomic(path, {"stage": name, "seconds": seconds, "result": result})
        path.with_suffix(".partial.jsonl").unlink(missing_ok=True)  # the stage's checkpoint, if it keeps one
        print(f"[{name}] {seconds} s -> {path.name}", flush=True)


def reproduce(model: HookedModel, cfg: ReproduceConfig, out: str | Path) -> Path:
    """Run every stage not already done in `out` on `model`; return the report's path."""
    import torch

    out = Path(out)
    check_out(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(True)
    write_json_atomic(out / "settings.json", {"config": asdict(cfg), "model": model_fingerprint(model),
                                              "git_revision": git_revision()})
    run_stages(STAGES, model, cfg, out)
    report = out / "report.html"
    print(f"\nreport: {report}")
    return report
