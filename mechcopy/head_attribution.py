"""Which attention heads move a target: direct logit attribution, gradient x activation and Integrated
Gradients over heads.

Targets are `mechcopy.attribution`'s (`contrast`, `gold_logprob`, `copy_prob`, or one `TargetSpec` per
prompt): `label_swap_target` builds the contrast logit(X) - logit(gold) for a demo label X.

**Direct logit attribution** (`direct_logit_attribution`) splits a two-token target
logit(plus) - logit(minus) at the last position into what each head, each attention bias, each MLP,
the embedding and the constants write straight into it. Two things are frozen at their values on the
prompt's own run: the final norm's scale at the last position, and on models with a norm after the
attention (Gemma 3, `ln1_post`) that norm's scale at the last position of each layer. With those
frozen every path is linear, so the terms sum to the logit difference exactly (tested); what a head
does through later layers (indirect effects) is not in its term.

**IG over heads** (`head_integrated_gradients`): layer l's heads' output `z` at the last position is
moved from a baseline z' (zero, or a counterfactual prompt's z at its last position, e.g. a label-swap
prompt) to the clean z, every other layer and position staying clean:
`IG_h = sum_d (z - z')_hd * int_0^1 dT(z' + a (z - z'))/dz_hd da`, with `attribution.quadrature`'s
rule. Completeness per layer: sum_h IG_h = T(z) - T(z'), as steps grow. Two paths compute it (tests
compare them): ``reference`` runs the full sequence with a hook at `hook_z`; ``fast`` runs one token
per (layer, alpha) row from the attention output on (`W_O`, the post-attention norm if any, the rest of
the block, TransformerLens' own modules), then the later blocks through the architecture's one-token
stepper (`Arch.ig_stepper`, as neuron IG does). The fast path needs pre-norm blocks; on others
`method="fast"` raises and says to use the reference path.

A zero baseline and a norm after the attention (Gemma 3) do not mix: scaling all of a layer's heads by
alpha scales the attention output, which the norm divides back out (Gemma has no output bias), so the
target barely moves until alpha is within about sqrt(eps) / rms(output) of 0 and then jumps. Where
that is below the first quadrature node, completeness fails (tested on a tiny model with a small eps);
use a counterfactual baseline there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence, TypeVar

import torch
from jaxtyping import Float
from torch import Tensor

from mechcopy.arch import HookedModel, arch_of
from mechcopy.arch.transformer import transformer_block, transformer_cfg
from mechcopy.attribution import (METHODS, TARGETS, Attributions, TargetSpec, _f, _first_tokens, _target_values,
                                  make_target, path_gradients, quadrature)
from mechcopy.heads import (final_norm, frozen_norm, head_cache_names, head_site, head_writes, norm_bias,
                            require_direct_effects, require_heads)
from mechcopy.progress import tqdm


# ---------------------------------------------------------------- targets


def label_swap_target(prompt, label: str) -> TargetSpec:
    """The contrast logit(X) - logit(gold) at the last position, X the first token of demo label `label`."""
    if label not in prompt.demo_labels:
        raise ValueError(f"{label!r} is not a demo label of the prompt (its demo labels: {list(prompt.demo_labels)})")
    gold, demos = _first_tokens(prompt)
    x = int(prompt.demo_label_ids[prompt.demo_labels.index(label)][0])
    if x == gold:
        raise ValueError(f"demo label {label!r} starts with the gold answer's token: the contrast would be 0")
    return TargetSpec("contrast", gold, demos, x)


def copied_to_gold(model: HookedModel, prompts: Sequence) -> list:
    """The counterfactual of each prompt: its copied label c (the demo label whose first token has the
    highest clean logit) replaced by the gold answer in every demo that shows it, so c is gone from the
    demos and the gold is there instead (a baseline for IG over heads, a source for per-head patching)."""
    from mechcopy.tasks.prompts import make_prompt

    out = []
    for p in prompts:
        with torch.no_grad():
            logits = model(p.text)[0, -1]
        copy = make_target("contrast", p, logits).copy
        c = next(y for y, ids in zip(p.demo_labels, p.demo_label_ids) if ids[0] == copy)
        demos = [(x, p.answer if y == c else y) for x, y in p.demos]
        out.append(make_prompt(demos, (p.query, p.answer), model.tokenizer, task=f"{p.task}:copied_to_gold"))
    return out


def _targets(prompts: Sequence, target, logits: Sequence[Tensor | None]) -> list[TargetSpec]:
    """One TargetSpec per prompt: by name (`make_target` on the clean logits) or as given (`logits` unread:
    None each)."""
    if isinstance(target, str):
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}, or pass one "
                             "TargetSpec per prompt (e.g. label_swap_target)")
        if any(l is None for l in logits):
            raise ValueError(f"target {target!r} is read from the clean logits: give every prompt's")
        return [make_target(target, p, l) for p, l in zip(prompts, logits) if l is not None]
    specs = list(target)
    if len(specs) != len(prompts) or not all(isinstance(s, TargetSpec) for s in specs):
        raise ValueError(f"target must be a name or one TargetSpec per prompt ({len(prompts)} prompts)")
    return specs


def _tokens(model: HookedModel, prompt) -> Tensor:
    return arch_of(model).tokens(model, getattr(prompt, "text", prompt),
                                 what=f"prompt of task {getattr(prompt, 'task', '')!r}")


# ---------------------------------------------------------------- direct logit attribution


@dataclass(frozen=True)
class HeadDLA:
    """Direct logit attribution of logit(plus) - logit(minus) at the last position, per prompt.

    `heads[p, l, h]` is head h of layer l; `attn_bias[p, l]` and `mlp[p, l]` the attention output bias
    (with the post-attention norm's bias) and the MLP output of layer l; `embed[p]` the residual stream
    entering block 0; `constant[p]` the final norm's bias and the unembedding bias. Their sum is the
    logit difference read from the model (`logit_diff`), given the frozen norm scales (module docstring).
    """

    heads: Float[Tensor, "prompts layers heads"]
    attn_bias: Float[Tensor, "prompts layers"]
    mlp: Float[Tensor, "prompts layers"]
    embed: Float[Tensor, "prompts"]
    constant: Float[Tensor, "prompts"]
    logit_diff: Float[Tensor, "prompts"]
    plus: tuple[int, ...]
    minus: tuple[int, ...]
    frozen: str = "final norm scale at the last position; post-attention norm scales (if any) at the last position"

    def total(self) -> Float[Tensor, "prompts"]:
        """The sum of every term (equals `logit_diff`)."""
        return (self.heads.sum((1, 2)) + self.attn_bias.sum(1) + self.mlp.sum(1) + self.embed + self.constant)

    def mean_heads(self) -> Float[Tensor, "layers heads"]:
        return self.heads.mean(0)

    def to_json(self) -> dict[str, Any]:
        return {k: (v.tolist() if isinstance(v, Tensor) else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "HeadDLA":
        t = {k: torch.tensor(d[k]) for k in ("heads", "attn_bias", "mlp", "embed", "constant", "logit_diff")}
        return cls(t["heads"], t["attn_bias"], t["mlp"], t["embed"], t["constant"], t["logit_diff"],
                   tuple(d["plus"]), tuple(d["minus"]), *([d["frozen"]] if "frozen" in d else []))


def direct_logit_attribution(model: HookedModel, prompts: Sequence, target="contrast",
                             progress: bool = False) -> HeadDLA:
    """Per-head direct logit attribution of a contrast target (`contrast`, or one two-token `TargetSpec`
    per prompt such as `label_swap_target`) over `prompts`; see `HeadDLA`."""
    require_heads(model, "direct logit attribution per head")
    require_direct_effects(model, "direct logit attribution")
    n_layers = model.cfg.n_layers
    names = set(head_cache_names(model)) | {"blocks.0.hook_resid_pre"} | {f"blocks.{l}.hook_mlp_out" for l in range(n_layers)}
    final = final_norm(model)
    if hasattr(final, "hook_scale"):
        names.add("ln_final.hook_scale")
    rows = []
    for prompt in tqdm(prompts, desc="DLA", disable=not progress):
        with torch.no_grad():
            logits, cache = model.run_with_cache(_tokens(model, prompt), names_filter=lambda n: n in names)
        rows.append((cache, logits[0, -1]))
    specs = _targets(prompts, target, [last for _, last in rows])
    plus: list[int] = []
    for s in specs:
        if s.name != "contrast" or s.copy is None:
            raise ValueError("direct logit attribution needs a two-token contrast target (logit(plus) - logit(minus)): "
                             "target='contrast' or label_swap_target")
        plus.append(s.copy)
    out: dict[str, list[Tensor]] = {k: [] for k in ("heads", "attn_bias", "mlp", "embed", "constant", "logit_diff")}
    W_U, b_U = model.unembed.W_U, model.unembed.b_U
    with torch.no_grad():
        for (cache, last), spec in zip(rows, specs):
            direction = _f(W_U[:, spec.copy] - W_U[:, spec.gold])
            scale = cache["ln_final.hook_scale"][0, -1] if "ln_final.hook_scale" in names else None

            def dla(x: Tensor) -> Tensor:
                return _f(frozen_norm(final, scale, x)) @ direction

            per_layer = [head_writes(model, cache, l) for l in range(n_layers)]
            out["heads"].append(torch.stack([dla(h[0]) for h, _ in per_layer]))
            out["attn_bias"].append(torch.stack([dla(b[0]) for _, b in per_layer]))
            out["mlp"].append(torch.stack([dla(cache[f"blocks.{l}.hook_mlp_out"][0, -1]) for l in range(n_layers)]))
            out["embed"].append(dla(cache["blocks.0.hook_resid_pre"][0, -1]))
            final_bias = _f(torch.as_tensor(norm_bias(final), device=direction.device)) * direction
            out["constant"].append(final_bias.sum() + _f(b_U[spec.copy] - b_U[spec.gold]))
            out["logit_diff"].append(_f(last[spec.copy] - last[spec.gold]))
    t = {k: torch.stack(v).cpu() for k, v in out.items()}
    return HeadDLA(t["heads"], t["attn_bias"], t["mlp"], t["embed"], t["constant"], t["logit_diff"], tuple(plus),
                   tuple(s.gold for s in specs))


# ---------------------------------------------------------------- IG and gradient x activation over heads


H = TypeVar("H", bound="HeadAttributions")


@dataclass(frozen=True)
class HeadAttributions(Attributions):
    """`Attributions` over heads: `values[p, l, h]` is head h of layer l; `target_zero[p, l]` is the target
    with layer l's last-position `z` at the baseline (`baseline`: "zero" or "counterfactual")."""

    baseline: str = "zero"

    @classmethod
    def cat(cls: type[H], parts: Sequence[H]) -> H:
        """Join results over prompts (same settings and baseline kind)."""
        if len({p.baseline for p in parts}) > 1:
            raise ValueError("cannot join head attributions computed from different baselines")
        return replace(super().cat(parts), baseline=parts[0].baseline)

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "component": "heads", "baseline": self.baseline,
                "values": self.values.tolist()}


