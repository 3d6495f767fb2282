"""Fused mixture-of-experts MLP: each token through its k chosen SwiGLU experts, weighted and summed.

    y[t, :] = sum_j w[t, j] * W2[e] @ (silu(W1[e] @ x[t]) * (W3[e] @ x[t])),   e = topk_ids[t, j]

with w13[e] = [W1[e]; W3[e]] (gate rows first, then up: HF's fused 3-D `gate_up_proj`, and
Mixtral's w1/w3 stacked so) and w2[e] = W2[e] (HF's `down_proj`).

Shapes: x [T, H] (last dim contiguous); w13 [E, 2I, H], w2 [E, H, I] (last dims contiguous);
topk_weights [T, k] (any float dtype, used in fp32) and topk_ids [T, k] int32 as
`moe_routing` gives them. x, w13, w2 share one dtype (fp32/fp16/bf16). Output [T, H] in
x.dtype, contiguous. An id outside [0, E) contributes nothing (moe_align drops its slot): with
expert parallelism (passes/shard_experts.py) w13, w2 hold this rank's E experts, the ids are
shifted to them, and k may exceed E.

How: `moe_align` sorts the T*k slots (s = t*k + j) by expert, padded per expert to BLOCK_M,
so each BLOCK_M-row tile belongs to one expert. Then two grouped GEMMs over those tiles:

1. gate/up: h[s, :] = silu(x[t] @ W1[e]^T) * (x[t] @ W3[e]^T), one program per (row tile,
   BLOCK_N intermediate columns), both halves in the same program (the SiLU-mul fused in the
   epilogue, one rounding); h [T*k, I] in x.dtype.
2. down: o[s, :] = w[s] * (h[s] @ W2[e]^T), the routing weight applied in the epilogue;
   o [T*k, H] in x.dtype.

and the combine y[t] = sum_j o[t*k + j] is one torch sum over k (deterministic: no atomics),
which accumulates bf16/fp16 in fp32 and rounds once to x.dtype. Tiles past the padded count exit at once; an expert with no
slot has no tile. Products accumulate in fp32 (fp32 inputs: IEEE dot, no tf32).

Reference: the per-expert loop of HF's `DeepseekV3Experts` / `Qwen3MoeExperts`, in fp32,
rounded once at the end (HF rounds h, the down projection and each index_add_ in the model
dtype: the kernel rounds h and o, the reference nothing until the end).

Few tokens (T <= DECODE_MAX_TOKENS = 16, decode): kernels/fused_moe_decode.py instead, the
same two GEMMs with the sort done inside them (no moe_align launches), each chosen expert's
weights read once. FP8 experts: kernels/fused_moe_fp8.py.

Configs: `moe_config`'s tiles by slots per expert, measured (bench/bench_fused_moe.py's tile
sweep); `decode_config` (kernels/fused_moe_decode.py) likewise.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from trtllm.kernels.fused_moe_decode import (
    DECODE_MAX_TOKENS,
    DecodeConfig,
    decode_config,
    launch_decode_combine,
    launch_decode_down,
    launch_decode_gate_up,
)
from trtllm.kernels.moe_align import moe_align
from trtllm.kernels.registry import interpreter_upcast, register_op, triton_interpreter_on

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class MoeConfig(NamedTuple):
    block_m: int    # rows (slots) per tile; every tile holds one expert's slots
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 0  # row tiles a program group walks before the next BLOCK_N columns (`tile_of`; 0: all)


SMEM_BUDGET = 224 * 1024  # bytes of pipelined tiles a program may hold (sm_90: 227 KB a block, some for the epilogue)


def fit_shared_memory(cfg: MoeConfig, element_size: int) -> MoeConfig:
    """cfg with fewer stages (not below 2), then a narrower BLOCK_K, until the gate/up kernel's
    pipelined tiles (x [BLOCK_M, BLOCK_K] and two weight tiles [BLOCK_K, BLOCK_N] a stage) fit
    SMEM_BUDGET: the bf16 tables at fp32 (the GPU tests) would ask for 245-295 KB."""
    while cfg.num_stages * (cfg.block_m + 2 * cfg.block_n) * cfg.block_k * element_size > SMEM_BUDGET:
        if cfg.num_stages > 2:
            cfg = cfg._replace(num_stages=cfg.num_stages - 1)
        else:
            cfg = cfg._replace(block_k=cfg.block_k // 2)
    return cfg


def moe_config(num_slots: int, num_experts: int, hidden: int, inter: int, element_size: int = 2) -> MoeConfig:
    """Tiles by slots per expert, from bench/bench_fused_moe.py's sweep on the H200
    (2026-12-04, bf16; docs/decisions/moe_tiles.md):
    - <= 32 a expert (Qwen3-30B-A3B / DeepSeek-V2-Lite experts at a decode batch of 256): 32-row
      tiles, 82% of copy on the weights, against 79% / 71% for 16 / 64 rows (the 64 x 128 x 64
      tile with 3 stages chosen before: 60%);
    - <= 128 (Mixtral-8x7B at 256): 64 x 128 x 64, 4 stages, 80%;
    - more (prefill, 8,192 tokens): 8 warps, GROUP_M 8 (tile_of): 128 x 128 tiles for wide experts
      (Mixtral: 496 TFLOP/s against 392 before), 64 x 256 for narrow ones (Qwen3-30B-A3B: 333
      against 286)."""
    if triton_interpreter_on():  # tiny test shapes; tl.dot needs every dim >= 16
        return MoeConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1)
    per_expert = num_slots / num_experts
    if per_expert <= 32:
        cfg = MoeConfig(block_m=32, block_n=128, block_k=64, num_warps=4, num_stages=4)
    elif per_expert <= 128:
        cfg = MoeConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4)
    elif inter >= 4096:
        cfg = MoeConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4, group_m=8)
    else:
        cfg = MoeConfig(block_m=64, block_n=256, block_k=64, num_warps=8, num_stages=3, group_m=8)
    return fit_shared_memory(cfg, element_size)


def _check_args(x, w13, w2, topk_weights, topk_ids) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    if w13.dim() != 3 or w13.shape[2] != x.shape[1] or w13.shape[1] % 2:
        raise ValueError(f"w13 must be [E, 2I, H={x.shape[1]}], got shape {tuple(w13.shape)}")
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    if tuple(w2.shape) != (num_experts, x.shape[1], inter):
        raise ValueError(f"w2 must be [E={num_experts}, H={x.shape[1]}, I={inter}], got shape {tuple(w2.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or topk_ids.dtype != torch.int32:
        raise ValueError(f"topk_ids must be [T={x.shape[0]}, k] int32, got {tuple(topk_ids.shape)} {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape or topk_weights.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"topk_weights must be float [T, k]={tuple(topk_ids.shape)}, "
                         f"got {tuple(topk_weights.shape)} {topk_weights.dtype}")
    if x.dtype not in _FLOAT_DTYPES or w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"x, w13, w2 must share one float dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}")


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    _check_args(x, w13, w2, topk_weights, topk_ids)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        token_idx, pos = torch.where(topk_ids == e)
        if token_idx.numel() == 0:
            continue
        gate, up = F.linear(x[token_idx].float(), w13[e].float()).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, w2[e].float())
        out.index_add_(0, token_idx, h * topk_weights[token_idx, pos, None].float())
    return out.to(x.dtype)


@triton.jit
def tile_of(num_tiles, num_cols, GROUP_M: tl.constexpr):
    """(row tile, column block) of this program in a 1-D grid of num_tiles x num_cols: GROUP_M row
    tiles (of one expert, mostly: they are sorted by expert) go through every column block before
    the next GROUP_M start, so their rows stay in L2 while the expert's weight columns stream by
    (the matmul tutorial's grouped order). GROUP_M 0: row tiles fastest, the order of a
    (tiles, columns) grid."""
    pid = tl.program_id(0)
    if GROUP_M == 0:
        return pid % num_tiles, pid // num_tiles
    in_group = GROUP_M * num_cols
    first = (pid // in_group) * GROUP_M
    size = tl.minimum(num_tiles - first, GROUP_M)
    return first + (pid % in_group) % size, (pid % in_group) // size


@triton.jit
def _gate_up_kernel(
    x_ptr, w13_ptr, h_ptr,
    sorted_ids_ptr, expert_ids_ptr, total_ptr,
    num_slots, hidden, inter, num_tiles,
    x_row_stride, w13_expert_stride, w13_row_stride, h_row_stride,
    TOP_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grid: (row tiles x cdiv(I, BLOCK_N),) in tile_of's order. Tile m holds slots of expert expert_ids[m].
    pid_m, pid_n = tile_of(num_tiles, tl.cdiv(inter, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    slots = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = slots < num_slots
    tokens = tl.minimum(slots // TOP_K, num_slots // TOP_K - 1).to(tl.int64)  # padding rows read token T-1, store nothing
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.minimum(offs_n, inter - 1).to(tl.int64)  # in bounds; columns past I not stored
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * x_row_stride + offs_k[None, :]
    # W1[e]^T and W3[e]^T tiles [BLOCK_K, BLOCK_N]: the up rows start I rows after the gate rows.
    wg_ptrs = w13_ptr + e * w13_expert_stride + cols[None, :] * w13_row_stride + offs_k[:, None]
    wu_ptrs = wg_ptrs + inter * w13_row_stride
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = (k0 + offs_k) < hidden
        xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        wg = tl.load(wg_ptrs, mask=k_ok[:, None], other=0.0)
        wu = tl.load(wu_ptrs, mask=k_ok[:, None], other=0.0)
        acc_gate = tl.dot(xt, wg, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(xt, wu, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    h_ptrs = h_ptr + slots.to(tl.int64)[:, None] * h_row_stride + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < inter))


@triton.jit
def _down_kernel(
    h_ptr, w2_ptr, o_ptr, weights_ptr,
    sorted_ids_ptr, expert_ids_ptr, total_ptr,
    num_slots, hidden, inter, num_tiles,
    h_row_stride, w2_expert_stride, w2_row_stride, o_row_stride,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grid: (row tiles x cdiv(H, BLOCK_N),) in tile_of's order. o[s] = w[s] * h[s] @ W2[e]^T.
    pid_m, pid_n = tile_of(num_tiles, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    slots = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = slots < num_slots
    slots64 = slots.to(tl.int64)
    rows = tl.minimum(slots, num_slots - 1).to(tl.int64)  # padding rows read the last slot, store nothing
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.minimum(offs_n, hidden - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * h_row_stride + offs_k[None, :]
    w_ptrs = w2_ptr + e * w2_expert_stride + cols[None, :] * w2_row_stride + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_ok = (k0 + offs_k) < inter
        ht = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(ht, w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc *= tl.load(weights_ptr + rows).to(tl.float32)[:, None]
    o_ptrs = o_ptr + slots64[:, None] * o_row_stride + offs_n[None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < hidden))


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                     topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     *, config: MoeConfig | None = None, decode: bool | None = None,
                     decode_cfg: DecodeConfig | None = None) -> torch.Tensor:
    """decode: the few-token path (kernels/fused_moe_decode.py); None: for T <= DECODE_MAX_TOKENS
    unless a tile `config` is given. decode_cfg: the decode path's tiles (default `decode_config`)."""
    _check_args(x, w13, w2, topk_weights, topk_ids)
    for t, name in ((x, "x"), (w13, "w13"), (w2, "w2")):
        assert t.stride(-1) == 1, f"{name}: last dim must be contiguous"
        assert t.device == x.device, f"{name} on {t.device}, x on {x.device}"
    num_tokens, hidden = x.shape
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    num_slots = num_tokens * top_k
    if num_slots == 0:
        return torch.zeros_like(x)
    weights = topk_weights.contiguous()
    dot_precision = "ieee" if x.dtype == torch.float32 else "tf32"
    if decode is None:
        decode = num_tokens <= DECODE_MAX_TOKENS and config is None
    if decode:  # kernels/fused_moe_decode.py: no alignment, each chosen expert read once
        ids = topk_ids.contiguous()
        dcfg = decode_cfg or decode_config(hidden, inter, block_scales=False)
        with interpreter_upcast((x, w13, w2)) as ((x_, w13_, w2_), _):
            h = torch.empty(num_slots, inter, dtype=x_.dtype, device=x.device)
            o = torch.empty(num_slots, hidden, dtype=x_.dtype, device=x.device)  # ids outside [0, E): zeros, by the kernel
            launch_decode_gate_up(x_, None, w13_, None, h, ids, 0, dcfg, dot_precision)
            launch_decode_down(h, None, w2_, None, o, weights, ids, 0, dcfg, dot_precision)
            return launch_decode_combine(o, top_k, x.dtype)
    cfg = config or moe_config(num_slots, num_experts, hidden, inter, x.element_size())
    sorted_ids, expert_ids, total = moe_align(topk_ids.contiguous(), num_experts, cfg.block_m)
    n_tiles = expert_ids.numel()
    with interpreter_upcast((x, w13, w2)) as ((x_, w13_, w2_), _):
        h = torch.empty(num_slots, inter, dtype=x_.dtype, device=x.device)
        # Zeros: a slot of an id outside [0, E) is in no tile and must add nothing.
        o = torch.zeros(num_slots, hidden, dtype=x_.dtype, device=x.device)
        tiles = dict(DOT_PRECISION=dot_precision, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                     GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        _gate_up_kernel[(n_tiles * triton.cdiv(inter, cfg.block_n),)](
            x_, w13_, h, sorted_ids, expert_ids, total,
            num_slots, hidden, inter, n_tiles,
            x_.stride(0), w13_.stride(0), w13_.stride(1), h.stride(0),
            TOP_K=top_k, **tiles,
        )
        _down_kernel[(n_tiles * triton.cdiv(hidden, cfg.block_n),)](
            h, w2_, o, weights, sorted_ids, expert_ids, total,
            num_slots, hidden, inter, n_tiles,
            h.stride(0), w2_.stride(0), w2_.stride(1), o.stride(0),
            **tiles,
        )
        return o.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)


def _fused_moe_fake(x, w13, w2, topk_weights, topk_ids):
    return x.new_empty(x.shape)


fused_moe = register_op("fused_moe", launcher=fused_moe_triton, reference=fused_moe_ref, fake=_fused_moe_fake)
