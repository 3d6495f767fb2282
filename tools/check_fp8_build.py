"""The FP8 kernels compiled for sm_90 here, without a GPU, and checked for what the CPU
interpreter cannot show.

    TRITON_INTERPRET=0 PYTHONPATH=$PWD python tools/check_fp8_build.py

For kernels/fp8_gemm.py's two kernels (tiles and GEMV; row and block scales; the default
configs): every tl.dot of the tiled kernel became an sm_90 wgmma on e4m3 operands (no
upcast in the kernel) whose partial sums are promoted to fp32 every FP8_PROMOTE_K; the
GEMV's, at 32 features a program (below a wgmma's 64 rows), an mma.sync on fp16 operands
converted exactly from e4m3, with fp32 accumulators (check_gemv_mma); for kernels/quantize_fp8.py, kernels/rms_norm_quant_fp8.py, kernels/silu_mul_quant_fp8.py and
kernels/quantize_fp8_gemm.py:
the scale and quotient are IEEE divisions (div.rn.f32; the norm's mean of squares
divides as kernels/rms_norm.py does) and the cast to e4m3 rounds to
nearest with saturation (cvt.rn.satfinite). Prints one line a kernel; exit status 1 if a
check fails. tests/kernels/test_fp8_build.py runs it.
"""
import os
import re
import sys

os.environ["TRITON_INTERPRET"] = "0"  # @triton.jit must build JITFunctions, not interpreted ones
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from triton.runtime.jit import MockTensor  # noqa: E402

from tools.dump_sass import compile_sm90  # noqa: E402
from trtllm.kernels.fp8_gemm import (  # noqa: E402
    FP8_PROMOTE_K,
    SCALE_BLOCK,
    _fp8_gemm_kernel,
    _fp8_gemv_kernel,
)
from trtllm.kernels.fp8_gemm_configs import default_gemm_config, default_gemv_config  # noqa: E402
from trtllm.kernels.quantize_fp8 import FP8_MAX, MIN_AMAX, _quantize_fp8_kernel  # noqa: E402
from trtllm.kernels.quantize_fp8_gemm import _quantize_fp8_gemv_kernel  # noqa: E402
from trtllm.kernels.quantize_fp8_static import _quantize_fp8_static_kernel  # noqa: E402
from trtllm.kernels.rms_norm_quant_fp8 import _rms_norm_quant_fp8_kernel  # noqa: E402
from trtllm.kernels.silu_mul_quant_fp8 import (  # noqa: E402
    _silu_mul_quant_fp8_kernel,
    _silu_mul_quant_fp8_static_kernel,
)

F8, F32, BF16 = MockTensor(torch.float8_e4m3fn), MockTensor(torch.float32), MockTensor(torch.bfloat16)
M, N, K = 300, 4096, 4096  # Llama-3.1-8B's o_proj


