"""Decode attention, phase by phase: where each launch's fixed cost goes.

    PYTHONPATH=$PWD python bench/probes/decode_timeline.py [--b8-configs]   (repo root, CUDA only)

Per layer inside one CUDA graph of up to 32 layers' calls (bench_attention's
`graphed_layers` situation, read-only L2 flush before each replay), the decode kernel
runs with TRACE on: every program stamps %globaltimer (ns, comparable across SMs) and
%clock64 at
  0 entry, 1 its sequence length known (metadata loaded), 2 its K/V loop done,
  3 its split ticket back (split grids; with the cluster merge: past the cluster barrier,
  or arrived at it for the program that does not merge), 4 exit (after the merge, for
  the merging program),
so one replay shows: dispatch skew (first to last program start), metadata latency, loop
time and per-program GB/s, ticket and merge time, the tail (last exit minus median exit),
and the gap from one layer's last exit to the next layer's first entry. The same graph
without TRACE gives the untraced per-layer time (how much the stamps perturb), and a
graph of 32 near-empty kernels on the same grid gives the floor a launch costs in a graph.
--b8-configs: b8 x 2048 only, over splits and (BLOCK_N, warps, stages) configs.
Every traced case is first checked against `paged_attention_ref`.
Table last; $OUT/decode_timeline.{md,json}.
"""
import statistics
import sys

import torch
import triton
import triton.language as tl

from bench.bench_attention import HKV, REL_TOL, D, graphed, graphed_layers, make_inputs, ms_read_flush, rel_error
from bench.report import report
from trtllm.kernels import paged_attention as pa
from trtllm.kernels.paged_attention import launch_shape, trace as pa_trace

SHAPES = [(8, 2048), (8, 512), (1, 512), (1, 2048), (1, 8192), (8, 8192), (64, 2048)]
B8_CONFIGS = [(2, None), (3, None), (4, None), (2, (64, 4, 5)), (4, (64, 4, 5)), (2, (64, 8, 4)),
              (4, (64, 4, 4)), (8, (64, 4, 3)), (1, (64, 8, 5))]
LAYERS = 32


@triton.jit
def _touch_kernel(seq_lens_ptr, out_ptr):
    """The floor: one program per (kv head, sequence, split) loads its length and writes."""
    s = tl.program_id(1)
    tl.store(out_ptr + s * tl.num_programs(0) + tl.program_id(0), tl.load(seq_lens_ptr + s))


def per_layer_us(replay, layers):
    return ms_read_flush(replay, reps=50) / layers * 1e3


def timeline(trace, layers, bytes_per_program):
    """trace [layers, P, SLOTS] int64 -> medians over layers 1.. of each phase (us)."""
    t = trace.double()
    ns = t[..., 0:10:2]  # globaltimer at stamps 0..4
    stats = dict(skew=[], meta=[], loop=[], loop_max=[], ticket=[], merge=[], tail=[], span=[],
                 gap=[], loop_gbs=[])
    for layer in range(1, layers):
        st, meta_at, loop_at, ticket_at, end = (ns[layer, :, k] for k in range(5))
        ran = end > 0  # programs of unused rows return before stamping
        st, meta_at, loop_at, ticket_at, end = st[ran], meta_at[ran], loop_at[ran], ticket_at[ran], end[ran]
        loop = (loop_at - meta_at) / 1e3
        stats["skew"].append((st.max() - st.min()).item() / 1e3)
        stats["meta"].append(((meta_at - st) / 1e3).median().item())
        stats["loop"].append(loop.median().item())
        stats["loop_max"].append(loop.max().item())
        stats["loop_gbs"].append(bytes_per_program / loop.median().item() / 1e3)
        if (ticket_at > 0).any():
            stats["ticket"].append(((ticket_at - loop_at) / 1e3).median().item())
            stats["merge"].append(((end - ticket_at) / 1e3).max().item())
        stats["tail"].append((end.max() - end.median()).item() / 1e3)
        stats["span"].append((end.max() - st.min()).item() / 1e3)
        if layer + 1 < layers:
            nxt = ns[layer + 1, :, 0]
            stats["gap"].append((nxt[nxt > 0].min() - end.max()).item() / 1e3)
    out = {k: statistics.median(v) for k, v in stats.items() if v}
    ticks = torch.diff(torch.unique(ns[1:].flatten()))
    out["timer_step_ns"] = ticks[ticks > 0].min().item() if ticks.numel() else float("nan")
    return out


def run(batch, ctx, failures, splits=None, config=None):
    args = make_inputs([(ctx - 1, 1)] * batch, seed=batch * 31 + ctx, layers=LAYERS)
    splits = splits or launch_shape.num_splits(batch, HKV, ctx, args[0].device)
    cluster = launch_shape.merges_in_cluster(splits, args[0].device)
    config = config or launch_shape.decode_config(D, args[0].element_size(), splits, cluster)
    launch = pa.DecodeLaunch(splits, cluster, *config)
    programs = HKV * batch * splits
    trace = torch.zeros(LAYERS, programs, pa_trace.TRACE_SLOTS, dtype=torch.int64, device="cuda")
    err = rel_error(args, launch, trace=trace[0])
    if not err < REL_TOL:
        failures.append(f"b{batch} ctx{ctx} traced: rel err {err:.2e}")

    us_plain = per_layer_us(graphed_layers(args, LAYERS, lambda a, layer: pa.launch_paged_attention(*a, launch=launch)),
                            LAYERS)
    replay = graphed_layers(args, LAYERS,
                            lambda a, layer: pa.launch_paged_attention(*a, launch=launch, trace=trace[layer]))
    us_traced = per_layer_us(replay, LAYERS)
    trace.zero_()
    ms_read_flush(replay, reps=1)  # one flushed replay, its stamps kept
    torch.cuda.synchronize()
    nbytes = batch * ctx * HKV * D * 2 * args[0].element_size()
    phases = timeline(trace.cpu(), LAYERS, nbytes / programs)
    touch_out = torch.empty(programs, dtype=torch.int32, device="cuda")
    seq_lens = args[8]
    floor = per_layer_us(graphed(lambda: [_touch_kernel[(HKV, batch, splits)](seq_lens, touch_out)
                                          for _ in range(LAYERS)]), LAYERS)
    row = dict(batch=batch, ctx=ctx, splits=splits, config=" ".join(map(str, config)), programs=programs,
               rel_err=err, us_plain=us_plain, us_traced=us_traced, us_floor=floor,
               gbs_plain=nbytes / us_plain / 1e3, **phases)
    print(row, flush=True)
    return row


def main():
    torch.manual_seed(0)
    failures, rows = [], []
    if "--b8-configs" in sys.argv:  # b8 x 2048 over (splits, (BLOCK_N, warps, stages))
        for splits, config in B8_CONFIGS:
            rows.append(run(8, 2048, failures, splits, config))
    else:
        for batch, ctx in SHAPES:
            rows.append(run(batch, ctx, failures))
    cols = ["batch", "ctx", "splits", "config", "us_plain", "gbs_plain", "us_traced", "us_floor", "skew", "meta",
            "loop", "loop_max", "loop_gbs", "ticket", "merge", "tail", "span", "gap", "timer_step_ns"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r.get(c, float('nan')):.2f}" if isinstance(r.get(c), float)
                                       else str(r.get(c, "")) for c in cols) + " |")
    if failures:
        lines.append("\nFAILED: " + "; ".join(failures))
    report("decode_timeline", "\n".join(lines), dict(rows=rows, failures=failures))
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
