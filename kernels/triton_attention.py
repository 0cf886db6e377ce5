"""Triton kernels for one InfLLM attention stage and for the attention mass each key received.

What this implements
--------------------
InfLLM (Xiao et al., 2024, "InfLLM: Training-Free Long-Context Extrapolation for LLMs with an
Efficient Context Memory") attends a chunk of queries to two key sets - the local window at real
relative positions, and the global memory (sinks, retrieved blocks, not-yet-blocked old tokens) at
one fixed distance - and merges the two stages exactly by log-sum-exp. Each stage is an ordinary
masked softmax attention that must also report its log-sum-exp; `kernels.stage.attention_stage`
is the torch twin, and `received_mass` the twin of `key_mass`.

`_stage_fwd` is the FlashAttention-2 forward (Dao, 2023, "FlashAttention-2: Faster Attention with
Better Parallelism and Work Partitioning"): one program per (KV head, query tile) streams the key
tiles, keeps a running row maximum and row sum (the online softmax), rescales its fp32 accumulator
when the maximum grows and divides once at the end. `_key_mass` recomputes the scores tile by tile
and sums exp(s - lse_total) over the queries, so the representative-token selection needs neither
the [C, N] score matrix nor a second pass over V.

What differs from the Triton fused-attention tutorial (06-fused-attention.py)
------------------------------------------------------------------------------
* Masks come from a position rule, not from causality: keys and queries carry int64 token positions
  and key j is visible to query p iff MIN_DIST <= p - pos_j < MAX_DIST. The local stage is
  (0, n_local); the global stage is (n_local, huge), with retrieved memory blocks given a very
  negative position (e.g. -2**40) so that the same rule makes them always visible. Positions need
  not be sorted, so no key tile is skipped: the rule is evaluated on every tile.
* GQA by grouping: the G query heads that share KV head h are stacked into one [G*C, d] matrix (row
  r is head h*G + r // C, query r % C), so each K/V tile loaded serves all G heads; K/V are never
  repeated.
* The kernel writes the natural-log lse (fp32) next to the output, because InfLLM merges stages;
  a row that sees no key gets lse = -inf and out = 0 (no NaN), so it contributes nothing to a merge.
* Forward only: no backward kernel, no dropout, no causal-stage split, no autotuning, no FP8.

Caveats
-------
* Tile sizes are fixed heuristics (see `_tiles`), not tuned: this was written and tested on a CPU
  machine under TRITON_INTERPRET=1. The kernels compile for sm_90 (triton.compile with a GPUTarget,
  no device) but have not been run or timed on a GPU; tests/test_triton_kernels.py::test_on_the_gpu
  is the check to run where one exists.
* `key_mass` recomputes Q K^T (a second pass over Q and K) instead of keeping per-tile statistics
  from `_stage_fwd`: it needs lse_total, which exists only after both stages have run.
* The Triton interpreter computes tl.dot on bf16 operands with their raw uint16 bit patterns (wrong
  numbers), so under the interpreter bf16 operands are upcast to fp32 before each dot (constexpr
  UPCAST). On a GPU bf16 goes to the tensor cores as is.
* fp32 inputs use input_precision="ieee" (no TF32), so fp32 results match the fp32 twin to ~1e-6.
* In fp16/bf16 the probabilities are rounded to the input dtype before the P @ V dot, as in
  FlashAttention; lse and the mass are computed from the fp32 scores and are not affected.
* Distances p - pos_j are int64: positions must stay well inside +-2**62 (min_dist and max_dist are
  clamped to +-2**62, so a "huge" max_dist such as 2**63 - 1 is fine).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["stage_attention", "key_mass"]

_LOG2E = 1.4426950408889634
_DIST_LIMIT = 2 ** 62
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HEAD_DIMS = (16, 32, 64, 128)


@triton.jit(do_not_specialize=["MIN_DIST", "MAX_DIST"])
def _stage_fwd(
    Q, K, V, QPOS, KPOS, OUT, LSE,
    stride_qh, stride_qg, stride_qc, stride_qd,
    stride_kh, stride_kn, stride_kd,
    stride_vh, stride_vn, stride_vd,
    stride_oh, stride_om, stride_od,
    stride_lh,
    C, N, M,                        # queries per head, keys, rows of the grouped matrix (G * C)
    MIN_DIST, MAX_DIST, qk_scale,   # visibility rule on p - pos_j; qk_scale = scale * log2(e)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # 1. Which KV head and which rows of its grouped query matrix [G*C, d] this program owns.
    start_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)          # grouped row r = g * C + c
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < M
    g = offs_m // C
    c = offs_m % C

    # 2. Load the query tile once (rows of several query heads may share it) and the row positions.
    q_ptrs = Q + off_h * stride_qh + g[:, None] * stride_qg + c[:, None] * stride_qc + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = tl.load(QPOS + c, mask=row_ok, other=0)

    # 3. Online-softmax state in fp32, in the log2 domain: running max, running sum, accumulator.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + off_h * stride_kh
    v_base = V + off_h * stride_vh
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < N
        # 4. Load K^T [d, BLOCK_N] and the key positions; S = Q K^T (fp32 accumulate), in log2 units.
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=col_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        k_pos = tl.load(KPOS + cols, mask=col_ok, other=0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        # 5. The position rule, evaluated in-kernel: MIN_DIST <= p - pos_j < MAX_DIST.
        dist = q_pos[:, None] - k_pos[None, :]
        visible = (dist >= MIN_DIST) & (dist < MAX_DIST) & col_ok[None, :] & row_ok[:, None]
        s = tl.where(visible, s, float("-inf"))
        # 6. New running max; a row that has seen nothing yet keeps -inf and uses 0 as its shift.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])                        # masked entries: exp2(-inf) = 0
        alpha = tl.exp2(m_i - m_safe)                           # rescale of the old state
        l_i = l_i * alpha + tl.sum(p, 1)
        # 7. acc = acc * alpha + P V, with P in the dtype of V (FlashAttention's rounding).
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=col_ok[:, None], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    # 8. Normalise once; rows that saw no key get out = 0 and lse = -inf (natural log).
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptrs = OUT + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + off_h * stride_lh + offs_m, lse, mask=row_ok)


@triton.jit(do_not_specialize=["MIN_DIST", "MAX_DIST"])
def _key_mass(
    Q, K, QPOS, KPOS, LSE, MASS,
    stride_qh, stride_qg, stride_qc, stride_qd,
    stride_kh, stride_kn, stride_kd,
    stride_lh, stride_lg,
    stride_mh, stride_mg,
    C, N,
    MIN_DIST, MAX_DIST, qk_scale,   # qk_scale = scale * log2(e)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # 1. One program per (key tile, query head g, KV head h): it owns mass[h, g, tile] outright.
    start_n = tl.program_id(0)
    off_g = tl.program_id(1).to(tl.int64)
    off_h = tl.program_id(2).to(tl.int64)
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    # 2. The key tile K^T [d, BLOCK_N] and its positions stay in registers for the whole loop.
    k = tl.load(K + off_h * stride_kh + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                mask=col_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    k_pos = tl.load(KPOS + cols, mask=col_ok, other=0)

    q_base = Q + off_h * stride_qh + off_g * stride_qg
    l_base = LSE + off_h * stride_lh + off_g * stride_lg
    mass = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_c in range(0, C, BLOCK_M):
        rows = start_c + offs_m
        row_ok = rows < C
        # 3. Scores of this head's query tile against the key tile, in log2 units.
        q = tl.load(q_base + rows[:, None] * stride_qc + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        # 4. Probability in the merged softmax: exp(s - lse_total) where visible and lse_total finite.
        q_pos = tl.load(QPOS + rows, mask=row_ok, other=0)
        lse = tl.load(l_base + rows, mask=row_ok, other=float("-inf"))
        dist = q_pos[:, None] - k_pos[None, :]
        ok = (dist >= MIN_DIST) & (dist < MAX_DIST) & col_ok[None, :] & (lse > float("-inf"))[:, None]
        arg = tl.where(ok, s - (lse * 1.4426950408889634)[:, None], float("-inf"))
        # 5. Sum over the queries of the tile.
        mass += tl.sum(tl.exp2(arg), 0)

    tl.store(MASS + off_h * stride_mh + off_g * stride_mg + cols, mass, mask=col_ok)


# ---------------------------------------------------------------------------------------------------
# Launchers


def _interpreted() -> bool:
    return not isinstance(_stage_fwd, triton.runtime.jit.JITFunction)


def _tiles(d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Untuned heuristics; small tiles in the interpreter
    so that tests with small shapes still cross tile boundaries."""
    if _interpreted():
        return 32, 32, 1, 1
    if dtype == torch.float32:
        return 64, 32 if d > 64 else 64, 4, 2
    return (128, 64, 8, 2) if d <= 64 else (64, 64, 4, 2)


