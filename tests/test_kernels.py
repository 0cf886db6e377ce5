import pytest
import torch

from kernels.retrieval import score_blocks, topk_blocks
from kernels.stage import attention_stage, mask_bias, merge_stages, received_mass


@pytest.mark.parametrize("keep_scores", [False, True])
@pytest.mark.parametrize("groups", [1, 3, 4])
def test_two_stages_merge_into_the_softmax_over_the_union(groups, keep_scores):
    torch.manual_seed(0)
    hkv, c, d, na, nb = 2, 5, 16, 7, 9
    q = torch.randn(hkv, groups, c, d)
    ka, va, kb, vb = torch.randn(hkv, na, d), torch.randn(hkv, na, d), torch.randn(hkv, nb, d), torch.randn(hkv, nb, d)
    mask_a = torch.rand(c, na) > 0.3
    mask_a[:, 0] = True                      # every query sees something in stage a
    mask_b = torch.rand(c, nb) > 0.5
    mask_b[1] = False                        # query 1 sees nothing in stage b
    a = attention_stage(q, ka, va, mask_bias(mask_a, groups), 0.25, keep_scores)
    b = attention_stage(q, kb, vb, mask_bias(mask_b, groups), 0.25, keep_scores)
    out, lse = merge_stages(a, b)

    k, v, mask = torch.cat([ka, kb], 1), torch.cat([va, vb], 1), torch.cat([mask_a, mask_b], 1)
    scores = (q @ k[:, None].transpose(-1, -2) * 0.25).masked_fill(~mask, float("-inf"))
    w = torch.softmax(scores, -1)
    torch.testing.assert_close(out, w @ v[:, None], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
    assert torch.isinf(b.lse[:, :, 1]).all()
    if keep_scores:   # what each key received in the merged softmax, summed over queries
        torch.testing.assert_close(received_mass(a, lse), w[..., :na].sum(2), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(received_mass(b, lse), w[..., na:].sum(2), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(received_mass(b, lse, slice(2, 5)), w[..., na + 2: na + 5].sum(2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keep_scores", [False, True])
def test_an_empty_stage_contributes_nothing(keep_scores):
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    a = attention_stage(q, k, v, None, 1.0, keep_scores)
    b = attention_stage(q, k[:, :0], v[:, :0], None, 1.0, keep_scores)
    out, lse = merge_stages(a, b)
    torch.testing.assert_close(out, a.out)
    assert torch.isinf(b.lse).all() and not torch.isnan(out).any()


def test_the_launcher_rejects_shapes_that_do_not_fit():
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="do not fit"):
        attention_stage(q, k[:1], k[:1], None, 1.0)
    with pytest.raises(ValueError, match="bias"):
        attention_stage(q, k, k, torch.zeros(4, 5), 1.0)


def test_topk_picks_the_highest_dot_products_in_block_order():
    torch.manual_seed(1)
    reprs, query = torch.randn(20, 3, 8), torch.randn(3, 8)
    ids, scores = topk_blocks(query, reprs, 4)
    expected = torch.tensor(sorted(torch.topk(score_blocks(query, reprs), 4).indices.tolist()))
    assert ids.tolist() == expected.tolist()
    torch.testing.assert_close(scores, (reprs[ids] * query).sum((1, 2)))
    assert topk_blocks(query, reprs[:2], 4)[0].tolist() == [0, 1]     # fewer blocks than k: all of them
