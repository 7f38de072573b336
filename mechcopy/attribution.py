"""Which neurons push the model to copy a demonstration label: Integrated Gradients on neurons.

For a prompt with gold first token g and demo-label first tokens D, the target at the prediction
(last) position is one of

* ``contrast``     logit(c) - logit(g), c = the demo label with the highest CLEAN logit (fixed per prompt);
* ``gold_logprob`` log p(g);
* ``copy_prob``    sum of p(d) over d in D.

IG for neuron i of layer l (baseline 0): ``IG_i = a_i * int_0^1 dT(alpha * a)/da_i dalpha``, where only
layer l's neuron vector at the last position is scaled and every other layer stays clean. Per layer,
completeness says ``sum_i IG_i = T(a) - T(0)``; every result carries both sides.

Two implementations compute the same numbers (tests compare them):

* ``reference``: the full sequence, one layer at a time, the alphas batched, a hook at the neuron site,
  the target read from the model's own logits (the plain TransformerLens computation).
* ``fast``: scaling layer l at the last position changes nothing before layer l and nothing at earlier
  positions, so each (layer, alpha) row is one token that continues the clean prefix. The rows of layer
  l enter at its neuron site when the loop reaches block l, the rows of every layer (and of
  ``batch_size`` prompts) run as one batch, and only the unembedding rows the target needs are computed
  (two for ``contrast``, in float32 even on a bfloat16 model).

The architecture supplies the one-token blocks (``arch_of(model).ig_stepper``, a `Stepper`): on
transformers, hand-written blocks attending to each layer's once-computed prefix keys and values; on
Mamba, one recurrent step from the prefix's conv window and SSM state. Both read the clean run's cache.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

import numpy as np
import torch
from jaxtyping import Bool, Float
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors
from torch import Tensor

from mechcopy.arch import HookedModel, arch_of
from mechcopy.components import component_kind
from mechcopy.errors import check_number
from mechcopy.fingerprint import model_fingerprint
from mechcopy.io import write_atomic, write_json_atomic
from mechcopy.progress import tqdm
from mechcopy.sites import neuron_site

TARGETS = ("contrast", "gold_logprob", "copy_prob")
#: +1 where a larger target means more copying (contrast, copy_prob), -1 where it means less (gold_logprob)
COPY_SIGN = {"contrast": 1, "copy_prob": 1, "gold_logprob": -1}
METHODS = ("fast", "reference")
RULES = ("gauss-legendre", "midpoint")
NORMALISATIONS = ("minmax", "none", "zscore", "minmax-neuron")
#: the default bound of the IG completeness gate (`converged_layers`)
MAX_COMPLETENESS_ERROR = 0.05


# ---------------------------------------------------------------- targets


@dataclass(frozen=True)
class TargetSpec:
    """A target for one prompt: which vocabulary rows it reads and how it combines them."""

    name: str
    gold: int                     # gold first token g
    demos: tuple[int, ...]        # demo-label first tokens D (without g)
    copy: int | None = None       # c = argmax over D of the clean logits (contrast only)

    def rows(self) -> list[int] | None:
        """Unembedding rows needed (None: the full vocabulary, for targets that need the softmax)."""
        if self.name != "contrast":
            return None
        assert self.copy is not None, "a contrast target fixes its copied label (make_target)"
        return [self.copy, self.gold]

    def __call__(self, logits: Float[Tensor, "rows vocab_or_sel"]) -> Float[Tensor, "rows"]:
        if self.name == "contrast":
            if logits.shape[-1] == 2:        # already the (c, g) rows
                return logits[:, 0] - logits[:, 1]
            return logits[:, self.copy] - logits[:, self.gold]
        logp = torch.log_softmax(_f(logits), dim=-1)
        if self.name == "gold_logprob":
            return logp[:, self.gold]
        return logp[:, list(self.demos)].exp().sum(-1)


def _first_tokens(prompt) -> tuple[int, tuple[int, ...]]:
    gold = int(prompt.answer_ids[0])
    demos = tuple(sorted({int(ids[0]) for ids in prompt.demo_label_ids} - {gold}))
    if not demos:
        raise ValueError(
            f"prompt {prompt.text!r}: no demo label starts with a token other than the gold answer's, "
            "so the copy targets are undefined; use probe prompts (gold never among the demo labels)")
    return gold, demos


def make_target(name: str, prompt, clean_logits: Float[Tensor, "vocab"]) -> TargetSpec:
    """Build the target of `prompt`; `contrast` fixes c from the clean last-position logits."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    gold, demos = _first_tokens(prompt)
    copy = None
    if name == "contrast":
        copy = demos[int(torch.argmax(clean_logits[list(demos)]))]
    return TargetSpec(name, gold, demos, copy)


