"""passes/quantize_linears.py, fuse_rms_norm_quant_fp8.py, fuse_silu_mul_quant_fp8.py and fuse_quantize_fp8_gemm.py: op counts before and
after, and numerics (kernels in the Triton interpreter) against the FP8 semantics in fp32
(tests/quantization/fp8_checkpoints.py's fake-quantized inputs, dequantized weights) and,
looser, against the dequantized weights alone."""
import copy
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trtllm
from tests.passes.graph_capture import Captured
from tests.quantization.fp8_checkpoints import fake_quantize_input
from trtllm.compile import CompileError
from trtllm.config import QuantAlgo
from trtllm.inductor_choice import inductor_work
from trtllm.passes.fuse_add_rms_norm import fuse_add_rms_norm
from trtllm.passes.fuse_parallel_linears import fuse_parallel_linears
from trtllm.passes.fuse_quantize_fp8_gemm import fuse_quantize_fp8_gemm
from trtllm.passes.fuse_rms_norm import fuse_rms_norm
from trtllm.passes.fuse_rms_norm_quant_fp8 import fuse_rms_norm_quant_fp8
from trtllm.passes.fuse_silu_mul import fuse_silu_mul
from trtllm.passes.fuse_silu_mul_quant_fp8 import fuse_silu_mul_quant_fp8
from trtllm.passes.quantize_linears import quantize_linears
from trtllm.quantization import quantize_model

LINEAR = torch._C._nn.linear
GEMM, QUANT = torch.ops.trtllm.fp8_gemm.default, torch.ops.trtllm.quantize_fp8.default
ALGOS = [QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN, QuantAlgo.FP8_BLOCK_SCALES]


