"""The engine's API: bad input, the retrieval trace, the block cache and forks."""
import gc
import json
import weakref

import pytest
import torch

from kernels import int8

from infllm_engine import Engine, EngineError, InfLLMConfig, Trace
from infllm_engine.blocks import BlockStore, _DeviceCache
from infllm_engine.generate import Call
from infllm_engine.loading import load_model

from .conftest import tiny_llama, tiny_tokenizer

SMALL = dict(n_init=4, n_local=32, block_size=8, repr_topk=2, chunk_size=16, topk=2, cache_blocks=8)


@pytest.fixture
def engine():
    return Engine(tiny_llama(), tiny_tokenizer(), InfLLMConfig(max_tokens=300, **SMALL))


def test_empty_and_too_long_inputs_are_refused_and_leave_memory_as_it_was(engine):
    with pytest.raises(EngineError, match="the input is empty"):
        engine.read(engine.encode(""))
    memory = engine.read(torch.arange(250) % 256)
    with pytest.raises(EngineError, match="too long: 350 tokens, over the configured maximum of 300"):
        engine.read(torch.arange(100), memory)
    assert memory.length == 250
    with pytest.raises(EngineError, match="question is empty"):
        engine.ask(memory, "   ")


def test_a_wrong_model_path_says_so(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"), tmp_path)
    with pytest.raises(EngineError, match="has no config.json"):
        load_model(str(tmp_path), tmp_path)


def test_other_architectures_and_scaled_rope_are_refused(tmp_path):
    from transformers import GPT2Config, LlamaConfig

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(EngineError, match="model type 'gpt2' is not supported"):
        load_model(str(tmp_path / "gpt2"), tmp_path)
    yarn = LlamaConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64,
                       rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                        "original_max_position_embeddings": 2048})
    yarn.save_pretrained(tmp_path / "yarn")
    with pytest.raises(EngineError, match="rope type 'yarn' scales attention"):
        load_model(str(tmp_path / "yarn"), tmp_path)


def test_a_local_model_directory_loads_by_path(tmp_path):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, _, fingerprint = load_model(str(tmp_path / "m"), tmp_path)
    assert loaded.config._attn_implementation == "infllm" and len(fingerprint) == 16
    ids = torch.arange(40) % 256
    engine = Engine(loaded, tokenizer, InfLLMConfig(**SMALL))
    original = Engine(model, tokenizer, InfLLMConfig(**SMALL))
    a = engine.generate(engine.new_memory(), ids, max_new_tokens=5).wait()
    b = original.generate(original.new_memory(), ids, max_new_tokens=5).wait()
    assert a.token_ids == b.token_ids


def test_the_trace_records_every_layer_and_step_and_survives_json(engine):
    engine = engine.with_config(engine.cfg.replace(focus_blocks=0))      # plain InfLLM: topk blocks per layer
    memory = engine.read(torch.arange(200) % 256)
    answer = engine.ask(memory, "what is it?", max_new_tokens=6)
    pieces = list(answer)
    assert "".join(pieces) == answer.text and len(answer.token_ids) == 6
    trace = answer.trace
    kinds = [s.kind for s in trace.steps]
    assert kinds[0] == "prefill" and kinds.count("decode") == 5
    steps_per_layer = {(r.layer, r.step) for r in trace.records}
    assert len(steps_per_layer) == len(trace.records) == engine.n_layers * len(trace.steps)
    total = trace.steps[-1].start + 1
    for r in trace.records:
        # The question's own tokens become blocks of the fork once they leave the window.
        limit = memory.n_blocks if r.step == 0 else (total - 4) // 8
        assert r.block_ids.numel() == 2 and (r.block_ids < limit).all()
        assert 0 < float(r.local_mass) <= 1 and (r.block_mass >= 0).all() and float(r.block_mass.sum()) < 1
    restored = Trace.from_dict(json.loads(json.dumps(trace.to_dict())))
    assert restored.to_dict() == trace.to_dict()
    heat = restored.heat(engine.n_layers, memory.n_blocks)
    assert heat.shape == (engine.n_layers, memory.n_blocks) and heat.sum() > 0


def test_the_device_cache_returns_the_right_blocks_under_eviction():
    store = BlockStore(2, 4, 8, 16, torch.float32, torch.device("cpu"), cache_blocks=3)
    store.cache = _DeviceCache(3, (2, 8, 16), torch.float32, torch.device("cpu"))   # as on an accelerator
    plain = BlockStore(2, 4, 8, 16, torch.float32, torch.device("cpu"), cache_blocks=3)
    for i in range(10):
        k, v, r = torch.randn(2, 8, 16), torch.randn(2, 8, 16), torch.randn(4, 16)
        store.append(k, v, r)
        plain.append(k, v, r)
    for ids in ([0, 1, 2], [2, 5, 9], [1, 5], [7, 8, 9], [0, 9, 3]):
        got, want = store.gather(torch.tensor(ids)), plain.gather(torch.tensor(ids))
        assert sorted(got[2].tolist()) == sorted(want[2].tolist()) == sorted(ids)
        for b in ids:       # slots may come in any order: compare block by block
            i, j = got[2].tolist().index(b), want[2].tolist().index(b)
            for a, w in zip(got[:2], want[:2]):
                assert torch.equal(a[:, i * 8: (i + 1) * 8], w[:, j * 8: (j + 1) * 8])
        assert len(store.cache.slots) <= 3