@dataclass
class _HeadClean:
    tokens: Tensor
    target: TargetSpec
    final: Tensor                        # [1, d_model] after the last block, last position
    z: Tensor                            # [layers, heads, d_head] at the last position
    base: Tensor                         # [layers, heads, d_head] the baseline
    cache: Any = field(repr=False)


def _head_clean(model: HookedModel, prompt, target, baseline, fast: bool) -> _HeadClean:
    n_layers = model.cfg.n_layers
    tokens = _tokens(model, prompt)
    names = {head_site(model, l) for l in range(n_layers)} | {f"blocks.{n_layers - 1}.hook_resid_post"}
    if fast:
        names |= set(arch_of(model).ig_cache_names(model))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    spec = target if isinstance(target, TargetSpec) else make_target(target, prompt, logits[0, -1])
    z = torch.stack([_f(cache[head_site(model, l)][0, -1]) for l in range(n_layers)])
    if baseline is None:
        base = torch.zeros_like(z)
    else:
        site_names = {head_site(model, l) for l in range(n_layers)}
        with torch.no_grad():
            _, other = model.run_with_cache(_tokens(model, baseline), names_filter=lambda n: n in site_names)
        base = torch.stack([_f(other[head_site(model, l)][0, -1]) for l in range(n_layers)])
    final = cache[f"blocks.{n_layers - 1}.hook_resid_post"][0, -1:]
    return _HeadClean(tokens, spec, final, z, base, cache)


