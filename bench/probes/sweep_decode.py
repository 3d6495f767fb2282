"""Decode attention at small batch: where does the time go? A config sweep, graph-timed.

    PYTHONPATH=$PWD python bench/probes/sweep_decode.py
    PYTHONPATH=$PWD python bench/probes/sweep_decode.py --heads 4,1,256 --cases 1:128,1:512,64:512

For b8 x ctx2048 (the shape issue 2 misses) and its neighbours (or, with --heads
Hq,Hkv,D and --cases batch:ctx,..., other heads and shapes): every (BLOCK_N, num_warps,
num_stages) x splits, with random page tables and with contiguous ones
(isolates the cost of the block-table -> K/V dependent load), each checked against
`paged_attention_ref` first. GB/s counts the K+V cache bytes read, as bench_attention.py.
Table last; $OUT/sweep_decode.{md,json}.
"""
import argparse
import functools
import sys

import torch

from bench import bench_attention
from bench.bench_attention import BS, DEV, HKV, REL_TOL, D, graphed, make_inputs, ms, rel_error
from bench.report import report
from trtllm.kernels import paged_attention as pa
from trtllm.kernels.paged_attention import launch_shape

CONFIGS = [(16, 4, 2), (16, 4, 3), (16, 4, 5), (32, 4, 2), (32, 4, 3), (32, 4, 5), (64, 4, 3), (64, 4, 5),
           (64, 8, 3), (64, 8, 5), (128, 8, 2), (128, 8, 3), (128, 4, 2)]
SPLITS = (2, 4, 8, 16)
FOLLOW_SPLITS = (1, 2, 4, 8, 16, 32)


def contiguous(args):
    """The same inputs with block tables 0, 1, 2, ... (pages in address order)."""
    a = list(args)
    bt = args[7]
    a[7] = torch.arange(bt.numel(), device=bt.device, dtype=bt.dtype).view_as(bt)
    return a


