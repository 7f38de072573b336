"""`mechcopy reproduce`: the main job, from model to report.

probe -> attribution -> selection (k sweep on the probe's dev split) -> evaluation of every task
with baselines -> task vectors -> activation patching -> views of one copy error -> one offline
HTML report.

Every stage writes its result to OUT/<stage>.json (atomically). A stage whose result exists is
skipped, so an interrupted run resumes where it stopped (and `find` itself resumes per prompt).
Every stage that needs the model runs before the report, which reads the folder only
(`report.build_report(OUT)`). Settings live in a frozen `ReproduceConfig` (`mechcopy.job`, with
the types a run folder is read back as); changing them needs a fresh OUT folder.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch

from mechcopy import method
from mechcopy.arch import HookedModel
from mechcopy.comparisons import Evaluation, compare_rows, task_levels
from mechcopy.components import Components
from mechcopy.conditions import UNPRUNED, find_scores, standard_conditions
from mechcopy.find import find_copy_neurons
from mechcopy.fingerprint import model_fingerprint
from mechcopy.io import write_json_atomic
from mechcopy.job import TV_TASKS, ReproduceConfig, Settings
from mechcopy.method import Choice, FindConfig
from mechcopy.patching import PatchingResult, activation_patching
from mechcopy.provenance import git_revision, run_stages
from mechcopy.suite import run_evaluation
from mechcopy.task_vectors import TaskVectorConfig, run_task_vectors
from mechcopy.tasks import load_task, load_tasks
from mechcopy.views import Views, copy_error_views

__all__ = ["STAGES", "TV_TASKS", "FindConfig", "ReproduceConfig", "check_out", "reproduce"]


# ------------------------------------------------------------------------------------------ stages


def stage_find(model: HookedModel, cfg: ReproduceConfig, out: Path) -> dict:
    """Copy neurons (`find_copy_neurons` with `cfg.find`); and the set the later stages evaluate
    (`method.evaluated`: the choice, or the sweep's smallest unbounded k), saved as OUT/evaluated.json."""
    neurons = find_copy_neurons(model, out / "neurons.json", cfg.find)
    sweep = Choice.from_components(neurons).sweep
    scores = find_scores(neurons) if not neurons.pairs and sweep.smallest_unbounded_k is not None else None
    evaluated = method.evaluated(neurons, sweep, scores, cfg.find.mode)
    evaluated.save(out / "evaluated.json")
    return {"neurons_path": str(out / "neurons.json"), "n_neurons": len(neurons),
            "layer_counts": neurons.layer_counts(model.cfg.n_layers), "evaluated": evaluated.meta["basis"],
            "evaluated_k": len(evaluated)}


def stage_evaluate(model: HookedModel, cfg: ReproduceConfig, out: Path) -> Evaluation:
    """Every task: unpruned, pruned, random-matched baselines and the bottom-score set."""
    neurons = Components.load(out / "evaluated.json")
    conds = [UNPRUNED, *standard_conditions(model, neurons, cfg.n_random, cfg.seed)]
    rows, dropped = run_evaluation(model, load_tasks(cfg.tasks), cfg.shots, cfg.n_eval, cfg.seed, conds,
                                   checkpoint=out / "evaluate.partial.jsonl")
    comparisons = compare_rows(rows, seed=cfg.seed)
    return Evaluation(tuple(rows), dropped, comparisons, tuple(task_levels(comparisons, seed=cfg.seed)))


def stage_task_vectors(model: HookedModel, cfg: ReproduceConfig, out: Path) -> dict:
    """Task vectors per layer, unpruned vs pruned (pruning active in extraction and injection)."""
    neurons = Components.load(out / "evaluated.json")
    n = model.cfg.n_layers
    layers = tuple(sorted(set(range(0, n, cfg.tv_layer_step)) | {n - 1}))
    tv_cfg = TaskVectorConfig(shots=cfg.shots, n_dev=cfg.n_tv_dev, n_test=cfg.n_tv, seed=cfg.seed, layers=layers)
    results = run_task_vectors(model, [load_task(t) for t in cfg.tv_tasks], tv_cfg, neurons)
    return {"results": [r.to_json() for r in results]}


def stage_patching(model: HookedModel, cfg: ReproduceConfig, out: Path) -> PatchingResult:
    """Clean-into-corrupted patching of the residual stream on one task, and of the copy neurons."""
    neurons = Components.load(out / "evaluated.json")
    return activation_patching(model, load_task(cfg.patch_task), cfg.patch_corruption, n=cfg.n_patch,
                               shots=cfg.patch_shots, seed=cfg.seed, neurons=neurons, comps=["resid_pre"],
                               progress=True)


def stage_views(model: HookedModel, cfg: ReproduceConfig, out: Path) -> Views:
    """What the report shows of one copy error of the run's own probe: the prompt, attention patterns and
    the evaluated neurons' activations (`views.copy_error_views`)."""
    return copy_error_views(model, cfg.find, Components.load(out / "evaluated.json"))


def stage_report(model: HookedModel, cfg: ReproduceConfig, out: Path) -> dict:
    """Figures, circuitsvis views and OUT/report.html from the folder's files (`report.build_report`;
    the model is not used)."""
    from mechcopy.report import build_report  # matplotlib, pandas, circuitsvis: heavy, and only needed here

    return build_report(out)


STAGES = [
    ("find", stage_find),
    ("evaluate", stage_evaluate),
    ("task_vectors", stage_task_vectors),
    ("patching", stage_patching),
    ("views", stage_views),
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
        if before != json.loads(json.dumps(cfg.to_json())):
            raise ValueError(f"{out} holds a run with other settings ({settings_path}); "
                             "use a fresh --out folder, or delete it to start over")


def reproduce(model: HookedModel, cfg: ReproduceConfig, out: str | Path) -> Path:
    """Run every stage not already done in `out` on `model`; return the report's path."""
    out = Path(out)
    check_out(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(True)
    write_json_atomic(out / "settings.json", Settings(cfg, model_fingerprint(model), git_revision()).to_json())
    run_stages([(name, partial(stage, model, cfg, out)) for name, stage in STAGES], out)
    report = out / "report.html"
    print(f"\nreport: {report}")
    return report
