"""Memory blocks of one layer: evicted K/V, their representatives, and an accelerator cache.

Block K/V are packed in int8 (kernels.int8): the form they have on disk, so a block read and a block
reloaded are the same. They are unpacked into the compute dtype only when retrieved. Representatives
live on the compute device because every retrieval scores all of them. The packed K/V live either
  on the host    (RAM, or a mapping of the file on disk): an accelerator then keeps a bounded LRU
                 cache of recently retrieved blocks, so a decode step rarely copies from the host;
  on the device  (resident): a step gathers its blocks with one indexed copy per field and never waits
                 for the host (no block id is read back), the accelerator's way at the speed it can go.
                 1M tokens are about 12 GB packed (bench/results/memory-cpu.md).

A store is a read-only `base` shared by forks (the document) plus an owned, growing `tail` (blocks
formed while reading, or from a question's own tokens). Forking freezes the tail into the base, so a
question never copies the document's blocks, and a memory-mapped base is never written.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from kernels import backend_for, int8, score_blocks, top_blocks


def representatives(keys: torch.Tensor, scores: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block and query head, the mean raw key of the r tokens that received the most attention.

    keys: [..., Hkv, bs, d]   scores: [..., H, bs] (H = Hkv * G)   -> (repr [..., H, d], chosen index [..., H, r])
    """
    *lead, hkv, bs, d = keys.shape
    h = scores.shape[-2]
    idx = torch.topk(scores, r, dim=-1).indices                       # [..., H, r]
    per_head_keys = keys.repeat_interleave(h // hkv, dim=-3)          # [..., H, bs, d]
    chosen = torch.gather(per_head_keys, -2, idx[..., None].expand(*lead, h, r, d))
    return chosen.mean(dim=-2), idx


HOST = ("k", "k_scale", "v", "v_scale")     # packed K/V (kernels.int8): host memory, maybe a file mapping
FIELDS = HOST + ("reprs",)                  # reprs: on the compute device, in its dtype


def stored_rows(n_kv_heads: int, n_heads: int, block_size: int, head_dim: int) -> dict[str, tuple[tuple, torch.dtype]]:
    """Per field, one block's shape and dtype as stored (in RAM for the packed K/V, on disk for all)."""
    return {"k": ((n_kv_heads, block_size, head_dim), torch.int8), "k_scale": ((n_kv_heads, 1, head_dim), int8.SCALE),
            "v": ((n_kv_heads, block_size, head_dim), torch.int8), "v_scale": ((n_kv_heads, block_size, 1), int8.SCALE),
            "reprs": ((n_heads, head_dim), int8.REPR)}


class _Part:
    """Per field, n blocks: k, v [n, Hkv, bs, d] int8, k_scale [n, Hkv, 1, d], v_scale [n, Hkv, bs, 1], reprs [n, H, d]."""

    def __init__(self, fields: dict[str, torch.Tensor], n: int):
        self.fields, self.n = fields, n

    def view(self, start: int = 0) -> dict[str, torch.Tensor]:
        return {name: t[start: self.n] for name, t in self.fields.items()}


class BlockStore:
    def __init__(self, n_kv_heads: int, n_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, cache_blocks: int, resident: bool = False):
        self.shape = (n_kv_heads, block_size, head_dim)
        self.dtype, self.device, self.resident = dtype, device, resident
        self.host = device if resident else torch.device("cpu")        # where the packed K/V live
        self._rows = stored_rows(n_kv_heads, n_heads, block_size, head_dim)
        self._reprs = (n_heads, head_dim)
        self.base, self.tail = self._empty(), self._empty()
        self.cache = _DeviceCache(cache_blocks, self.shape, dtype, device) if self.host != device else None
        self.slot_ids: list[int] = []                   # CPU: the blocks in slot_k/slot_v, see gather

    @property
    def n(self) -> int:
        return self.base.n + self.tail.n

    def _empty(self) -> _Part:
        # A method, not a lambda kept on the store: one that refers to self would make every loaded memory a
        # reference cycle, its K/V freed only when the cyclic collector runs (~27 MB of RSS a question).
        return _Part({**{name: torch.empty(0, *self._rows[name][0], dtype=self._rows[name][1], device=self.host)
                         for name in HOST},
                      "reprs": torch.empty(0, *self._reprs, dtype=self.dtype, device=self.device)}, 0)

    def append(self, k: torch.Tensor, v: torch.Tensor, reprs: torch.Tensor) -> None:
        """m new blocks, k, v: [m, Hkv, bs, d] in the compute dtype   reprs: [m, H, d] (or one block without
        the m). Stored packed, the representatives rounded to 16 bits: a block in RAM is exactly what a
        reload gives back. All m at once: a chunk forms several blocks, and each op is a launch on a GPU."""
        if k.ndim == 3:
            k, v, reprs = k[None], v[None], reprs[None]
        t, m = self.tail, k.shape[0]
        if t.n + m > t.fields["k"].shape[0]:
            cap = max(16, 2 * (t.n + m))
            t.fields = {name: _regrow(x, t.n, cap) for name, x in t.fields.items()}
        k8, ks = int8.pack_keys(k, k.shape[-2])
        v8, vs = int8.pack_values(v)
        rows = {"k": k8, "k_scale": ks, "v": v8, "v_scale": vs, "reprs": reprs.to(int8.REPR).to(self.dtype)}
        for name, x in rows.items():
            t.fields[name][t.n: t.n + m] = x.to(t.fields[name].device)
        t.n += m

    def retrieve(self, query: torch.Tensor, k: int, kernels: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """The k blocks whose representatives best match query [H, d]: (ids, scores), ids ascending."""
        if backend_for(kernels, query.device) == "triton":
            from kernels.triton_retrieval import block_scores as score
        else:
            score = score_blocks
        parts = [p.fields["reprs"][: p.n] for p in (self.base, self.tail) if p.n]
        scores = torch.cat([score(query, r) for r in parts]) if len(parts) > 1 else score(query, parts[0])
        return top_blocks(scores, k)

    def gather(self, ids: torch.Tensor, reuse: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K/V of the given blocks for attention: (k, v [Hkv, len(ids) * bs, d], block id of each slot).

        reuse (decode): on the CPU, keep one buffer and unpack only the blocks that were not retrieved
        last time; slots then come in any order and the result is valid until the next gather.
        Without it the blocks come in the ids' order, so a read gives the same floating-point sums
        whatever came before (a resumed ingest ends bit-identical to an uninterrupted one).
        """
        hkv, bs, d = self.shape
        if self.resident:
            k, v = self.take(ids)
            return k.transpose(0, 1).reshape(hkv, -1, d), v.transpose(0, 1).reshape(hkv, -1, d), ids
        if self.cache is not None:
            k, v = self.cache.fetch(ids, self.take)
            return k.transpose(0, 1).reshape(hkv, -1, d), v.transpose(0, 1).reshape(hkv, -1, d), ids
        want = ids.tolist()
        if not reuse or len(want) != len(self.slot_ids):          # first use, or topk changed: fill every slot
            self.slot_k = torch.empty(hkv, len(want) * bs, d, dtype=self.dtype)
            self.slot_v = torch.empty_like(self.slot_k)
            self.slot_ids = [-1] * len(want)
        kept, wanted = set(self.slot_ids), set(want)
        free = iter([s for s, b in enumerate(self.slot_ids) if b not in wanted])
        fill = [(next(free), b) for b in want if b not in kept]
        if fill:
            slots, new = zip(*fill)
            k, v = self._unpack(self._host(torch.tensor(new)))              # [m, Hkv, bs, d]
            if len(fill) == len(want):                                    # every slot, in order: one copy
                self.slot_k.copy_(k.transpose(0, 1).reshape(hkv, -1, d))
                self.slot_v.copy_(v.transpose(0, 1).reshape(hkv, -1, d))
            else:
                for j, s in enumerate(slots):
                    self.slot_k[:, s * bs: (s + 1) * bs], self.slot_v[:, s * bs: (s + 1) * bs] = k[j], v[j]
            for s, b in fill:
                self.slot_ids[s] = b
        return self.slot_k, self.slot_v, torch.tensor(self.slot_ids)

    def take(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the given blocks [len(ids), Hkv, bs, d] on the compute device, as a new tensor."""
        return self._unpack({name: x.to(self.device) for name, x in self._host(ids).items()})

    def _unpack(self, packed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return (int8.unpack_keys(packed["k"], packed["k_scale"], self.shape[1], self.dtype),
                int8.unpack_values(packed["v"], packed["v_scale"], self.dtype))

    def _host(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The packed fields of the given blocks, gathered where they live (one indexed copy per field)."""
        ids = ids.to(self.host)
        if not self.tail.n:
            return {name: self.base.fields[name][ids] for name in HOST}
        if not self.base.n:
            return {name: self.tail.fields[name][ids] for name in HOST}
        # Both parts: gather from each (clamped) and pick, since selecting the ids of one part first
        # would read their count back to the host.
        nb, in_base = self.base.n, ids < self.base.n
        base_ids, tail_ids = ids.clamp(max=nb - 1), (ids - nb).clamp(min=0, max=self.tail.n - 1)
        out = {}
        for name in HOST:
            b, t = self.base.fields[name], self.tail.fields[name]
            out[name] = torch.where(in_base.view(-1, *[1] * (b.ndim - 1)), b[base_ids], t[tail_ids])
        return out

    def keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every block's packed keys: (int8 [n, Hkv, bs, d], scale [n, Hkv, 1, d]), the mapped base
        itself when there is no tail."""
        fields = self.blocks()
        return fields["k"], fields["k_scale"]

    def blocks(self, start: int = 0) -> dict[str, torch.Tensor]:
        """Blocks [start, n) per field (see _Part): views where they lie in one part (a checkpoint after a
        resume asks only for the tail, and never reads the mapped base)."""
        if start >= self.base.n:
            return self.tail.view(start - self.base.n)
        if not self.tail.n:
            return self.base.view(start)
        base, tail = self.base.view(start), self.tail.view()
        return {name: torch.cat([base[name], tail[name]]) for name in FIELDS}

    def fork(self) -> "BlockStore":
        """A store sharing every block so far; either side's new blocks stay its own."""
        if self.tail.n:      # freeze: the tail becomes (part of) the shared base
            fields = self.blocks()
            self.base, self.tail = _Part(fields, fields["k"].shape[0]), self._empty()
        other = object.__new__(BlockStore)
        other.__dict__.update(self.__dict__)
        other.tail = self._empty()
        other.slot_ids = []
        other.cache = self.cache.empty_like() if self.cache is not None else None
        return other

    def load(self, fields: dict[str, torch.Tensor]) -> None:
        """Adopt stored blocks as the base, without a copy of the packed K/V on the host (they may be a
        file mapping; resident: copied to the device once); fields as in _Part, reprs in any float dtype."""
        fields = {**{name: fields[name].to(self.host) for name in HOST},
                  "reprs": fields["reprs"].to(self.device, self.dtype)}
        self.base, self.tail = _Part(fields, fields["k"].shape[0]), self._empty()
        self.slot_ids = []


def _regrow(t: torch.Tensor, n: int, cap: int) -> torch.Tensor:
    out = t.new_empty(cap, *t.shape[1:])
    out[:n] = t[:n]
    return out


class _DeviceCache:
    """LRU cache of block K/V on the accelerator; capacity >= topk is checked by the config."""

    def __init__(self, capacity: int, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device):
        self.capacity = capacity
        self.k = torch.empty(capacity, *shape, dtype=dtype, device=device)
        self.v = torch.empty(capacity, *shape, dtype=dtype, device=device)
        self.slots: OrderedDict[int, int] = OrderedDict()   # block id -> slot, least recent first

    def empty_like(self) -> "_DeviceCache":
        return _DeviceCache(self.capacity, tuple(self.k.shape[1:]), self.k.dtype, self.k.device)

    def fetch(self, ids: torch.Tensor, take):
        """K/V [len(ids), Hkv, bs, d] of the given blocks; take(missing ids) unpacks the missing ones on the device."""
        wanted = ids.tolist()
        missing = [b for b in wanted if b not in self.slots]
        if missing:
            keep = set(wanted)
            free = [s for s in range(self.capacity) if s not in self.slots.values()]
            for b in list(self.slots):
                if len(free) >= len(missing):
                    break
                if b not in keep:
                    free.append(self.slots.pop(b))
            k, v = take(torch.tensor(missing, dtype=torch.long))
            dst = torch.tensor(free[: len(missing)], dtype=torch.long, device=self.k.device)
            self.k[dst], self.v[dst] = k, v
            self.slots.update(zip(missing, dst.tolist()))
        for b in wanted:
            self.slots.move_to_end(b)
        slot_ids = torch.tensor([self.slots[b] for b in wanted], dtype=torch.long, device=self.k.device)
        return self.k[slot_ids], self.v[slot_ids]
