"""The heatmap's window columns: attention on the document's spans still in the local window, per layer."""
import json
import re
from types import SimpleNamespace

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from infllm_engine import ContextMemory, Engine, InfLLMConfig, Summary, Trace
from infllm_engine.attention import ForwardState, infllm_attention
from infllm_engine.rope import Rotary
from reading.citations import passages
from ui import inspector

from .conftest import tiny_llama, tiny_tokenizer
from .helpers import dense_infllm_reference

SMALL = dict(n_init=4, block_size=16, repr_topk=2, chunk_size=32, topk=2, cache_blocks=8)


def answer_trace(n_local: int, doc_tokens: int, **knobs) -> tuple[dict, list[dict], list[dict]]:
    """A tiny engine reads doc_tokens and answers: (stored trace, span rows, page rows), the rows made
    as the library makes them (memory blocks, then the window's block-sized spans; a page per 40 tokens)."""
    engine = Engine(tiny_llama(), tiny_tokenizer(), InfLLMConfig(n_local=n_local, **SMALL, **knobs))
    memory = engine.read(torch.arange(doc_tokens) % 256)
    trace = engine.ask(memory, "What is on page 2?", max_new_tokens=4).wait().trace.to_dict()
    bounds = [memory.block_span(i) for i in range(memory.n_blocks)]
    rest = bounds[-1][1] if bounds else 4
    bounds += [(a, min(a + 16, doc_tokens)) for a in range(rest, doc_tokens, 16)]
    spans = [dict(block=i, start_token=a, end_token=b, first_page=a // 40 + 1, last_page=(b - 1) // 40 + 1,
                  text=f"span {i}", in_memory=int(i < memory.n_blocks)) for i, (a, b) in enumerate(bounds)]
    pages = [dict(number=n, label=f"p. {n}") for n in range(1, doc_tokens // 40 + 2)]
    return json.loads(json.dumps(trace)), spans, pages


def shelf(spans: list[dict], pages: list[dict]) -> list[tuple[dict, list[dict], list[dict]]]:
    return [({"id": 1, "title": "t"}, spans, pages)]


def test_a_document_shorter_than_the_window_gets_a_heatmap_of_its_window_spans():
    trace, spans, pages = answer_trace(512, 150)
    assert not any(s["in_memory"] for s in spans) and len(spans) == 10      # nothing in memory, all in the window
    html = inspector.render(trace, {}, shelf(spans, pages), 2)
    assert "nothing was evicted" not in html and "<svg class='heatmap'" in html and "local window</text>" in html
    cells = re.findall(r"<rect class='cell window' data-block='(\d+)'", html)
    assert sorted(int(c) for c in cells) == sorted(list(range(10)) * 2)     # every layer attended every span
    assert "class='cell'" not in html and "memory</text>" not in html     # no memory columns to show
    assert "layer 1 · local window · p. 2 · mass" in html
    assert trace["doc_end"] == 150 and Summary.load(trace).heat(2, len(spans)).sum() > 0


def test_a_long_document_shows_memory_blocks_then_the_window_after_a_separator():
    trace, spans, pages = answer_trace(64, 300, focus_blocks=0)   # each layer's top-k
    n_blocks, n_spans = sum(s["in_memory"] for s in spans), len(spans)
    assert 0 < n_blocks < n_spans
    html = inspector.render(trace, {}, shelf(spans, pages), 2)
    memory_cells = [int(b) for b in re.findall(r"<rect class='cell' data-block='(\d+)'", html)]
    window_cells = [int(b) for b in re.findall(r"<rect class='cell window' data-block='(\d+)'", html)]
    assert memory_cells and all(b < n_blocks for b in memory_cells)
    assert set(window_cells) == set(range(n_blocks, n_spans))
    assert "stroke-dasharray" in html and "memory</text>" in html and "local window</text>" in html
    first_window = min(float(x) for x in re.findall(r"<rect class='cell window' data-block='\d+' data-document='1' x='([\d.]+)'", html))
    assert all(float(x) < first_window for x in re.findall(r"<rect class='cell' data-block='\d+' data-document='1' x='([\d.]+)'", html))


def test_a_trace_stored_before_the_window_spans_shows_its_window_empty():
    trace, spans, pages = answer_trace(512, 150)
    old = {"steps": trace["steps"], "records": [{k: r[k] for k in ("layer", "step", "block_ids", "scores",
               "block_mass", "local_mass")} for r in trace["records"]], "votes": None, "pinned": None}
    assert Trace.from_dict(old).to_dict() == old                           # no new keys appear in an old trace
    html = inspector.render(old, {}, shelf(spans, pages), 2)
    assert "local window</text>" in html and "class='cell" not in html       # it recorded no window mass


def test_window_spans_survive_json_and_count_only_the_document():
    engine = Engine(tiny_llama(), tiny_tokenizer(),
                    InfLLMConfig(n_init=4, n_local=256, block_size=16, repr_topk=2, chunk_size=32, topk=2))
    memory = engine.read(torch.arange(150) % 256)
    trace = engine.ask(memory, "what?", max_new_tokens=4).wait().trace
    assert memory.n_blocks == 0 and trace.doc_end == 150
    assert {(r.layer, r.step) for r in trace.records} == {(layer, s) for layer in range(2) for s in range(len(trace.steps))}
    for r in trace.records:
        assert r.block_ids.numel() == 0 and r.window_first == 0 and r.window_mass.numel() == -(-(150 - 4) // 16)
        # All keys are in the window: the spans get its share less the sinks' and the question's.
        assert float(r.local_mass) == pytest.approx(1.0, abs=1e-5)
        assert 0 < float(r.window_mass.sum()) < float(r.local_mass) and (r.window_mass >= 0).all()
    restored = Trace.from_dict(json.loads(json.dumps(trace.to_dict())))
    assert restored.to_dict() == trace.to_dict() and restored.doc_end == 150
    torch.testing.assert_close(restored.heat(2, 10), trace.heat(2, 10), atol=1e-4, rtol=0)


def test_window_span_mass_is_the_brute_force_sum_of_what_each_window_key_received():
    """Per chunk and span: the share of the chunk's attention that the span's keys received in the
    window, from an explicit dense construction (prefix e minus prefix s), sinks and the tail left out."""
    torch.manual_seed(5)
    cfg = InfLLMConfig(n_init=4, n_local=40, block_size=8, repr_topk=2, topk=2, chunk_size=16, cache_blocks=8)
    h_, hkv, t, d, doc_end = 6, 2, 96, 16, 75                   # the document ends inside a chunk and a span
    q, k, v = torch.randn(h_, t, d), torch.randn(hkv, t, d), torch.randn(hkv, t, d)
    rope = Rotary(LlamaRotaryEmbedding(SimpleNamespace(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, head_dim=d, hidden_size=h_ * d,
        num_attention_heads=h_, max_position_embeddings=4096)), d, torch.device("cpu"), torch.float32)
    memory, trace = ContextMemory(cfg, 1, h_, hkv, d), Trace(doc_end=doc_end)
    for s in range(0, t, cfg.chunk_size):
        state = ForwardState(memory, cfg, rope, s, trace, trace.begin("prefill", s, cfg.chunk_size))
        sl = slice(s, s + cfg.chunk_size)
        infllm_attention(SimpleNamespace(layer_idx=0), q[None, :, sl], k[None, :, sl], v[None, :, sl], None,
                         d ** -0.5, infllm=state)
        memory.length += cfg.chunk_size
    assert memory.n_blocks >= 4 and trace.doc_end == doc_end
    retrieved = {r.step: r.block_ids.tolist() for r in trace.records}
    n_spans = -(-(doc_end - cfg.n_init) // cfg.block_size)
    for step in (1, 4, 5):                                      # before, across and after the document's end
        s, e = step * cfg.chunk_size, (step + 1) * cfg.chunk_size
        received = (dense_infllm_reference(q[:, :e], k[:, :e], v[:, :e], cfg, rope, d ** -0.5, retrieved)[1]
                    - widen(dense_infllm_reference(q[:, :s], k[:, :s], v[:, :s], cfg, rope, d ** -0.5, retrieved)[1], e))
        per_key = received.sum(0) / (h_ * cfg.chunk_size)
        want = torch.stack([per_key[cfg.n_init + i * 8: min(cfg.n_init + (i + 1) * 8, doc_end)].sum()
                            for i in range(n_spans)])
        record = next(r for r in trace.records if r.step == step)
        got = torch.zeros(n_spans, dtype=torch.float64)
        got[record.window_first: record.window_first + record.window_mass.numel()] = record.window_mass.double()
        assert record.window_mass.numel() and want[record.window_first] > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert float(record.window_mass.sum()) <= float(record.local_mass) + 1e-6


def widen(mass: torch.Tensor, n: int) -> torch.Tensor:
    """[H, m] -> [H, n]: zeros for the keys the shorter prefix did not have."""
    return torch.nn.functional.pad(mass, (0, n - mass.shape[1]))


@pytest.mark.parametrize("knobs", [{}, {"focus_blocks": 0}], ids=["focus", "plain"])
def test_an_answers_summary_gives_the_heatmap_passages_and_figures_of_its_full_trace(knobs):
    """What an answer stores (Summary) against every step's record (Trace.to_dict), through JSON. With the
    focus the evidence is its vote; plain InfLLM's is the summed mass."""
    full, spans, pages = answer_trace(64, 300, **knobs)        # memory blocks and window spans
    lean = json.loads(json.dumps(Summary.load(full).to_dict()))
    assert "records" not in lean and len(json.dumps(lean)) < len(json.dumps(full)) / 2
    assert (lean["votes"] is None) == ("focus_blocks" in knobs)
    n_spans = len(spans)
    torch.testing.assert_close(Summary.load(lean).heat(2, n_spans), Summary.load(full).heat(2, n_spans),
                               atol=1e-4, rtol=0)
    assert Summary.load(full).heat(2, n_spans).sum() > 0
    got, want = passages(lean, shelf(spans, pages)), passages(full, shelf(spans, pages))
    assert [(p["block"], p["pages"], p["by"]) for p in got] == [(p["block"], p["pages"], p["by"]) for p in want] != []
    assert [p["share"] for p in got] == pytest.approx([p["share"] for p in want], abs=1e-4)
    got, want = inspector.figures(lean, {}, shelf(spans, pages)), inspector.figures(full, {}, shelf(spans, pages))
    assert got.blocks_retrieved == want.blocks_retrieved
    assert got.memory_share == pytest.approx(want.memory_share, abs=1e-4)
    assert got.window_share == pytest.approx(want.window_share, abs=1e-4) and want.window_share > 0
    assert lean["tokens"]["decode"] == sum(s["n_tokens"] for s in full["steps"] if s["kind"] == "decode")
    if "focus_blocks" in knobs:
        assert want.blocks_retrieved > 0 and want.memory_share > 0
