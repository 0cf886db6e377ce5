import pytest
import torch

from kernels import attention_stage, merge_stages, received_mass, score_blocks, topk_blocks


@pytest.mark.parametrize("groups", [1, 3, 4])
def test_two_stages_merge_into_the_softmax_over_the_union(groups):
    torch.manual_seed(0)
    hkv, c, d, na, nb = 2, 5, 16, 7, 9
    q = torch.randn(hkv, groups, c, d)
    ka, va, kb, vb = torch.randn(hkv, na, d), torch.randn(hkv, na, d), torch.randn(hkv, nb, d), torch.randn(hkv, nb, d)
    mask_a = torch.rand(c, na) > 0.3
    mask_a[:, 0] = True                      # every query sees something in stage a
    mask_b = torch.rand(c, nb) > 0.5
    mask_b[1] = False                        # query 1 sees nothing in stage b
    out_a, lse_a, p_a = attention_stage(q, ka, va, mask_a, 0.25)
    out_b, lse_b, p_b = attention_stage(q, kb, vb, mask_b, 0.25)
    out, lse = merge_stages(out_a, lse_a, out_b, lse_b)

    k, v, mask = torch.cat([ka, kb], 1), torch.cat([va, vb], 1), torch.cat([mask_a, mask_b], 1)
    scores = (q @ k[:, None].transpose(-1, -2) * 0.25).masked_fill(~mask, float("-inf"))
    w = torch.softmax(scores, -1)
    torch.testing.assert_close(out, w @ v[:, None], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
    # What each key received in the merged softmax, summed over queries.
    torch.testing.assert_close(received_mass(p_a, lse_a, lse), w[..., :na].sum(2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(received_mass(p_b, lse_b, lse), w[..., na:].sum(2), atol=1e-5, rtol=1e-5)


def test_an_empty_stage_contributes_nothing():
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    out_a, lse_a, _ = attention_stage(q, k, v, None, 1.0)
    out_b, lse_b, _ = attention_stage(q, k[:, :0], v[:, :0], None, 1.0)
    out, lse = merge_stages(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, out_a)
    assert torch.isinf(lse_b).all() and not torch.isnan(out).any()


def test_topk_picks_the_highest_dot_products_in_block_order():
    torch.manual_seed(1)
    reprs, query = torch.randn(20, 3, 8), torch.randn(3, 8)
    ids, scores = topk_blocks(query, reprs, 4)
    expected = torch.tensor(sorted(torch.topk(score_blocks(query, reprs), 4).indices.tolist()))
    assert ids.tolist() == expected.tolist()
    torch.testing.assert_close(scores, (reprs[ids] * query).sum((1, 2)))
    assert topk_blocks(query, reprs[:2], 4)[0].tolist() == [0, 1]     # fewer blocks than k: all of them
