"""One stage of InfLLM chunk attention and the exact log-sum-exp merge of two stages (torch twin).

InfLLM attends a chunk of queries to two key sets at different rotary positions (the local window at
real distances; sinks, retrieved blocks and out-of-window tokens at one fixed distance). Each stage
is an ordinary masked softmax attention that also returns its log-sum-exp, so the two merge into the
exact softmax over the union. GQA groups query heads per KV head instead of repeating K/V.

These are the torch twins of the Triton stage kernels (kernels.triton_attention), and the merge that
the Triton path of kernels.chunk and the CPU reading path (kernels.fused) use. Two paths, same numbers:
without per-key mass, PyTorch's fused CPU flash kernel (out + lse, `fused_stage`); with it, an
explicit path that keeps exp-scores and row sums for received_mass.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Stage(NamedTuple):
    out: torch.Tensor               # [Hkv, G, C, d], normalised within the stage
    lse: torch.Tensor               # [Hkv, G, C], -inf where a query sees no key
    exp_scores: torch.Tensor | None  # [Hkv, G, C, N] = exp(s - rowmax), explicit path only
    row_sum: torch.Tensor | None     # [Hkv, G, C] = sum of exp_scores over N


def mask_bias(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """Bool visibility [C, N] -> additive bias [G*C, N] (0 / -inf), tiled for grouped query heads."""
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    return bias.repeat(groups, 1)


def attention_stage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                    scale: float, keep_scores: bool = False) -> Stage:
    """Masked attention of grouped queries.

    q: [Hkv, G, C, d]   k, v: [Hkv, N, d]   bias: [G*C, N] additive (see mask_bias) or None
    """
    hkv, g, c, d = q.shape
    if k.shape[0] != hkv or v.shape[:2] != k.shape[:2] or k.shape[-1] != d:
        raise ValueError(f"attention_stage: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit")
    if bias is not None and bias.shape != (g * c, k.shape[1]):
        raise ValueError(f"attention_stage: bias {tuple(bias.shape)} should be {(g * c, k.shape[1])}")
    n = k.shape[1]
    if n == 0:   # (the fused kernel crashes the process on zero keys)
        empty = None if not keep_scores else q.new_zeros(hkv, g, c, 0)
        return Stage(q.new_zeros(q.shape), q.new_full((hkv, g, c), float("-inf")), empty,
                     None if not keep_scores else q.new_zeros(hkv, g, c))
    if not keep_scores and q.device.type == "cpu":
        blind = None if bias is None else torch.isinf(bias).all(-1).view(g, c)
        out, lse = fused_stage(q, k, v, None if bias is None else bias.view(1, g, c, n), scale, blind)
        return Stage(out, lse, None, None)
    qf = q.reshape(hkv, g * c, d)
    scores = torch.matmul(qf * scale, k.transpose(1, 2)) if bias is None else torch.baddbmm(bias, qf * scale, k.transpose(1, 2))
    rowmax = scores.amax(-1, keepdim=True)
    rowmax = rowmax.masked_fill(torch.isinf(rowmax), 0.0)
    e = scores.sub_(rowmax).exp_()
    row_sum = e.sum(-1)
    out = torch.bmm(e, v) / row_sum.clamp_min(torch.finfo(e.dtype).tiny)[..., None]
    lse = rowmax[..., 0] + row_sum.log()
    return Stage(out.view(hkv, g, c, d), lse.view(hkv, g, c), e.view(hkv, g, c, n), row_sum.view(hkv, g, c))


def fused_stage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
                blind: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention through torch's fused CPU flash kernel: (out [Hkv, G, C, d], lse [Hkv, G, C]).

    q: [Hkv, G, C, d]   k, v: [Hkv, N, d], N > 0 (the kernel crashes the process on zero keys)
    bias: additive, [C, N] (one mask serves the whole group) or [1, G, C, N] (the kernel takes 2 or 4
    dims), or None
    blind: the queries that see no key ([C] or [G, C]), or None: the kernel reports lse 0 for them, and
    they must contribute nothing to a merge.
    """
    hkv, g, c, d = q.shape
    n = k.shape[1]
    # Batch = KV heads, heads = the group: K/V are expanded, not copied.
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k[:, None].expand(hkv, g, n, d), v[:, None].expand(hkv, g, n, d), 0.0, False, attn_mask=bias, scale=scale)
    if blind is not None:
        lse = lse.masked_fill(blind, float("-inf"))
        out = out.masked_fill(blind[..., None], 0.0)
    return out, lse


def merge_stages(a: Stage, b: Stage) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax over the union of two disjoint key sets: (out [..., C, d], lse [..., C])."""
    lse = torch.logaddexp(a.lse, b.lse)
    safe = lse.masked_fill(torch.isinf(lse), 0.0)
    return a.out * torch.exp(a.lse - safe)[..., None] + b.out * torch.exp(b.lse - safe)[..., None], lse


def received_mass(stage: Stage, lse_total: torch.Tensor, keys: slice = slice(None)) -> torch.Tensor:
    """Probability each key received in the merged softmax, summed over the chunk's queries: [Hkv, G, N].

    Needs a stage computed with keep_scores=True; `keys` restricts the sum to some of its keys.
    """
    if stage.exp_scores is None:
        raise ValueError("received_mass needs a stage computed with keep_scores=True")
    hkv, g, c, n = stage.exp_scores.shape
    total = lse_total.masked_fill(torch.isinf(lse_total), 0.0)
    weight = torch.exp(stage.lse - total) / stage.row_sum.clamp_min(torch.finfo(stage.row_sum.dtype).tiny)
    e = stage.exp_scores[..., keys]
    return torch.bmm(weight.reshape(hkv * g, 1, c), e.reshape(hkv * g, c, e.shape[-1])).view(hkv, g, -1)


def columns(p0: int, p1: int, key_start: int | None, n: int, lo: int, hi: int):
    """For queries [p0, p1) and n consecutive keys from key_start, visible iff lo <= p - key < hi:
    (a, b, masked): keys [a, b) are seen by some query; `masked` lists the column ranges within it
    that not every query sees (the band's two edges)."""
    if key_start is None:
        return 0, n, []
    a = max(0, p0 - key_start - hi + 1)
    b = min(n, p1 - key_start - lo)
    if a >= b:
        return 0, 0, []
    full_a = max(a, p1 - 1 - key_start - hi + 1)
    full_b = min(b, p0 - key_start - lo + 1)
    if full_a >= full_b:            # no column is seen by every query: mask them all
        return a, b, [(a, b)]
    return a, b, [r for r in ((a, full_a), (full_b, b)) if r[0] < r[1]]
