"""kernels.chunk: the engine's attention call, torch twin and Triton composite, against a plain softmax.

The oracle builds every key's position, the full [C, N] visibility matrix and one softmax in float64:
nothing tiled, nothing merged. Cases cover chunked prefill (band edges inside and across tiles), a
window shorter than n_local (the start of a text), decode (one query), queries that see no memory
at all, parts no query sees, and GQA ratios 1, 3, 4.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import fused  # noqa: E402
from kernels.chunk import Keys, chunk_attention  # noqa: E402

HKV = 2
# The Triton path runs where it would in the app: on the GPU when there is one, else in the
# interpreter on CPU tensors. The torch twin runs on the CPU; the oracle always does.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _on(backend, q_local, q_global, window, memory):
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    move = lambda keys: Keys(keys.k.to(dev), keys.v.to(dev), keys.start)  # noqa: E731
    return q_local.to(dev), q_global.to(dev), move(window), [move(m) for m in memory]


def _cpu(got):
    return got._replace(out=got.out.cpu(), window_mass=None if got.window_mass is None else got.window_mass.cpu(),
                        memory_mass=None if got.memory_mass is None else [m.cpu() for m in got.memory_mass])


def _oracle(q_local, q_global, start, window, memory, n_local, scale):
    prob, values, sizes = _softmax(q_local, q_global, start, window, memory, n_local, scale)
    out = torch.einsum("hgcn,hnd->hgcd", prob, values)
    mass = prob.sum(2).split(sizes, -1)
    return out, mass[0], list(mass[1:])


def _softmax(q_local, q_global, start, window, memory, n_local, scale):
    """Every key's probability [Hkv, G, C, N] (window first, then the memory parts), float64."""
    hkv, g, c, d = q_local.shape
    p = torch.arange(start, start + c)[:, None]
    sizes = []
    logits, values, vis = [], [], []
    for q, keys, local in [(q_local, window, True)] + [(q_global, m, False) for m in memory]:
        n = keys.k.shape[1]
        sizes.append(n)
        if keys.start is None:
            seen = torch.ones(c, n, dtype=torch.bool)
        else:
            rel = p - torch.arange(keys.start, keys.start + n)[None]
            seen = (rel >= 0) & (rel < n_local) if local else rel >= n_local
        logits.append(torch.einsum("hgcd,hnd->hgcn", q.double(), keys.k.double()) * scale)
        values.append(keys.v.double())
        vis.append(seen)
    s = torch.cat(logits, -1).masked_fill(~torch.cat(vis, -1), float("-inf"))
    prob = torch.softmax(s, -1).nan_to_num(0.0)          # a row that sees nothing: all zero
    return prob, torch.cat(values, 1), sizes


def _case(g, c, d, start, win_start, n_win, parts, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    q_local, q_global = r(HKV, g, c, d), r(HKV, g, c, d)
    window = Keys(r(HKV, n_win, d), r(HKV, n_win, d), win_start)
    memory = [Keys(r(HKV, n, d), r(HKV, n, d), s) for n, s in parts]
    return q_local, q_global, window, memory


CASES = {
    # name: (c, start, window start, window length, memory parts (length, start or None), n_local)
    "prefill": (150, 600, 600 - 95, 95 + 150, [(40, None), (16, 0), (70, 460)], 96),
    "window past NEAR": (300, 1000, 1000 - 399, 399 + 300, [(32, None), (16, 0), (90, 540)], 400),
    # a chunk of whole near tiles (kernels.fused takes them in one product)
    "reading's chunk": (256, 1000, 1000 - 399, 399 + 256, [(32, None), (16, 0), (90, 540)], 400),
    "text start": (100, 0, 0, 100, [(16, 0)], 64),
    "decode": (1, 900, 900 - 63, 64, [(48, None), (16, 0), (20, 800)], 64),
    # the window's first keys and the recent part's last ones too near / too far for the query; a part unseen
    "decode, parts seen in part": (1, 900, 900 - 80, 81, [(48, None), (16, 0), (40, 820), (10, 890)], 64),
    "no memory seen": (70, 40, 0, 110, [(16, 0)], 128),
    "no memory parts": (70, 40, 0, 110, [], 128),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("g", [1, 3, 4])
def test_chunk_attention_matches_one_softmax(backend, name, g):
    if backend == "triton":
        pytest.importorskip("triton")
    c, start, ws, nw, parts, n_local = CASES[name]
    q_local, q_global, window, memory = _case(g, c, 64, start, ws, nw, parts)
    ql, qg, w, m = _on(backend, q_local, q_global, window, memory)
    got = _cpu(chunk_attention(ql, qg, start, w, m, n_local, 0.125, True, True, backend=backend))
    out, w_mass, m_mass = _oracle(q_local, q_global, start, window, memory, n_local, 0.125)
    torch.testing.assert_close(got.out.double(), out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got.window_mass.double(), w_mass, atol=2e-4, rtol=1e-4)
    assert len(got.memory_mass) == len(m_mass)
    for a, b in zip(got.memory_mass, m_mass):
        torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=1e-4)
    # every query's probabilities sum to one: the masses add up to the number of queries per head
    total = got.window_mass.sum(-1) + sum(m.sum(-1) for m in got.memory_mass)
    torch.testing.assert_close(total.double(), torch.full_like(total, c).double(), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_triton_in_half_precision_is_as_close_as_the_twin(dtype, d):
    pytest.importorskip("triton")
    c, start, ws, nw, parts, n_local = CASES["prefill"]
    q_local, q_global, window, memory = _case(3, c, d, start, ws, nw, parts, dtype=dtype)
    ref, _, _ = _oracle(q_local, q_global, start, window, memory, n_local, d ** -0.5)
    errs = {}
    for backend in ("torch", "triton"):
        ql, qg, w, m = _on(backend, q_local, q_global, window, memory)
        got = _cpu(chunk_attention(ql, qg, start, w, m, n_local, d ** -0.5, True, True, backend=backend))
        errs[backend] = (got.out.double() - ref).abs().max().item()
    assert errs["triton"] <= 2 * errs["torch"] + 1e-3, errs


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if case[0] >= 64])
@pytest.mark.parametrize("g", [1, 3])
def test_reading_on_the_cpu_gives_the_exact_output_and_the_estimated_window_masses(name, g):
    """exact_mass=False (reading): the fused kernel's output, and each window key's mass counted from every
    query less than NEAR after it plus every EVERY-th query beyond (rows EVERY-1, 2*EVERY-1, ..) times EVERY."""
    c, start, ws, nw, parts, n_local = CASES[name]
    q_local, q_global, window, memory = _case(g, c, 64, start, ws, nw, parts)
    got = chunk_attention(q_local, q_global, start, window, memory, n_local, 0.125, True, exact_mass=False)
    out, _, _ = _oracle(q_local, q_global, start, window, memory, n_local, 0.125)
    torch.testing.assert_close(got.out.double(), out, atol=2e-5, rtol=1e-4)
    prob = _softmax(q_local, q_global, start, window, memory, n_local, 0.125)[0][..., :nw]     # [Hkv, G, C, N]
    rel = torch.arange(start, start + c)[:, None] - torch.arange(ws, ws + nw)[None]           # [C, N]
    sampled = (torch.arange(c) % fused.EVERY == fused.EVERY - 1)[:, None]
    weight = torch.where(rel < fused.NEAR, 1.0, torch.where(sampled, float(fused.EVERY), 0.0)).double()
    torch.testing.assert_close(got.window_mass.double(), (prob * weight).sum(2), atol=2e-4, rtol=1e-4)
    assert got.memory_mass is None
    if n_local > fused.NEAR:        # the case that samples: an estimate, not the exact mass
        assert not torch.allclose(got.window_mass.double(), prob.sum(2), atol=1e-2)


