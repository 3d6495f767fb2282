"""The MoE layer alone: moe_routing + fused_moe (what passes/fuse_moe.py places) vs peers.

    PYTHONPATH=$PWD python3 bench/bench_fused_moe.py            # H100/H200
    PYTHONPATH=$PWD python3 bench/bench_fused_moe.py --smoke    # CPU: interpreter, tiny shapes

Shapes (bf16, random weights ~N(0, 1/fan_in)): Qwen3-30B-A3B experts (H 2048, I 768, E 128,
top-8, renormalised), Mixtral-8x7B (H 4096, I 14336, E 8, top-2, renormalised),
DeepSeek-V2-Lite's routed experts (H 2048, I 1408, E 64, top-6, softmax, not renormalised).
A layer = router logits [T, E] -> routing -> experts -> [T, H]; every column computes that.

Peers, in the same run:
- `hf_grouped_mm`: transformers' Qwen3MoeSparseMoeBlock with these weights and its default
  `grouped_mm` experts, torch.compile'd (what `LLM` ran before fuse_moe);
- `hf_loop`: the same block with `eager` experts (HF's per-expert Python loop), torch.compile'd
  (graph breaks allowed): the issue's "HF module compiled" peer;
- `dense`: the bf16 torch.matmul pair of the same total size, x[T*k, H] @ W13^T [H, 2I] then
  [T*k, I] @ W2^T [I, H] (one expert's weights for all rows): the TFLOP/s a dense GEMM of the
  MoE layer's size reaches (the issue's large-T reference).

1. Correctness first: ours against fused_moe_ref (fp32) of the same routing, and against the
   HF block; exit 1 if a relative error is above MAX_REL_ERR, before anything is timed.
2. Decode (T in DECODE_TS): GB/s of the chosen experts' weights (the distinct experts the
   routing picked, 3 H I elements each: 2 bytes bf16, 1 byte FP8) per second, over LAYERS
   copies of the layer's weights in one CUDA graph (more than the L2), beside the 1 GiB copy's
   GB/s (bench/report.py); of_copy = ours / copy (issue 21's floor: 75%, goal 88%). `trtllm` is
   the default path at these sizes (kernels/fused_moe_decode.py: no moe_align, each chosen
   expert read once); `tiles` the grouped GEMM over moe_align's tiles the op took before, on
   the same layers. Rows for bf16 experts and for FP8 experts (kernels/fused_moe_fp8.py) with
   per-channel and 128x128 block scales (the weights quantized here, per expert).
   Then the decode path's tile candidates (DECODE_CANDIDATES: BLOCK_N x BLOCK_K x stages) on the
   first shape, bf16 and FP8 block experts, T = 1 and 16: the rows that choose `decode_config`'s
   table (kernels/fused_moe_decode.py; --smoke checks each candidate computes what the default does).
3. The grouped GEMM's tile candidates (TILE_CANDIDATES: BLOCK_M x BLOCK_N x BLOCK_K x warps x
   stages x GROUP_M, bf16 experts) at each shape's TILE_TS: a decode batch of 256 (every expert
   chosen: GB/s of the weights) and 8,192 tokens (TFLOP/s): the rows that choose `moe_config`'s
   table (kernels/fused_moe.py).
4. Large T (PREFILL_TS): TFLOP/s = 2 T k 3 H I / time, ours, the peers and the dense pair; and
   ours over FP8 experts (block scales) in the same row.
Table last, also written to $OUT/bench_fused_moe.{md,json} (bench/report.py).
`--parts decode,configs,tiles,large` (default all of them) runs only the named steps after step 1;
`--shapes qwen3-30b-a3b,...` only those shapes (all steps, the check too). The whole bench takes more
than 10 minutes on an H200 (the tile sweep ~5): split it over calls with these.
--smoke runs step 1 on CPU under TRITON_INTERPRET=1 (fp32, tiny shapes) and skips the timing.
"""
import functools
import os
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before triton is imported: @triton.jit reads it when a kernel is defined
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

from bench.report import copy_ceiling_tbs, markdown, report  # noqa: E402
from trtllm.config import QuantAlgo  # noqa: E402
from trtllm.kernels.fused_moe import MoeConfig, fused_moe_ref, fused_moe_triton  # noqa: E402
from trtllm.kernels.fused_moe_decode import DecodeConfig  # noqa: E402
from trtllm.kernels.fused_moe_fp8 import fused_moe_fp8_ref, fused_moe_fp8_triton  # noqa: E402
from trtllm.kernels.moe_routing import moe_routing  # noqa: E402
from trtllm.quantization.fp8_linears import quantize_expert_weights  # noqa: E402

