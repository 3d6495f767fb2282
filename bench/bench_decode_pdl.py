"""Decode attention with and without programmatic dependent launch (PDL), per layer in a
CUDA graph of a decode step's layers, each preceded by its rotary kernels as in the model.

    PYTHONPATH=$PWD python3 bench/bench_decode_pdl.py            (CUDA, sm_90+; ~2 min on H100)
    PYTHONPATH=$PWD python3 bench/bench_decode_pdl.py --smoke   (CPU, interpreter, fp16: the script's check)

Why a predecessor: PDL lets the attention kernel launch, run its prologue and load its
first K/V tile while the kernel before it finishes (kernels/pdl.py). In a graph of
attention calls only, that kernel is the previous layer's attention; in the model it is
the rotary kernel on k. So per layer the graph runs rotary(q), rotary(k) (Triton,
kernels/rotary.py, on [1, H, T, D] views of [T, H, D] rows, as the compiled model passes
them), then paged attention on the rotated q/k (flattened views, as
runtime/attention_context.py passes them); each layer its own cache, q/k/v inputs.

Shapes as bench/bench_attention.py (bf16, Hq=32, Hkv=8, D=128, page 16, random block
tables), batch 1/8/64 x context 512/2048/8192, L = up to 32 layers (fewer where 32 caches
would pass 16 GB). Per shape:
1. correctness: the eager op with PDL against `paged_attention_ref` (bench_attention's
   rel_error); then the captured rotary+attention graph, PDL off and on, on fresh random
   q/k/v written into its inputs before each of 2 replays, 3 layers' outputs against
   rotary_ref + paged_attention_ref: attention reading q/k before the rotary kernel wrote
   them would see the previous replay's values. A capture that fails (PDL edges
   unsupported) is reported as a failure and the shape's PDL timings are NaN. (--smoke:
   the same checks on the eager chain, where the launchers force PDL off.)
2. timing, per layer = replay / L, after a read-only L2 flush (bench_attention's
   ms_read_flush, 50 replays): rotary alone; attention alone, PDL off / on; rotary +
   attention with PDL off, with attention PDL-launched but rotary not triggering early
   ("pdl, no trigger": attention starts when rotary exits), and with both ("pdl").
   "attn share" = (rotary + attention) - rotary, and its GB/s of K+V cache bytes.

Table last; $OUT/bench_decode_pdl.{md,json}; exit 1 on a correctness failure.
"""
import argparse
import contextlib
import os
import sys

if "--smoke" in sys.argv:  # before triton is imported: @triton.jit reads it then
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402

import bench.bench_attention as ba  # noqa: E402
from bench.report import report  # noqa: E402
from trtllm.kernels import paged_attention as pa  # noqa: E402
from trtllm.kernels import paged_attention_decode as pa_decode  # noqa: E402
from trtllm.kernels import pdl  # noqa: E402
from trtllm.kernels import rotary as rot  # noqa: E402

HQ, HKV, D = ba.HQ, ba.HKV, ba.D
CHECK_LAYERS = 3


@contextlib.contextmanager
def pdl_flags(attention: bool, trigger: bool):
    """The launchers' module switches, read at launch (so at graph capture)."""
    saved = pa_decode._USE_PDL, rot._PDL_TRIGGER
    pa_decode._USE_PDL, rot._PDL_TRIGGER = attention, trigger
    try:
        yield
    finally:
        pa_decode._USE_PDL, rot._PDL_TRIGGER = saved


