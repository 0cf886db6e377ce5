"""A memory saved as tensors and restored answers exactly as the original, and a read resumes."""
import pytest
import torch

from infllm_engine import Engine, EngineError, InfLLMConfig, snapshot

from .conftest import tiny_llama, tiny_tokenizer
from .helpers import format1

SMALL = dict(n_init=4, n_local=32, block_size=8, repr_topk=2, chunk_size=16, topk=2, cache_blocks=8)
DOC = torch.arange(7, 7 + 300) % 256


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_llama(), tiny_tokenizer(), InfLLMConfig(**SMALL))


def same_answer(engine, a, b):
    x = engine.ask(a, "and then?", max_new_tokens=8).wait()
    y = engine.ask(b, "and then?", max_new_tokens=8).wait()
    return x.token_ids == y.token_ids and x.trace.to_dict() == y.trace.to_dict()


def same_state(a, b):
    x, y = snapshot.state(a), snapshot.state(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("method", ["infllm", "streaming", "full"])
def test_a_memory_restores_to_its_packed_form_and_a_second_round_trip_is_exact(engine, method):
    e = engine.with_config(engine.cfg.replace(method=method))
    memory = e.read(DOC)
    blocks = snapshot.blocks(memory)
    restored = snapshot.restore(e.new_memory(), snapshot.state(memory), [blocks])
    assert restored.length == memory.length == 300 and restored.n_blocks == memory.n_blocks
    for a, b in zip(memory.layers, restored.layers):    # the window comes back within int8 rounding
        k, k_back = (a.k, b.k) if method == "full" else (a.recent_k, b.recent_k)
        assert k_back.shape == k.shape and (k_back - k).abs().max() <= k.abs().max() / 127
    again = snapshot.restore(e.new_memory(), snapshot.state(restored), [snapshot.blocks(restored)])
    assert same_state(restored, again) and same_answer(e, restored, again)
    if method == "infllm":
        assert memory.n_blocks > 20
        # Blocks are packed when they form and adopted as given (a file mapping stays one), not copied.
        assert restored.layers[0].blocks.base.fields["k"].data_ptr() == blocks["0.k"].data_ptr()
        assert all(torch.equal(x, y) for x, y in zip(memory.layers[-1].blocks.blocks().values(),
                                                     restored.layers[-1].blocks.blocks().values()))


def test_a_read_resumed_from_a_checkpoint_goes_on_exactly_as_the_checkpointed_read(engine):
    """What reading.ingest does at every commit (save, then restore what was saved) makes a resumed run
    end bit-identical to one that never stopped; blocks formed before the checkpoint are untouched."""
    whole = engine.read(DOC)
    first = engine.read(DOC[:160])                       # a checkpoint at a chunk boundary
    saved_state, early_blocks = snapshot.state(first), snapshot.blocks(first)
    n_early = first.n_blocks
    assert all(torch.equal(early_blocks[k], snapshot.blocks(whole)[k][:n_early]) for k in early_blocks)
    runs = []
    for _ in range(2):
        resumed = snapshot.restore(engine.new_memory(), saved_state, [early_blocks])
        engine.read(DOC[160:], resumed)
        runs.append(resumed)
    late_blocks = snapshot.blocks(runs[0], n_early)      # only what the resumed run added
    assert late_blocks["0.k"].shape[0] == whole.n_blocks - n_early > 0
    reloaded = snapshot.restore(engine.new_memory(), snapshot.state(runs[0]), [early_blocks, late_blocks])
    assert same_state(runs[0], runs[1])
    for a, b in zip(runs[1].layers, reloaded.layers):
        assert all(torch.equal(x, y) for x, y in zip(a.blocks.blocks().values(), b.blocks.blocks().values()))
    whole_run = snapshot.restore(engine.new_memory(), snapshot.state(runs[1]), [snapshot.blocks(runs[1])])
    assert same_answer(engine, whole_run, reloaded)


def test_an_incomplete_saved_memory_is_refused(engine):
    memory = engine.read(DOC)
    state = snapshot.state(memory)
    with pytest.raises(EngineError, match="incomplete: 0 blocks of"):
        snapshot.restore(engine.new_memory(), state, [])
    del state["1.recent_k"]
    with pytest.raises(EngineError, match="1.recent_k"):
        snapshot.restore(engine.new_memory(), state, [snapshot.blocks(memory)])


@pytest.mark.parametrize("method", ["infllm", "streaming", "full"])
def test_a_memory_saved_in_format_1_converts_to_what_saving_it_today_gives(engine, method):
    e = engine.with_config(engine.cfg.replace(method=method))
    memory = e.read(DOC)
    state, blocks = snapshot.from_format1(*format1(memory), e.cfg.block_size, chunk=7)   # uneven chunks
    today_state = snapshot.state(memory)
    today_blocks = {k: t for k, t in snapshot.blocks(memory).items() if t.shape[0]}   # streaming: none
    assert state.keys() == today_state.keys() and all(torch.equal(state[k], today_state[k]) for k in state)
    assert blocks.keys() == today_blocks.keys() and all(torch.equal(blocks[k], today_blocks[k]) for k in blocks)
    assert bool(blocks) == (method == "infllm")


def test_mixed_reads_in_bf16_and_answers_in_fp32_from_what_it_stored():
    """dtype "mixed" (what "auto" picks on an AMX Xeon): fp32 weights, and a bf16 copy of them that reads;
    every engine made from it shares the copy, and the stored memory is asked with the fp32 weights."""
    model = tiny_llama()
    fp32 = Engine(model, tiny_tokenizer(), InfLLMConfig(**SMALL))
    mixed = fp32.with_config(fp32.cfg.replace(dtype="mixed"))
    assert mixed.weights is model and next(mixed.model.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32                    # the original is untouched
    again = mixed.with_config(mixed.cfg.replace(topk=1))
    assert again.model is mixed.model                                         # one copy per load
    memory = mixed.read(DOC)
    layer = memory.layers[0]
    assert layer.recent_k.dtype == torch.bfloat16 and layer.recent_score.dtype == torch.float32
    # Read in bf16, the memory is fp32's within bf16 rounding: the same blocks, close keys.
    exact = fp32.read(DOC)
    assert memory.n_blocks == exact.n_blocks > 20
    k, k32 = layer.recent_k.float(), exact.layers[0].recent_k
    assert (k - k32).abs().max() <= 0.05 * k32.abs().max()
    with pytest.raises(EngineError, match="the device and the weights' dtype are fixed"):
        mixed.with_config(mixed.cfg.replace(dtype="bfloat16"))
    asking = mixed.answering()
    assert asking.cfg.dtype == "float32" and asking.model is model and fp32.answering() is fp32
    with pytest.raises(EngineError, match="holds mixed tensors and the engine computes in float32"):
        asking.ask(memory, "and then?", max_new_tokens=2)
    stored = snapshot.restore(asking.new_memory(), snapshot.state(memory), [snapshot.blocks(memory)])
    assert stored.layers[0].recent_k.dtype == torch.float32
    answer = asking.ask(stored, "and then?", max_new_tokens=8).wait()
    assert len(answer.token_ids) == 8 and answer.trace.records