def test_cpu_slots_copy_only_new_blocks_and_hold_the_right_ones():
    store = BlockStore(2, 4, 8, 16, torch.float32, torch.device("cpu"), cache_blocks=0)
    blocks = [(torch.randn(2, 8, 16), torch.randn(2, 8, 16)) for _ in range(10)]
    for k, v in blocks:
        store.append(k, v, torch.randn(4, 16))
    # what a gather gives back is the block as packed (kernels.int8), unpacked
    blocks = [(int8.unpack_keys(*int8.pack_keys(k, 8), 8, torch.float32),
               int8.unpack_values(*int8.pack_values(v), torch.float32)) for k, v in blocks]
    k0, _, slots0 = store.gather(torch.tensor([1, 4, 6]), reuse=True)
    before = k0.clone()
    k1, v1, slots1 = store.gather(torch.tensor([1, 6, 9]), reuse=True)
    assert k1.data_ptr() == k0.data_ptr()                       # the same buffer, reused
    assert slots1.tolist() == [1, 9, 6]                          # 9 took 4's slot; 1 and 6 stayed put
    assert torch.equal(k1[:, :8], before[:, :8]) and torch.equal(k1[:, 16:], before[:, 16:])
    for slot, b in enumerate(slots1.tolist()):
        assert torch.equal(k1[:, slot * 8: (slot + 1) * 8], blocks[b][0])
        assert torch.equal(v1[:, slot * 8: (slot + 1) * 8], blocks[b][1])
    k2, _, slots2 = store.gather(torch.tensor([2, 3]), reuse=True)        # fewer blocks: a fresh fill
    assert slots2.tolist() == [2, 3] and torch.equal(k2[:, 8:], blocks[3][0])


def test_resident_blocks_gather_the_same_blocks_from_the_document_and_a_growing_fork():
    host = BlockStore(2, 4, 8, 16, torch.float32, torch.device("cpu"), cache_blocks=0)
    resident = BlockStore(2, 4, 8, 16, torch.float32, torch.device("cpu"), cache_blocks=0, resident=True)
    for i in range(12):
        k, v, r = torch.randn(2, 8, 16), torch.randn(2, 8, 16), torch.randn(4, 16)
        host.append(k, v, r)
        resident.append(k, v, r)
        if i == 6:                                  # blocks 0-6 become the shared base, 7-11 the fork's tail
            host, resident = host.fork(), resident.fork()
    for ids in ([0, 3, 6], [2, 7, 11], [8, 9], [6, 7]):
        want = host.gather(torch.tensor(ids))
        got = resident.gather(torch.tensor(ids))
        assert got[2].tolist() == ids
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_step_on_resident_blocks_never_reads_back_from_the_device():
    """On a GPU every read back (a scalar, a tolist, a boolean mask, a list made a tensor) stalls the stream;
    counted on the CPU (bench.syncs), a reading chunk and a decode step with blocks_on="device" have none."""
    from bench.syncs import HostReads
    from infllm_engine.generate import forward_chunk

    engine = Engine(tiny_llama(), tiny_tokenizer(), InfLLMConfig(max_tokens=3000, blocks_on="device", **SMALL))
    memory = engine.read(torch.arange(300) % 256)
    assert memory.n_blocks > SMALL["topk"]
    chunk, token = torch.arange(16) % 256, torch.tensor([5])
    with HostReads() as reads:
        forward_chunk(engine.model, memory, engine.rope, chunk, "prefill", want_logits=False, call=Call(trace=Trace()))
        forward_chunk(engine.model, memory, engine.rope, token, "decode", want_logits=True, call=Call(trace=Trace()))
    assert not reads.seen, reads.seen
    with HostReads() as reads:          # a whole question: the focus chooses once, then one read per token
        answer = engine.ask(memory, "what is it?", max_new_tokens=6).wait()
    per_token = {k: n for k, n in reads.seen.items() if "generate.py" in k}
    assert sum(per_token.values()) == len(answer.token_ids) and len(per_token) == 1
    assert all(any(f in k for f in ("engine.py", "evidence.py", "probe.py")) for k in reads.seen if k not in per_token), \
        reads.seen
    # the host path still reads its block ids back (it refills slots by id), which is why the device path exists
    host = engine.with_config(engine.cfg.replace(blocks_on="host"))
    with HostReads() as reads:
        forward_chunk(host.model, host.read(torch.arange(300) % 256), host.rope, chunk, "prefill", False)
    assert any("blocks.py" in k for k in reads.seen)


