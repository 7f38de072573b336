"""How hard each head or MLP neuron pushes the answer toward one of its task's labels, directly, and a
UniBias-style score of the components that push toward one label consistently.

**The push** (`label_push`). For each prompt (an `ICLPrompt` with its task's `label_space`), one clean
run with a cache, and at the last position (whose next-token distribution scores a label's first
token) what each component writes straight into the residual stream: a head's `z @ W_O` (`heads.head_writes`),
a neuron's activation x its output direction (`Arch.neuron_direction`, a row of `W_out`). On models
that normalise a sublayer's output again before the residual add (Gemma 3: `ln1_post`, `ln2_post`,
`cfg.use_normalization_before_and_after`) the write goes through that norm with its scale frozen at
the value the whole sublayer output gave it. Then the final norm, its scale frozen at the clean run
(`heads.frozen_norm`, `ln_final.hook_scale`), and the unembedding of each label's first token (the
tokens that follow the prompt as the study's label scoring tokenises them, `scoring.label_ids`);
centred over the prompt's labels (their mean subtracted), so only what favours one label over the
others is left. With the scales frozen every path is linear: per layer the components' pushes plus
the layer's bias term (`b_O` or `b_out`, through the post-sublayer norm, plus that norm's own bias)
equal the push of the layer's `hook_attn_out` / `hook_mlp_out` exactly (tested), and every term
together with the embedding and the constants equals the model's centred label logits. Indirect
effects (through later layers) are not in a component's push. Labels that share a first token get
the same push.

**The score** (`unibias_scores`; after UniBias, Zhou et al. 2024, which masks the attention heads and
MLP neurons whose direct label push is related to the labels, biased toward one and of low variance
over prompts; adapted here to a selection made on the copy probe only). Per component and task t:
m_t = the mean over t's prompts of the centred push [labels]; j* = argmax m_t, the label it favours;
b_t = m_t[j*] (its bias toward that label, >= 0 as the push is centred); s_t = the standard deviation
(population, ddof 0) over t's prompts of its push onto j*. The score is the mean over tasks of b_t
where b_t >= s_t (it favours that label consistently) and 0 elsewhere. `mechcopy.selection.select(
scores, "global", k=...)` then gives the top k components of the push's kind.

Transformers only: a Mamba model (no heads; its neurons are not read through `W_out`) and a model
with soft-capped output logits (a logit is then not a sum of direct effects) are refused, with one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechcopy.arch import HookedModel, arch_of
from mechcopy.arch.base import Cache
from mechcopy.arch.transformer import _mlp, transformer_block, transformer_cfg
from mechcopy.attribution import CopyScores
from mechcopy.components import component_kind
from mechcopy.fingerprint import model_fingerprint
from mechcopy.heads import (final_norm, frozen_norm, head_cache_names, head_writes, require_direct_effects,
                            require_heads, through_post_norm)
from mechcopy.progress import tqdm

#: the component kinds a push is computed for
PUSH_KINDS = ("head", "neuron")


@dataclass(frozen=True)
class LabelPush:
    """Direct, label-centred pushes at the last position of each prompt.

    `push[p, l, c, j]`: component c of layer l (a head, or a neuron) onto label j of prompt p's task
    (`labels[p][j]`, first token `label_ids[p][j]`), centred over those labels; NaN for j >= the task's
    number of labels (the tensor is padded to the largest label set). `bias[p, l, j]`: the layer's
    bias term (`b_O` or `b_out`, through a post-sublayer norm, plus that norm's bias), centred alike,
    so that `push[p, l].sum(0) + bias[p, l]` is the push of the layer's whole sublayer output.
    """

    push: Float[Tensor, "prompts layers width labels"]
    bias: Float[Tensor, "prompts layers labels"]
    tasks: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]
    label_ids: tuple[tuple[int, ...], ...]
    kind: str
    model: dict[str, Any]

    def of(self, prompt: int) -> Float[Tensor, "layers width n_labels"]:
        """Prompt `prompt`'s push over its own labels (no padding)."""
        return self.push[prompt, ..., :len(self.labels[prompt])]

    def to_json(self) -> dict[str, Any]:
        """Each prompt's push and bias over its own labels (lists of different lengths, no NaN)."""
        return {"kind": self.kind, "model": self.model, "tasks": list(self.tasks),
                "labels": [list(ls) for ls in self.labels], "label_ids": [list(ids) for ids in self.label_ids],
                "push": [self.of(i).tolist() for i in range(len(self.tasks))],
                "bias": [self.bias[i, :, :len(ls)].tolist() for i, ls in enumerate(self.labels)]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LabelPush":
        most = max(len(ls) for ls in d["labels"])
        push = torch.stack([_pad(torch.tensor(p, dtype=torch.float32), most) for p in d["push"]])
        bias = torch.stack([_pad(torch.tensor(b, dtype=torch.float32), most) for b in d["bias"]])
        return cls(push, bias, tuple(d["tasks"]), tuple(tuple(ls) for ls in d["labels"]),
                   tuple(tuple(ids) for ids in d["label_ids"]), d["kind"], d["model"])


def _pad(x: Tensor, n: int) -> Tensor:
    """`x` [..., m] padded with NaN to [..., n]."""
    return torch.cat([x, x.new_full((*x.shape[:-1], n - x.shape[-1]), float("nan"))], -1)


def _check(model: HookedModel, prompts: Sequence, kind: str) -> None:
    if kind not in PUSH_KINDS:
        raise ValueError(f"unknown kind {kind!r}: label_push reads {' or '.join(PUSH_KINDS)} components")
    if kind == "head":
        require_heads(model, "label_push over heads")
    elif not arch_of(model).has_attention:
        raise ValueError(f"label_push reads neurons through a transformer MLP's W_out; a {arch_of(model).name} "
                         "model's neurons are not written that way")
    require_direct_effects(model, "label_push")
    if not prompts:
        raise ValueError("no prompts to read the label push on")
    for i, p in enumerate(prompts):
        if len(getattr(p, "label_space", ())) < 2:
            raise ValueError(f"prompt {i} (task {getattr(p, 'task', '?')!r}) has no label set of two or more labels "
                             "(`label_space`): build the prompts with the copy probe or a task's labels")


def _first_label_tokens(model: HookedModel, prompt) -> tuple[int, ...]:
    """The first token of each of the prompt's labels, as the study's label scoring tokenises them."""
    from mechcopy.scoring import label_ids

    return tuple(int(ids[0]) for ids in label_ids(model.tokenizer, prompt, prompt.label_space))


def post_mlp_norm(model: HookedModel, layer: int):
    """The norm applied to layer `layer`'s MLP output before the residual add (Gemma 3's `ln2_post`),
    or None."""
    if not transformer_cfg(model).use_normalization_before_and_after:
        return None
    return transformer_block(model, layer).ln2_post


def neuron_writes(model: HookedModel, cache: Cache, layer: int, directions: Float[Tensor, "neurons d_model"],
                  position: int = -1) -> tuple[Float[Tensor, "batch neurons d_model"], Float[Tensor, "batch d_model"]]:
    """What each neuron of `layer` and the MLP's output bias add to the residual stream at `position`
    (the neuron-side `heads.head_writes`): activation x `directions` (the layer's rows of
    `Arch.neuron_direction`) and `b_out`; on a model with a post-MLP norm, both through it with its
    scale frozen at the value the whole MLP output gave it, and the norm's bias added to the bias term,
    so neurons + bias = `hook_mlp_out` exactly."""
    act = cache[arch_of(model).neuron_site(model, layer)][:, position]            # [batch, neurons]
    per_neuron = act.to(directions.dtype)[..., None] * directions
    b_out = _mlp(transformer_block(model, layer)).b_out
    bias = b_out.expand(act.shape[0], -1)
    return through_post_norm(post_mlp_norm(model, layer), f"blocks.{layer}.ln2_post.hook_scale", cache, position,
                             per_neuron, bias)


def _neuron_cache_names(model: HookedModel) -> list[str]:
    names = []
    for l in range(model.cfg.n_layers):
        names.append(arch_of(model).neuron_site(model, l))
        post = post_mlp_norm(model, l)
        if post is not None and hasattr(post, "hook_scale"):
            names.append(f"blocks.{l}.ln2_post.hook_scale")
    return names


def label_push(model: HookedModel, prompts: Sequence, kind: str, progress: bool = False) -> LabelPush:
    """Every head's (`kind="head"`) or MLP neuron's (`kind="neuron"`) direct push onto each label of its
    prompt's task at the last position, centred over the labels; see the module docstring and `LabelPush`."""
    _check(model, prompts, kind)
    prompts = list(prompts)
    arch, n_layers = arch_of(model), model.cfg.n_layers
    width = component_kind(kind).width(model)
    names = set(head_cache_names(model) if kind == "head" else _neuron_cache_names(model))
    final = final_norm(model)
    if hasattr(final, "hook_scale"):
        names.add("ln_final.hook_scale")
    directions: list[Tensor] = []      # neurons: the rows of W_out, layer by layer, once per call
    if kind == "neuron":
        directions = [torch.stack([arch.neuron_direction(model, l, i) for i in range(width)]) for l in range(n_layers)]
    labels = tuple(tuple(p.label_space) for p in prompts)
    most = max(len(ls) for ls in labels)
    ids = tuple(_first_label_tokens(model, p) for p in prompts)
    pushes, biases = [], []
    W_U = model.unembed.W_U
    for p, lids in tqdm(list(zip(prompts, ids)), desc=f"label push ({kind}s)", disable=not progress):
        with torch.no_grad():
            _, cache = model.run_with_cache(arch.tokens(model, p.text, what=f"prompt of task {p.task!r}"),
                                            names_filter=lambda n: n in names)
            scale = cache["ln_final.hook_scale"][:, -1] if "ln_final.hook_scale" in names else None
            unembed = W_U[:, list(lids)].float()                                           # [d_model, labels]

            def onto_labels(x: Tensor) -> Tensor:
                """[1, ..., d_model] written at the last position -> [..., labels], centred."""
                s = None if scale is None else scale.reshape(1, *([1] * (x.ndim - 2)), 1)
                y = frozen_norm(final, s, x)[0].float() @ unembed
                return y - y.mean(-1, keepdim=True)

            per_layer, bias_layer = [], []
            for l in range(n_layers):
                parts, bias = (head_writes(model, cache, l) if kind == "head"
                               else neuron_writes(model, cache, l, directions[l]))
                per_layer.append(onto_labels(parts))
                bias_layer.append(onto_labels(bias))
        pushes.append(_pad(torch.stack(per_layer).cpu(), most))
        biases.append(_pad(torch.stack(bias_layer).cpu(), most))
    return LabelPush(torch.stack(pushes), torch.stack(biases), tuple(p.task for p in prompts), labels, ids, kind,
                     model_fingerprint(model))


def unibias_scores(push: LabelPush) -> CopyScores:
    """The UniBias-style score of every component of `push` [layers, width] (module docstring): the mean
    over tasks of each task's bias toward its favoured label where that bias is at least its standard
    deviation over the task's prompts, else 0. The scores' kind is the push's, so
    `selection.select(scores, "global", k=k)` gives `Components` of that kind."""
    by_task: dict[str, list[int]] = {}
    for i, t in enumerate(push.tasks):
        by_task.setdefault(t, []).append(i)
    per_task, n_biased = [], {}
    for task, rows in by_task.items():
        if len({push.labels[i] for i in rows}) > 1:
            raise ValueError(f"the prompts of task {task!r} do not share one label set: cannot average their pushes")
        x = push.push[rows, ..., :len(push.labels[rows[0]])].double()                # [n, layers, width, labels]
        m = x.mean(0)
        j = m.argmax(-1, keepdim=True)                                                 # [layers, width, 1]
        b = m.gather(-1, j)[..., 0]
        s = x.gather(-1, j.expand(x.shape[0], *j.shape))[..., 0].std(0, unbiased=False)
        kept = torch.where(b >= s, b, torch.zeros_like(b))
        per_task.append(kept)
        n_biased[task] = int((b >= s).sum())
    scores = torch.stack(per_task).mean(0).float()
    meta = {"model": push.model, "kind": push.kind, "method": "unibias", "n_prompts": len(push.tasks),
            "tasks": sorted(by_task), "n_consistent_by_task": n_biased}
    return CopyScores(scores, meta)

