"""trtllm.compile on HF models and plain modules: same logits as eager, the expected
rewrites, and clear refusals."""
import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

import trtllm
from trtllm.compile import CompileError
from trtllm.models.attention import causal_attention

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
HF_MODELS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 32}),
}


def hf_model(family: str):
    config_cls, model_cls, extra = HF_MODELS[family]
    return model_cls(config_cls(**SMALL, **extra)).eval()


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("family", sorted(HF_MODELS))
def test_hf_model_compiles_to_same_logits(family):
    model = hf_model(family)
    ids = torch.randint(0, 96, (2, 9))
    positions = torch.arange(9)[None].expand(2, 9)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    compiled = trtllm.compile(model)
    assert rel_err(compiled(ids, positions), expected) < 1e-4
    summary = compiled.summary()
    assert "trtllm.attention: 2" in summary
    assert "replace_sdpa_with_paged_attention: 2" in summary
    assert "trtllm.silu_mul: 2" in summary and "trtllm.fused_add_rms_norm" in summary
    assert "trtllm.rotary:" not in summary
    if family == "qwen3":  # q/k norms over the head dim, each joined with its rope
        assert "trtllm.rms_norm_rotary: 4" in summary and "trtllm.rms_norm: 1" in summary
        assert "fuse_rotary_attention: 0" in summary
    else:  # each layer's q and k ropes inside its attention op
        assert "fuse_rotary: 4" in summary and "fuse_rotary_attention: 2" in summary


def test_inductor_path_matches_eager():
    model = hf_model("llama")
    compiled = trtllm.compile(model, inductor=True)
    for length in (5, 8):  # the second length recompiles with a dynamic token count
        ids = torch.randint(0, 96, (1, length))
        with torch.no_grad():
            expected = model(input_ids=ids, use_cache=False).logits
        assert rel_err(compiled(ids, torch.arange(length)[None]), expected) < 1e-4
    attn = model.model.layers[0].self_attn  # q/k/v now views of the one fused weight
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.numel() * 4


class TinyLM(nn.Module):
    """A user's own model written to the contract."""

    def __init__(self, mask=False, causal=True):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.qkv = nn.Linear(32, 96)
        self.out = nn.Linear(32, 50)
        self.mask, self.causal = mask, causal

    def forward(self, input_ids, positions):
        x = self.embed(input_ids) + positions[..., None].float() * 0.01  # [B, S, 32]
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 16).permute(2, 0, 3, 1, 4)  # each [B, H, S, D]
        mask = torch.ones(s, s, dtype=torch.bool).tril() if self.mask else None
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        return self.out(o.transpose(1, 2).reshape(b, s, 32))


def test_plain_module_following_the_contract():
    model = TinyLM().eval()
    ids, pos = torch.randint(0, 50, (3, 6)), torch.arange(6)[None].expand(3, 6)
    with torch.no_grad():
        expected = model(ids, pos)
    compiled = trtllm.compile(model)
    assert rel_err(compiled(ids, pos), expected) < 1e-5
    assert compiled.attention.num_layers == 1 and compiled.attention.num_kv_heads == 2


@pytest.mark.parametrize("mask,causal,message", [
    (True, False, "attn_mask"),
    (False, False, "non-causal"),
])
def test_unsupported_attention_is_refused_by_name(mask, causal, message):
    with pytest.raises(CompileError, match=message):
        trtllm.compile(TinyLM(mask=mask, causal=causal).eval())


def test_pass_refusal_surfaces_as_compile_error():
    model = TinyLM().eval()
    compiled = trtllm.compile(model)
    model.mask, model.causal = True, False  # changed after compile: the pass refuses it
    with pytest.raises(CompileError, match="attn_mask"):
        compiled(torch.randint(0, 50, (1, 4)), torch.arange(4)[None])


def test_model_without_attention_is_refused():
    class NoAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, input_ids, positions):
            return self.lin(input_ids.float()[..., None].expand(-1, -1, 4))

    with pytest.raises(CompileError, match="scaled_dot_product_attention"):
        trtllm.compile(NoAttention())


