"""Paged attention on the GPU: decode GB/s and prefill TFLOP/s beside torch SDPA.

    PYTHONPATH=$PWD python bench/bench_attention.py        (from the repo root, CUDA only)

Shapes: bf16, Hq=32, Hkv=8, D=128 (Llama-3-8B), page (block) size 16, random non-contiguous
block tables. Every case is first checked against `paged_attention_ref` on fresh random
inputs (relative error ||out - ref|| / ||ref|| < 1e-2), then timed with
triton.testing.do_bench (median; do_bench flushes L2 before every call):

- decode (1 new token per sequence, batch 1/8/64 x context 512/2048/8192): achieved GB/s of
  the K+V cache bytes read (B * ctx * Hkv * D * 2 bytes * 2), beside torch SDPA on a dense
  [B, Hkv, ctx, D] cache, the 3.0 TB/s ceiling and a device-to-device copy measured in the
  same run. Timed eagerly ("eager": includes the host launch cost of 2-3 Triton kernels
  plus the custom-op dispatch, tens of us) and replayed from a CUDA graph ("graph": what
  the runtime gets); the ceiling % uses the graph time. The graph is timed twice: with
  do_bench's L2 flush (writes zeros: the kernel then also pays the write-back of up to
  50 MB of dirty L2 lines) and with a read-only flush (`ms_read_flush`, as inside a
  decode step, where attention follows weight-reading GEMMs); a torch.sum over 64 MB
  calibrates the difference. Third, per layer in one graph of up to 32 layers' calls
  (`graphed_layers`: each layer its own cache, kernel after kernel, as in a decode step
  of the runtime), which takes the graph launch and the timing events out of each call.
- prefill (one sequence, 1k-8k tokens, causal, no cached context): TFLOP/s counting
  4 * S * S * Hq * D / 2, beside SDPA with the flash and the cuDNN backends.
- a small config sweep (decode tiles/stages/splits, prefill tiles, page sizes), to retune
  the defaults (about half the run's time; BENCH_SWEEP=0 skips it).

Prints markdown tables last; with $OUT set, also writes $OUT/bench_attention.{md,json}.
"""
import functools
import math
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from bench.report import copy_ceiling_tbs, report
from trtllm.kernels import paged_attention as pa
from trtllm.kernels.paged_attention import launch_shape

HQ, HKV, D, BS = 32, 8, 128, 16
DTYPE = torch.bfloat16
CEILING_TBS = 3.0
REL_TOL = 1e-2
DEV = torch.device("cuda")