def quadrature(steps: int, rule: str = "gauss-legendre") -> tuple[Tensor, Tensor]:
    """Nodes alpha in (0, 1) and weights (summing to 1) for int_0^1 f(alpha) dalpha."""
    check_number(steps, "steps", low=1, integer=True)
    if rule == "midpoint":
        alphas = (np.arange(steps) + 0.5) / steps
        weights = np.full(steps, 1.0 / steps)
    elif rule == "gauss-legendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        alphas, weights = (x + 1) / 2, w / 2
    else:
        raise ValueError(f"unknown quadrature rule {rule!r}; choose one of {', '.join(RULES)}")
    return torch.tensor(alphas, dtype=torch.float32), torch.tensor(weights, dtype=torch.float32)


# ---------------------------------------------------------------- results


A = TypeVar("A", bound="Attributions")     # `Attributions.cat` of a subclass returns the subclass


@dataclass(frozen=True)
class Attributions:
    """Per-prompt neuron attributions plus the per-layer completeness pieces.

    `values[p, l, i]` is neuron i of layer l on prompt p. `sums[p, l] = values[p, l].sum()` should equal
    `target_clean[p] - target_zero[p, l]` (IG; exact only as steps grow).
    """

    values: Float[Tensor, "prompts layers neurons"]
    target_clean: Float[Tensor, "prompts"]
    target_zero: Float[Tensor, "prompts layers"]
    target: str
    attribution: str            # "ig" | "gradxact"
    method: str                 # "fast" | "reference"
    steps: int
    rule: str
    copy_tokens: tuple[int | None, ...] = ()
    gold_tokens: tuple[int, ...] = ()
    layers: tuple[int, ...] = ()

    @property
    def deltas(self) -> Float[Tensor, "prompts layers"]:
        return self.target_clean[:, None] - self.target_zero

    @property
    def sums(self) -> Float[Tensor, "prompts layers"]:
        return self.values.sum(-1)

    @property
    def toward_copying(self) -> Float[Tensor, "prompts layers neurons"]:
        """The values signed so that larger means more copying whatever the target (`COPY_SIGN`): what
        copy scores rank. For `gold_logprob` a copy neuron lowers the target, so its values are negated."""
        return self.values * COPY_SIGN[self.target]

    def completeness_error(self) -> Float[Tensor, "prompts layers"]:
        """|sum IG - (T(a) - T(0))| / |T(a) - T(0)| per prompt and layer."""
        return (self.sums - self.deltas).abs() / self.deltas.abs().clamp_min(1e-12)

    @classmethod
    def cat(cls: type[A], parts: Sequence[A]) -> A:
        """Join results over prompts (same target, method, steps and layers)."""
        first = parts[0]
        for p in parts[1:]:
            if (p.target, p.attribution, p.steps, p.rule, p.layers) != (
                    first.target, first.attribution, first.steps, first.rule, first.layers):
                raise ValueError("cannot join attributions computed with different settings")
        return cls(torch.cat([p.values for p in parts]), torch.cat([p.target_clean for p in parts]),
                   torch.cat([p.target_zero for p in parts]), first.target, first.attribution, first.method,
                   first.steps, first.rule, sum((p.copy_tokens for p in parts), ()),
                   sum((p.gold_tokens for p in parts), ()), first.layers)

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write the attributions (safetensors) with their settings and `meta` in the header, atomically."""

        tensors = {"values": self.values.contiguous(), "target_clean": self.target_clean.contiguous(),
                   "target_zero": self.target_zero.contiguous(),
                   "copy_tokens": torch.tensor([-1 if c is None else c for c in self.copy_tokens], dtype=torch.long),
                   "gold_tokens": torch.tensor(list(self.gold_tokens), dtype=torch.long)}
        header = {**(meta or {}), "target": self.target, "attribution": self.attribution, "method": self.method,
                  "steps": self.steps, "rule": self.rule, "layers": list(self.layers)}
        return write_atomic(path, save_safetensors(tensors, metadata={"mechcopy": json.dumps(header, default=str)}))

    @classmethod
    def load(cls, path: str | Path) -> tuple["Attributions", dict[str, Any]]:
        """(attributions, header) from a file written by `save`."""
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("mechcopy", "{}"))
            t = {k: f.get_tensor(k) for k in f.keys()}
        att = cls(t["values"], t["target_clean"], t["target_zero"], meta["target"], meta["attribution"],
                  meta["method"], meta["steps"], meta["rule"],
                  tuple(None if c < 0 else int(c) for c in t["copy_tokens"].tolist()),
                  tuple(int(g) for g in t["gold_tokens"].tolist()), tuple(meta["layers"]))
        return att, meta

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "attribution": self.attribution, "method": self.method,
                "steps": self.steps, "rule": self.rule, "n_prompts": int(self.values.shape[0]),
                "target_clean": self.target_clean.tolist(), "target_zero": self.target_zero.tolist(),
                "layer_sums": self.sums.tolist(), "copy_tokens": list(self.copy_tokens),
                "gold_tokens": list(self.gold_tokens), "layers": list(self.layers)}


# ---------------------------------------------------------------- one prompt, two paths


def _f(x: Tensor) -> Tensor:
    """At least float32 (keeps float64 models in float64)."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass(frozen=True)
