"""Run under torchrun by tests/parallel/test_torchrun.py (as docs/parallel.md launches an LLM
across nodes): every rank runs this same program; `LLM(...)` on a rank other than 0 serves rank
0's steps and exits, so only rank 0 reaches the lines after it and writes the greedy tokens.

    torchrun --nnodes 2 --nproc_per_node 1 ... tests/parallel/torchrun_llm.py MODEL_DIR OUT.json
"""
from __future__ import annotations

import json
import os
import sys

from trtllm import LLM, SamplingParams
from trtllm.config import BuildConfig, KvCacheConfig

PROMPTS = [[5, 17, 33, 9, 100, 42, 7, 8, 9, 10, 11, 12, 13, 14], [3, 4, 5], list(range(200, 214))]


def main(model_dir: str, out: str) -> None:
    os.environ["TRITON_INTERPRET"] = "0"  # the ops' torch references, as tests/runtime
    llm = LLM(model_dir, dtype="float32", device="cpu", pipeline_parallel_size=2,
              kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=256),
              build_config=BuildConfig(max_batch_size=4, max_num_tokens=8, max_seq_len=32))
    with llm:
        outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                               use_tqdm=False)
    with open(out, "w") as f:
        json.dump({"rank": int(os.environ["RANK"]), "tokens": [o.outputs[0].token_ids for o in outputs]}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
