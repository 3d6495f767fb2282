"""Decode attention at small batch: where does the time go? A config sweep, graph-timed.

    PYTHONPATH=$PWD python bench/probes/sweep_decode.py

For b8 x ctx2048 (the shape issue 2 misses) and its neighbours: every (BLOCK_N,
num_warps, num_stages) x splits, with random page tables and with contiguous ones
(isolates the cost of the block-table -> K/V dependent load), each checked against
`paged_attention_ref` first. GB/s counts the K+V cache bytes read, as bench_attention.py.
Table last; $OUT/sweep_decode.{md,json}.
"""
import functools
import sys

import torch

from bench.bench_attention import BS, HKV, REL_TOL, D, graphed, make_inputs, ms, rel_error
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
                    t = ms(graphed(functools.partial(pa.launch_paged_attention, *args, launch)))
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


def main():
    torch.manual_seed(0)
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


if __name__ == "__main__":
    main()