class _Clean:
    """One prompt's clean run: tokens, target, last-position logits and residual, neurons, cache."""

    tokens: Tensor
    target: TargetSpec
    logits: Tensor                # [vocab] at the last position, the model's dtype
    final: Tensor                 # [1, d_model] at the last position after the last block
    acts: list[Tensor]            # per layer [neurons], at least float32
    cache: Any                    # the hook points the fast path's stepper reads


def _target_values(model: HookedModel, target: TargetSpec, resid: Float[Tensor, "rows d_model"]) -> Tensor:
    """The target from the residual stream after the last block (the rows it needs, in float32 or more)."""
    return target(_f(arch_of(model).final_logits(model, resid, target.rows())))


def _clean(model: HookedModel, prompt, target_name: str, cache_names: Sequence[str] = ()) -> _Clean:
    """Run `prompt` once: the target (c from the clean logits), the neurons and a cache."""
    n_layers = model.cfg.n_layers
    tokens = arch_of(model).tokens(model, prompt.text, what=f"prompt of task {prompt.task!r}")
    names = {neuron_site(model, l) for l in range(n_layers)} | set(cache_names)
    resid, cache = arch_of(model).clean_run(model, tokens, names)
    with torch.no_grad():
        logits = arch_of(model).final_logits(model, resid[:, -1:])[0, -1]
    acts = [_f(cache[neuron_site(model, l)][0, -1]) for l in range(n_layers)]
    return _Clean(tokens, make_target(target_name, prompt, logits), logits, resid[0, -1:], acts, cache)


def _nodes(alphas: Tensor, like: Tensor) -> Float[Tensor, "m_plus_1 1"]:
    """The m quadrature nodes and alpha = 0 (for T(0)), as a column on `like`'s device and dtype."""
    return torch.cat([alphas, torch.zeros(1)])[:, None].to(like)


def path_gradients(model: HookedModel, tokens: Tensor, site: str, path: Float[Tensor, "m_plus_1 *shape"],
                   target: TargetSpec) -> tuple[Float[Tensor, "m *shape"], Float[Tensor, ""]]:
    """The full sequence once per point of `path` (batched), the activation at `site`'s last position set
    to that point; the gradient of the target (read from the model's own logits) at the first m points,
    and the target at the last one (the baseline): the plain TransformerLens computation of IG."""
    m = path.shape[0] - 1
    leaf = path.detach().requires_grad_(True)

    def put_leaf(a, hook):
        return torch.cat([a[:, :-1], leaf[:, None].to(a.dtype)], dim=1)

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens.expand(m + 1, -1), fwd_hooks=[(site, put_leaf)])
        values = target(_f(logits[:, -1]))
        (grad,) = torch.autograd.grad(values[:m].sum(), leaf)
    return _f(grad[:m]), values[m].detach()


def _reference_layer(model: HookedModel, clean: _Clean, layer: int, alphas, weights) -> tuple[Tensor, Tensor]:
    """IG of one layer on the full sequence (`path_gradients`); returns (attribution [N], target at alpha = 0)."""
    act = clean.acts[layer]
    grad, t0 = path_gradients(model, clean.tokens, neuron_site(model, layer), _nodes(alphas, act) * act, clean.target)
    ig = act * (weights.to(act)[:, None] * grad).sum(0)
    return ig.detach(), t0