def _nodes(alphas: Tensor, like: Tensor) -> Tensor:
    """The m quadrature nodes and alpha = 0 (for the baseline's target)."""
    return torch.cat([alphas, torch.zeros(1)]).to(like)


def _reference_layer(model: HookedModel, c: _HeadClean, layer: int, alphas, weights) -> tuple[Tensor, Tensor]:
    """IG of layer `layer`'s heads on the full sequence (`attribution.path_gradients` at `hook_z`)."""
    a = _nodes(alphas, c.z)[:, None, None]
    diff = c.z[layer] - c.base[layer]
    grad, t0 = path_gradients(model, c.tokens, head_site(model, layer), c.base[layer] + a * diff, c.target)
    ig = (diff * (weights.to(c.z)[:, None, None] * grad).sum(0)).sum(-1)
    return ig.detach(), t0


def _fast_supported(model: HookedModel) -> str | None:
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = transformer_cfg(model)
    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        return "post-norm blocks"
    if cfg.load_in_4bit:
        return "4-bit weights"
    return None


def _from_attention(model: HookedModel, layer: int, resid_pre: Float[Tensor, "rows 1 d_model"],
                    z: Float[Tensor, "rows heads d_head"]) -> Float[Tensor, "rows 1 d_model"]:
    """Block `layer` from its heads' `z` on, for one-token rows whose residual stream entering the block
    is `resid_pre`: `W_O`, the post-attention norm (if any), then the rest of TransformerLens' block."""
    block, cfg = transformer_block(model, layer), transformer_cfg(model)
    attn = block.attn
    attn_out = (torch.einsum("rhd,hdm->rm", z.to(attn.W_O.dtype), attn.W_O) + attn.b_O)[:, None]
    if cfg.use_normalization_before_and_after:
        attn_out = block.ln1_post(attn_out)
    attn_out = block.hook_attn_out(attn_out)
    if cfg.attn_only:
        return block.hook_resid_post(resid_pre + attn_out)
    if cfg.parallel_attn_mlp:
        mlp_in = block.hook_mlp_in(resid_pre.clone()) if cfg.use_hook_mlp_in else resid_pre
        return block.hook_resid_post(resid_pre + attn_out + block.apply_mlp(block.ln2(mlp_in)))
    resid_mid = block.hook_resid_mid(resid_pre + attn_out)
    mlp_in = block.hook_mlp_in(resid_mid.clone()) if cfg.use_hook_mlp_in else resid_mid
    return block.hook_resid_post(resid_mid + block.apply_mlp(block.ln2(mlp_in)))


