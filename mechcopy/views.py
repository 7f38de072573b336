"""What the report shows of the model up close, computed where the model is and saved as JSON, so that
the report (`mechcopy.report`) reads files only.

`copy_error_views(model, find, components)` (the main job's `views` stage): a dev prompt of the run's own
probe (`method.prompts` with the run's `FindConfig`) on which the unpruned model copies a demo label
(else the first one), its tokens, attention patterns (where the architecture has attention) and the
evaluated neurons' activations over the tokens.

Which attention to show is data, not code: each `AttentionView` holds the (layer, head) pairs it shows,
says why they were chosen (`chosen_by`) and which token positions to mark (`marked`: the demo labels).
Two views today: every head of the layer with the most evaluated components, and the heads that write
most of logit(c) - logit(gold) directly on the prompt (`top_heads`: direct logit attribution, c the demo
label with the highest logit), their demo-label tokens marked. Other views (e.g. heads chosen by label
attention) go in the same list; the report draws every view the list holds.

The data functions (`attention_patterns`, `neuron_activations`) are also what `mechcopy.viz`'s
model-level views draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechcopy import method
from mechcopy.arch import HookedModel, arch_of
from mechcopy.components import Components
from mechcopy.evaluation import predict
from mechcopy.head_attribution import direct_logit_attribution
from mechcopy.heads import check_heads, require_heads
from mechcopy.io import as_tuples
from mechcopy.label_attention import label_positions
from mechcopy.method import FindConfig
from mechcopy.sites import neuron_site
from mechcopy.tasks.outcomes import copy_error
from mechcopy.tasks.prompts import ICLPrompt

DIGITS = 4                  # decimals kept of every pattern and activation saved
MAX_NEURONS = 50            # neurons shown (the largest activations on the prompt)
N_CANDIDATES = 16           # dev prompts tried for a copy error
TOP_HEADS = 3               # heads shown by direct logit attribution
MARK = "«{}»"               # how a marked token (a demo label's) is drawn


# ---------------------------------------------------------------- data from the model


def attention_patterns(model: HookedModel, text: str, heads: Sequence[tuple[int, int]]
                       ) -> Float[Tensor, "heads dest src"]:
    """The attention pattern of each (layer, head) on `text` (`blocks.{layer}.attn.hook_pattern`)."""
    arch = arch_of(model)
    if not arch.has_attention:
        raise ValueError(f"a {arch.name} model has no attention patterns; show its neurons' activations instead")
    n_heads = arch.attention_shape(model)[0]
    for layer, head in heads:
        if not 0 <= layer < model.cfg.n_layers:
            raise IndexError(f"layer {layer} out of range: the model has {model.cfg.n_layers} layers")
        if not 0 <= head < n_heads:
            raise IndexError(f"head {head} out of range: the model has {n_heads} heads per layer")
    names = {f"blocks.{layer}.attn.hook_pattern" for layer, _ in heads}
    with torch.no_grad():
        _, cache = model.run_with_cache(arch.tokens(model, text), names_filter=lambda n: n in names)
    return torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0, head] for layer, head in heads])


def neuron_activations(model: HookedModel, text: str, neurons: Components, max_neurons: int | None = None
                       ) -> tuple[Float[Tensor, "pos neurons"], list[str]]:
    """The neurons' activations over the tokens of `text`, read at each layer's neuron site, and their labels
    `L{layer}N{index}`; with more than `max_neurons`, the ones with the largest absolute activation."""
    neurons.check(model)
    by_layer = neurons.by_layer()
    sites = {neuron_site(model, layer): layer for layer in by_layer}
    with torch.no_grad():
        _, cache = model.run_with_cache(arch_of(model).tokens(model, text), names_filter=lambda n: n in sites)
    cols, labels = [], []
    for site, layer in sites.items():
        idx = by_layer[layer]
        cols.append(cache[site][0][:, idx].float())  # [pos, n_in_layer]
        labels += [f"L{layer}N{int(i)}" for i in idx]
    acts = torch.cat(cols, dim=1)
    if max_neurons is not None and acts.shape[1] > max_neurons:
        keep = acts.abs().amax(0).topk(max_neurons).indices.sort().values
        acts, labels = acts[:, keep], [labels[int(i)] for i in keep]
    return acts, labels


def top_heads(model: HookedModel, prompt: ICLPrompt, k: int = TOP_HEADS) -> list[tuple[int, int]]:
    """The k heads with the largest |direct logit attribution| of logit(c) - logit(gold) on `prompt`
    (`head_attribution.direct_logit_attribution`, c the demo label with the highest logit)."""
    values = direct_logit_attribution(model, [prompt]).heads[0]
    idx = values.flatten().abs().topk(min(k, values.numel())).indices
    return [divmod(int(i), values.shape[1]) for i in idx]


def marked_tokens(tokens: Sequence[str], marked: Sequence[int], mark: str = MARK) -> list[str]:
    """`tokens` with the positions `marked` drawn as `mark` (a format with one `{}`)."""
    out = list(tokens)
    for pos in marked:
        out[pos] = mark.format(out[pos])
    return out


def _rounded(x: Tensor) -> Any:
    """The values to `DIGITS` decimals, as nested tuples (what the saved views hold)."""
    return as_tuples(torch.round(x.double().cpu(), decimals=DIGITS).tolist())


# ---------------------------------------------------------------- the saved views


@dataclass(frozen=True)
class AttentionView:
    """Attention patterns of some heads on the prompt: `heads[i]` is (layer, head) of `pattern[i]`
    ([dest][src]); `chosen_by` says why these heads."""

    heads: tuple[tuple[int, int], ...]
    pattern: tuple[tuple[tuple[float, ...], ...], ...]
    chosen_by: str
    #: token positions the view marks (the demo labels' tokens), none by default
    marked: tuple[int, ...] = ()

    @property
    def names(self) -> list[str]:
        return [f"L{layer}H{head}" for layer, head in self.heads]

    def to_json(self) -> dict[str, Any]:
        return {"heads": [list(h) for h in self.heads], "pattern": self.pattern, "chosen_by": self.chosen_by,
                "marked": list(self.marked)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "AttentionView":
        return cls(as_tuples(obj["heads"]), as_tuples(obj["pattern"]), obj["chosen_by"],
                   tuple(obj.get("marked", ())))


@dataclass(frozen=True)
class ActivationView:
    """Components' activations over the prompt's tokens: `activations[pos][i]` of `labels[i]`."""

    labels: tuple[str, ...]
    activations: tuple[tuple[float, ...], ...]
    set_name: str = "neurons"

    def to_json(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "activations": self.activations, "set_name": self.set_name}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ActivationView":
        return cls(tuple(obj["labels"]), as_tuples(obj["activations"]), obj.get("set_name", "neurons"))


@dataclass(frozen=True)
class Views:
    """One prompt up close: the prompt, the unpruned model's answer, the prompt's tokens, attention views
    (none on a model without attention) and the evaluated neurons' activations (None when there are none)."""

    prompt: ICLPrompt
    prediction: str
    tokens: tuple[str, ...]
    attention: tuple[AttentionView, ...] = ()
    neurons: ActivationView | None = None

    @property
    def is_copy_error(self) -> bool:
        return copy_error(self.prediction, self.prompt.answer, self.prompt.demo_labels)

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt.to_json(), "prediction": self.prediction, "tokens": list(self.tokens),
                "attention": [a.to_json() for a in self.attention],
                "neurons": None if self.neurons is None else self.neurons.to_json()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Views":
        return cls(ICLPrompt.from_json(obj["prompt"]), obj["prediction"], tuple(obj["tokens"]),
                   tuple(AttentionView.from_json(a) for a in obj.get("attention", ())),
                   None if obj.get("neurons") is None else ActivationView.from_json(obj["neurons"]))


