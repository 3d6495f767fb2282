"""How much slower is sampled decoding than greedy, end to end? (CUDA)

    PYTHONPATH=$PWD python bench/probes/sampled_decode.py LABEL

`LLM(llama-3.1-8b preset, max_batch_size 256, max_num_tokens 8192, max_seq_len 2304)`;
`generate` of 128-token random prompts, 64 new tokens, `ignore_eos`, at batch 1 and 64:
greedy, temperature 0.8 (seed 1), temperature 0.8 with top_p 0.9; median of three timed runs
after one warm-up. Prints `ROW LABEL | batch | mode | tok/s |`. Run it under two trees (the
other's PYTHONPATH) in one call to compare; `$OUT/tokens_LABEL.json` holds the last run's
token ids per row, so two trees' seeded tokens can be compared too.
"""
import json
import os
import statistics
import sys
import time

import torch

from trtllm.cli.model_arg import PRESETS, build_preset
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

MODES = {"greedy": dict(temperature=0.0), "t0.8": dict(temperature=0.8, seed=1),
         "t0.8 p0.9": dict(temperature=0.8, top_p=0.9, seed=1)}


def main(label: str) -> None:
    model = build_preset(PRESETS["llama-3.1-8b"], "bfloat16")
    llm = LLM(model, dtype="bfloat16",
              kv_cache_config=KvCacheConfig(enable_block_reuse=False, free_gpu_memory_fraction=0.85),
              build_config=BuildConfig(max_batch_size=256, max_num_tokens=8192, max_seq_len=2304))
    rows, tokens = [], {}
    for batch in (1, 64):
        for name, kw in MODES.items():
            params = SamplingParams(max_tokens=64, ignore_eos=True, **kw)
            g = torch.Generator().manual_seed(batch)
            walls = []
            for _ in range(4):
                prompts = [torch.randint(0, 128256, (128,), generator=g).tolist() for _b in range(batch)]
                torch.cuda.synchronize()
                t = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                walls.append(time.perf_counter() - t)
            tokens[f"{batch} {name}"] = [o.outputs[0].token_ids for o in outs]
            rows.append((batch, name, batch * 64 / statistics.median(walls[1:])))
    for batch, name, rate in rows:
        print(f"ROW {label} | {batch} | {name} | {rate:,.1f} |")
    with open(os.path.join(os.environ.get("OUT", "/tmp"), f"tokens_{label}.json"), "w") as f:
        json.dump(tokens, f)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "run")
    os._exit(0)  # the engine's threads need not wind down
