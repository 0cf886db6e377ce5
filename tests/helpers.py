"""Oracles shared by the tests: explicit dense attention and HF's own forward; old libraries."""
import sqlite3
from pathlib import Path

import torch

from infllm_engine import InfLLMConfig
from kernels import int8
from infllm_engine.rope import Rotary


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Every position's logits from HF's own sdpa attention and positions: [n, V]."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            return model(ids[None]).logits[0]
    finally:
        model.set_attn_implementation(impl)


def dense_infllm_reference(q, k, v, cfg: InfLLMConfig, rope: Rotary, scale: float, retrieved: dict[int, list[int]]):
    """InfLLM attention built explicitly, query by query, from its definition.

    q: [H, T, d]  k, v: [Hkv, T, d] raw; retrieved[chunk] = block ids that chunk retrieved.
    Returns (out [H, T, d], local mass received per key [H, T] from queries whose window held it).
    """
    h, t, d = q.shape
    g = h // k.shape[0]
    # Memory blocks hold their K/V packed in int8 (kernels.int8): keys per channel over the block.
    n_full = max(0, t - cfg.n_init) // cfg.block_size
    a, b = cfg.n_init, cfg.n_init + n_full * cfg.block_size
    k_mem, v_mem = k.clone(), int8.unpack_values(*int8.pack_values(v), v.dtype)
    blocks = k[:, a:b].reshape(k.shape[0], n_full, cfg.block_size, d).transpose(0, 1)
    k_mem[:, a:b] = int8.unpack_keys(*int8.pack_keys(blocks, cfg.block_size), cfg.block_size, k.dtype
                                     ).transpose(0, 1).reshape(k.shape[0], -1, d)
    out = torch.zeros(h, t, d, dtype=torch.float64)
    mass = torch.zeros(h, t, dtype=torch.float64)
    for c, s in enumerate(range(0, t, cfg.chunk_size)):
        final = s - cfg.n_local + 1 - cfg.n_init               # non-sink tokens out of every window
        n_formed = max(0, final) // cfg.block_size
        for p in range(s, min(s + cfg.chunk_size, t)):
            for head in range(h):
                kh = head // g
                logits, values, local_keys = [], [], []
                q_far = rope.apply_at(q[head, p][None], cfg.n_local)[0]
                for j in range(p + 1):
                    if p - j < cfg.n_local:      # local: real relative distance p - j
                        qr = rope.apply(q[head, p][None], p)[0]
                        kr = rope.apply(k[kh, j][None], j)[0]
                        logits.append(qr @ kr)
                        local_keys.append((len(logits) - 1, j))
                    else:
                        block = (j - cfg.n_init) // cfg.block_size
                        in_memory = j >= cfg.n_init and block < n_formed
                        if in_memory and block not in retrieved.get(c, []):
                            continue
                        logits.append(q_far @ (k_mem if in_memory else k)[kh, j])   # fixed distance: key at 0
                        values.append((v_mem if in_memory else v)[kh, j])
                        continue
                    values.append(v[kh, j])
                w = torch.softmax(torch.stack(logits).double() * scale, 0)
                out[head, p] = (w[:, None] * torch.stack(values).double()).sum(0)
                for idx, j in local_keys:
                    mass[head, j] += w[idx]
    return out, mass


def format1(memory) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state, blocks) as memory format 1 saved them, before packing: every tensor in the compute dtype."""
    from infllm_engine.memory import DenseLayer

    state = {"length": torch.tensor(memory.length), "n_blocks": torch.tensor(memory.n_blocks)}
    blocks = {}
    for i, layer in enumerate(memory.layers):
        if isinstance(layer, DenseLayer):
            state[f"{i}.k"], state[f"{i}.v"] = layer.k, layer.v
            continue
        state[f"{i}.r0"] = torch.tensor(layer.r0)
        for name in ("sink_k", "sink_v", "recent_k", "recent_v", "recent_score"):
            state[f"{i}.{name}"] = getattr(layer, name)
        if layer.keep_blocks:
            blocks[f"{i}.k"], blocks[f"{i}.v"] = layer.blocks.take(torch.arange(layer.blocks.n))
            blocks[f"{i}.reprs"] = layer.blocks.blocks()["reprs"]
    return state, blocks


def old_library(data_dir: Path, version: int, doc_id: int = 1) -> sqlite3.Connection:
    """A library database as schema `version` left it, with one ready document: add rows, then commit."""
    from storage.schema import MIGRATIONS

    data_dir.mkdir(parents=True)
    db = sqlite3.connect(data_dir / "library.db")
    for number, sql in enumerate(MIGRATIONS[:version], start=1):
        db.executescript(f"BEGIN; {sql}; PRAGMA user_version = {number}; COMMIT;")
    db.execute("INSERT INTO documents (id, title, source_name, kind, sha256, model_fingerprint, config_hash, config, "
               "status) VALUES (?, 't', 't.txt', 'txt', 'x', 'm', 'c', '{}', 'ready')", [doc_id])
    return db
