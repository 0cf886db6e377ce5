"""InfLLM attention against explicit oracles: HF's forward, a dense reference, and itself decoded."""
from types import SimpleNamespace

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from infllm_engine import ContextMemory, Engine, InfLLMConfig, Trace
from infllm_engine.attention import ForwardState, infllm_attention
from infllm_engine.blocks import representatives
from infllm_engine.generate import forward_chunk, prefill
from infllm_engine.rope import Rotary

from .conftest import tiny_llama, tiny_tokenizer
from .helpers import dense_infllm_reference, hf_logits

SMALL = dict(n_init=4, block_size=8, repr_topk=2, chunk_size=16, cache_blocks=64)


def chunk_logits(engine: Engine, ids: torch.Tensor) -> torch.Tensor:
    """Last-row logits after each chunk, read through the engine's chunked prefill."""
    memory, rows = engine.new_memory(), []
    for start in range(0, ids.shape[0], engine.cfg.chunk_size):
        piece = ids[start: start + engine.cfg.chunk_size]
        rows.append(forward_chunk(engine.model, memory, engine.rope, piece, "prefill", True))
    return torch.stack(rows)


@pytest.mark.parametrize("n_heads, n_kv_heads", [(6, 6), (6, 2)])
@pytest.mark.parametrize("method", ["infllm", "streaming", "full"])
def test_within_the_window_every_method_equals_full_attention(method, n_heads, n_kv_heads):
    model = tiny_llama(n_heads, n_kv_heads)
    ids = torch.randint(0, 256, (120,), generator=torch.Generator().manual_seed(0))
    expected = hf_logits(model, ids)
    engine = Engine(model, None, InfLLMConfig(method=method, n_local=128, topk=4, **SMALL))
    got = chunk_logits(engine, ids)
    ends = torch.arange(15, 120, 16).tolist() + [119]
    torch.testing.assert_close(got, expected[sorted(set(ends))], atol=2e-5, rtol=1e-4)

    # Decode: prefill 100 tokens, then feed the rest one at a time.
    memory = engine.new_memory()
    prefill(model, memory, engine.rope, ids[:100], want_logits=False)
    for p in range(100, 120):
        logits = forward_chunk(model, memory, engine.rope, ids[p: p + 1], "decode", True)
        torch.testing.assert_close(logits, expected[p], atol=2e-5, rtol=1e-4)


def test_topk_zero_equals_streaming_beyond_the_window():
    model = tiny_llama()
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(1))
    cfg = InfLLMConfig(n_local=32, topk=0, **SMALL)
    infllm = chunk_logits(Engine(model, None, cfg), ids)
    streaming = chunk_logits(Engine(model, None, cfg.replace(method="streaming")), ids)
    torch.testing.assert_close(infllm, streaming, atol=2e-5, rtol=1e-4)   # fused vs explicit kernels
    retrieving = chunk_logits(Engine(model, None, cfg.replace(topk=4)), ids)
    assert not torch.allclose(infllm, retrieving)   # retrieval does change what the model sees


def run_layer(cfg: InfLLMConfig, q, k, v, n_layers: int = 1):
    """Feed raw q/k/v [L, H|Hkv, T, d] chunk by chunk through the registered attention function."""
    h, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    rope = Rotary(LlamaRotaryEmbedding(SimpleNamespace(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, head_dim=d, hidden_size=h * d,
        num_attention_heads=h, max_position_embeddings=4096)), d, torch.device("cpu"), torch.float32)
    memory, trace = ContextMemory(cfg, n_layers, h, hkv, d), Trace()
    outs = []
    for s in range(0, q.shape[2], cfg.chunk_size):
        state = ForwardState(memory, cfg, rope, s, trace, trace.begin("prefill", s, cfg.chunk_size))
        sl = slice(s, s + cfg.chunk_size)
        outs.append(torch.stack([
            infllm_attention(SimpleNamespace(layer_idx=i), q[i, :, sl][None], k[i, :, sl][None], v[i, :, sl][None],
                             None, d ** -0.5, infllm=state)[0][0].transpose(0, 1)
            for i in range(n_layers)]))
        memory.length += q[0, :, sl].shape[1]
    return torch.cat(outs, 2), memory, trace, rope