def run_case(batch, ctx, configs, splits_list, tables=("random",)):
    rows = []
    args0 = make_inputs([(ctx - 1, 1)] * batch, seed=batch * 7 + ctx)
    nbytes = batch * ctx * HKV * D * 4
    default = launch_shape.num_splits(batch, HKV, ctx, args0[0].device)
    default_cfg = launch_shape.decode_config(D, 2, default, launch_shape.merges_in_cluster(default, args0[0].device))
    for table in tables:
        args = args0 if table == "random" else contiguous(args0)
        for cfg in configs:
            for splits in splits_list:
                if splits > max(1, ctx // cfg[0]):
                    continue
                launch = pa.DecodeLaunch(splits, launch_shape.merges_in_cluster(splits, args[0].device), *cfg)
                try:
                    e = rel_error(args, launch)
                    t = ms(graphed(functools.partial(pa.launch_paged_attention, *args, launch=launch)))
                except Exception as ex:  # noqa: BLE001 - e.g. out of shared memory
                    print(f"  b{batch} ctx{ctx} {cfg} x{splits}: {type(ex).__name__}: {str(ex)[:80]}",
                          file=sys.stderr)
                    continue
                row = dict(batch=batch, ctx=ctx, table=table, config=list(cfg), splits=splits,
                           us=t * 1e3, gbs=nbytes / t / 1e6, rel_err=e, ok=e < REL_TOL,
                           is_default=(cfg == default_cfg and splits == default))
                rows.append(row)
                print(f"b{batch} ctx{ctx} {table:6s} {cfg} x{splits:2d}: {row['us']:6.1f} us "
                      f"{row['gbs']:6.0f} GB/s err {e:.1e}", flush=True)
    return rows


HEADS_CONFIGS = [(bn, w, st) for bn in (16, 32, 64) for w in (4, 8) for st in (2, 3)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", help="Hq,Hkv,D (default Llama-3-8B's 32,8,128)")
    ap.add_argument("--cases", default="1:128,1:512,1:2048,64:512", help="with --heads: batch:ctx,...")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.heads:
        sweep_heads(args)
        return
    rows = run_case(8, 2048, CONFIGS, SPLITS, tables=("random", "contiguous"))
    best = sorted((r for r in rows if r["table"] == "random" and r["ok"]), key=lambda r: r["us"])[:6]
    finalists = [tuple(r["config"]) for r in best]
    for batch, ctx in ((1, 512), (1, 2048), (1, 8192), (8, 512), (8, 8192), (64, 2048)):
        defaults = [launch_shape.decode_config(D, 2, 1), launch_shape.decode_config(D, 2, 2),
                    launch_shape.decode_config(D, 2, 2, True)]
        rows += run_case(batch, ctx, sorted(set(finalists + defaults)), FOLLOW_SPLITS)
    lines = ["| batch | ctx | table | config (BLOCK_N, warps, stages) | splits | us | GB/s | % of 3.0 TB/s | err | default |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---|"]
    by_shape = {}
    for r in rows:
        by_shape.setdefault((r["batch"], r["ctx"], r["table"]), []).append(r)
    for rs in by_shape.values():
        rs = sorted(rs, key=lambda r: r["us"])
        shown = rs[:5] + [r for r in rs[5:] if r["is_default"]]
        for r in shown:
            lines.append(f"| {r['batch']} | {r['ctx']} | {r['table']} | {tuple(r['config'])} | {r['splits']} | "
                         f"{r['us']:.1f} | {r['gbs']:.0f} | {r['gbs'] / 30:.0f}% | {r['rel_err']:.1e} | "
                         f"{'default' if r['is_default'] else ''} |")
    report("sweep_decode", "\n".join(lines), dict(device=torch.cuda.get_device_name(), page=BS, rows=rows))


def sweep_heads(args):
    """Every HEADS_CONFIGS x FOLLOW_SPLITS on the given heads and cases (bench_attention's
    inputs reshaped through its module constants)."""
    global HKV, D
    hq, hkv, d = (int(v) for v in args.heads.split(","))
    bench_attention.HQ, bench_attention.HKV, bench_attention.D = hq, hkv, d
    HKV, D = hkv, d
    rows = []
    for case in args.cases.split(","):
        batch, ctx = (int(v) for v in case.split(":"))
        configs = sorted(set(HEADS_CONFIGS) | {launch_shape.decode_config(d, 2, s) for s in (1, 2)})
        rows += run_case(batch, ctx, configs, FOLLOW_SPLITS)
    lines = [f"Hq={hq} Hkv={hkv} D={d}, page {BS}", "",
             "| batch | ctx | config (BLOCK_N, warps, stages) | splits | us | GB/s | err | default |",
             "|---:|---:|---|---:|---:|---:|---:|---|"]
    by_shape = {}
    for r in rows:
        by_shape.setdefault((r["batch"], r["ctx"]), []).append(r)
    for (batch, ctx), rs in by_shape.items():
        rs = sorted(rs, key=lambda r: r["us"])
        for r in rs[:6] + [r for r in rs[6:] if r["is_default"]]:
            lines.append(f"| {batch} | {ctx} | {tuple(r['config'])} | {r['splits']} | {r['us']:.1f} | {r['gbs']:.0f} "
                         f"| {r['rel_err']:.1e} | {'default' if r['is_default'] else ''} |")
        for s in FOLLOW_SPLITS:  # the default tiles at each split count: what a graph captured for another length runs
            cfg = launch_shape.decode_config(d, 2, s, launch_shape.merges_in_cluster(s, DEV))
            hit = [r for r in rs if tuple(r["config"]) == cfg and r["splits"] == s]
            if hit:
                lines.append(f"| {batch} | {ctx} | default tiles {cfg} | {s} | {hit[0]['us']:.1f} | "
                             f"{hit[0]['gbs']:.0f} | | at {s} splits |")
    report(f"sweep_decode_{hq}_{hkv}_{d}", "\n".join(lines), dict(device=torch.cuda.get_device_name(), rows=rows))


if __name__ == "__main__":
    main()