# name -> (H, I, E, top_k, renormalize)
SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8, True), "mixtral-8x7b": (4096, 14336, 8, 2, True),
          "deepseek-v2-lite": (2048, 1408, 64, 6, False)}
DECODE_TS = (1, 4, 16)
DECODE_CANDIDATES = [DecodeConfig(n, k, 4, stages) for n in (16, 32, 64) for k in (64, 128, 256)
                     for stages in (3, 4, 5)]  # 4: decode_config's
TILE_TS = (256, 8192)
_GROUPED = 0  # MoeConfig.group_m: row tiles fastest (no grouping)
TILE_CANDIDATES = [MoeConfig(*tile, group_m=g) for g in (_GROUPED, 8) for tile in (
    (16, 64, 128, 4, 4), (16, 128, 128, 4, 3), (32, 64, 128, 4, 4), (32, 128, 64, 4, 4),
    (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (64, 128, 64, 4, 4), (64, 128, 128, 4, 3), (64, 256, 64, 8, 3),
    (128, 64, 64, 4, 4), (128, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3))]
# expert weights: bf16, or FP8 at QuantConfig's granularity (kernels/fused_moe_fp8.py)
EXPERTS = {"bf16": None, "fp8 channel": QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN, "fp8 block": QuantAlgo.FP8_BLOCK_SCALES}
PREFILL_TS = (8192,)
MAX_REL_ERR = 2e-2       # bf16 layer (HF rounds h and each expert's output in bf16; ours h and o)
# FP8 experts vs fused_moe_fp8_ref: both round h (SiLU(gate) * up) to bf16 and quantize it to e4m3, but
# their fp32 GEMM sums differ in order, so an h element can round one bf16 step apart; where that
# element is its 1x128 group's amax (block scales), the group's scale moves and all 128 elements
# re-round to e4m3 (3 mantissa bits): a few % on that group. The H200 measured 1.1-2.5e-2 with block
# scales at 1-16 tokens (2026-12-03), 0.3-0.6e-2 per channel (one scale a row: rarely moved).
MAX_REL_ERR_FP8 = 4e-2
WEIGHT_BUDGET = 4e9      # bytes of layer copies for the decode timing (L2: 50-60 MB)
DEVICE, DTYPE = ("cpu", torch.float32) if SMOKE else ("cuda", torch.bfloat16)
if SMOKE:
    SHAPES = {"tiny": (64, 32, 8, 2, True), "tiny-no-renorm": (64, 48, 4, 3, False)}
    DECODE_TS, PREFILL_TS, TILE_TS = (1, 7), (33,), (33,)
    TILE_CANDIDATES = [MoeConfig(16, 32, 32, 4, 1, g) for g in (_GROUPED, 2)]
PARTS = ("decode", "configs", "tiles", "large")
if "--parts" in sys.argv:
    PARTS = tuple(sys.argv[sys.argv.index("--parts") + 1].split(","))
if "--shapes" in sys.argv:
    _wanted = sys.argv[sys.argv.index("--shapes") + 1].split(",")
    if set(_wanted) - set(SHAPES):
        sys.exit(f"--shapes: no such shape {sorted(set(_wanted) - set(SHAPES))} (shapes: {', '.join(SHAPES)})")
    SHAPES = {name: SHAPES[name] for name in _wanted}


class Layer:
    """One MoE layer's weights, and the HF block holding the same tensors."""

    def __init__(self, hidden, inter, experts, top_k, renormalize, fp8: QuantAlgo | None = None):
        self.top_k, self.renormalize = top_k, renormalize
        self.router = torch.randn(experts, hidden, device=DEVICE, dtype=DTYPE) * hidden ** -0.5
        self.w13 = torch.randn(experts, 2 * inter, hidden, device=DEVICE, dtype=DTYPE) * hidden ** -0.5
        self.w2 = torch.randn(experts, hidden, inter, device=DEVICE, dtype=DTYPE) * inter ** -0.5
        self.fp8 = None
        if fp8 is not None:  # (w13, w2, their scales); the bf16 copies are kept for the HF peer
            self.fp8 = (*quantize_expert_weights(self.w13, fp8), *quantize_expert_weights(self.w2, fp8))

    def ours(self, x, decode=None, decode_cfg=None, config=None):
        """decode None: the op's own choice (the decode path for T <= 16); True / False: that path;
        decode_cfg: the decode path's tiles (None: decode_config's); config: the grouped GEMM's
        tiles (None: moe_config's)."""
        w, ids = moe_routing(x @ self.router.T, self.top_k, "softmax", self.renormalize)
        if self.fp8 is not None:
            w13, s13, w2, s2 = self.fp8
            return fused_moe_fp8_triton(x, w13, w2, s13, s2, w, ids, decode=decode, decode_cfg=decode_cfg,
                                        config=config)
        return fused_moe_triton(x, self.w13, self.w2, w, ids, decode=decode, decode_cfg=decode_cfg, config=config)

    def reference(self, x):
        w, ids = moe_routing(x @ self.router.T, self.top_k, "softmax", self.renormalize)
        if self.fp8 is not None:
            w13, s13, w2, s2 = self.fp8
            return fused_moe_fp8_ref(x, w13, w2, s13, s2, w, ids)
        return fused_moe_ref(x.float(), self.w13.float(), self.w2.float(), w, ids)

    @property
    def weight_element_bytes(self) -> int:
        return 1 if self.fp8 is not None else self.w2.element_size()

    def hf_block(self, experts_implementation):
        import transformers
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        experts, inter2, hidden = self.w13.shape
        config = transformers.Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter2 // 2,
                                             num_experts=experts, num_experts_per_tok=self.top_k,
                                             norm_topk_prob=self.renormalize, num_attention_heads=4)
        config._experts_implementation = experts_implementation
        with torch.device("meta"):
            block = Qwen3MoeSparseMoeBlock(config)
        block.gate.weight = torch.nn.Parameter(self.router, requires_grad=False)
        block.experts.gate_up_proj = torch.nn.Parameter(self.w13, requires_grad=False)
        block.experts.down_proj = torch.nn.Parameter(self.w2, requires_grad=False)
        return block.eval()

    def chosen_bytes(self, x) -> int:
        _, ids = moe_routing(x @ self.router.T, self.top_k, "softmax", self.renormalize)
        return ids.unique().numel() * 3 * self.w2.shape[1] * self.w2.shape[2] * self.weight_element_bytes


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def check() -> list[dict]:
    """Ours vs the reference of its weights (bf16: fused_moe_ref; FP8: fused_moe_fp8_ref, the same
    activation quantizations) and, for bf16, vs HF's block; at decode sizes the tile path too."""
    rows, bad = [], []
    for name, shape in SHAPES.items():
        for experts, algo in EXPERTS.items():
            layer = Layer(*shape, fp8=algo)
            hf = layer.hf_block("grouped_mm" if DEVICE == "cuda" else "batched_mm") if algo is None else None
            for t in (*DECODE_TS, *PREFILL_TS):
                x = torch.randn(t, shape[0], device=DEVICE, dtype=DTYPE)
                with torch.no_grad():
                    y = layer.ours(x)
                    errs = dict(rel_err_ref=rel_err(y, layer.reference(x)))
                    if hf is not None:
                        errs["rel_err_hf"] = rel_err(y, hf(x[None])[0])
                    if t <= max(DECODE_TS):
                        errs["rel_err_tiles"] = rel_err(y, layer.ours(x, decode=False))
                row = dict(shape=name, experts=experts, tokens=t,
                           **{k: f"{errs[k]:.1e}" if k in errs else "-"
                              for k in ("rel_err_ref", "rel_err_hf", "rel_err_tiles")})
                rows.append(row)
                if max(errs.values()) > (MAX_REL_ERR if algo is None else MAX_REL_ERR_FP8):
                    bad.append(row)
                print(row, flush=True)
    if bad:
        print(f"FAILED correctness (max rel. err {MAX_REL_ERR}, FP8 experts {MAX_REL_ERR_FP8}):", *bad, sep="\n")
        sys.exit(1)
    return rows


