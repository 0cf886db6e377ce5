"""Block scoring and top-k over representatives (torch twin).

The score of a block is the dot product of the chunk's mean query (all heads concatenated) with the
block's representative keys: one list per layer, shared by every head, as in InfLLM.
"""
from __future__ import annotations

import torch


def score_blocks(query: torch.Tensor, reprs: torch.Tensor) -> torch.Tensor:
    """query: [H, d]   reprs: [nb, H, d]   -> scores [nb]"""
    assert reprs.ndim == 3 and reprs.shape[1:] == query.shape, (query.shape, reprs.shape)
    return reprs.reshape(reprs.shape[0], -1) @ query.reshape(-1)


def topk_blocks(query: torch.Tensor, reprs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best blocks, in ascending block order (memory order keeps the gather contiguous-ish).

    Returns (ids [k'], scores [k']) with k' = min(k, nb).
    """
    scores = score_blocks(query, reprs)
    k = min(k, scores.shape[0])
    if k == 0:
        return scores.new_zeros(0, dtype=torch.long), scores.new_zeros(0)
    top = torch.topk(scores, k, sorted=False)
    order = torch.argsort(top.indices)
    return top.indices[order], top.values[order]
