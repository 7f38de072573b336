"""Per-head activation patching, clean into corrupted: a head's output (`z`), query, key or value, at
all positions or at one position (or one role) at a time.

Every patch of one layer runs in one batch: the corrupted prompts are repeated once per patch (row
groups, `hooks.patch_heads_by_group`), and the run starts at that layer from the corrupted run's
cached residual stream (blocks before it are unchanged by the patch). `patch_heads` on stacked prompt
pairs of one token layout equals `transformer_lens.patching`'s `get_act_patch_attn_head_{out,q,k,v}_
{all_pos,by_pos}` (tested), with the same axes ([layer, head], [layer, pos, head]).

Keys and values on grouped-query models: query head h reads key/value head `kv_head(model, h)`, shared
with the other heads of its group, so patching `hook_k` there patches the whole group (what
TransformerLens 3.9's per-head k/v functions do on such models: one value per key/value head; its issue
#980 reports them crashing). A query head's
key (value) patch is made in two passes: the layer alone runs with its key/value head patched and
gives head h's `z`; then the full run patches only head h's `z` with it. Without grouped-query
attention that is exactly patching head h's key (value); with it, it is what an ungrouped model with
head h's own copy of the group's keys would give (tested against TransformerLens on the ungrouped
model).

`head_patching` runs a task: pairs of any lengths (`patching.role_pairs`), each pair patched alone with
its positions aligned by role, the logit differences averaged over pairs before normalising (as
`patching.activation_patching` does), and `patching.gap_warning` in the result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechcopy.arch import HookedModel, arch_of
from mechcopy.arch.base import Cache
from mechcopy.arch.transformer import transformer_block, transformer_cfg
from mechcopy.heads import kv_head, require_heads
from mechcopy.hooks import capture, patch_heads_by_group
from mechcopy.patching import RolePairs, gap_warning, logit_diff, role_pairs
from mechcopy.progress import tqdm

ACTIVATIONS = ("z", "q", "k", "v")
#: the most rows (patches x prompts) run in one batch
MAX_ROWS = 64

Group = tuple[int, Any, Any]          # (head, target positions or None, source positions or None)


def _site(layer: int, activation: str) -> str:
    return f"blocks.{layer}.attn.hook_{activation}"


def _grouped(model: HookedModel) -> bool:
    cfg = transformer_cfg(model)
    return cfg.n_key_value_heads is not None and not cfg.ungroup_grouped_query_attention


def _run_groups(model: HookedModel, layer: int, activation: str, source: Cache,
                resid_pre: Float[Tensor, "batch pos d_model"], groups: Sequence[Group],
                ) -> Float[Tensor, "groups batch d_vocab"]:
    """Last-position logits of the target prompts (their residual stream entering `layer`: `resid_pre`)
    with each group's patch from the source cache `source`, one row group per patch."""
    arch, batch = arch_of(model), resid_pre.shape[0]
    out = []
    for s in range(0, len(groups), max(1, MAX_ROWS // batch)):
        chunk = list(groups[s:s + max(1, MAX_ROWS // batch)])
        x = resid_pre.repeat(len(chunk), 1, 1)
        if activation in ("z", "q") or not _grouped(model):
            hooks = [(_site(layer, activation), patch_heads_by_group(source[_site(layer, activation)], chunk))]
        else:
            hooks = [(_site(layer, "z"), patch_heads_by_group(_kv_patched_z(model, layer, activation, source, resid_pre,
                                                                             chunk), [(h, None, None) for h, _, _ in chunk]))]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            out.append(arch.last_logits(model, x, start_at_layer=layer).reshape(len(chunk), batch, -1))
    return torch.cat(out)


def _kv_patched_z(model: HookedModel, layer: int, activation: str, source: Cache,
                  resid_pre: Tensor, groups: Sequence[Group]) -> Float[Tensor, "rows pos heads d_head"]:
    """First pass of a grouped-query key/value patch: block `layer` alone with each group's key/value
    head patched; returns, row group by row group, the `z` it gives (head h of group g is what the
    second pass patches in)."""
    kv_groups = [(kv_head(model, h), t, s) for h, t, s in groups]
    store: dict = {}
    hooks = [(_site(layer, activation), patch_heads_by_group(source[_site(layer, activation)], kv_groups)),
             (_site(layer, "z"), capture(store))]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(resid_pre.repeat(len(groups), 1, 1), start_at_layer=layer, stop_at_layer=layer + 1)
    return store[_site(layer, "z")]


def _check(model: HookedModel, activation: str) -> None:
    require_heads(model, "per-head patching")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")


def _caches(model: HookedModel, source_tokens, target_tokens, activation: str):
    names = {_site(l, activation) for l in range(model.cfg.n_layers)}
    starts = {f"blocks.{l}.hook_resid_pre" for l in range(model.cfg.n_layers)}
    with torch.no_grad():
        _, src = model.run_with_cache(source_tokens, names_filter=lambda n: n in names)
        _, tgt = model.run_with_cache(target_tokens, names_filter=lambda n: n in starts)
    return src, tgt


def patch_heads(model: HookedModel, source_tokens: Tensor, target_tokens: Tensor, metric: Callable,
                activation: str = "z", by_position: bool = False, progress: bool = False,
                ) -> Float[Tensor, "layer head"] | Float[Tensor, "layer pos head"]:
    """Patch each head's `activation` from the source run into the target run (prompts of one token
    layout, stacked [batch, pos]), at all positions ([layer, head]) or one position at a time
    ([layer, pos, head]); `metric` maps the last-position logits [batch, d_vocab] to a number.
    Positions before the first token where source and target differ are not run (the patched run is
    the target run there)."""
    _check(model, activation)
    if source_tokens.shape != target_tokens.shape:
        raise ValueError(f"source and target tokens differ in shape ({list(source_tokens.shape)} vs "
                         f"{list(target_tokens.shape)}); use head_patching on role_pairs for prompts of different lengths")
    cfg = transformer_cfg(model)
    src, tgt = _caches(model, source_tokens, target_tokens, activation)
    with torch.no_grad():
        base = float(metric(arch_of(model).last_logits(model, target_tokens)))
    n_pos = target_tokens.shape[1]
    diff = (source_tokens != target_tokens).any(0).nonzero()
    first = int(diff[0]) if len(diff) else n_pos
    positions = [None] if not by_position else list(range(first, n_pos))
    out = torch.full((cfg.n_layers, n_pos if by_position else 1, cfg.n_heads), base)
    for layer in tqdm(range(cfg.n_layers), desc=f"patching heads ({activation})", disable=not progress, leave=False):
        groups = [(h, None if p is None else [p], None) for p in positions for h in range(cfg.n_heads)]
        if not groups:
            continue
        logits = _run_groups(model, layer, activation, src, tgt[f"blocks.{layer}.hook_resid_pre"], groups)
        values = torch.tensor([float(metric(lg)) for lg in logits]).reshape(len(positions), cfg.n_heads)
        if by_position:
            out[layer, first:] = values
        else:
            out[layer, 0] = values[0]
    return out if by_position else out[:, 0]


@dataclass(frozen=True)
class HeadPatchingResult:
    """Normalised logit difference of each per-head patch, clean into corrupted, averaged over pairs.

    `values[layer][column][head]`; the columns are `"all"` (every aligned position at once) or the roles
    patched one at a time (`by_role`). `pair_values[pair][layer][column][head]` are the per-pair logit
    differences behind them. `warning` is `patching.gap_warning` of the pairs.
    """

    task: str
    corruption: str
    activation: str
    columns: tuple[str, ...]
    values: tuple
    pair_values: tuple
    ld_clean: tuple[float, ...]
    ld_corrupt: tuple[float, ...]
    n_pairs: int
    n_dropped: int
    warning: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    def array(self) -> Float[Tensor, "layer column head"]:
        return torch.tensor(self.values)

    @property
    def gap(self) -> float:
        return sum(self.ld_clean) / len(self.ld_clean) - sum(self.ld_corrupt) / len(self.ld_corrupt)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "gap": self.gap}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "HeadPatchingResult":
        d = {k: v for k, v in d.items() if k != "gap"}
        for k in ("columns", "values", "pair_values", "ld_clean", "ld_corrupt"):
            d[k] = _tuples(d[k])
        return cls(**d)


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def head_patching(model: HookedModel, pairs: RolePairs, activation: str = "z", by_role: bool = False,
                  roles: Sequence[str] | None = None, progress: bool = False, task: str = "",
                  corruption: str = "") -> HeadPatchingResult:
    """Per-head patching, clean into corrupted, on `pairs` (`patching.role_pairs`: any lengths).

    Each pair is patched alone; its positions are aligned by role (`RolePair.aligned`). Without
    `by_role`, every aligned position at once (a pair of one layout: every position); with it, the
    tokens of one role at a time, for `roles` (default every role of the corrupted prompts)."""
    from mechcopy.fingerprint import model_fingerprint

    _check(model, activation)
    cfg = transformer_cfg(model)
    columns = (list(roles) if roles is not None else pairs.roles()) if by_role else ["all"]
    per_pair, lds_clean, lds_corrupt = [], [], []
    bar = tqdm(total=len(pairs) * cfg.n_layers, desc=f"patching heads ({activation})", disable=not progress)
    for pair in pairs:
        gold, ref = torch.tensor([pair.gold]), torch.tensor([pair.ref])
        with torch.no_grad():
            lds_clean.append(float(logit_diff(arch_of(model).last_logits(model, pair.clean_tokens), gold, ref)[0]))
            lds_corrupt.append(float(logit_diff(arch_of(model).last_logits(model, pair.corrupt_tokens), gold, ref)[0]))
        src, tgt = _caches(model, pair.clean_tokens, pair.corrupt_tokens, activation)
        spots = []                                       # per column: (target positions, source positions) or None
        for col in columns:
            if col == "all":
                spots.append((None, None) if pair.same_layout else pair.aligned())
            else:
                t, s = pair.aligned([col])
                spots.append((t, s) if t else None)
        live = [i for i, sp in enumerate(spots) if sp is not None]
        values = torch.full((cfg.n_layers, len(columns), cfg.n_heads), lds_corrupt[-1])
        for layer in range(cfg.n_layers):
            groups = [(h, spots[i][0], spots[i][1]) for i in live for h in range(cfg.n_heads)]
            if groups:
                logits = _run_groups(model, layer, activation, src, tgt[f"blocks.{layer}.hook_resid_pre"], groups)
                ld = logit_diff(logits[:, 0], gold.expand(len(groups)), ref.expand(len(groups)))
                values[layer, live] = ld.reshape(len(live), cfg.n_heads).float().cpu()
            bar.update(1)
        per_pair.append(values)
    bar.close()
    stacked = torch.stack(per_pair)                                         # [pairs, layer, column, head]
    mean_c, mean_x = sum(lds_clean) / len(lds_clean), sum(lds_corrupt) / len(lds_corrupt)
    if abs(mean_c - mean_x) < 1e-6:
        raise ValueError(f"clean and corrupted runs have the same mean logit difference ({mean_c:.4g}): "
                         "the normalised metric is undefined; use another corruption or more pairs")
    normalised = (stacked.mean(0) - mean_x) / (mean_c - mean_x)
    return HeadPatchingResult(
        task=task, corruption=corruption, activation=activation, columns=tuple(columns),
        values=_tuples(normalised.tolist()), pair_values=_tuples(stacked.tolist()), ld_clean=tuple(lds_clean),
        ld_corrupt=tuple(lds_corrupt), n_pairs=len(pairs), n_dropped=len(pairs.dropped),
        warning=gap_warning(lds_clean, lds_corrupt),
        settings={"by_role": by_role, "reference": "copied label: corrupted run's top demo label (first token, gold excluded)",
                  "metric": "(LD_patched - LD_corrupt) / (LD_clean - LD_corrupt), LD means over pairs",
                  "alignment": "each pair alone; positions paired by role, from the end of each role"},
        model=model_fingerprint(model),
    )


def task_head_patching(model: HookedModel, task, corruption: str = "shuffled_labels", n: int = 10, shots: int = 4,
                       seed: int = 0, other_task=None, activation: str = "z", by_role: bool = False,
                       progress: bool = False) -> HeadPatchingResult:
    """`head_patching` on `role_pairs` of `task`: what `mechcopy patch --per-head` runs."""
    pairs = role_pairs(model, task, corruption, n, shots, seed, other_task)
    res = head_patching(model, pairs, activation, by_role, progress=progress, task=task.name, corruption=corruption)
    return HeadPatchingResult(**{**asdict(res), "settings": {**res.settings, "n": n, "shots": shots, "seed": seed,
                                                               "other_task": getattr(other_task, "name", None)}})
