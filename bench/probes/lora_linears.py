"""A LoRA linear's decode cost, kernel by kernel: Llama-3.1-8B's four linears (fused QKV,
o, fused gate-up, down) with rank-16 adapters (the fused ones stack 3 or 2 ranks, as
passes/fuse_parallel_linears.py builds them), T tokens over --adapters (8; sorted by slot, as
the scheduler orders a step), each variant captured in a CUDA graph and replayed over
enough weight copies that no replay finds its weights in L2:

- cublas: F.linear alone (the base request's cost past 16 rows);
- unfused: cuBLAS, the shrink (its splits summed by a second launch), the expand: what
  linear_lora runs past GEMV_MAX_M rows; and its pieces, shrink+sum and expand alone;
- op: torch.ops.trtllm.linear_lora as the runtime's graphs run it;
- gemv[...]: the GEMV with its LoRA epilogue at T rows (linear_lora's path up to 16 rows),
  over the shrink's partial sums (parts) or its summed h (h), per GEMV config;
- parts->expand[bt,bn,w]: no sum launch: the expand adds the shrink's partial sums itself
  (each of its programs re-reads its tokens' splits), per (BLOCK_T, BLOCK_N, num_warps);
- chunk C, block_k B: the shrink with SPLIT_K_CHUNK = C (and BLOCK_K = B).

Every variant is first checked against linear_lora_ref on fresh random inputs. Per variant
the µs a call; last a whole-step estimate (x 32 layers) per T. Table last; $OUT/lora_linears.{md,json}.

    PYTHONPATH=$PWD python bench/probes/lora_linears.py [--tokens 64 32 16]
"""
import argparse

import torch
import torch.nn.functional as F

import trtllm.kernels.lora_sgmv as sgmv
from bench.report import markdown, report
from trtllm.kernels.linear import gemv
from trtllm.kernels.linear_configs import GemvConfig, gemv_config
from trtllm.kernels.linear_lora import linear_lora_ref, linear_lora_triton

RANK, LAYERS = 16, 32
SHAPES = {  # name: (N, K, stacked rank, the fused GEMM's parts: [start, size] of B's rows a rank block)
    "qkv": (6144, 4096, 3 * RANK, [0, 4096, 4096, 1024, 5120, 1024]), "o": (4096, 4096, RANK, None),
    "gate_up": (28672, 4096, 2 * RANK, [0, 14336, 14336, 14336]), "down": (4096, 14336, RANK, None),
}
GEMV_CONFIGS = [GemvConfig(True, 64, 128, 4, 4), GemvConfig(True, 32, 128, 4, 4), GemvConfig(True, 128, 64, 8, 3)]
# (BLOCK_T, BLOCK_N, num_warps) for the expand over partials; alone (H200, 2026-12-06, 64 tokens)
# (16, 64, 4) was the fastest of these and (32, 128, 4), (64, 64, 4), (64, 128, 8)
EXPAND_BLOCKS = [(16, 64, 4), (16, 128, 4), (16, 256, 8)]
# (BLOCK_T, BLOCK_N, num_warps) for the expand alone over the summed h (the path past 16 rows)
PLAIN_EXPAND_BLOCKS = [(16, 64, 4), (16, 128, 4), (16, 128, 8), (32, 128, 4), (64, 128, 4), (64, 256, 8)]
CHUNKS = [(128, None), (512, None), (1024, None), (256, 256), (512, 256), (512, 64)]  # (SPLIT_K_CHUNK, BLOCK_K)