class CappedLM(nn.Module):
    """A user's model whose layers have a sliding window and logit soft-capping, given in its
    config (`layer_windows`, `layer_softcaps`) and applied eagerly by causal_attention."""

    def __init__(self, softcaps=(2.0, 0.0), windows=(0, 3)):
        super().__init__()
        self.config = SimpleNamespace(layer_softcaps=list(softcaps), layer_windows=list(windows))
        self.softcaps, self.windows = softcaps, windows
        self.embed = nn.Embedding(50, 32)
        self.qkv = nn.ModuleList(nn.Linear(32, 64) for _ in softcaps)  # 2 q heads, 1 kv head, D 16
        self.out = nn.Linear(32, 50)

    def forward(self, input_ids, positions):
        x = self.embed(input_ids) + positions[..., None].float() * 0.01  # [B, S, 32]
        b, s, _ = x.shape
        for i, qkv in enumerate(self.qkv):
            q, k, v = (qkv(x) * 3).view(b, s, 4, 16).transpose(1, 2).split([2, 1, 1], dim=1)  # [B, H, S, 16]
            o = causal_attention(q, k, v, window=self.windows[i], softcap=self.softcaps[i])
            x = x + o.transpose(1, 2).reshape(b, s, 32)
        return self.out(x)


def test_plain_module_with_softcaps_and_windows_in_its_config():
    model = CappedLM().eval()
    ids, pos = torch.randint(0, 50, (2, 9)), torch.arange(9)[None].expand(2, 9)
    with torch.no_grad():
        expected = model(ids, pos)
        uncapped = CappedLM(softcaps=(0.0, 0.0))
        uncapped.load_state_dict(model.state_dict())
        assert rel_err(uncapped(ids, pos), expected) > 1e-2  # the cap bites
    compiled = trtllm.compile(model)
    assert compiled.attention.softcaps == (2.0, 0.0) and compiled.attention.windows == (0, 3)
    assert rel_err(compiled(ids, pos), expected) < 1e-5


@pytest.mark.parametrize("softcaps, message", [
    ((2.0,), "config.layer_softcaps has 1 entries, the model 2 attention layers"),
    ((2.0, -1.0), "attention layer 1: softcap -1.0"),
])
def test_bad_softcaps_in_a_config_are_refused(softcaps, message):
    model = CappedLM().eval()
    model.config.layer_softcaps = list(softcaps)
    with pytest.raises(CompileError, match=message):
        trtllm.compile(model)


def test_an_hf_softcap_in_a_config_without_layer_softcaps_is_refused():
    model = CappedLM().eval()
    model.config = SimpleNamespace(attn_logit_softcapping=2.0, layer_windows=[0, 3])
    with pytest.raises(CompileError, match="config.attn_logit_softcapping=2.0 but no config.layer_softcaps"):
        trtllm.compile(model)


@pytest.mark.parametrize("family", ["llama2", "llama31", "mistral_swa", "qwen2", "qwen2_swa", "qwen3", "mqa"])
def test_our_models_compile_to_eager_logits(tmp_path, family):
    from tests.models.checkpoints import write_checkpoint

    model = trtllm.load_model(write_checkpoint(family, tmp_path), dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 128, (2, 9))  # longer than the sliding windows (4, 5): they bite
    positions = torch.arange(9)[None].expand(2, 9)
    with torch.no_grad():
        expected = model(ids, positions)
    compiled = trtllm.compile(model)
    assert rel_err(compiled(ids, positions), expected) < 1e-4
    assert "fuse_rotary: 4" in compiled.summary()


def test_lm_head_is_applied_only_to_requested_rows():
    model = hf_model("llama")
    ids = torch.randint(0, 96, (2, 7))
    positions = torch.arange(7)[None].expand(2, 7)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits  # [2, 7, V]
    compiled = trtllm.compile(model)
    rows = torch.tensor([6, 13, 2])  # flat indices into the 14 tokens
    got = compiled(ids, positions, logits_indices=rows)
    assert got.shape == (3, 96)
    assert rel_err(got, expected.flatten(0, 1)[rows]) < 1e-4
    assert "split_lm_head: 1" in compiled.summary()
    assert rel_err(compiled(ids, positions), expected) < 1e-4  # all rows when none asked