@pytest.mark.parametrize("n_heads, n_kv_heads", [(3, 3), (6, 2)])
def test_chunk_boundaries_match_a_dense_reference_with_no_key_counted_twice(n_heads, n_kv_heads):
    torch.manual_seed(2)
    cfg = InfLLMConfig(n_init=4, n_local=24, block_size=8, repr_topk=2, topk=2, chunk_size=16, cache_blocks=8)
    t, d = 150, 16
    q, k, v = torch.randn(1, n_heads, t, d), torch.randn(1, n_kv_heads, t, d), torch.randn(1, n_kv_heads, t, d)
    out, memory, trace, rope = run_layer(cfg, q, k, v)
    retrieved = {r.step: r.block_ids.tolist() for r in trace.records}
    assert len(retrieved) >= 4 and memory.n_blocks >= 10          # retrieval really chose among blocks
    expected, mass = dense_infllm_reference(q[0], k[0], v[0], cfg, rope, d ** -0.5, retrieved)
    torch.testing.assert_close(out[0].double(), expected, atol=1e-5, rtol=1e-5)
    # Representative scores: the local attention each still-recent token received, per query head.
    layer = memory.layers[0]
    recent = slice(layer.r0, layer.r0 + layer.recent_k.shape[1])
    final = t - cfg.n_local + 1          # tokens before this are out of every window already
    check = slice(layer.r0, final)
    torch.testing.assert_close(layer.recent_score[:, : final - layer.r0].double(), mass[:, check], atol=1e-5, rtol=1e-5)
    assert recent.stop == t


def test_a_planted_block_is_retrieved_in_every_layer():
    torch.manual_seed(3)
    cfg = InfLLMConfig(n_init=4, n_local=32, block_size=8, repr_topk=2, topk=2, chunk_size=16, cache_blocks=8)
    n_layers, h, hkv, t, d = 4, 6, 2, 160, 16
    q, k, v = torch.randn(n_layers, h, t, d), torch.randn(n_layers, hkv, t, d) * 0.1, torch.randn(n_layers, hkv, t, d)
    planted = 3                                       # block 3 = tokens [28, 36)
    start = cfg.n_init + planted * cfg.block_size
    _, _, _, rope = run_layer(cfg, q[:, :, :16], k[:, :, :16], v[:, :, :16], n_layers)
    for layer in range(n_layers):
        # The last chunk asks along one direction per KV group; the planted keys point the same way.
        u = torch.randn(hkv, d)
        q[layer, :, -16:] = u.repeat_interleave(h // hkv, 0)[:, None, :]
        far = rope.apply_at(u, cfg.n_local)
        k[layer, :, start: start + cfg.block_size] = far[:, None, :] * 3
    _, memory, trace, _ = run_layer(cfg, q, k, v, n_layers)
    last_step = len(trace.steps) - 1
    final = {r.layer: r for r in trace.records if r.step == last_step}
    assert sorted(final) == list(range(n_layers)) and memory.n_blocks > 10
    for layer, record in final.items():
        assert planted in record.block_ids.tolist(), (layer, record.block_ids)
        best = record.block_ids[record.scores.argmax()].item()
        assert best == planted


def test_representatives_average_the_most_attended_keys_per_head():
    keys = torch.arange(2 * 8 * 4, dtype=torch.float32).view(2, 8, 4)      # Hkv=2, bs=8, d=4
    scores = torch.zeros(4, 8)                                              # H=4 (G=2)
    scores[0, [1, 5]] = 1.0
    scores[3, [0, 7]] = torch.tensor([2.0, 3.0])
    scores[1, 2], scores[1, 6], scores[2, 3], scores[2, 4] = 1, 1, 1, 1
    reprs, idx = representatives(keys, scores, 2)
    assert sorted(idx[0].tolist()) == [1, 5] and sorted(idx[3].tolist()) == [0, 7]
    torch.testing.assert_close(reprs[0], keys[0, [1, 5]].mean(0))           # heads 0, 1 read KV head 0
    torch.testing.assert_close(reprs[3], keys[1, [0, 7]].mean(0))           # heads 2, 3 read KV head 1


def test_decoding_gives_the_same_logits_as_prefilling():
    model = tiny_llama()
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(4))
    # topk above the number of blocks: per-token and per-chunk retrieval then see the same blocks.
    engine = Engine(model, None, InfLLMConfig(n_local=32, topk=40, **SMALL))
    memory = engine.new_memory()
    prefill(model, memory, engine.rope, ids[:160], want_logits=False)
    assert memory.n_blocks >= 10
    for p in range(160, 200):
        decoded = forward_chunk(model, memory, engine.rope, ids[p: p + 1], "decode", True)
        if p % 8 == 3:
            fresh = engine.new_memory()
            prefilled = prefill(model, fresh, engine.rope, ids[: p + 1])
            # Float noise between the two paths can flip an int8 rounding in a block (one step, ~1 % of a
            # channel's range), hence more room than fp32 alone would need.
            torch.testing.assert_close(decoded, prefilled, atol=3e-4, rtol=1e-3)


