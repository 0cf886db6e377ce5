"""InfLLM's chunk attention while a book is read on the CPU: torch's fused kernel for the output, and
window masses estimated from fewer queries.

The tiled twin (kernels.chunk) takes the output and the exact masses from the same score tiles: on two
CPU cores, ~70 ms per layer and 512-token chunk, most of reading's time. torch's fused CPU flash kernel
computes the output of the same two stages (window, memory), merged by log-sum-exp (kernels.stage), in
~40 ms, but returns no per-key masses, and recomputing them exactly from the log-sum-exp costs ~60 ms
more (AMD EPYC, fp32; `python -m bench.profile` shows the chunk: 3.1 s before, 2.3 s now).

While reading, the masses only choose each block's representatives: its repr_topk most attended tokens
per head. So they are estimated from the exact probabilities of fewer queries:
  near  every query within NEAR positions after a key. A token's neighbours give it much of its mass,
        and which neighbours count must not depend on where the token sits: sampling every 8th query
        alone favoured the tokens just before a sampled one, and kept 55 % of the representatives.
  far   every EVERY-th query beyond that, each counted EVERY times.
On 16K tokens of lshort.pdf, 92 % of the representatives are those the exact masses choose (mean over
30 layers, lowest layer 80 %: `python -m bench.masses`, bench/results/throughput-cpu.md, issue 23).

Question time (traces, the heatmap's window spans) and decode keep the exact tiled twin.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .stage import Stage, columns, fused_stage, merge_stages

NEAR = 128      # every query this close after a key counts toward its mass ...
EVERY = 8       # ... and beyond, every 8th, counted 8 times
_TILE = 64      # queries per tile of the near pass
_STAGE_TILE = 256


def chunk_attention_fused(q_local: torch.Tensor, q_global: torch.Tensor, start: int, window, memory: Sequence,
                          n_local: int, scale: float, window_mass: bool) -> tuple:
    """kernels.chunk's contract (CPU tensors), with estimated window masses and no memory masses:
    (out [Hkv, G, C, d], window mass [Hkv, G, N_window] fp32 or None)."""
    out, lse = _stage(q_local, [window], start, 0, n_local, scale)
    if memory:
        out, lse = merge_stages(Stage(out, lse, None, None),
                                Stage(*_stage(q_global, memory, start, n_local, 2 ** 62, scale), None, None))
    mass = estimated_mass(q_local, window, start, n_local, scale, lse) if window_mass else None
    return out.to(q_local.dtype), mass


def _stage(q: torch.Tensor, parts: Sequence, start: int, lo: int, hi: int, scale: float):
    """One masked stage through the fused kernel: q [Hkv, G, C, d] against the parts' keys, key j visible
    to query p iff lo <= p - j < hi (position-free parts: always). Returns (out [Hkv, G, C, d], lse [Hkv, G, C]).

    Tiles of _STAGE_TILE queries each take only the keys some of them see: the band's masked corners
    are then ~10 % of the work instead of ~20 % (22 against 25 ms for a window, measured)."""
    hkv, g, c, d = q.shape
    outs, lses = [], []
    for i0 in range(0, c, _STAGE_TILE):
        i1 = min(c, i0 + _STAGE_TILE)
        seen = []                               # (keys, values, start) of what the tile's queries see
        for p in parts:
            a, b, _ = columns(start + i0, start + i1, p.start, p.k.shape[1], lo, hi)
            if a < b:
                seen.append((p.k[:, a:b], p.v[:, a:b], None if p.start is None else p.start + a))
        if not seen:                            # (the fused kernel crashes the process on zero keys)
            outs.append(q.new_zeros(hkv, g, i1 - i0, d))
            lses.append(q.new_full((hkv, g, i1 - i0), float("-inf"), dtype=torch.float32))
            continue
        k = torch.cat([x[0] for x in seen], 1) if len(seen) > 1 else seen[0][0]
        v = torch.cat([x[1] for x in seen], 1) if len(seen) > 1 else seen[0][1]
        bias, blind = visibility(start + i0, i1 - i0, 1, tuple((x[2], x[0].shape[1]) for x in seen), lo, hi, q.device)
        out, lse = fused_stage(q[:, :, i0:i1], k, v, bias, scale, blind)       # the [t, N] mask serves the group
        outs.append(out)
        lses.append(lse)
    return (torch.cat(outs, 2), torch.cat(lses, 2)) if len(outs) > 1 else (outs[0], lses[0])


def visibility(p0: int, c: int, step: int, parts: Sequence[tuple[int | None, int]], lo: int, hi: int,
               device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """For queries p0, p0 + step, .. (c of them) and key parts (start or None, length): the additive mask
    [c, N] (0 or -inf; None when every query sees every key) and the queries that see none [c] (or None).

    The same for every layer of a chunk, and for the window and the near tiles the same at every chunk
    (only positions relative to the first query matter), hence cached."""
    return _visibility(c, step, tuple((None if s is None else s - p0, n) for s, n in parts), lo, hi, device)


@functools.lru_cache(maxsize=16)
def _visibility(c: int, step: int, parts: tuple[tuple[int | None, int], ...], lo: int, hi: int, device: torch.device):
    p = torch.arange(0, c * step, step, device=device)[:, None]
    cols = []
    for key_start, n in parts:
        if key_start is None:
            cols.append(torch.zeros(c, n, device=device))
        else:
            rel = p - torch.arange(key_start, key_start + n, device=device)
            cols.append(torch.zeros(c, n, device=device).masked_fill_((rel < lo) | (rel >= hi), float("-inf")))
    bias = torch.cat(cols, 1) if len(cols) > 1 else cols[0]
    hidden = torch.isinf(bias)
    if not bool(hidden.any()):
        return None, None
    blind = hidden.all(-1)
    return bias, blind if bool(blind.any()) else None


def estimated_mass(q_local: torch.Tensor, window, start: int, n_local: int, scale: float,
                   lse: torch.Tensor) -> torch.Tensor:
    """Each window key's mass [Hkv, G, N] (fp32) from the near queries and every EVERY-th far one (module doc).

    q_local: [Hkv, G, C, d] at the window's rotation; lse: [Hkv, G, C] the log-normalisers of the whole
    softmax (window and memory), so each probability counted is the exact one."""
    hkv, g, c, d = q_local.shape
    k, n, k0 = window.k, window.k.shape[1], window.start
    near = min(NEAR, n_local)
    mass = torch.zeros(hkv, g, n, dtype=torch.float32, device=q_local.device)
    qs = q_local * scale
    # near: a tile's queries see ~NEAR + _TILE keys; the tiles whose keys all lie in the window in one product
    first = _near_tiles(mass, qs, k, lse, start - k0, near) if start - k0 >= near - 1 else 0
    for i0 in range(first, c, _TILE):
        i1 = min(c, i0 + _TILE)
        a, b = max(0, start + i0 - k0 - near + 1), min(n, start + i1 - k0)
        if a >= b:
            continue
        bias, _ = visibility(start + i0, i1 - i0, 1, ((k0 + a, b - a),), 0, near, q_local.device)
        s = _scores(qs[:, :, i0:i1], k[:, a:b]).sub_(lse[:, :, i0:i1, None])
        mass[..., a:b] += (s if bias is None else s.add_(bias)).exp_().sum(2)
    if n_local > near:                              # far: every EVERY-th query, counted EVERY times
        rows = slice(EVERY - 1, c, EVERY)
        m = c // EVERY                              # rows EVERY-1, 2*EVERY-1, ..
        if m:
            bias, _ = visibility(start + EVERY - 1, m, EVERY, ((k0, n),), near, n_local, q_local.device)
            s = _scores(qs[:, :, rows], k).sub_(lse[:, :, rows, None])
            mass += (s if bias is None else s.add_(bias)).exp_().sum(2).mul_(EVERY)
    return mass


def _near_tiles(mass: torch.Tensor, qs: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, at: int, near: int) -> int:
    """The near pass of the chunk's whole tiles at once, when the window holds near - 1 keys before the first
    query (at = its index in the window): tile i's queries see the keys [a + i*_TILE, a + i*_TILE + w), a =
    at - near + 1, w = near - 1 + _TILE, the same band in every tile. One product over overlapping views of
    the keys instead of one per tile (~80 operators a layer fewer). Returns the queries done."""
    hkv, g, c, d = qs.shape
    t = c // _TILE
    if t < 2:
        return 0
    a, w = at - near + 1, near - 1 + _TILE
    kw = k.as_strided((hkv, t, w, d), (k.stride(0), _TILE * k.stride(1), k.stride(1), k.stride(2)),
                      k.storage_offset() + a * k.stride(1))                       # [Hkv, t, w, d], overlapping
    q = qs[:, :, : t * _TILE].reshape(hkv, g, t, _TILE, d).transpose(1, 2)        # [Hkv, t, G, T, d]
    s = torch.matmul(q.reshape(hkv, t, g * _TILE, d), kw.transpose(2, 3)).float().view(hkv, t, g, _TILE, w)
    s.sub_(lse[:, :, : t * _TILE].reshape(hkv, g, t, _TILE).transpose(1, 2)[..., None])
    bias, _ = visibility(at, _TILE, 1, ((a, w),), 0, near, qs.device)           # the same for every tile
    got = (s if bias is None else s.add_(bias)).exp_().sum(3)                      # [Hkv, t, G, w]
    m = -(-w // _TILE)                                 # the band in m slices of _TILE keys: tile i's slice j is
    got = F.pad(got, (0, m * _TILE - w)).view(hkv, t, g, m, _TILE).transpose(1, 2)   # the chunk's slice i + j
    acc = got.new_zeros(hkv, g, t + m - 1, _TILE)
    for j in range(m):
        acc[:, :, j: j + t] += got[:, :, :, j]
    end = min(mass.shape[-1], a + acc.shape[2] * _TILE)                           # past it: padding, zeros
    mass[..., a: end] += acc.view(hkv, g, -1)[..., : end - a]
    return t * _TILE


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q [Hkv, G, t, d] (scaled) against k [Hkv, n, d]: fp32 scores [Hkv, G, t, n], the group's rows in one
    GEMM per KV head (broadcasting k over the group would copy it)."""
    hkv, g, t, d = q.shape
    return torch.bmm(q.reshape(hkv, g * t, d), k.transpose(1, 2)).float().view(hkv, g, t, -1)
