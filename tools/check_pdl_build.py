"""The decode step's PDL kernels (kernels/pdl.py) compiled for sm_90 here, without a GPU, and
checked for what the CPU interpreter cannot show: each waits for the kernel before
(`griddepcontrol.wait`) before its first global load, and lets the next one launch
(`griddepcontrol.launch_dependents`). A load ahead of the wait would read what the kernel
before has not finished writing: a race no interpreted test can see.

    TRITON_INTERPRET=0 PYTHONPATH=$PWD python tools/check_pdl_build.py

Each kernel at a Llama-3.1-8B decode shape with PDL=True (and once without, to show the
instructions come from the flag). Prints one line a kernel; exit status 1 if a check fails.
tests/kernels/test_pdl_build.py runs it.
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # @triton.jit must build JITFunctions, not interpreted ones
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from triton.runtime.jit import MockTensor  # noqa: E402

from tools.sm90_build import compile_or_report  # noqa: E402
from trtllm.kernels import (  # noqa: E402
    fp8_gemm,
    fused_moe_decode,
    linear,
    moe_routing,
    quantize_fp8,
    quantize_fp8_gemm,
    quantize_fp8_static,
    rms_norm,
    rms_norm_quant_fp8,
    rotary,
    silu_mul,
    silu_mul_fp8_gemm,
    silu_mul_quant_fp8,
)

F8, F32, BF16, I32 = (MockTensor(t) for t in (torch.float8_e4m3fn, torch.float32, torch.bfloat16, torch.int32))
H, FFN = 4096, 14336
E, TOP_K, MOE_H, MOE_I = 128, 8, 2048, 768  # Qwen3-30B-A3B's MoE: experts, top-k, hidden, expert intermediate
FP8 = dict(MIN_AMAX=1e-12, FP8_MAX=448.0)


def builds():
    """(name, kernel, args, num_warps, num_stages) of each PDL kernel, PDL left to the caller."""
    yield "linear._gemv_kernel", linear._gemv_kernel, dict(
        x_ptr=BF16, w_ptr=BF16, b_ptr=BF16, y_ptr=BF16, M=1, N=H, K=H, x_row_stride=H, w_row_stride=H,
        y_row_stride=H, h_ptr=F32, lb_ptr=BF16, slot_ptr=I32, R=16, SPLITS=1, h_split_stride=16,
        h_row_stride=16, lb_slot_stride=16, lb_row_stride=16, HAS_BIAS=False, HAS_LORA=False, BLOCK_R=16,
        USE_DOT=False, DOT_PRECISION="tf32", BLOCK_M=1, BLOCK_N=8, BLOCK_K=512, EVEN_K=True), 4, 1
    yield "fp8_gemm._fp8_gemv_kernel", fp8_gemm._fp8_gemv_kernel, dict(
        x_ptr=F8, w_ptr=F8, xs_ptr=F32, ws_ptr=F32, b_ptr=BF16, y_ptr=BF16, M=1, N=H, K=H, x_row_stride=H,
        w_row_stride=H, y_row_stride=H, xs_row_stride=1, ws_row_stride=1, HAS_BIAS=False, BLOCK_SCALES=False,
        SCALE_BLOCK=128, DOT_PRECISION="tf32", MAX_IMPRECISE_ACC=128, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256,
        EVEN_K=True), 4, 5
    yield "quantize_fp8_gemm._quantize_fp8_gemv_kernel", quantize_fp8_gemm._quantize_fp8_gemv_kernel, dict(
        x_ptr=BF16, w_ptr=F8, ws_ptr=F32, b_ptr=F32, y_ptr=BF16, amax_ptr=F32, N=H, K=H, N_AMAX=0,
        w_row_stride=H, ws_row_stride=1, HAS_BIAS=False, AMAX_BLOCK=0, STATIC=False, EMULATE_E4M3=False, BLOCK_N=8,
        BLOCK_K=2048, EVEN_K=True, **FP8), 4, 1
    yield "quantize_fp8_gemm._quantize_fp8_gemv_kernel (partial amaxes)", quantize_fp8_gemm._quantize_fp8_gemv_kernel, dict(
        x_ptr=BF16, w_ptr=F8, ws_ptr=F32, b_ptr=F32, y_ptr=BF16, amax_ptr=F32, N=H, K=FFN, N_AMAX=14,
        w_row_stride=FFN, ws_row_stride=1, HAS_BIAS=False, AMAX_BLOCK=16, STATIC=False, EMULATE_E4M3=False, BLOCK_N=8,
        BLOCK_K=2048, EVEN_K=True, **FP8), 4, 1
    yield "silu_mul_quant_fp8._silu_mul_quant_fp8_static_kernel", silu_mul_quant_fp8._silu_mul_quant_fp8_static_kernel, dict(
        gate_ptr=BF16, up_ptr=BF16, q_ptr=F8, s_ptr=F32, static_scale_ptr=F32, N=FFN, gate_row_stride=2 * FFN,
        up_row_stride=2 * FFN, q_row_stride=FFN, s_row_stride=1, FP8_MAX=448.0, BLOCK=1024), 4, 3
    yield "silu_mul_fp8_gemm._silu_mul_amax_kernel", silu_mul_fp8_gemm._silu_mul_amax_kernel, dict(
        gate_ptr=BF16, up_ptr=BF16, h_ptr=BF16, amax_ptr=F32, K=FFN, BLOCK=1024, EMULATE_BF16=False), 4, 3
    yield "quantize_fp8._quantize_fp8_kernel", quantize_fp8._quantize_fp8_kernel, dict(
        x_ptr=BF16, q_ptr=F8, s_ptr=F32, K=H, N_GROUPS=1, x_row_stride=H, q_row_stride=H, s_row_stride=1,
        GROUP=H, BLOCK_G=1, **FP8), 4, 3
    yield "quantize_fp8_static._quantize_fp8_static_kernel", quantize_fp8_static._quantize_fp8_static_kernel, dict(
        x_ptr=BF16, s_ptr=F32, q_ptr=F8, K=H, x_row_stride=H, q_row_stride=H, FP8_MAX=448.0, BLOCK=1024), 4, 3
    yield "rms_norm._rms_norm_kernel", rms_norm._rms_norm_kernel, dict(
        x_ptr=BF16, residual_ptr=BF16, weight_ptr=BF16, out_ptr=BF16, sum_ptr=BF16, pre_weight_ptr=BF16,
        n_rows=1, n_cols=H, x_row_stride=H, residual_row_stride=H, out_row_stride=H, sum_row_stride=H,
        eps=1e-5, HAS_RESIDUAL=True, HAS_PRE_NORM=False, UNIT_OFFSET=False, BLOCK_M=1, BLOCK_N=H), 8, 3
    yield "rms_norm_quant_fp8._rms_norm_quant_fp8_kernel", rms_norm_quant_fp8._rms_norm_quant_fp8_kernel, dict(
        x_ptr=BF16, residual_ptr=BF16, weight_ptr=BF16, q_ptr=F8, s_ptr=F32, sum_ptr=BF16, static_scale_ptr=F32,
        N=H, N_GROUPS=1, x_row_stride=H, residual_row_stride=H, q_row_stride=H, s_row_stride=1, sum_row_stride=H,
        eps=1e-5, HAS_RESIDUAL=True, UNIT_OFFSET=False, STATIC=False, GROUP=H, BLOCK_G=1, **FP8), 8, 3
    yield "rotary._rotary_kernel", rotary._rotary_kernel, dict(
        x_ptr=BF16, cos_ptr=BF16, sin_ptr=BF16, out_ptr=BF16, weight_ptr=BF16, n_heads=32, seq_len=1,
        x_stride_b=H, x_stride_h=128, x_stride_s=H, cos_stride_b=128, cos_stride_s=128, sin_stride_b=128,
        sin_stride_s=128, out_stride_b=H, out_stride_h=128, out_stride_s=H, eps=1e-5, HEAD_DIM=128,
        INTERLEAVED=False, HAS_NORM=False, UNIT_OFFSET=False, BLOCK_H=8, BLOCK_HALF=64), 4, 3
    yield "silu_mul._silu_mul_kernel", silu_mul._silu_mul_kernel, dict(
        gate_ptr=BF16, up_ptr=BF16, out_ptr=BF16, n_cols=FFN, gate_row_stride=2 * FFN, up_row_stride=2 * FFN,
        out_row_stride=FFN, BLOCK_N=2048), 8, 3
    yield "silu_mul_quant_fp8._silu_mul_quant_fp8_kernel", silu_mul_quant_fp8._silu_mul_quant_fp8_kernel, dict(
        gate_ptr=BF16, up_ptr=BF16, q_ptr=F8, s_ptr=F32, N=FFN, N_GROUPS=1, gate_row_stride=2 * FFN,
        up_row_stride=2 * FFN, q_row_stride=FFN, s_row_stride=1, GROUP=16384, BLOCK_G=1, **FP8), 16, 3
    yield from moe_builds()


def moe_builds():
    """The MoE decode path of one token (Qwen3-30B-A3B, bf16 experts): routing, gate/up, down, combine."""
    yield "moe_routing._moe_routing_kernel", moe_routing._moe_routing_kernel, dict(
        logits_ptr=BF16, bias_ptr=F32, weights_ptr=F32, ids_ptr=I32, num_experts=E, logits_row_stride=E,
        routed_scaling_factor=1.0, EXPERTS_PER_GROUP=E, N_GROUP=1, TOPK_GROUP=1, TOP_K=TOP_K, SOFTMAX=True,
        HAS_BIAS=False, RENORMALIZE=True, BLOCK_G=1, BLOCK_EG=E, BLOCK_K=TOP_K), 4, 1
    cfg = fused_moe_decode.decode_config(MOE_H, MOE_I, block_scales=False)
    common = dict(ids_ptr=I32, num_tokens=1, hidden=MOE_H, inter=MOE_I, num_experts=E, TOP_K=TOP_K, SCALES=0,
                  SCALE_BLOCK=128, DOT_PRECISION="tf32", MAX_IMPRECISE_ACC=None, BLOCK_T=16, BLOCK_J=TOP_K,
                  BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
    yield "fused_moe_decode._decode_gate_up_kernel", fused_moe_decode._decode_gate_up_kernel, dict(
        x_ptr=BF16, xs_ptr=BF16, w13_ptr=BF16, ws_ptr=BF16, h_ptr=BF16, x_row_stride=MOE_H, xs_row_stride=0,
        w13_expert_stride=2 * MOE_I * MOE_H, w13_row_stride=MOE_H, ws_expert_stride=0, ws_row_stride=0,
        h_row_stride=MOE_I, **common), cfg.num_warps, cfg.num_stages
    yield "fused_moe_decode._decode_down_kernel", fused_moe_decode._decode_down_kernel, dict(
        h_ptr=BF16, hs_ptr=BF16, w2_ptr=BF16, ws_ptr=BF16, o_ptr=BF16, weights_ptr=F32, h_row_stride=MOE_I,
        hs_row_stride=0, w2_expert_stride=MOE_H * MOE_I, w2_row_stride=MOE_I, ws_expert_stride=0, ws_row_stride=0,
        o_row_stride=MOE_H, **common), cfg.num_warps, cfg.num_stages
    yield "fused_moe_decode._decode_combine_kernel", fused_moe_decode._decode_combine_kernel, dict(
        o_ptr=BF16, y_ptr=BF16, hidden=MOE_H, o_row_stride=MOE_H, y_row_stride=MOE_H, TOP_K=TOP_K, BLOCK_J=TOP_K,
        BLOCK_N=1024), 4, 1


def check(name: str, ptx: str, pdl: bool) -> list[str]:
    lines = [line.strip() for line in ptx.splitlines()]
    wait = next((i for i, line in enumerate(lines) if line.startswith("griddepcontrol.wait")), None)
    launch = any(line.startswith("griddepcontrol.launch_dependents") for line in lines)
    load = next((i for i, line in enumerate(lines) if line.startswith(("ld.global", "cp.async"))
                 or "ld.global" in line.split(";")[0] and line.startswith("@")), None)
    if not pdl:
        return [f"{name}: griddepcontrol without PDL"] if wait is not None or launch else []
    problems = []
    if wait is None or not launch:
        problems.append(f"{name}: griddepcontrol.wait {wait is not None}, launch_dependents {launch}")
    elif load is not None and load < wait:
        problems.append(f"{name}: a global load (line {load}: {lines[load]}) before griddepcontrol.wait (line {wait})")
    print(f"{name}: griddepcontrol.wait at PTX line {wait}, first global load at {load}, launch_dependents {launch}")
    return problems


def main() -> int:
    problems = []
    for name, kernel, args, num_warps, num_stages in builds():
        for pdl in (True, False):
            compiled = compile_or_report(name, kernel, dict(args, PDL=pdl), num_warps, num_stages)
            if compiled is None:
                problems.append(f"{name}: did not build")
                break
            problems += check(name, compiled.asm["ptx"], pdl)
    for p in problems:
        print("FAIL", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
