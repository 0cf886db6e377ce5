"""Memory blocks of one layer: evicted K/V, their representatives, and an accelerator cache.

Block K/V live in CPU memory (they may be memory-mapped from disk); representatives live on the
compute device because every retrieval scores all of them. On an accelerator, a bounded LRU cache
holds the blocks retrieved recently so a decode step rarely copies anything from the host.
Stores are shared by forks: a fork that adds a block copies the arrays first (copy-on-write).
"""
from __future__ import annotations

from collections import OrderedDict

import torch


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


class BlockStore:
    def __init__(self, n_kv_heads: int, n_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, cache_blocks: int):
        self.shape = (n_kv_heads, block_size, head_dim)
        self.n_heads = n_heads
        self.device = device
        self.host = torch.device("cpu") if device.type != "cpu" else device
        self.k = torch.empty(0, *self.shape, dtype=dtype, device=self.host)
        self.v = torch.empty(0, *self.shape, dtype=dtype, device=self.host)
        self.reprs_buf = torch.empty(0, n_heads, head_dim, dtype=dtype, device=device)
        self.n = 0
        self._owned = True
        self.cache = _DeviceCache(cache_blocks, self.shape, dtype, device) if device.type != "cpu" else None

    @property
    def reprs(self) -> torch.Tensor:
        """[n, H, d] on the compute device."""
        return self.reprs_buf[: self.n]

    def append(self, k: torch.Tensor, v: torch.Tensor, repr_: torch.Tensor) -> None:
        """k, v: [Hkv, bs, d]   repr_: [H, d]"""
        if self.n == self.k.shape[0] or not self._owned:
            cap = max(16, 2 * self.n)
            self.k = _regrow(self.k, self.n, cap)
            self.v = _regrow(self.v, self.n, cap)
            self.reprs_buf = _regrow(self.reprs_buf, self.n, cap)
            self._owned = True
        self.k[self.n] = k.to(self.host)
        self.v[self.n] = v.to(self.host)
        self.reprs_buf[self.n] = repr_
        self.n += 1

    def gather(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the given blocks, concatenated in token order: [Hkv, len(ids) * bs, d] each."""
        if self.cache is None:
            k, v = self.k[ids], self.v[ids]
        else:
            k, v = self.cache.fetch(ids, self.k, self.v)
        hkv, bs, d = self.shape
        return (k.transpose(0, 1).reshape(hkv, -1, d), v.transpose(0, 1).reshape(hkv, -1, d))

    def fork(self) -> "BlockStore":
        other = object.__new__(BlockStore)
        other.__dict__.update(self.__dict__)
        other._owned = False
        self._owned = False
        other.cache = self.cache.empty_like() if self.cache is not None else None
        return other

    def load(self, k: torch.Tensor, v: torch.Tensor, reprs: torch.Tensor) -> None:
        """Adopt stored arrays (possibly memory-mapped): k, v [n, Hkv, bs, d], reprs [n, H, d]."""
        self.k, self.v = k, v
        self.reprs_buf = reprs.to(self.device)
        self.n = k.shape[0]
        self._owned = False    # never write into a file mapping


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

    def fetch(self, ids: torch.Tensor, host_k: torch.Tensor, host_v: torch.Tensor):
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
            src = torch.tensor(missing, dtype=torch.long)
            dst = torch.tensor(free[: len(missing)], dtype=torch.long, device=self.k.device)
            self.k[dst] = host_k[src].to(self.k.device, non_blocking=True)
            self.v[dst] = host_v[src].to(self.k.device, non_blocking=True)
            self.slots.update(zip(missing, dst.tolist()))
        for b in wanted:
            self.slots.move_to_end(b)
        slot_ids = torch.tensor([self.slots[b] for b in wanted], dtype=torch.long, device=self.k.device)
        return self.k[slot_ids], self.v[slot_ids]