def _fast_prompt(model: HookedModel, c: _HeadClean, layers: list[int], alphas, weights) -> tuple[Tensor, Tensor]:
    """Every layer's (alpha) rows as one-token continuations of the prompt's clean prefix, in one batch:
    the rows of layer l start at its attention output when the loop reaches block l."""
    why = _fast_supported(model)
    if why is not None:
        raise ValueError(f"the fast path over heads does not handle {why}: use method='reference'")
    step = arch_of(model).ig_stepper(model, [c.tokens], [c.cache])
    m = len(alphas)
    a = _nodes(alphas, c.z)[:, None, None]
    leaves = {l: (c.base[l] + a * (c.z[l] - c.base[l])).requires_grad_(True) for l in layers}
    with torch.enable_grad():
        x = None
        for layer in range(layers[0], model.cfg.n_layers):
            if x is not None:
                x = step.step(layer, x)
            if layer in leaves:
                pre = c.cache[f"blocks.{layer}.hook_resid_pre"][:, -1:].expand(m + 1, 1, -1)
                rows = _from_attention(model, layer, pre, leaves[layer])
                x = rows if x is None else torch.cat([x, rows])
        assert x is not None    # layers[0] is a leaf: the loop's first step made rows
        values = _target_values(model, c.target, x[:, 0]).unflatten(0, (len(layers), m + 1))
        grads = torch.autograd.grad(values[:, :m].sum(), [leaves[l] for l in layers])
    w = weights.to(c.z)[:, None, None]
    ig = torch.stack([((c.z[l] - c.base[l]) * (w * _f(g[:m])).sum(0)).sum(-1) for l, g in zip(layers, grads)])
    return ig.detach(), values[:, m].detach()


