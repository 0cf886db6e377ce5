"""Block scoring and top-k over representatives (torch twin).

The score of a block is the dot product of the chunk's mean query (all heads concatenated) with the
block's representative keys: one list per layer, shared by every head, as in InfLLM.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import int8


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


class SpanMass(NamedTuple):
    spans: torch.Tensor     # [spans] fp32 shares summing to 1
    lse: torch.Tensor       # [Hkv, rows] each row's log-normaliser: log sum_j exp(q . k_j * scale) over every key


def span_mass(query: torch.Tensor, blocks: torch.Tensor, scale: float, tail: torch.Tensor | None = None,
              chunk: int = 256, block_scale: torch.Tensor | None = None) -> SpanMass:
    """Exact attention share of every block: what a full softmax over all these keys would give each.

    query: [H, n, d] (rotated as attention rotates it)   blocks: [nb, Hkv, bs, d] raw keys (may be mapped)
    tail: [Hkv, m, d] keys after the last block, scored as ceil(m / bs) more spans.
    block_scale: [nb, Hkv, 1, d] when blocks are int8 (kernels.int8.pack_keys per block): unpacked a
    chunk at a time, so a long document's keys are never all unpacked at once.
    Returns the [nb + ceil(m / bs)] fp32 shares summing to 1 (each (head, query) row's softmax over every
    key, summed per span, averaged over rows) and each row's log-normaliser, with which key_shares weighs
    single tokens later. Blocks are read once, `chunk` at a time, with the softmax kept online
    (flash-attention style), so memory stays bounded at any length.
    """
    h, n, d = query.shape
    nb, hkv, bs, _ = blocks.shape
    if blocks.shape[3] != d or h % hkv:
        raise ValueError(f"span_mass: query {tuple(query.shape)} does not fit blocks {tuple(blocks.shape)}")
    q = query.float().reshape(hkv, h // hkv * n, d) * scale
    parts = [blocks[i: i + chunk] for i in range(0, nb, chunk)]
    scales = [block_scale[i: i + chunk] for i in range(0, nb, chunk)] if block_scale is not None else []
    n_pad = 0
    if tail is not None and tail.shape[1]:           # the last span is padded to a block, the pad masked out
        n_pad = -tail.shape[1] % bs
        parts.append(torch.cat([tail, tail.new_zeros(hkv, n_pad, d)], 1).view(hkv, -1, bs, d).transpose(0, 1))
    best = torch.full((hkv, q.shape[1]), -torch.inf, device=q.device)
    sums = []                                                     # per part: [p, Hkv, rows] at that part's max
    maxes = []
    for i, part in enumerate(parts):
        # Blocks may sit on the host (mapped) while the queries are on an accelerator: move a chunk at a time.
        if i < len(scales):
            part = int8.unpack_keys(part.to(q.device), scales[i].to(q.device), bs, torch.float32)
        logits = torch.einsum("grd,pgjd->pgrj", q, part.to(q.device, torch.float32))  # [p, Hkv, rows, bs]
        if n_pad and i == len(parts) - 1:
            logits[-1, :, :, bs - n_pad:].fill_(-torch.inf)      # fill_: no scalar tensor copied to the device
        m = torch.maximum(best, logits.amax(dim=(0, 3)))
        sums.append(torch.exp(logits - m[None, :, :, None]).sum(-1))
        maxes.append(m)
        best = m
    scaled = torch.cat([s * torch.exp(m - best)[None] for s, m in zip(sums, maxes)])    # [spans, Hkv, rows]
    total = scaled.sum(0)
    return SpanMass((scaled / total[None]).mean(dim=(1, 2)), best + total.log())


def key_shares(query: torch.Tensor, keys: torch.Tensor, scale: float, lse: torch.Tensor) -> torch.Tensor:
    """Each key's share of the rows' attention, under softmaxes whose normalisers are already known.

    query: [H, n, d] as span_mass took it   keys: [Hkv, m, d] raw, some of the keys span_mass saw
    lse: [Hkv, H / Hkv * n] span_mass's.   Returns [m]: exp(q . k * scale - lse) averaged over the rows, so
    a span's tokens add up to its span_mass share. The question focus weighs the tokens of its best spans
    with it, for the sentence an answer quotes.
    """
    h, n, d = query.shape
    hkv = keys.shape[0]
    if keys.shape[2] != d or h % hkv or lse.shape != (hkv, h // hkv * n):
        raise ValueError(f"key_shares: query {tuple(query.shape)}, keys {tuple(keys.shape)} and lse "
                         f"{tuple(lse.shape)} do not fit")
    q = query.float().reshape(hkv, h // hkv * n, d) * scale
    logits = torch.einsum("grd,gjd->grj", q, keys.to(q.device, torch.float32))        # [Hkv, rows, m]
    return torch.exp(logits - lse[:, :, None]).mean(dim=(0, 1))