def _attribute_reference(model: HookedModel, cleans: list[_Clean], alphas, weights, layers):
    """Per prompt and layer: the full sequence with the m+1 scaled copies of the layer's neurons."""
    parts = [[_reference_layer(model, c, l, alphas, weights) for l in layers] for c in cleans]
    return (torch.stack([torch.stack([ig for ig, _ in p]) for p in parts]),
            torch.stack([torch.stack([t0 for _, t0 in p]) for p in parts]),
            torch.stack([c.target(_f(c.logits[None]))[0] for c in cleans]))


def _attribute_fast(model: HookedModel, cleans: list[_Clean], alphas, weights, layers):
    """One token per (prompt, layer, alpha) row continuing the prompt's clean prefix, all in one batch:
    the rows of layer l enter at its neuron site (`Stepper.enter`) when the loop reaches block l."""
    arch = arch_of(model)
    step = arch.ig_stepper(model, [c.tokens for c in cleans], [c.cache for c in cleans])
    n_prompts, m = len(cleans), len(alphas)
    nodes = _nodes(alphas, cleans[0].acts[0])
    acts = {l: torch.stack([c.acts[l] for c in cleans]) for l in layers}            # [prompts, N]
    leaves = {l: (nodes * a[:, None]).requires_grad_(True) for l, a in acts.items()}  # [prompts, m+1, N]
    with torch.enable_grad():
        x = None
        for layer in range(layers[0], model.cfg.n_layers):
            if x is not None:
                x = step.step(layer, x)
            if layer in leaves:
                rows = step.enter(layer, leaves[layer].flatten(0, 1))
                x = rows if x is None else torch.cat([x.unflatten(0, (n_prompts, -1)),
                                                      rows.unflatten(0, (n_prompts, -1))], 1).flatten(0, 1)
        assert x is not None, "no layer was attributed"
        resid = x[:, 0].unflatten(0, (n_prompts, -1))                     # [prompts, layers * (m+1), d_model]
        values = torch.stack([_target_values(model, c.target, r) for c, r in zip(cleans, resid)])
        values = values.unflatten(1, (len(layers), m + 1))                # [prompts, layers, m+1]
        grads = torch.autograd.grad(values[..., :m].sum(), [leaves[l] for l in layers])
    w = weights.to(nodes)
    ig = torch.stack([acts[l] * torch.einsum("m,pmn->pn", w, _f(g[:, :m])) for l, g in zip(layers, grads)], 1)
    with torch.no_grad():
        t_clean = torch.stack([_target_values(model, c.target, c.final)[0] for c in cleans])
    return ig.detach(), values[..., m].detach(), t_clean


def _attribute(model: HookedModel, prompts, target, alphas, weights, method, kind, steps, rule, progress, layers,
               batch_size):
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else sorted({int(l) for l in layers})
    if not layers or not all(0 <= l < n_layers for l in layers):
        raise IndexError(f"layers must be a non-empty subset of 0..{n_layers - 1}, got {layers}")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not prompts:
        raise ValueError("no prompts to attribute")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fast = method == "fast"
    names = arch_of(model).ig_cache_names(model) if fast else []
    vals, clean, zero, copies, golds = [], [], [], [], []
    bar = tqdm(total=len(prompts), desc=f"{kind} ({method})", disable=not progress)
    for s in range(0, len(prompts), batch_size):
        cleans = [_clean(model, p, target, names) for p in prompts[s:s + batch_size]]
        v, z, c = (_attribute_fast if fast else _attribute_reference)(model, cleans, alphas, weights, layers)
        vals.append(v.cpu())                                            # once per batch, not per layer
        zero.append(z.cpu())
        clean.append(c.cpu())
        copies += [c.target.copy for c in cleans]
        golds += [c.target.gold for c in cleans]
        bar.update(len(cleans))
    bar.close()
    return Attributions(torch.cat(vals), torch.cat(clean), torch.cat(zero), target, kind, method, steps, rule,
                        tuple(copies), tuple(golds), tuple(layers))


def integrated_gradients(model: HookedModel, prompts: Sequence, target: str = "contrast", steps: int = 20,
                         method: str = "fast", rule: str = "gauss-legendre", layers: Sequence[int] | None = None,
                         progress: bool = False, batch_size: int = 1) -> Attributions:
    """IG of every neuron of every layer, per prompt (`.values` is [n_prompts, n_layers, n_neurons]).

    `layers` limits the layers attributed (default all; `.values` then has one slice per listed layer).
    `batch_size` prompts share one batch of rows on the fast path (each prompt has
    layers * (steps + 1) rows): 1 suits a CPU; on a GPU, raise it until the GPU is busy.
    """
    alphas, weights = quadrature(steps, rule)
    return _attribute(model, prompts, target, alphas, weights, method, "ig", steps, rule, progress, layers,
                      batch_size)


