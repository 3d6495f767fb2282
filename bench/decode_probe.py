"""What caps one program's read rate in the decode loop? The loop, taken apart.

    PYTHONPATH=$PWD python bench/decode_probe.py [--softmax]   (from the repo root, CUDA only)

decode_timeline.py found one program per (sequence, kv head) reading at most ~27 GB/s
(b8 x 2048, 1 split, 64 programs), whatever its stages. This streams the same paged K/V
(block table -> 64-row tiles of one kv head, page 16) through three loop bodies of
growing weight, at 1 and 2 splits, per layer in a 32-layer CUDA graph (read-only L2
flush before each replay), and prints per-program GB/s:
  load: K and V tiles summed into an fp32 accumulator (the memory side alone);
  dots: q K^T and P V with tl.dot, no softmax;
  attention: the decode kernel itself (for reference);
  --softmax: the decode loop's online softmax without the merge, as [16, BLOCK_N] tiles
  (2d: the kernel's) or as W warp slices of NSUB positions (3d: batched dots, the row
  reductions inside a warp), each 3d output checked against the 2d one.
Checked: `load` against torch sums of the same tiles. Table last; $OUT/decode_probe.{md,json}.
"""
import math
import sys

import torch
import triton
import triton.language as tl

from bench.bench_attention import D, HKV, graphed, make_inputs, ms_read_flush
from bench.report import report
from trtllm.kernels import paged_attention as pa
from trtllm.kernels.paged_attention.decode import context_range
from trtllm.kernels.paged_attention.launch_shape import merges_in_cluster
from trtllm.kernels.paged_attention.tiles import attend

LAYERS = 32
BATCH, CTX = 8, 2048