def test_reading_in_bf16_is_as_close_as_the_tiled_twin():
    c, start, ws, nw, parts, n_local = CASES["window past NEAR"]
    q_local, q_global, window, memory = _case(3, c, 64, start, ws, nw, parts, dtype=torch.bfloat16)
    out, w_mass, _ = _oracle(q_local, q_global, start, window, memory, n_local, 0.125)
    fused = chunk_attention(q_local, q_global, start, window, memory, n_local, 0.125, True, exact_mass=False)
    tiled = chunk_attention(q_local, q_global, start, window, memory, n_local, 0.125, True)
    assert fused.out.dtype == torch.bfloat16 and fused.window_mass.dtype == torch.float32
    err = lambda got: (got.out.double() - out).abs().max().item()  # noqa: E731
    assert err(fused) <= 2 * err(tiled) + 1e-3, (err(fused), err(tiled))


def test_traces_and_decode_keep_the_exact_masses_when_reading_may_estimate():
    for name in ("window past NEAR", "decode"):
        c, start, ws, nw, parts, n_local = CASES[name]
        q_local, q_global, window, memory = _case(3, c, 64, start, ws, nw, parts)
        _, w_mass, m_mass = _oracle(q_local, q_global, start, window, memory, n_local, 0.125)
        traced = chunk_attention(q_local, q_global, start, window, memory, n_local, 0.125, True, True, exact_mass=False)
        torch.testing.assert_close(traced.window_mass.double(), w_mass, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(traced.memory_mass[0].double(), m_mass[0], atol=2e-4, rtol=1e-4)
        if c == 1:
            got = chunk_attention(q_local, q_global, start, window, memory, n_local, 0.125, True, exact_mass=False)
            torch.testing.assert_close(got.window_mass.double(), w_mass, atol=2e-4, rtol=1e-4)


def test_masses_are_only_computed_when_asked():
    c, start, ws, nw, parts, n_local = CASES["prefill"]
    got = chunk_attention(*_case(3, c, 64, start, ws, nw, parts)[:2], start, *_case(3, c, 64, start, ws, nw, parts)[2:],
                          n_local, 0.125)
    assert got.window_mass is None and got.memory_mass is None


def test_bad_inputs_are_refused_with_a_reason():
    q_local, q_global, window, memory = _case(3, 10, 64, 100, 50, 60, [(16, 0)])
    with pytest.raises(ValueError, match="window.start"):
        chunk_attention(q_local, q_global, 100, window._replace(start=None), memory, 64, 0.125)
    with pytest.raises(ValueError, match=r"memory\[0\]"):
        chunk_attention(q_local, q_global, 100, window, [Keys(memory[0].k[:1], memory[0].v[:1], 0)], 64, 0.125)
    with pytest.raises(ValueError, match="backend"):
        chunk_attention(q_local, q_global, 100, window, memory, 64, 0.125, backend="cuda")
    with pytest.raises(ValueError, match="q_local"):
        chunk_attention(q_local[0], q_global, 100, window, memory, 64, 0.125)
