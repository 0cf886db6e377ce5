"""One stage of InfLLM chunk attention and the exact log-sum-exp merge of two stages (torch twin).

InfLLM attends a chunk of queries to two key sets at different rotary positions (the local window at
real distances; sinks, retrieved blocks and out-of-window tokens at one fixed distance). Each stage
is an ordinary masked softmax attention that also returns its log-sum-exp, so the two merge into the
exact softmax over the union. GQA is done by grouping query heads instead of repeating K/V.
"""
from __future__ import annotations

import torch


def attention_stage(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked attention of grouped queries; returns (out, lse, probs).

    q: [Hkv, G, C, d]   k, v: [Hkv, N, d]   mask: [C, N] bool (True = visible) or None
    out: [Hkv, G, C, d] lse: [Hkv, G, C] (-inf where a query sees no key)   probs: [Hkv, G, C, N]
    """
    hkv, g, c, d = q.shape
    assert k.shape[0] == hkv and v.shape[:2] == k.shape[:2] and k.shape[-1] == d, (q.shape, k.shape, v.shape)
    n = k.shape[1]
    if n == 0:
        return q.new_zeros(q.shape), q.new_full((hkv, g, c), float("-inf")), q.new_zeros(hkv, g, c, 0)
    scores = torch.matmul(q.reshape(hkv, g * c, d), k.transpose(1, 2)).view(hkv, g, c, n) * scale
    if mask is not None:
        assert mask.shape == (c, n), (mask.shape, c, n)
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # A query that sees nothing has lse = -inf; exp(-inf - -inf) would be nan, so shift by 0 there.
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.matmul(probs.view(hkv, g * c, n), v).view(hkv, g, c, d)
    return out, lse, probs


def merge_stages(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax over the union of two disjoint key sets, from each stage's normalised output and lse.

    out_*: [..., C, d]   lse_*: [..., C]
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), 0.0, lse)
    w_a = torch.exp(lse_a - safe)[..., None]
    w_b = torch.exp(lse_b - safe)[..., None]
    return out_a * w_a + out_b * w_b, lse


def received_mass(probs: torch.Tensor, lse_stage: torch.Tensor, lse_total: torch.Tensor) -> torch.Tensor:
    """Attention probability each key received in the final softmax, summed over the chunk's queries.

    probs: [Hkv, G, C, N] (normalised within the stage)   lse_*: [Hkv, G, C]   -> [Hkv, G, N]
    """
    factor = torch.exp(lse_stage - torch.where(torch.isinf(lse_total), 0.0, lse_total))
    return torch.einsum("hgcn,hgc->hgn", probs, factor)
