"""Batching token rows: which prompts share a batch (`token_batches`) and left padding (`left_pad`).

Prompts of any lengths may share a batch when the architecture's decoder keeps the padding out of
every real position (`Arch.run_blocks`); plain forward passes batch only prompts of equal length.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

#: the most padding a batch may hold, as a share of its tokens (more batches cost less than padding)
MAX_PADDING = 0.1


def token_batches(ids: Sequence[Tensor], budgets: Sequence[int], size: int, pad: bool) -> list[list[int]]:
    """Prompt indices per batch of at most `size`, shortest first: single-token and generated answers
    apart; with `pad` a batch ends before padding would exceed MAX_PADDING of its tokens, without
    it only prompts of equal length share one."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in sorted(range(len(ids)), key=lambda i: len(ids[i])):
        groups[(budgets[i] == 1, pad or len(ids[i]))].append(i)
    out = []
    for items in groups.values():
        batch: list[int] = []
        total = 0
        for i in items:
            width = len(ids[i]) * (len(batch) + 1)    # the padded size if prompt i (the longest) joins
            if batch and (len(batch) == size or width - total - len(ids[i]) > MAX_PADDING * width):
                out.append(batch)
                batch, total = [], 0
            batch.append(i)
            total += len(ids[i])
        out.append(batch)
    return out


def left_pad(ids: Sequence[Int[Tensor, "_pos"]], pad_id: int = 0
             ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Stack token rows of any lengths, padded on the left with `pad_id`; and the mask (1 = token)."""
    width = max(len(t) for t in ids)
    tokens = torch.full((len(ids), width), pad_id, dtype=torch.long, device=ids[0].device)
    mask = torch.zeros_like(tokens)
    for r, t in enumerate(ids):
        tokens[r, width - len(t):], mask[r, width - len(t):] = t, 1
    return tokens, mask