def gemm_args(block: bool, m: int, block_k: int, **meta) -> dict:
    kg = -(-K // SCALE_BLOCK)
    return dict(x_ptr=F8, w_ptr=F8, xs_ptr=F32, ws_ptr=F32, b_ptr=BF16, y_ptr=BF16, M=m, N=N, K=K,
                x_row_stride=K, w_row_stride=K, y_row_stride=N,
                xs_row_stride=kg if block else 1, ws_row_stride=kg if block else 1,
                HAS_BIAS=True, BLOCK_SCALES=block, SCALE_BLOCK=SCALE_BLOCK, DOT_PRECISION="tf32",
                MAX_IMPRECISE_ACC=min(block_k, FP8_PROMOTE_K), BLOCK_K=block_k, EVEN_K=True, **meta)


def builds():
    for block in (False, True):
        c = default_gemm_config(M, N, K, block)
        yield (f"_fp8_gemm_kernel block_scales={block}", _fp8_gemm_kernel,
               gemm_args(block, M, c.block_k, BLOCK_M=c.block_m, BLOCK_N=c.block_n, GROUP_M=c.group_m),
               c.num_warps, c.num_stages)
        g = default_gemv_config(3, N, K, block)
        yield (f"_fp8_gemv_kernel block_scales={block}", _fp8_gemv_kernel,
               gemm_args(block, 3, g.block_k, BLOCK_M=16, BLOCK_N=g.block_n), g.num_warps, g.num_stages)


def check_gemm(name, compiled) -> list[str]:
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    dots = [line for line in ttgir.splitlines() if "ttng.warp_group_dot " in line or "tt.dot " in line]
    wgmma = [line for line in ptx.splitlines() if "wgmma.mma_async" in line]
    if name.startswith("_fp8_gemv_kernel") and not wgmma:
        return check_gemv_mma(name, compiled, dots, ptx)
    problems = []
    if not dots or not all(" = ttng.warp_group_dot " in d for d in dots):
        problems.append(f"tl.dot did not become a wgmma: {dots}")
    if not all("f8E4M3FN" in d and f"maxNumImpreciseAcc = {FP8_PROMOTE_K} " in d for d in dots):
        problems.append(f"a dot not on e4m3 operands promoted every {FP8_PROMOTE_K}: {dots}")
    if not wgmma or not all(".e4m3.e4m3" in w for w in wgmma):
        problems.append(f"PTX wgmma not on e4m3 operands: {sorted(set(wgmma))[:3]}")
    print(f"{name}: {len(dots)} dot(s), {len(wgmma)} e4m3 wgmma in PTX, shared {compiled.metadata.shared} B")
    return problems


def check_gemv_mma(name, compiled, dots, ptx) -> list[str]:
    """The decode kernel at fewer than 64 features a program (N <= 4096: 32, measured faster
    on the H200, kernels/fp8_gemm.py) is below a wgmma's 64 rows: Triton converts the e4m3
    tiles to fp16 (exact: every e4m3 value is an fp16 one) for mma.sync with fp32
    accumulators, whose every product is added in fp32 (no imprecise accumulation to
    promote). Checked: that dot and those instructions, nothing else."""
    mma = [line for line in ptx.splitlines() if "mma.sync.aligned" in line]
    problems = []
    if not dots or not all(" = tt.dot " in d and "xf16, " in d and "xf32, #mma>" in d for d in dots):
        problems.append(f"the decode dot is not an fp16 mma with fp32 accumulators: {dots}")
    if not mma or not all(".f32.f16.f16.f32" in m for m in mma):
        problems.append(f"PTX mma not fp16 x fp16 -> fp32: {sorted(set(mma))[:3]}")
    print(f"{name}: {len(dots)} dot(s), {len(mma)} exact fp16 mma (e4m3 upcast) in PTX, "
          f"shared {compiled.metadata.shared} B")
    return problems


# tl.sigmoid's 1 / (1 + exp(-x)) divides as kernels/silu_mul.py's does (a plain `/`: div.full.f32)
SILU_DIVS = {"div.rn.f32", "div.full.f32"}


def quantize_builds():
    kg = -(-K // 128)
    common = dict(MIN_AMAX=MIN_AMAX, FP8_MAX=FP8_MAX, GROUP=128, BLOCK_G=kg)
    yield "_quantize_fp8_kernel", _quantize_fp8_kernel, {"div.rn.f32"}, dict(
        x_ptr=BF16, q_ptr=F8, s_ptr=F32, K=K, N_GROUPS=kg, x_row_stride=K, q_row_stride=K,
        s_row_stride=kg, **common)
    # the mean of squares divides as kernels/rms_norm.py does (a plain `/`: div.full.f32)
    yield "_rms_norm_quant_fp8_kernel", _rms_norm_quant_fp8_kernel, {"div.rn.f32", "div.full.f32"}, dict(
        x_ptr=BF16, residual_ptr=BF16, weight_ptr=BF16, q_ptr=F8, s_ptr=F32, sum_ptr=BF16, static_scale_ptr=F32,
        N=K, N_GROUPS=kg, x_row_stride=K, residual_row_stride=K, q_row_stride=K, s_row_stride=kg,
        sum_row_stride=K, eps=1e-5, HAS_RESIDUAL=True, UNIT_OFFSET=False, STATIC=False, **common)
    # with a static input scale: only the quotient by it (the rsqrt's division is div.full)
    yield "_rms_norm_quant_fp8_kernel (static)", _rms_norm_quant_fp8_kernel, {"div.rn.f32", "div.full.f32"}, dict(
        x_ptr=BF16, residual_ptr=BF16, weight_ptr=BF16, q_ptr=F8, s_ptr=F32, sum_ptr=BF16, static_scale_ptr=F32,
        N=K, N_GROUPS=1, x_row_stride=K, residual_row_stride=K, q_row_stride=K, s_row_stride=1,
        sum_row_stride=K, eps=1e-5, HAS_RESIDUAL=True, UNIT_OFFSET=False, STATIC=True,
        MIN_AMAX=MIN_AMAX, FP8_MAX=FP8_MAX, GROUP=K, BLOCK_G=1)
    yield "_silu_mul_quant_fp8_kernel", _silu_mul_quant_fp8_kernel, SILU_DIVS, dict(
        gate_ptr=BF16, up_ptr=BF16, q_ptr=F8, s_ptr=F32, N=K, N_GROUPS=kg, gate_row_stride=2 * K,
        up_row_stride=2 * K, q_row_stride=K, s_row_stride=kg, **common)
    # the one-row GEMV quantizing x in its K loop (kernels/quantize_fp8_gemm.py), as quantize_fp8 does
    yield "_quantize_fp8_gemv_kernel", _quantize_fp8_gemv_kernel, {"div.rn.f32"}, dict(
        x_ptr=BF16, w_ptr=F8, ws_ptr=F32, b_ptr=F32, y_ptr=BF16, amax_ptr=F32, N=N, K=K, N_AMAX=0,
        w_row_stride=K, ws_row_stride=1, HAS_BIAS=False, AMAX_BLOCK=0, STATIC=False, EMULATE_E4M3=False, MIN_AMAX=MIN_AMAX,
        FP8_MAX=FP8_MAX, BLOCK_N=8, BLOCK_K=2048, EVEN_K=True)
    # the same taking the row's amax from partial amaxes (kernels/silu_mul_fp8_gemm.py)
    yield "_quantize_fp8_gemv_kernel (partial amaxes)", _quantize_fp8_gemv_kernel, {"div.rn.f32"}, dict(
        x_ptr=BF16, w_ptr=F8, ws_ptr=F32, b_ptr=F32, y_ptr=BF16, amax_ptr=F32, N=N, K=K, N_AMAX=4,
        w_row_stride=K, ws_row_stride=1, HAS_BIAS=False, AMAX_BLOCK=4, STATIC=False, EMULATE_E4M3=False, MIN_AMAX=MIN_AMAX,
        FP8_MAX=FP8_MAX, BLOCK_N=8, BLOCK_K=2048, EVEN_K=True)
    # the same quantizing x by a checkpoint's static scale (o_proj of a ModelOpt checkpoint)
    yield "_quantize_fp8_gemv_kernel (static scale)", _quantize_fp8_gemv_kernel, {"div.rn.f32"}, dict(
        x_ptr=BF16, w_ptr=F8, ws_ptr=F32, b_ptr=F32, y_ptr=BF16, amax_ptr=F32, N=N, K=K, N_AMAX=0,
        w_row_stride=K, ws_row_stride=1, HAS_BIAS=False, AMAX_BLOCK=0, STATIC=True, EMULATE_E4M3=False,
        MIN_AMAX=MIN_AMAX, FP8_MAX=FP8_MAX, BLOCK_N=8, BLOCK_K=2048, EVEN_K=True)
    # SiLU·mul with a static input scale (kernels/silu_mul_quant_fp8.py): spread over programs
    yield "_silu_mul_quant_fp8_static_kernel", _silu_mul_quant_fp8_static_kernel, SILU_DIVS, dict(
        gate_ptr=BF16, up_ptr=BF16, q_ptr=F8, s_ptr=F32, static_scale_ptr=F32, N=K, gate_row_stride=2 * K,
        up_row_stride=2 * K, q_row_stride=K, s_row_stride=1, FP8_MAX=FP8_MAX, BLOCK=1024)
    # static quantization (kernels/quantize_fp8_static.py): the IEEE quotient, as torch divides
    yield "_quantize_fp8_static_kernel", _quantize_fp8_static_kernel, {"div.rn.f32"}, dict(
        x_ptr=BF16, s_ptr=F32, q_ptr=F8, K=K, x_row_stride=K, q_row_stride=K, FP8_MAX=FP8_MAX, BLOCK=1024)


def check_quantize(name, kernel, expected_divs, args) -> list[str]:
    ptx = compile_sm90(kernel, args, 8, 1).asm["ptx"]
    divs = set(re.findall(r"\bdiv\.[a-z0-9.]+", ptx))
    # to e4m3 (the e4m3 -> f16 upcasts of a GEMV's operands are exact and not checked)
    cvts = {c for c in re.findall(r"\bcvt\.[a-z0-9.]*e4m3[a-z0-9.]*", ptx) if re.search(r"\.e4m3x2\.f(16|32)", c)}
    print(f"{name}: {sorted(divs)} {sorted(cvts)}")
    problems = []
    if divs != expected_divs:
        problems.append(f"divisions {sorted(divs)}: expected {sorted(expected_divs)}")
    if not cvts or not all(c.startswith("cvt.rn.satfinite.e4m3") for c in cvts):
        problems.append(f"e4m3 casts {sorted(cvts)}: expected cvt.rn.satfinite")
    return problems


def main() -> int:
    problems = []
    for name, kernel, args, warps, stages in builds():
        problems += [f"{name}: {p}" for p in check_gemm(name, compile_sm90(kernel, args, warps, stages))]
    for name, kernel, expected_divs, args in quantize_builds():
        problems += [f"{name}: {p}" for p in check_quantize(name, kernel, expected_divs, args)]
    print(*problems, sep="\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