def test_a_new_kind_of_pass_plugs_in_through_the_passes_option():
    """docs/adding_a_pass.md's example, with a torch function for its op: a pass outside
    the package adds constant inputs, gives the LM head its op and leaves work for after
    the first call, all through `ctx`; CompiledModel uses each without knowing the pass."""
    from trtllm.passes import PASSES
    from trtllm.passes.match import arg, kind

    def int8_linear(x, wq, scale, bias):
        return F.linear(x, (wq.float() * scale).to(x.dtype), bias)

    def quantize_int8(weight):
        scale = weight.float().abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
        return (weight.float() / scale).round().to(torch.int8), scale.to(weight.dtype)

    head_rows, after = [], []

    def quantize_linears(graph, ctx):
        matches = 0
        for node in [n for n in graph.nodes if kind(n) == "linear"]:
            weight = ctx.inputs.tensor(arg(node, 1, "weight"))
            if weight is None:
                continue
            wq, scale = quantize_int8(weight)
            args = (node.args[0], ctx.inputs.add_constant(f"{node.name}_wq", wq),
                    ctx.inputs.add_constant(f"{node.name}_scale", scale), arg(node, 2, "bias"))
            with graph.inserting_before(node):
                new = graph.call_function(int8_linear, args)
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            matches += 1
        if ctx.lm_head is not None:
            wq, scale = quantize_int8(ctx.lm_head.weight)

            def head_int8_linear(x, weight, bias):
                head_rows.append(x.shape[0])
                return int8_linear(x, wq, scale, bias)

            ctx.lm_head.linear = head_int8_linear
        ctx.after_first_call.append(lambda: after.append(len(head_rows)))
        return matches

    model = hf_model("llama")
    ids = torch.randint(0, 96, (2, 7))
    positions = torch.arange(7)[None].expand(2, 7)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits.flatten(0, 1)
    compiled = trtllm.compile(model, passes=PASSES + [quantize_linears])
    rows = torch.tensor([6, 13])
    got = compiled(ids, positions, logits_indices=rows)
    assert rel_err(got, expected[rows]) < 2e-2  # int8 weights: ~0.5% per linear
    assert head_rows == [2]  # the head through the pass's op, on the two rows asked for
    # once per graph the capture compiled (the ordinary calls' and the decode graphs'), after
    # the call that compiled them (and applied the head)
    assert after == [1, 1]
    compiled(ids, positions, logits_indices=rows)
    assert after == [1, 1] and head_rows == [2, 2]
    summary = compiled.summary()
    # linears left after fuse_parallel_linears: 2 layers x (qkv, o, gate_up, down)
    assert "quantize_linears: 8" in summary
    assert summary.endswith("head_int8_linear in ordinary calls")  # the lm head's line


def test_summary_before_the_first_call_says_compilation_is_lazy():
    from trtllm.models.llama import LlamaConfig, LlamaForCausalLM
    compiled = trtllm.compile(LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                           num_hidden_layers=2, num_attention_heads=4,
                                                           num_key_value_heads=2, head_dim=8)))
    text = compiled.summary()
    assert "nothing compiled yet" in text and "lazy" in text and "2 attention layers" in text


def tiny_llama():
    """Our model file, 2 layers: the capture tests' model (an HF module's rope guards 1 away)."""
    from trtllm.models.llama import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_one_capture_serves_every_token_count_and_every_variant(device):
    """One dynamo capture serves every token count, 1 included, and both graph variants
    (issue 19, startup: a torch.compile per variant traced the model once each, and dynamo
    specialized the batch-1 decode graph: three captures of the model at every start).
    The token dim is dynamic from the first call: a graph compiled for the KV profiling
    call's exact length was used once, and the next length compiled again. Inductor's shape
    code is what once guarded 1 away (a view of a narrowed q: fuse_parallel_linears); on CUDA,
    aten SDPA's backend choice (models/attention.py traces trtllm's op instead)."""
    dtype, tolerance = (torch.float32, 1e-4) if device == "cpu" else (torch.bfloat16, 3e-2)
    model = tiny_llama().to(device, dtype)
    torch._dynamo.reset()  # a capture of another device's model would serve neither
    compiled = trtllm.compile(model, inductor=True)
    calls = [(9, False), (4, False), (13, False), (1, False), (1, True), (3, True), (16, True), (5, False)]
    for length, decode in calls:
        ids = torch.randint(0, 96, (1, length), device=device)
        positions = torch.arange(length, device=device)[None]
        with torch.no_grad():
            expected = model(ids, positions)
        with compiled.decode_graphs() if decode else contextlib.nullcontext():
            assert rel_err(compiled(ids, positions), expected) < tolerance, (length, decode)
    assert compiled.captures == 1 and [v.num_graphs for v in compiled.variants] == [1, 1]
    assert "1 capture(s) of the model, 2 graph(s)" in compiled.summary()
    # both graphs read one fused copy of each layer's q/k/v and gate/up weights, which the
    # model's own weights are views of (GraphInputs.made_constant)
    made = [t for _, t in compiled._made_constants.values()]
    assert len(made) == 2 * 2
    attn = model.model.layers[0].self_attn
    assert any(attn.q_proj.weight.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in made)


