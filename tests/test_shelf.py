"""A question across several memories: every document votes, the best spans of all are re-read together."""
import pytest
import torch

from infllm_engine import Engine, InfLLMConfig
from infllm_engine.focus import Focus
from infllm_engine.shelf import Shelf

from .conftest import tiny_llama, tiny_tokenizer
from .test_focus import CHATML, SMALL


@pytest.fixture
def engine():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHATML
    return Engine(tiny_llama(), tokenizer, InfLLMConfig(focus_blocks=2, focus_gap=4, focus_topk=0, **SMALL))


def _probe(votes: list[float], baseline: list[float]) -> Focus:
    focus = Focus((0, 1), 0, range(1), 2)
    focus.votes, focus.baseline = torch.tensor(votes), torch.tensor(baseline)
    return focus


def test_the_document_where_the_words_attention_gathers_wins_and_is_read_alone():
    spread = _probe([1, 1, 1, 1.2], [1, 1, 1, 1])         # a little above its baseline everywhere
    gathered = _probe([0.2, 3, 0.4], [1, 1, 1])           # one span draws most of the words' attention
    shelf = Shelf.choose([spread, None, gathered], n_pinned=4, lexical_weight=0.0)
    assert shelf.sizes == [4, 0, 3] and shelf.offsets == [0, 4, 4]
    assert shelf.best == 2 and shelf.locate(5) == (2, 1)
    # Its best span with the one after it; the other document's spans, though positive, are not read.
    assert float(shelf.scores[3]) > 0 and shelf.reads == [(2, 1), (2, 2)]
    assert shelf.global_ids().tolist() == [5, 6]
    # Word matches from one index over the library join by rank: a strong match moves a document up.
    words = Shelf.choose([spread, None, gathered], 2, 1.0, [{0: 9.0}, None, {2: 1.0}])
    assert words.scores.shape == (7,) and words.reads == [(0, 0), (0, 1)]


def test_a_shelf_of_one_reads_what_the_focus_reads_alone(engine):
    """One memory asked as a shelf re-reads the same two blocks at the same places: the same answer."""
    memory = engine.read(torch.arange(300) % 256)
    single = engine.ask(memory, "what is it?", max_new_tokens=6).wait()
    best = int(single.trace.votes.argmax())
    assert best < memory.n_blocks                      # the precondition: its best evidence is a memory block
    shelf = engine.ask_shelf([memory], "what is it?", max_new_tokens=6).wait()
    assert shelf.trace.pinned.tolist() == single.trace.pinned.tolist()
    assert shelf.token_ids == single.token_ids
    assert torch.allclose(shelf.trace.votes, single.trace.votes)       # without word matches, the same evidence
    assert shelf.trace.parts == [single.trace.votes.numel()]


def test_spans_of_two_memories_are_read_wherever_the_memories_stand(engine):
    a = engine.read((torch.arange(300) * 7) % 256)
    b = engine.read(torch.arange(120) % 256)
    ab = engine.with_config(engine.cfg.replace(focus_blocks=4)).ask_shelf([a, b], "what is it?", max_new_tokens=5).wait()
    ba = engine.with_config(engine.cfg.replace(focus_blocks=4)).ask_shelf([b, a], "what is it?", max_new_tokens=5).wait()
    assert ab.token_ids == ba.token_ids                 # the documents' order on the shelf changes nothing
    assert ab.trace.parts == list(reversed(ba.trace.parts))
    sizes = ab.trace.parts
    shelf = ab.shelf
    assert len(shelf.reads) == 4 and {d for d, _ in shelf.reads} == {shelf.best}
    for r in ab.trace.records:                         # every step attends the re-read spans, and only them
        assert sorted(r.block_ids.tolist()) == sorted(ab.trace.pinned.tolist())
        assert r.block_mass.numel() == 4 and float(r.block_mass.sum()) > 0
    assert ab.trace.votes.numel() == sum(sizes)
    assert ab.token_votes and ab.document == shelf.best
    # The K/V read for a span are the memory's own: a block, or recent tokens.
    k, v = a.read_span(1, *a.block_span(2))
    (kb,), (vb,) = a.layers[1].blocks.take(torch.tensor([2]))
    assert torch.equal(k, kb) and torch.equal(v, vb)
    window_span = b.block_span(b.n_blocks)              # the local window's first span: recent tokens
    assert torch.equal(b.read_span(1, *window_span)[0], b.layers[1].span(*window_span)[0])
