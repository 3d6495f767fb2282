"""Does a static-input-scale FP8 checkpoint run batch 1 as fast as dynamic FP8? Writes one to
compare: a preset at real shapes with random weights (trtllm/cli/model_arg.py), its linears'
input scales calibrated on a few random prompts, quantized and saved as trtllm-build
--activation_scheme static would (quantization/calibrate.py, export.py; no tokenizer needed).

    PYTHONPATH=$PWD python bench/probes/static_fp8_checkpoint.py /tmp/l8s [--model llama-3.1-8b] [--algo FP8]
    B="python -m trtllm.cli.bench"
    $B --model llama-3.1-8b prepare-dataset --num_requests 8 --input_mean 128 --output_mean 128 --seed 1 \\
        --output /tmp/lat.jsonl
    $B --model /tmp/l8s latency --dataset /tmp/lat.jsonl --max_seq_len 2304                  # static
    $B --model llama-3.1-8b latency --dataset /tmp/lat.jsonl --max_seq_len 2304 --quantization FP8  # dynamic

H100, 2026-12-06 (docs/decisions/decode_launches.md): static 266.5 tok/s against dynamic
per-tensor 272.3 at 3c4a43b; the static down projection ran fp8_gemm's tl.dot GEMV, which
e5fd1f0 replaced by the CUDA-core one (silu_mul_fp8_gemm's static mode).
"""
import argparse
import json
import time
from pathlib import Path

import torch

from trtllm.cli.model_arg import PRESETS, build_preset
from trtllm.config import QuantAlgo
from trtllm.quantization.calibrate import input_amax, set_input_scales
from trtllm.quantization.export import export_fp8_checkpoint
from trtllm.quantization.fp8_linears import quantize_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output_dir")
    ap.add_argument("--model", default="llama-3.1-8b", choices=sorted(PRESETS))
    ap.add_argument("--algo", default="FP8", choices=["FP8", "FP8_PER_CHANNEL_PER_TOKEN"])
    ap.add_argument("--prompts", type=int, default=4, help="random calibration prompts of 128 tokens")
    args = ap.parse_args()
    out = Path(args.output_dir)
    src = out.with_name(out.name + "_config")  # config.json only: export copies it with quantization_config
    src.mkdir(parents=True, exist_ok=True)
    config = dict(PRESETS[args.model], torch_dtype="bfloat16")
    (src / "config.json").write_text(json.dumps(config))
    t0 = time.perf_counter()
    model = build_preset(config, "bfloat16", "cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, config["vocab_size"], (128,), generator=g).tolist() for _ in range(args.prompts)]
    amax = input_amax(model, prompts)
    set_input_scales(quantize_model(model, QuantAlgo(args.algo)), amax)
    files = export_fp8_checkpoint(model, src, out, QuantAlgo(args.algo))
    print(f"{out}: {args.model} {args.algo} with static input scales, {len(files)} weight files, "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