def make_inputs(specs, seed=0, page=None, layers=1):
    """specs: [(cached, new)] per sequence -> the op's positional arguments (layer 0 of a
    cache of `layers` layers)."""
    bs = page or BS
    g = torch.Generator(device=DEV).manual_seed(seed)
    lens = [c + n for c, n in specs]
    nblk = [math.ceil(L / bs) for L in lens]
    num_blocks = sum(nblk) + 1
    perm = torch.randperm(num_blocks, device=DEV, generator=g).to(torch.int32)
    mb = max(nblk)
    bt = torch.zeros(len(specs), mb, dtype=torch.int32, device=DEV)
    at = 0
    for s, nb in enumerate(nblk):
        bt[s, :nb] = perm[at: at + nb]
        at += nb
    shape = (layers, num_blocks, bs, HKV, D)
    k_cache = torch.randn(shape, dtype=DTYPE, device=DEV, generator=g)
    v_cache = torch.randn(shape, dtype=DTYPE, device=DEV, generator=g)
    T = sum(n for _, n in specs)
    q = torch.randn(T, HQ, D, dtype=DTYPE, device=DEV, generator=g)
    k = torch.randn(T, HKV, D, dtype=DTYPE, device=DEV, generator=g)
    v = torch.randn(T, HKV, D, dtype=DTYPE, device=DEV, generator=g)
    slots, starts = [], [0]
    for s, (c, n) in enumerate(specs):
        pos = torch.arange(c, c + n, device=DEV)
        slots.append(bt[s, pos // bs].long() * bs + pos % bs)
        starts.append(starts[-1] + n)
    slot_mapping = torch.cat(slots).to(torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    qsl = torch.tensor(starts, dtype=torch.int32, device=DEV)
    return [q, k, v, k_cache, v_cache, 0, slot_mapping, bt, seq_lens, qsl, D ** -0.5, 0, 0.0,
            len(specs), max(n for _, n in specs), max(lens)]


def rel_error(args, launch=None, trace=None):
    a_ref = list(args)
    a_ref[3], a_ref[4] = args[3].clone(), args[4].clone()
    ref = pa.paged_attention_ref(*a_ref).float()
    out = pa.launch_paged_attention(*args, launch=launch, trace=trace).float()
    return ((out - ref).norm() / ref.norm()).item()


def graphed_layers(args, layers, call=None):
    """One graph calling the op once per layer, as a decode step's graph does (each layer
    reads its own cache): replay, divided by `layers`, is one layer's share with launch
    costs as the runtime pays them (kernel after kernel, no graph launch per call).
    call(args, layer): how a layer calls it (default the registered op)."""
    call = call or (lambda a, layer: pa.paged_attention(*a))

    def step():
        for layer in range(layers):
            a = list(args)
            a[5] = layer
            call(a, layer)
    return graphed(step)


def graphed(fn):
    """Capture fn in a CUDA graph (after a warm-up that compiles); returns replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def ms(fn):
    return do_bench(fn, return_mode="median")


_flush_buf = None


def ms_read_flush(fn, reps: int = 200) -> float:
    """Median ms of fn, L2 evicted before each call by *reading* 256 MB.

    do_bench evicts L2 by writing zeros to 256 MB, which leaves up to the whole L2
    (50 MB on H100) dirty: a kernel that then reads more than that pays the write-back
    of those lines too (~17 us at 3 TB/s). Inside a decode step, attention follows
    GEMMs that read weights (clean lines), so the read flush is the runtime's situation;
    both are reported."""
    global _flush_buf
    if _flush_buf is None:
        _flush_buf = torch.ones(64 << 20, dtype=torch.float32, device=DEV)
    fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        _flush_buf.sum()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]


def flush_calibration() -> dict:
    """The flush effect on a plain read: torch.sum over 64 MB, timed both ways."""
    x = torch.randn(16 << 20, dtype=torch.float32, device=DEV)
    zero, read = ms(lambda: x.sum()), ms_read_flush(lambda: x.sum())
    return dict(bytes=x.numel() * 4, us_zero_flush=zero * 1e3, us_read_flush=read * 1e3,
                gbs_zero_flush=x.numel() * 4 / zero / 1e6, gbs_read_flush=x.numel() * 4 / read / 1e6)


def dense_kv(args):
    """The cached K/V of every sequence as dense [B, Hkv, ctx, D] (equal lengths)."""
    k_cache, v_cache, bt, seq_lens = args[3], args[4], args[7], args[8]
    ctx, bs = int(seq_lens.max()), k_cache.shape[2]
    pos = torch.arange(ctx, device=DEV)
    pages, offs = bt[:, pos // bs].long(), pos % bs
    return (k_cache[0, pages, offs].transpose(1, 2).contiguous(),
            v_cache[0, pages, offs].transpose(1, 2).contiguous())


def sdpa_fn(q, k, v, causal):
    """SDPA with GQA: enable_gqa where the backend takes it, else kv heads repeated once
    here (outside the timed call; that peer then reads Hq/Hkv times the bytes)."""
    def gqa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    try:
        gqa()
        return gqa, "enable_gqa"
    except (RuntimeError, TypeError):
        g = q.shape[1] // k.shape[1]
        kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        return (lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=causal)), "repeat"


def bench_decode(batch, ctx, failures):
    args = make_inputs([(ctx - 1, 1)] * batch, seed=batch * 100003 + ctx)
    err = rel_error(args)
    if not err < REL_TOL:
        failures.append(f"decode b{batch} ctx{ctx}: rel err {err:.2e}")
    nbytes = batch * ctx * HKV * D * 2 * args[0].element_size()
    def op():
        return pa.paged_attention(*args)

    t_eager = ms(op)
    replay = graphed(op)
    t_graph = ms(replay)
    t_graph_rf = ms_read_flush(replay)
    # a 32-layer step (fewer layers where 32 caches would pass 16 GB)
    layers = max(2, min(32, (16 << 30) // (2 * nbytes)))
    largs = make_inputs([(ctx - 1, 1)] * batch, seed=batch * 100003 + ctx, layers=layers)
    t_layer = ms_read_flush(graphed_layers(largs, layers), reps=50) / layers
    del largs
    kd, vd = dense_kv(args)
    qd = args[0].view(batch, HQ, 1, D)
    try:
        sdpa, how = sdpa_fn(qd, kd, vd, False)
        sdpa_replay = graphed(sdpa)
        t_sdpa = ms(sdpa_replay)
        t_sdpa_rf = ms_read_flush(sdpa_replay)
        if how != "enable_gqa":
            print(f"  sdpa decode: kv heads repeated ({how})", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - a missing peer must not hide our numbers
        print(f"  sdpa decode b{batch} ctx{ctx}: {type(e).__name__}: {e}", file=sys.stderr)
        t_sdpa = t_sdpa_rf = float("nan")
    row = dict(batch=batch, ctx=ctx, rel_err=err, splits=launch_shape.num_splits(batch, HKV, ctx, DEV),
               us_eager=t_eager * 1e3, us_graph=t_graph * 1e3, us_sdpa=t_sdpa * 1e3,
               gbs_eager=nbytes / t_eager / 1e6, gbs_graph=nbytes / t_graph / 1e6,
               gbs_sdpa=nbytes / t_sdpa / 1e6, us_graph_rf=t_graph_rf * 1e3,
               gbs_graph_rf=nbytes / t_graph_rf / 1e6, gbs_sdpa_rf=nbytes / t_sdpa_rf / 1e6,
               layers=layers, us_layer=t_layer * 1e3, gbs_layer=nbytes / t_layer / 1e6)
    row["pct_ceiling_layer"] = 100 * row["gbs_layer"] / (CEILING_TBS * 1e3)
    row["pct_ceiling"] = 100 * row["gbs_graph"] / (CEILING_TBS * 1e3)
    row["pct_ceiling_rf"] = 100 * row["gbs_graph_rf"] / (CEILING_TBS * 1e3)
    print(f"decode b={batch:3d} ctx={ctx:5d}: err {err:.1e}, {row['gbs_graph']:7.0f} GB/s graph "
          f"({row['pct_ceiling']:.0f}%), read-flush {row['gbs_graph_rf']:7.0f} ({row['pct_ceiling_rf']:.0f}%), "
          f"{layers}-layer graph {row['gbs_layer']:7.0f} ({row['pct_ceiling_layer']:.0f}%), "
          f"{row['gbs_eager']:7.0f} eager, sdpa {row['gbs_sdpa']:7.0f} / {row['gbs_sdpa_rf']:7.0f}",
          flush=True)
    return row


def sdpa_backend_time(backend, q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel(getattr(SDPBackend, backend)):
            fn, how = sdpa_fn(q, k, v, True)
            if how != "enable_gqa":
                print(f"  sdpa {backend}: kv heads repeated ({how})", file=sys.stderr)
            return ms(fn)
    except Exception as e:  # noqa: BLE001 - backend unavailable for these inputs
        print(f"  sdpa {backend}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
        return float("nan")


def bench_prefill(tokens, failures):
    args = make_inputs([(0, tokens)], seed=tokens)
    err = rel_error(args)
    if not err < REL_TOL:
        failures.append(f"prefill {tokens}: rel err {err:.2e}")
    flops = 4 * tokens * tokens * HQ * D / 2
    t = ms(lambda: pa.paged_attention(*args))
    q = args[0].transpose(0, 1).unsqueeze(0)  # [1, Hq, S, D] views, as the graph op passes
    k = args[1].transpose(0, 1).unsqueeze(0)
    v = args[2].transpose(0, 1).unsqueeze(0)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    t_flash = sdpa_backend_time("FLASH_ATTENTION", q, k, v)
    t_cudnn = sdpa_backend_time("CUDNN_ATTENTION", q, k, v)
    row = dict(tokens=tokens, rel_err=err, ms=t, ms_flash=t_flash, ms_cudnn=t_cudnn,
               tflops=flops / t / 1e9, tflops_flash=flops / t_flash / 1e9,
               tflops_cudnn=flops / t_cudnn / 1e9)
    print(f"prefill {tokens:5d}: err {err:.1e}, {row['tflops']:6.1f} TFLOP/s, flash "
          f"{row['tflops_flash']:6.1f}, cudnn {row['tflops_cudnn']:6.1f}", flush=True)
    return row


def sweep():
    """Configs around the defaults, graph-timed: to retune launch_shape.decode_config / num_splits /
    prefill_config from one run."""
    rows = []
    for batch, ctx in ((8, 2048), (1, 8192), (64, 2048)):
        args = make_inputs([(ctx - 1, 1)] * batch, seed=7)
        nbytes = batch * ctx * HKV * D * 4
        base = launch_shape.num_splits(batch, HKV, ctx, DEV)
        for cfg in ((64, 8, 5), (64, 4, 5), (64, 4, 3), (32, 4, 5)):
            for splits in sorted({max(1, base // 2), base, base * 2}):
                try:
                    launch = pa.DecodeLaunch(splits, launch_shape.merges_in_cluster(splits, DEV), *cfg)
                    t = ms(graphed(functools.partial(pa.launch_paged_attention, *args, launch)))
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                    print(f"  sweep decode {cfg} x{splits}: {type(e).__name__}", file=sys.stderr)
                    continue
                rows.append(dict(kind="decode", batch=batch, ctx=ctx, config=list(cfg),
                                 splits=splits, gbs=nbytes / t / 1e6))
    args = make_inputs([(0, 4096)], seed=11)
    flops = 4 * 4096 * 4096 * HQ * D / 2
    for cfg in ((128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 3), (128, 128, 8, 2),
                (64, 64, 4, 3), (256, 64, 8, 2)):
        try:
            t = ms(functools.partial(pa.launch_paged_attention, *args, pa.PrefillLaunch(*cfg)))
        except Exception as e:  # noqa: BLE001
            print(f"  sweep prefill {cfg}: {type(e).__name__}", file=sys.stderr)
            continue
        rows.append(dict(kind="prefill", tokens=4096, config=list(cfg), tflops=flops / t / 1e9))
    # Page size, default configs: decode reads and a chunked prefill (512 new tokens on
    # 3584 cached: the block-table path of the prefill kernel).
    for page in (16, 32, 64, 128):
        args = make_inputs([(2047, 1)] * 8, seed=13, page=page)
        t = ms(graphed(functools.partial(pa.paged_attention, *args)))
        rows.append(dict(kind="page", shape="decode b8 ctx2048", page=page,
                         figure=f"{8 * 2048 * HKV * D * 4 / t / 1e6:.0f} GB/s"))
        args = make_inputs([(3584, 512)], seed=17, page=page)
        t = ms(functools.partial(pa.paged_attention, *args))
        flops = 4 * HQ * D * (512 * 3584 + 512 * 513 / 2)
        rows.append(dict(kind="page", shape="chunk 512 on 3584", page=page,
                         figure=f"{flops / t / 1e9:.0f} TFLOP/s"))
    return rows


def main():
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA device")
    torch.manual_seed(0)
    failures = []
    copy_tbs = copy_ceiling_tbs()
    print(f"device-to-device copy: {copy_tbs:.2f} TB/s", flush=True)
    calib = flush_calibration()
    print(f"flush calibration, sum of 64 MB: {calib}", flush=True)
    decode = []
    for batch in (1, 8, 64):
        for ctx in (512, 2048, 8192):
            decode.append(bench_decode(batch, ctx, failures))
            torch.cuda.empty_cache()
    prefill = [bench_prefill(n, failures) for n in (1024, 2048, 4096, 8192)]
    tuning = sweep() if os.environ.get("BENCH_SWEEP", "1") != "0" else []

    name = torch.cuda.get_device_name()
    lines = [f"## paged_attention on {name}, bf16, Hq={HQ} Hkv={HKV} D={D}, page {BS}", "",
             f"device-to-device copy (measured ceiling): {copy_tbs:.2f} TB/s; nominal {CEILING_TBS} TB/s", "",
             f"flush calibration (torch.sum over 64 MB): {calib['gbs_zero_flush']:.0f} GB/s after do_bench's "
             f"zero-fill flush, {calib['gbs_read_flush']:.0f} GB/s after a read flush", "",
             "### decode (K+V cache GB/s, CUDA-graph replay; zero-fill flush = do_bench, read flush = ms_read_flush)", "",
             "| batch | ctx | splits | rel err | us (zero flush) | GB/s | % of 3.0 TB/s | us (read flush) | GB/s | % of 3.0 TB/s | layers | us/layer (L-layer graph) | GB/s | % of 3.0 TB/s | GB/s eager | SDPA dense GB/s (zero / read flush) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in decode:
        lines.append(f"| {r['batch']} | {r['ctx']} | {r['splits']} | {r['rel_err']:.1e} | "
                     f"{r['us_graph']:.1f} | {r['gbs_graph']:.0f} | {r['pct_ceiling']:.0f}% | "
                     f"{r['us_graph_rf']:.1f} | {r['gbs_graph_rf']:.0f} | {r['pct_ceiling_rf']:.0f}% | "
                     f"{r['layers']} | {r['us_layer']:.1f} | {r['gbs_layer']:.0f} | {r['pct_ceiling_layer']:.0f}% | "
                     f"{r['gbs_eager']:.0f} | {r['gbs_sdpa']:.0f} / {r['gbs_sdpa_rf']:.0f} |")
    lines += ["", "### prefill (causal, no context; TFLOP/s = 4*S*S*Hq*D/2 / t)", "",
              "| tokens | rel err | ms | TFLOP/s | SDPA flash | SDPA cuDNN |",
              "|---:|---:|---:|---:|---:|---:|"]
    for r in prefill:
        lines.append(f"| {r['tokens']} | {r['rel_err']:.1e} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                     f"{r['tflops_flash']:.0f} | {r['tflops_cudnn']:.0f} |")
    lines += ["", "### config sweep (graph-timed decode GB/s, prefill TFLOP/s at 4096)", "",
              "| kind | shape | config | splits | figure |", "|---|---|---|---:|---:|"]
    for r in tuning:
        if r["kind"] == "decode":
            lines.append(f"| decode | b{r['batch']} ctx{r['ctx']} | {r['config']} | {r['splits']} | {r['gbs']:.0f} GB/s |")
        elif r["kind"] == "page":
            lines.append(f"| page {r['page']} | {r['shape']} | defaults | | {r['figure']} |")
        else:
            lines.append(f"| prefill | {r['tokens']} | {r['config']} | | {r['tflops']:.0f} TFLOP/s |")
    if failures:
        lines += ["", "**correctness failures:** " + "; ".join(failures)]
    report("bench_attention", "\n".join(lines), dict(device=name, copy_tbs=copy_tbs, flush=calib, decode=decode,
                                                      prefill=prefill, sweep=tuning, failures=failures))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
