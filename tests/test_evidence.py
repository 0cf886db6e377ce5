"""The question's probe and its evidence: the words vote by exact attention, the chosen ranges are re-read.

One memory is a shelf of one: every question goes through Engine.ask(memories, ...). GOLDEN holds what the
tiny model answered about one memory before the one-path refactor (issue 36), when one document and
several had two paths through the engine: the same tokens, votes and quote weights are still given.
"""
import pytest
import torch

from infllm_engine import Engine, InfLLMConfig
from infllm_engine.evidence import Evidence, Read, choose
from infllm_engine.generate import Call, prefill
from infllm_engine.probe import BASELINE_BEFORE, Probe, voting_layers
from infllm_engine.trace import Trace
from kernels import int8, key_shares, span_mass

from .conftest import tiny_llama, tiny_tokenizer

SMALL = dict(n_init=4, n_local=48, block_size=8, repr_topk=2, chunk_size=16, topk=2, cache_blocks=8)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DOC = (torch.arange(300) * 7 + 3) % 256


@pytest.fixture
def engine():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHATML
    return Engine(tiny_llama(), tokenizer, InfLLMConfig(focus_blocks=4, focus_gap=4, **SMALL))


# Recorded on the engine of ad5c2eb (Engine.ask of one memory, before the shelf became the one path):
# (config changes, question, history, word matches) -> (tokens, pinned blocks or None, quote weights by span).
WINDOW = 32         # a span of the local window of DOC's memory (31 blocks; spans 31 to 36 in the window)
GOLDEN = {
    "blocks": ({}, "what is it?", (), None, [41, 246, 109, 127, 227, 222, 121, 78], [16, 17, 18, 19]),
    "lexical": ({}, "where is the key?", (), {2: 3.0, 9: 1.0, 30: 0.5}, [151, 174, 174, 174, 174, 174, 174, 7],
                [2, 3, 9, 10]),
    "follow-up": ({}, "and then?", [("Who wrote it?", "Somebody did, long ago.")], {5: 1.0},
                  [153, 158, 222, 127, 225, 222, 127, 225], [1, 2, 5, 6]),
    "window": ({"focus_lexical": 100.0}, "what is it?", (), {WINDOW: 5.0}, [206, 121, 78, 91, 66, 163, 89, 121],
               [WINDOW, WINDOW + 1]),
    "window-last": ({"focus_lexical": 100.0}, "what is it?", (), {WINDOW + 4: 5.0},
                    [238, 147, 122, 74, 153, 108, 42, 255], [WINDOW + 4]),
    "with-window": ({"focus_alone": False}, "what is it?", (), {4: 2.0}, [206, 3, 150, 193, 237, 141, 198, 206],
                    [4, 5, 18, 19]),
    "plain": ({"focus_blocks": 0}, "what is it?", (), None, [206, 3, 150, 200, 153, 108, 42, 255], None),
}


@pytest.mark.parametrize("case", GOLDEN)
def test_one_memory_is_answered_token_for_token_as_before_the_one_path(engine, case):
    changes, question, history, lexical, tokens, pinned = GOLDEN[case]
    memory = engine.read(DOC)
    assert memory.n_blocks == WINDOW - 1
    answer = engine.with_config(engine.cfg.replace(**changes)).ask(memory, question, 8, history, lexical).wait()
    assert answer.token_ids == tokens
    assert (answer.trace.pinned.tolist() if answer.trace.pinned is not None else None) == pinned
    assert answer.document == 0 and (pinned is None or answer.trace.parts == [37])


