"""The question focus: the question's words vote by exact attention, the voted blocks are re-read."""
import pytest
import torch

from infllm_engine import Engine, InfLLMConfig
from infllm_engine.focus import BASELINE_BEFORE, Focus
from infllm_engine.generate import prefill
from infllm_engine.trace import Trace
from kernels import int8, key_shares, span_mass

from .conftest import tiny_llama, tiny_tokenizer

SMALL = dict(n_init=4, n_local=48, block_size=8, repr_topk=2, chunk_size=16, topk=2, cache_blocks=8)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def engine():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHATML
    # focus_alone off: the window and the layers' own top-k are read beside the pinned blocks, so both show.
    return Engine(tiny_llama(), tokenizer, InfLLMConfig(focus_blocks=2, focus_gap=4, focus_topk=2, focus_alone=False,
                                                        **SMALL))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("heads, kv_heads, tail", [(4, 2, 0), (6, 3, 5), (2, 2, 8)])
def test_span_mass_is_each_spans_share_of_one_softmax_over_every_key(chunk, heads, kv_heads, tail, packed):
    torch.manual_seed(chunk + tail)
    q, blocks = torch.randn(heads, 5, 16), torch.randn(7, kv_heads, 8, 16)
    rest = torch.randn(kv_heads, tail, 16)
    if packed:          # int8 blocks as memory stores them: the oracle reads them unpacked
        codes, block_scale = int8.pack_keys(blocks, 8)
        blocks = int8.unpack_keys(codes, block_scale, 8, torch.float32)
        got = span_mass(q, codes, 0.3, rest, chunk=chunk, block_scale=block_scale).spans
    else:
        got = span_mass(q, blocks, 0.3, rest, chunk=chunk).spans
    keys = torch.cat([blocks.transpose(0, 1).reshape(kv_heads, -1, 16), rest], 1)
    probs = torch.softmax(torch.einsum("hnd,hkd->hnk", q, keys.repeat_interleave(heads // kv_heads, 0)) * 0.3, -1)
    per_key = probs.sum((0, 1)) / (heads * 5)
    want = torch.stack([per_key[i: i + 8].sum() for i in range(0, keys.shape[1], 8)])
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)


def test_span_mass_of_row_groups_is_each_groups_own_in_one_pass():
    torch.manual_seed(1)
    q, blocks, rest = torch.randn(6, 7, 16), torch.randn(5, 3, 8, 16), torch.randn(3, 5, 16)
    scale = torch.rand(5, 3, 1, 16) / 50
    packed = torch.randint(-127, 128, blocks.shape, dtype=torch.int8)
    both = span_mass(q, packed, 0.3, rest, chunk=2, block_scale=scale, groups=(4, 3))
    for i, (a, b) in enumerate([(0, 4), (4, 7)]):
        alone = span_mass(q[:, a:b], packed, 0.3, rest, chunk=2, block_scale=scale)
        torch.testing.assert_close(both.spans[i], alone.spans)
        torch.testing.assert_close(both.lse.view(3, 2, 7)[:, :, a:b].reshape(3, -1), alone.lse)
    with pytest.raises(ValueError, match="groups"):
        span_mass(q, packed, 0.3, rest, block_scale=scale, groups=(4, 4))


@pytest.mark.parametrize("heads, kv_heads, tail", [(4, 2, 0), (6, 3, 5)])
def test_key_shares_are_each_keys_share_of_the_same_softmax(heads, kv_heads, tail):
    torch.manual_seed(tail)
    q, blocks, rest = torch.randn(heads, 5, 16), torch.randn(7, kv_heads, 8, 16), torch.randn(kv_heads, tail, 16)
    mass = span_mass(q, blocks, 0.3, rest, chunk=3)
    keys = torch.cat([blocks.transpose(0, 1).reshape(kv_heads, -1, 16), rest], 1)
    probs = torch.softmax(torch.einsum("hnd,hkd->hnk", q, keys.repeat_interleave(heads // kv_heads, 0)) * 0.3, -1)
    got = key_shares(q, blocks[2], 0.3, mass.lse)                     # one block's 8 keys
    assert torch.allclose(got, probs.mean((0, 1))[16:24], atol=1e-6)
    assert torch.allclose(got.sum(), mass.spans[2], atol=1e-6)


def test_the_question_span_covers_exactly_the_users_words(engine):
    history = [("Who wrote it?", "Ann.")]
    for asked in (("What is the key?", ()), ("And where?", history)):
        ids, (a, b) = engine.question_ids(*asked)
        assert ids.tolist() == engine.encode(engine.question_text(*asked)).tolist()
        assert engine.tokenizer.decode(ids[a:b].tolist()).strip() == asked[0]


def test_voted_blocks_join_every_layer_and_every_step_and_are_recorded(engine):
    memory = engine.read(torch.arange(300) % 256)
    answer = engine.ask(memory, "what is it?", max_new_tokens=4).wait()
    trace = answer.trace
    _, (a, b) = engine.question_ids("what is it?")
    window_spans = -(-(memory.length - memory.layers[0].r0) // 8)          # the document's tail, not the question
    assert trace.votes.shape == (memory.n_blocks + window_spans,)
    focus = engine.focus(memory, *engine.question_ids("what is it?")[:1], (memory.length + a, memory.length + b))
    assert list(focus.layers) == [1]                                       # the middle third of 2 layers
    n_rows = engine.question_ids("what is it?")[0].numel()
    assert torch.allclose(focus.votes.sum(), torch.tensor(float(b - a)))               # one share per word
    assert torch.allclose(focus.baseline.sum(), torch.tensor(float(n_rows - (b - a))))  # and per template token
    assert torch.allclose(trace.votes, focus.scores) and abs(float(trace.votes.sum())) < 1e-5
    scores = trace.votes[: memory.n_blocks]
    best = int(scores.argmax())                                            # the best block and the one after it
    assert trace.pinned.tolist() == sorted([best, best + 1 if best + 1 < memory.n_blocks else best - 1])
    assert {r.step for r in trace.records} == set(range(len(trace.steps)))
    for r in trace.records:
        assert set(trace.pinned.tolist()) <= set(r.block_ids.tolist())
        assert r.block_ids.numel() == 2 + 2 and r.block_ids.unique().numel() == 4     # own top-k never repeats one
    plain = engine.with_config(engine.cfg.replace(focus_blocks=0)).ask(memory, "what is it?", max_new_tokens=4).wait()
    assert plain.trace.votes is None and plain.trace.pinned is None
    assert {r.block_ids.numel() for r in plain.trace.records} == {2}
    only = engine.with_config(engine.cfg.replace(focus_topk=0)).ask(memory, "what is it?", max_new_tokens=4).wait()
    assert all(r.block_ids.tolist() == only.trace.pinned.tolist() for r in only.trace.records)   # the focus alone
    alone = engine.with_config(engine.cfg.replace(focus_alone=True)).ask(memory, "what is it?", max_new_tokens=4).wait()
    assert all(r.block_ids.tolist() == alone.trace.pinned.tolist() for r in alone.trace.records)  # no own top-k
    assert answer.trace.evidence(memory.n_blocks)[0] == int(trace.votes.argmax())


def test_a_long_follow_up_is_probed_with_the_template_near_its_words_and_only_the_documents_spans(engine):
    """Each baseline row is a pass over every block key: a conversation's earlier turns would make the probe
    of a follow-up cost its whole history (27 s against 7 on a 75K-token book). And a history longer than a
    chunk pushes its own tokens into blocks while it is probed: they are no evidence (it used to crash)."""
    memory = engine.read(torch.arange(300) % 256)
    history = [(f"What is part {i}?", "It is a long answer about that part of the document. " * 3) for i in range(3)]
    ids, (a, b) = engine.question_ids("And the last one?", history)
    assert a > BASELINE_BEFORE and ids.numel() > 4 * engine.cfg.chunk_size
    focus = engine.focus(memory, ids, (memory.length + a, memory.length + b))
    layer, = focus.layers
    rows = {name: sum(q.shape[1] for q, _ in focus._rows[layer][name]) for name in ("votes", "baseline")}
    assert rows == {"votes": b - a, "baseline": BASELINE_BEFORE + ids.numel() - b}
    window_spans = -(-(memory.length - memory.layers[0].r0) // 8)
    assert focus.votes.shape == focus.baseline.shape == (memory.n_blocks + window_spans,)
    answer = engine.ask(memory, "And the last one?", max_new_tokens=4, history=history).wait()
    assert answer.trace.votes.shape == focus.votes.shape and answer.trace.pinned.numel() > 0


def test_pinned_blocks_are_reread_in_document_order_just_before_the_question(engine):
    memory = engine.read(torch.arange(300) % 256)
    layer = memory.layers[1]
    focus = Focus((0, 1), 0, range(0, 1), 2, gap=4, pinned=torch.tensor([3, 7]))
    near = focus.near(1, layer, engine.rope, 48)
    (k3, k7), (v3, v7) = layer.blocks.take(torch.tensor([3, 7]))           # [Hkv, bs, d] raw, unpacked
    raw = torch.cat([k3, k7], 1)
    assert near.start is None and torch.allclose(near.k, engine.rope.apply(raw, 48 - 4 - 16))
    assert torch.equal(near.v, torch.cat([v3, v7], 1))
    assert focus.near(1, layer, engine.rope, 48) is near                 # built once per answer


def test_the_focus_never_touches_the_documents_memory(engine):
    memory = engine.read(torch.arange(300) % 256)
    before = (memory.length, memory.n_blocks, memory.layers[0].recent_k.clone())
    first = engine.ask(memory, "what is it?", max_new_tokens=3).wait()
    again = engine.ask(memory, "what is it?", max_new_tokens=3).wait()
    assert first.token_ids == again.token_ids and torch.equal(first.trace.pinned, again.trace.pinned)
    assert (memory.length, memory.n_blocks) == before[:2] and torch.equal(memory.layers[0].recent_k, before[2])


def _window_focus(engine, memory, span: int) -> Focus:
    """A focus whose evidence is window span `span`, as the probe would leave it."""
    _, (a, b) = engine.question_ids("what is it?")
    focus = Focus((memory.length + a, memory.length + b), memory.length, range(1, 2), 2, gap=4)
    spans = memory.n_blocks + -(-(memory.length - memory.layers[0].r0) // engine.cfg.block_size)
    focus.votes = torch.zeros(spans)
    focus.votes[span] = 1.0
    focus.choose(memory.n_blocks, memory.block_span)
    return focus


def test_window_evidence_is_reread_alone_and_the_rest_of_the_window_left_out(engine):
    memory = engine.read(torch.arange(300) % 256)
    ids = engine.question_ids("what is it?")[0]
    span = memory.n_blocks                                       # the oldest span still in the window
    a, b = memory.block_span(span)[0], memory.block_span(span + 1)[1]

    def answer_logits(changed: range = range(0)) -> torch.Tensor:
        fork, focus = memory.fork(), _window_focus(engine, memory, span)
        for layer in fork.layers:                                # other K/V at those document positions
            k, v = layer.recent_k.clone(), layer.recent_v.clone()
            rows = [p - layer.r0 for p in changed]
            k[:, rows], v[:, rows] = torch.randn_like(k[:, rows]), torch.randn_like(v[:, rows])
            layer.recent_k, layer.recent_v = k, v
        return prefill(engine.model, fork, engine.rope, ids, focus=focus, cfg=engine.cfg)

    focus = _window_focus(engine, memory, span)
    assert focus.alone == (a, b) and focus.pinned.numel() == 0
    alone = answer_logits()
    torch.manual_seed(0)
    assert torch.allclose(answer_logits(range(b, memory.length)), alone, atol=1e-5)   # the rest: unread
    assert not torch.allclose(answer_logits(range(a, b)), alone, atol=1e-3)          # the evidence: read


def test_window_evidence_read_alone_is_what_the_trace_shows(engine):
    memory = engine.read(torch.arange(300) % 256)
    span = memory.n_blocks + 1
    focus, trace = _window_focus(engine, memory, span), Trace()
    prefill(engine.model, memory.fork(), engine.rope, engine.question_ids("what is it?")[0], trace, focus=focus,
            cfg=engine.cfg)
    assert trace.records and all(r.block_ids.numel() == 0 for r in trace.records)
    assert {r.window_first for r in trace.records} == {span}
    assert all(r.window_mass.shape == (2,) and float(r.window_mass.sum()) > 0 for r in trace.records)


@pytest.mark.parametrize("blocks_alone", [False, True])
def test_pinned_blocks_read_alone_leave_the_window_out(engine, blocks_alone):
    memory = engine.read(torch.arange(300) % 256)
    ids, (a, b) = engine.question_ids("what is it?")

    def answer_logits(perturb: bool) -> torch.Tensor:
        fork = memory.fork()
        focus = Focus((memory.length + a, memory.length + b), memory.length, range(1, 2), 2, gap=4,
                      pinned=torch.tensor([3, 4]), scores=torch.ones(memory.n_blocks), blocks_alone=blocks_alone)
        if perturb:                                              # other K/V in the document's window
            for layer in fork.layers:
                layer.recent_k, layer.recent_v = torch.randn_like(layer.recent_k), torch.randn_like(layer.recent_v)
        return prefill(engine.model, fork, engine.rope, ids, focus=focus, cfg=engine.cfg.replace(focus_topk=0))

    same = torch.allclose(answer_logits(True), answer_logits(False), atol=1e-5)
    assert same == blocks_alone


def test_a_document_shorter_than_the_window_is_voted_on_and_weighed_for_quotes(engine):
    memory = engine.read(torch.arange(30) % 256)          # 30 tokens: sinks and window only, no block
    assert memory.n_blocks == 0
    answer = engine.ask(memory, "what is it?", max_new_tokens=2).wait()
    spans = -(-(memory.length - engine.cfg.n_init) // engine.cfg.block_size)
    assert answer.trace.votes.shape == (spans,) and answer.trace.pinned.numel() == 0
    assert answer.token_votes and all(v.shape[0] == 2 for v in answer.token_votes.values())
    # each token's share of the words' attention: the shares of a span's tokens add up to its vote
    words = next(iter(answer.token_votes.values()))[0]
    assert torch.all(words >= 0) and float(words.sum()) <= 1.0


def test_the_tokens_of_the_best_spans_add_up_to_their_share_of_the_words_attention(engine):
    memory = engine.read(torch.arange(300) % 256)
    ids, (a, b) = engine.question_ids("what is it?")
    focus = engine.focus(memory, ids, (memory.length + a, memory.length + b))
    words = focus.votes / focus.votes.sum()
    assert focus.token_votes and len(focus.token_votes) <= 8
    for span, votes in focus.token_votes.items():
        assert torch.allclose(votes[0].sum(), words[span], atol=1e-5)
