"""Does the same greedy batch give the same tokens twice? (decode attention's merge order)

    PYTHONPATH=$PWD python bench/probes/repeat_tokens.py [--model llama-3.1-8b] [--fp8]
        [--batch 4 16] [--new 64] [--repeats 3]

One process, one `LLM` (prefix reuse off, so every run prefills its prompts again): the
same random token-id prompts (128 tokens) generated greedily `--repeats` times at each
batch size. Prints, per batch, how many sequences equal the first run's token for token
in every repeat, and the earliest token where one left it. Written for the batch-4 greedy
tokens that differed between identical trees (2026-12-06, H100) while decode attention's
ticket merge folded the splits in finish order; with the fold in split order (3b7ed8e)
every repeat should be equal. `--fp8`: FP8 weights (per channel, per token) and FP8 KV.
CUDA only.
"""
import argparse
import json
import os

import torch

from trtllm import LLM, SamplingParams
from trtllm.cli.model_arg import resolve_model
from trtllm.config import BuildConfig, KvCacheConfig, QuantConfig


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            return i
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    spec = resolve_model(args.model)
    quant = dict(quant_config=QuantConfig(quant_algo="FP8_PER_CHANNEL_PER_TOKEN", kv_cache_quant_algo="FP8")) \
        if args.fp8 else {}
    llm = LLM(**spec.llm_kwargs(dtype="bfloat16"), **quant,
              build_config=BuildConfig(max_batch_size=max(args.batch), max_seq_len=128 + args.new),
              kv_cache_config=KvCacheConfig(enable_block_reuse=False, free_gpu_memory_fraction=0.5))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, spec.vocab_size, (128,), generator=g).tolist() for _ in range(max(args.batch))]
    params = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)
    rows = []
    for batch in args.batch:
        runs = [[o.outputs[0].token_ids for o in llm.generate(prompts[:batch], params, use_tqdm=False)]
                for _ in range(args.repeats)]
        firsts = [first_difference(runs[0][s], run[s]) for run in runs[1:] for s in range(batch)]
        left = [f for f in firsts if f is not None]
        equal = sum(all(first_difference(runs[0][s], run[s]) is None for run in runs[1:]) for s in range(batch))
        rows.append(dict(batch=batch, repeats=args.repeats, equal=equal, earliest_difference=min(left, default=None)))
    llm.shutdown()
    precision = "FP8 weights + KV" if args.fp8 else "bf16"
    lines = [f"{args.model}, {precision}, greedy {args.new} new tokens after 128, {args.repeats} runs:", "",
             "| batch | sequences equal in every run | earliest differing token |", "|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['equal']} / {r['batch']} | {'-' if r['earliest_difference'] is None else r['earliest_difference']} |" for r in rows]
    print("\n".join(lines))
    if os.environ.get("OUT"):
        name = "repeat_tokens_fp8" if args.fp8 else "repeat_tokens"
        with open(os.path.join(os.environ["OUT"], name + ".json"), "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