def test_a_document_shorter_than_the_window_is_answered_as_before_and_weighed_for_quotes(engine):
    memory = engine.read(torch.arange(30) % 256)          # 30 tokens: sinks and window only, no block
    answer = engine.ask(memory, "what is it?", 8).wait()
    assert answer.token_ids == [206, 169, 134, 222, 91, 23, 226, 222]          # GOLDEN's "short"
    spans = -(-(memory.length - engine.cfg.n_init) // engine.cfg.block_size)
    assert answer.trace.votes.shape == (spans,) and answer.trace.pinned.numel() == 0
    assert sorted(answer.token_votes) == [1, 2, 3] and all(v.shape[0] == 2 for v in answer.token_votes.values())
    words = answer.token_votes[1][0]          # each token's share of the words' attention
    assert torch.all(words >= 0) and float(words.sum()) <= 1.0


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


def test_the_words_vote_a_share_each_and_the_best_blocks_are_reread_by_every_layer_and_step(engine):
    memory = engine.read(DOC)
    ids, span = engine.question_ids("what is it?")
    probe = engine.probe(memory, ids, span)
    assert list(probe.layers) == list(voting_layers(2, engine.cfg.focus_layers)) == [1]   # the middle third
    a, b = span
    assert torch.allclose(probe.votes.sum(), torch.tensor(float(b - a)))                 # one share per word
    assert torch.allclose(probe.baseline.sum(), torch.tensor(float(ids.numel() - (b - a))))   # and per template token
    window_spans = -(-(memory.length - memory.layers[0].r0) // 8)          # the document's tail, not the question
    assert probe.votes.shape == (memory.n_blocks + window_spans,)
    answer = engine.ask(memory, "what is it?", max_new_tokens=4).wait()
    trace = answer.trace
    assert torch.allclose(trace.votes, probe.attention()) and abs(float(trace.votes.sum())) < 1e-5
    best = int(trace.votes[: memory.n_blocks].argmax())
    assert best in trace.pinned.tolist() and (best + 1 if best + 1 < memory.n_blocks else best - 1) in trace.pinned.tolist()
    assert trace.pinned.numel() == 4 and {r.step for r in trace.records} == set(range(len(trace.steps)))
    for r in trace.records:                 # read alone: exactly the pinned blocks, no layer's own top-k
        assert r.block_ids.tolist() == trace.pinned.tolist() and float(r.block_mass.sum()) > 0
    plain = engine.with_config(engine.cfg.replace(focus_blocks=0)).ask(memory, "what is it?", max_new_tokens=4).wait()
    assert plain.trace.votes is None and plain.trace.pinned is None
    assert {r.block_ids.numel() for r in plain.trace.records} == {2}       # each layer's own top-k
    assert answer.trace.evidence(37)[0] == int(trace.votes.argmax())


def test_a_long_follow_up_is_probed_with_the_template_near_its_words_and_only_the_documents_spans(engine):
    """Each baseline row is a pass over every block key: a conversation's earlier turns would make the probe
    of a follow-up cost its whole history (27 s against 7 on a 75K-token book). And a history longer than a
    chunk pushes its own tokens into blocks while it is probed: they are no evidence (it used to crash)."""
    memory = engine.read(torch.arange(300) % 256)
    history = [(f"What is part {i}?", "It is a long answer about that part of the document. " * 3) for i in range(3)]
    ids, (a, b) = engine.question_ids("And the last one?", history)
    assert a > BASELINE_BEFORE and ids.numel() > 4 * engine.cfg.chunk_size
    probe = engine.probe(memory, ids, (a, b))
    layer, = probe.layers
    rows = {name: sum(q.shape[1] for q, _ in probe.rows[layer][name]) for name in ("votes", "baseline")}
    assert rows == {"votes": b - a, "baseline": BASELINE_BEFORE + ids.numel() - b}
    window_spans = -(-(memory.length - memory.layers[0].r0) // 8)
    assert probe.votes.shape == probe.baseline.shape == (memory.n_blocks + window_spans,)
    answer = engine.ask(memory, "And the last one?", max_new_tokens=4, history=history).wait()
    assert answer.trace.votes.shape == probe.votes.shape and answer.trace.pinned.numel() > 0


def _evidence(memory, reads: list[tuple[int, int, int]], alone: bool = True, gap: int = 4) -> Evidence:
    spans = memory.n_blocks + -(-(memory.length - memory.layers[0].r0) // 8)
    return Evidence(torch.ones(spans), (spans,), 0, tuple(Read(memory, a, b, s) for a, b, s in reads), alone, gap,
                    memory.length)


def test_reread_blocks_sit_in_document_order_just_before_the_question(engine):
    memory = engine.read(DOC)
    evidence = _evidence(memory, [(*memory.block_span(3), 3), (*memory.block_span(7), 7)])
    near = evidence.keys(1, engine.rope, 48)
    layer = memory.layers[1]
    (k3, k7), (v3, v7) = layer.blocks.take(torch.tensor([3, 7]))           # [Hkv, bs, d] raw, unpacked
    assert near.start is None and torch.allclose(near.k, engine.rope.apply(torch.cat([k3, k7], 1), 48 - 4 - 16))
    assert torch.equal(near.v, torch.cat([v3, v7], 1))
    assert evidence.keys(1, engine.rope, 48) is near                 # built once per answer
    assert evidence.pinned.tolist() == [3, 7]


def test_asking_never_touches_the_documents_memory(engine):
    memory = engine.read(DOC)
    before = (memory.length, memory.n_blocks, memory.layers[0].recent_k.clone())
    first = engine.ask(memory, "what is it?", max_new_tokens=3).wait()
    again = engine.ask(memory, "what is it?", max_new_tokens=3).wait()
    assert first.token_ids == again.token_ids and torch.equal(first.trace.pinned, again.trace.pinned)
    assert (memory.length, memory.n_blocks) == before[:2] and torch.equal(memory.layers[0].recent_k, before[2])


def _answer_logits(engine, memory, evidence_of, changed: range | None = None) -> torch.Tensor:
    """The question's last logits after the document with the evidence evidence_of(memory) gives, other K/V
    put at the `changed` positions of its window first (all of it for range(0))."""
    memory = memory.fork()
    if changed is not None:
        for layer in memory.layers:
            k, v = layer.recent_k.clone(), layer.recent_v.clone()
            rows = [p - layer.r0 for p in changed] if changed else slice(None)
            k[:, rows], v[:, rows] = torch.randn_like(k[:, rows]), torch.randn_like(v[:, rows])
            layer.recent_k, layer.recent_v = k, v
    call = Call(engine.cfg, evidence=evidence_of(memory))
    return prefill(engine.model, memory.fork(), engine.rope, engine.question_ids("what is it?")[0], call)


def test_window_evidence_is_reread_alone_and_the_rest_of_the_window_left_out(engine):
    memory = engine.read(DOC)
    ids, span = engine.question_ids("what is it?")
    votes = torch.zeros(37)
    votes[WINDOW] = 1.0

    def evidence_of(m) -> Evidence:
        return choose([m], [votes], [], 4, {}, False, 4)
    evidence = evidence_of(memory)
    a, b = memory.block_span(WINDOW)[0], memory.block_span(WINDOW + 1)[1]
    assert [(r.start, r.end, r.span) for r in evidence.reads] == [(a, a + 8, WINDOW), (a + 8, b, WINDOW + 1)]
    assert evidence.alone                                    # whatever focus_alone says
    alone = _answer_logits(engine, memory, evidence_of)
    torch.manual_seed(0)
    assert torch.allclose(_answer_logits(engine, memory, evidence_of, range(b, memory.length)), alone, atol=1e-5)
    assert not torch.allclose(_answer_logits(engine, memory, evidence_of, range(a, b)), alone, atol=1e-3)
    trace = Trace()
    prefill(engine.model, memory.fork(), engine.rope, ids, Call(engine.cfg, trace, evidence=evidence))
    assert trace.records and all(r.block_ids.tolist() == [WINDOW, WINDOW + 1] and r.window_mass is None
                                 for r in trace.records)
    assert all(r.block_mass.shape == (2,) and float(r.block_mass.sum()) > 0 for r in trace.records)


@pytest.mark.parametrize("alone", [False, True])
def test_reread_blocks_read_alone_leave_the_window_out(engine, alone):
    memory = engine.read(DOC)

    def evidence_of(m) -> Evidence:
        return _evidence(m, [(*m.block_span(3), 3), (*m.block_span(4), 4)], alone)
    torch.manual_seed(0)
    same = torch.allclose(_answer_logits(engine, memory, evidence_of, range(0)),
                          _answer_logits(engine, memory, evidence_of), atol=1e-5)
    assert same == alone


def _probe(votes: list[float], baseline: list[float]) -> torch.Tensor:
    return Probe((0, 1), 0, range(1), torch.tensor(votes), torch.tensor(baseline)).attention()


class Tall:
    """A memory's geometry as choose() reads it: its blocks and length (block i at 10 + 8 i)."""

    def __init__(self, n_blocks: int, length: int):
        self.n_blocks, self.length = n_blocks, length

    def block_span(self, i: int) -> tuple[int, int]:
        return 10 + 8 * i, 18 + 8 * i


def test_the_memory_where_the_words_attention_gathers_hosts_the_answer_and_only_its_spans_are_read():
    spread = _probe([1, 1, 1, 1.2], [1, 1, 1, 1])         # a little above its baseline everywhere
    gathered = _probe([0.2, 3, 0.4], [1, 1, 1])           # one span draws most of the words' attention
    memories = [Tall(4, 42), Tall(0, 5), Tall(3, 40)]
    evidence = choose(memories, [spread, None, gathered], [], 4, {}, True, 4)
    assert evidence.sizes == (4, 0, 3) and evidence.offsets == [0, 4, 4]
    # Its best block with the others by score, each with the one after it (the last: before it); the other
    # memory's spans, though positive, are not read.
    assert evidence.host == 2 and float(evidence.scores[3]) > 0
    assert [(r.memory, r.span) for r in evidence.reads] == [(memories[2], 4), (memories[2], 5), (memories[2], 6)]
    assert evidence.pinned.tolist() == [4, 5, 6] and evidence.of(2).tolist() == evidence.scores[4:].tolist()
    # Word matches from one index over the library join by rank: a strong match moves a memory up.
    words = choose(memories, [spread, None, gathered], [{0: 9.0}, None, {2: 1.0}], 2, {"words": 1.0}, True, 4)
    assert words.scores.shape == (7,) and words.host == 0 and [r.span for r in words.reads] == [0, 1]


def test_each_best_block_is_reread_with_the_next_one_the_last_with_the_one_before():
    votes = torch.tensor([0.0, 0.0, 0.1, 0.3, 1.0, 0.2, 0.0, 0.0])      # block 3 draws more than block 5
    assert [r.span for r in choose([Tall(8, 80)], [votes], [], 2, {}, True, 4).reads] == [4, 5]
    last = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 1.0])
    assert [r.span for r in choose([Tall(8, 80)], [last], [], 2, {}, True, 4).reads] == [6, 7]
    assert choose([Tall(8, 80)], [None], [], 2, {}, True, 4) is None            # nothing voted


def test_spans_of_two_memories_are_read_wherever_the_memories_stand(engine):
    a = engine.read((torch.arange(300) * 7) % 256)
    b = engine.read(torch.arange(120) % 256)
    ab = engine.ask([a, b], "what is it?", max_new_tokens=5).wait()
    ba = engine.ask([b, a], "what is it?", max_new_tokens=5).wait()
    assert ab.token_ids == ba.token_ids                 # the memories' order changes nothing
    assert ab.trace.parts == list(reversed(ba.trace.parts))
    host = ab.evidence.host
    reads = len(ab.evidence.reads)
    assert ab.document == host and reads in (1, 2, 4) and {r.memory for r in ab.evidence.reads} == {[a, b][host]}
    offset = ab.evidence.offsets[host]
    for r in ab.trace.records:                         # every step attends the re-read spans, and only them
        assert r.block_ids.tolist() == ab.trace.pinned.tolist() and min(r.block_ids.tolist()) >= offset
        assert r.block_mass.numel() == reads and float(r.block_mass.sum()) > 0
    assert ab.trace.votes.numel() == sum(ab.trace.parts) and ab.token_votes
    # The K/V read for a span are the memory's own: a block, or recent tokens.
    k, v = a.read_span(1, *a.block_span(2))
    (kb,), (vb,) = a.layers[1].blocks.take(torch.tensor([2]))
    assert torch.equal(k, kb) and torch.equal(v, vb)
    window_span = b.block_span(b.n_blocks)              # the local window's first span: recent tokens
    assert torch.equal(b.read_span(1, *window_span)[0], b.layers[1].span(*window_span)[0])
    with pytest.raises(Exception, match="across documents needs"):
        engine.with_config(engine.cfg.replace(focus_blocks=0)).ask([a, b], "what is it?")


def test_the_tokens_of_the_best_spans_add_up_to_their_share_of_the_words_attention(engine):
    memory = engine.read(DOC)
    ids, span = engine.question_ids("what is it?")
    probe = engine.probe(memory, ids, span)
    weights = probe.weigh(memory, probe.attention())
    words = probe.votes / probe.votes.sum()
    assert weights and len(weights) <= 8
    for i, votes in weights.items():
        assert torch.allclose(votes[0].sum(), words[i], atol=1e-5)