def seconds(fn) -> float:
    """Seconds per call of fn, replayed in a CUDA graph."""
    return triton.testing.do_bench_cudagraph(fn, rep=200) * 1e-3


def run_layers(layers: list[Layer], x: torch.Tensor, decode=None, decode_cfg=None) -> None:
    for layer in layers:
        layer.ours(x, decode=decode, decode_cfg=decode_cfg)


def candidates(kind: str) -> list[DecodeConfig]:
    """DECODE_CANDIDATES the kind takes (block scales: BLOCK_K divides 128)."""
    return [c for c in DECODE_CANDIDATES if EXPERTS[kind] != QuantAlgo.FP8_BLOCK_SCALES or 128 % c.block_k == 0]


def too_big(fn, cfg) -> bool:
    """Whether fn() fails for lack of shared memory (a candidate's tiles x stages); it is then dropped."""
    try:
        fn()
    except OutOfResources as e:
        print(f"dropped {cfg}: {e}", flush=True)
        return True
    return False


def check_candidates() -> None:
    """Each decode tile candidate computes what the default does (CPU interpreter, tiny shapes);
    those whose tiles do not fit the GPU's shared memory are dropped from DECODE_CANDIDATES."""
    shape = next(iter(SHAPES.values()))
    for kind in ("bf16", "fp8 block"):
        layer = Layer(*shape, fp8=EXPERTS[kind])
        x = torch.randn(max(DECODE_TS), shape[0], device=DEVICE, dtype=DTYPE)
        want = layer.ours(x, decode=True)
        for cfg in candidates(kind)[:: 1 if DEVICE == "cuda" else 4]:  # interpreted: every 4th
            if too_big(functools.partial(layer.ours, x, True, cfg), cfg):
                DECODE_CANDIDATES.remove(cfg)
                continue
            err = rel_err(layer.ours(x, decode=True, decode_cfg=cfg), want)
            if err > MAX_REL_ERR:
                print(f"FAILED decode candidate {cfg} ({kind}): rel. err {err:.1e}")
                sys.exit(1)
    print("decode candidates agree with decode_config's", flush=True)


