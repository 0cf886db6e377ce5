import pytest

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
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"device": "warp-drive"}, "is not a torch device"),
    ({"kernels": "cuda"}, "kernels must be one of"),
])
def test_impossible_configs_are_refused_with_the_reason(changes, words):
    with pytest.raises(EngineError, match=words.replace("(", r"\(").replace(")", r"\)")):
        InfLLMConfig(**changes)


def test_memory_hash_ignores_where_it_runs_but_not_how_it_reads():
    base = InfLLMConfig()
    assert base.memory_hash() == base.replace(cache_blocks=99, max_tokens=10, kernels="torch").memory_hash()
    # The question focus is question-time only: changing it never invalidates a stored memory.
    assert base.memory_hash() == base.replace(focus_blocks=0, focus_layers=(0.5, 1), focus_gap=8, focus_topk=3).memory_hash()
    assert base.memory_hash() == "667d8f98c9caede8"     # libraries read before the focus existed stay valid
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
