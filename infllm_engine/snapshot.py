"""A context memory as flat tensor dicts, and back: what storage writes to disk (the engine knows no files).

Two parts, so ingest can checkpoint cheaply and a reload stays lazy:
  state   the small, changing part: sinks, recent window, their scores, counters (rewritten each time);
  blocks  the append-only part: per layer K/V [n, Hkv, bs, d] and representatives [n, H, d], which can
          be taken in ranges (`blocks(memory, start)`) and are adopted as given on restore, so a
          memory-mapped array stays on disk until retrieval touches a block.
Blocks are position-free (memory sits at one fixed distance), which is what lets blocks of several
documents share one memory later.
"""
from __future__ import annotations

import torch

from .errors import EngineError
from .memory import ContextMemory, DenseLayer, LayerMemory


def state(memory: ContextMemory) -> dict[str, torch.Tensor]:
    """The small part of the memory, all layers, as CPU tensors."""
    out = {"length": torch.tensor(memory.length), "n_blocks": torch.tensor(memory.n_blocks)}
    for i, layer in enumerate(memory.layers):
        if isinstance(layer, DenseLayer):
            out[f"{i}.k"], out[f"{i}.v"] = layer.k.cpu(), layer.v.cpu()
            continue
        out[f"{i}.r0"] = torch.tensor(layer.r0)
        for name in ("sink_k", "sink_v", "recent_k", "recent_v", "recent_score"):
            out[f"{i}.{name}"] = getattr(layer, name).cpu()
    return out


def blocks(memory: ContextMemory, start: int = 0) -> dict[str, torch.Tensor]:
    """Blocks [start, n) of every layer: k, v [n - start, Hkv, bs, d] and reprs [n - start, H, d]."""
    out = {}
    for i, layer in enumerate(memory.layers):
        if isinstance(layer, LayerMemory):
            k, v, reprs = layer.blocks.blocks(start)
            out[f"{i}.k"], out[f"{i}.v"], out[f"{i}.reprs"] = k, v, reprs.cpu()
    return out


def block_shapes(memory: ContextMemory) -> dict[str, tuple[int, ...]]:
    """The row shapes of one block as `blocks` lays them out, per layer ("layers": (L,)): what storage
    needs to map block files back without knowing the model."""
    n_heads, n_kv_heads, head_dim = memory.heads
    bs = memory.cfg.block_size
    return {"layers": (len(memory.layers),), "k": (n_kv_heads, bs, head_dim), "v": (n_kv_heads, bs, head_dim),
            "reprs": (n_heads, head_dim)}


def restore(memory: ContextMemory, saved_state: dict[str, torch.Tensor], saved_blocks: list[dict[str, torch.Tensor]]) -> ContextMemory:
    """Fill a new, empty memory (from Engine.new_memory) with a saved state and its block ranges, in order.

    One block range is adopted without a copy (it may be a file mapping); several are concatenated.
    """
    if memory.length:
        raise EngineError("restore needs an empty memory")
    device = torch.device(memory.cfg.device)
    try:
        for i, layer in enumerate(memory.layers):
            if isinstance(layer, DenseLayer):
                k, v = saved_state[f"{i}.k"], saved_state[f"{i}.v"]
                layer.append(k.to(device, layer.k.dtype), v.to(device, layer.v.dtype))
                continue
            layer.r0 = int(saved_state[f"{i}.r0"])
            for name in ("sink_k", "sink_v", "recent_k", "recent_v", "recent_score"):
                setattr(layer, name, saved_state[f"{i}.{name}"].to(device))
            if layer.keep_blocks and saved_blocks:
                parts = [b for b in saved_blocks if b[f"{i}.k"].shape[0]]
                pick = (lambda key: parts[0][key]) if len(parts) == 1 else (lambda key: torch.cat([p[key] for p in parts]))
                if parts:
                    layer.blocks.load(pick(f"{i}.k"), pick(f"{i}.v"), pick(f"{i}.reprs"))
    except KeyError as missing:
        raise EngineError(f"the saved memory is incomplete: {missing} is missing") from None
    memory.length = int(saved_state["length"])
    expected = int(saved_state["n_blocks"])
    if memory.n_blocks != expected:
        raise EngineError(f"the saved memory is incomplete: {memory.n_blocks} blocks of {expected}")
    return memory



def adopt_blocks(memory: ContextMemory, saved_blocks: dict[str, torch.Tensor]) -> None:
    """Swap the memory's blocks for saved copies of the same blocks (a file mapping, say), so that a
    long read keeps in RAM only what retrieval touches."""
    for i, layer in enumerate(memory.layers):
        if isinstance(layer, LayerMemory) and layer.keep_blocks:
            k = saved_blocks[f"{i}.k"]
            if k.shape[0] != layer.blocks.n:
                raise EngineError(f"adopt_blocks: layer {i} has {layer.blocks.n} blocks, the saved copy {k.shape[0]}")
            layer.blocks.load(k, saved_blocks[f"{i}.v"], saved_blocks[f"{i}.reprs"])
