"""`mechcopy reproduce`: the main job, from model to report.

probe -> attribution -> selection (k sweep on the probe's dev split) -> evaluation of every task
with baselines -> task vectors -> activation patching -> one offline HTML report.

Every stage writes its result to OUT/<stage>.json (atomically). A stage whose result exists is
skipped, so an interrupted run resumes where it stopped (and `find` itself resumes per prompt).
Settings live in a frozen `ReproduceConfig`; changing them needs a fresh OUT folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch

from mechcopy import method
from mechcopy.arch import HookedModel
from mechcopy.comparisons import compare_rows, task_levels
from mechcopy.components import Components
from mechcopy.conditions import UNPRUNED, find_scores, standard_conditions
from mechcopy.errors import check_minimums
from mechcopy.find import find_copy_neurons
from mechcopy.fingerprint import model_fingerprint
from mechcopy.io import write_json_atomic
from mechcopy.method import FindConfig
from mechcopy.models.zoo import DEFAULT_MODEL
from mechcopy.patching import activation_patching
from mechcopy.provenance import git_revision, run_stages
from mechcopy.suite import run_evaluation
from mechcopy.sweeps import KSweep
from mechcopy.task_vectors import TaskVectorConfig, run_task_vectors
from mechcopy.tasks import load_task, load_tasks

# tasks with enough single-token answers on SmolLM2 and Gemma (task vectors score single tokens)
TV_TASKS = ("person_language", "to_lower", "next_letter", "present_past", "antonyms", "fr_en")


def _find_default() -> FindConfig:
    """find's settings in the main job: 40 attribution prompts (fast IG: ~6 s CPU each on SmolLM2)."""
    return FindConfig(n=40)


@dataclass(frozen=True)
class ReproduceConfig:
    """Every setting of the main job (defaults sized for ~15 minutes on 2 CPU cores). `find` is the
    method's own config (`mechcopy find`'s settings); the rest configure the later stages."""

    model: str = DEFAULT_MODEL
    find: FindConfig = field(default_factory=_find_default)
    tasks: str = "all"
    shots: int = 4               # demonstrations per evaluation prompt
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
    seed: int = 0                # the later stages' prompts and baselines (find's own: `find.seed`)

    MINIMUM: ClassVar[dict[str, int]] = {
        "shots": 1, "n_eval": 1, "n_random": 0, "n_tv": 1, "n_tv_dev": 1, "tv_layer_step": 1, "patch_shots": 2,
        "n_patch": 1, "seed": 0}

    def __post_init__(self):
        if not isinstance(self.find, FindConfig):
            raise TypeError(f"find must be a FindConfig, got {type(self.find).__name__}")
        if isinstance(self.tv_tasks, list):
            object.__setattr__(self, "tv_tasks", tuple(self.tv_tasks))
        check_minimums(self)


# ------------------------------------------------------------------------------------------ stages


def stage_find(model: HookedModel, cfg: ReproduceConfig, out: Path) -> dict:
    """Copy neurons (`find_copy_neurons` with `cfg.find`); and the set the later stages evaluate
    (`method.evaluated`: the choice, or the sweep's smallest unbounded k), saved as OUT/evaluated.json."""
    neurons = find_copy_neurons(model, out / "neurons.json", cfg.find)
    sweep = KSweep.from_json(neurons.meta["sweep"])
    scores = find_scores(neurons) if not neurons.pairs and sweep.smallest_unbounded_k is not None else None
    evaluated = method.evaluated(neurons, sweep, scores, neurons.meta.get("selection", "global"))
    evaluated.save(out / "evaluated.json")
    return {"neurons_path": str(out / "neurons.json"), "n_neurons": len(neurons),
            "layer_counts": neurons.layer_counts(model.cfg.n_layers), "evaluated": evaluated.meta["basis"],
            "evaluated_k": len(evaluated)}


def stage_evaluate(model: HookedModel, cfg: ReproduceConfig, out: Path) -> dict:
    """Every task: unpruned, pruned, random-matched baselines and the bottom-score set."""
    neurons = Components.load(out / "evaluated.json")
    conds = [UNPRUNED, *standard_conditions(model, neurons, cfg.n_random, cfg.seed)]
    rows, dropped = run_evaluation(model, load_tasks(cfg.tasks), cfg.shots, cfg.n_eval, cfg.seed, conds,
                                   checkpoint=out / "evaluate.partial.jsonl")
    comparisons = compare_rows(rows, seed=cfg.seed)
    return {"results": rows, "dropped": dropped, "comparisons": comparisons,
            "task_level": task_levels(comparisons, seed=cfg.seed)}


def stage_task_vectors(model: HookedModel, cfg: ReproduceConfig, out: Path) -> dict:
    """Task vectors per layer, unpruned vs pruned (pruning active in extraction and injection)."""
    neurons = Components.load(out / "evaluated.json")
    n = model.cfg.n_layers
    layers = tuple(sorted(set(range(0, n, cfg.tv_layer_step)) | {n - 1}))
    tv_cfg = TaskVectorConfig(shots=cfg.shots, n_dev=cfg.n_tv_dev, n_test=cfg.n_tv, seed=cfg.seed, layers=layers)
    results = run_task_vectors(model, [load_task(t) for t in cfg.tv_tasks], tv_cfg, neurons)
    return {"results": [r.to_json() for r in results]}


def stage_patching(model: HookedModel, cfg: ReproduceConfig, out: Path) -> dict:
    """Clean-into-corrupted patching of the residual stream on one task, and of the copy neurons."""
    neurons = Components.load(out / "evaluated.json")
    res = activation_patching(model, load_task(cfg.patch_task), cfg.patch_corruption, n=cfg.n_patch,
                              shots=cfg.patch_shots, seed=cfg.seed, neurons=neurons, comps=["resid_pre"],
                              progress=True)
    return res.to_json()


def stage_report(model: HookedModel, cfg: ReproduceConfig, out: Path) -> dict:
    """Figures, circuitsvis views and OUT/report.html (`mechcopy.report.build_report`)."""
    from mechcopy.report import build_report  # matplotlib, pandas, circuitsvis: heavy, and only needed here

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


def reproduce(model: HookedModel, cfg: ReproduceConfig, out: str | Path) -> Path:
    """Run every stage not already done in `out` on `model`; return the report's path."""
    out = Path(out)
    check_out(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(True)
    write_json_atomic(out / "settings.json", {"config": asdict(cfg), "model": model_fingerprint(model),
                                              "git_revision": git_revision()})
    run_stages([(name, partial(stage, model, cfg, out)) for name, stage in STAGES], out)
    report = out / "report.html"
    print(f"\nreport: {report}")
    return report
