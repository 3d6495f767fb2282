"""Fused mixture-of-experts MLP over FP8 (e4m3) expert weights with dequantization scales.

kernels/fused_moe.py's computation, with each expert's weights fp8 and their scales, and the
activations quantized at run time as kernels/fp8_gemm.py's dense FP8 linears are:

    xq, xs = quantize_fp8(x, G)                          # x [T, H] -> per token (G None) or 1x128 groups
    h[s]   = silu((xq[t] xs) @ (W1q[e] s1)^T) * ((xq[t] xs) @ (W3q[e] s3)^T)    s = t*k + j, e = ids[t, j]
    hq, hs = quantize_fp8(h.to(x.dtype), G)              # h [T*k, I], one row per slot
    y[t]   = sum_j w[t, j] * (hq[s] hs) @ (W2q[e] s2)^T

Shapes: x [T, H] bf16/fp16/fp32; w13 [E, 2I, H] and w2 [E, H, I] float8_e4m3fn (gate rows, then
up rows, as fused_moe); topk_weights [T, k] float, topk_ids [T, k] int32 (ids outside [0, E)
add nothing: expert parallelism). The scales are fp32 multipliers (real ~ fp8 * scale: the
checkpoints' `weight_scale` and DeepSeek-V3's `weight_scale_inv` alike); their shapes say the
granularity:

| granularity                  | w13_scale                     | w2_scale                     | activations (G)   |
|------------------------------|-------------------------------|------------------------------|-------------------|
| per output channel           | [E, 2I, 1]                    | [E, H, 1]                    | per token (None)  |
| 128x128 blocks (DeepSeek-V3, Qwen3-FP8) | [E, ceil(2I/128), ceil(H/128)] | [E, ceil(H/128), ceil(I/128)] | 1x128 groups (128) |

A per-tensor expert scale is a per-channel one repeated (QuantConfig FP8 makes it so:
passes/fuse_moe.py). Output [T, H] in x.dtype, contiguous.

How: T <= DECODE_MAX_TOKENS: kernels/fused_moe_decode.py's two GEMMs (each chosen expert read
once, no alignment); more tokens: moe_align's expert-sorted tiles and the two grouped GEMMs
below, as in fused_moe.py, with the fp8 tiles fed to tl.dot as they are (fp8 tensor cores,
sm_89+; an older GPU is refused by name), accumulating in fp32 and promoting every 128 of K
on sm_90 as fp8_gemm does. Per-channel scales multiply the accumulator once at the end
(token scale x channel scale); block scales multiply each 128-wide K step's partial product
by the row's group scale and the column's block scale. The activation quantizations are
kernels/quantize_fp8.py's op (two launches; not fused into the GEMMs yet). The combine is one
torch sum over k (fp32 accumulation), as in fused_moe.

Reference (`fused_moe_fp8_ref`): the formula above in fp32 with quantize_fp8_ref's
quantizations, h rounded to x.dtype before its quantization as the kernel stores it.
Configs: fused_moe's `moe_config` tiles (measured with bf16 experts; with block scales BLOCK_K divides 128).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from trtllm.kernels.fp8_gemm import FP8_DTYPE, FP8_PROMOTE_K, SCALE_BLOCK, dequantize_fp8
from trtllm.kernels.fused_moe import _FLOAT_DTYPES, MoeConfig, moe_config, tile_of
from trtllm.kernels.fused_moe_decode import (
    DECODE_MAX_TOKENS,
    DecodeConfig,
    decode_config,
    launch_decode_combine,
    launch_decode_down,
    launch_decode_gate_up,
)
from trtllm.kernels.moe_align import moe_align
from trtllm.kernels.quantize_fp8 import quantize_fp8, quantize_fp8_ref, require_fp8_gpu
from trtllm.kernels.registry import interpreter_upcast, register_op, triton_interpreter_on


def _check_args(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids) -> bool:
    """Shapes and dtypes as the docstring's table says; True for 128x128 block scales."""
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be [T, H] of {_FLOAT_DTYPES}, got {tuple(x.shape)} {x.dtype}")
    hidden = x.shape[1]
    if w13.dim() != 3 or w13.shape[2] != hidden or w13.shape[1] % 2 or w13.dtype != FP8_DTYPE:
        raise ValueError(f"w13 must be [E, 2I, H={hidden}] {FP8_DTYPE}, got {tuple(w13.shape)} {w13.dtype}")
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    if tuple(w2.shape) != (num_experts, hidden, inter) or w2.dtype != FP8_DTYPE:
        raise ValueError(f"w2 must be [E={num_experts}, H={hidden}, I={inter}] {FP8_DTYPE}, "
                         f"got {tuple(w2.shape)} {w2.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or topk_ids.dtype != torch.int32:
        raise ValueError(f"topk_ids must be [T={x.shape[0]}, k] int32, got {tuple(topk_ids.shape)} {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape or topk_weights.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"topk_weights must be float [T, k]={tuple(topk_ids.shape)}, "
                         f"got {tuple(topk_weights.shape)} {topk_weights.dtype}")
    for name, s in (("w13_scale", w13_scale), ("w2_scale", w2_scale)):
        if s.dtype != torch.float32 or not s.is_contiguous():
            raise ValueError(f"{name} must be contiguous fp32, got {s.dtype} strides {s.stride()}")
    per_channel = ((num_experts, 2 * inter, 1), (num_experts, hidden, 1))
    blocks = ((num_experts, -(-2 * inter // SCALE_BLOCK), -(-hidden // SCALE_BLOCK)),
              (num_experts, -(-hidden // SCALE_BLOCK), -(-inter // SCALE_BLOCK)))
    got = (tuple(w13_scale.shape), tuple(w2_scale.shape))
    if got not in (per_channel, blocks):
        raise ValueError(f"w13_scale, w2_scale of shapes {got[0]}, {got[1]}: expected per channel {per_channel[0]}, "
                         f"{per_channel[1]} or {SCALE_BLOCK}x{SCALE_BLOCK} blocks {blocks[0]}, {blocks[1]}")
    return got == blocks


def fused_moe_fp8_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor,
                      w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    block = _check_args(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids)
    group = SCALE_BLOCK if block else None
    act_block, w_block = ((1, SCALE_BLOCK), (SCALE_BLOCK, SCALE_BLOCK)) if block else (None, None)
    xq, xs = quantize_fp8_ref(x, group)
    xd = dequantize_fp8(xq, xs, act_block)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        token_idx, pos = torch.where(topk_ids == e)
        if token_idx.numel() == 0:
            continue
        gate, up = F.linear(xd[token_idx], dequantize_fp8(w13[e], w13_scale[e], w_block)).chunk(2, dim=-1)
        hq, hs = quantize_fp8_ref((F.silu(gate) * up).to(x.dtype), group)
        h = F.linear(dequantize_fp8(hq, hs, act_block), dequantize_fp8(w2[e], w2_scale[e], w_block))
        out.index_add_(0, token_idx, h * topk_weights[token_idx, pos, None].float())
    return out.to(x.dtype)


@triton.jit
def _fp8_gate_up_kernel(
    x_ptr, xs_ptr, w13_ptr, ws_ptr, h_ptr,
    sorted_ids_ptr, expert_ids_ptr, total_ptr,
    num_slots, hidden, inter, num_tiles,
    x_row_stride, xs_row_stride, w13_expert_stride, w13_row_stride, ws_expert_stride, ws_row_stride,
    h_row_stride,
    TOP_K: tl.constexpr, BLOCK_SCALES: tl.constexpr, SCALE_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, MAX_IMPRECISE_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grid: (row tiles x cdiv(I, BLOCK_N),), as fused_moe's _gate_up_kernel, over fp8 x and W13.
    pid_m, pid_n = tile_of(num_tiles, tl.cdiv(inter, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    slots = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = slots < num_slots
    tokens = tl.minimum(slots // TOP_K, num_slots // TOP_K - 1).to(tl.int64)  # padding rows read token T-1
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.minimum(offs_n, inter - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * x_row_stride + offs_k[None, :]
    wg_ptrs = w13_ptr + e * w13_expert_stride + cols[None, :] * w13_row_stride + offs_k[:, None]
    wu_ptrs = wg_ptrs + inter * w13_row_stride
    ws_row = ws_ptr + e * ws_expert_stride
    if BLOCK_SCALES:
        wsg_ptrs = ws_row + (cols // SCALE_BLOCK) * ws_row_stride
        wsu_ptrs = ws_row + ((cols + inter) // SCALE_BLOCK) * ws_row_stride
        xs_ptrs = xs_ptr + tokens * xs_row_stride
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = (k0 + offs_k) < hidden
        xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        wg = tl.load(wg_ptrs, mask=k_ok[:, None], other=0.0)
        wu = tl.load(wu_ptrs, mask=k_ok[:, None], other=0.0)
        if BLOCK_SCALES:
            kb = k0 // SCALE_BLOCK
            xs = tl.load(xs_ptrs + kb)[:, None]
            pg = tl.dot(xt, wg, input_precision=DOT_PRECISION, max_num_imprecise_acc=MAX_IMPRECISE_ACC)
            pu = tl.dot(xt, wu, input_precision=DOT_PRECISION, max_num_imprecise_acc=MAX_IMPRECISE_ACC)
            acc_gate += pg * xs * tl.load(wsg_ptrs + kb)[None, :]
            acc_up += pu * xs * tl.load(wsu_ptrs + kb)[None, :]
        else:
            acc_gate = tl.dot(xt, wg, acc_gate, input_precision=DOT_PRECISION, max_num_imprecise_acc=MAX_IMPRECISE_ACC)
            acc_up = tl.dot(xt, wu, acc_up, input_precision=DOT_PRECISION, max_num_imprecise_acc=MAX_IMPRECISE_ACC)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    if not BLOCK_SCALES:
        xs = tl.load(xs_ptr + tokens * xs_row_stride)[:, None]
        acc_gate *= xs * tl.load(ws_row + cols * ws_row_stride)[None, :]
        acc_up *= xs * tl.load(ws_row + (cols + inter) * ws_row_stride)[None, :]
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    h_ptrs = h_ptr + slots.to(tl.int64)[:, None] * h_row_stride + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < inter))


@triton.jit
def _fp8_down_kernel(
    h_ptr, hs_ptr, w2_ptr, ws_ptr, o_ptr, weights_ptr,
    sorted_ids_ptr, expert_ids_ptr, total_ptr,
    num_slots, hidden, inter, num_tiles,
    h_row_stride, hs_row_stride, w2_expert_stride, w2_row_stride, ws_expert_stride, ws_row_stride,
    o_row_stride,
    BLOCK_SCALES: tl.constexpr, SCALE_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, MAX_IMPRECISE_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grid: (row tiles x cdiv(H, BLOCK_N),). o[s] = w[s] * (hq[s] hs[s]) @ (W2q[e] s2)^T.
    pid_m, pid_n = tile_of(num_tiles, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    slots = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = slots < num_slots
    rows = tl.minimum(slots, num_slots - 1).to(tl.int64)  # padding rows read the last slot, store nothing
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.minimum(offs_n, hidden - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * h_row_stride + offs_k[None, :]
    w_ptrs = w2_ptr + e * w2_expert_stride + cols[None, :] * w2_row_stride + offs_k[:, None]
    ws_row = ws_ptr + e * ws_expert_stride
    if BLOCK_SCALES:
        ws_ptrs = ws_row + (cols // SCALE_BLOCK) * ws_row_stride
        hs_ptrs = hs_ptr + rows * hs_row_stride
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_ok = (k0 + offs_k) < inter
        ht = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if BLOCK_SCALES:
            kb = k0 // SCALE_BLOCK
            part = tl.dot(ht, w, input_precision=DOT_PRECISION, max_num_imprecise_acc=MAX_IMPRECISE_ACC)
            acc += part * tl.load(hs_ptrs + kb)[:, None] * tl.load(ws_ptrs + kb)[None, :]
        else:
            acc = tl.dot(ht, w, acc, input_precision=DOT_PRECISION, max_num_imprecise_acc=MAX_IMPRECISE_ACC)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if not BLOCK_SCALES:
        acc *= tl.load(hs_ptr + rows * hs_row_stride)[:, None] * tl.load(ws_row + cols * ws_row_stride)[None, :]
    acc *= tl.load(weights_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    o_ptrs = o_ptr + slots.to(tl.int64)[:, None] * o_row_stride + offs_n[None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < hidden))


def _tile_config(num_slots: int, num_experts: int, hidden: int, inter: int, block: bool) -> MoeConfig:
    cfg = moe_config(num_slots, num_experts, hidden, inter, element_size=1)
    if block and SCALE_BLOCK % cfg.block_k:
        cfg = cfg._replace(block_k=SCALE_BLOCK)
    return cfg


def fused_moe_fp8_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor,
                         w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                         *, config: MoeConfig | None = None, decode: bool | None = None,
                         decode_cfg: DecodeConfig | None = None) -> torch.Tensor:
    """decode: the few-token path (kernels/fused_moe_decode.py); None: for T <= DECODE_MAX_TOKENS
    unless a tile `config` is given. decode_cfg: the decode path's tiles (default `decode_config`)."""
    block = _check_args(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids)
    for t, name in ((x, "x"), (w13, "w13"), (w2, "w2")):
        assert t.stride(-1) == 1, f"{name}: last dim must be contiguous"
        assert t.device == x.device, f"{name} on {t.device}, x on {x.device}"
    num_tokens, hidden = x.shape
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    num_slots = num_tokens * top_k
    if num_slots == 0:
        return torch.zeros_like(x)
    require_fp8_gpu(x.device, "fused_moe_fp8")
    group = SCALE_BLOCK if block else None
    scales = 2 if block else 1
    ids, weights = topk_ids.contiguous(), topk_weights.contiguous()
    dot_precision = "ieee" if triton_interpreter_on() else "tf32"  # fp8 operands: ignored on the GPU
    xq, xs = quantize_fp8(x, group)
    h = torch.empty(num_slots, inter, dtype=x.dtype, device=x.device)
    if decode is None:
        decode = num_tokens <= DECODE_MAX_TOKENS and config is None
    # Slots of ids outside [0, E) must add zeros: the decode kernel writes them, tiles skip them.
    o = (torch.empty if decode else torch.zeros)(num_slots, hidden, dtype=x.dtype, device=x.device)
    if decode:
        dcfg = decode_cfg or decode_config(hidden, inter, block_scales=block)
        with interpreter_upcast((xq, w13), (h,)) as ((xq_, w13_), (h_,)):
            launch_decode_gate_up(xq_, xs, w13_, w13_scale, h_, ids, scales, dcfg, dot_precision)
        hq, hs = quantize_fp8(h, group)
        with interpreter_upcast((hq, w2), (o,)) as ((hq_, w2_), (o_,)):
            launch_decode_down(hq_, hs, w2_, w2_scale, o_, weights, ids, scales, dcfg, dot_precision)
        return launch_decode_combine(o, top_k, x.dtype)
    cfg = config or _tile_config(num_slots, num_experts, hidden, inter, block)
    assert not block or SCALE_BLOCK % cfg.block_k == 0, f"block_k {cfg.block_k} must divide {SCALE_BLOCK}"
    sorted_ids, expert_ids, total = moe_align(ids, num_experts, cfg.block_m)
    tiles = dict(BLOCK_SCALES=block, SCALE_BLOCK=SCALE_BLOCK, DOT_PRECISION=dot_precision,
                 MAX_IMPRECISE_ACC=min(cfg.block_k, FP8_PROMOTE_K), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                 BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    n_tiles = expert_ids.numel()
    with interpreter_upcast((xq, w13), (h,)) as ((xq_, w13_), (h_,)):
        _fp8_gate_up_kernel[(n_tiles * triton.cdiv(inter, cfg.block_n),)](
            xq_, xs, w13_, w13_scale, h_, sorted_ids, expert_ids, total,
            num_slots, hidden, inter, n_tiles,
            xq_.stride(0), xs.stride(0), w13_.stride(0), w13_.stride(1), w13_scale.stride(0), w13_scale.stride(1),
            h_.stride(0), TOP_K=top_k, **tiles,
        )
    hq, hs = quantize_fp8(h, group)
    with interpreter_upcast((hq, w2), (o,)) as ((hq_, w2_), (o_,)):
        _fp8_down_kernel[(n_tiles * triton.cdiv(hidden, cfg.block_n),)](
            hq_, hs, w2_, w2_scale, o_, weights, sorted_ids, expert_ids, total,
            num_slots, hidden, inter, n_tiles,
            hq_.stride(0), hs.stride(0), w2_.stride(0), w2_.stride(1), w2_scale.stride(0), w2_scale.stride(1),
            o_.stride(0), **tiles,
        )
    return o.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)


def _fused_moe_fp8_fake(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids):
    return x.new_empty(x.shape)


fused_moe_fp8 = register_op("fused_moe_fp8", launcher=fused_moe_fp8_triton, reference=fused_moe_fp8_ref,
                            fake=_fused_moe_fp8_fake)
