"""Function vectors after Todd et al. (ICLR 2024): the heads whose mean task-conditioned output restores
the task on shuffled-label prompts, and the sum of their outputs as a vector added to zero-shot prompts.

Steps, on one task's task-vector split (`mechcopy.tasks.splits`, the same prompts as Hendel task vectors,
so the two curves are side by side):

1. **Mean head outputs** (`mean_head_outputs`): every head's `z` at the last position, averaged over
   the task's few-shot prompts (the extraction prompts): `pruning.component_means(..., "head", "last")`.
2. **Indirect effect** (`indirect_effects`): on shuffled-label prompts (the demo labels permuted among
   the demos, `shuffled_prompts`), head (l, h)'s `z` at the last position is set to its mean,
   one head at a time, and the probability of the gold answer's first token is read at the last
   position. A head's average indirect effect (AIE) is the mean over prompts of P(gold | patched) -
   P(gold | shuffled). All heads of a layer run in one batch, one row group per head
   (`hooks.ablate_by_group` with the mean as the added value at the last position).
3. **The function vector** (`function_vector`): the sum over the top heads by AIE of mean z @ W_O[l, h]
   (no bias), a vector in the residual stream. On models with a norm after the attention (Gemma 3) this
   is what the heads write before that norm: Todd et al.'s definition, not their exact contribution.
4. **Adding it** (`add_hooks`, `hooks.add_vector`) to the residual stream after layer L
   (`blocks.{L}.hook_resid_post`, as task vectors are injected) at the last position of zero-shot
   prompts, for every L: accuracy per layer (`function_vector_experiment`), beside the Hendel task
   vector's curve on the same prompts. Pruning hooks (`fwd_hooks`) are active throughout, as in
   `task_vectors`, so a pruned curve is the pruned model's.

Heads only exist on attention models: a Mamba model is refused with one line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechcopy.arch import HookedModel, arch_of
from mechcopy.arch.transformer import transformer_block
from mechcopy.components import Components
from mechcopy.conditions import Means
from mechcopy.fingerprint import model_fingerprint
from mechcopy.heads import head_site, require_heads
from mechcopy.hooks import Hook, ablate_by_group, add_vector
from mechcopy.io import as_tuples
from mechcopy.progress import tqdm
from mechcopy.pruning import component_means, pruning_hooks
from mechcopy.task_vectors import TaskVectorConfig, resid_site, task_vector_experiment
from mechcopy.tasks.outcomes import copy_rate


def mean_head_outputs(model: HookedModel, prompts: Sequence, fwd_hooks=(), reference: str = "") -> Means:
    """Every head's mean `z` at the last position of `prompts` (few-shot prompts of one task), under
    `fwd_hooks`: `Means` of the head kind, [n_heads, d_head] per layer."""
    require_heads(model, "function vectors")
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        return component_means(model, list(prompts), "head", "last", reference or f"{len(prompts)} task prompts")


def _gold_probs(model: HookedModel, prompts: Sequence, hooks: list[tuple[str, Hook]], groups: int,
                ) -> Float[Tensor, "groups prompts"]:
    """P(gold first token) at the last position of each prompt, in each of `groups` row groups (the
    prompts repeated group-major), under `hooks`."""
    out = []
    arch = arch_of(model)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        for p in prompts:
            tokens = arch.tokens(model, p.text, what="a shuffled-label prompt")
            probs = arch.last_logits(model, tokens.expand(groups, -1)).float().softmax(-1)
            out.append(probs[:, int(p.answer_ids[0])])
    return torch.stack(out, 1)


def indirect_effects(model: HookedModel, shuffled: Sequence, means: Means, layers: Sequence[int] | None = None,
                     fwd_hooks=(), progress: bool = False) -> Float[Tensor, "layers heads"]:
    """Each head's average indirect effect: mean over `shuffled` prompts of P(gold) with the head's `z`
    at the last position set to `means` minus P(gold) without (rows follow `layers`, default all)."""
    require_heads(model, "function vectors")
    if not shuffled:
        raise ValueError("indirect_effects needs shuffled-label prompts")
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    n, d_head = arch_of(model).attention_shape(model)
    base = _gold_probs(model, shuffled, list(fwd_hooks), 1)[0]
    rows = []
    for layer in tqdm(layers, desc="indirect effects", disable=not progress):
        scale = 1 - torch.eye(n)                                          # group h: head h replaced
        add = torch.zeros(n, n, d_head)
        add[torch.arange(n), torch.arange(n)] = means[layer].float()
        hook = ablate_by_group(scale, add, [True] * n, axis=-2)
        probs = _gold_probs(model, shuffled, list(fwd_hooks) + [(head_site(model, layer), hook)], n)
        rows.append((probs - base).mean(1))
    return torch.stack(rows)


def top_heads(effects: Float[Tensor, "layers heads"], k: int, layers: Sequence[int] | None = None,
              ) -> tuple[tuple[int, int], ...]:
    """The k heads with the largest indirect effect, as (layer, head), largest first."""
    layers = list(range(effects.shape[0])) if layers is None else list(layers)
    if not 0 < k <= effects.numel():
        raise ValueError(f"k must be in 1..{effects.numel()}, got {k}")
    idx = effects.flatten().topk(k).indices
    return tuple((layers[int(i) // effects.shape[1]], int(i) % effects.shape[1]) for i in idx)


def function_vector(model: HookedModel, means: Means, heads: Sequence[tuple[int, int]]) -> Float[Tensor, "d_model"]:
    """The sum over `heads` of their mean output through `W_O` (no bias): mean z[l, h] @ W_O[l, h]."""
    require_heads(model, "function vectors")
    out = torch.zeros(model.cfg.d_model)
    for layer, head in heads:
        W_O = transformer_block(model, layer).attn.W_O[head]
        out = out + (means[layer][head].to(W_O) @ W_O).detach().float().cpu()
    return out


def add_hooks(vector: Float[Tensor, "d_model"], layer: int, position: int = -1) -> list[tuple[str, Hook]]:
    """The forward hook that adds `vector` to the residual stream after `layer` at `position`."""
    return [(resid_site(layer), add_vector(vector, position))]


def shuffled_prompts(prompts: Sequence, tokenizer, seed: int = 0) -> list:
    """Each prompt with its demo labels permuted among its demos (Todd et al.'s shuffled labels: a random
    order that differs from the original, labels may repeat, so not always a derangement as
    `tasks.pairs.corrupt_prompt` requires); prompts whose demo labels are all equal are left out."""
    import random

    from mechcopy.tasks.prompts import make_prompt

    rng = random.Random(seed)
    out = []
    for p in prompts:
        labels = [y for _, y in p.demos]
        if len(set(labels)) < 2:
            continue
        perm = labels[:]
        while perm == labels:
            rng.shuffle(perm)
        out.append(make_prompt([(x, y) for (x, _), y in zip(p.demos, perm)], (p.query, p.answer), tokenizer,
                               task=p.task))
    return out


@dataclass(frozen=True)
class FunctionVectorResult:
    """A task's function vector: the top heads by AIE, and zero-shot accuracy per layer with the vector
    added, beside the Hendel task vector's per-layer accuracy on the same dev prompts."""

    task: str
    condition: str
    heads: tuple[tuple[int, int], ...]
    aie: tuple                                  # [layers][heads]
    layers: tuple[int, ...]
    fv_dev_accuracy: tuple[float, ...]          # per layer: the function vector added
    tv_dev_accuracy: tuple[float, ...]          # per layer: the Hendel task vector injected
    best_layer: int
    fv_test_accuracy: float
    fv_copy_rate: float
    zero_shot_accuracy: float
    icl_accuracy: float
    n_shuffled: int
    norm: float
    config: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "FunctionVectorResult":
        return cls(**{f.name: as_tuples(obj[f.name]) if f.name not in ("config", "model") else obj[f.name]
                      for f in fields(cls) if f.name in obj})


