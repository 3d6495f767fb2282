"""Where a decode step's host time goes: cProfile of Engine.step at batch 1 and 64.

    PYTHONPATH=$PWD python bench/profile_step.py [--layers N]

A small Llama-shaped model (GPU time per step well under the host time), the engine
stepped directly (no loop thread) so cProfile sees everything.
"""
import argparse
import cProfile
import pstats
import time

import torch

from bench.bench_e2e import SMOKE, build_models
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams


def time_steps(engine) -> tuple[list[float], object]:
    """Wrap engine.step so each call's seconds go to the returned list; returns (the list,
    the original step, to put back)."""
    inner, step = [], engine.step

    def timed_step():
        t = time.perf_counter()
        out = step()
        inner.append(time.perf_counter() - t)
        return out

    engine.step = timed_step
    return inner, step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    _, model = build_models(dict(SMOKE, num_hidden_layers=args.layers))
    llm = LLM(model, build_config=BuildConfig(max_batch_size=64, max_num_tokens=2048, max_seq_len=1024),
              kv_cache_config=KvCacheConfig(max_tokens=1 << 17))
    engine = llm.engine
    # through the loop thread: wall per step vs time inside Engine.step
    inner, step = time_steps(engine)
    for batch in (1, 64):
        llm.generate([list(range(1, 129))] * batch, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
        inner.clear()
        t = time.perf_counter()
        llm.generate([list(range(1, 129))] * batch, SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True),
                     use_tqdm=False)
        wall = time.perf_counter() - t
        print(f"loop thread, batch {batch}: {len(inner)} steps, wall {wall / len(inner) * 1e3:.2f} ms/step, "
              f"inside step {sum(inner) / len(inner) * 1e3:.2f} ms/step")
    engine.step = step
    llm._loop.shutdown()
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    for batch in (1, 64):
        for i in range(batch):
            engine.add_request(f"r{batch}-{i}", list(range(1, 129)), params)
        for _ in range(5):
            engine.step()  # prefill + warm-up
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        for _ in range(100):
            engine.step()
        prof.disable()
        dt = (time.perf_counter() - t) / 100
        print(f"\n=== batch {batch}: {dt * 1e3:.2f} ms/step, {batch / dt:,.0f} tok/s ===")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        while engine.has_unfinished():
            engine.step()


if __name__ == "__main__":
    main()
