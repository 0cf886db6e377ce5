"""Triton kernels against their torch twins (flash-attention test style).

The oracle is the torch twin in fp32 on the same inputs upcast. A kernel in dtype X passes when its
error is at most twice the twin's own error in dtype X, plus a small atol (flash-attention's rule).
Without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set below before triton
is imported); the shapes are small so the file stays well under a minute on one CPU thread.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from kernels.stage import attention_stage, mask_bias, received_mass  # noqa: E402
from kernels.retrieval import score_blocks, top_blocks  # noqa: E402
from kernels import triton_attention  # noqa: E402
from kernels.triton_attention import key_mass, stage_attention  # noqa: E402
from kernels.triton_retrieval import block_scores, top_blocks_triton  # noqa: E402

if not torch.cuda.is_available() and not triton_attention._interpreted():
    pytest.skip("no CUDA device and triton was imported without TRITON_INTERPRET=1", allow_module_level=True)

# The device under test: the GPU where there is one (the kernels compiled), else the CPU under the
# interpreter. The oracles (torch twins) run on the CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not triton_attention._interpreted() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
LSE_ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
FAR = -(2 ** 40)            # position of retrieved memory blocks: always visible in the global stage
HUGE = 2 ** 63 - 1          # "no upper bound" (the launcher clamps it)
HKV = 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _positions(rule: str, c: int, n: int, gen: torch.Generator):
    """(q_pos [C], k_pos [N], min_dist, max_dist) as the engine would build them for one stage."""
    if rule == "local":          # window keys shifted to start at 0, chunk at its end; the band cuts
        n_local = max(2, n // 3)
        return torch.arange(n - c, n), torch.arange(n), 0, n_local
    n_local = 24
    if rule == "global":         # retrieved blocks (always visible) + old tokens, keys in shuffled order
        n_blk = min(16, n // 2)
        k_pos = torch.cat([torch.full((n_blk,), FAR), torch.arange(n - n_blk)])
        k_pos = k_pos[torch.randperm(n, generator=gen)]
        start = n_local + (n - n_blk) // 2 - c // 2
        return torch.arange(start, start + c), k_pos, n_local, HUGE
    if rule == "global_blind":   # no blocks: the first queries see no old token at all
        return torch.arange(n_local - 3, n_local - 3 + c), torch.arange(n), n_local, HUGE
    raise AssertionError(rule)


def _visible(q_pos, k_pos, lo, hi):
    dist = q_pos[:, None] - k_pos[None, :]
    return (dist >= lo) & (dist < hi)


def _inputs(dtype, g, c, n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(HKV, g, c, d, generator=gen)
    k = torch.randn(HKV, n, d, generator=gen)
    v = torch.randn(HKV, n, d, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype), gen


def _flash_rule(name, got, twin, ref, atol):
    err = (got.float() - ref).abs().max().item()
    twin_err = (twin.float() - ref).abs().max().item()
    assert err <= 2 * twin_err + atol, f"{name}: max err {err:.3g} > 2 * twin err {twin_err:.3g} + {atol:g}"


def _check_stage(dtype, g, c, n, d, rule, device=DEVICE, seed=0):
    q, k, v, gen = _inputs(dtype, g, c, n, d, seed)
    q_pos, k_pos, lo, hi = _positions(rule, c, n, gen)
    scale = d ** -0.5
    visible = _visible(q_pos, k_pos, lo, hi)
    bias = mask_bias(visible, g)
    ref = attention_stage(q.float(), k.float(), v.float(), bias, scale, keep_scores=True)
    twin = attention_stage(q, k, v, bias.to(dtype), scale, keep_scores=True)
    # The merged lse: this stage plus a stand-in for the other one (-inf for query 0).
    other = torch.randn(HKV, g, c, generator=gen) + 1.0
    other[..., 0] = float("-inf")
    lse_total = torch.logaddexp(ref.lse, other)

    to = lambda t: t.to(device)  # noqa: E731
    out, lse = stage_attention(to(q), to(k), to(v), to(q_pos), to(k_pos), lo, hi, scale)
    mass = key_mass(to(q), to(k), to(q_pos), to(k_pos), lo, hi, scale, to(lse_total))
    out, lse, mass = out.cpu(), lse.cpu(), mass.cpu()

    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (HKV, g, c) and lse.dtype == torch.float32
    assert mass.shape == (HKV, g, n) and mass.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any() and not mass.isnan().any()
    _flash_rule("out", out, twin.out, ref.out, ATOL[dtype])
    torch.testing.assert_close(lse, ref.lse, atol=LSE_ATOL[dtype], rtol=0)
    blind = ~visible.any(1)                    # [C] queries that see no key
    assert torch.isneginf(lse[:, :, blind]).all() and (out[:, :, blind] == 0).all()
    assert torch.isfinite(lse[:, :, ~blind]).all()

    ref_mass = received_mass(ref, lse_total)
    twin_mass = received_mass(twin, lse_total.to(dtype))
    _flash_rule("mass", mass, twin_mass, ref_mass, ATOL[dtype])
    torch.testing.assert_close(mass, ref_mass, atol=1e-4, rtol=1e-3)   # fp32 math on the same inputs
    return blind


@pytest.mark.parametrize("rule", ["local", "global", "global_blind"])
@pytest.mark.parametrize("c, n", [(7, 50), (33, 129)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("g", [1, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_stage_and_mass_match_the_twin(dtype, g, d, c, n, rule):
    blind = _check_stage(dtype, g, c, n, d, rule)
    assert blind.any() == (rule == "global_blind")      # the blind rows really are exercised


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_tiny_head_dim(dtype):
    _check_stage(dtype, 2, 5, 17, 16, "local")
    _check_stage(dtype, 2, 5, 17, 32, "global")


def test_strided_inputs_and_flat_lse():
    """Engine-like views: K/V a prefix of a bigger cache, q a transposed view; lse_total as [Hkv, G*C]."""
    torch.manual_seed(3)
    g, c, n, d, cap = 3, 9, 40, 32, 64
    q = torch.randn(HKV, c, g, d, device=DEVICE).transpose(1, 2)             # [Hkv, G, C, d], not contiguous
    k_cache, v_cache = torch.randn(HKV, cap, d, device=DEVICE), torch.randn(HKV, cap, d, device=DEVICE)
    k, v = k_cache[:, 10:10 + n], v_cache[:, 10:10 + n]
    assert not q.is_contiguous() and not k.is_contiguous()
    q_pos, k_pos = torch.arange(n - c, n, device=DEVICE), torch.arange(n, device=DEVICE)
    scale = 0.2
    out, lse = stage_attention(q, k, v, q_pos, k_pos, 0, 16, scale)
    ref = attention_stage(q.contiguous(), k.contiguous(), v.contiguous(),
                          mask_bias(_visible(q_pos, k_pos, 0, 16), g), scale, keep_scores=True)
    torch.testing.assert_close(out, ref.out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref.lse, atol=1e-5, rtol=0)
    mass = key_mass(q, k, q_pos, k_pos, 0, 16, scale, ref.lse.reshape(HKV, g * c))
    torch.testing.assert_close(mass, received_mass(ref, ref.lse), atol=1e-5, rtol=1e-5)
    # One stage alone: every query's probabilities sum to one.
    torch.testing.assert_close(mass.sum(-1), torch.full((HKV, g), float(c), device=DEVICE), atol=1e-4, rtol=0)


def test_no_keys_and_empty_band_launch_nothing_or_see_nothing():
    on = dict(device=DEVICE)
    q = torch.randn(HKV, 3, 5, 16, **on)
    k = torch.randn(HKV, 0, 16, **on)
    q_pos, k_pos = torch.arange(5, **on), torch.arange(0, **on)
    out, lse = stage_attention(q, k, k, q_pos, k_pos, 0, 4, 0.25)
    assert (out == 0).all() and out.shape == q.shape and torch.isneginf(lse).all() and lse.shape == (HKV, 3, 5)
    mass = key_mass(q, k, q_pos, k_pos, 0, 4, 0.25, torch.zeros(HKV, 3, 5, **on))
    assert mass.shape == (HKV, 3, 0)
    # Keys present but a rule nobody satisfies (min >= max): every row is blind, no NaN.
    k = torch.randn(HKV, 6, 16, **on)
    out, lse = stage_attention(q, k, k, q_pos, torch.arange(6, **on), 5, 5, 0.25)
    assert (out == 0).all() and torch.isneginf(lse).all()
    mass = key_mass(q, k, q_pos, torch.arange(6, **on), 5, 5, 0.25, torch.zeros(HKV, 3, 5, **on))
    assert (mass == 0).all()


def test_the_launchers_reject_what_does_not_fit():
    on = dict(device=DEVICE)
    q, k = torch.randn(HKV, 3, 5, 16, **on), torch.randn(HKV, 7, 16, **on)
    qp, kp = torch.arange(5, **on), torch.arange(7, **on)
    lse = torch.zeros(HKV, 3, 5, **on)
    bad = [
        ((q[0], k, k, qp, kp), "q must be"),
        ((q, k[:1], k[:1], qp, kp), "do not fit"),
        ((q, k[..., :8], k[..., :8], qp, kp), "do not fit"),
        ((q, k, k[:, :6], qp, kp), "v must match"),
        ((q.double(), k.double(), k.double(), qp, kp), "not supported"),
        ((q, k.half(), k, qp, kp), "share a dtype"),
        ((q, k, k.half(), qp, kp), "share a dtype"),
        ((torch.randn(HKV, 3, 5, 24, **on), torch.randn(HKV, 7, 24, **on), torch.randn(HKV, 7, 24, **on), qp, kp),
         "head dim"),
        ((q, k, k, qp.int(), kp), "int64"),
        ((q, k, k, qp, kp[:6]), r"k_pos must be \[7\]"),
        ((q, k, k, torch.arange(10, **on)[::2], kp), "contiguous"),
        ((q, k, torch.randn(HKV, 16, 7, **on).transpose(1, 2), qp, kp), "contiguous"),
        ((q, k.to("meta"), k, qp, kp), "one device"),
        ((q, k, k, [0, 1, 2, 3, 4], kp), "Tensor"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            stage_attention(*args, 0, 4, 0.25)
    with pytest.raises(ValueError, match="scale"):
        stage_attention(q, k, k, qp, kp, 0, 4, float("nan"))
    with pytest.raises(ValueError, match="lse_total must be"):
        key_mass(q, k, qp, kp, 0, 4, 0.25, lse[:, :2])
    with pytest.raises(ValueError, match="fp32"):
        key_mass(q, k, qp, kp, 0, 4, 0.25, lse.half())
    with pytest.raises(ValueError, match="contiguous"):
        key_mass(q, k, qp, kp, 0, 4, 0.25, torch.zeros(HKV, 5, 3, **on).transpose(1, 2))
    with pytest.raises(ValueError, match="do not fit"):
        key_mass(q, k[:1], qp, kp, 0, 4, 0.25, lse)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_block_scores_match_score_blocks(dtype):
    gen = torch.Generator().manual_seed(5)
    for nb, h, d in [(37, 3, 24), (5, 8, 16), (1, 1, 7)]:     # uneven block count and H*d
        reprs, query = torch.randn(nb, h, d, generator=gen), torch.randn(h, d, generator=gen)
        ref = score_blocks(query, reprs)
        twin = score_blocks(query.to(dtype), reprs.to(dtype))
        got = block_scores(query.to(DEVICE, dtype), reprs.to(DEVICE, dtype)).cpu()
        assert got.shape == (nb,) and got.dtype == dtype
        _flash_rule("scores", got, twin, ref, 1e-4 if dtype == torch.float32 else 1e-3)
    # reprs as a prefix of a larger buffer (how the engine stores them)
    buf = torch.randn(50, 3, 24, generator=gen).to(DEVICE)
    query = torch.randn(3, 24, generator=gen).to(DEVICE)
    torch.testing.assert_close(block_scores(query, buf[:20]), score_blocks(query, buf[:20]), atol=1e-4, rtol=1e-5)
    assert block_scores(query, buf[:0]).shape == (0,)


def test_top_blocks_triton_picks_the_twins_ids():
    gen = torch.Generator().manual_seed(7)
    reprs, query = torch.randn(300, 4, 32, generator=gen), torch.randn(4, 32, generator=gen)
    for k in (1, 8, 50):
        ids, scores = top_blocks_triton(query.to(DEVICE), reprs.to(DEVICE), k)
        ref_ids, ref_scores = top_blocks(score_blocks(query, reprs), k)
        assert ids.tolist() == ref_ids.tolist()
        torch.testing.assert_close(scores.cpu(), ref_scores, atol=1e-4, rtol=1e-5)
    query, reprs = query.to(DEVICE), reprs.to(DEVICE)
    assert top_blocks_triton(query, reprs[:3], 8)[0].tolist() == [0, 1, 2]
    assert top_blocks_triton(query, reprs, 0)[0].numel() == 0
    assert top_blocks_triton(query, reprs[:0], 4)[0].numel() == 0


def test_block_scores_reject_what_does_not_fit():
    reprs, query = torch.randn(4, 3, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE)
    for args, msg in [((query[:2], reprs), "does not fit"), ((query, reprs.half()), "dtype"),
                      ((query.double(), reprs.double()), "dtype"), ((query.t().contiguous().t(), reprs), "contiguous"),
                      ((query, reprs.transpose(1, 2).contiguous().transpose(1, 2)), "contiguous"),
                      ((query, reprs.to("meta")), "meta")]:
        with pytest.raises(ValueError, match=msg):
            block_scores(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_on_the_gpu(dtype):
    for g, d, rule in [(4, 128, "local"), (3, 64, "global"), (1, 64, "global_blind")]:
        _check_stage(dtype, g, 33, 129, d, rule, device="cuda")
        _check_stage(dtype, g, 100, 1000, d, rule, device="cuda", seed=1)
    gen = torch.Generator().manual_seed(5)
    reprs, query = torch.randn(3000, 8, 128, generator=gen), torch.randn(8, 128, generator=gen)
    got = block_scores(query.to(dtype).cuda(), reprs.to(dtype).cuda()).cpu()
    _flash_rule("scores", got, score_blocks(query.to(dtype), reprs.to(dtype)), score_blocks(query, reprs),
                1e-4 if dtype == torch.float32 else 1e-3)
