"""Block scoring and top-k over representatives (torch twin).

The score of a block is the dot product of the chunk's mean query (all heads concatenated) with the
block's representative keys: one list per layer, shared by every head, as in InfLLM.
"""
from __future__ import annotations

import torch


def score_blocks(query: torch.Tensor, reprs: torch.Tensor) -> torch.Tensor:
    """query: [H, d]   reprs: [nb, H, d]   -> scores [nb]"""
    if reprs.ndim != 3 or reprs.shape[1:] != query.shape:
        raise ValueError(f"score_blocks: query {tuple(query.shape)} does not fit reprs {tuple(reprs.shape)}")
    return reprs.reshape(reprs.shape[0], -1) @ query.reshape(-1)


def top_blocks(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of scores [nb], in ascending block order: (ids [k'], scores [k']), k' = min(k, nb)."""
    k = min(k, scores.shape[0])
    if k == 0:
        return scores.new_zeros(0, dtype=torch.long), scores.new_zeros(0)
    top = torch.topk(scores, k, sorted=False)
    order = torch.argsort(top.indices)
    return top.indices[order], top.values[order]


def topk_blocks(query: torch.Tensor, reprs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """score_blocks then top_blocks."""
    return top_blocks(score_blocks(query, reprs), k)