@triton.jit
def _program_span(L, bt_ptr, stride_bt, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """This program's kv head, its sequence's block-table row and its share of the
    context, split as the decode kernel splits it: (kvh, bt_row, j_start, j_end)."""
    _, j_start, j_end = context_range(L, 0, tl.program_id(2), BLOCK_N, NUM_SPLITS)
    return tl.program_id(0), bt_ptr + tl.program_id(1).to(tl.int64) * stride_bt, j_start, j_end


@triton.jit
def _out_row(NUM_SPLITS: tl.constexpr):
    """This program's (sequence, kv head, split) row of the output."""
    return (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * NUM_SPLITS + tl.program_id(2)


@triton.jit
def _store_out(out_ptr, out, HEAD_D: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """One program's normalized [16, HEAD_D] output, at its (sequence, kv head, split) row."""
    row = _out_row(NUM_SPLITS)
    offs_g = tl.arange(0, 16)
    offs_d = tl.arange(0, HEAD_D)
    tl.store(out_ptr + row * 16 * HEAD_D + offs_g[:, None] * HEAD_D + offs_d[None, :], out)


@triton.jit
def _load_kv(kc_ptr, vc_ptr, bt_row, j, j_ok, head_off, stride_cb, stride_cs, offs_d, PAGE: tl.constexpr):
    """The K and V rows of positions j (one kv head) through the block table."""
    page = tl.load(bt_row + j // PAGE, mask=j_ok, other=0).to(tl.int64)
    off = page[:, None] * stride_cb + (j % PAGE)[:, None] * stride_cs + head_off + offs_d[None, :]
    k = tl.load(kc_ptr + off, mask=j_ok[:, None], other=0.0)
    return k, tl.load(vc_ptr + off, mask=j_ok[:, None], other=0.0)


@triton.jit
def _probe_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, out_ptr, L,
                  stride_cb, stride_cs, stride_ch, stride_bt,
                  PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, DOTS: tl.constexpr):
    kvh, bt_row, j_start, j_end = _program_span(L, bt_ptr, stride_bt, BLOCK_N, NUM_SPLITS)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    if DOTS:
        q = tl.load(q_ptr + tl.arange(0, 16)[:, None] * HEAD_D + offs_d[None, :])
        acc = tl.zeros([16, HEAD_D], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    for j0 in range(j_start, j_end, BLOCK_N):
        j = j0 + offs_n
        j_ok = j < j_end
        k, v = _load_kv(kc_ptr, vc_ptr, bt_row, j, j_ok, kvh * stride_ch, stride_cb, stride_cs, offs_d,
                        PAGE)
        if DOTS:
            p = tl.dot(q, tl.trans(k))
            acc += tl.dot(p.to(v.dtype), v)
        else:
            acc += k.to(tl.float32) + v.to(tl.float32)
    tl.store(out_ptr + _out_row(NUM_SPLITS), tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _softmax2d_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, out_ptr, L, qk_scale,
                      stride_cb, stride_cs, stride_ch, stride_bt,
                      PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
                      NUM_SPLITS: tl.constexpr):
    """The decode kernel's loop as it is ([16, BLOCK_N] scores: the row max and sum
    reduce across warps every tile), normalized output per program, no merge."""
    kvh, bt_row, j_start, j_end = _program_span(L, bt_ptr, stride_bt, BLOCK_N, NUM_SPLITS)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    offs_g = tl.arange(0, 16)
    q = tl.load(q_ptr + offs_g[:, None] * HEAD_D + offs_d[None, :])
    m_i = tl.full([16], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([16], dtype=tl.float32)
    acc = tl.zeros([16, HEAD_D], dtype=tl.float32)
    for j0 in range(j_start, j_end, BLOCK_N):
        j = j0 + offs_n
        j_ok = j < j_end
        k, v = _load_kv(kc_ptr, vc_ptr, bt_row, j, j_ok, kvh * stride_ch, stride_cb, stride_cs, offs_d,
                        PAGE)
        acc, m_i, l_i = attend(acc, m_i, l_i, q, k, v, qk_scale, j_ok[None, :], True, "tf32", False)
    _store_out(out_ptr, acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None], HEAD_D, NUM_SPLITS)


@triton.jit
def _softmax3d_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, out_ptr, L, qk_scale,
                      stride_cb, stride_cs, stride_ch, stride_bt,
                      PAGE: tl.constexpr, W: tl.constexpr, NSUB: tl.constexpr, HEAD_D: tl.constexpr,
                      NUM_SPLITS: tl.constexpr):
    """Each tile as W slices of NSUB positions, a batched dot per slice ([W, 16, NSUB]
    scores, one warp per slice): the row max and sum stay inside a warp; each slice
    keeps its own (m, l, acc), merged once after the loop."""
    BLOCK_N: tl.constexpr = W * NSUB
    kvh, bt_row, j_start, j_end = _program_span(L, bt_ptr, stride_bt, BLOCK_N, NUM_SPLITS)
    offs_w = tl.arange(0, W)
    offs_n = tl.arange(0, NSUB)
    offs_d = tl.arange(0, HEAD_D)
    offs_g = tl.arange(0, 16)
    q2 = tl.load(q_ptr + offs_g[:, None] * HEAD_D + offs_d[None, :])
    q = tl.broadcast_to(q2[None, :, :], [W, 16, HEAD_D])
    m_i = tl.full([W, 16], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([W, 16], dtype=tl.float32)
    acc = tl.zeros([W, 16, HEAD_D], dtype=tl.float32)
    for j0 in range(j_start, j_end, BLOCK_N):
        j = j0 + offs_w[:, None] * NSUB + offs_n[None, :]  # [W, NSUB]
        j_ok = j < j_end
        page = tl.load(bt_row + j // PAGE, mask=j_ok, other=0).to(tl.int64)
        off = page[:, :, None] * stride_cb + (j % PAGE)[:, :, None] * stride_cs + kvh * stride_ch \
            + offs_d[None, None, :]
        k = tl.load(kc_ptr + off, mask=j_ok[:, :, None], other=0.0)  # [W, NSUB, D]
        v = tl.load(vc_ptr + off, mask=j_ok[:, :, None], other=0.0)
        qk = tl.dot(q, tl.permute(k, (0, 2, 1))) * qk_scale  # [W, 16, NSUB]
        qk = tl.where(j_ok[:, None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 2))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, :, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 2)
        acc = acc * alpha[:, :, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    m_max = tl.max(m_i, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    scale = tl.math.exp2(m_i - m_max[None, :])  # [W, 16]
    l_tot = tl.sum(l_i * scale, 0)
    acc_tot = tl.sum(acc * scale[:, :, None], 0)
    _store_out(out_ptr, acc_tot / tl.where(l_tot == 0.0, 1.0, l_tot)[:, None], HEAD_D, NUM_SPLITS)


SOFTMAX_CONFIGS = [("2d", 64, 8, 5), ("2d", 64, 4, 5), ("3d", (4, 16), 4, 5), ("3d", (4, 16), 4, 8),
                   ("3d", (8, 16), 8, 4), ("3d", (8, 16), 8, 5), ("3d", (4, 32), 4, 4), ("3d", (8, 8), 8, 5)]


def softmax_rows(q, kc_all, vc_all, bt, nbytes, failures):
    """The 2-D and 3-D softmax loops at 1 and 2 splits; every 3-D output against the 2-D."""
    rows = []
    scale = D ** -0.5 * 1.4426950408889634
    for splits in (1, 2):
        ref = None
        for kind, tile, warps, stages in SOFTMAX_CONFIGS:
            out = torch.zeros(LAYERS, BATCH * HKV * splits * 16, D, dtype=torch.float32, device="cuda")

            def launch(layer):
                kc, vc = kc_all[layer], vc_all[layer]
                common = (q, kc, vc, bt, out[layer], CTX - 1, scale, kc.stride(0), kc.stride(1),
                          kc.stride(2), bt.stride(0))
                if kind == "2d":
                    _softmax2d_kernel[(HKV, BATCH, splits)](*common, PAGE=kc.shape[1], BLOCK_N=tile,
                                                            HEAD_D=D, NUM_SPLITS=splits,
                                                            num_warps=warps, num_stages=stages)
                else:
                    _softmax3d_kernel[(HKV, BATCH, splits)](*common, PAGE=kc.shape[1], W=tile[0],
                                                            NSUB=tile[1], HEAD_D=D, NUM_SPLITS=splits,
                                                            num_warps=warps, num_stages=stages)
            try:
                launch(0)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory, unsupported layout
                print(f"softmax {kind} {tile} {warps}w {stages}s: {type(e).__name__}: {str(e)[:160]}")
                continue
            if kind == "2d" and ref is None:
                ref = out[0].clone()
            if ref is not None and kind == "3d":
                err = ((out[0] - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    failures.append(f"softmax3d {tile} splits {splits}: rel err {err:.2e}")
            rows.append(timed_row(launch, splits, f"softmax{kind} {tile}", warps, stages, nbytes))
    return rows


def main():
    torch.manual_seed(0)
    args = make_inputs([(CTX - 1, 1)] * BATCH, seed=5, layers=LAYERS)
    q, kc_all, vc_all, bt = args[0], args[3], args[4], args[7]
    nbytes = BATCH * CTX * HKV * D * 2 * q.element_size()
    rows, failures = [], []
    if "--softmax" in sys.argv:
        rows += softmax_rows(q, kc_all, vc_all, bt, nbytes, failures)
    for splits in (1, 2):
        out = torch.zeros(LAYERS, BATCH * HKV * splits, dtype=torch.float32, device="cuda")
        for dots in (False, True):
            for warps, stages in ((4, 3), (4, 5), (8, 5), (8, 6), (8, 8)):
                def launch(layer):
                    kc, vc = kc_all[layer], vc_all[layer]
                    _probe_kernel[(HKV, BATCH, splits)](
                        q, kc, vc, bt, out[layer], CTX - 1, kc.stride(0), kc.stride(1), kc.stride(2),
                        bt.stride(0), PAGE=kc.shape[1], BLOCK_N=64, HEAD_D=D, NUM_SPLITS=splits,
                        DOTS=dots, num_warps=warps, num_stages=stages)
                try:
                    launch(0)
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                    print(f"splits {splits} dots {dots} {warps}w {stages}s: {type(e).__name__}: {str(e)[:80]}")
                    continue
                if not dots:  # each program's sum of its K and V elements
                    torch.cuda.synchronize()
                    err = (out[0] - program_sums(kc_all[0], vc_all[0], bt, CTX - 1, splits)).abs().max().item()
                    if not err < 1.0:  # a program's sum of 262K N(0,1) values has std ~512
                        failures.append(f"load probe splits {splits}: max error {err:.3g}")
                rows.append(timed_row(launch, splits, "dots" if dots else "load", warps, stages, nbytes))
    for splits in (1, 2):
        def attention(layer, splits=splits):
            default = pa.decode_launch(splits, merges_in_cluster(splits, args[0].device), D, args[0].element_size())
            pa.launch_paged_attention(*args[:5], layer, *args[6:], default)
        rows.append(timed_row(attention, splits, "attention", "default", "default", nbytes))
    lines = ["| splits | body | warps | stages | us/layer | GB/s | GB/s per program |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['splits']} | {r['body']} | {r['warps']} | {r['stages']} | {r['us']:.2f} | "
                     f"{r['gbs']:.0f} | {r['gbs_per_program']:.1f} |")
    if failures:
        lines.append("\nFAILED: " + "; ".join(failures))
    report("decode_probe", "\n".join(lines), dict(rows=rows, failures=failures))
    if failures:
        raise SystemExit(1)


def timed_row(launch, splits, body, warps, stages, nbytes):
    """launch(layer) for every layer in one CUDA graph, read-flushed: one layer's time."""
    us = ms_read_flush(graphed(lambda: [launch(layer) for layer in range(LAYERS)]), reps=30) / LAYERS * 1e3
    row = dict(splits=splits, body=body, warps=warps, stages=stages, us=us, gbs=nbytes / us / 1e3,
               gbs_per_program=nbytes / us / 1e3 / (BATCH * HKV * splits))
    print(row, flush=True)
    return row


def program_sums(kc, vc, bt, n, splits, block_n=64):
    """Per (sequence, kv head, split) program: the sum of its K and V elements over
    positions [0, n), split as the probe kernel splits them."""
    page = kc.shape[1]
    pos = torch.arange(n, device=kc.device)
    pages, offs = bt[:, pos // page].long(), pos % page
    per_pos = (kc[pages, offs].float() + vc[pages, offs].float()).sum(-1)  # [B, n, Hkv]
    per = math.ceil(math.ceil(n / block_n) / splits) * block_n  # context_range's split
    sums = [per_pos[:, k * per:(k + 1) * per].sum(1) for k in range(splits)]  # [B, Hkv] each
    return torch.stack(sums, -1).flatten()


if __name__ == "__main__":
    main()
