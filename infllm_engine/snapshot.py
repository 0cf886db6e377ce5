"""A context memory as flat tensor dicts, and back: what storage writes to disk (the engine knows no files).

Two parts, so ingest can checkpoint cheaply and a reload stays lazy:
  state   the small, changing part: sinks, recent window, their scores, counters (rewritten each time);
  blocks  the append-only part: per layer packed K/V [n, Hkv, bs, d] with their scales, and
          representatives [n, H, d] in 16 bits, which can
          be taken in ranges (`blocks(memory, start)`) and are adopted as given on restore, so a
          memory-mapped array stays on disk until retrieval touches a block.
Blocks are position-free (memory sits at one fixed distance), which is what lets blocks of several
documents share one memory later.

Both parts are packed (kernels.int8), whatever the compute dtype: a memory read in fp32 loads in bf16,
on another machine, and a 221K-token book takes about 2.6 GB instead of 10. Packing the state is lossy,
so whoever saves a state and reads on should restore what it saved (reading.ingest does): a read that
resumes from a saved state then ends bit-identical to one that never stopped.
"""
from __future__ import annotations

import torch

from kernels import int8

from .blocks import FIELDS, stored_rows
from .errors import EngineError
from .memory import ContextMemory, DenseLayer, LayerMemory


FORMAT = 2       # 1: K/V in the compute dtype (before 2026-11-24); 2: packed int8 (kernels.int8)


def _pack(out: dict, name: str, k: torch.Tensor, v: torch.Tensor, group: int) -> None:
    out[f"{name}_k"], out[f"{name}_k_scale"] = int8.pack_keys(k.cpu(), group)
    out[f"{name}_v"], out[f"{name}_v_scale"] = int8.pack_values(v.cpu())


