"""Launch configurations of kernels/fp8_gemm.py's two Triton kernels, as measured on the H200
(bench/probes/fp8_gemm_tune.py sweeps the candidates; bench/bench_fp8_gemm.py times the
choice against torch._scaled_mm). Data and the rule that picks from it; the kernels and
their launchers stay in fp8_gemm.py."""
from __future__ import annotations

from typing import NamedTuple


class Fp8GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int       # with block scales it must divide fp8_gemm.SCALE_BLOCK (128)
    group_m: int       # output-tile rows walked together (L2 reuse of weight tiles)
    num_warps: int
    num_stages: int


class Fp8GemvConfig(NamedTuple):
    block_n: int       # output features per program
    block_k: int       # with block scales it must divide fp8_gemm.SCALE_BLOCK (128)
    num_warps: int
    num_stages: int


def default_gemm_config(m: int, n: int, k: int, block_scales: bool) -> Fp8GemmConfig:
    """128-wide fp8 tiles (16 KB per operand and stage); for M >= 1024 with per-tensor or
    per-row scales, 256x128 tiles: 928-983 TFLOP/s against 800-853 for 128x128 on the
    Llama-3.1-8B shapes at M = 4096 (H200, bench/probes/fp8_gemm_tune.py, 2026-12-02;
    torch._scaled_mm 1,169-1,225). Block scales keep 128x128 (best of the candidates there)."""
    if m <= 64:
        return Fp8GemmConfig(64, 128, 128, 8, 4, 4)
    if m >= 1024 and not block_scales:
        return Fp8GemmConfig(256, 128, 128, 8, 8, 3)
    return Fp8GemmConfig(128, 128, 128, 8, 8, 4)


def default_gemv_config(m: int, n: int, k: int, block_scales: bool) -> Fp8GemvConfig:
    """32 output features a program for N <= 4096 (128 programs, not 64, for 132 SMs), 64
    above; 256-wide K steps (128 with block scales, which a step must not straddle).
    Measured on the H200 (bench/probes/fp8_gemm_tune.py, 2026-12-02, weight GB/s at M = 1,
    per-tensor / block scales, copy 4,253): o_proj 4096x4096 1,931 / 1,547 (64 a program:
    1,736 / 1,359), down 4096x14336 2,690 / 1,791 (2,252 / 1,515), qkv 6144x4096 2,506 /
    2,102, gate_up 28672x4096 3,925 / 3,852. A 16-32 MB fp8 weight is read in 4-8 us, so
    a launch's fixed cost keeps the small shapes well below the copy figure."""
    block_n = 32 if n <= 4096 else 64
    block_k = 128 if block_scales else 256
    return Fp8GemvConfig(block_n, block_k, 4, 5 if (block_scales or n <= 4096) else 4)
