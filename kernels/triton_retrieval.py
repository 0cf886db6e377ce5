"""Triton block scoring for InfLLM's memory lookup (twin: kernels.retrieval.score_blocks).

InfLLM (Xiao et al., 2024) scores every memory block by the dot product of the chunk's mean query
(all heads concatenated) with the block's representative keys, then attends to the top-k blocks.
`_block_scores` computes scores[b] = reprs[b].flatten() . query.flatten() for reprs [nb, H*d]: each
program owns BLOCK_B blocks and walks the H*d dimension in BLOCK_K slices, accumulating in fp32.
It is a memory-bound GEMV (every representative byte is read once), so the kernel is only about
streaming reprs at full bandwidth; the output is cast back to the input dtype like the twin's.

Top-k is left to torch.topk (through the twin's `top_blocks`): the score list holds a few thousand
entries at most (one per memory block), so the selection is one tiny launch whose cost is dominated
by launch latency, and torch's implementation already handles ties, k > nb and k = 0; a hand-written
Triton top-k would add a code path to test without a measurable gain.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .retrieval import top_blocks

__all__ = ["block_scores", "top_blocks_triton"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _block_scores(
    REPRS, QUERY, SCORES,
    stride_rb, stride_rk,
    NB, K,                      # blocks, flattened length H * d
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # 1. The blocks this program scores.
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < NB
    offs_k = tl.arange(0, BLOCK_K)
    r_base = REPRS + offs_b.to(tl.int64)[:, None] * stride_rb
    acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    # 2. Walk the flattened H*d dimension: partial dot products of a [BLOCK_B, BLOCK_K] slice, in fp32.
    for start_k in range(0, K, BLOCK_K):
        ks = start_k + offs_k
        k_ok = ks < K
        r = tl.load(r_base + ks[None, :] * stride_rk, mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(QUERY + ks, mask=k_ok, other=0.0)
        acc += tl.sum(r.to(tl.float32) * q.to(tl.float32)[None, :], 1)
    # 3. One score per block, in the output dtype.
    tl.store(SCORES + offs_b, acc.to(SCORES.dtype.element_ty), mask=b_ok)


def _interpreted() -> bool:
    return not isinstance(_block_scores, triton.runtime.jit.JITFunction)


def block_scores(query: torch.Tensor, reprs: torch.Tensor) -> torch.Tensor:
    """query: [H, d]   reprs: [nb, H, d]   -> scores [nb] in query's dtype (fp32 accumulation).

    query must be contiguous; each reprs[b] must be contiguous (any stride between blocks).
    """
    name = "block_scores"
    if not isinstance(query, torch.Tensor) or not isinstance(reprs, torch.Tensor):
        raise ValueError(f"{name}: query and reprs must be torch.Tensors")
    if query.ndim != 2 or reprs.ndim != 3 or reprs.shape[1:] != query.shape:
        raise ValueError(f"{name}: query {tuple(query.shape)} does not fit reprs {tuple(reprs.shape)}")
    if query.dtype not in _DTYPES or reprs.dtype != query.dtype:
        raise ValueError(f"{name}: query and reprs must share a dtype among fp32/fp16/bf16, "
                         f"got {query.dtype} and {reprs.dtype}")
    if query.device != reprs.device:
        raise ValueError(f"{name}: query on {query.device} and reprs on {reprs.device}")
    if query.device.type != "cuda" and not _interpreted():
        raise ValueError(f"{name}: Triton kernels need CUDA tensors (got {query.device}); set TRITON_INTERPRET=1 "
                         "before importing triton to run them on the CPU")
    if not query.is_contiguous():
        raise ValueError(f"{name}: query must be contiguous")
    h, d = query.shape
    if reprs.shape[0] > 0 and not reprs[0].is_contiguous():
        raise ValueError(f"{name}: each reprs[b] must be contiguous (strides {reprs.stride()})")
    nb, kdim = reprs.shape[0], h * d
    scores = torch.empty(nb, dtype=query.dtype, device=query.device)
    if nb == 0:
        return scores
    if kdim == 0:
        return scores.zero_()
    block_b = 16 if _interpreted() else 32
    block_k = min(triton.next_power_of_2(kdim), 64 if _interpreted() else 256)
    _block_scores[(triton.cdiv(nb, block_b),)](
        reprs, query, scores, reprs.stride(0), 1, nb, kdim,
        BLOCK_B=block_b, BLOCK_K=block_k, num_warps=4,
    )
    return scores


def top_blocks_triton(query: torch.Tensor, reprs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """block_scores, then the twin's top_blocks: (ids ascending [k'], scores [k']), k' = min(k, nb)."""
    return top_blocks(block_scores(query, reprs), k)
