"""MoE routing: which k experts each token goes to, and with what weight.

    scores[t, e]  = softmax_e(logits[t, :])          (scoring="softmax": Mixtral, Qwen2/3-MoE, OLMoE)
                  | sigmoid(logits[t, e])            (scoring="sigmoid": DeepSeek-V3)
    choice[t, e]  = scores[t, e] + bias[e]           (e_score_correction_bias; selection only)
    grouped (n_group > 1, DeepSeek-V3's "noaux_tc"): the E experts form n_group equal groups;
        group score = sum of the group's 2 largest choice values; the topk_group best groups
        are kept and every expert of the other groups gets choice = -inf
    topk_ids[t, :]     = the k experts of largest choice[t, :], in descending order
    topk_weights[t, j] = scores[t, topk_ids[t, j]]   (the scores, not the biased choice)
                         / (sum_j scores[t, topk_ids[t, j]] + 1e-20)   if renormalize
                         * routed_scaling_factor

Shapes: router_logits [T, E] (fp32/fp16/bf16, last dim contiguous); bias [E] or None.
Outputs topk_weights [T, k] fp32 and topk_ids [T, k] int32, contiguous. Scores are computed
in fp32 from the logits (HF: `softmax(logits, dtype=torch.float)`; DeepSeek-V3's router
computes its logits in fp32 already). HF casts Mixtral/Qwen's weights to the logits' dtype
afterwards; this op leaves them fp32 and the fused-MoE op consumes them so.

Ties: among equal choice values the lower expert index wins, and among equal group scores
the lower group index wins (`torch.topk` promises no order among ties; the reference uses a
stable descending sort, the kernel `argmax` with the lowest index). Without ties both pick
what HF's `torch.topk` picks. The 1e-20 in the renormalisation is DeepSeek-V3's; for softmax
scores (sum >= 1/E) it is below half an fp32 ulp of the sum, so Mixtral's and Qwen's plain
division gives the same bits.

Refused by name: DeepSeek-V2's `group_limited_greedy` (group score = the group's max) is not
this op's grouped path; groups of fewer than 2 experts (the top-2 sum needs 2).

Kernel: one program per token; the E scores live in one [BLOCK_G, BLOCK_EG] tile (group x
expert-in-group; BLOCK_G = 1 when not grouped), the top-k is k rounds of max + lowest index
+ mask. The grouped path runs in the same kernel. E <= 1024 and k <= 32 (the Triton tile); the
models in view have E <= 256, k <= 8.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtllm.kernels.pdl import pdl_options, wait_for_previous
from trtllm.kernels.registry import interpreter_upcast, register_op

_SCORINGS = ("softmax", "sigmoid")
_MAX_EXPERTS = 1024
_MAX_TOP_K = 32


def _check_args(router_logits: torch.Tensor, top_k: int, scoring: str, n_group: int, topk_group: int,
                e_score_correction_bias: torch.Tensor | None) -> None:
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    if router_logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"router_logits: unsupported dtype {router_logits.dtype}")
    num_experts = router_logits.shape[1]
    if scoring not in _SCORINGS:
        raise ValueError(f"scoring must be one of {_SCORINGS}, got {scoring!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, E={num_experts}] (router_logits has {num_experts} experts)")
    if n_group < 1 or num_experts % n_group != 0:
        raise ValueError(f"n_group={n_group} must divide the number of experts E={num_experts}")
    if n_group > 1:
        if num_experts // n_group < 2:
            raise ValueError(f"n_group={n_group}: grouped top-k sums each group's 2 best experts, "
                             f"groups of {num_experts // n_group} expert(s) are refused")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
        if top_k > topk_group * (num_experts // n_group):
            raise ValueError(f"top_k={top_k} exceeds the experts of the topk_group={topk_group} kept groups")
    if e_score_correction_bias is not None and e_score_correction_bias.shape != (num_experts,):
        raise ValueError(f"e_score_correction_bias must be [E={num_experts}], "
                         f"got shape {tuple(e_score_correction_bias.shape)}")


def _topk_lowest_index_first(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk along the last dim, ties broken towards the lower index."""
    values, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], idx[..., :k]


