"""Activation patching between clean and corrupted ICL prompts, per component x layer x position.

Pairs: a clean k-shot prompt and a corrupted copy of it with the same token length, built by
`mechcopy.tasks.pairs` (`shuffled_labels`, `other_task`, `gold_label`). Pairs whose lengths differ,
or that have no usable reference token, are dropped and counted.

Metric: the normalised logit difference at the last position,
`(LD_patched - LD_corrupt) / (LD_clean - LD_corrupt)`, where `LD = logit(gold) - logit(ref)` uses the
first token of the gold answer and, as the reference wrong token `ref`, the *copied label*: of the
corrupted prompt's demo labels (first tokens, the gold's excluded), the one with the highest logit on the
corrupted run. Each LD is averaged over the pairs before normalising (as in TransformerLens' IOI
demos), so clean-into-clean is exactly 1 and corrupt-into-corrupt exactly 0 at every patch.

Components: the residual stream entering each block (`resid_pre`) and each block's writes, attention
and MLP output on transformers (`attn_out`, `mlp_out`), the mixer output on Mamba (`mixer_out`);
and a `NeuronSet`, patched at all positions at once and one position at a time. Patches go through
`mechcopy.hooks.patch_from_cache`, so one loop serves every architecture (a patch at layer l starts
the run at block l from the cached residual stream); `method="tl"` uses `transformer_lens.patching`
instead (HookedTransformer only; tested equal).

Positions are aligned across pairs by *role* (`mechcopy.tasks.pairs.token_roles`): only pairs with
the most common role sequence are kept, so one column means the same part of the prompt in every pair.
`role_pairs` keeps pairs of any lengths instead (a researcher's own task, whose inputs differ in token
length) and aligns the two prompts of a pair by role (`mechcopy.tasks.pairs.align_roles`): the
per-head patching of `mechcopy.head_patching` runs on them.

A clean-corrupted gap (LD_clean - LD_corrupt) of the wrong sign, or small against its spread over the
pairs, makes the normalised metric meaningless: `gap_warning` says so, and the results carry it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechcopy.arch import HookedModel, arch_of
from mechcopy.components import as_components
from mechcopy.errors import check_number
from mechcopy.fingerprint import model_fingerprint
from mechcopy.hooks import patch_from_cache
from mechcopy.io import as_tuples
from mechcopy.progress import tqdm
from mechcopy.sites import components, neuron_site
from mechcopy.tasks.pairs import CORRUPTIONS, align_roles, corrupted_pairs, token_roles


@dataclass(frozen=True)
class PatchPairs:
    """Clean/corrupted prompts of equal token length and aligned roles, with gold and reference ids."""

    clean: tuple
    corrupt: tuple
    clean_tokens: Int[Tensor, "batch pos"]
    corrupt_tokens: Int[Tensor, "batch pos"]
    gold: Int[Tensor, "batch"]
    ref: Int[Tensor, "batch"]
    roles: tuple[str, ...]
    dropped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.clean)


def make_pairs(model: HookedModel, task, corruption: str, n: int = 10, shots: int = 4, seed: int = 0,
               other_task=None, n_candidates: int | None = None) -> PatchPairs:
    """Build up to `n` clean/corrupted pairs from `task` (see the module docstring for what is dropped)."""
    cands, dropped = corrupted_pairs(task, model.tokenizer, corruption, n_candidates or max(6 * n, 60), shots,
                                     seed, other_task)
    kept, tokens = [], arch_of(model).tokens
    for p, c in cands:
        tc, tx = tokens(model, p.text, what=f"prompt of task {task.name!r}")[0], tokens(model, c.text)[0]
        if tc.shape != tx.shape:
            dropped.append(f"{p.query!r}: corrupted prompt has {tx.shape[0]} tokens, clean {tc.shape[0]}")
            continue
        kept.append((p, c, tc, tx, tuple(token_roles(arch_of(model).str_tokens(model, p.text), p))))
    if not kept:
        raise ValueError(f"no clean/corrupted pair of equal token length for task {task.name!r} with "
                         f"{corruption!r} ({len(dropped)} dropped, e.g. {dropped[:2]})")
    sig, _ = Counter(k[4] for k in kept).most_common(1)[0]
    group = [k for k in kept if k[4] == sig]
    dropped += [f"{k[0].query!r}: token roles differ from the most common layout" for k in kept if k[4] != sig]
    group = group[:n]
    clean_tokens = torch.stack([k[2] for k in group])
    corrupt_tokens = torch.stack([k[3] for k in group])
    gold = torch.tensor([k[0].answer_ids[0] for k in group])
    with torch.no_grad():
        corrupt_logits = arch_of(model).last_logits(model, corrupt_tokens)
    refs, keep = [], []
    for i, (_, c, *_rest) in enumerate(group):
        ids = sorted({ids[0] for ids in c.demo_label_ids} - {int(gold[i])})
        if not ids:
            dropped.append(f"{c.query!r}: every demo label starts with the gold token; no reference token")
            continue
        refs.append(ids[int(corrupt_logits[i, ids].argmax())])
        keep.append(i)
    if not keep:
        raise ValueError(f"task {task.name!r}: no pair has a reference token different from the gold")
    ix = torch.tensor(keep)
    return PatchPairs(tuple(group[i][0] for i in keep), tuple(group[i][1] for i in keep), clean_tokens[ix],
                      corrupt_tokens[ix], gold[ix], torch.tensor(refs), sig, tuple(dropped))


@dataclass(frozen=True)
class RolePair:
    """One clean/corrupted pair of any lengths: tokens [1, pos] each, token roles, gold and reference ids."""

    clean: Any
    corrupt: Any
    clean_tokens: Int[Tensor, "1 pos"]
    corrupt_tokens: Int[Tensor, "1 pos_corrupt"]
    clean_roles: tuple[str, ...]
    corrupt_roles: tuple[str, ...]
    gold: int
    ref: int

    def aligned(self, roles: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
        """(corrupted positions, clean positions) that play the same role (`align_roles`), for patching
        clean into corrupted; `roles` limits them."""
        return align_roles(self.corrupt_roles, self.clean_roles, roles)

    @property
    def same_layout(self) -> bool:
        return self.clean_roles == self.corrupt_roles


@dataclass(frozen=True)
class RolePairs:
    """Clean/corrupted pairs kept whatever their token lengths (`role_pairs`), and why others were dropped."""

    pairs: tuple[RolePair, ...]
    dropped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self):
        return iter(self.pairs)

    def roles(self) -> list[str]:
        """Every role of the corrupted prompts, in prompt order (BOS, x1, ->1, y1, ..., xq, ->q)."""
        seen: dict[str, None] = {}
        for p in self.pairs:
            for r in p.corrupt_roles:
                if r:
                    seen.setdefault(r, None)
        return list(seen)


def role_pairs(model: HookedModel, task, corruption: str, n: int = 10, shots: int = 4, seed: int = 0,
               other_task=None, n_candidates: int | None = None, gold_in_demos: bool = True,
               reverse: bool = False) -> RolePairs:
    """Up to `n` clean/corrupted pairs of `task`, of any token lengths, aligned by role, from
    `n_candidates` prompts (default 2n + 10; `gold_in_demos=False`: no demo carries the query's label);
    see `role_pairs_of`."""
    cands, dropped = corrupted_pairs(task, model.tokenizer, corruption, n_candidates or 2 * n + 10, shots, seed,
                                     other_task, gold_in_demos)
    return _role_pairs(model, cands, dropped, n, reverse, f"task {task.name!r} with {corruption!r}")


def role_pairs_of(model: HookedModel, prompts: Sequence, corruption: str | Sequence, n: int | None = None,
                  seed: int = 0, other_task=None, reverse: bool = False) -> RolePairs:
    """Clean/corrupted pairs from given prompts (e.g. the probe's), up to `n` (default all), of any token
    lengths, aligned by role; `corruption` names one of `CORRUPTIONS`, or is the corrupted prompts
    themselves (one per prompt, same query). The reference token is `make_pairs`'s (the corrupted run's
    top demo label, gold excluded); a prompt that cannot be corrupted, or whose demo labels all start
    with the gold token, is dropped with the reason.

    `reverse` swaps the two prompts: the corrupted one becomes the source of the patches and the
    original prompt the run patched into. On prompts with no gold among the demos and the `gold_label`
    corruption, that asks which heads, taken from a run whose demos show the gold label once, make the
    run whose demos never show it give the gold rather than copy."""
    import random

    from mechcopy.tasks.pairs import corrupt_prompt

    rng, cands, dropped = random.Random(seed), [], []
    if isinstance(corruption, str):
        for p in prompts:
            try:
                cands.append((p, corrupt_prompt(p, corruption, model.tokenizer, rng, other_task)))
            except ValueError as e:
                dropped.append(f"{p.query!r}: {e}")
    else:
        corrupted = list(corruption)
        if len(corrupted) != len(prompts) or any(c.query != p.query for c, p in zip(corrupted, prompts)):
            raise ValueError("give one corrupted prompt per prompt, with the same query")
        cands = list(zip(prompts, corrupted))
    what = repr(corruption) if isinstance(corruption, str) else "the given corrupted prompts"
    return _role_pairs(model, cands, dropped, len(prompts) if n is None else n, reverse, what)


def _role_pairs(model: HookedModel, cands, dropped: list[str], n: int, reverse: bool, what: str) -> RolePairs:
    if reverse:
        cands = [(c, p) for p, c in cands]
    tokens = arch_of(model).tokens
    pairs: list[RolePair] = []
    for p, c in cands:
        if len(pairs) == n:
            break
        tc = tokens(model, p.text, what="a clean prompt")
        tx = tokens(model, c.text, what="a corrupted prompt")
        gold = int(p.answer_ids[0])
        ids = sorted({ids[0] for ids in c.demo_label_ids} - {gold})
        if not ids:
            dropped.append(f"{c.query!r}: every demo label starts with the gold token; no reference token")
            continue
        with torch.no_grad():
            logits = arch_of(model).last_logits(model, tx)[0]
        ref = ids[int(logits[ids].argmax())]
        pairs.append(RolePair(p, c, tc, tx, tuple(token_roles(arch_of(model).str_tokens(model, p.text), p)),
                              tuple(token_roles(arch_of(model).str_tokens(model, c.text), c)), gold, ref))
    if not pairs:
        raise ValueError(f"{what}: no usable clean/corrupted pair ({len(dropped)} dropped, e.g. {dropped[:2]})")
    return RolePairs(tuple(pairs), tuple(dropped))


def gap_warning(ld_clean: Sequence[float], ld_corrupt: Sequence[float]) -> str | None:
    """Why the normalised metric (LD_patched - LD_corrupt) / (LD_clean - LD_corrupt) should not be read,
    or None: a mean gap LD_clean - LD_corrupt <= 0 (the corruption does not move the model away from the
    gold), within two standard errors of zero over the pairs, or from one pair (no spread)."""
    gaps = torch.tensor(list(ld_clean), dtype=torch.float64) - torch.tensor(list(ld_corrupt), dtype=torch.float64)
    n, gap = len(gaps), float(gaps.mean())
    if gap <= 0:
        return (f"the clean-corrupted logit-difference gap is {gap:+.3f} (<= 0): the corruption does not lower "
                "logit(gold) - logit(ref), so the normalised values are not recoveries; use another corruption")
    if n < 2:
        return f"one pair: the gap {gap:+.3f} has no spread to compare with; use more pairs"
    se = float(gaps.std() / n ** 0.5)
    if gap < 2 * se:
        return (f"the clean-corrupted gap {gap:+.3f} is within 2 standard errors ({se:.3f}) of zero over {n} pairs: "
                "the normalised values are mostly noise; use more pairs or another corruption")
    return None


# ---------------------------------------------------------------------------------------------------
# metric and patch loops


def logit_diff(logits: Float[Tensor, "batch ... d_vocab"], gold: Tensor, ref: Tensor) -> Float[Tensor, "batch"]:
    """logit(gold) - logit(ref) at the last position (logits [batch, pos, vocab] or [batch, vocab])."""
    last = logits[:, -1] if logits.ndim == 3 else logits
    rows = torch.arange(last.shape[0], device=last.device)
    return last[rows, gold.to(last.device)] - last[rows, ref.to(last.device)]


@dataclass(frozen=True)
class NormalisedLogitDiff:
    """(mean LD(logits) - ld_corrupt) / (ld_clean - ld_corrupt), LDs averaged over the batch."""

    gold: Tensor
    ref: Tensor
    ld_clean: float
    ld_corrupt: float
    #: per-pair LD_clean and LD_corrupt (for `warning`)
    pairs_clean: tuple[float, ...] = ()
    pairs_corrupt: tuple[float, ...] = ()

    @property
    def warning(self) -> str | None:
        """`gap_warning` of the pairs (None when the gap is clear, or the per-pair LDs are unknown)."""
        return gap_warning(self.pairs_clean, self.pairs_corrupt) if self.pairs_clean else None

    @classmethod
    def from_runs(cls, model: HookedModel, clean_tokens, corrupt_tokens, gold, ref, fwd_hooks=()
                  ) -> "NormalisedLogitDiff":
        last_logits = arch_of(model).last_logits
        with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
            lds_c = logit_diff(last_logits(model, clean_tokens), gold, ref)
            lds_x = logit_diff(last_logits(model, corrupt_tokens), gold, ref)
        ld_c, ld_x = float(lds_c.mean()), float(lds_x.mean())
        if abs(ld_c - ld_x) < 1e-6:
            raise ValueError(f"clean and corrupted runs have the same logit difference ({ld_c:.4g}): "
                             "the normalised metric is undefined; use another corruption or more pairs")
        return cls(gold, ref, ld_c, ld_x, tuple(lds_c.tolist()), tuple(lds_x.tolist()))

    def __call__(self, logits: Tensor) -> Tensor:
        ld = logit_diff(logits, self.gold, self.ref).mean()
        return (ld - self.ld_corrupt) / (self.ld_clean - self.ld_corrupt)


def patched_metric(model: HookedModel, source_cache, target_tokens, metric: Callable, hook_names: Sequence[str],
                   positions=None, idx=None, fwd_hooks=()) -> float:
    """Metric of the target run with `hook_names` patched from `source_cache` (at `positions`, dims `idx`)."""
    hooks = list(fwd_hooks) + [(name, patch_from_cache(source_cache, positions, idx)) for name in hook_names]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        return float(metric(arch_of(model).last_logits(model, target_tokens)))


def patch_sweep(
    model: HookedModel, source_tokens, target_tokens, metric: Callable, comps: Sequence[str] | None = None,
    fwd_hooks=(), skip_identical: bool = True, progress: bool = False,
) -> Float[Tensor, "component layer pos"]:
    """Patch each component at each layer and position from the source run into the target run.

    With `skip_identical`, positions before the first token where source and target differ are not run:
    causality makes every activation there identical, so the patched run *is* the target run.
    A patch at layer l starts the forward pass at block l from the target run's cached residual stream
    (blocks before l are unchanged by it), about halving the cost.
    """
    arch = arch_of(model)
    templates = components(model)
    comps = list(templates) if comps is None else list(comps)
    bad = [c for c in comps if c not in templates]
    if bad:
        raise ValueError(f"unknown component(s) {bad} for this model; choose from {list(templates)}")
    names = {templates[c].format(layer=l) for c in comps for l in range(model.cfg.n_layers)}
    starts = {f"blocks.{l}.hook_resid_pre" for l in range(model.cfg.n_layers)}
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        _, cache = model.run_with_cache(source_tokens, names_filter=lambda n: n in names)
        base = float(metric(arch.last_logits(model, target_tokens)))
        _, target_cache = model.run_with_cache(target_tokens, names_filter=lambda n: n in starts)
    n_pos = target_tokens.shape[1]
    diff = (source_tokens != target_tokens).any(0).nonzero()
    first = int(diff[0]) if (skip_identical and len(diff)) else (n_pos if skip_identical else 0)
    out = torch.full((len(comps), model.cfg.n_layers, n_pos), base)
    todo = [(ci, l, p) for ci in range(len(comps)) for l in range(model.cfg.n_layers) for p in range(first, n_pos)]
    for ci, l, p in tqdm(todo, desc="patching", disable=not progress, leave=False):
        hooks = list(fwd_hooks) + [(templates[comps[ci]].format(layer=l), patch_from_cache(cache, [p]))]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            out[ci, l, p] = float(metric(arch.last_logits(model, target_cache[f"blocks.{l}.hook_resid_pre"], l)))
    return out


def tl_patch_sweep(model: HookedModel, source_tokens, target_tokens, metric: Callable) -> Float[Tensor, "component layer pos"]:
    """The same sweep for resid_pre, attn_out, mlp_out with `transformer_lens.patching` (HookedTransformer)."""
    from transformer_lens import patching as tlp

    if not arch_of(model).tl_patching:
        raise ValueError(f"transformer_lens.patching does not work on {arch_of(model).name} models; use method='own'")
    with torch.no_grad():
        _, cache = model.run_with_cache(source_tokens)
        return tlp.get_act_patch_block_every(model, target_tokens, cache, metric).cpu()


def patch_neurons(model: HookedModel, neurons, source_tokens, target_tokens, metric: Callable, fwd_hooks=()
                  ) -> tuple[float, Float[Tensor, "pos"]]:
    """Patch a NeuronSet's activations from source into target: at all positions, and one position at a time."""
    neurons.check(model)
    by_layer = neurons.by_layer()
    names = {neuron_site(model, l) for l in by_layer}
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        _, cache = model.run_with_cache(source_tokens, names_filter=lambda n: n in names)

    def run(positions):
        hooks = [(neuron_site(model, l), patch_from_cache(cache, positions, idx)) for l, idx in by_layer.items()]
        return patched_metric(model, cache, target_tokens, metric, [], fwd_hooks=list(fwd_hooks) + hooks)

    return run(None), torch.tensor([run([p]) for p in range(target_tokens.shape[1])])


# ---------------------------------------------------------------------------------------------------
# the analysis


@dataclass(frozen=True)
class PatchingResult:
    """Normalised logit difference for each [component, layer, pos] patch (clean into corrupted)."""

    task: str
    corruption: str
    components: tuple[str, ...]
    values: tuple[tuple[tuple[float, ...], ...], ...]    # [component][layer][pos]
    roles: tuple[str, ...]           # the aligned role label of every position
    tokens: tuple[str, ...]          # the first clean prompt's string tokens
    n_pairs: int
    n_dropped: int
    ld_clean: float
    ld_corrupt: float
    neurons: int = 0
    neuron_all_positions: float | None = None
    neuron_by_pos: tuple[float, ...] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    #: `gap_warning` of the pairs: why the normalised values should not be read (None: the gap is clear)
    warning: str | None = None
    model: dict[str, Any] = field(default_factory=dict)

    def array(self) -> Float[Tensor, "component layer pos"]:
        return torch.tensor(self.values)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "PatchingResult":
        return cls(**{f.name: as_tuples(obj[f.name]) for f in fields(cls) if f.name in obj})


def activation_patching(
    model: HookedModel, task, corruption: str, n: int = 10, shots: int = 4, seed: int = 0, other_task=None,
    neurons=None, comps: Sequence[str] | None = None, method: str = "own", fwd_hooks=(),
    progress: bool = False,
) -> PatchingResult:
    """Clean-into-corrupted patching for `task` under `corruption`, averaged over up to `n` pairs.

    `neurons` are checked against the model before any work; an empty set (find chose k = 0) is not
    patched."""
    check_number(n, "n", low=1, integer=True)
    if neurons is not None:
        as_components(neurons, "neurons").check(model)
        neurons = neurons if neurons.pairs else None
    pairs = make_pairs(model, task, corruption, n, shots, seed, other_task)
    metric = NormalisedLogitDiff.from_runs(model, pairs.clean_tokens, pairs.corrupt_tokens, pairs.gold,
                                           pairs.ref, fwd_hooks)
    if method == "tl":
        if fwd_hooks:
            raise ValueError("method='tl' takes no extra fwd_hooks; use method='own'")
        comps = ["resid_pre", "attn_out", "mlp_out"]
        arr = tl_patch_sweep(model, pairs.clean_tokens, pairs.corrupt_tokens, metric)
    elif method == "own":
        comps = list(components(model)) if comps is None else list(comps)
        arr = patch_sweep(model, pairs.clean_tokens, pairs.corrupt_tokens, metric, comps, fwd_hooks,
                          progress=progress)
    else:
        raise ValueError(f"unknown method {method!r}; choose 'own' or 'tl'")
    n_all, n_pos = None, None
    if neurons is not None:
        n_all, by_pos = patch_neurons(model, neurons, pairs.clean_tokens, pairs.corrupt_tokens, metric, fwd_hooks)
        n_pos = tuple(by_pos.tolist())
    return PatchingResult(
        task=task.name, corruption=corruption, components=tuple(comps), values=as_tuples(arr.tolist()),
        roles=pairs.roles, tokens=tuple(arch_of(model).str_tokens(model, pairs.clean[0].text)), n_pairs=len(pairs),
        n_dropped=len(pairs.dropped), ld_clean=metric.ld_clean, ld_corrupt=metric.ld_corrupt, warning=metric.warning,
        neurons=len(neurons) if neurons is not None else 0, neuron_all_positions=n_all, neuron_by_pos=n_pos,
        settings={"n": n, "shots": shots, "seed": seed, "method": method,
                  "other_task": other_task.name if other_task is not None else None,
                  "reference": "copied label: corrupted run's top demo label (first token, gold excluded)",
                  "metric": "(LD_patched - LD_corrupt) / (LD_clean - LD_corrupt), LD means over pairs"},
        model=model_fingerprint(model),
    )
