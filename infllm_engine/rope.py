"""Rotary positions applied inside our attention, so InfLLM can choose each key's position.

HF rotates q/k before calling the attention function; the engine feeds all-zero position ids, which
makes that rotation the identity (checked at load: the rope's attention scaling must be 1), and
rotates here instead, with the model's own rotary module so every rope type it supports is right.
"""
from __future__ import annotations

import torch


class Rotary:
    """cos/sin table over positions, grown on demand, from the model's rotary embedding module."""

    def __init__(self, rotary_emb: torch.nn.Module, head_dim: int, device: torch.device, dtype: torch.dtype):
        self.rotary_emb = rotary_emb
        self.head_dim = head_dim
        self.device = device
        self.dtype = dtype
        self.cos = torch.empty(0, head_dim, device=device, dtype=dtype)
        # HF's x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) = roll(x, d/2) with the first
        # half negated: that sign lives in this table, so a rotation is 3 operators, not 6 (decode runs
        # three per layer and token).
        self.signed_sin = torch.empty(0, head_dim, device=device, dtype=dtype)

    def _grow(self, n: int) -> None:
        n = max(n, 2 * self.cos.shape[0], 1024)
        probe = torch.zeros(1, 1, self.head_dim, device=self.device, dtype=self.dtype)
        pos = torch.arange(n, device=self.device)[None]
        cos, sin = self.rotary_emb(probe, pos)
        sign = torch.ones(self.head_dim, device=self.device)
        sign[: self.head_dim // 2] = -1
        self.cos, self.signed_sin = cos[0].to(self.dtype), (sin[0] * sign).to(self.dtype)

    def table(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        if stop > self.cos.shape[0]:
            self._grow(stop)
        return self.cos[start:stop], self.signed_sin[start:stop]

    def apply(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate x [..., n, d] as if its rows sat at positions start .. start + n - 1."""
        cos, sin = self.table(start, start + x.shape[-2])
        return torch.addcmul(x * cos, x.roll(self.head_dim // 2, -1), sin)

    def apply_at(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """Rotate every row of x [..., n, d] to one position (InfLLM's fixed memory distance)."""
        cos, sin = self.table(position, position + 1)
        return torch.addcmul(x * cos, x.roll(self.head_dim // 2, -1), sin)
