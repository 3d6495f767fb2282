"""fuse_moe: transformers' MoE blocks (grouped_mm and batched_mm experts) and a plain-PyTorch
MoE (router, softmax, top-k, loop over experts with index_add_) become moe_routing + fused_moe
with the block's own numbers; what it cannot show equal is left as captured, named in a note."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

from tests.passes.graph_capture import Captured
from trtllm.passes.fuse_moe import fuse_moe
from trtllm.passes.fuse_silu_mul import fuse_silu_mul

H, INTER, E = 32, 16, 4


class Expert(nn.Module):
    def __init__(self, act=F.silu):
        super().__init__()
        self.act = act
        self.w1, self.w3 = nn.Linear(H, INTER, bias=False), nn.Linear(H, INTER, bias=False)
        self.w2 = nn.Linear(INTER, H, bias=False)

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class PlainMoE(nn.Module):
    """An MoE as one writes it: router, softmax, top-k, a loop over experts with index_add_."""

    def __init__(self, k=2, renormalize=True, act=F.silu):
        super().__init__()
        self.k, self.renormalize = k, renormalize
        self.router = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(Expert(act) for _ in range(E))

    def forward(self, x):  # x [B, S, H]
        shape = x.shape
        x = x.view(-1, shape[-1])
        probs = F.softmax(self.router(x), dim=-1)
        w, ids = torch.topk(probs, self.k, dim=-1)
        if self.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, j = torch.where(ids == e)
            out.index_add_(0, tok, expert(x[tok]) * w[tok, j, None])
        return out.view(shape)


def capture(module, x):
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        return Captured(module, x)


def ops(cap):
    return {name: cap.count(op) for name, op in (("routing", torch.ops.trtllm.moe_routing.default),
                                                 ("fused", torch.ops.trtllm.fused_moe.default))}


def leftovers(cap):
    return [n for n in cap.gm.graph.nodes if n.target in (torch.topk, torch.where, torch.softmax, F.softmax)
            or n.target in ("index_add_", "topk")]


@pytest.mark.parametrize("renormalize, k", [(True, 2), (False, 2), (True, 1)])
def test_plain_pytorch_moe_is_fused(renormalize, k):
    torch.manual_seed(0)
    moe = PlainMoE(k, renormalize).eval()
    x = torch.randn(2, 7, H)
    cap = capture(moe, x)
    assert cap.apply(fuse_moe) == 1
    assert ops(cap) == {"routing": 1, "fused": 1} and not leftovers(cap)
    assert len(cap.inputs.constants) == 2  # W13 [E, 2I, H], W2 [E, H, INTER], stacked once
    w13, w2 = cap.inputs.constants
    assert w13.shape == (E, 2 * INTER, H) and w2.shape == (E, H, INTER)
    with torch.no_grad():
        want = moe(x)
    torch.testing.assert_close(cap.run(), want, rtol=1e-5, atol=1e-5)


def test_plain_moe_weights_are_held_once_after_the_first_call():
    moe = PlainMoE().eval()
    x = torch.randn(1, 5, H)
    cap = capture(moe, x)
    assert cap.apply(fuse_moe) == 1
    with torch.no_grad():
        want = moe(x)
    for fn in cap.ctx.after_first_call:
        fn()
    w13, w2 = cap.inputs.constants
    for e, expert in enumerate(moe.experts):
        assert expert.w1.weight.data_ptr() == w13[e].data_ptr()
        assert expert.w3.weight.data_ptr() == w13[e, INTER:].data_ptr()
        assert expert.w2.weight.data_ptr() == w2[e].data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(moe(x), want)  # the model itself still computes the same
    torch.testing.assert_close(cap.run(), want, rtol=1e-5, atol=1e-5)


def hf_block(family, experts_implementation):
    cfg = dict(hidden_size=H, num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2)
    if family == "mixtral":
        config = transformers.MixtralConfig(**cfg, intermediate_size=INTER, num_local_experts=E)
        block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock
    elif family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(**cfg, moe_intermediate_size=INTER, num_experts=E,
                                             shared_expert_intermediate_size=24, norm_topk_prob=False)
        block = transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock
    elif family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**cfg, moe_intermediate_size=INTER, num_experts=E, norm_topk_prob=True)
        block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock
    else:
        config = transformers.OlmoeConfig(**cfg, intermediate_size=INTER, num_experts=E)
        block = transformers.models.olmoe.modeling_olmoe.OlmoeSparseMoeBlock
    config._experts_implementation = experts_implementation
    torch.manual_seed(0)
    module = block(config).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.2)
    return module


@pytest.mark.parametrize("experts_implementation", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_transformers_moe_blocks_are_fused(family, experts_implementation):
    block = hf_block(family, experts_implementation)
    x = torch.randn(2, 5, H)
    cap = capture(block, x)
    assert cap.apply(fuse_moe) == 1
    assert ops(cap) == {"routing": 1, "fused": 1} and not leftovers(cap)
    assert not cap.inputs.constants  # HF's 3-D gate_up_proj / down_proj are used as they are
    with torch.no_grad():
        want = block(x)
    torch.testing.assert_close(cap.run(), want, rtol=1e-5, atol=1e-5)


def deepseek_v3_block(experts_implementation, n_group=4, topk_group=2, norm_topk_prob=True):
    config = transformers.DeepseekV3Config(hidden_size=H, moe_intermediate_size=INTER, n_routed_experts=8,
                                           num_experts_per_tok=3, n_group=n_group, topk_group=topk_group,
                                           n_shared_experts=1, routed_scaling_factor=2.5,
                                           norm_topk_prob=norm_topk_prob, num_attention_heads=4)
    config._experts_implementation = experts_implementation
    torch.manual_seed(0)
    block = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
        block.gate.e_score_correction_bias.normal_(0.0, 0.3)
    return block


@pytest.mark.parametrize("experts_implementation", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("n_group, topk_group, norm_topk_prob", [(4, 2, True), (1, 1, False)])
def test_deepseek_v3_moe_grouped_sigmoid_routing_is_fused(experts_implementation, n_group, topk_group,
                                                          norm_topk_prob):
    """Sigmoid scores, the score-correction bias, grouped top-k, routed scaling: moe_routing's
    DeepSeek-V3 path; the shared experts stay ordinary graph ops."""
    block = deepseek_v3_block(experts_implementation, n_group, topk_group, norm_topk_prob)
    x = torch.randn(2, 5, H)
    cap = capture(block, x)
    assert cap.apply(fuse_moe) == 1, cap.ctx.notes
    assert ops(cap) == {"routing": 1, "fused": 1} and not leftovers(cap)
    assert not any(n.target in ("scatter_", "masked_fill") for n in cap.gm.graph.nodes)
    routing = next(n for n in cap.gm.graph.nodes if n.target is torch.ops.trtllm.moe_routing.default)
    assert routing.args[1:4] == (3, "sigmoid", norm_topk_prob) and routing.args[4:6] == (n_group, topk_group)
    assert routing.args[7] == 2.5
    with torch.no_grad():
        want = block(x)
    torch.testing.assert_close(cap.run(), want, rtol=1e-5, atol=1e-5)


def test_grouped_routing_scored_otherwise_is_left_as_captured():
    """Groups scored by their best expert (DeepSeek-V2's group_limited_greedy), not the sum of
    the best two: the same ops but one, caught by the routing's run on random logits."""
    block = deepseek_v3_block("grouped_mm")
    gate = block.gate

    def group_max_router(hidden_states):
        hidden_states = hidden_states.view(-1, gate.hidden_dim)
        logits = F.linear(hidden_states.type(torch.float32), gate.weight.type(torch.float32))
        scores = logits.sigmoid()
        choice = scores + gate.e_score_correction_bias
        group_scores = choice.view(-1, gate.num_group, gate.num_experts // gate.num_group).topk(1, dim=-1)[0].sum(-1)
        group_idx = torch.topk(group_scores, k=gate.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, gate.num_group, gate.num_experts // gate.num_group)
        choice = choice.masked_fill(~score_mask.reshape(-1, gate.num_experts).bool(), float("-inf"))
        ids = torch.topk(choice, k=gate.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
        return logits, weights * gate.routed_scaling_factor, ids

    gate.forward = group_max_router
    x = torch.randn(2, 5, H)
    cap = capture(block, x)
    refused(cap, "the sigmoid routing differs from moe_routing's")
    with torch.no_grad():
        torch.testing.assert_close(cap.run(), block(x))


def test_qwen2_moe_shared_expert_and_its_sigmoid_gate_stay_in_the_graph():
    cap = capture(hf_block("qwen2_moe", "grouped_mm"), torch.randn(1, 3, H))
    assert cap.apply(fuse_moe) == 1
    assert sum(n.target is F.sigmoid or n.target is torch.sigmoid for n in cap.gm.graph.nodes) == 1


def refused(cap, match):
    with pytest.warns(UserWarning, match=match):
        assert cap.apply(fuse_moe) == 0
    assert len(cap.ctx.notes) == 1 and "fuse_moe" in cap.ctx.notes[0]
    assert ops(cap) == {"routing": 0, "fused": 0}


def test_experts_with_another_activation_are_left_as_captured():
    moe = PlainMoE(act=F.gelu).eval()
    x = torch.randn(1, 6, H)
    cap = capture(moe, x)
    refused(cap, "expert weights of no recognised layout")
    with torch.no_grad():
        torch.testing.assert_close(cap.run(), moe(x))


class InterleavedExperts(nn.Module):
    """3-D experts whose gate and up rows alternate (gpt-oss's layout): fused_moe's [gate; up]
    split would be wrong; the shape is the same, only the numbers differ."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.gate_up = nn.Parameter(torch.randn(E, 2 * INTER, H) * 0.2)
        self.down = nn.Parameter(torch.randn(E, H, INTER) * 0.2)

    def forward(self, x):  # x [T, H]
        w, ids = torch.topk(torch.softmax(self.router(x).float(), dim=-1), 2, dim=-1)
        gu = torch.einsum("th,tkih->tki", x, self.gate_up[ids])  # [T, k, 2I]
        h = F.silu(gu[..., ::2]) * gu[..., 1::2]
        y = torch.einsum("tki,tkhi->tkh", h, self.down[ids])
        return (y * w[..., None]).sum(dim=1)


def test_a_layout_that_differs_only_in_its_numbers_is_left_as_captured():
    torch.manual_seed(0)
    moe = InterleavedExperts().eval()
    x = torch.randn(6, H)
    cap = capture(moe, x)
    refused(cap, "differs from fused_moe's")
    with torch.no_grad():
        torch.testing.assert_close(cap.run(), moe(x))


def test_sigmoid_routing_weighted_by_its_top_k_values_is_left_as_captured():
    class SigmoidRouted(PlainMoE):  # sigmoid scores, but not DeepSeek-V3's gather at the ids
        def forward(self, x):
            w, ids = torch.topk(torch.sigmoid(self.router(x)), 2, dim=-1)
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                tok, j = torch.where(ids == e)
                out.index_add_(0, tok, expert(x[tok]) * w[tok, j, None])
            return out

    refused(capture(SigmoidRouted().eval(), torch.randn(5, H)), "sigmoid routing whose top-k values are read")


def test_routing_read_outside_the_experts_is_left_as_captured():
    class LeakyMoE(PlainMoE):
        def forward(self, x):
            probs = F.softmax(self.router(x), dim=-1)
            w, ids = torch.topk(probs, 2, dim=-1)
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                tok, j = torch.where(ids == e)
                out.index_add_(0, tok, expert(x[tok]) * w[tok, j, None])
            return out, ids  # the ids leave the block

    moe = LeakyMoE().eval()
    cap = capture(moe, torch.randn(5, H))
    refused(cap, "ids is read outside the expert computation")


def test_in_place_ops_survive_the_other_passes_dead_code_elimination():
    """fx counts `out.index_add_(...)` (a method call no one reads) as dead code; the passes'
    eliminate_dead_code keeps it, so an unfused MoE loop stays correct."""
    moe = PlainMoE(act=F.gelu).eval()
    x = torch.randn(1, 6, H)
    cap = capture(moe, x)
    cap.apply(fuse_silu_mul)
    assert sum(n.target == "index_add_" for n in cap.gm.graph.nodes) == E
    with torch.no_grad():
        torch.testing.assert_close(cap.run(), moe(x))


def test_expert_load_counts_each_blocks_routed_tokens_when_asked():
    """With ctx.expert_load, each fused block also counts its tokens per expert into a fixed
    counter (trtllm/expert_load.py), the same one on a second compilation; without, no count op."""
    from trtllm.attention_context import AttentionMetadata, PagedKVCache, attention_context
    from trtllm.expert_load import ExpertLoad

    torch.manual_seed(0)
    moe, x = PlainMoE(k=2), torch.randn(1, 5, H)
    cap = capture(moe, x)
    load = cap.ctx.expert_load = ExpertLoad()
    assert cap.apply(fuse_moe) == 1 and cap.count(torch.ops.trtllm.count_expert_load.default) == 1
    (block, counts), = load.counters.items()
    assert counts.tolist() == [0] * E  # keyed by the module path (here the top module: the node name)
    ids = torch.topk(F.softmax(moe.router(x[0]), dim=-1), 2, dim=-1)[1]
    cap.run()  # outside the runtime: every token counts
    assert load.snapshot()[block] == torch.bincount(ids.flatten(), minlength=E).tolist()
    meta = AttentionMetadata(8, 1, 1, "cpu")  # the runtime's: a slot of -1 marks a padding token
    meta.slot_mapping[:5] = torch.tensor([0, -1, 2, 3, -1], dtype=torch.int32)
    with attention_context(PagedKVCache.allocate(1, 1, 16, 1, 4, torch.float32, "cpu"), meta):
        cap.run()
    real = ids[[0, 2, 3]]
    assert load.snapshot()[block] == (torch.bincount(ids.flatten(), minlength=E)
                                      + torch.bincount(real.flatten(), minlength=E)).tolist()

    again = capture(moe, x)
    again.ctx.expert_load = load
    again.apply(fuse_moe)
    assert list(load.counters) == [block] and again.inputs.constants[-1] is counts
    plain = capture(moe, x)
    plain.apply(fuse_moe)
    assert plain.count(torch.ops.trtllm.count_expert_load.default) == 0


@pytest.mark.parametrize("algo", ["FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES"])
@pytest.mark.parametrize("family,experts_implementation", [("qwen3_moe", "grouped_mm"), ("mixtral", "batched_mm")])
def test_fp8_quantized_experts_become_fused_moe_fp8(family, experts_implementation, algo):
    """QuantConfig's FP8 algorithms quantize HF's 3-D experts (quantize_model); fuse_moe then
    places fused_moe_fp8 over the FP8 weights and scales, the bf16 placeholders left unread."""
    from trtllm.config import QuantAlgo
    from trtllm.quantization.fp8_linears import quantize_model

    block = hf_block(family, experts_implementation)
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        want = block(x)
    fp8 = quantize_model(block, QuantAlgo(algo))
    (path, experts), = fp8.experts.items()
    assert path == "experts" and experts.w13.dtype == torch.float8_e4m3fn and "FP8 experts of 1 MoE blocks" in fp8.summary()
    assert block.experts.gate_up_proj is experts.placeholders[0]
    cap = capture(block, x)
    cap.ctx.quantization = fp8
    assert cap.apply(fuse_moe) == 1
    assert cap.count(torch.ops.trtllm.fused_moe_fp8.default) == 1 and ops(cap) == {"routing": 1, "fused": 0}
    placeholders = [n for n in cap.gm.graph.nodes if n.op == "placeholder"
                    and cap.inputs.tensor(n) is not None and id(cap.inputs.tensor(n)) in fp8.experts_by_placeholder()]
    assert placeholders and not any(n.users for n in placeholders)
    got = cap.run()
    assert ((got - want).norm() / want.norm()).item() < 0.08  # e4m3 weights and activations (kernel tests' table)


def test_per_expert_fp8_linears_are_left_as_captured_with_a_note():
    """A plain MoE's per-expert nn.Linears quantized as FP8 linears: not fused (fused FP8 experts
    take HF's 3-D tensors), said in a note; quantize_linears runs them as FP8 linears."""
    from trtllm.config import QuantAlgo
    from trtllm.quantization.fp8_linears import quantize_model

    moe = PlainMoE(k=2)
    fp8 = quantize_model(moe, QuantAlgo.FP8)
    cap = capture(moe, torch.randn(1, 5, H))
    cap.ctx.quantization = fp8
    with pytest.warns(UserWarning, match="per-expert FP8 linears"):
        assert cap.apply(fuse_moe) == 0
    assert any("per-expert FP8 linears" in note for note in cap.ctx.notes)


def test_one_expert_load_counts_one_model():
    from trtllm.expert_load import ExpertLoad

    load = ExpertLoad()
    first, second = PlainMoE(), PlainMoE()
    load.bind(first)
    load.bind(first)  # a recompile of the same model
    with pytest.raises(ValueError, match="already counts another model"):
        load.bind(second)


def test_the_check_runs_a_few_tokens_whatever_the_example_inputs_hold(monkeypatch):
    """The gathered form (models/qwen3_moe.py traced) holds T * k expert copies: the check runs
    CHECK_TOKENS of a dynamic token count, not the example's (8,192 on the H200 bench: 384 GiB)."""
    from trtllm.models.qwen3_moe import Qwen3MoeConfig, SparseMoeBlock
    from trtllm.passes import moe_check

    config = Qwen3MoeConfig(vocab_size=8, hidden_size=H, intermediate_size=INTER, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, moe_intermediate_size=INTER,
                            num_experts=E, num_experts_per_tok=2, norm_topk_prob=True)
    torch.manual_seed(0)
    block = SparseMoeBlock(config).eval()
    for p in block.parameters():
        nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 100, H)
    torch._dynamo.mark_dynamic(x, 1)
    cap = capture(block, x)
    checked = []
    ref = moe_check.fused_moe_ref
    monkeypatch.setattr(moe_check, "fused_moe_ref", lambda x, *a: checked.append(x.shape[0]) or ref(x, *a))
    assert cap.apply(fuse_moe) == 1 and ops(cap) == {"routing": 1, "fused": 1}
    assert checked == [moe_check.CHECK_TOKENS]
    with torch.no_grad():
        torch.testing.assert_close(cap.run(), block(x), rtol=1e-5, atol=1e-5)
