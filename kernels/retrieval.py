"""Block scoring and top-k over representatives (torch twin).

The score of a block is the dot product of the chunk's mean query (all heads concatenated) with the
block's representative keys: one list per layer, shared by every head, as in InfLLM.
"""
from __future__ import annotations

from collections.abc import Sequence
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
    spans: torch.Tensor     # [spans] fp32 shares summing to 1; [len(groups), spans] with groups
    lse: torch.Tensor       # [Hkv, rows] each row's log-normaliser: log sum_j exp(q . k_j * scale) over every key


def span_mass(query: torch.Tensor, blocks: torch.Tensor, scale: float, tail: torch.Tensor | None = None,
              chunk: int = 256, block_scale: torch.Tensor | None = None, groups: Sequence[int] = ()) -> SpanMass:
    """Exact attention share of every block: what a full softmax over all these keys would give each.

    query: [H, n, d] (rotated as attention rotates it)   blocks: [nb, Hkv, bs, d] raw keys (may be mapped)
    tail: [Hkv, m, d] keys after the last block, scored as ceil(m / bs) more spans.
    block_scale: [nb, Hkv, 1, d] when blocks are int8 (kernels.int8.pack_keys per block): unpacked a
    chunk at a time, so a long document's keys are never all unpacked at once.
    groups: split the n query positions into consecutive groups (sizes summing to n) and get each
    group's shares, from one pass over the keys (the question focus's words and baseline rows).
    Returns the [nb + ceil(m / bs)] fp32 shares summing to 1 (each (head, query) row's softmax over every
    key, summed per span, averaged over rows) and each row's log-normaliser, with which key_shares weighs
    single tokens later. Blocks are read once, `chunk` at a time, with the softmax kept online
    (flash-attention style), so memory stays bounded at any length.
    """
    h, n, d = query.shape
    nb, hkv, bs, _ = blocks.shape
    if blocks.shape[3] != d or h % hkv:
        raise ValueError(f"span_mass: query {tuple(query.shape)} does not fit blocks {tuple(blocks.shape)}")
    if groups and (sum(groups) != n or min(groups) < 1):
        raise ValueError(f"span_mass: groups {list(groups)} do not split the {n} query positions")
    q = query.float().reshape(hkv, h // hkv * n, d) * scale
    rows = q.shape[1]
    best = torch.full((hkv, rows), -torch.inf, device=q.device)
    sums, maxes = [], []                          # per part: [Hkv, rows, p] at that part's running max
    for keys, n_pad in _key_parts(blocks, block_scale, tail, chunk, q.device):
        logits = torch.bmm(q, keys.transpose(1, 2))                       # [Hkv, rows, p * bs]: one GEMM per head
        if n_pad:
            logits[:, :, -n_pad:].fill_(-torch.inf)                      # fill_: no scalar tensor copied to the device
        m = torch.maximum(best, logits.amax(dim=-1))
        sums.append(logits.sub_(m[:, :, None]).exp_().view(hkv, rows, -1, bs).sum(-1))
        maxes.append(m)
        best = m
    scaled = torch.cat([s * torch.exp(m - best)[:, :, None] for s, m in zip(sums, maxes)], -1)   # [Hkv, rows, spans]
    total = scaled.sum(-1)
    shares = (scaled / total[:, :, None]).view(hkv, h // hkv, n, -1)
    spans = (torch.stack([x.mean(dim=(0, 1, 2)) for x in shares.split(list(groups), dim=2)]) if groups
             else shares.mean(dim=(0, 1, 2)))
    return SpanMass(spans, best + total.log())


def _key_parts(blocks, block_scale, tail, chunk: int, device):
    """The keys span_mass reads, `chunk` blocks at a time as float32 [Hkv, p * bs, d] (GEMM-ready: one copy
    of the int8 codes, not of the floats), then the tail padded to whole spans: (keys, padded columns)."""
    nb, hkv, bs, d = blocks.shape
    for i in range(0, nb, chunk):
        # Blocks may sit on the host (mapped) while the queries are on an accelerator: move a chunk at a time.
        part = blocks[i: i + chunk].to(device).transpose(0, 1).contiguous()               # [Hkv, p, bs, d]
        if block_scale is not None:
            part = int8.unpack_keys(part, block_scale[i: i + chunk].to(device).transpose(0, 1), bs, torch.float32)
        yield part.to(torch.float32).reshape(hkv, -1, d), 0
    if tail is not None and tail.shape[1]:           # the last span is padded to a block, the pad masked out
        n_pad = -tail.shape[1] % bs
        tail = tail.to(device, torch.float32)
        yield torch.cat([tail, tail.new_zeros(hkv, n_pad, d)], 1), n_pad


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
