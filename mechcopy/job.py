"""The main job's settings and what its folder holds, typed: `ReproduceConfig` (every setting of
`mechcopy reproduce`), `Settings` (OUT/settings.json: the config, the model's fingerprint, the git
revision) and `Run` (every stage's result read back from OUT as the result types that wrote it).

Nothing here runs a model: `mechcopy.reproduce` runs the stages, and the report (`mechcopy.report`)
reads a finished folder through `Run.read`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from mechcopy.comparisons import Evaluation
from mechcopy.components import Components
from mechcopy.errors import check_minimums
from mechcopy.io import as_tuples
from mechcopy.method import Choice, FindConfig
from mechcopy.models.zoo import DEFAULT_MODEL
from mechcopy.patching import PatchingResult
from mechcopy.provenance import read_stage
from mechcopy.task_vectors import TaskVectorResult
from mechcopy.views import Views

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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ReproduceConfig":
        unknown = sorted(set(obj) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown ReproduceConfig settings {unknown}: written by another version of mechcopy")
        values = {k: as_tuples(v) for k, v in obj.items()}
        if "find" in values:
            values["find"] = FindConfig.from_json(values["find"])
        return cls(**values)


@dataclass(frozen=True)
class Settings:
    """OUT/settings.json of a run: its config, the fingerprint of the model it ran on, the git revision."""

    config: ReproduceConfig
    model: dict[str, Any]
    git_revision: str = "unknown"

    @property
    def model_name(self) -> str:
        return str(self.model.get("name", self.config.model))

    @property
    def n_layers(self) -> int:
        return int(self.model["n_layers"])

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config.to_json(), "model": self.model, "git_revision": self.git_revision}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Settings":
        return cls(ReproduceConfig.from_json(obj["config"]), obj["model"], obj.get("git_revision", "unknown"))

    @classmethod
    def read(cls, out: str | Path) -> "Settings":
        path = Path(out) / "settings.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: {out} is not the folder of a `mechcopy reproduce` run")
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is damaged or from another version of mechcopy ({type(e).__name__}: {e})") from e


@dataclass(frozen=True)
class Run:
    """A finished run, read from its folder: the settings, the set the later stages evaluated (and the
    choice it came from), and every stage's typed result. `views` is None for a run made before the
    views stage existed."""

    settings: Settings
    evaluated: Components
    choice: Choice
    evaluation: Evaluation
    task_vectors: tuple[TaskVectorResult, ...]
    patching: PatchingResult
    views: Views | None

    @classmethod
    def read(cls, out: str | Path) -> "Run":
        out = Path(out)
        evaluated = Components.load(out / "evaluated.json")
        views = Views.from_json(read_stage(out, "views")) if (out / "views.json").exists() else None
        return cls(Settings.read(out), evaluated, Choice.from_components(evaluated),
                   Evaluation.from_json(read_stage(out, "evaluate")),
                   tuple(TaskVectorResult.from_json(r) for r in read_stage(out, "task_vectors")["results"]),
                   PatchingResult.from_json(read_stage(out, "patching")), views)
