import pytest
import torch
import torch.nn.functional as F

from trtllm.kernels.moe_routing import moe_routing, moe_routing_ref

# Kernel vs reference: the same fp32 scores up to exp/sigmoid's last bits; the ids must be equal.
WEIGHT_TOL = dict(atol=2e-6, rtol=2e-6)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check(logits, top_k, **kw):
    weights, ids = moe_routing(logits, top_k, **kw)
    ref_weights, ref_ids = moe_routing_ref(logits, top_k, **kw)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (logits.shape[0], top_k)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, **WEIGHT_TOL)
    return weights, ids


def hf_softmax_topk(logits, top_k, renormalize):
    """Mixtral / Qwen3-MoE's router (Qwen3MoeTopKRouter.forward), before its cast."""
    probs = F.softmax(logits, dtype=torch.float, dim=-1)
    values, idx = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        values /= values.sum(dim=-1, keepdim=True)
    return values, idx


def hf_deepseek_v3(logits, top_k, n_group, topk_group, bias, renormalize, scale):
    """DeepseekV3TopkRouter.forward from its logits (transformers 5.17)."""
    scores = logits.float().sigmoid()
    choice = scores + bias
    t, e = choice.shape
    group_scores = choice.view(-1, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, e // n_group).reshape(-1, e)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    idx = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, idx)
    if renormalize:
        w /= w.sum(dim=-1, keepdim=True) + 1e-20
    return w * scale, idx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 4, 1), (7, 8, 2), (23, 64, 8), (5, 60, 4), (3, 256, 8)])
@pytest.mark.parametrize("scoring,renormalize", [("softmax", True), ("softmax", False), ("sigmoid", True)])
def test_matches_reference(tokens, experts, top_k, scoring, renormalize, dtype):
    check(torch.randn(tokens, experts).to(dtype) * 3, top_k, scoring=scoring, renormalize=renormalize)


@pytest.mark.parametrize("renormalize", [True, False])
def test_reference_is_hf_softmax_topk(renormalize):
    logits = torch.randn(83, 64)
    weights, ids = moe_routing_ref(logits, 8, "softmax", renormalize)
    hf_weights, hf_ids = hf_softmax_topk(logits, 8, renormalize)
    assert torch.equal(ids.long(), hf_ids)
    assert torch.equal(weights, hf_weights)


@pytest.mark.parametrize("experts,n_group,topk_group,top_k", [(64, 8, 4, 8), (32, 4, 2, 6), (24, 3, 1, 2), (256, 8, 4, 8)])
def test_grouped_topk_matches_reference_and_hf(experts, n_group, topk_group, top_k):
    logits = torch.randn(19, experts) * 2
    bias = torch.randn(experts) * 0.1
    kw = dict(scoring="sigmoid", renormalize=True, n_group=n_group, topk_group=topk_group,
              e_score_correction_bias=bias, routed_scaling_factor=2.5)
    weights, ids = check(logits, top_k, **kw)
    hf_w, hf_ids = hf_deepseek_v3(logits, top_k, n_group, topk_group, bias, True, 2.5)
    # HF's sorted=False leaves the order of the k unspecified: compare sorted by expert id.
    order, hf_order = ids.long().sort(dim=-1), hf_ids.sort(dim=-1)
    assert torch.equal(order.values, hf_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices), hf_w.gather(1, hf_order.indices), **WEIGHT_TOL)


def test_bias_steers_selection_not_weights():
    logits = torch.zeros(2, 8)
    bias = torch.zeros(8)
    bias[5] = 1.0
    weights, ids = check(logits, 1, scoring="sigmoid", renormalize=False, e_score_correction_bias=bias)
    assert ids.flatten().tolist() == [5, 5]
    torch.testing.assert_close(weights, torch.full((2, 1), 0.5))


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_ties_go_to_the_lower_expert(scoring):
    # Every token: experts 1, 3, 6 share the top logit, 0 and 7 the next; k = 4 takes 1, 3, 6, 0.
    logits = torch.full((5, 8), -1.0)
    logits[:, [1, 3, 6]] = 2.0
    logits[:, [0, 7]] = 1.0
    _, ids = check(logits, 4, scoring=scoring)
    assert ids.tolist() == [[1, 3, 6, 0]] * 5
    # All equal: the first k experts.
    _, ids = check(torch.zeros(3, 64), 8, scoring=scoring)
    assert ids.tolist() == [list(range(8))] * 3


def test_grouped_ties_go_to_the_lower_group():
    # 4 groups of 4 with identical scores; topk_group = 2 keeps groups 0 and 1.
    logits = torch.zeros(2, 16)
    _, ids = check(logits, 8, scoring="sigmoid", n_group=4, topk_group=2)
    assert ids.tolist() == [list(range(8))] * 2
    # Group 2 holds the largest expert, groups 1 and 3 tie on the best top-2 sum
    # (softmax numerators: e^3.5 + 1 < e^3 + e^3): group 1 is kept, not 3 nor 2.
    logits = torch.zeros(1, 16)
    logits[0, 8] = 3.5
    logits[0, [4, 5, 12, 13]] = 3.0
    _, ids = check(logits, 2, scoring="softmax", n_group=4, topk_group=1)
    assert ids.tolist() == [[4, 5]]


def test_strided_logits():
    logits = torch.randn(7, 80)[:, :64]
    check(logits, 4)


def test_empty():
    weights, ids = moe_routing(torch.empty(0, 8), 2)
    assert weights.shape == ids.shape == (0, 2)


@pytest.mark.parametrize("fn", [moe_routing, moe_routing_ref])
def test_bad_input_names_the_argument(fn):
    with pytest.raises(ValueError, match="top_k"):
        fn(torch.randn(3, 8), 9)
    with pytest.raises(ValueError, match="router_logits"):
        fn(torch.randn(2, 3, 8), 2)
    with pytest.raises(ValueError, match="scoring"):
        fn(torch.randn(3, 8), 2, scoring="softplus")
    with pytest.raises(ValueError, match="n_group"):
        fn(torch.randn(3, 8), 2, scoring="sigmoid", n_group=3)
    with pytest.raises(ValueError, match="topk_group"):
        fn(torch.randn(3, 8), 2, scoring="sigmoid", n_group=4, topk_group=5)
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        fn(torch.randn(3, 8), 2, e_score_correction_bias=torch.zeros(7))


def test_opcheck():
    torch.library.opcheck(torch.ops.trtllm.moe_routing.default, (torch.randn(7, 16, dtype=torch.bfloat16), 2))
    torch.library.opcheck(torch.ops.trtllm.moe_routing.default,
                          (torch.randn(7, 32), 4, "sigmoid", True, 4, 2, torch.randn(32), 2.5))