def decode_sweep(rows: list[dict]) -> None:
    copy_gbs = copy_ceiling_tbs() * 1e3
    name, shape = next(iter(SHAPES.items()))
    hidden, inter, experts = shape[:3]
    for kind in ("bf16", "fp8 block"):
        layer_bytes = 3 * experts * hidden * inter * (2 if EXPERTS[kind] is None else 3)
        layers = [Layer(*shape, fp8=EXPERTS[kind]) for _ in range(max(2, min(32, int(WEIGHT_BUDGET // layer_bytes))))]
        for t in (1, max(DECODE_TS)):
            x = torch.randn(t, hidden, device=DEVICE, dtype=DTYPE)
            chosen = sum(layer.chosen_bytes(x) for layer in layers)
            for cfg in candidates(kind):
                sec = seconds(functools.partial(run_layers, layers, x, True, cfg))
                rows.append(dict(regime="decode config", shape=name, experts=kind, tokens=t, block_n=cfg.block_n,
                                 block_k=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                 gbs=f"{chosen / sec / 1e9:.0f}", of_copy=f"{chosen / sec / 1e9 / copy_gbs:.0%}"))
                print(rows[-1], flush=True)
        del layers


def check_tile_candidates() -> None:
    """Each grouped-GEMM tile candidate computes what the default does."""
    for shape in SHAPES.values():
        layer = Layer(*shape)
        x = torch.randn(max(TILE_TS), shape[0], device=DEVICE, dtype=DTYPE)
        want = layer.ours(x, decode=False)
        for cfg in list(TILE_CANDIDATES):
            if too_big(functools.partial(layer.ours, x, False, None, cfg), cfg):
                TILE_CANDIDATES.remove(cfg)
                continue
            err = rel_err(layer.ours(x, config=cfg), want)
            if err > MAX_REL_ERR:
                print(f"FAILED tile candidate {cfg}: rel. err {err:.1e}")
                sys.exit(1)
        if DEVICE == "cpu":
            break
    print("tile candidates agree with moe_config's", flush=True)


def tile_sweep(rows: list[dict]) -> None:
    copy_gbs = copy_ceiling_tbs() * 1e3
    for name, shape in SHAPES.items():
        hidden, inter, experts, top_k, _ = shape
        layer = Layer(*shape)
        for t in TILE_TS:
            x = torch.randn(t, hidden, device=DEVICE, dtype=DTYPE)
            chosen = layer.chosen_bytes(x)
            flop = 2 * t * top_k * 3 * hidden * inter
            for cfg in TILE_CANDIDATES:
                sec = seconds(functools.partial(layer.ours, x, False, None, cfg))
                rows.append(dict(regime="tile config", shape=name, tokens=t, **cfg._asdict(),
                                 us=f"{sec * 1e6:.0f}", tflops=f"{flop / sec / 1e12:.0f}",
                                 gbs=f"{chosen / sec / 1e9:.0f}", of_copy=f"{chosen / sec / 1e9 / copy_gbs:.0%}"))
                print(rows[-1], flush=True)
        del layer


def dense_pair(xk: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x[T*k, H] @ W13^T [H, 2I], its first I columns @ W2^T [I, H]: one expert for every row."""
    return (xk @ w13.T)[:, : w2.shape[1]] @ w2.T


def decode(rows: list[dict]) -> None:
    copy_gbs = copy_ceiling_tbs() * 1e3
    print(f"device copy (bench/report.py): {copy_gbs:.0f} GB/s (read + write)")
    for name, shape in SHAPES.items():
        hidden, inter, experts = shape[:3]
        for kind, algo in EXPERTS.items():
            layer_bytes = 3 * experts * hidden * inter * (2 if algo is None else 3)  # FP8: bf16 kept + fp8
            layers = [Layer(*shape, fp8=algo) for _ in range(max(2, min(32, int(WEIGHT_BUDGET // layer_bytes))))]
            for t in DECODE_TS:
                x = torch.randn(t, hidden, device=DEVICE, dtype=DTYPE)
                chosen = sum(layer.chosen_bytes(x) for layer in layers)
                ours = seconds(functools.partial(run_layers, layers, x))
                tiles = seconds(functools.partial(run_layers, layers, x, decode=False))
                rows.append(dict(regime="decode", shape=name, experts=kind, tokens=t, layers=len(layers),
                                 chosen_mb_per_layer=f"{chosen / len(layers) / 1e6:.0f}",
                                 trtllm_gbs=f"{chosen / ours / 1e9:.0f}",
                                 of_copy=f"{chosen / ours / 1e9 / copy_gbs:.0%}",
                                 trtllm_us_per_layer=f"{ours / len(layers) * 1e6:.1f}",
                                 tiles_gbs=f"{chosen / tiles / 1e9:.0f}",
                                 tiles_of_copy=f"{chosen / tiles / 1e9 / copy_gbs:.0%}"))
                print(rows[-1], flush=True)
            del layers


def prefill(rows: list[dict]) -> None:
    for name, shape in SHAPES.items():
        hidden, inter, _, top_k, _ = shape
        layer = Layer(*shape)
        for t in PREFILL_TS:
            flop = 2 * t * top_k * 3 * hidden * inter
            x = torch.randn(t, hidden, device=DEVICE, dtype=DTYPE)
            xk = torch.randn(t * top_k, hidden, device=DEVICE, dtype=DTYPE)
            dense = seconds(functools.partial(dense_pair, xk, layer.w13[0], layer.w2[0]))
            ours = seconds(functools.partial(layer.ours, x))
            fp8_layer = Layer(*shape, fp8=QuantAlgo.FP8_BLOCK_SCALES)
            ours_fp8 = seconds(functools.partial(fp8_layer.ours, x))
            del fp8_layer
            peers = {}
            for impl in ("grouped_mm", "eager"):
                block = torch.compile(layer.hf_block(impl), fullgraph=impl != "eager")
                with torch.no_grad():
                    block(x[None])  # compile outside the timing
                    peers[impl] = triton.testing.do_bench(functools.partial(block, x[None]), rep=200) * 1e-3
            rows.append(dict(regime="large T", shape=name, tokens=t, trtllm_tflops=f"{flop / ours / 1e12:.0f}",
                             hf_grouped_mm_tflops=f"{flop / peers['grouped_mm'] / 1e12:.0f}",
                             hf_loop_tflops=f"{flop / peers['eager'] / 1e12:.0f}",
                             dense_tflops=f"{flop / dense / 1e12:.0f}", vs_dense=f"{dense / ours:.2f}",
                             trtllm_fp8_block_tflops=f"{flop / ours_fp8 / 1e12:.0f}"))
            print(rows[-1], flush=True)


def main() -> None:
    torch.manual_seed(0)
    if DEVICE == "cuda":
        print(torch.cuda.get_device_name(), f"torch {torch.__version__}, triton {triton.__version__}")
    rows = check()
    check_candidates()
    check_tile_candidates()
    if SMOKE:
        report("bench_fused_moe", "MoE layer correctness (--smoke, CPU interpreter)\n" + markdown(rows),
               dict(correctness=rows))
        return
    timed: list[dict] = []
    sweep: list[dict] = []
    tiles: list[dict] = []
    if "decode" in PARTS:
        decode(timed)
    if "configs" in PARTS:
        decode_sweep(sweep)
    if "tiles" in PARTS:
        tile_sweep(tiles)
    if "large" in PARTS:
        prefill(timed)
    report("bench_fused_moe", "MoE layer: moe_routing + fused_moe (bf16 and FP8 experts) vs HF's block and the "
           "dense GEMM\n"
           + markdown(timed) + "\n\nThe decode path's tile candidates\n" + markdown(sweep)
           + "\n\nThe grouped GEMM's tile candidates\n" + markdown(tiles),
           dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                correctness=rows, timing=timed, decode_configs=sweep, tile_configs=tiles))


if __name__ == "__main__":
    main()