def grad_x_act(model: HookedModel, prompts: Sequence, target: str = "contrast", method: str = "fast",
               layers: Sequence[int] | None = None, progress: bool = False, batch_size: int = 1) -> Attributions:
    """Gradient x activation at the clean point (first order; IG with a single node at alpha = 1)."""
    one = torch.ones(1)
    return _attribute(model, prompts, target, one, one, method, "gradxact", 1, "endpoint", progress, layers,
                      batch_size)


# ---------------------------------------------------------------- copy scores


def normalise(values: Float[Tensor, "prompts layers neurons"], how: str = "minmax") -> Tensor:
    """Per-prompt normalisation over all neurons of all layers (`minmax`, `zscore`), or per neuron across
    the prompts (`minmax-neuron`: each neuron's min and max over the dataset, the paper's Eq. 7 as its
    reviewers read it; its scores depend on which prompts are in the set, and are blind to a neuron's
    level and size: a neuron scores high when most prompts sit near its own maximum)."""
    flat = values.reshape(values.shape[0], -1)
    if how == "none":
        out = flat
    elif how == "minmax":
        lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
        out = (flat - lo) / (hi - lo).clamp_min(1e-12)
    elif how == "minmax-neuron":
        lo, hi = flat.min(0, keepdim=True).values, flat.max(0, keepdim=True).values
        out = (flat - lo) / (hi - lo).clamp_min(1e-12)
    elif how == "zscore":
        out = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp_min(1e-12)
    else:
        raise ValueError(f"unknown normalisation {how!r}; choose one of {', '.join(NORMALISATIONS)}")
    return out.reshape(values.shape)


def converged_layers(attributions: Attributions, max_error: float = MAX_COMPLETENESS_ERROR) -> tuple[int, ...]:
    """The layers whose IG converged: median over prompts of `completeness_error()` below `max_error`.

    Only these may be selected: where sum IG misses T(a) - T(0) (layer 0 of SmolLM2 at m <= 64), the
    ranking is not the one IG claims.
    """
    median = attributions.completeness_error().median(0).values
    layers = attributions.layers or tuple(range(median.shape[0]))
    return tuple(l for l, err in zip(layers, median.tolist()) if err < max_error)


