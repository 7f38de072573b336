"""Task vectors after Hendel, Geva & Globerson (2023): extract from k-shot prompts, inject into zero-shot.

*After layer L* means the residual stream at the output of block L (0-based), i.e.
`blocks.{L}.hook_resid_post` (the input of block L+1); L runs over 0..n_layers-1, the same name on
HookedTransformer and HookedMamba.

Extraction: run k-shot prompts whose query is a *dummy* input (a pair of the task that is neither a
demo nor any dev/test query), take the residual stream at the last token after every layer in one
cached pass (`run_with_cache` with a `names_filter`), and average over several prompts with different
demos (default 5). Injection: run the zero-shot prompt `x ->` (same template) and overwrite the residual
stream at its last position after layer L with the vector (`mechcopy.hooks.inject_vector`). Predictions
and accuracy come from `mechcopy.evaluation.predict`/`evaluate` with the injection as a forward hook.

Only single-token answers are used: the vector replaces one position of the prompt, and greedy
generation of further tokens would re-run that position. Pairs with multi-token answers (or that fail
to tokenise as one known continuation) are dropped and counted.

Extra forward hooks (e.g. `mechcopy.pruning.pruning_hooks`) are active in BOTH extraction and
injection, and in the zero-shot and ICL baselines, so a "pruned" result is the pruned model throughout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechcopy.arch import HookedModel, arch_of
from mechcopy.components import Components, as_components
from mechcopy.errors import check_items, check_minimums
from mechcopy.evaluation import check_context, evaluate
from mechcopy.fingerprint import model_fingerprint
from mechcopy.hooks import inject_vector
from mechcopy.io import as_tuples
from mechcopy.progress import tqdm
from mechcopy.pruning import pruning_hooks
from mechcopy.tasks.outcomes import copy_rate
from mechcopy.tasks.splits import TaskVectorSplit, split_task
from mechcopy.tasks.task import Task

RESID_SITE = "blocks.{layer}.hook_resid_post"


def resid_site(layer: int) -> str:
    """The hook name of the residual stream after layer `layer`."""
    return RESID_SITE.format(layer=layer)


@dataclass(frozen=True)
class TaskVectorConfig:
    """Every parameter of a task-vector run (recorded in its result)."""

    shots: int = 4          # demos per extraction / ICL prompt
    n_extract: int = 5      # extraction prompts (different demos, different dummy queries) averaged
    n_dev: int = 20         # zero-shot dev prompts for choosing the layer
    n_test: int = 50        # zero-shot test prompts
    seed: int = 0
    layers: tuple[int, ...] | None = None   # default: every layer

    MINIMUM: ClassVar[dict[str, int]] = {"shots": 1, "n_extract": 1, "n_dev": 1, "n_test": 1, "seed": 0, "layers": 0}

    def __post_init__(self):
        check_minimums(self)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "TaskVectorConfig":
        return cls(**{f.name: as_tuples(obj[f.name]) for f in fields(cls) if f.name in obj})

    def check(self, model: HookedModel) -> None:
        """Refuse layers the model does not have."""
        n = model.cfg.n_layers
        bad = [layer for layer in self.layers or () if layer >= n]
        if bad:
            raise IndexError(f"layers {bad} out of range: the model has {n} layers (0..{n - 1})")

    def split(self, task, tokenizer) -> TaskVectorSplit:
        """The task's extraction, dev and test prompts at these sizes (`mechcopy.tasks.splits.split_task`)."""
        return split_task(task, tokenizer, self.shots, self.n_extract, self.n_dev, self.n_test, self.seed)


@dataclass(frozen=True)
class TaskVectorResult:
    """Task-vector accuracy by layer (dev), at the best layer (test), with baselines beside it."""

    task: str
    condition: str
    layers: tuple[int, ...]
    dev_accuracy: tuple[float, ...]          # per layer in `layers`
    best_layer: int
    test_accuracy: float
    test_accuracy_ci: tuple[float, float]
    copy_rate: float                         # wrong predictions equal to an extraction demo label, / n
    zero_shot_accuracy: float
    icl_accuracy: float
    icl_copy_rate: float
    n_dev: int
    n_test: int
    n_dropped: int
    predictions: tuple[str, ...]             # test predictions under injection at best_layer
    config: TaskVectorConfig = field(default_factory=TaskVectorConfig)
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def any_layer_works(self) -> bool:
        """Whether a task vector after some layer gets any dev prompt right (else `best_layer` is only
        the first layer of the sweep, not a layer that works)."""
        return max(self.dev_accuracy, default=0.0) > 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "TaskVectorResult":
        values = {f.name: as_tuples(obj[f.name]) for f in fields(cls) if f.name in obj}
        if "config" in values:
            values["config"] = TaskVectorConfig.from_json(values["config"])
        return cls(**values)


# ---------------------------------------------------------------------------------------------------
# extraction and injection