def _attribute_heads(model, prompts, target, alphas, weights, method, kind, steps, rule, baseline, layers, progress):
    require_heads(model, "attribution over heads")
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else sorted({int(l) for l in layers})
    if not layers or not all(0 <= l < n_layers for l in layers):
        raise IndexError(f"layers must be a non-empty subset of 0..{n_layers - 1}, got {layers}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not prompts:
        raise ValueError("no prompts to attribute")
    if isinstance(target, str) and target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}, or one TargetSpec per prompt")
    specs: list[Any]
    if isinstance(target, str):
        specs, target_name = [target] * len(prompts), target
    else:
        specs = _targets(prompts, target, [None] * len(prompts))
        target_name = specs[0].name
    bases: list[Any]
    if isinstance(baseline, str):
        if baseline != "zero":
            raise ValueError(f"baseline must be 'zero' or one counterfactual prompt per prompt, got {baseline!r}")
        bases = [None] * len(prompts)
    else:
        bases = list(baseline)
        if len(bases) != len(prompts):
            raise ValueError(f"{len(bases)} counterfactual prompts for {len(prompts)} prompts: give one per prompt")
    vals, clean, zero, copies, golds = [], [], [], [], []
    for prompt, spec, base in tqdm(list(zip(prompts, specs, bases)), desc=f"{kind} heads ({method})", disable=not progress):
        c = _head_clean(model, prompt, spec, base, method == "fast")
        if method == "fast":
            ig, t0 = _fast_prompt(model, c, layers, alphas, weights)
        else:
            parts = [_reference_layer(model, c, l, alphas, weights) for l in layers]
            ig, t0 = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
        with torch.no_grad():
            tc = _target_values(model, c.target, c.final)[0]
        vals.append(ig.cpu())
        zero.append(t0.cpu())
        clean.append(tc.cpu())
        copies.append(c.target.copy)
        golds.append(c.target.gold)
    return HeadAttributions(torch.stack(vals), torch.stack(clean), torch.stack(zero), target_name, kind, method, steps,
                            rule, tuple(copies), tuple(golds), tuple(layers),
                            baseline="zero" if isinstance(baseline, str) else "counterfactual")


def head_integrated_gradients(model: HookedModel, prompts: Sequence, target="contrast", steps: int = 20,
                              method: str = "fast", rule: str = "gauss-legendre", baseline="zero",
                              layers: Sequence[int] | None = None, progress: bool = False) -> HeadAttributions:
    """IG of every head (`.values` [prompts, layers, heads]) from `baseline`: "zero", or one
    counterfactual prompt per prompt (its last-position `z` is the baseline; any length). `target` is a
    name or one `TargetSpec` per prompt (e.g. `label_swap_target`)."""
    alphas, weights = quadrature(steps, rule)
    return _attribute_heads(model, prompts, target, alphas, weights, method, "ig", steps, rule, baseline, layers,
                            progress)


def head_grad_x_act(model: HookedModel, prompts: Sequence, target="contrast", method: str = "fast", baseline="zero",
                    layers: Sequence[int] | None = None, progress: bool = False) -> HeadAttributions:
    """Gradient x (z - baseline) at the clean point, per head (first order; IG with one node at alpha = 1)."""
    one = torch.ones(1)
    return _attribute_heads(model, prompts, target, one, one, method, "gradxact", 1, "endpoint", baseline, layers,
                            progress)