def test_resident_and_host_blocks_give_the_same_answer(engine):
    # Plain InfLLM (no question focus): every layer retrieves its own blocks at every step.
    resident = engine.with_config(engine.cfg.replace(blocks_on="device", focus_blocks=0, max_tokens=600))
    host = engine.with_config(engine.cfg.replace(focus_blocks=0, max_tokens=600))
    ids = torch.arange(300) % 256
    a = host.ask(host.read(ids), "what is it?", max_new_tokens=8).wait()
    b = resident.ask(resident.read(ids), "what is it?", max_new_tokens=8).wait()
    assert a.token_ids == b.token_ids
    assert [r.block_ids.tolist() for r in a.trace.records] == [r.block_ids.tolist() for r in b.trace.records]


def test_a_fork_that_grows_never_changes_its_parent():
    store = BlockStore(1, 1, 4, 8, torch.float32, torch.device("cpu"), cache_blocks=0)
    for _ in range(3):
        store.append(torch.ones(1, 4, 8), torch.ones(1, 4, 8), torch.ones(1, 8))
    child = store.fork()
    child.append(torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), torch.zeros(1, 8))
    store.append(2 * torch.ones(1, 4, 8), torch.ones(1, 4, 8), torch.ones(1, 8))
    assert child.n == store.n == 4
    assert child.take(torch.tensor([3]))[0].sum() == 0
    assert torch.allclose(store.take(torch.tensor([3]))[0], torch.full((1, 1, 4, 8), 2.0), rtol=1 / 127)
    assert child.base.fields["k"].data_ptr() == store.base.fields["k"].data_ptr() and child.base.n == 3  # shared


def test_a_memory_is_asked_with_other_retrieval_knobs_but_not_another_layout(engine):
    memory = engine.read(torch.arange(200) % 256)
    wider = engine.with_config(engine.cfg.replace(topk=4, cache_blocks=8, focus_blocks=0))
    answer = wider.ask(memory, "what?", max_new_tokens=3).wait()
    assert {r.block_ids.numel() for r in answer.trace.records} == {4}
    assert memory.cfg.topk == 2                                  # the fork changed, not the document
    with pytest.raises(EngineError, match="read the document again"):
        engine.with_config(engine.cfg.replace(n_local=64)).ask(memory, "what?")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_follow_up_question_reads_the_earlier_turns_as_the_chat_template_writes_them(engine):
    engine.tokenizer.chat_template = CHATML
    history = [("Who wrote it?", "Ann."), ("When?", "In 1901.")]
    ours = engine.document_prompt("DOC") + engine.question_text("And where?", history)
    template = engine.tokenizer.apply_chat_template([
        {"role": "user", "content": "Read this document and answer questions about it.\n\nDOC\n\nQuestion: Who wrote it?"},
        {"role": "assistant", "content": "Ann."}, {"role": "user", "content": "When?"},
        {"role": "assistant", "content": "In 1901."}, {"role": "user", "content": "And where?"}],
        tokenize=False, add_generation_prompt=True)
    assert ours == template


def test_a_follow_up_answer_is_the_continuation_of_the_whole_conversation(engine):
    engine = engine.with_config(engine.cfg.replace(focus_blocks=0))      # generate() has no question focus
    memory = engine.read(torch.arange(120) % 256)
    history = [("first?", "yes")]
    answer = engine.ask(memory, "second?", max_new_tokens=4, history=history).wait()
    fork = memory.fork()
    direct = engine.generate(fork, engine.encode("\n\nQuestion: first?\nAnswer:yes\n\nQuestion: second?\nAnswer:"),
                             max_new_tokens=4).wait()
    assert answer.token_ids == direct.token_ids and memory.length == 120


def test_a_memory_and_its_answers_are_freed_when_dropped_without_the_cyclic_collector(engine):
    """A server loads a memory per question: one kept alive by a reference cycle until the cyclic collector
    ran grew its RSS by ~27 MB a question (bench.soak)."""
    memory = engine.read(torch.arange(200) % 256)
    answer = engine.ask(memory, "what is it?", max_new_tokens=4).wait()
    refs = [weakref.ref(memory), weakref.ref(answer), weakref.ref(memory.layers[0].blocks),
            weakref.ref(memory.fork().layers[0].blocks)]
    gc.disable()
    try:
        del memory, answer
        assert [r() for r in refs] == [None] * len(refs)
    finally:
        gc.enable()
