"""The context memory: per layer, sinks + the recent tokens still near the window + memory blocks.

Token positions are absolute. Per layer we keep
  sinks   [0, n_init)          raw K/V
  recent  [r0, length)         raw K/V and the attention mass each token has received (per query head)
  blocks  [n_init, r0)         in BlockStore, block i = [n_init + i*bs, n_init + (i+1)*bs)
A block forms once all its tokens are out of every future query's window, so its representative
scores are final. Block spans are the same in every layer, which is what the heatmap maps to pages.
Keys are stored raw (un-rotated): positions are chosen at attention time.
"""
from __future__ import annotations

import torch

from kernels import Keys

from .blocks import BlockStore, representatives
from .config import InfLLMConfig
from .rope import Rotary


class Rows:
    """A tensor grown along dim 1 and trimmed from the front in place, so a decode step writes one row
    instead of copying the window. Forks share the buffer; whichever side writes next copies first."""

    def __init__(self, tensor: torch.Tensor, owned: bool = True):
        self.buf, self.lo, self.hi, self.owned = tensor, 0, tensor.shape[1], owned

    @property
    def n(self) -> int:
        return self.hi - self.lo

    def view(self) -> torch.Tensor:
        return self.buf[:, self.lo: self.hi]

    def _own(self, extra: int) -> None:
        if self.owned and self.hi + extra <= self.buf.shape[1]:
            return
        n = self.n
        buf = self.buf.new_empty(self.buf.shape[0], max(2 * (n + extra), 256), *self.buf.shape[2:])
        buf[:, :n] = self.view()
        self.buf, self.lo, self.hi, self.owned = buf, 0, n, True

    def append(self, x: torch.Tensor) -> None:
        self._own(x.shape[1])
        self.buf[:, self.hi: self.hi + x.shape[1]] = x
        self.hi += x.shape[1]

    def drop(self, n: int) -> None:
        self.lo += min(n, self.n)

    def add_(self, start: int, x: torch.Tensor) -> None:
        self._own(0)
        self.buf[:, self.lo + start: self.lo + start + x.shape[1]] += x

    def fork(self) -> "Rows":
        other = Rows(self.buf, owned=False)
        other.lo, other.hi = self.lo, self.hi
        self.owned = False
        return other


