"""Where does `LLM(...)` startup go, and is the engine as fast after it? (issue 19)

    PYTHONPATH=$PWD python bench/probes/startup.py LABEL [--model llama-3.1-8b] [--out FILE.json]

One process: builds the preset with trtllm-bench's throughput sizes (max_batch_size 256,
max_num_tokens 8192, max_seq_len 2304), prints dynamo's compile-time table and one JSON row
(startup split from `engine.startup`, dynamo captures and compiled graphs, then greedy 128/128
output tok/s at batch 1 (best of 3) and 64 (best of 2)); --out also keeps the token ids, to
compare trees. Cold vs warm: run it twice on one TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR,
fresh the first time. CUDA only.
"""
import argparse
import json
import time

started = time.perf_counter()
import torch  # noqa: E402

from trtllm import LLM, SamplingParams  # noqa: E402
from trtllm.cli.model_arg import resolve_model  # noqa: E402
from trtllm.config import BuildConfig  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("label")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    spec = resolve_model(args.model)
    imported = time.perf_counter()
    llm = LLM(**spec.llm_kwargs(dtype="bfloat16"),
              build_config=BuildConfig(max_batch_size=256, max_num_tokens=8192, max_seq_len=2304))
    built = time.perf_counter()
    st, compiled = llm.engine.startup, llm.compiled
    from torch._dynamo.utils import compile_times
    print(compile_times(repr="str", aggregate=True))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, spec.vocab_size, (128,), generator=g).tolist() for _ in range(64)]
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], params, use_tqdm=False)
    speed, tokens = {}, {}
    for name, batch, runs in (("b1", 1, 3), ("b64", 64, 2)):
        best = 0.0
        for _ in range(runs):
            torch.cuda.synchronize()
            t = time.perf_counter()
            outs = llm.generate(prompts[:batch], params, use_tqdm=False)
            best = max(best, batch * 128 / (time.perf_counter() - t))
        speed[name], tokens[name] = round(best, 1), [o.outputs[0].token_ids for o in outs]
    row = dict(label=args.label, import_s=round(imported - started, 1), llm_s=round(built - imported, 1),
               load=round(st.load_s, 1), compile=round(st.compile_s, 1), capture=round(st.cuda_graph_capture_s, 1),
               total=round(st.total_s, 1), captures=compiled.captures, graphs=len(compiled.graphs),
               compile_after_startup=round(compiled.compile_s - st.compile_s, 1), **speed)
    print("ROW", json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(row, tokens=tokens), f)
    llm.shutdown()


if __name__ == "__main__":
    main()
