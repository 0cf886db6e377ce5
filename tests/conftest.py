import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on CI's two cores: one thread each (and for the app processes they
    # start), since two workers' thread pools spinning on the same cores slowed reading 8-fold.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_llama(n_heads: int = 6, n_kv_heads: int = 2, layers: int = 2, seed: int = 0):
    """A random-weight Llama small enough to run hundreds of forwards in a second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=16 * n_heads, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=16,
        max_position_embeddings=4096, rope_theta=10000.0, eos_token_id=None, bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def tiny_tokenizer():
    """A byte-level tokenizer whose 256 ids match tiny_llama's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture
def tiny():
    return tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_llama and tiny_tokenizer saved as an HF model directory, for code that loads by path."""
    path = tmp_path_factory.mktemp("tiny-model-dir")
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