class LayerMemory:
    def __init__(self, cfg: InfLLMConfig, n_heads: int, n_kv_heads: int, head_dim: int, keep_blocks: bool):
        dev, dt = torch.device(cfg.device), cfg.torch_dtype
        self.n_init, self.block_size, self.repr_topk = cfg.n_init, cfg.block_size, cfg.repr_topk
        self.keep_blocks = keep_blocks
        empty = torch.empty(n_kv_heads, 0, head_dim, dtype=dt, device=dev)
        self.sink_k, self.sink_v = empty, empty
        self._k, self._v = Rows(empty), Rows(empty)
        self._score = Rows(torch.empty(n_heads, 0, dtype=torch.float32, device=dev))
        self.r0 = cfg.n_init
        self.blocks = BlockStore(n_kv_heads, n_heads, cfg.block_size, head_dim, dt, dev, cfg.cache_blocks,
                                 cfg.resident_blocks)
        # The local window's keys, rotated once at (position - base): a step rotates only its new keys.
        self._win, self._win_lo, self._win_base = Rows(empty), 0, None
        self._win_period = cfg.max_position           # positions used stay below 2 * max_position

    # recent K/V and scores as tensors (what snapshots save and restore)
    recent_k = property(lambda self: self._k.view(), lambda self, t: self._set("_k", t))
    recent_v = property(lambda self: self._v.view(), lambda self, t: self._set("_v", t))
    recent_score = property(lambda self: self._score.view(), lambda self, t: self._set("_score", t))

    def _set(self, name: str, tensor: torch.Tensor) -> None:
        setattr(self, name, Rows(tensor, owned=False))
        self._win_base = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [Hkv, C, d] raw, for the next C positions."""
        room = self.n_init - self.sink_k.shape[1]
        if room > 0:
            self.sink_k = torch.cat([self.sink_k, k[:, :room]], 1)
            self.sink_v = torch.cat([self.sink_v, v[:, :room]], 1)
            k, v = k[:, room:], v[:, room:]
        if k.shape[1]:
            self._k.append(k)
            self._v.append(v)
            self._score.append(self._score.buf.new_zeros(self._score.buf.shape[0], k.shape[1]))

    def span(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of positions [lo, hi), which must lie in sinks + recent (the local window always does)."""
        assert lo >= self.r0 or self.r0 == self.n_init, (lo, self.r0)
        if lo >= self.n_init:
            return self.recent_k[:, lo - self.r0: hi - self.r0], self.recent_v[:, lo - self.r0: hi - self.r0]
        sinks_hi = min(hi, self.n_init)
        k = torch.cat([self.sink_k[:, lo:sinks_hi], self.recent_k[:, : max(0, hi - self.r0)]], 1)
        v = torch.cat([self.sink_v[:, lo:sinks_hi], self.recent_v[:, : max(0, hi - self.r0)]], 1)
        return k, v

    def window(self, lo: int, hi: int, rope: Rotary) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Keys and values of positions [lo, hi), keys rotated at (position - base): (k, v, base).

        Only relative positions matter to attention, so the base moves (and every key is rotated
        again) only once per `period` tokens. It depends on lo alone, never on what came before, so
        a read resumed from a snapshot rotates exactly as one that never stopped.
        """
        base = lo // self._win_period * self._win_period
        win_hi = self._win_lo + self._win.n
        if self._win_base != base or not self._win_lo <= lo <= win_hi:
            self._win, self._win_lo, self._win_base = Rows(rope.apply(self.span(lo, hi)[0], lo - base)), lo, base
        else:
            if hi > win_hi:
                self._win.append(rope.apply(self.span(win_hi, hi)[0], win_hi - self._win_base))
            self._win.drop(lo - self._win_lo)
            self._win_lo = lo
        return self._win.view(), self.span(lo, hi)[1], self._win_base

    def memory(self, hi: int) -> list[Keys]:
        """Sinks and not-yet-blocked tokens at positions < hi, as position-carrying key sets."""
        nr = max(0, min(hi - self.r0, self._k.n))
        parts = [Keys(self.sink_k, self.sink_v, 0)] if self.sink_k.shape[1] else []
        if nr:
            parts.append(Keys(self.recent_k[:, :nr], self.recent_v[:, :nr], self.r0))
        return parts

    def add_mass(self, lo: int, mass: torch.Tensor) -> None:
        """mass: [H, n] attention received by positions lo .. lo + n - 1; only recent tokens keep it."""
        skip = max(0, self.r0 - lo)
        self._score.add_(lo + skip - self.r0, mass[:, skip:])

    def evict(self, last_final: int) -> None:
        """Form blocks from recent tokens at positions <= last_final (out of every future window), all at once."""
        bs = self.block_size
        n = min((last_final - self.r0 + 1) // bs, self._k.n // bs)
        if n <= 0:
            return
        if self.keep_blocks:
            hkv, _, d = self.recent_k.shape
            k = self.recent_k[:, : n * bs].view(hkv, n, bs, d).transpose(0, 1)         # [n, Hkv, bs, d]
            v = self.recent_v[:, : n * bs].view(hkv, n, bs, d).transpose(0, 1)
            score = self.recent_score[:, : n * bs].view(-1, n, bs).transpose(0, 1)     # [n, H, bs]
            reprs, _ = representatives(k, score, self.repr_topk)
            self.blocks.append(k, v, reprs)
        for rows in (self._k, self._v, self._score):
            rows.drop(n * bs)
        self.r0 += n * bs

    def fork(self) -> "LayerMemory":
        other = object.__new__(LayerMemory)
        other.__dict__.update(self.__dict__)
        for name in ("_k", "_v", "_score", "_win"):
            setattr(other, name, getattr(self, name).fork())
        other.blocks = self.blocks.fork()
        return other


class DenseLayer:
    """Baseline `full`: every key, rotated at its true position, in Rows (grown in place, shared by forks)."""

    def __init__(self, cfg: InfLLMConfig, n_kv_heads: int, head_dim: int):
        empty = torch.empty(n_kv_heads, 0, head_dim, dtype=cfg.torch_dtype, device=torch.device(cfg.device))
        self._k, self._v = Rows(empty), Rows(empty)

    k = property(lambda self: self._k.view())
    v = property(lambda self: self._v.view())
    length = property(lambda self: self._k.n)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [Hkv, C, d] rotated; returns all keys and values so far."""
        self._k.append(k)
        self._v.append(v)
        return self.k, self.v

    def fork(self) -> "DenseLayer":
        other = object.__new__(DenseLayer)
        other._k, other._v = self._k.fork(), self._v.fork()
        return other


class ContextMemory:
    """All layers' memory for one text, plus how many tokens it holds."""

    def __init__(self, cfg: InfLLMConfig, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int):
        self.cfg = cfg
        self.length = 0
        self.heads = (n_heads, n_kv_heads, head_dim)
        if cfg.method == "full":
            self.layers = [DenseLayer(cfg, n_kv_heads, head_dim) for _ in range(n_layers)]
        else:
            keep = cfg.method == "infllm"
            self.layers = [LayerMemory(cfg, n_heads, n_kv_heads, head_dim, keep) for _ in range(n_layers)]

    @property
    def n_blocks(self) -> int:
        first = self.layers[0]
        return first.blocks.n if isinstance(first, LayerMemory) else 0

    def block_span(self, block_id: int) -> tuple[int, int]:
        """Token span [start, stop) of a block: the same in every layer."""
        start = self.cfg.n_init + block_id * self.cfg.block_size
        return start, start + self.cfg.block_size

    def read_span(self, layer_idx: int, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V [Hkv, n, d] (raw keys) of one layer's positions [a, b): whole memory blocks, or tokens that are
        still recent (the local window's spans, the sinks)."""
        layer = self.layers[layer_idx]
        if a >= layer.r0 or b <= self.cfg.n_init:
            return layer.span(a, b)
        bs, n_init = self.cfg.block_size, self.cfg.n_init
        if (a - n_init) % bs or (b - n_init) % bs or b > layer.r0:
            raise ValueError(f"positions {a}..{b} are neither whole memory blocks nor recent tokens")
        k, v = layer.blocks.take(torch.arange((a - n_init) // bs, (b - n_init) // bs))     # [P, Hkv, bs, d]
        return k.transpose(0, 1).flatten(1, 2), v.transpose(0, 1).flatten(1, 2)

    def fork(self) -> "ContextMemory":
        """A copy to ask a question with; the blocks are shared read-only, the small parts copied."""
        other = object.__new__(ContextMemory)
        other.cfg, other.length, other.heads = self.cfg, self.length, self.heads
        other.layers = [layer.fork() for layer in self.layers]
        return other