def function_vector_experiment(model: HookedModel, task, config: TaskVectorConfig = TaskVectorConfig(),
                               n_heads: int = 10, fwd_hooks=(), condition: str = "unpruned",
                               progress: bool = False) -> FunctionVectorResult:
    """Means and AIE on the task's extraction prompts (and their shuffled-label copies), the function
    vector of the top `n_heads` heads, its per-layer dev accuracy and its test accuracy at the best
    dev layer, beside the task vector (`task_vectors.task_vector_experiment` on the same split)."""
    require_heads(model, "function vectors")
    config.check(model)
    split = config.split(task, model.tokenizer)
    layers = list(range(model.cfg.n_layers)) if config.layers is None else list(config.layers)
    means = mean_head_outputs(model, split.extraction, fwd_hooks, f"{task.name} extraction prompts")
    shuffled = shuffled_prompts(split.extraction, model.tokenizer, config.seed)
    aie = indirect_effects(model, shuffled, means, fwd_hooks=fwd_hooks, progress=progress)
    heads = top_heads(aie, min(n_heads, aie.numel()))
    fv = function_vector(model, means, heads)
    fv_acc = []
    for layer in tqdm(layers, desc="function vector sweep", disable=not progress, leave=False):
        res = _evaluate(model, split.dev, list(fwd_hooks) + add_hooks(fv, layer), config.seed)
        fv_acc.append(float(res.accuracy))
    best = layers[max(range(len(layers)), key=lambda i: (fv_acc[i], -i))]
    test = _evaluate(model, split.test, list(fwd_hooks) + add_hooks(fv, best), config.seed)
    tv = task_vector_experiment(model, task, config, fwd_hooks, condition, split)
    return FunctionVectorResult(
        task=task.name, condition=condition, heads=heads, aie=tuple(map(tuple, aie.tolist())), layers=tuple(layers),
        fv_dev_accuracy=tuple(fv_acc), tv_dev_accuracy=tuple(tv.dev_accuracy), best_layer=best,
        fv_test_accuracy=float(test.accuracy),
        fv_copy_rate=copy_rate(test.predictions, split.test, split.extraction_labels),
        zero_shot_accuracy=tv.zero_shot_accuracy, icl_accuracy=tv.icl_accuracy, n_shuffled=len(shuffled),
        norm=float(fv.norm()), config={**config.to_json(), "n_heads": n_heads}, model=model_fingerprint(model))


def _evaluate(model: HookedModel, prompts, hooks, seed: int):
    from mechcopy.evaluation import evaluate

    return evaluate(model, list(prompts), fwd_hooks=list(hooks), condition="function-vector", seed=seed)


def run_function_vectors(model: HookedModel, tasks, config: TaskVectorConfig = TaskVectorConfig(), n_heads: int = 10,
                         components: Components | None = None, progress: bool = True) -> list[FunctionVectorResult]:
    """Unpruned results for every task, and pruned ones (hooks throughout) if `components` holds any."""
    conditions: list[tuple[str, list]] = [("unpruned", [])]
    if components is not None:
        components.check(model)
        if components.pairs:
            conditions.append(("pruned", pruning_hooks(model, components)))
    return [function_vector_experiment(model, task, config, n_heads, hooks, name, progress)
            for task in tasks for name, hooks in conditions]
