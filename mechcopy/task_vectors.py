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

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechcopy.hooks import inject_vector

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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TaskVectorSplit:
    """The prompts of one task-vector experiment; the query sets are disjoint from the extraction pairs."""

    task: str
    extraction: tuple        # k-shot prompts with dummy queries (ICLPrompt)
    dev: tuple               # zero-shot prompts
    test: tuple              # zero-shot prompts
    test_icl: tuple          # k-shot prompts with the test queries (demos from the extraction pool)
    dropped: tuple[tuple[tuple[str, str], str], ...] = ()

    @property
    def extraction_labels(self) -> frozenset[str]:
        """The labels of the extraction prompts' demos (what a copying prediction would repeat)."""
        return frozenset(lab.strip() for p in self.extraction for lab in p.demo_labels)


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
    config: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# prompts


def split_task(task, tokenizer, config: TaskVectorConfig = TaskVectorConfig()) -> TaskVectorSplit:
    """Shuffle the task's pairs (seeded) into an extraction pool and dev/test queries, and build prompts.

    The pool (shots + n_extract pairs) gives the extraction prompts (prompt i: dummy query pool[i],
    `shots` demos drawn from the rest of the pool) and the ICL baseline's demos. Dev and test queries
    come from the remaining pairs, keeping only those whose zero-shot and k-shot prompts both tokenise
    with a single-token answer, so every condition sees the same queries.
    """
    from mechcopy.tasks.prompts import make_prompt

    k, n_pool = config.shots, config.shots + config.n_extract
    rng = random.Random(config.seed)
    pairs = list(dict.fromkeys(task.pairs))
    rng.shuffle(pairs)
    if len(pairs) < n_pool + 2:
        raise ValueError(f"task {task.name!r} has {len(pairs)} distinct pairs; task vectors with "
                         f"shots={k}, n_extract={config.n_extract} need at least {n_pool + 2}")
    dropped: list[tuple[tuple[str, str], str]] = []

    def single(pair, demos):
        try:
            p = make_prompt(demos, pair, tokenizer, task=task.name)
        except ValueError as e:
            dropped.append((pair, str(e)))
            return None
        if len(p.answer_ids) != 1:
            dropped.append((pair, "multi-token answer (task vectors use single-token answers)"))
            return None
        return p

    # extraction: take pool pairs as dummy queries until n_extract prompts tokenise
    pool, rest = pairs[:n_pool], pairs[n_pool:]
    extraction = []
    for i, query in enumerate(pool):
        if len(extraction) == config.n_extract:
            break
        others = [p for p in pool if p != query]
        try:
            extraction.append(make_prompt(rng.sample(others, k), query, tokenizer, task=task.name))
        except ValueError as e:
            dropped.append((query, str(e)))
    if not extraction:
        raise ValueError(f"task {task.name!r}: no extraction prompt could be built ({dropped[:3]})")

    queries = []
    for pair in rest:
        if len(queries) == config.n_dev + config.n_test:
            break
        zs = single(pair, ())
        if zs is None:
            continue
        icl = single(pair, rng.sample(pool, k))
        if icl is not None:
            queries.append((zs, icl))
    if len(queries) < 2:
        raise ValueError(f"task {task.name!r}: only {len(queries)} usable queries with single-token answers "
                         f"after the extraction pool; use a task with more pairs")
    n_dev = min(config.n_dev, len(queries) // 2) if len(queries) < config.n_dev + config.n_test else config.n_dev
    dev, test = queries[:n_dev], queries[n_dev:]
    return TaskVectorSplit(task.name, tuple(extraction), tuple(z for z, _ in dev), tuple(z for z, _ in test),
                           tuple(i for _, i in test), tuple(dropped))


# ---------------------------------------------------------------------------------------------------
# extraction and injection


def extract(
    model, prompts: Sequence, layers: Sequence[int] | None = None, fwd_hooks=(),
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
            _, cache = model.run_with_cache(model.to_tokens(text), names_filter=lambda n: n in wanted)
            vec = torch.stack([cache[n][0, -1] for n in names])
            total = vec if total is None else total + vec
    if total is None:
        raise ValueError("extract needs at least one prompt")
    return total / len(prompts)


def injection_hooks(vector: Float[Tensor, "d_model"], layer: int, position: int = -1) -> list:
    """The forward hook that overwrites the residual stream after `layer` at `position` with `vector`."""
    return [(resid_site(layer), inject_vector(vector, position))]


def _accuracy(model, prompts, hooks, condition, seed) -> Any:
    from mechcopy.evaluation import evaluate

    return evaluate(model, list(prompts), fwd_hooks=list(hooks), condition=condition, seed=seed)


def copy_rate(predictions: Sequence[str], prompts: Sequence, labels: frozenset[str]) -> float:
    """Share of predictions that are wrong and equal one of `labels` (compared after strip())."""
    if not predictions:
        return float("nan")
    hits = sum(pred.strip() in labels and pred.strip() != p.answer.strip()
               for pred, p in zip(predictions, prompts))
    return hits / len(predictions)


def layer_sweep(model, vectors: Float[Tensor, "layer d_model"], layers: Sequence[int], prompts: Sequence,
                fwd_hooks=(), seed: int = 0, progress: bool = False) -> list[float]:
    """Accuracy on zero-shot `prompts` with vectors[i] injected after layers[i], for each i."""
    from tqdm.auto import tqdm

    accs = []
    for i, layer in enumerate(tqdm(list(layers), desc="layer sweep", disable=not progress, leave=False)):
        res = _accuracy(model, prompts, list(fwd_hooks) + injection_hooks(vectors[i], layer), "sweep", seed)
        accs.append(float(res.accuracy))
    return accs


def task_vector_experiment(
    model, task, config: TaskVectorConfig = TaskVectorConfig(), fwd_hooks=(), condition: str = "unpruned",
    split: TaskVectorSplit | None = None, progress: bool = False,
) -> TaskVectorResult:
    """Extract the task's vector at every layer, choose the layer on dev, score on test, with baselines.

    `fwd_hooks` (e.g. pruning hooks) are active in extraction, injection and both baselines.
    """
    from mechcopy.sites import model_fingerprint

    split = split or split_task(task, model.tokenizer, config)
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
        test_accuracy_ci=tuple(float(x) for x in test.accuracy_ci),
        copy_rate=copy_rate(test.predictions, split.test, split.extraction_labels),
        zero_shot_accuracy=float(zero.accuracy), icl_accuracy=float(icl.accuracy),
        icl_copy_rate=float(icl.copy_rate), n_dev=len(split.dev), n_test=len(split.test),
        n_dropped=len(split.dropped), predictions=tuple(test.predictions), config=config.to_json(),
        model=model_fingerprint(model),
    )


def run_task_vectors(model, tasks, config: TaskVectorConfig = TaskVectorConfig(), neurons=None,
                     progress: bool = True) -> list[TaskVectorResult]:
    """Unpruned results for every task, and pruned ones (hooks in extraction and injection) if `neurons`."""
    conditions = [("unpruned", [])]
    if neurons is not None:
        from mechcopy.pruning import pruning_hooks

        neurons.check(model)
        conditions.append(("pruned", pruning_hooks(model, neurons)))
    out = []
    for task in tasks:
        split = split_task(task, model.tokenizer, config)
        for name, hooks in conditions:
            out.append(task_vector_experiment(model, task, config, hooks, name, split, progress))
    return out


# ---------------------------------------------------------------------------------------------------
# CLI


def _run(args) -> int:
    import time

    from mechcopy.models import load_model
    from mechcopy.sites import NeuronSet, model_fingerprint, write_json_atomic
    from mechcopy.tasks import load_tasks

    t0 = time.time()
    model = load_model(args.model)
    tasks = load_tasks(args.tasks)
    neurons = NeuronSet.load(args.prune) if args.prune else None
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    config = TaskVectorConfig(shots=args.shots, n_extract=args.n_extract, n_dev=args.n_dev, n_test=args.n,
                              seed=args.seed, layers=layers)
    results = []
    for task in tasks:
        try:
            res = run_task_vectors(model, [task], config, neurons)
        except ValueError as e:
            print(f"{task.name}: skipped ({e})")
            continue
        for r in res:
            results.append(r)
            print(f"{r.task:28s} {r.condition:9s} best layer {r.best_layer:2d}  task vector {r.test_accuracy:.2f}  "
                  f"copy {r.copy_rate:.2f}  zero-shot {r.zero_shot_accuracy:.2f}  ICL {r.icl_accuracy:.2f}  "
                  f"(n={r.n_test})")
    out = {"command": "task-vectors", "model": model_fingerprint(model), "config": config.to_json(),
           "tasks": args.tasks, "prune": args.prune, "neurons": len(neurons) if neurons else 0,
           "seconds": round(time.time() - t0, 1), "results": [r.to_json() for r in results]}
    if args.out:
        write_json_atomic(args.out, out)
        print(f"-> {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("task-vectors", help="task vectors (Hendel et al.): accuracy by layer, unpruned vs pruned")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="all", help="all | name,name | FILE.json")
    p.add_argument("--prune", help="neurons.json (from `mechcopy find`): also run with these neurons pruned")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--n", type=int, default=50, help="zero-shot test prompts per task")
    p.add_argument("--n-dev", type=int, default=20, help="zero-shot dev prompts for choosing the layer")
    p.add_argument("--n-extract", type=int, default=5, help="extraction prompts averaged into the vector")
    p.add_argument("--layers", help="comma-separated layers to sweep (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results JSON")
    p.set_defaults(func=_run)
