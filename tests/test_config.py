import json

import pytest
import torch

from infllm_engine import EngineError, InfLLMConfig


def test_defaults_are_valid_and_fit_the_trained_window():
    cfg = InfLLMConfig()
    assert cfg.n_init + cfg.topk * cfg.block_size + cfg.n_local <= 8192


@pytest.mark.parametrize("changes, words", [
    ({"topk": 40, "cache_blocks": 32}, "topk (40) cannot exceed cache_blocks"),
    ({"method": "magic"}, "method must be one of"),
    ({"n_local": 0}, "n_local must be a positive integer"),
    ({"repr_topk": 300, "block_size": 128}, "repr_topk (300) cannot exceed block_size"),
    ({"chunk_size": 4096, "n_local": 1024}, "chunk_size (4096) cannot exceed n_local"),
    ({"dtype": "int8"}, "dtype must be auto or one of"),
    ({"device": "warp-drive"}, "is not a torch device"),
    ({"kernels": "cuda"}, "kernels must be one of"),
    ({"blocks_on": "gpu"}, "blocks_on must be auto, host or device"),
    ({"focus_alone": "yes"}, "focus_alone must be true or false"),
])
def test_impossible_configs_are_refused_with_the_reason(changes, words):
    with pytest.raises(EngineError, match=words.replace("(", r"\(").replace(")", r"\)")):
        InfLLMConfig(**changes)


def test_a_config_stored_with_knobs_removed_since_loads_with_them_ignored():
    stored = {**InfLLMConfig(topk=4).to_dict(), "focus_window": "pin", "focus_neighbours": "both",
              "repetition_penalty": 1.1, "focus_topk": 0}
    cfg = InfLLMConfig.from_dict(json.loads(json.dumps(stored)))         # as a library row keeps it
    assert cfg == InfLLMConfig(topk=4) and cfg.memory_hash() == InfLLMConfig(topk=4).memory_hash()
    assert "focus_window" not in cfg.to_dict() and "focus_topk" not in cfg.to_dict()
    with pytest.raises(TypeError, match="warp_factor"):                   # an unknown knob is still an error
        InfLLMConfig.from_dict({**stored, "warp_factor": 9})


def test_memory_hash_ignores_where_it_runs_but_not_how_it_reads():
    base = InfLLMConfig()
    assert base.memory_hash() == base.replace(cache_blocks=99, max_tokens=10, kernels="torch",
                                              blocks_on="device").memory_hash()
    # The question focus is question-time only: changing it never invalidates a stored memory.
    assert base.memory_hash() == base.replace(focus_blocks=0, focus_layers=(0.5, 1), focus_gap=8, focus_alone=False).memory_hash()
    # Memory is stored packed, the same in every dtype: one read in fp32 serves a bf16 machine.
    assert base.memory_hash() == base.replace(dtype="bfloat16").memory_hash()
    assert base.layout() == base.replace(dtype="bfloat16").layout()
    assert base.memory_hash() == "6d962958fcad1c00"     # pinned: a change re-reads every library
    assert base.memory_hash() != base.replace(topk=4).memory_hash()
    assert base.memory_hash() != base.replace(n_local=1024).memory_hash()


def test_kernels_are_triton_on_cuda_and_torch_elsewhere(monkeypatch):
    import torch

    from kernels import backend_for

    triton_there = __import__("importlib").util.find_spec("triton") is not None
    assert backend_for("auto", torch.device("cpu")) == "torch"
    assert backend_for("auto", torch.device("cuda")) == ("triton" if triton_there else "torch")
    assert backend_for("torch", torch.device("cuda")) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(EngineError, match="kernels='triton' needs a CUDA device"):
        InfLLMConfig(kernels="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert InfLLMConfig(kernels="triton").kernels == "triton"


def test_auto_dtype_is_what_this_machine_measures_faster(monkeypatch):
    from infllm_engine import precision

    precision.best_dtype.cache_clear()
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})          # no native bf16: never bf16
    assert InfLLMConfig(dtype="auto").dtype == "float32"
    precision.best_dtype.cache_clear()
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16", "amx_bf16"})
    # seconds by (rows, dtype): a 512-row product (reading), a one-row product (decoding)
    timings = lambda table: lambda dtype, n=512, **_: table[n][dtype]
    fast_bf16 = {torch.bfloat16: 1.0, torch.float32: 5.0}
    monkeypatch.setattr(precision, "matmul_seconds", timings({512: fast_bf16, 1: fast_bf16}))
    assert InfLLMConfig(dtype="auto").dtype == "bfloat16"
    precision.best_dtype.cache_clear()
    # The AMX Xeon: bf16 7x faster on 512 rows, 2x slower on one: read in bf16, answer in fp32.
    monkeypatch.setattr(precision, "matmul_seconds", timings({512: {torch.bfloat16: 0.37, torch.float32: 2.7},
                                                              1: {torch.bfloat16: 63e-6, torch.float32: 33e-6}}))
    cfg = InfLLMConfig(dtype="auto")
    assert (cfg.dtype, cfg.torch_dtype, cfg.weights_dtype, cfg.answer_dtype) == (
        "mixed", torch.bfloat16, torch.float32, "float32")
    precision.best_dtype.cache_clear()
    tie = {torch.bfloat16: 1.0, torch.float32: 1.1}
    monkeypatch.setattr(precision, "matmul_seconds", timings({512: tie, 1: fast_bf16}))
    assert InfLLMConfig(dtype="auto").dtype == "float32"                       # a tie keeps fp32's precision
    precision.best_dtype.cache_clear()
    assert InfLLMConfig(dtype="auto", device="cuda").dtype == "bfloat16"
    precision.best_dtype.cache_clear()


def test_start_up_work_runs_on_its_own_thread_so_its_openmp_threads_end_with_it(monkeypatch):
    # Two OpenMP pools on 2 cores halved the app's decode (precision.on_own_thread): the model's load and the
    # dtype's timing must not leave one on the caller's thread.
    import threading

    from infllm_engine import Engine, engine, precision

    from .conftest import tiny_llama, tiny_tokenizer

    caller, seen = threading.current_thread(), []
    assert precision.on_own_thread(lambda: threading.current_thread()) is not caller
    with pytest.raises(ValueError, match="raised there"):
        precision.on_own_thread(lambda: (_ for _ in ()).throw(ValueError("raised there")))

    def load_model(*args):
        seen.append(threading.current_thread())
        return tiny_llama(), tiny_tokenizer(), "tiny"
    monkeypatch.setattr(engine, "load_model", load_model)
    assert Engine.load(None, InfLLMConfig(n_local=64, chunk_size=16)).fingerprint == "tiny"
    precision.best_dtype.cache_clear()
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(precision, "matmul_seconds", lambda *_, **__: seen.append(threading.current_thread()) or 1.0)
    assert InfLLMConfig(dtype="auto").dtype == "float32"
    precision.best_dtype.cache_clear()
    assert len(seen) == 3 and caller not in seen