@dataclass(frozen=True)
class CopyScores:
    """Mean normalised attribution per neuron over the attribution prompts (high = pushes to copy).

    `allowed_layers` (None: all) are the layers a selection may take neurons from: every selection
    in `mechcopy.pruning` respects it (`eligible`).
    """

    scores: Float[Tensor, "layers neurons"]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    allowed_layers: tuple[int, ...] | None = None

    def __post_init__(self):
        s = self.scores
        if not isinstance(s, Tensor) or s.ndim != 2 or not s.is_floating_point():
            raise TypeError("copy scores must be a float tensor [layers, neurons], got "
                            + (f"shape {tuple(s.shape)} of {s.dtype}" if isinstance(s, Tensor) else type(s).__name__))
        bad = ~torch.isfinite(s)
        if bool(bad.any()):   # a NaN would rank as the top *and* the bottom set
            layer, idx = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"copy scores must be finite: {int(bad.sum())} of {s.numel()} are NaN or infinite "
                             f"(the first at layer {layer}, neuron {idx}); recompute them (`mechcopy find`)")
        if not isinstance(self.meta, dict):
            raise TypeError(f"copy scores' meta must be a dict, got {type(self.meta).__name__}")
        if not isinstance(self.meta.get("model", {}), dict):
            raise TypeError(f"copy scores' meta 'model' must be a model fingerprint (a dict), got {self.meta['model']!r}")
        component_kind(self.kind)
        if self.allowed_layers is not None:
            if any(isinstance(l, bool) or not isinstance(l, numbers.Integral) or not 0 <= l < s.shape[0]
                   for l in self.allowed_layers):
                raise ValueError(f"allowed_layers must be layers 0..{s.shape[0] - 1}, got {self.allowed_layers}")

    @property
    def model(self) -> dict[str, Any]:
        return self.meta.get("model", {})

    @property
    def kind(self) -> str:
        """The component kind scored (`mechcopy.components.KINDS`): neurons unless the meta says otherwise."""
        return self.meta.get("kind", "neuron")

    def eligible(self) -> Bool[Tensor, "layers neurons"]:
        """True where a neuron may be selected (its layer is allowed)."""
        mask = torch.ones_like(self.scores, dtype=torch.bool)
        if self.allowed_layers is not None:
            mask[:] = False
            mask[list(self.allowed_layers)] = True
        return mask

    def check(self, model: HookedModel) -> None:
        """Raise unless these scores were computed on a model with `model`'s identity and sizes."""
        from mechcopy.components import component_kind

        fp = model_fingerprint(model)
        kind = component_kind(self.kind)
        want = (fp["n_layers"], kind.width(model))
        if tuple(self.scores.shape) != want:
            raise ValueError(f"scores have shape {tuple(self.scores.shape)}, the model has {want} "
                             f"(layers, {kind.plural}): they were computed on another model")
        for k in ("name", "architecture"):
            if k in self.model and self.model[k] != fp[k]:
                raise ValueError(f"scores were computed on another model ({k}: {self.model[k]!r} vs {fp[k]!r})")

    def to_json(self) -> dict[str, Any]:
        return dict(self.meta)

    def save(self, path: str | Path) -> Path:
        """`path` (.safetensors) holds the tensor; the JSON metadata also goes into its header."""
        path = Path(path)
        meta = {**self.meta, "allowed_layers": None if self.allowed_layers is None else list(self.allowed_layers)}
        write_atomic(path, save_safetensors({"scores": self.scores.contiguous().float()},
                                metadata={"mechcopy": json.dumps(meta, default=str)}))
        write_json_atomic(path.with_suffix(".json"), meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CopyScores":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no copy-score file at {path}; run `mechcopy find` first")
        try:
            with safe_open(str(path), framework="pt") as f:
                if "scores" not in f.keys():
                    raise ValueError(f"{path} holds no 'scores' tensor: not a copy-score file")
                scores = f.get_tensor("scores")
                meta = json.loads((f.metadata() or {}).get("mechcopy", "{}"))
        except (SafetensorError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is damaged or not a copy-score file ({e}); run `mechcopy find` again") from e
        allowed = meta.get("allowed_layers") if isinstance(meta, dict) else None
        try:
            return cls(scores, meta, None if allowed is None else tuple(allowed))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from e


def copy_scores(model: HookedModel, attributions: Attributions | Tensor, normalisation: str = "minmax",
                prompts: Sequence | None = None, seed: int = 0, max_completeness_error: float | None = None,
                **meta) -> CopyScores:
    """Normalise each prompt's attributions, then average over prompts.

    With `max_completeness_error` (e.g. `MAX_COMPLETENESS_ERROR`), only the layers whose IG converged
    (`converged_layers`) may be selected; None allows every layer.
    """
    values = attributions.toward_copying if isinstance(attributions, Attributions) else attributions
    scores = normalise(values, normalisation).mean(0)
    allowed = None
    if max_completeness_error is not None:
        if not isinstance(attributions, Attributions):
            raise ValueError("the completeness gate needs Attributions (their completeness pieces), not a tensor")
        allowed = converged_layers(attributions, max_completeness_error)
        if not allowed:
            worst = attributions.completeness_error().median(0).values
            raise ValueError(f"no layer's IG meets completeness (median errors {worst.min():.3g}..{worst.max():.3g} "
                             f">= {max_completeness_error}); use more steps or a larger bound")
    info: dict[str, Any] = {"model": model_fingerprint(model), "normalisation": normalisation, "seed": seed,
                            "n_prompts": int(values.shape[0])}
    if isinstance(attributions, Attributions):
        info.update(target=attributions.target, steps=attributions.steps, method=attributions.method,
                    attribution=attributions.attribution, rule=attributions.rule,
                    completeness_error_median=float(attributions.completeness_error().median()),
                    completeness_error_by_layer=attributions.completeness_error().median(0).values.tolist())
    if prompts is not None:
        info["prompts"] = [{"text": p.text, "answer": p.answer} for p in prompts]
    if max_completeness_error is not None:
        info.update(max_completeness_error=max_completeness_error, allowed_layers=list(allowed or ()))
    info.update(meta)
    return CopyScores(scores, info, allowed)


def rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two score tensors (flattened)."""
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / math.sqrt(float((ra @ ra) * (rb @ rb))))
