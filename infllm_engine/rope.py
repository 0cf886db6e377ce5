"""Rotary positions applied inside our attention, so InfLLM can choose each key's position.

HF rotates q/k before calling the attention function; the engine feeds all-zero position ids, which
makes that rotation the identity (checked at load: the rope's attention scaling must be 1), and
rotates here instead, with the model's own rotary module so every rope type it supports is right.
"""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary:
    """cos/sin table over positions, grown on demand, from the model's rotary embedding module."""

    def __init__(self, rotary_emb: torch.nn.Module, head_dim: int, device: torch.device, dtype: torch.dtype):
        self.rotary_emb = rotary_emb
        self.head_dim = head_dim
        self.device = device
        self.dtype = dtype
        self.cos = torch.empty(0, head_dim, device=device, dtype=dtype)
        self.sin = torch.empty(0, head_dim, device=device, dtype=dtype)

    def _grow(self, n: int) -> None:
        n = max(n, 2 * self.cos.shape[0], 1024)
        probe = torch.zeros(1, 1, self.head_dim, device=self.device, dtype=self.dtype)
        pos = torch.arange(n, device=self.device)[None]
        cos, sin = self.rotary_emb(probe, pos)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)

    def table(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        if stop > self.cos.shape[0]:
            self._grow(stop)
        return self.cos[start:stop], self.sin[start:stop]

    def apply(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate x [..., n, d] as if its rows sat at positions start .. start + n - 1."""
        cos, sin = self.table(start, start + x.shape[-2])
        return x * cos + rotate_half(x) * sin

    def apply_at(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """Rotate every row of x [..., n, d] to one position (InfLLM's fixed memory distance)."""
        cos, sin = self.table(position, position + 1)
        return x * cos + rotate_half(x) * sin
