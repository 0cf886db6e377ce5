"""Memory blocks of one layer: evicted K/V, their representatives, and an accelerator cache.

Block K/V live in host memory (possibly memory-mapped from disk); representatives live on the
compute device because every retrieval scores all of them. On an accelerator, a bounded LRU cache
holds recently retrieved blocks so a decode step rarely copies anything from the host.

A store is a read-only `base` shared by forks (the document) plus an owned, growing `tail` (blocks
formed while reading, or from a question's own tokens). Forking freezes the tail into the base, so a
question never copies the document's blocks, and a memory-mapped base is never written.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from kernels import backend_for, score_blocks, top_blocks


def representatives(keys: torch.Tensor, scores: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head, the mean raw key of the r tokens that received the most attention.

    keys: [Hkv, bs, d]   scores: [H, bs] (H = Hkv * G)   -> (repr [H, d], chosen token index [H, r])
    """
    hkv, bs, d = keys.shape
    h = scores.shape[0]
    idx = torch.topk(scores, r, dim=-1).indices                       # [H, r]
    per_head_keys = keys.repeat_interleave(h // hkv, dim=0)           # [H, bs, d]
    chosen = torch.gather(per_head_keys, 1, idx[..., None].expand(h, r, d))
    return chosen.mean(dim=1), idx


class _Part:
    """k, v [n, Hkv, bs, d] on the host and reprs [n, H, d] on the compute device."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, reprs: torch.Tensor, n: int):
        self.k, self.v, self.reprs, self.n = k, v, reprs, n

    def view(self) -> "_Part":
        return _Part(self.k[: self.n], self.v[: self.n], self.reprs[: self.n], self.n)


class BlockStore:
    def __init__(self, n_kv_heads: int, n_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, cache_blocks: int):
        self.shape = (n_kv_heads, block_size, head_dim)
        self.device = device
        self.host = torch.device("cpu")
        empty = lambda: _Part(torch.empty(0, *self.shape, dtype=dtype), torch.empty(0, *self.shape, dtype=dtype),
                              torch.empty(0, n_heads, head_dim, dtype=dtype, device=device), 0)
        self._empty = empty
        self.base, self.tail = empty(), empty()
        self.cache = _DeviceCache(cache_blocks, self.shape, dtype, device) if device.type != "cpu" else None
        self.slot_ids: list[int] = []                   # CPU: the blocks in slot_k/slot_v, see gather

    @property
    def n(self) -> int:
        return self.base.n + self.tail.n

    def append(self, k: torch.Tensor, v: torch.Tensor, repr_: torch.Tensor) -> None:
        """k, v: [Hkv, bs, d]   repr_: [H, d]"""
        t = self.tail
        if t.n == t.k.shape[0]:
            cap = max(16, 2 * t.n)
            t.k, t.v, t.reprs = _regrow(t.k, t.n, cap), _regrow(t.v, t.n, cap), _regrow(t.reprs, t.n, cap)
        t.k[t.n], t.v[t.n], t.reprs[t.n] = k.to(self.host), v.to(self.host), repr_
        t.n += 1

    def retrieve(self, query: torch.Tensor, k: int, kernels: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """The k blocks whose representatives best match query [H, d]: (ids, scores), ids ascending."""
        if backend_for(kernels, query.device) == "triton":
            from kernels.triton_retrieval import block_scores as score
        else:
            score = score_blocks
        parts = [p.reprs[: p.n] for p in (self.base, self.tail) if p.n]
        scores = torch.cat([score(query, r) for r in parts]) if len(parts) > 1 else score(query, parts[0])
        return top_blocks(scores, k)

    def gather(self, ids: torch.Tensor, reuse: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K/V of the given blocks for attention: (k, v [Hkv, len(ids) * bs, d], block id of each slot).

        reuse (decode): on the CPU, keep one buffer and copy only the blocks that were not retrieved
        last time; slots then come in any order and the result is valid until the next gather.
        Without it the blocks come in the ids' order, so a read gives the same floating-point sums
        whatever came before (a resumed ingest ends bit-identical to an uninterrupted one).
        """
        hkv, bs, d = self.shape
        if self.cache is not None:
            k, v = self.cache.fetch(ids, self._host)
            return k.transpose(0, 1).reshape(hkv, -1, d), v.transpose(0, 1).reshape(hkv, -1, d), ids
        want = ids.tolist()
        if not reuse or len(want) != len(self.slot_ids):          # first use, or topk changed: fill every slot
            self.slot_k = torch.empty(hkv, len(want) * bs, d, dtype=self.base.k.dtype)
            self.slot_v = torch.empty_like(self.slot_k)
            self.slot_ids = [-1] * len(want)
        kept, wanted = set(self.slot_ids), set(want)
        free = iter([s for s, b in enumerate(self.slot_ids) if b not in wanted])
        for b in want:
            if b not in kept:
                s = next(free)
                k, v = self._block(b)
                self.slot_k[:, s * bs: (s + 1) * bs], self.slot_v[:, s * bs: (s + 1) * bs] = k, v
                self.slot_ids[s] = b
        return self.slot_k, self.slot_v, torch.tensor(self.slot_ids)

    def take(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the given blocks [len(ids), Hkv, bs, d] on the compute device, as a new tensor."""
        k, v = self._host(ids)
        return k.to(self.device), v.to(self.device)

    def _host(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = ids.to(self.host)
        if not self.tail.n:
            return self.base.k[ids], self.base.v[ids]
        if not self.base.n:
            return self.tail.k[ids], self.tail.v[ids]
        in_base = ids < self.base.n
        k = torch.empty(ids.shape[0], *self.shape, dtype=self.base.k.dtype)
        v = torch.empty_like(k)
        k[in_base], v[in_base] = self.base.k[ids[in_base]], self.base.v[ids[in_base]]
        rest = ids[~in_base] - self.base.n
        k[~in_base], v[~in_base] = self.tail.k[rest], self.tail.v[rest]
        return k, v

    def _block(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        part, i = (self.base, b) if b < self.base.n else (self.tail, b - self.base.n)
        return part.k[i], part.v[i]

    def keys(self) -> torch.Tensor:
        """Every block's raw keys [n, Hkv, bs, d] (the mapped base itself when there is no tail)."""
        return self.blocks()[0]

    def blocks(self, start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Blocks [start, n) as (k, v, reprs): views where they lie in one part (a checkpoint after a
        resume asks only for the tail, and never reads the mapped base)."""
        base, tail = self.base.view(), self.tail.view()
        if start >= base.n:
            s = start - base.n
            return tail.k[s:], tail.v[s:], tail.reprs[s:]
        if not tail.n:
            return base.k[start:], base.v[start:], base.reprs[start:]
        return (torch.cat([base.k[start:], tail.k]), torch.cat([base.v[start:], tail.v]),
                torch.cat([base.reprs[start:], tail.reprs]))

    def fork(self) -> "BlockStore":
        """A store sharing every block so far; either side's new blocks stay its own."""
        if self.tail.n:      # freeze: the tail becomes (part of) the shared base
            k, v, reprs = self.blocks()
            self.base, self.tail = _Part(k, v, reprs, k.shape[0]), self._empty()
        other = object.__new__(BlockStore)
        other.__dict__.update(self.__dict__)
        other.tail = self._empty()
        other.slot_ids = []
        other.cache = self.cache.empty_like() if self.cache is not None else None
        return other

    def load(self, k: torch.Tensor, v: torch.Tensor, reprs: torch.Tensor) -> None:
        """Adopt stored blocks as the base, without a copy: k, v [n, Hkv, bs, d] (may be a file mapping), reprs [n, H, d]."""
        self.base, self.tail = _Part(k, v, reprs.to(self.device), k.shape[0]), self._empty()
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

    def fetch(self, ids: torch.Tensor, host):
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
            k, v = host(torch.tensor(missing, dtype=torch.long))
            dst = torch.tensor(free[: len(missing)], dtype=torch.long, device=self.k.device)
            self.k[dst], self.v[dst] = k.to(self.k.device), v.to(self.k.device)
            self.slots.update(zip(missing, dst.tolist()))
        for b in wanted:
            self.slots.move_to_end(b)
        slot_ids = torch.tensor([self.slots[b] for b in wanted], dtype=torch.long, device=self.k.device)
        return self.k[slot_ids], self.v[slot_ids]