class Block(nn.Module):
    """A pre-norm decoder block's linears: q/k/v (one input), o, gate/up (one input), down."""

    def __init__(self, h=128, n_qkv=(128, 128, 128), ffn=256, bias=False):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(h, eps=1e-5), nn.RMSNorm(h, eps=1e-5)
        self.q, self.k, self.v = (nn.Linear(h, n, bias=bias) for n in n_qkv)
        self.o = nn.Linear(n_qkv[0], h, bias=bias)
        self.gate, self.up = nn.Linear(h, ffn, bias=False), nn.Linear(h, ffn, bias=False)
        self.down = nn.Linear(ffn, h, bias=False)
        with torch.no_grad():
            for n in (self.norm1, self.norm2):
                n.weight.uniform_(0.5, 1.5)

    @staticmethod
    def rms(norm, x):  # the shape fuse_rms_norm matches (as the model files write it)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype) * norm.weight

    def forward(self, x):
        h = self.rms(self.norm1, x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        x = x + self.o(q * k[..., : q.shape[-1]] + v[..., : q.shape[-1]])
        h = self.rms(self.norm2, x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def _emulated(block, fp8):
    """The block computing the FP8 semantics in fp32; and the block with dequantized weights only."""
    emulated, dequantized = copy.deepcopy(block), copy.deepcopy(block)
    for path, q in fp8.linears.items():
        for m in (emulated, dequantized):
            m.get_submodule(path).weight = nn.Parameter(q.dequantized())
        emulated.get_submodule(path).register_forward_pre_hook(lambda m, a, q=q: (fake_quantize_input(a[0], q),))
    return emulated, dequantized


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("tokens", [3, 20])  # the FP8 GEMM's small-M path, and its tiled one
def test_linears_become_fp8_gemms_stacked_by_input(algo, tokens):
    block = Block(bias=True).eval()
    fp8 = quantize_model(block, algo)
    emulated, dequantized = _emulated(block, fp8)
    x = torch.randn(1, tokens, 128)
    cap = Captured(block, x)
    cap.ctx.quantization = fp8
    assert cap.count(LINEAR) == 7 and cap.count(GEMM) == 0
    assert cap.apply(quantize_linears) == 4  # q/k/v, o, gate/up, down
    assert cap.count(LINEAR) == 0 and cap.count(GEMM) == 4 and cap.count(QUANT) == 4
    assert cap.apply(fuse_parallel_linears) == 0  # nothing left for it (no bf16 copy of the placeholders)
    out = cap.run()
    assert torch.isfinite(out).all()
    with torch.no_grad():
        assert _rel(out, emulated(x)) < 1e-5
        assert _rel(out, dequantized(x)) < 0.05  # the activations' own rounding


def test_block_weights_of_rows_not_a_multiple_of_128_are_not_stacked():
    block = Block(n_qkv=(128, 192, 192)).eval()  # k, v: 192 rows, 1.5 scale blocks
    fp8 = quantize_model(block, QuantAlgo.FP8_BLOCK_SCALES)
    emulated, _ = _emulated(block, fp8)
    x = torch.randn(2, 5, 128)
    cap = Captured(block, x)
    cap.ctx.quantization = fp8
    assert cap.apply(quantize_linears) == 6  # q, k, v alone; o; gate/up; down
    assert cap.count(GEMM) == 6 and cap.count(QUANT) == 6
    with torch.no_grad():
        assert _rel(cap.run(), emulated(x)) < 1e-5


def test_static_input_scales_quantize_in_the_graph():
    block = Block().eval()
    fp8 = quantize_model(block, QuantAlgo.FP8)
    for name, q in fp8.linears.items():
        q.input_scale = torch.tensor([0.01 if name in ("q", "k", "v") else 0.02])
    fp8.linears["up"].input_scale = torch.tensor([0.03])  # gate and up differ: not stacked
    emulated, _ = _emulated(block, fp8)
    x = torch.randn(1, 7, 128)
    cap = Captured(block, x)
    cap.ctx.quantization = fp8
    assert cap.apply(quantize_linears) == 5
    static = torch.ops.trtllm.quantize_fp8_static.default
    assert cap.count(GEMM) == 5 and cap.count(QUANT) == 0 and cap.count(static) == 5  # q/k/v, o, gate, up, down
    # the quantization is our op, not torch ops: no work left for Inductor in it
    work = inductor_work(cap.gm.graph)
    assert not {"div", "clamp", "to"} & set(work), work
    with torch.no_grad():
        assert _rel(cap.run(), emulated(x)) < 1e-5
    # the norms quantize with the static scale in their kernels (q/k/v's input; gate and up have
    # two scales, so their norm stays), and so does the gated product (down's input)
    for fuse in (fuse_rms_norm, fuse_add_rms_norm, fuse_rms_norm_quant_fp8, fuse_silu_mul, fuse_silu_mul_quant_fp8):
        cap.apply(fuse)
    norm_quant, silu_quant = torch.ops.trtllm.rms_norm_quant_fp8.default, torch.ops.trtllm.silu_mul_quant_fp8.default
    assert cap.count(norm_quant) == 1 and cap.count(silu_quant) == 1 and cap.count(static) == 3
    with torch.no_grad():
        assert _rel(cap.run(), emulated(x)) < 1e-5
    # in the decode graphs the GEMVs quantize with the static scale themselves (o, gate, up), and
    # down's takes the static SiLU·mul product in bf16
    assert cap.apply(fuse_quantize_fp8_gemm) == 4
    fused, silu_fused = torch.ops.trtllm.quantize_fp8_gemm.default, torch.ops.trtllm.silu_mul_fp8_gemm.default
    assert cap.count(static) == 0 and cap.count(silu_quant) == 0 and cap.count(GEMM) == 1  # q/k/v's
    assert cap.count(fused) == 3 and cap.count(silu_fused) == 1
    assert all(n.kwargs["input_scale"] is not None for n in cap.gm.graph.nodes if n.target in (fused, silu_fused))
    with torch.no_grad():
        assert _rel(cap.run(), emulated(x)) < 1e-5


def test_static_scales_at_one_row_run_the_quantizing_gemvs():
    """The batch-1 decode graph of a static-scale block: every GEMM but q/k/v's (whose input the
    norm quantizes) quantizes its input inside the one-row GEMV, and the block still computes
    the FP8 semantics."""
    block = Block().eval()
    fp8 = quantize_model(block, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN)
    for name, q in fp8.linears.items():
        q.input_scale = torch.tensor([0.01 if name in ("q", "k", "v") else 0.02])
    fp8.linears["down"].input_scale = torch.tensor([0.004])
    emulated, _ = _emulated(block, fp8)
    x = torch.randn(1, 1, 128)
    cap = Captured(block, x)
    cap.ctx.quantization = fp8
    cap.apply(quantize_linears)
    for fuse in (fuse_rms_norm, fuse_add_rms_norm, fuse_rms_norm_quant_fp8, fuse_silu_mul, fuse_silu_mul_quant_fp8,
                 fuse_quantize_fp8_gemm):
        cap.apply(fuse)
    assert cap.count(torch.ops.trtllm.quantize_fp8_gemm.default) == 1  # o (gate and up share a scale: stacked)
    assert cap.count(torch.ops.trtllm.silu_mul_fp8_gemm.default) == 1 and cap.count(GEMM) == 2
    with torch.no_grad():
        assert _rel(cap.run(), emulated(x)) < 1e-5


def _quantized_block(algo):
    """(a Block's capture after quantize_linears, the block emulating FP8 in fp32, its input)."""
    block = Block().eval()
    fp8 = quantize_model(block, algo)
    emulated, _ = _emulated(block, fp8)
    x = torch.randn(1, 6, 128)
    cap = Captured(block, x)
    cap.ctx.quantization = fp8
    cap.apply(quantize_linears)
    return cap, emulated, x


@pytest.mark.parametrize("algo", ALGOS)
def test_norms_feeding_fp8_linears_quantize_their_output(algo):
    cap, emulated, x = _quantized_block(algo)
    assert cap.apply(fuse_rms_norm) == 2 and cap.apply(fuse_add_rms_norm) == 1
    assert cap.apply(fuse_rms_norm_quant_fp8) == 2
    assert cap.count(torch.ops.trtllm.rms_norm_quant_fp8.default) == 1
    assert cap.count(torch.ops.trtllm.fused_add_rms_norm_quant_fp8.default) == 1
    assert cap.count(torch.ops.trtllm.rms_norm.default) == cap.count(torch.ops.trtllm.fused_add_rms_norm.default) == 0
    assert cap.count(QUANT) == 2  # o's and down's inputs: no norm before them
    with torch.no_grad():
        # the fused kernel quantizes the norm's fp32 output in the interpreter (it skips the
        # rounding to x.dtype, here fp32 anyway): the same values up to a rare fp8 tie
        assert _rel(cap.run(), emulated(x)) < 1e-3


@pytest.mark.parametrize("algo", ALGOS)
def test_the_gated_product_feeding_the_fp8_down_projection_leaves_as_fp8(algo):
    cap, emulated, x = _quantized_block(algo)
    assert cap.apply(fuse_silu_mul_quant_fp8) == 0  # nothing to match before fuse_silu_mul
    assert cap.apply(fuse_silu_mul) == 1
    assert cap.count(QUANT) == 4
    assert cap.apply(fuse_silu_mul_quant_fp8) == 1
    assert cap.count(torch.ops.trtllm.silu_mul_quant_fp8.default) == 1
    assert cap.count(torch.ops.trtllm.silu_mul.default) == 0
    assert cap.count(QUANT) == 3  # q/k/v's, o's and gate/up's inputs
    with torch.no_grad():  # fp32: the product's rounding is to fp32 both ways
        assert _rel(cap.run(), emulated(x)) < 1e-3


def test_a_gated_product_that_also_feeds_a_bf16_op_is_left_alone():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(64, 128), nn.Linear(64, 128), nn.Linear(128, 64)

        def forward(self, x):
            h = F.silu(self.gate(x)) * self.up(x)
            return self.down(h) + h[..., :64]

    m = Both().eval()
    fp8 = quantize_model(m, QuantAlgo.FP8)
    cap = Captured(m, torch.randn(1, 4, 64))
    cap.ctx.quantization = fp8
    cap.apply(quantize_linears)
    assert cap.apply(fuse_silu_mul) == 1
    assert cap.apply(fuse_silu_mul_quant_fp8) == 0
    assert torch.isfinite(cap.run()).all()


def test_a_norm_that_also_feeds_a_bf16_op_is_left_alone():
    class TiedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.proj, self.head = nn.RMSNorm(128, eps=1e-5), nn.Linear(128, 128), nn.Linear(128, 64)

        def forward(self, x):
            h = Block.rms(self.norm, x)
            return self.head(h) + self.proj(h)[..., :64]

    m = TiedHead().eval()
    fp8 = quantize_model(m, QuantAlgo.FP8)
    assert sorted(fp8.linears) == ["head", "proj"]  # no lm_head here: both taken
    del fp8.linears["head"]  # keep one in bf16
    m.head.weight = nn.Parameter(torch.randn(64, 128) * 0.05)
    cap = Captured(m, torch.randn(1, 4, 128))
    cap.ctx.quantization = fp8
    assert cap.apply(quantize_linears) == 1
    assert cap.apply(fuse_rms_norm) == 1
    assert cap.apply(fuse_rms_norm_quant_fp8) == 0
    assert torch.isfinite(cap.run()).all()


def test_a_placeholder_used_other_than_as_a_linear_weight_is_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(128, 128)

        def forward(self, x):
            return self.proj(x) + x @ self.proj.weight.t()  # the weight read as a matrix

    m = Odd().eval()
    fp8 = quantize_model(m, QuantAlgo.FP8)
    cap = Captured(m, torch.randn(1, 4, 128))
    cap.ctx.quantization = fp8
    with pytest.raises(CompileError, match="uses the FP8-quantized weight"):
        cap.apply(quantize_linears)


def test_decode_graphs_keep_fp8_and_the_head_stays_bf16(tmp_path, monkeypatch):
    """The compiled demo-shaped model: whole-sequence calls and the decode-graph variant
    (use_gemv_linear over it) both run FP8 GEMMs; only the head becomes trtllm.linear."""
    from tests.models.checkpoints import write_checkpoint

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    path = write_checkpoint("llama31", tmp_path, vocab_size=256)
    model = trtllm.load_model(path, dtype=torch.float32, device="cpu", quant_algo=QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN)
    reference = trtllm.load_model(path, dtype=torch.float32, device="cpu")
    for name, q in trtllm.quantization.fp8_linears_of(model).linears.items():  # the FP8 semantics in fp32
        reference.get_submodule(name).weight = nn.Parameter(q.dequantized())
        reference.get_submodule(name).register_forward_pre_hook(lambda m, a, q=q: (fake_quantize_input(a[0], q),))
    compiled = trtllm.compile(model)
    ids = torch.tensor([[5, 17, 99, 3]])
    positions = torch.arange(4)[None]
    whole = compiled(ids, positions)
    with compiled.decode_graphs():
        decode = compiled(ids, positions)
    torch.testing.assert_close(decode, whole, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(whole, reference(ids, positions), rtol=1e-4, atol=1e-4)
    assert [v.matches["quantize_linears"] for v in compiled.variants] == [2 * 4] * 2  # 2 layers x (qkv, o, gate/up, down)
    assert compiled.matches["quantize_linears"] == 2 * 4  # summary() counts the ordinary calls' graphs
    assert compiled.matches["use_gemv_linear"] == 0
    # the decode graphs' o_proj and down quantize their inputs in their GEMVs (the reference on
    # the CPU: the same semantics)
    assert [v.matches.get("fuse_quantize_fp8_gemm", 0) for v in compiled.variants] == [2 * 2, 0]
    assert [v.lm_head.op_name for v in compiled.variants] == ["trtllm.linear", "F.linear"]
    assert not torch.isfinite(model(ids, positions)).any()  # eager, the placeholders say NaN


def test_a_pass_list_without_quantize_linears_is_refused_not_nan(tmp_path):
    from tests.models.checkpoints import write_checkpoint
    from trtllm.passes import PASSES

    model = trtllm.load_model(write_checkpoint("llama31", tmp_path), dtype=torch.float32, device="cpu",
                              quant_algo=QuantAlgo.FP8)
    compiled = trtllm.compile(model, passes=[p for p in PASSES if p is not quantize_linears])
    with pytest.raises(CompileError, match="still reads the placeholder weights.*needs quantize_linears"):
        compiled(torch.tensor([[5, 17, 99]]), torch.arange(3)[None])


@pytest.mark.parametrize("algo", ALGOS)
def test_decode_graphs_quantize_in_the_gemv(algo):
    """fuse_quantize_fp8_gemm after the norm and SiLU·mul fusions: what still quantizes alone
    (o's input) and the quantized gated product (down's input) go into their GEMMs; block
    weights' 1x128 groups stay as they are."""
    cap, emulated, x = _quantized_block(algo)
    for fuse in (fuse_rms_norm, fuse_add_rms_norm, fuse_rms_norm_quant_fp8, fuse_silu_mul, fuse_silu_mul_quant_fp8):
        cap.apply(fuse)
    silu_quant = torch.ops.trtllm.silu_mul_quant_fp8.default
    assert cap.count(QUANT) == 1 and cap.count(silu_quant) == 1 and cap.count(GEMM) == 4
    fused, silu_fused = torch.ops.trtllm.quantize_fp8_gemm.default, torch.ops.trtllm.silu_mul_fp8_gemm.default
    if algo == QuantAlgo.FP8_BLOCK_SCALES:
        assert cap.apply(fuse_quantize_fp8_gemm) == 0
        assert cap.count(QUANT) == 1 and cap.count(fused) == 0 and cap.count(silu_fused) == 0
    else:
        assert cap.apply(fuse_quantize_fp8_gemm) == 2
        assert cap.count(QUANT) == 0 and cap.count(silu_quant) == 0 and cap.count(GEMM) == 2
        assert cap.count(fused) == 1 and cap.count(silu_fused) == 1
    with torch.no_grad():
        assert _rel(cap.run(), emulated(x)) < 1e-3


def test_a_quantization_that_also_feeds_another_op_is_left_alone():
    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(128, 64)

        def forward(self, x):
            return self.proj(x)

    m = Reused().eval()
    fp8 = quantize_model(m, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN)
    cap = Captured(m, torch.randn(1, 4, 128))
    cap.ctx.quantization = fp8
    cap.apply(quantize_linears)
    scale = next(n for n in cap.gm.graph.nodes if n.target is operator.getitem and n.args[1] == 1)
    out = next(n for n in cap.gm.graph.nodes if n.op == "output")
    with cap.gm.graph.inserting_before(out):  # the scale also leaves the graph: not only the GEMM's
        extra = cap.gm.graph.call_function(torch.sum, (scale,))
    out.args = ((out.args[0][0], extra),) if isinstance(out.args[0], tuple) else ((out.args[0], extra),)
    assert cap.apply(fuse_quantize_fp8_gemm) == 0
    assert cap.count(QUANT) == 1


def test_static_input_scales_fuse_into_both_norms():
    """One static scale for gate and up: the residual-add norm quantizes in its kernel too."""
    block = Block().eval()
    fp8 = quantize_model(block, QuantAlgo.FP8)
    for name, q in fp8.linears.items():
        q.input_scale = torch.tensor([0.01 if name in ("q", "k", "v") else 0.02])
    emulated, _ = _emulated(block, fp8)
    x = torch.randn(1, 5, 128)
    cap = Captured(block, x)
    cap.ctx.quantization = fp8
    cap.apply(quantize_linears)
    for fuse in (fuse_rms_norm, fuse_add_rms_norm, fuse_rms_norm_quant_fp8):
        cap.apply(fuse)
    assert cap.count(torch.ops.trtllm.rms_norm_quant_fp8.default) == 1
    assert cap.count(torch.ops.trtllm.fused_add_rms_norm_quant_fp8.default) == 1
    assert cap.count(torch.ops.trtllm.quantize_fp8_static.default) == 2  # o's input and down's
    with torch.no_grad():
        assert _rel(cap.run(), emulated(x)) < 1e-5