class Operands:
    """Weight copies enough to exceed L2 (each replay reads cold weights), one set of inputs."""

    def __init__(self, n: int, k: int, r: int, t: int, seed: int, adapters: int = 8, device: str = "cuda",
                 parts: list[int] | None = None):
        gen = torch.Generator(device=device).manual_seed(seed)
        copies = max(1, -(-(256 << 20) // (n * k * 2)))
        rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, device=device) * scale).to(torch.bfloat16)  # noqa: E731
        self.w = [rnd(n, k, scale=k ** -0.5) for _ in range(copies)]
        self.a = [rnd(adapters, r, k, scale=k ** -0.5) for _ in range(copies)]
        blocks = sgmv._blocks(parts, n, r)  # a fused GEMM's B: block-diagonal, zero off its parts' blocks
        self.b = [rnd(adapters, n, r, scale=0.5 / r) * (blocks.to(device, torch.bfloat16) if parts else 1)
                  for _ in range(copies)]
        self.parts = parts
        self.x = rnd(t, k)
        per = max(1, t // adapters)
        self.slots = (torch.arange(t, device=device) // per).clamp(max=adapters - 1).to(torch.int32)

    def __len__(self):
        return len(self.w)


def graph_us(fn, ops: Operands, calls: int = 3, replays: int = 20) -> float:
    """µs a call of fn(i) (i: the weight copy) in a captured graph of calls x copies calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(len(ops)):
            fn(i)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            for i in range(len(ops)):
                fn(i)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls * len(ops))


def variants(ops: Operands, t: int, gemv_too: bool, args_parts_expand: bool = False) -> dict:
    x = ops.x

    def unfused(i):
        h = sgmv.lora_shrink_triton(x, ops.a[i], ops.slots)
        return sgmv.lora_expand_partials(F.linear(x, ops.w[i]), h[None], ops.b[i], ops.slots, parts=ops.parts)

    def gemv_lora(config, summed):
        def run(i):
            h = sgmv.lora_shrink_triton(x, ops.a[i], ops.slots)[None] if summed else \
                sgmv.lora_shrink_partials(x, ops.a[i], ops.slots)
            out = torch.empty((t, ops.w[i].shape[0]), dtype=x.dtype, device=x.device)
            return gemv(x, ops.w[i], None, out, config, lora=(h, ops.b[i], ops.slots))
        return run

    def chunked(chunk, block_k=None):
        def run(i):
            saved = sgmv.SPLIT_K_CHUNK, sgmv._shrink_block_k
            sgmv.SPLIT_K_CHUNK = chunk
            if block_k:
                sgmv._shrink_block_k = lambda k: block_k
            try:
                return unfused(i)
            finally:
                sgmv.SPLIT_K_CHUNK, sgmv._shrink_block_k = saved
        return run

    base = F.linear(x, ops.w[0])
    h0 = sgmv.lora_shrink_triton(x, ops.a[0], ops.slots)
    out = {
        "cublas": (lambda i: F.linear(x, ops.w[i]), False),
        "unfused": (unfused, True),
        "shrink+sum": (lambda i: sgmv.lora_shrink_triton(x, ops.a[i], ops.slots), False),
        "expand": (lambda i: sgmv.lora_expand_partials(base, h0[None], ops.b[i], ops.slots, parts=ops.parts), False),
        "expand, every rank (B's zeros too)": (lambda i: sgmv.lora_expand_partials(base, h0[None], ops.b[i], ops.slots),
                                               False),
        "op": (lambda i: linear_lora_triton(x, ops.w[i], None, ops.a[i], ops.b[i], ops.slots, ops.parts), True),
    }

    def parts_expand(blocks):
        def run(i):
            parts = sgmv.lora_shrink_partials(x, ops.a[i], ops.slots)
            return sgmv.lora_expand_partials(F.linear(x, ops.w[i]), parts, ops.b[i], ops.slots, blocks)
        return run

    for blocks in PLAIN_EXPAND_BLOCKS:
        out[f"expand{list(blocks)}"] = (lambda i, blocks=blocks: sgmv.lora_expand_partials(
            base, h0[None], ops.b[i], ops.slots, blocks, ops.parts), False)
    for blocks in EXPAND_BLOCKS if args_parts_expand else ():
        out[f"parts->expand{list(blocks)}"] = (parts_expand(blocks), True)
    n, k = ops.w[0].shape
    configs = list(dict.fromkeys([c for c in [gemv_config(min(t, 16), n, k)] if c and c.dot] + GEMV_CONFIGS))
    configs = configs if gemv_too else []
    for c in configs:
        name = f"{c.block_n},{c.block_k},{c.num_warps},{c.num_stages}"
        out[f"gemv[{name}] parts"] = (gemv_lora(c, False), True)
        out[f"gemv[{name}] h"] = (gemv_lora(c, True), True)
    for chunk, block_k in CHUNKS if t <= 1024 else ():  # K chunks matter where K is split (decode)
        out[f"unfused, chunk {chunk}, block_k {block_k or 'default'}"] = (chunked(chunk, block_k), True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 32, 16])
    ap.add_argument("--adapters", type=int, default=8, help="distinct adapters over the tokens (bench_lora's "
                    "256 x 64 row runs 128 sequences over 32 slots: --tokens 128 --adapters 32)")
    ap.add_argument("--parts-expand", action="store_true", help="also the expand adding the shrink's partial "
                    "sums itself (H100, 2026-12-07: 1.5-2x the unfused path at 64-128 tokens)")
    ap.add_argument("--gemv", action="store_true", help="also the GEMV's LoRA epilogue past 16 rows (H200, "
                    "2026-12-06: 3-20x slower than the unfused path at 32-64 rows)")
    args = ap.parse_args()
    rows, record = [], {}
    for t in args.tokens:
        step = {}
        for name, (n, k, r, parts) in SHAPES.items():
            ops = Operands(n, k, r, t, seed=t * 7 + n, adapters=args.adapters, parts=parts)
            ref = linear_lora_ref(ops.x, ops.w[0], None, ops.a[0], ops.b[0], ops.slots, ops.parts).float()
            for variant, (fn, full) in variants(ops, t, args.gemv, args.parts_expand).items():
                err = None
                if full:
                    try:
                        err = (fn(0).float() - ref).abs().max().item() / ref.abs().max().item()
                    except Exception as e:  # a config that does not compile: recorded, not timed
                        record[f"{t} {name} {variant}"] = dict(error=repr(e)[:200])
                        print(f"T={t} {name} {variant}: {e!r:.200}", flush=True)
                        continue
                    assert err < 2e-2, f"T={t} {name} {variant}: rel err {err:.3g}"
                us = graph_us(fn, ops)
                step.setdefault(variant, {})[name] = us
                record[f"{t} {name} {variant}"] = dict(us=us, rel_err=err)
                print(f"T={t:4d} {name:8s} {variant:34s} {us:8.2f} us" + (f"  err {err:.2e}" if err else ""),
                      flush=True)
            del ops
            torch.cuda.empty_cache()
        for variant, per in step.items():
            if len(per) == len(SHAPES):
                rows.append({"T": t, "variant": variant, **{s: f"{per[s]:.1f}" for s in SHAPES},
                             "step ms (x32)": f"{sum(per.values()) * LAYERS / 1e3:.2f}"})
        report("lora_linears", f"# LoRA linears, µs a call (Llama-3.1-8B shapes, {args.adapters} adapters, rank 16)\n"
               + markdown(rows), record)  # after each T: a timed-out run keeps what it measured


if __name__ == "__main__":
    main()
