"""K/V in int8 with 16-bit scales: the one form memory takes in RAM and on disk, whatever the compute dtype.

The grouping follows KIVI (Liu et al., 2024): keys have a few outlier channels, so a key scale is per
channel over a group of tokens (a memory block); values have no such channels, so a value scale is
per token. Symmetric, 127 levels each side. Scales are bf16: value scales of quiet tokens fall below
fp16's normal range, and the code is computed against the rounded scale, so the rounding costs nothing.

At 30 layers x 3 KV heads x 64 dims this is 11,520 bytes of K/V per token plus 270 of scales, against
46,080 in fp32.
"""
from __future__ import annotations

import torch

SCALE = torch.bfloat16
REPR = torch.float16    # block representatives at rest: they score blocks, 16 bits is plenty


def pack_keys(k: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k [..., T, d] -> (int8 [..., T, d], scale [..., ceil(T / group), d]): per channel, per `group` tokens."""
    *lead, t, d = k.shape
    pad = -t % group
    x = torch.cat([k, k.new_zeros(*lead, pad, d)], -2) if pad else k
    x = x.reshape(*lead, -1, group, d).float()
    scale = (x.abs().amax(dim=-2) / 127).to(SCALE)                     # [..., G, d]
    q = torch.round(x / scale.float().clamp_min(1e-30)[..., None, :]).clamp_(-127, 127)
    return q.to(torch.int8).reshape(*lead, -1, d)[..., :t, :], scale


def unpack_keys(q: torch.Tensor, scale: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of pack_keys: q [..., T, d], scale [..., ceil(T / group), d] -> [..., T, d] in dtype."""
    *lead, t, d = q.shape
    g = scale.shape[-2]
    pad = g * group - t
    x = torch.cat([q, q.new_zeros(*lead, pad, d)], -2) if pad else q
    out = x.reshape(*lead, g, group, d).to(dtype) * scale.to(dtype)[..., None, :]
    return out.reshape(*lead, g * group, d)[..., :t, :]


def pack_values(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v [..., T, d] -> (int8 [..., T, d], scale [..., T, 1]): per token."""
    x = v.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127).to(SCALE)
    q = torch.round(x / scale.float().clamp_min(1e-30)).clamp_(-127, 127)
    return q.to(torch.int8), scale


def unpack_values(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of pack_values."""
    return q.to(dtype) * scale.to(dtype)