def test_a_question_leaves_the_document_memory_unchanged():
    model = tiny_llama()
    engine = Engine(model, tiny_tokenizer(), InfLLMConfig(n_local=32, topk=2, **SMALL))
    doc = torch.randint(0, 256, (220,), generator=torch.Generator().manual_seed(5))
    memory = engine.read(doc)
    before = [(l.recent_k.clone(), l.recent_score.clone(), l.blocks.n, l.blocks.blocks()["reprs"].clone()) for l in memory.layers]
    question = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(6))
    first = engine.generate(memory.fork(), question, max_new_tokens=12).wait()
    second = engine.generate(memory.fork(), question, max_new_tokens=12).wait()
    assert first.token_ids == second.token_ids and len(first.token_ids) == 12
    assert first.trace.to_dict() == second.trace.to_dict()
    assert memory.length == 220
    for layer, (k, score, n, reprs) in zip(memory.layers, before):
        assert torch.equal(layer.recent_k, k) and torch.equal(layer.recent_score, score)
        assert layer.blocks.n == n and torch.equal(layer.blocks.blocks()["reprs"], reprs)


def test_the_engine_on_triton_kernels_reads_and_answers_as_on_the_torch_twin(monkeypatch):
    """The engine's Triton path (as on CUDA), run by Triton's CPU interpreter, against the CPU path."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from kernels import triton_attention
    if not triton_attention._interpreted():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")
    model = tiny_llama()
    ids = torch.randint(0, 256, (120,), generator=torch.Generator().manual_seed(8))
    results = {}
    for kernels in ("torch", "triton"):
        engine = Engine(model, tiny_tokenizer(), InfLLMConfig(n_local=32, topk=2, kernels=kernels, **SMALL))
        memory = engine.read(ids[:100])
        answer = engine.generate(memory, ids[100:], max_new_tokens=6).wait()
        results[kernels] = (memory, answer)
    (m_torch, a_torch), (m_triton, a_triton) = results["torch"], results["triton"]
    assert m_torch.n_blocks == m_triton.n_blocks >= 6
    assert a_triton.token_ids == a_torch.token_ids
    for lt, lg in zip(m_torch.layers, m_triton.layers):
        torch.testing.assert_close(lg.blocks.blocks()["reprs"], lt.blocks.blocks()["reprs"], atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(lg.recent_score, lt.recent_score, atol=1e-4, rtol=1e-4)
    for rt, rg in zip(a_torch.trace.records, a_triton.trace.records):
        assert torch.equal(rt.block_ids, rg.block_ids)
        torch.testing.assert_close(rg.block_mass, rt.block_mass, atol=1e-5, rtol=1e-4)
        assert rt.window_first == rg.window_first and rt.window_mass is not None        # the context's tail
        torch.testing.assert_close(rg.window_mass, rt.window_mass, atol=1e-5, rtol=1e-4)
