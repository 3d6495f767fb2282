"""How long does `trtllm.compile`'s first call take on a MoE model: our file or transformers' module?

    PYTHONPATH=$PWD python bench/probes/moe_compile.py ours|hf [--layers 48]

A Qwen3-MoE of test width (hidden 64, 128 experts, top-8, Qwen3-30B-A3B's layer count by default)
with random weights, on the CPU: models/qwen3_moe.py (`ours`) or transformers' Qwen3MoeForCausalLM
(`hf`), compiled, then called once on 5 tokens: dynamo's capture and the passes (fuse_moe among
them), what `LLM(...)`'s start-up pays per graph capture. Prints the seconds.
Answer (2026-12-04, the 2-core dev machine idle, two runs each): ours 13.6 / 13.2 s, hf 16.9 / 16.4 s.
(With a CI run beside it, 20.7 against 74.1 s: the HF module's tracing suffers more from a busy machine.)
"""
import argparse
import time

import torch
import transformers

import trtllm
from trtllm.models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=("ours", "hf"))
    ap.add_argument("--layers", type=int, default=48)
    args = ap.parse_args()
    cfg = transformers.Qwen3MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, num_experts=128, num_experts_per_tok=8)
    torch.manual_seed(0)
    if args.which == "hf":
        model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig.from_hf(cfg.to_dict()))
        for p in model.parameters():
            torch.nn.init.normal_(p, 0, 0.02)
        model.init_buffers("cpu")
        model.eval().requires_grad_(False)
    compiled = trtllm.compile(model)
    start = time.perf_counter()
    compiled(torch.randint(0, 500, (1, 5)), torch.arange(5)[None])
    print(f"{args.which}: first call (capture + passes) {time.perf_counter() - start:.1f} s, {args.layers} layers")


if __name__ == "__main__":
    main()
