"""Launch configurations of kernels/linear.py's GEMV, as measured (bench/bench_linear.py sweeps
the candidates against cuBLAS and prints `TUNED` entries). Data and the rule that picks from it;
the kernel and its launcher stay in linear.py."""
from __future__ import annotations

from typing import NamedTuple

import triton


class GemvConfig(NamedTuple):
    dot: bool          # tl.dot variant (else the CUDA-core "fma" one)
    block_n: int       # output features per program
    block_k: int       # K elements per loop step
    num_warps: int
    num_stages: int


# (N, K, M rounded up to a power of 2) -> config, or None for "cuBLAS is faster here".
# Measured on H100 (bench/bench_linear.py, 2026-11-25): per (N, K, M rounded up to a power
# of 2) the fastest of ~10 configs, each streaming its own weight in a CUDA graph, against
# cuBLAS's time on the same shape (every decode shape of Llama-3-8B is faster here: at
# M = 1 a step's GEMMs take 5.10 ms against cuBLAS's 5.68). Shapes not listed use default_config.
TUNED: dict[tuple[int, int, int], GemvConfig | None] = {
    (6144, 4096, 1): GemvConfig(dot=False, block_n=4, block_k=1024, num_warps=4, num_stages=1),  # qkv: 18.2 us vs cuBLAS 20.3 us
    (6144, 4096, 2): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # qkv: 19.7 us vs cuBLAS 20.7 us
    (6144, 4096, 4): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # qkv: 19.7 us vs cuBLAS 20.7 us
    (6144, 4096, 8): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # qkv: 19.7 us vs cuBLAS 20.8 us
    (6144, 4096, 16): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # qkv: 20.0 us vs cuBLAS 21.0 us
    (4096, 4096, 1): GemvConfig(dot=False, block_n=8, block_k=512, num_warps=4, num_stages=1),  # o_proj: 13.3 us vs cuBLAS 15.6 us
    (4096, 4096, 2): GemvConfig(dot=False, block_n=8, block_k=1024, num_warps=4, num_stages=1),  # o_proj: 14.2 us vs cuBLAS 16.2 us
    (4096, 4096, 4): GemvConfig(dot=True, block_n=16, block_k=256, num_warps=4, num_stages=4),  # o_proj: 14.7 us vs cuBLAS 16.1 us
    (4096, 4096, 8): GemvConfig(dot=True, block_n=16, block_k=256, num_warps=4, num_stages=4),  # o_proj: 14.7 us vs cuBLAS 16.2 us
    (4096, 4096, 16): GemvConfig(dot=True, block_n=16, block_k=256, num_warps=4, num_stages=4),  # o_proj: 14.7 us vs cuBLAS 16.4 us
    (28672, 4096, 1): GemvConfig(dot=False, block_n=4, block_k=1024, num_warps=4, num_stages=1),  # gate_up: 76.0 us vs cuBLAS 85.4 us
    (28672, 4096, 2): GemvConfig(dot=False, block_n=4, block_k=1024, num_warps=4, num_stages=1),  # gate_up: 78.0 us vs cuBLAS 81.6 us
    (28672, 4096, 4): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # gate_up: 79.7 us vs cuBLAS 81.9 us
    (28672, 4096, 8): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # gate_up: 80.1 us vs cuBLAS 82.3 us
    (28672, 4096, 16): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # gate_up: 80.9 us vs cuBLAS 86.2 us
    (4096, 14336, 1): GemvConfig(dot=False, block_n=8, block_k=512, num_warps=4, num_stages=1),  # down: 41.4 us vs cuBLAS 44.5 us
    (4096, 14336, 2): GemvConfig(dot=False, block_n=8, block_k=1024, num_warps=4, num_stages=1),  # down: 42.6 us vs cuBLAS 44.3 us
    (4096, 14336, 4): GemvConfig(dot=True, block_n=16, block_k=256, num_warps=4, num_stages=4),  # down: 43.4 us vs cuBLAS 44.3 us
    (4096, 14336, 8): GemvConfig(dot=True, block_n=16, block_k=256, num_warps=4, num_stages=4),  # down: 43.5 us vs cuBLAS 44.5 us
    (4096, 14336, 16): GemvConfig(dot=True, block_n=16, block_k=256, num_warps=4, num_stages=4),  # down: 43.5 us vs cuBLAS 45.1 us
    (128256, 4096, 1): GemvConfig(dot=False, block_n=4, block_k=1024, num_warps=4, num_stages=1),  # lm_head: 331.6 us vs cuBLAS 372.2 us
    (128256, 4096, 2): GemvConfig(dot=False, block_n=4, block_k=1024, num_warps=4, num_stages=1),  # lm_head: 333.1 us vs cuBLAS 372.9 us
    (128256, 4096, 4): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # lm_head: 344.0 us vs cuBLAS 373.4 us
    (128256, 4096, 8): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # lm_head: 346.3 us vs cuBLAS 375.2 us
    (128256, 4096, 16): GemvConfig(dot=True, block_n=16, block_k=512, num_warps=4, num_stages=3),  # lm_head: 349.7 us vs cuBLAS 378.2 us
    # 1-2 B models, measured on the H200 (bench_linear.py --model llama-3.2-1b / gemma-3-1b, 2026-12-03). Small
    # N with long K (down) loses to cuBLAS's split-K from M = 2 on: no split-K here. Gemma-3-1B was timed at
    # M = 1 and 16 only; M = 2-8 take the M = 16 entry (gemv_config).
    (3072, 2048, 1): GemvConfig(dot=False, block_n=4, block_k=1024, num_warps=4, num_stages=1),  # qkv: 4.8 us vs cuBLAS 6.1 us
    (3072, 2048, 2): GemvConfig(dot=False, block_n=4, block_k=1024, num_warps=4, num_stages=1),  # qkv: 6.1 us vs cuBLAS 6.4 us
    (3072, 2048, 4): None,  # qkv: 7.0 us vs cuBLAS 6.4 us
    (3072, 2048, 8): None,  # qkv: 7.0 us vs cuBLAS 6.4 us
    (3072, 2048, 16): None,  # qkv: 7.1 us vs cuBLAS 6.4 us
    (2048, 2048, 1): GemvConfig(dot=False, block_n=4, block_k=1024, num_warps=4, num_stages=1),  # o_proj: 3.9 us vs cuBLAS 6.0 us
    (2048, 2048, 2): GemvConfig(dot=False, block_n=2, block_k=1024, num_warps=4, num_stages=1),  # o_proj: 5.1 us vs cuBLAS 6.1 us
    (2048, 2048, 4): None,  # o_proj: 6.4 us vs cuBLAS 6.0 us
    (2048, 2048, 8): None,  # o_proj: 6.4 us vs cuBLAS 6.1 us
    (2048, 2048, 16): None,  # o_proj: 6.2 us vs cuBLAS 6.1 us
    (16384, 2048, 1): GemvConfig(dot=False, block_n=4, block_k=1024, num_warps=4, num_stages=1),  # gate_up: 17.1 us vs cuBLAS 18.2 us
    (16384, 2048, 2): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # gate_up: 17.6 us vs cuBLAS 18.2 us
    (16384, 2048, 4): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # gate_up: 17.7 us vs cuBLAS 18.3 us
    (16384, 2048, 8): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # gate_up: 17.9 us vs cuBLAS 18.4 us
    (16384, 2048, 16): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # gate_up: 18.1 us vs cuBLAS 18.6 us
    (2048, 8192, 1): GemvConfig(dot=False, block_n=4, block_k=1024, num_warps=4, num_stages=1),  # down: 10.3 us vs cuBLAS 13.5 us
    (2048, 8192, 2): None,  # down: 13.7 us vs cuBLAS 12.7 us
    (2048, 8192, 4): None,  # down: 17.7 us vs cuBLAS 12.7 us
    (2048, 8192, 8): None,  # down: 17.7 us vs cuBLAS 12.8 us
    (2048, 8192, 16): None,  # down: 16.9 us vs cuBLAS 13.0 us
    (128256, 2048, 1): GemvConfig(dot=False, block_n=4, block_k=1024, num_warps=4, num_stages=1),  # lm_head: 115.8 us vs cuBLAS 125.8 us
    (128256, 2048, 2): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # lm_head: 119.8 us vs cuBLAS 126.7 us
    (128256, 2048, 4): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # lm_head: 120.8 us vs cuBLAS 127.1 us
    (128256, 2048, 8): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # lm_head: 122.3 us vs cuBLAS 128.7 us
    (128256, 2048, 16): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # lm_head: 124.6 us vs cuBLAS 130.5 us
    (1536, 1152, 1): GemvConfig(dot=False, block_n=2, block_k=1024, num_warps=4, num_stages=1),  # qkv: 3.3 us vs cuBLAS 5.1 us
    (1536, 1152, 16): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # qkv: 4.5 us vs cuBLAS 4.7 us
    (1152, 1024, 1): GemvConfig(dot=False, block_n=4, block_k=1024, num_warps=4, num_stages=1),  # o_proj: 2.5 us vs cuBLAS 4.4 us
    (1152, 1024, 16): GemvConfig(dot=True, block_n=16, block_k=256, num_warps=4, num_stages=4),  # o_proj: 4.1 us vs cuBLAS 4.5 us
    (13824, 1152, 1): GemvConfig(dot=False, block_n=16, block_k=256, num_warps=4, num_stages=1),  # gate_up: 9.6 us vs cuBLAS 10.4 us
    (13824, 1152, 16): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # gate_up: 9.8 us vs cuBLAS 10.2 us
    (1152, 6912, 1): GemvConfig(dot=False, block_n=2, block_k=1024, num_warps=4, num_stages=1),  # down: 6.8 us vs cuBLAS 8.8 us
    (1152, 6912, 16): None,  # down: 14.3 us vs cuBLAS 8.9 us
    (262144, 1152, 1): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # lm_head: 135.9 us vs cuBLAS 142.0 us
    (262144, 1152, 16): GemvConfig(dot=True, block_n=64, block_k=128, num_warps=4, num_stages=4),  # lm_head: 145.4 us vs cuBLAS 150.4 us
}


def default_config(m: int, n: int, k: int) -> GemvConfig:
    """Untuned fallback: small BLOCK_N for enough programs per SM, 16-bit loads of 8-16 KB
    per program and step in flight. One row: 4 x 1024, the fastest on 5 of the 7 1-2 B
    shapes on the H200 and on 3 of the 5 Llama-3-8B ones on the H100."""
    if triton.next_power_of_2(m) == 1:
        return GemvConfig(dot=False, block_n=4, block_k=1024, num_warps=4, num_stages=1)
    return GemvConfig(dot=True, block_n=16, block_k=256, num_warps=4, num_stages=4)


def gemv_config(m: int, n: int, k: int) -> GemvConfig | None:
    """The config the op uses for [m, k] x [n, k]^T; None means F.linear. A shape tuned at
    other row counts takes the entry of the next tuned count up."""
    m2 = triton.next_power_of_2(m)
    if (n, k, m2) in TUNED:
        return TUNED[(n, k, m2)]
    above = sorted(mm for (nn, kk, mm) in TUNED if (nn, kk) == (n, k) and mm > m2)
    if above:
        return TUNED[(n, k, above[0])]
    return default_config(m, n, k)