class Chain:
    """L layers' inputs: raw q/k rows [L, T, H, D] (pre-rotary), v [L, T, Hkv, D], one
    rope table for the step's positions, and bench_attention's cache + metadata."""

    def __init__(self, batch, ctx, layers, seed):
        self.layers = layers
        self.args = ba.make_inputs([(ctx - 1, 1)] * batch, seed=seed, layers=layers)
        dev = ba.DEV
        self.q_raw = torch.empty(layers, batch, HQ, D, dtype=ba.DTYPE, device=dev)
        self.k_raw = torch.empty(layers, batch, HKV, D, dtype=ba.DTYPE, device=dev)
        self.v = torch.empty(layers, batch, HKV, D, dtype=ba.DTYPE, device=dev)
        self.refill(seed)
        pos = self.args[8][None, :batch].long() - 1  # the new token's position
        self.cos, self.sin = rot.rope_cos_sin(pos, rot.rope_inv_freq(D, 500000.0), ba.DTYPE)
        self.outs = []

    def refill(self, seed):
        g = torch.Generator(device=ba.DEV).manual_seed(seed)
        for t in (self.q_raw, self.k_raw, self.v):
            t.copy_(torch.randn(t.shape, dtype=ba.DTYPE, device=ba.DEV, generator=g))

    def rotary(self, layer, op=rot.rotary):
        # [T, H, D] rows seen as [1, H, T, D], as the compiled model's q/k
        q = op(self.q_raw[layer].unsqueeze(0).transpose(1, 2), self.cos, self.sin, False)
        k = op(self.k_raw[layer].unsqueeze(0).transpose(1, 2), self.cos, self.sin, False)
        return q, k

    def attention(self, layer, q, k, op=pa.paged_attention):
        flat = lambda t: t.transpose(1, 2).reshape(t.shape[2], t.shape[1], t.shape[3])
        a = list(self.args)
        a[0], a[1], a[2], a[5] = flat(q), flat(k), self.v[layer], layer
        return op(*a)

    def step(self):
        self.outs = [self.attention(l, *self.rotary(l)) for l in range(self.layers)]

    def rotary_only(self):
        for l in range(self.layers):
            self.rotary(l)

    def check(self, run, seed):
        """Fresh inputs, run (a replay, or the eager step), then CHECK_LAYERS layers'
        outputs against the references; the worst relative error."""
        self.refill(seed)
        run()
        if ba.DEV.type == "cuda":
            torch.cuda.synchronize()
        worst = 0.0
        for l in sorted({0, self.layers // 2, self.layers - 1})[:CHECK_LAYERS]:
            q, k = self.rotary(l, op=rot.rotary_ref)
            ref = self.attention(l, q, k, op=pa.paged_attention_ref).float()  # writes the same slot
            out = self.outs[l].float()
            worst = max(worst, ((out - ref).norm() / ref.norm()).item())
        return worst


def per_layer_us(fn, layers, reps=50):
    return ba.ms_read_flush(fn, reps=reps) * 1e3 / layers


def bench_shape(batch, ctx, failures, smoke):
    nbytes = batch * ctx * HKV * D * 2 * 2
    layers = 2 if smoke else max(2, min(32, (16 << 30) // (2 * nbytes)))
    seed = batch * 100003 + ctx
    chain = Chain(batch, ctx, layers, seed)
    row = dict(batch=batch, ctx=ctx, layers=layers,
               splits=pa_decode._num_splits(batch, HKV, ctx, ba.DEV))
    row["rel_err_eager_pdl"] = ba.rel_error(ba.make_inputs([(ctx - 1, 1)] * batch, seed=seed),
                                            decode_pdl=True)
    nan = float("nan")
    if smoke:  # no graphs off CUDA: the eager chain, PDL forced off by the launchers
        for key, on in (("rel_err_graph_off", False), ("rel_err_graph_pdl", True)):
            with pdl_flags(on, on):
                row[key] = max(chain.check(chain.step, seed + s) for s in (1, 2))
        row.update({k: nan for k in ("us_rotary", "us_attn_off", "us_attn_pdl", "us_chain_off",
                                     "us_chain_pdl_notrig", "us_chain_pdl")})
    else:
        with pdl_flags(False, False):
            row["us_rotary"] = per_layer_us(ba.graphed(chain.rotary_only), layers)
            row["us_attn_off"] = per_layer_us(ba.graphed_layers(chain.args, layers), layers)
            replay = ba.graphed(chain.step)  # the captured step's outputs: chain.outs
            row["rel_err_graph_off"] = max(chain.check(replay, seed + s) for s in (1, 2))
            row["us_chain_off"] = per_layer_us(replay, layers)
            del replay
        try:
            with pdl_flags(True, True):
                replay = ba.graphed(chain.step)
            row["rel_err_graph_pdl"] = max(chain.check(replay, seed + s) for s in (1, 2))
            row["us_chain_pdl"] = per_layer_us(replay, layers)
            del replay
            with pdl_flags(True, True):
                row["us_attn_pdl"] = per_layer_us(ba.graphed_layers(chain.args, layers), layers)
            with pdl_flags(True, False):
                row["us_chain_pdl_notrig"] = per_layer_us(ba.graphed(chain.step), layers)
        except Exception as e:  # noqa: BLE001 - e.g. capture of PDL launches unsupported
            failures.append(f"b{batch} ctx{ctx}: PDL graph: {type(e).__name__}: {str(e)[:300]}")
            for k in ("rel_err_graph_pdl", "us_chain_pdl", "us_attn_pdl", "us_chain_pdl_notrig"):
                row.setdefault(k, nan)
    for k in ("rel_err_eager_pdl", "rel_err_graph_off", "rel_err_graph_pdl"):
        if not row[k] < ba.REL_TOL:
            failures.append(f"b{batch} ctx{ctx}: {k} {row[k]:.2e}")
    for v in ("attn_off", "attn_pdl"):
        row[f"gbs_{v}"] = nbytes / row[f"us_{v}"] / 1e3
    for v in ("off", "pdl_notrig", "pdl"):
        share = row[f"us_chain_{v}"] - row["us_rotary"]
        row[f"us_share_{v}"] = share
        row[f"gbs_share_{v}"] = nbytes / share / 1e3 if share > 0 else nan
    print(f"b={batch:3d} ctx={ctx:5d} L={layers:2d}: err eager {row['rel_err_eager_pdl']:.1e} "
          f"graph off {row['rel_err_graph_off']:.1e} PDL {row['rel_err_graph_pdl']:.1e} | us/layer rotary {row['us_rotary']:.2f}, attn "
          f"{row['us_attn_off']:.2f} -> {row['us_attn_pdl']:.2f}, rotary+attn {row['us_chain_off']:.2f} "
          f"-> {row['us_chain_pdl_notrig']:.2f} (no trigger) -> {row['us_chain_pdl']:.2f}", flush=True)
    del chain
    if ba.DEV.type == "cuda":
        torch.cuda.empty_cache()
    return row


def programmatic_edges(tmpdir) -> str:
    """Capture a small rotary+attention step with the graph's debug dump on and count
    the DOT lines that name a programmatic dependency: whether the edges made it in."""
    try:
        chain = Chain(8, 512, 2, seed=5)
        with pdl_flags(True, True):
            chain.step()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            g.enable_debug_mode()
            with torch.cuda.graph(g):
                chain.step()
        path = os.path.join(tmpdir, "bench_decode_pdl_graph.dot")
        g.debug_dump(path)
        text = open(path).read()
        n = sum("programmatic" in line.lower() for line in text.splitlines())
        return f"{n} DOT lines name a programmatic dependency ({path})"
    except Exception as e:  # noqa: BLE001 - diagnostic only
        return f"graph dump unavailable: {type(e).__name__}: {str(e)[:200]}"


def table(rows, header_lines, failures):
    pct = lambda gbs: 100 * gbs / (ba.CEILING_TBS * 1e3)
    lines = header_lines + [
        "| batch | ctx | splits | L | rel err: eager PDL / graph off / graph PDL | rotary us | attn us off / PDL | "
        "attn GB/s off / PDL (% of 3.0 TB/s) | rotary+attn us off / PDL no trigger / PDL | "
        "attn share us off / PDL | attn share GB/s off / PDL (% of 3.0 TB/s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['ctx']} | {r['splits']} | {r['layers']} | "
            f"{r['rel_err_eager_pdl']:.1e} / {r['rel_err_graph_off']:.1e} / {r['rel_err_graph_pdl']:.1e} | "
            f"{r['us_rotary']:.2f} | "
            f"{r['us_attn_off']:.2f} / {r['us_attn_pdl']:.2f} | "
            f"{r['gbs_attn_off']:.0f} ({pct(r['gbs_attn_off']):.0f}%) / {r['gbs_attn_pdl']:.0f} "
            f"({pct(r['gbs_attn_pdl']):.0f}%) | {r['us_chain_off']:.2f} / {r['us_chain_pdl_notrig']:.2f} / "
            f"{r['us_chain_pdl']:.2f} | {r['us_share_off']:.2f} / {r['us_share_pdl']:.2f} | "
            f"{r['gbs_share_off']:.0f} ({pct(r['gbs_share_off']):.0f}%) / {r['gbs_share_pdl']:.0f} "
            f"({pct(r['gbs_share_pdl']):.0f}%) |")
    if failures:
        lines += ["", "**failures:** " + "; ".join(failures)]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU, interpreter, tiny shapes, no graphs or timings")
    smoke = ap.parse_args().smoke
    if smoke:
        ba.DEV = torch.device("cpu")
        ba.DTYPE = torch.float16  # the interpreter gets bf16 wrong (numpy has none)
        shapes = [(1, 64), (3, 160)]
    elif not torch.cuda.is_available():
        sys.exit("bench_decode_pdl.py needs a CUDA device (or --smoke)")
    else:
        shapes = [(b, c) for b in (1, 8, 64) for c in (512, 2048, 8192)]
    torch.manual_seed(0)
    failures, rows = [], []
    for batch, ctx in shapes:
        rows.append(bench_shape(batch, ctx, failures, smoke))
    active = pdl.use_pdl(ba.DEV, True)
    if smoke:
        name, edges = "CPU (Triton interpreter)", "n/a (no graphs)"
    else:
        name = f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
        edges = programmatic_edges(os.environ.get("OUT") or "/tmp")
    header = [f"## decode attention, PDL off vs on, per layer in an L-layer CUDA graph, on {name}", "",
              f"{str(ba.DTYPE)[6:]}, Hq={HQ} Hkv={HKV} D={D}, page {ba.BS}; torch {torch.__version__}, triton "
              f"{triton.__version__}; PDL usable here: {active}; graph check: {edges}", "",
              "us per layer = replay / L after a read-only L2 flush; attn share = (rotary+attn) - rotary; "
              "GB/s = K+V cache bytes / time", ""]
    report("bench_decode_pdl", table(rows, header, failures),
           dict(device=name, pdl_active=active, graph_edges=edges, rows=rows, failures=failures))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