def _check_device(name: str, *tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        raise ValueError(f"{name}: all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    if dev.type != "cuda" and not _interpreted():
        raise ValueError(f"{name}: Triton kernels need CUDA tensors (got {dev}); set TRITON_INTERPRET=1 "
                         "before importing triton to run them on the CPU")


def _check_qk(name: str, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
              scale: float) -> None:
    for label, t in (("q", q), ("k", k), ("q_pos", q_pos), ("k_pos", k_pos)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
    if q.ndim != 4 or k.ndim != 3:
        raise ValueError(f"{name}: q must be [Hkv, G, C, d] and k [Hkv, N, d], got q {tuple(q.shape)}, k {tuple(k.shape)}")
    hkv, _, c, d = q.shape
    if k.shape[0] != hkv or k.shape[2] != d:
        raise ValueError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} do not fit")
    if q.dtype not in _DTYPES:
        raise ValueError(f"{name}: dtype {q.dtype} is not supported (fp32, fp16, bf16)")
    if k.dtype != q.dtype:
        raise ValueError(f"{name}: q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if d not in _HEAD_DIMS:
        raise ValueError(f"{name}: head dim {d} is not supported (one of {_HEAD_DIMS})")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"{name}: the last (head) dimension of q and k must be contiguous (stride 1)")
    for label, pos, n in (("q_pos", q_pos, c), ("k_pos", k_pos, k.shape[1])):
        if pos.dtype != torch.int64:
            raise ValueError(f"{name}: {label} must be int64, got {pos.dtype}")
        if pos.ndim != 1 or pos.shape[0] != n:
            raise ValueError(f"{name}: {label} must be [{n}], got {tuple(pos.shape)}")
        if not pos.is_contiguous():
            raise ValueError(f"{name}: {label} must be contiguous")
    if not math.isfinite(float(scale)):
        raise ValueError(f"{name}: scale must be finite, got {scale}")


def _dists(min_dist: int, max_dist: int) -> tuple[int, int]:
    clamp = lambda x: max(-_DIST_LIMIT, min(_DIST_LIMIT, int(x)))  # noqa: E731
    return clamp(min_dist), clamp(max_dist)


def stage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                    min_dist: int, max_dist: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One masked attention stage of grouped queries: (out [Hkv, G, C, d] in q's dtype, lse [Hkv, G, C] fp32).

    q: [Hkv, G, C, d]   k, v: [Hkv, N, d]   q_pos: [C] int64   k_pos: [N] int64
    Key j is visible to query i iff min_dist <= q_pos[i] - k_pos[j] < max_dist. lse is the natural
    log-sum-exp of the visible scaled scores, -inf (with out = 0) for a query that sees no key.
    Any strides are accepted except that the last dimension must be contiguous.
    """
    name = "stage_attention"
    _check_qk(name, q, k, q_pos, k_pos, scale)
    if not isinstance(v, torch.Tensor) or v.shape != k.shape:
        raise ValueError(f"{name}: v must match k {tuple(k.shape)}, got {tuple(getattr(v, 'shape', ()))}")
    if v.dtype != q.dtype:
        raise ValueError(f"{name}: q and v must share a dtype, got {q.dtype} and {v.dtype}")
    if v.stride(-1) != 1:
        raise ValueError(f"{name}: the last (head) dimension of v must be contiguous (stride 1)")
    _check_device(name, q, k, v, q_pos, k_pos)
    hkv, g, c, d = q.shape
    n = k.shape[1]
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((hkv, g, c), float("-inf"), dtype=torch.float32, device=q.device)
    if n == 0 or out.numel() == 0:      # nothing to see: out 0, lse -inf, no launch
        return out, lse
    lo, hi = _dists(min_dist, max_dist)
    block_m, block_n, warps, stages = _tiles(d, q.dtype)
    m = g * c
    o2, l2 = out.view(hkv, m, d), lse.view(hkv, m)
    grid = (triton.cdiv(m, block_m), hkv)
    _stage_fwd[grid](
        q, k, v, q_pos, k_pos, o2, l2,
        *q.stride(), *k.stride(), *v.stride(), *o2.stride(), l2.stride(0),
        c, n, m, lo, hi, float(scale) * _LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=d,
        UPCAST=_interpreted() and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages,
    )
    return out, lse


def key_mass(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, min_dist: int,
             max_dist: int, scale: float, lse_total: torch.Tensor) -> torch.Tensor:
    """Probability each key received in the merged softmax, summed over the chunk's queries: [Hkv, G, N] fp32.

    mass[h, g, j] = sum_i exp(scale * q[h, g, i] . k[h, j] - lse_total[h, g, i]) over the visible
    pairs (same rule as stage_attention). lse_total: fp32 [Hkv, G, C] or [Hkv, G*C], contiguous,
    the natural lse of the merged stages; rows at -inf contribute nothing.
    """
    name = "key_mass"
    _check_qk(name, q, k, q_pos, k_pos, scale)
    hkv, g, c, d = q.shape
    n = k.shape[1]
    if not isinstance(lse_total, torch.Tensor):
        raise ValueError(f"{name}: lse_total must be a torch.Tensor")
    if tuple(lse_total.shape) not in ((hkv, g, c), (hkv, g * c)):
        raise ValueError(f"{name}: lse_total must be [{hkv}, {g}, {c}] or [{hkv}, {g * c}], got {tuple(lse_total.shape)}")
    if lse_total.dtype != torch.float32:
        raise ValueError(f"{name}: lse_total must be fp32, got {lse_total.dtype}")
    if not lse_total.is_contiguous():
        raise ValueError(f"{name}: lse_total must be contiguous")
    _check_device(name, q, k, q_pos, k_pos, lse_total)
    mass = torch.zeros((hkv, g, n), dtype=torch.float32, device=q.device)
    if n == 0 or mass.numel() == 0 or c == 0:
        return mass
    lo, hi = _dists(min_dist, max_dist)
    block_m, block_n, warps, stages = _tiles(d, q.dtype)
    lse3 = lse_total.view(hkv, g, c)
    grid = (triton.cdiv(n, block_n), g, hkv)
    _key_mass[grid](
        q, k, q_pos, k_pos, lse3, mass,
        *q.stride(), *k.stride(), lse3.stride(0), lse3.stride(1), mass.stride(0), mass.stride(1),
        c, n, lo, hi, float(scale) * _LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=d,
        UPCAST=_interpreted() and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages,
    )
    return mass
