"""A memory saved as tensors and restored answers exactly as the original, and a read resumes."""
import pytest
import torch

from infllm_engine import Engine, EngineError, InfLLMConfig, snapshot

from .conftest import tiny_llama, tiny_tokenizer

SMALL = dict(n_init=4, n_local=32, block_size=8, repr_topk=2, chunk_size=16, topk=2, cache_blocks=8)
DOC = torch.arange(7, 7 + 300) % 256


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_llama(), tiny_tokenizer(), InfLLMConfig(**SMALL))


def same_answer(engine, a, b):
    x = engine.ask(a, "and then?", max_new_tokens=8).wait()
    y = engine.ask(b, "and then?", max_new_tokens=8).wait()
    return x.token_ids == y.token_ids and x.trace.to_dict() == y.trace.to_dict()


@pytest.mark.parametrize("method", ["infllm", "streaming", "full"])
def test_a_restored_memory_answers_exactly_as_the_original(engine, method):
    e = engine.with_config(engine.cfg.replace(method=method))
    memory = e.read(DOC)
    blocks = snapshot.blocks(memory)
    restored = snapshot.restore(e.new_memory(), snapshot.state(memory), [blocks])
    assert restored.length == memory.length == 300 and restored.n_blocks == memory.n_blocks
    assert same_answer(e, memory, restored)
    if method == "infllm":
        assert memory.n_blocks > 20
        # Blocks are adopted as given (a file mapping stays one), not copied.
        assert restored.layers[0].blocks.base.k.data_ptr() == blocks["0.k"].data_ptr()


def test_a_read_resumed_from_a_checkpoint_ends_with_the_same_memory(engine):
    whole = engine.read(DOC)
    first = engine.read(DOC[:160])                       # a checkpoint at a chunk boundary
    saved_state, early_blocks = snapshot.state(first), snapshot.blocks(first)
    n_early = first.n_blocks
    resumed = snapshot.restore(engine.new_memory(), saved_state, [early_blocks])
    engine.read(DOC[160:], resumed)
    late_blocks = snapshot.blocks(resumed, n_early)      # only what the resumed run added
    assert late_blocks["0.k"].shape[0] == whole.n_blocks - n_early > 0
    reloaded = snapshot.restore(engine.new_memory(), snapshot.state(resumed), [early_blocks, late_blocks])
    for a, b in zip(whole.layers, reloaded.layers):
        for got, want in zip(a.blocks.blocks(), b.blocks.blocks()):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a.recent_score, b.recent_score, atol=1e-6, rtol=1e-5)
    assert same_answer(engine, whole, reloaded)


def test_an_incomplete_saved_memory_is_refused(engine):
    memory = engine.read(DOC)
    state = snapshot.state(memory)
    with pytest.raises(EngineError, match="incomplete: 0 blocks of"):
        snapshot.restore(engine.new_memory(), state, [])
    del state["1.recent_k"]
    with pytest.raises(EngineError, match="1.recent_k"):
        snapshot.restore(engine.new_memory(), state, [snapshot.blocks(memory)])
