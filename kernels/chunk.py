"""InfLLM's attention for one chunk of queries, in one call: window + memory, with the mass each key received.

A chunk of C queries at positions start .. start + C - 1 attends to two kinds of keys:
  window  the local window, consecutive positions; key j is visible to query p iff 0 <= p - j < n_local.
          Queries and keys come rotated at their relative positions (the caller's rotary choice).
  memory  parts at the fixed memory distance: sinks and not-yet-blocked tokens (consecutive positions,
          visible iff p - j >= n_local) and retrieved blocks (position-free: always visible).
The result is one exact softmax over everything a query sees. Representative selection needs, per
window key, the probability it received summed over the chunk's queries (and the heatmap the same for
memory keys), so the call returns that "mass" as well.

Two implementations, one contract, and a faster CPU path for reading:
  `chunk_attention_torch`   the CPU path and the oracle. It walks the queries in tiles of 64 so the
                            score tile stays in cache, computes each part's scores with one GEMM,
                            masks only the tile's edge columns (visibility is a band, the rest is
                            known visible), and takes the softmax over all parts at once: no
                            log-sum-exp merge, no concatenation of K/V, no [C, N] mask.
  `chunk_attention_triton`  two Triton stages (kernels.triton_attention) merged by log-sum-exp, and the
                            mass kernel; for CUDA tensors.
  kernels.fused             while a book is read (exact_mass=False): torch's fused CPU kernel for the
                            output and window masses estimated from fewer queries, ~1.45x faster per
                            layer; the tiled twin is its oracle.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .fused import chunk_attention_fused
from .stage import Stage, columns, merge_stages

BACKENDS = ("torch", "triton")
CHOICES = ("auto", *BACKENDS)
_TILE = 64                  # queries per tile: a [Hkv, G*64, ~2.5K] fp32 score tile is ~6 MB
_FAR = -(2 ** 40)           # a retrieved block's position for the Triton stage: always beyond the window
_NO_LIMIT = 2 ** 62


@functools.lru_cache(maxsize=None)
def _resolve(choice: str, device_type: str) -> str:
    if choice not in CHOICES:
        raise ValueError(f"kernels must be one of {CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice
    if device_type != "cuda":
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"


def backend_for(choice: str, device: torch.device) -> str:
    """The kernels to run on tensors of this device: 'auto' is Triton on CUDA (when installed), the torch
    twin elsewhere; 'torch' or 'triton' forces one. Asked by every layer at every step, so cached."""
    return _resolve(choice, device.type)


class Keys(NamedTuple):
    """k, v: [Hkv, N, d]. start: position of the first key (the rest follow one by one), or None for
    keys every query sees (retrieved memory blocks, which are position-free)."""

    k: torch.Tensor
    v: torch.Tensor
    start: int | None


class ChunkOut(NamedTuple):
    out: torch.Tensor                                  # [Hkv, G, C, d]
    window_mass: torch.Tensor | None                   # [Hkv, G, N_window] fp32
    memory_mass: list[torch.Tensor] | None             # per memory part, [Hkv, G, N_part] fp32


def chunk_attention(q_local: torch.Tensor, q_global: torch.Tensor, start: int, window: Keys,
                    memory: Sequence[Keys], n_local: int, scale: float, window_mass: bool = False,
                    memory_mass: bool = False, backend: str = "auto", exact_mass: bool = True) -> ChunkOut:
    """q_local, q_global: [Hkv, G, C, d] (the same queries rotated for the window and for the memory).

    window.start must be set; memory parts may have start None. Masses are sums over the C queries of
    the probability each key received in the one softmax over all visible keys. exact_mass=False lets
    the torch backend estimate the window masses of a chunk on the CPU (kernels.fused: what reading
    needs, ~1.45x faster per layer); it then returns no memory masses, so it applies only when none are asked.
    """
    _check(q_local, q_global, window, memory, n_local)
    if backend not in CHOICES:
        raise ValueError(f"chunk_attention: backend must be one of {CHOICES}, got {backend!r}")
    backend = backend_for(backend, q_local.device)
    if (backend == "torch" and not (exact_mass and window_mass) and not memory_mass
            and q_local.device.type == "cpu" and q_local.shape[2] >= _TILE):
        out, mass = chunk_attention_fused(q_local, q_global, start, window, memory, n_local, scale, window_mass)
        return ChunkOut(out, mass, None)
    if backend == "triton":
        return chunk_attention_triton(q_local, q_global, start, window, memory, n_local, scale, window_mass, memory_mass)
    return chunk_attention_torch(q_local, q_global, start, window, memory, n_local, scale, window_mass, memory_mass)


def _check(q_local, q_global, window: Keys, memory: Sequence[Keys], n_local: int) -> None:
    if q_local.ndim != 4 or q_global.shape != q_local.shape:
        raise ValueError(f"chunk_attention: q_local {tuple(q_local.shape)} and q_global "
                         f"{tuple(q_global.shape)} must both be [Hkv, G, C, d]")
    hkv, _, _, d = q_local.shape
    if window.start is None:
        raise ValueError("chunk_attention: the window's keys need positions (window.start)")
    if n_local < 1:
        raise ValueError(f"chunk_attention: n_local must be positive, got {n_local}")
    for name, part in [("window", window)] + [(f"memory[{i}]", p) for i, p in enumerate(memory)]:
        if part.k.ndim != 3 or part.k.shape[0] != hkv or part.k.shape[2] != d or part.v.shape != part.k.shape:
            raise ValueError(f"chunk_attention: {name} k {tuple(part.k.shape)}, v {tuple(part.v.shape)} "
                             f"do not fit queries {tuple(q_local.shape)}")


def chunk_attention_torch(q_local, q_global, start, window: Keys, memory: Sequence[Keys], n_local: int,
                          scale: float, window_mass: bool = False, memory_mass: bool = False) -> ChunkOut:
    """The torch twin (see the module doc)."""
    hkv, g, c, d = q_local.shape
    if c == 1:
        return _one_query(q_local, q_global, start, window, memory, n_local, scale, window_mass, memory_mass)
    dev = q_local.device
    parts = [(q_local * scale, window, 0, n_local)] + [(q_global * scale, m, n_local, _NO_LIMIT) for m in memory]
    masses = [torch.zeros(hkv, g, p.k.shape[1], dtype=torch.float32, device=dev) if want else None
              for p, want in zip([window, *memory], [window_mass] + [memory_mass] * len(memory))]
    out = torch.empty(hkv, g, c, d, dtype=q_local.dtype, device=dev)
    for i0 in range(0, c, _TILE):
        i1 = min(c, i0 + _TILE)
        t, p0, p1 = i1 - i0, start + i0, start + i1
        tile = []                          # (scores [Hkv, G*t, b-a] masked, values [Hkv, b-a, d], mass, a, b)
        for (qs, keys, lo, hi), mass in zip(parts, masses):
            a, b, masked = columns(p0, p1, keys.start, keys.k.shape[1], lo, hi)
            if a == b:
                continue
            # fp32 scores whatever the inputs, so the softmax and the masses that pick representatives
            # keep fp32 precision under bf16/fp16 K/V (as the Triton stages do).
            s = torch.matmul(qs[:, :, i0:i1].reshape(hkv, g * t, d), keys.k[:, a:b].transpose(1, 2)).float()
            for x0, x1 in masked:
                rel = torch.arange(p0, p1, device=dev)[:, None] - torch.arange(keys.start + x0, keys.start + x1, device=dev)
                hidden = (rel < lo) | (rel >= hi)
                s.view(hkv, g, t, b - a)[..., x0 - a: x1 - a].masked_fill_(hidden, float("-inf"))
            tile.append((s, keys.v[:, a:b], mass, a, b))
        if not tile:
            out[:, :, i0:i1] = 0
        else:
            out[:, :, i0:i1] = _many_queries(tile, t).view(hkv, g, t, d)
    return ChunkOut(out, masses[0], masses[1:] if memory_mass else None)


def _many_queries(tile: list, t: int) -> torch.Tensor:
    """Softmax over every part without joining them: the score tile is megabytes, so each pass works
    in place on one part (max over all parts, then exp, sums and P @ V part by part)."""
    live = [s for s, *_ in tile]
    row_max = torch.stack([s.amax(-1) for s in live]).amax(0) if len(live) > 1 else live[0].amax(-1)
    row_max = row_max.masked_fill_(torch.isinf(row_max), 0.0)[..., None]     # a row seeing nothing: all exp 0
    acc, row_sum = None, None
    for s, v, *_ in tile:
        e = s.sub_(row_max).exp_()
        row_sum = e.sum(-1) if row_sum is None else row_sum + e.sum(-1)
        pv = torch.matmul(e.to(v.dtype), v)
        acc = pv.float() if acc is None else acc.add_(pv)
    inv = 1.0 / row_sum.clamp_min(torch.finfo(row_sum.dtype).tiny)          # [Hkv, G*t]
    hkv, gt = inv.shape
    for s, _, mass, a, b in tile:
        if mass is not None:
            mass[..., a:b] += torch.matmul(inv.view(-1, 1, t), s.view(-1, t, b - a)).view(hkv, gt // t, b - a)
    return acc * inv[..., None]                          # fp32; the caller's out has the inputs' dtype


def _one_query(q_local, q_global, start, window: Keys, memory: Sequence[Keys], n_local: int, scale: float,
               window_mass: bool, memory_mass: bool) -> ChunkOut:
    """Decode: one query sees one contiguous range of each part (columns masks nothing), a few hundred keys
    when the question focus reads its evidence alone. The work is then the operators' fixed cost, not
    their FLOPs, so the parts' scores are joined into one row per head, take one softmax, and the masses
    are views of it: ~1.5x fewer operators than the tiled walk (tests/test_chunk_attention.py holds both
    to the same oracle)."""
    hkv, g, _, d = q_local.shape
    parts = [(q_local, window, 0, n_local)] + [(q_global, m, n_local, _NO_LIMIT) for m in memory]
    seen, scores = [], []                              # (part index, a, b), [Hkv, G, b - a] fp32
    for i, (q, keys, lo, hi) in enumerate(parts):
        a, b, _ = columns(start, start + 1, keys.start, keys.k.shape[1], lo, hi)
        if a < b:
            seen.append((i, a, b))
            scores.append(torch.matmul(q.view(hkv, g, d), keys.k[:, a:b].transpose(1, 2)).float())
    rows = {}                                          # part index -> (a, b, its probabilities [Hkv, G, b - a])
    if not seen:
        out = q_local.new_zeros(hkv, g, 1, d)
    else:
        probs = torch.softmax((torch.cat(scores, -1) if len(scores) > 1 else scores[0]) * scale, dim=-1)
        out = None
        for (i, a, b), p in zip(seen, probs.split([b - a for _, a, b in seen], -1)):
            rows[i] = (a, b, p)
            v = parts[i][1].v[:, a:b]
            out = torch.matmul(p.to(v.dtype), v) if out is None else torch.baddbmm(out, p.to(v.dtype), v)
        out = out.view(hkv, g, 1, d).to(q_local.dtype)
    masses = []
    for i, (_, keys, _, _) in enumerate(parts):       # a part seen whole: its mass is a view of the probabilities
        n = keys.k.shape[1]
        if not (window_mass if i == 0 else memory_mass):
            masses.append(None)
        elif i not in rows:
            masses.append(torch.zeros(hkv, g, n, dtype=torch.float32, device=q_local.device))
        else:
            a, b, p = rows[i]
            masses.append(p if (a, b) == (0, n) else F.pad(p, (a, n - b)))
    return ChunkOut(out, masses[0], masses[1:] if memory_mass else None)


def chunk_attention_triton(q_local, q_global, start, window: Keys, memory: Sequence[Keys], n_local: int,
                           scale: float, window_mass: bool = False, memory_mass: bool = False) -> ChunkOut:
    """Two Triton stages merged by log-sum-exp, then the mass kernel (CUDA, or TRITON_INTERPRET=1)."""
    from . import triton_attention as tri     # imported on first use: importing triton costs ~1 s

    hkv, g, c, d = q_local.shape
    dev = q_local.device
    q_pos = torch.arange(start, start + c, device=dev)
    w_pos = torch.arange(window.start, window.start + window.k.shape[1], device=dev)
    local = tri.stage_attention(q_local, window.k, window.v, q_pos, w_pos, 0, n_local, scale)
    if memory:
        mk = torch.cat([m.k for m in memory], 1) if len(memory) > 1 else memory[0].k
        mv = torch.cat([m.v for m in memory], 1) if len(memory) > 1 else memory[0].v
        m_pos = torch.cat([torch.full((m.k.shape[1],), _FAR, device=dev) if m.start is None
                           else torch.arange(m.start, m.start + m.k.shape[1], device=dev) for m in memory])
        far = tri.stage_attention(q_global, mk, mv, q_pos, m_pos, n_local, _NO_LIMIT, scale)
    else:
        far = (q_local.new_zeros(q_local.shape), torch.full((hkv, g, c), float("-inf"), device=dev))
    out, lse = merge_stages(Stage(*local, None, None), Stage(*far, None, None))
    lse = lse.contiguous()
    w_mass = tri.key_mass(q_local, window.k, q_pos, w_pos, 0, n_local, scale, lse) if window_mass else None
    m_mass = None
    if memory_mass:
        m_mass = list(tri.key_mass(q_global, mk, q_pos, m_pos, n_local, _NO_LIMIT, scale, lse)
                      .split([m.k.shape[1] for m in memory], dim=-1)) if memory else []
    return ChunkOut(out.to(q_local.dtype), w_mass, m_mass)