def _unpack(saved: dict, name: str, group: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    k = int8.unpack_keys(saved[f"{name}_k"].to(device), saved[f"{name}_k_scale"].to(device), group, dtype)
    return k, int8.unpack_values(saved[f"{name}_v"].to(device), saved[f"{name}_v_scale"].to(device), dtype)


def state(memory: ContextMemory) -> dict[str, torch.Tensor]:
    """The small part of the memory, all layers, packed as the blocks are, as CPU tensors.

    Keys are grouped by block-sized runs of positions (the recent tokens start on a block boundary),
    so a window token's key is packed as it will be once it is in a block.
    """
    out = {"length": torch.tensor(memory.length), "n_blocks": torch.tensor(memory.n_blocks)}
    bs = memory.cfg.block_size
    for i, layer in enumerate(memory.layers):
        if isinstance(layer, DenseLayer):
            _pack(out, f"{i}.all", layer.k, layer.v, bs)
            continue
        _pack_layer(out, i, torch.tensor(layer.r0), layer.sink_k, layer.sink_v, layer.recent_k, layer.recent_v,
                    layer.recent_score, bs)
    return out


def _pack_layer(out: dict, i: int, r0: torch.Tensor, sink_k, sink_v, recent_k, recent_v, recent_score,
                block_size: int) -> None:
    """One LayerMemory's state: sinks packed as one group, recent tokens in block-sized groups."""
    out[f"{i}.r0"] = r0
    _pack(out, f"{i}.sink", sink_k, sink_v, max(1, sink_k.shape[1]))
    _pack(out, f"{i}.recent", recent_k, recent_v, block_size)
    out[f"{i}.recent_score"] = recent_score.cpu().to(torch.float16)


def blocks(memory: ContextMemory, start: int = 0) -> dict[str, torch.Tensor]:
    """Blocks [start, n) of every layer, "{layer}.{field}" for the fields of block_shapes."""
    out = {}
    for i, layer in enumerate(memory.layers):
        if isinstance(layer, LayerMemory):
            for name, t in layer.blocks.blocks(start).items():
                out[f"{i}.{name}"] = t.cpu().to(int8.REPR) if name == "reprs" else t.cpu()     # resident: from the device
    return out


def block_shapes(memory: ContextMemory) -> dict:
    """Per field of one block, its (row shape, dtype) as `blocks` lays it out, and "layers": the layer
    count: what storage needs to map block files back without knowing the model."""
    n_heads, n_kv_heads, head_dim = memory.heads
    return {"layers": len(memory.layers), **stored_rows(n_kv_heads, n_heads, memory.cfg.block_size, head_dim)}


def restore(memory: ContextMemory, saved_state: dict[str, torch.Tensor], saved_blocks: list[dict[str, torch.Tensor]],
            blocks_of: ContextMemory | None = None) -> ContextMemory:
    """Fill a new, empty memory (from Engine.new_memory) with a saved state and its block ranges, in order.

    One block range is adopted without a copy (it may be a file mapping); several are concatenated.
    blocks_of: instead of saved_blocks, adopt this memory's block stores, which must hold what was saved
    (a memory just committed holds its blocks exactly as stored: packed, representatives rounded).
    """
    if memory.length:
        raise EngineError("restore needs an empty memory")
    device, dtype, bs = torch.device(memory.cfg.device), memory.cfg.torch_dtype, memory.cfg.block_size
    try:
        for i, layer in enumerate(memory.layers):
            if isinstance(layer, DenseLayer):
                layer.append(*_unpack(saved_state, f"{i}.all", bs, dtype, device))
                continue
            layer.r0 = int(saved_state[f"{i}.r0"])
            n_sink = saved_state[f"{i}.sink_k"].shape[1]
            layer.sink_k, layer.sink_v = _unpack(saved_state, f"{i}.sink", max(1, n_sink), dtype, device)
            layer.recent_k, layer.recent_v = _unpack(saved_state, f"{i}.recent", bs, dtype, device)
            layer.recent_score = saved_state[f"{i}.recent_score"].to(device, torch.float32)
            if layer.keep_blocks and blocks_of is not None:
                layer.blocks = blocks_of.layers[i].blocks
            elif layer.keep_blocks and saved_blocks:
                parts = [b for b in saved_blocks if b[f"{i}.k"].shape[0]]
                if parts:
                    layer.blocks.load({name: parts[0][f"{i}.{name}"] if len(parts) == 1 else
                                       torch.cat([p[f"{i}.{name}"] for p in parts]) for name in FIELDS})
    except KeyError as missing:
        raise EngineError(f"the saved memory is incomplete: {missing} is missing") from None
    memory.length = int(saved_state["length"])
    expected = int(saved_state["n_blocks"])
    if memory.n_blocks != expected:
        raise EngineError(f"the saved memory is incomplete: {memory.n_blocks} blocks of {expected}")
    return memory


def from_format1(saved_state: dict[str, torch.Tensor], saved_blocks: dict[str, torch.Tensor], block_size: int,
                 chunk: int = 256) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A memory saved in format 1 (K/V unpacked, in the dtype it was read in) as (state, blocks) of
    today's format, blocks packed `chunk` at a time: what converting an old library's document takes."""
    state = {"length": saved_state["length"], "n_blocks": saved_state["n_blocks"]}
    blocks: dict[str, torch.Tensor] = {}
    try:
        for i in sorted({int(key.split(".")[0]) for key in saved_state if key[0].isdigit()}):
            if f"{i}.k" in saved_state:                                 # a DenseLayer (method full)
                _pack(state, f"{i}.all", saved_state[f"{i}.k"], saved_state[f"{i}.v"], block_size)
                continue
            _pack_layer(state, i, *(saved_state[f"{i}.{name}"] for name in
                                    ("r0", "sink_k", "sink_v", "recent_k", "recent_v", "recent_score")), block_size)
            k, v = saved_blocks.get(f"{i}.k"), saved_blocks.get(f"{i}.v")
            if k is None or not k.shape[0]:                               # streaming, or no block yet
                continue
            parts = [(*int8.pack_keys(k[a: a + chunk], block_size), *int8.pack_values(v[a: a + chunk]))
                     for a in range(0, k.shape[0], chunk)]
            for j, name in enumerate(("k", "k_scale", "v", "v_scale")):
                blocks[f"{i}.{name}"] = torch.cat([p[j] for p in parts])
            blocks[f"{i}.reprs"] = saved_blocks[f"{i}.reprs"].to(int8.REPR)
    except KeyError as missing:
        raise EngineError(f"the saved memory is incomplete: {missing} is missing") from None
    return state, blocks