def moe_routing_ref(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    n_group: int = 1,
    topk_group: int = 1,
    e_score_correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_args(router_logits, top_k, scoring, n_group, topk_group, e_score_correction_bias)
    logits = router_logits.float()
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()
    if n_group > 1:  # DeepSeek-V3's DeepseekV3TopkRouter.forward, line for line
        t, e = choice.shape
        group_scores = _topk_lowest_index_first(choice.view(t, n_group, e // n_group), 2)[0].sum(dim=-1)
        group_idx = _topk_lowest_index_first(group_scores, topk_group)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        score_mask = group_mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    topk_ids = _topk_lowest_index_first(choice, top_k)[1]
    topk_weights = scores.gather(1, topk_ids)
    if renormalize:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    topk_weights = topk_weights * routed_scaling_factor
    return topk_weights.contiguous(), topk_ids.to(torch.int32).contiguous()


@triton.jit
def _max_lowest_index(x, idx, BIG: tl.constexpr):
    """(max of a 2-D tile, the lowest idx holding it)."""
    best = tl.max(tl.max(x, axis=1), axis=0)
    first = tl.min(tl.min(tl.where(x == best, idx, BIG), axis=1), axis=0)
    return best, first


@triton.jit
def _moe_routing_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr,
    num_experts, logits_row_stride, routed_scaling_factor,
    EXPERTS_PER_GROUP: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr,
    SOFTMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_EG: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False,     # kernels/pdl.py
):
    # Grid: (T,). Expert e = g * EXPERTS_PER_GROUP + j sits at tile[g, j].
    wait_for_previous(PDL)
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)[:, None]
    j = tl.arange(0, BLOCK_EG)[None, :]
    valid = (g < N_GROUP) & (j < EXPERTS_PER_GROUP)
    expert = g * EXPERTS_PER_GROUP + j
    BIG: tl.constexpr = BLOCK_G * BLOCK_EG
    logits = tl.load(logits_ptr + t * logits_row_stride + expert, mask=valid, other=-float("inf")).to(tl.float32)
    if SOFTMAX:
        row_max = tl.max(tl.max(logits, axis=1), axis=0)
        p = tl.where(valid, tl.exp(logits - row_max), 0.0)
        scores = p / tl.sum(tl.sum(p, axis=1), axis=0)
    else:
        scores = tl.sigmoid(logits)
    choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + expert, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, -float("inf"))

    if N_GROUP > 1:
        # Each group's 2 best (the first max masked out by its lowest index), summed.
        top1 = tl.max(choice, axis=1)
        first = tl.min(tl.where(choice == top1[:, None], j, BLOCK_EG), axis=1)
        top2 = tl.max(tl.where(j == first[:, None], -float("inf"), choice), axis=1)
        groups = tl.arange(0, BLOCK_G)
        group_score = tl.where(groups < N_GROUP, top1 + top2, -float("inf"))
        keep = groups < 0
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(group_score, axis=0)
            gi = tl.min(tl.where(group_score == best, groups, BLOCK_G), axis=0)
            keep = keep | (groups == gi)
            group_score = tl.where(groups == gi, -float("inf"), group_score)
        choice = tl.where(keep[:, None], choice, -float("inf"))

    ks = tl.arange(0, BLOCK_K)
    weights = tl.zeros((BLOCK_K,), dtype=tl.float32)
    ids = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for i in tl.static_range(TOP_K):
        _, e = _max_lowest_index(choice, expert, BIG)
        w = tl.sum(tl.sum(tl.where(expert == e, scores, 0.0), axis=1), axis=0)
        weights = tl.where(ks == i, w, weights)
        ids = tl.where(ks == i, e, ids)
        choice = tl.where(expert == e, -float("inf"), choice)
    if RENORMALIZE:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    weights = weights * routed_scaling_factor
    tl.store(weights_ptr + t * TOP_K + ks, weights, mask=ks < TOP_K)
    tl.store(ids_ptr + t * TOP_K + ks, ids, mask=ks < TOP_K)


def moe_routing_triton(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    n_group: int = 1,
    topk_group: int = 1,
    e_score_correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_args(router_logits, top_k, scoring, n_group, topk_group, e_score_correction_bias)
    num_tokens, num_experts = router_logits.shape
    if num_experts > _MAX_EXPERTS or top_k > _MAX_TOP_K:
        raise ValueError(f"moe_routing kernel: E={num_experts} > {_MAX_EXPERTS} or top_k={top_k} > {_MAX_TOP_K}")
    assert router_logits.stride(1) == 1 or num_experts == 1, "router_logits: last dim must be contiguous"
    dev = router_logits.device
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=dev)
    if num_tokens == 0:
        return weights, ids
    bias = e_score_correction_bias
    if bias is not None:
        assert bias.device == dev, f"e_score_correction_bias on {bias.device}, router_logits on {dev}"
        bias = bias.contiguous()
    per_group = num_experts // n_group
    with interpreter_upcast((router_logits, bias)) as ((logits, bias), _):
        _moe_routing_kernel[(num_tokens,)](
            logits, bias if bias is not None else logits, weights, ids,
            num_experts, logits.stride(0), float(routed_scaling_factor),
            EXPERTS_PER_GROUP=per_group, N_GROUP=n_group, TOPK_GROUP=topk_group if n_group > 1 else 1,
            TOP_K=top_k, SOFTMAX=scoring == "softmax", HAS_BIAS=bias is not None, RENORMALIZE=renormalize,
            BLOCK_G=triton.next_power_of_2(n_group), BLOCK_EG=triton.next_power_of_2(per_group),
            BLOCK_K=triton.next_power_of_2(top_k),
            num_warps=4 if num_experts <= 256 else 8, **pdl_options(logits),
        )
    return weights, ids


def _moe_routing_fake(router_logits, top_k, scoring="softmax", renormalize=True, n_group=1, topk_group=1,
                      e_score_correction_bias=None, routed_scaling_factor=1.0):
    t = router_logits.shape[0]
    return (router_logits.new_empty(t, top_k, dtype=torch.float32),
            router_logits.new_empty(t, top_k, dtype=torch.int32))


moe_routing = register_op("moe_routing", launcher=moe_routing_triton, reference=moe_routing_ref,
                          fake=_moe_routing_fake)