def test_a_model_files_attention_is_traced_as_trtllms_sdpa_op():
    """What dynamo hands the passes holds trtllm's SDPA op, not aten's (models/attention.py:
    on CUDA aten's backend choice guards the token count against 1 during the capture), for a
    model file of ours and an HF module alike; the op computes SDPA in its fake's layout."""
    from trtllm.passes import PASSES
    for model in (tiny_llama(), hf_model("llama")):
        traced = []

        def record(graph, ctx, traced=traced):
            traced.extend(n.target for n in graph.nodes if n.op == "call_function")
            return 0

        compiled = trtllm.compile(model, passes=[record, *PASSES], decode_graph_passes=[])
        compiled(torch.randint(0, 96, (1, 5)), torch.arange(5)[None])
        sdpa = [t for t in traced if "scaled_dot_product_attention" in str(t)]
        assert sdpa == [torch.ops.trtllm.scaled_dot_product_attention.default] * 2, sdpa
    q, k, v = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    out = torch.ops.trtllm.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    torch.library.opcheck(torch.ops.trtllm.scaled_dot_product_attention.default, (q, k, v),
                          {"is_causal": True, "scale": 0.3, "enable_gqa": True})


def test_a_static_capture_compiles_a_variant_at_its_first_call():
    """A capture of static shapes (here a first call of one token) compiles only the variant
    it serves; the decode graphs' compiles at its first call (no symbol for Inductor to guard)."""
    model = tiny_llama()
    torch._dynamo.reset()  # else dynamo remembers the token counts other tests' calls of this forward saw
    compiled = trtllm.compile(model, inductor=True)
    ids, positions = torch.tensor([[7]]), torch.tensor([[3]])
    with torch.no_grad():
        expected = model(ids, positions)
    assert rel_err(compiled(ids, positions), expected) < 1e-4
    assert compiled.captures == 1 and [v.num_graphs for v in compiled.variants] == [0, 1]
    with compiled.decode_graphs():
        assert rel_err(compiled(ids, positions), expected) < 1e-4
    assert compiled.captures == 1 and [v.num_graphs for v in compiled.variants] == [1, 1]
    assert compiled.compile_s > 0


def test_our_ops_get_their_inductor_fallbacks_declared_before_lowering():
    """torch 2.11 stringified an op's argument IR while making an implicit fallback, which never
    ended on the FP8 8B decode graph (trtllm/inductor_fallbacks.py): ours are declared first."""
    from torch._inductor.lowering import lowerings

    from trtllm.inductor_fallbacks import declare_inductor_fallbacks
    from trtllm.kernels.registry import register_op

    def scaled_ref(x: torch.Tensor, s: float) -> torch.Tensor:
        return x * s

    op = register_op("test_declared_fallback_scaled", reference=scaled_ref, launcher=scaled_ref,
                     fake=lambda x, s: torch.empty_like(x))
    gm = torch.fx.symbolic_trace(lambda x: torch.ops.trtllm.test_declared_fallback_scaled(x, 2.0) + 1)
    overload = torch.ops.trtllm.test_declared_fallback_scaled.default
    assert overload not in lowerings
    assert declare_inductor_fallbacks(gm.graph) == [overload] and overload in lowerings
    assert declare_inductor_fallbacks(gm.graph) == []  # made once
    from torch._inductor.compile_fx import compile_fx
    x = torch.randn(7, 5)
    assert torch.equal(compile_fx(gm, [x])(x), op(x, 2.0) + 1)
