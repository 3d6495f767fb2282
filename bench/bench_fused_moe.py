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
   routing picked, 3 H I bf16 each) per second, over LAYERS copies of the layer's weights in
   one CUDA graph (more than the L2), beside the 1 GiB copy's GB/s (bench/report.py);
   of_copy = ours / copy.
3. Large T (PREFILL_TS): TFLOP/s = 2 T k 3 H I / time, ours, the peers and the dense pair.
Table last, also written to $OUT/bench_fused_moe.{md,json} (bench/report.py).
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

from bench.report import copy_ceiling_tbs, markdown, report  # noqa: E402
from trtllm.kernels.fused_moe import fused_moe, fused_moe_ref  # noqa: E402
from trtllm.kernels.moe_routing import moe_routing  # noqa: E402

# name -> (H, I, E, top_k, renormalize)
SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8, True), "mixtral-8x7b": (4096, 14336, 8, 2, True),
          "deepseek-v2-lite": (2048, 1408, 64, 6, False)}
DECODE_TS = (1, 4, 16)
PREFILL_TS = (8192,)
MAX_REL_ERR = 2e-2       # bf16 layer (HF rounds h and each expert's output in bf16; ours h and o)
WEIGHT_BUDGET = 4e9      # bytes of layer copies for the decode timing (L2: 50-60 MB)
DEVICE, DTYPE = ("cpu", torch.float32) if SMOKE else ("cuda", torch.bfloat16)
if SMOKE:
    SHAPES = {"tiny": (64, 32, 8, 2, True), "tiny-no-renorm": (64, 48, 4, 3, False)}
    DECODE_TS, PREFILL_TS = (1, 7), (33,)


class Layer:
    """One MoE layer's weights, and the HF block holding the same tensors."""

    def __init__(self, hidden, inter, experts, top_k, renormalize):
        self.top_k, self.renormalize = top_k, renormalize
        self.router = torch.randn(experts, hidden, device=DEVICE, dtype=DTYPE) * hidden ** -0.5
        self.w13 = torch.randn(experts, 2 * inter, hidden, device=DEVICE, dtype=DTYPE) * hidden ** -0.5
        self.w2 = torch.randn(experts, hidden, inter, device=DEVICE, dtype=DTYPE) * inter ** -0.5

    def ours(self, x):
        w, ids = moe_routing(x @ self.router.T, self.top_k, "softmax", self.renormalize)
        return fused_moe(x, self.w13, self.w2, w, ids)

    def reference(self, x):
        w, ids = moe_routing(x @ self.router.T, self.top_k, "softmax", self.renormalize)
        return fused_moe_ref(x.float(), self.w13.float(), self.w2.float(), w, ids)

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
        return ids.unique().numel() * 3 * self.w2.shape[1] * self.w2.shape[2] * self.w2.element_size()


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def check() -> list[dict]:
    rows, bad = [], []
    for name, shape in SHAPES.items():
        layer = Layer(*shape)
        hf = layer.hf_block("grouped_mm" if DEVICE == "cuda" else "batched_mm")
        for t in (*DECODE_TS, *PREFILL_TS):
            x = torch.randn(t, shape[0], device=DEVICE, dtype=DTYPE)
            with torch.no_grad():
                y, hf_y = layer.ours(x), hf(x[None])[0]
            row = dict(shape=name, tokens=t, rel_err_ref=f"{rel_err(y, layer.reference(x)):.1e}",
                       rel_err_hf=f"{rel_err(y, hf_y):.1e}")
            rows.append(row)
            if max(float(row["rel_err_ref"]), float(row["rel_err_hf"])) > MAX_REL_ERR:
                bad.append(row)
            print(row, flush=True)
    if bad:
        print(f"FAILED correctness (max rel. err {MAX_REL_ERR}):", *bad, sep="\n")
        sys.exit(1)
    return rows


def seconds(fn) -> float:
    """Seconds per call of fn, replayed in a CUDA graph."""
    return triton.testing.do_bench_cudagraph(fn, rep=200) * 1e-3


def run_layers(layers: list[Layer], x: torch.Tensor) -> None:
    for layer in layers:
        layer.ours(x)


def dense_pair(xk: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x[T*k, H] @ W13^T [H, 2I], its first I columns @ W2^T [I, H]: one expert for every row."""
    return (xk @ w13.T)[:, : w2.shape[1]] @ w2.T


def decode(rows: list[dict]) -> None:
    copy_gbs = copy_ceiling_tbs() * 1e3
    print(f"device copy (bench/report.py): {copy_gbs:.0f} GB/s (read + write)")
    for name, shape in SHAPES.items():
        hidden, inter, experts = shape[:3]
        layer_bytes = 3 * experts * hidden * inter * 2
        layers = [Layer(*shape) for _ in range(max(2, min(32, int(WEIGHT_BUDGET // layer_bytes))))]
        for t in DECODE_TS:
            x = torch.randn(t, hidden, device=DEVICE, dtype=DTYPE)
            chosen = sum(layer.chosen_bytes(x) for layer in layers)
            ours = seconds(functools.partial(run_layers, layers, x))
            rows.append(dict(regime="decode", shape=name, tokens=t, layers=len(layers),
                             chosen_mb_per_layer=f"{chosen / len(layers) / 1e6:.0f}",
                             trtllm_gbs=f"{chosen / ours / 1e9:.0f}", of_copy=f"{chosen / ours / 1e9 / copy_gbs:.0%}",
                             trtllm_us_per_layer=f"{ours / len(layers) * 1e6:.1f}"))
            print(rows[-1], flush=True)


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
            peers = {}
            for impl in ("grouped_mm", "eager"):
                block = torch.compile(layer.hf_block(impl), fullgraph=impl != "eager")
                with torch.no_grad():
                    block(x[None])  # compile outside the timing
                    peers[impl] = triton.testing.do_bench(functools.partial(block, x[None]), rep=200) * 1e-3
            rows.append(dict(regime="large T", shape=name, tokens=t, trtllm_tflops=f"{flop / ours / 1e12:.0f}",
                             hf_grouped_mm_tflops=f"{flop / peers['grouped_mm'] / 1e12:.0f}",
                             hf_loop_tflops=f"{flop / peers['eager'] / 1e12:.0f}",
                             dense_tflops=f"{flop / dense / 1e12:.0f}", vs_dense=f"{dense / ours:.2f}"))
            print(rows[-1], flush=True)


def main() -> None:
    torch.manual_seed(0)
    if DEVICE == "cuda":
        print(torch.cuda.get_device_name(), f"torch {torch.__version__}, triton {triton.__version__}")
    rows = check()
    if SMOKE:
        report("bench_fused_moe", "MoE layer correctness (--smoke, CPU interpreter)\n" + markdown(rows),
               dict(correctness=rows))
        return
    timed: list[dict] = []
    decode(timed)
    prefill(timed)
    report("bench_fused_moe", "MoE layer: moe_routing + fused_moe vs HF's block and the dense GEMM\n"
           + markdown(timed), dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                   triton=triton.__version__, correctness=rows, timing=timed))


if __name__ == "__main__":
    main()