def copy_error_prompt(model: HookedModel, find: FindConfig) -> tuple[ICLPrompt, str]:
    """A dev prompt of the probe `find` names on which the unpruned model copies a demo label (the first of
    `N_CANDIDATES` that does, else the first one), and the model's answer."""
    dev = list(method.prompts(model.tokenizer, find).dev[:N_CANDIDATES])
    preds = predict(model, dev)
    for prompt, pred in zip(dev, preds):
        if copy_error(pred, prompt.answer, prompt.demo_labels):
            return prompt, pred
    return dev[0], preds[0]


def layer_view(model: HookedModel, text: str, components: Components) -> AttentionView:
    """Every head of the layer with the most components in `components` (the first layer when it is empty)."""
    counts = components.layer_counts(model.cfg.n_layers)
    layer = max(range(len(counts)), key=counts.__getitem__)
    heads = [(layer, h) for h in range(arch_of(model).attention_shape(model)[0])]
    why = (f"every head of layer {layer}, the layer with the most evaluated {components.kind}s"
           if components.pairs else f"every head of layer {layer} (no {components.kind}s were evaluated)")
    return AttentionView(tuple(heads), _rounded(attention_patterns(model, text, heads)), why)


def head_view(model: HookedModel, prompt: ICLPrompt, heads: Sequence[tuple[int, int]], chosen_by: str
              ) -> AttentionView:
    """The attention of `heads` ((layer, head) pairs, any layers) on `prompt`, its demo-label tokens marked."""
    require_heads(model, "a view of heads")
    heads = list(check_heads(model, heads)) if heads else []
    if not heads:
        raise ValueError("a view of heads needs at least one (layer, head)")
    marked = tuple(p for demo in label_positions(model, prompt) for p in demo)
    return AttentionView(tuple(heads), _rounded(attention_patterns(model, prompt.text, heads)), chosen_by, marked)


def copy_error_views(model: HookedModel, find: FindConfig, components: Components) -> Views:
    """The views the report shows of one copy error (module docstring)."""
    prompt, pred = copy_error_prompt(model, find)
    attention: tuple[AttentionView, ...] = ()
    if arch_of(model).has_attention:
        why = (f"the {TOP_HEADS} heads that write most of logit(c) - logit(gold) directly on this prompt (direct "
               "logit attribution, c the demo label with the highest logit), the demo-label tokens marked "
               + MARK.format("like this"))
        attention = (layer_view(model, prompt.text, components),
                     head_view(model, prompt, top_heads(model, prompt), why))
    neurons = None
    if components.pairs and components.kind == "neuron":
        acts, labels = neuron_activations(model, prompt.text, components, MAX_NEURONS)
        neurons = ActivationView(tuple(labels), _rounded(acts), str(components.meta.get("name", "neurons")))
    return Views(prompt, pred, tuple(arch_of(model).str_tokens(model, prompt.text)), attention, neurons)
