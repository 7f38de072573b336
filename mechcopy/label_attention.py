"""Do heads look at the demonstrations' labels from the answer position, and do they write the label
they look at?

For every head and prompt, at the final position (where the answer is predicted):

* **label attention**: the attention to the demo-label tokens (roles `y1..yk` of
  `mechcopy.tasks.pairs.token_roles`), in all and per demo, beside the attention to the first token
  (often a sink) and the share of the prompt's tokens that are label tokens (what uniform attention
  would give);
* **the OV check**: of the demo label the head attends to most, what the head writes from those tokens
  per unit of attention (their values, attention-weighted within the label, through `W_O`, the
  post-attention norm and the final norm with their scales frozen at the final position, and `W_U`),
  read as the logit of that label's first token; and the margin over the mean of the other labels in
  play (the other demo labels' and the gold's first tokens: on a two-label task whose demos all show
  one label, the gold is the only other). A positive margin means the head copies what it attends to,
  a negative one that it suppresses it (copy suppression).

Values come from `blocks.{l}.attn.hook_v` (per key/value head; query head h reads `kv_head(model, h)`),
so the check holds on grouped-query models. Each prompt carries its first-token outcome (`correct`,
`copy`: a demo label's first token other than the gold's, `other`), the tokens the attribution targets
read, so maps can be split by copy errors and correct answers.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechcopy.arch import HookedModel, arch_of
from mechcopy.arch.transformer import transformer_block, transformer_cfg
from mechcopy.attribution import _first_tokens
from mechcopy.conditions import ATTENTION_EDITS, LABEL_ATTENTION, Condition
from mechcopy.heads import final_norm, frozen_norm, kv_head, n_heads, post_attention_norm, require_heads
from mechcopy.hooks import Hook, scale_last_query
from mechcopy.tasks.pairs import token_roles

OUTCOMES = ("correct", "copy", "other")


def label_positions(model: HookedModel, prompt) -> list[list[int]]:
    """The token positions of each demo label of `prompt` (role `y{i}`), one list per demo."""
    roles = token_roles(arch_of(model).str_tokens(model, prompt.text), prompt)
    out = [[p for p, r in enumerate(roles) if r == f"y{i}"] for i in range(1, len(prompt.demos) + 1)]
    missing = [i + 1 for i, pos in enumerate(out) if not pos]
    if missing:
        raise ValueError(f"prompt {prompt.text[:60]!r}: no token has the role of demo label(s) {missing} (the "
                         "tokens do not spell the text back, or a label merges with its neighbours)")
    return out


@dataclass(frozen=True)
class LabelAttention:
    """Label attention and the OV check per prompt and head (module docstring).

    Arrays are [prompts, layers, heads] unless said; `to_demo` has one more axis (demos), `attended`
    is the index of the most attended demo, `label_share[p]` the fraction of prompt p's tokens that
    are label tokens.
    """

    to_labels: Float[Tensor, "prompts layers heads"]
    to_bos: Float[Tensor, "prompts layers heads"]
    to_demo: Float[Tensor, "prompts layers heads demos"]
    attended: Int[Tensor, "prompts layers heads"]
    ov_logit: Float[Tensor, "prompts layers heads"]
    ov_margin: Float[Tensor, "prompts layers heads"]
    label_share: Float[Tensor, "prompts"]
    outcomes: tuple[str, ...]
    predicted: tuple[int, ...]

    def where(self, outcome: str) -> np.ndarray:
        """Indices of the prompts with `outcome` ("correct", "copy" or "other")."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; choose one of {', '.join(OUTCOMES)}")
        return np.array([i for i, o in enumerate(self.outcomes) if o == outcome], dtype=int)

    def mean(self, field: str = "to_labels", outcome: str | None = None) -> Float[Tensor, "layers heads"]:
        """Mean of `field` over the prompts (with `outcome` only, if given); NaN where there are none."""
        values = getattr(self, field).float()
        rows = torch.as_tensor(self.where(outcome)) if outcome else torch.arange(len(values))
        if len(rows) == 0:
            return torch.full(values.shape[1:3], float("nan"))
        return values[rows].nanmean(0)

    def to_json(self) -> dict[str, Any]:
        return {k: (v.tolist() if isinstance(v, Tensor) else list(v)) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LabelAttention":
        f = {k: torch.tensor(d[k]) for k in ("to_labels", "to_bos", "to_demo", "ov_logit", "ov_margin", "label_share")}
        return cls(f["to_labels"], f["to_bos"], f["to_demo"], torch.tensor(d["attended"], dtype=torch.long),
                   f["ov_logit"], f["ov_margin"], f["label_share"], tuple(d["outcomes"]), tuple(d["predicted"]))


def outcome_of(prompt, predicted: int) -> str:
    """The first-token outcome of a prediction: `correct`, `copy` (a demo label's first token other than
    the gold's) or `other`."""
    gold, demos = _first_tokens(prompt)
    return "correct" if predicted == gold else "copy" if predicted in demos else "other"


def label_attention(model: HookedModel, prompts: Sequence) -> LabelAttention:
    """Label attention and the OV check of every head on `prompts` (ICL prompts with the same number of
    demos); one forward pass per prompt."""
    require_heads(model, "label attention")
    if not prompts:
        raise ValueError("label_attention needs at least one prompt")
    if len({len(p.demos) for p in prompts}) != 1:
        raise ValueError("label_attention needs prompts with the same number of demos")
    cfg = transformer_cfg(model)
    layers, n_heads = cfg.n_layers, cfg.n_heads
    names = {f"blocks.{l}.attn.hook_{n}" for l in range(layers) for n in ("pattern", "v")}
    names |= {f"blocks.{l}.ln1_post.hook_scale" for l in range(layers)} | {"ln_final.hook_scale"}
    norm = final_norm(model)
    kv = torch.tensor([kv_head(model, h) for h in range(n_heads)])
    out: dict[str, list[Tensor]] = {k: [] for k in ("to_labels", "to_bos", "to_demo", "attended", "ov_logit", "ov_margin", "label_share")}
    outcomes, predicted = [], []
    for prompt in prompts:
        positions = label_positions(model, prompt)
        tokens = arch_of(model).tokens(model, prompt.text)
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        pred = int(logits[0, -1].argmax())
        predicted.append(pred)
        outcomes.append(outcome_of(prompt, pred))
        label_ids = [int(ids[0]) for ids in prompt.demo_label_ids]
        rows: dict[str, list[Tensor]] = {k: [] for k in out if k != "label_share"}
        with torch.no_grad():
            for l in range(layers):
                pattern = cache[f"blocks.{l}.attn.hook_pattern"][0, :, -1].float()            # [heads, pos]
                per_demo = torch.stack([pattern[:, pos].sum(-1) for pos in positions], -1)   # [heads, demos]
                attended = per_demo.argmax(-1)                                              # [heads]
                v = cache[f"blocks.{l}.attn.hook_v"][0][:, kv]                               # [pos, heads, d_head]
                logit, margin = [], []
                for h in range(n_heads):
                    d = int(attended[h])
                    pos = positions[d]
                    w = pattern[h, pos] / pattern[h, pos].sum().clamp_min(1e-30)
                    u = (w[:, None] * v[pos, h].float()).sum(0)                            # value per unit attention
                    write = u @ transformer_block(model, l).attn.W_O[h].float()
                    post = post_attention_norm(model, l)
                    if post is not None:
                        scale = cache[f"blocks.{l}.ln1_post.hook_scale"][0, -1] if hasattr(post, "hook_scale") else None
                        write = frozen_norm(post, scale, write)
                    scale = cache["ln_final.hook_scale"][0, -1] if hasattr(norm, "hook_scale") else None
                    resid = frozen_norm(norm, scale, write).float()
                    own = label_ids[d]
                    others = sorted((set(label_ids) | {int(prompt.answer_ids[0])}) - {own})
                    lo = resid @ model.unembed.W_U[:, [own] + others].float()
                    logit.append(lo[0])
                    margin.append(lo[0] - lo[1:].mean() if others else torch.tensor(float("nan")))
                rows["to_labels"].append(per_demo.sum(-1))
                rows["to_bos"].append(pattern[:, 0])
                rows["to_demo"].append(per_demo)
                rows["attended"].append(attended)
                rows["ov_logit"].append(torch.stack(logit))
                rows["ov_margin"].append(torch.stack(margin))
        for k, v in rows.items():
            out[k].append(torch.stack(v))
        out["label_share"].append(torch.tensor(sum(map(len, positions)) / tokens.shape[1]))
    return LabelAttention(**{k: torch.stack(v).cpu() for k, v in out.items()}, outcomes=tuple(outcomes),
                          predicted=tuple(predicted))


# ---------------------------------------------------------------- down-weighting the attention to demo labels


@dataclass(frozen=True)
class AttentionEdits:
    """What the attention-edit conditions of one forked pass do (`attention_edits`): per layer, the factor
    of each (row group, head) (1: untouched), and per row group the key positions of each prompt (its
    demo-label tokens, or for `other-attention` as many other demo tokens; none for a group that edits
    nothing). Only the passes that end at an answer position take `hooks` (the prompt's, or a reference
    query's with the same demos: the label scorer's prefix or query pass); later tokens attend as they would."""

    factors: dict[int, Float[Tensor, "groups heads"]]
    keys: tuple[tuple[tuple[int, ...], ...], ...]          # [group][prompt] -> key positions

    def hooks(self, batch: Sequence[int], pads: Sequence[int], width: int,
              edit: Sequence[bool] | None = None) -> list[tuple[str, Hook]]:
        """The hooks of one pass over prompts `batch` (rows group-major; each row's keys shifted by its left
        padding `pads`, `width` keys in all, the pass's last query at an answer position): in each row, that
        query's attention to its group's keys of its prompt times its group's factor (rows where `edit` is
        False untouched)."""
        mask = torch.zeros(len(self.keys), len(batch), width, dtype=torch.bool)
        for g, keys in enumerate(self.keys):
            for r, (i, pad) in enumerate(zip(batch, pads)):
                if keys[i] and (edit is None or edit[r]):
                    mask[g, r, [pad + k for k in keys[i]]] = True
        out = []
        for layer, f in sorted(self.factors.items()):
            scale = torch.where(mask[:, :, None, :], f[:, None, :, None], torch.ones(()))   # [groups B heads width]
            out.append((f"blocks.{layer}.attn.hook_pattern", scale_last_query(scale.reshape(-1, *scale.shape[2:]))))
        return out


def other_positions(model: HookedModel, prompt, seed: int = 0) -> list[int]:
    """As many token positions as `prompt` has demo-label tokens, drawn at random (seeded by the prompt's
    text and `seed`) among the demos' other tokens (before the last demo label; not the first token, not a
    label): the keys of the `other-attention` control."""
    labels = sorted(k for pos in label_positions(model, prompt) for k in pos)
    candidates = sorted(set(range(1, labels[-1])) - set(labels))
    rng = random.Random(zlib.crc32(prompt.text.encode()) ^ seed)
    return sorted(rng.sample(candidates, min(len(labels), len(candidates))))


def attention_edits(model: HookedModel, conditions: Sequence[Condition], prompts: Sequence) -> AttentionEdits | None:
    """The attention edits of `conditions` (row group g: `conditions[g]`) on `prompts`, or None when no
    condition edits attention (`Condition` with `ablation="label-attention"` or its control
    `"other-attention"`)."""
    edits = [(g, c) for g, c in enumerate(conditions) if c.ablation in ATTENTION_EDITS]
    if not edits:
        return None
    require_heads(model, "down-weighting the attention to demo labels")
    factors: dict[int, Tensor] = {}
    keys: list[tuple[tuple[int, ...], ...]] = [tuple(() for _ in prompts)] * len(conditions)
    labels = tuple(tuple(sorted(k for pos in label_positions(model, p) for k in pos)) for p in prompts)
    for g, c in edits:
        assert c.components is not None and c.factor is not None     # Condition checks both
        c.components.check(model)
        for layer, idx in c.components.by_layer().items():
            factors.setdefault(layer, torch.ones(len(conditions), n_heads(model)))[g, idx] = float(c.factor)
        keys[g] = labels if c.ablation == LABEL_ATTENTION else tuple(tuple(other_positions(model, p, c.seed or 0))
                                                                      for p in prompts)
    return AttentionEdits(factors, tuple(keys))