def extract(
    model: HookedModel, prompts: Sequence, layers: Sequence[int] | None = None, fwd_hooks=(),
) -> Float[Tensor, "layer d_model"]:
    """Mean residual stream at each prompt's last token after each layer (rows follow `layers`).

    One cached forward pass per prompt collects every layer (`run_with_cache` with a names_filter);
    `fwd_hooks` (e.g. pruning) are active during it.
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    names = [resid_site(l) for l in layers]
    wanted = set(names)
    total = None
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        for p in prompts:
            text = p if isinstance(p, str) else p.text
            tokens = arch_of(model).tokens(model, text, what="an extraction prompt")
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in wanted)
            vec = torch.stack([cache[n][0, -1] for n in names])
            total = vec if total is None else total + vec
    if total is None:
        raise ValueError("extract needs at least one prompt")
    return total / len(prompts)


def injection_hooks(vector: Float[Tensor, "d_model"], layer: int, position: int = -1) -> list:
    """The forward hook that overwrites the residual stream after `layer` at `position` with `vector`."""
    return [(resid_site(layer), inject_vector(vector, position))]


def _accuracy(model: HookedModel, prompts, hooks, condition, seed) -> Any:
    return evaluate(model, list(prompts), fwd_hooks=list(hooks), condition=condition, seed=seed)


def layer_sweep(model: HookedModel, vectors: Float[Tensor, "layer d_model"], layers: Sequence[int], prompts: Sequence,
                fwd_hooks=(), seed: int = 0, progress: bool = False) -> list[float]:
    """Accuracy on zero-shot `prompts` with vectors[i] injected after layers[i], for each i."""
    accs = []
    for i, layer in enumerate(tqdm(list(layers), desc="layer sweep", disable=not progress, leave=False)):
        res = _accuracy(model, prompts, list(fwd_hooks) + injection_hooks(vectors[i], layer), "sweep", seed)
        accs.append(float(res.accuracy))
    return accs


def task_vector_experiment(
    model: HookedModel, task, config: TaskVectorConfig = TaskVectorConfig(), fwd_hooks=(), condition: str = "unpruned",
    split: TaskVectorSplit | None = None, progress: bool = False,
) -> TaskVectorResult:
    """Extract the task's vector at every layer, choose the layer on dev, score on test, with baselines.

    `fwd_hooks` (e.g. pruning hooks) are active in extraction, injection and both baselines.
    """
    split = split or config.split(task, model.tokenizer)
    layers = list(range(model.cfg.n_layers)) if config.layers is None else list(config.layers)
    vectors = extract(model, split.extraction, layers, fwd_hooks)
    dev_acc = layer_sweep(model, vectors, layers, split.dev, fwd_hooks, config.seed, progress)
    best_i = max(range(len(layers)), key=lambda i: (dev_acc[i], -i))   # ties: the earliest layer
    best = layers[best_i]
    test = _accuracy(model, split.test, list(fwd_hooks) + injection_hooks(vectors[best_i], best),
                     condition, config.seed)
    zero = _accuracy(model, split.test, fwd_hooks, condition, config.seed)
    icl = _accuracy(model, split.test_icl, fwd_hooks, condition, config.seed)
    return TaskVectorResult(
        task=task.name, condition=condition, layers=tuple(layers), dev_accuracy=tuple(dev_acc),
        best_layer=best, test_accuracy=float(test.accuracy),
        test_accuracy_ci=(float(test.accuracy_ci[0]), float(test.accuracy_ci[1])),
        copy_rate=copy_rate(test.predictions, split.test, split.extraction_labels),
        zero_shot_accuracy=float(zero.accuracy), icl_accuracy=float(icl.accuracy),
        icl_copy_rate=float(icl.copy_rate), n_dev=len(split.dev), n_test=len(split.test),
        n_dropped=len(split.dropped), predictions=tuple(test.predictions), config=config,
        model=model_fingerprint(model),
    )


def run_task_vectors(model: HookedModel, tasks, config: TaskVectorConfig = TaskVectorConfig(),
                     neurons: Components | None = None, progress: bool = True) -> list[TaskVectorResult]:
    """Unpruned results for every task, and pruned ones (hooks in extraction and injection) if `neurons`
    holds any. Every task's split is built and checked against the context before any work."""
    if not isinstance(config, TaskVectorConfig):
        raise TypeError(f"config must be a TaskVectorConfig, got {type(config).__name__}")
    tasks = check_items(tasks, Task, "tasks", "mechcopy.tasks.load_tasks('antonyms,to_upper')")
    config.check(model)
    conditions: list[tuple[str, list]] = [("unpruned", [])]
    if neurons is not None:
        as_components(neurons, "neurons").check(model)
        if neurons.pairs:
            conditions.append(("pruned", pruning_hooks(model, neurons)))
    splits = [config.split(task, model.tokenizer) for task in tasks]
    for split in splits:
        check_context(model, split.extraction + split.dev + split.test + split.test_icl)
    out = []
    for task, split in zip(tasks, splits):
        for name, hooks in conditions:
            out.append(task_vector_experiment(model, task, config, hooks, name, split, progress))
    return out
