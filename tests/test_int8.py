"""Packed K/V (kernels.int8): bounded error, KIVI's grouping, and a second packing that changes nothing."""
import pytest
import torch

from kernels import int8


def test_keys_come_back_within_one_step_of_their_channel_in_their_group():
    k = torch.randn(3, 300, 64, generator=torch.Generator().manual_seed(0))
    q, scale = int8.pack_keys(k, 128)
    assert q.dtype == torch.int8 and q.shape == k.shape and scale.shape == (3, 3, 64)   # 300 tokens: 3 groups
    back = int8.unpack_keys(q, scale, 128, torch.float32)
    for g, (a, b) in enumerate(((0, 128), (128, 256), (256, 300))):
        step = k[:, a:b].abs().amax(dim=1, keepdim=True) / 127                          # [3, 1, 64]
        assert ((back[:, a:b] - k[:, a:b]).abs() <= step * 0.51 + 1e-7).all(), g


def test_an_outlier_key_channel_costs_the_other_channels_nothing():
    """Why keys are scaled per channel (KIVI): one loud channel would coarsen every other one per token."""
    k = torch.randn(2, 128, 64, generator=torch.Generator().manual_seed(1))
    k[..., 5] *= 100
    back = int8.unpack_keys(*int8.pack_keys(k, 128), 128, torch.float32)
    quiet = [c for c in range(64) if c != 5]
    err = (back - k)[..., quiet].abs().max()
    assert err <= k[..., quiet].abs().max() / 127 * 0.51
    per_token = int8.unpack_values(*int8.pack_values(k), torch.float32)   # the other grouping, for contrast
    assert (per_token - k)[..., quiet].abs().max() > 20 * err


def test_values_come_back_within_one_step_of_their_token():
    v = torch.randn(4, 2, 16, 64, generator=torch.Generator().manual_seed(2))
    q, scale = int8.pack_values(v)
    assert scale.shape == (4, 2, 16, 1) and scale.dtype == int8.SCALE
    back = int8.unpack_values(q, scale, torch.float32)
    assert ((back - v).abs() <= v.abs().amax(-1, keepdim=True) / 127 * 0.51 + 1e-7).all()


@pytest.mark.parametrize("pack, unpack", [
    (lambda x: int8.pack_keys(x, 16), lambda q, s: int8.unpack_keys(q, s, 16, torch.float32)),
    (int8.pack_values, lambda q, s: int8.unpack_values(q, s, torch.float32)),
])
def test_packing_what_was_unpacked_gives_the_same_bytes(pack, unpack):
    """A reloaded memory saved again is the same memory (fp32: q * scale is exact)."""
    x = torch.randn(2, 40, 8, generator=torch.Generator().manual_seed(3)) * 3
    q, s = pack(x)
    q2, s2 = pack(unpack(q, s))
    assert torch.equal(q, q2) and torch.equal(s, s2)


def test_all_zero_groups_and_empty_tensors_pack_without_nan():
    k = torch.zeros(2, 20, 8)
    back = int8.unpack_keys(*int8.pack_keys(k, 8), 8, torch.float32)
    assert torch.equal(back, k)
    assert torch.equal(int8.unpack_values(*int8.pack_values(k), torch.float32), k)
    empty = torch.zeros(2, 0, 8)
    assert int8.unpack_keys(*int8.pack_keys(empty, 8), 8, torch.float32).shape == (2, 0, 8)
