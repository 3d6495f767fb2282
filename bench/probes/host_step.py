"""Host (Python) cost of one decode step, on CPU, with the model's forward made free.

    PYTHONPATH=$PWD python bench/probes/host_step.py [--profile] [--new 200] [--batches 1 64]

A tiny random Llama behind a real `LLM` (device="cpu"), whose runner is given what a GPU
run has: "decode graphs" for every batch bucket, here stand-ins whose replay() does
nothing and whose greedy picks are a fixed tensor, so a decode step takes the very path
it takes on the H100 (graph replay, picks read back, no sampler) minus the device work.
Prefill calls a stub returning zero logits. What is left is the host's work per step:
scheduling, inputs, attention metadata, the sampled-token books, outputs.

Measured per batch (B requests of a 128-token prompt, `--new` greedy tokens, ignore_eos):
- step: µs per decode step of `Engine.step` called directly (the engine-loop thread's
  share of the host path); stream: the same with streaming requests (an output per
  request per step, as the serving core asks for);
- loop: µs per step of `LLM.generate` through the engine-loop thread, wall / steps.
With --profile, cProfile of the direct steps (top functions by own time).
"""
import argparse
import cProfile
import pstats
import time

import torch

from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.models.llama import LlamaConfig, LlamaForCausalLM
from trtllm.runtime.cuda_graphs import cuda_graph_batch_sizes
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False)
PROMPT = list(range(1, 129))


class _NoGraph:
    def replay(self) -> None:
        pass


class ZeroLogits:
    """The compiled model's call signature; logits of zeros for the rows asked for (beam_step.py uses it too)."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, input_ids, positions, rows=None):
        n = input_ids.shape[1] if rows is None else rows.shape[0]
        return torch.zeros(n, self.vocab)


def build_llm(max_batch: int) -> LLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_hf(__import__("transformers").LlamaConfig(**TINY)))
    model.init_buffers(torch.device("cpu"))
    model.eval().requires_grad_(False)
    llm = LLM(model, enable_cuda_graph=False, device="cpu",
              build_config=BuildConfig(max_batch_size=max_batch, max_num_tokens=max(2048, 128 * max_batch),
                                       max_seq_len=1024),
              kv_cache_config=KvCacheConfig(tokens_per_block=32, max_tokens=max_batch * 512))
    runner, vocab = llm.engine.runner, TINY["vocab_size"]
    runner.compiled = ZeroLogits(vocab)
    for b in cuda_graph_batch_sizes(max_batch):  # what CudaGraphs.capture_decode leaves, minus CUDA
        greedy = torch.stack([torch.arange(b) % vocab + 1, torch.ones(b, dtype=torch.long)])
        runner.cuda_graphs.decode[b] = (_NoGraph(), torch.zeros(b, vocab), greedy)
    return llm


def direct_steps(llm: LLM, batch: int, new: int, profile: bool, stream: bool = False) -> float:
    """µs per decode step of Engine.step, prefill steps excluded; with `stream`, every
    step emits every request's progress (the serving core's requests)."""
    engine = llm.engine
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", list(PROMPT), params, stream=stream)
    engine.step()  # prefill of all of them (one step: max_num_tokens covers it)
    assert all(s.output_token_ids for s in engine.scheduler.running)
    steps, seconds = steps_to_end(engine, profile)
    return seconds / steps * 1e6


def steps_to_end(engine, profile: bool, top: int = 22) -> tuple[int, float]:
    """`Engine.step` until no request is left: (steps, seconds, the device synchronized at the
    end); with `profile`, cProfile's `top` functions by own time, printed after the timing."""
    prof = cProfile.Profile() if profile else None
    steps, t = 0, time.perf_counter()
    if prof:
        prof.enable()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    return steps, seconds


def loop_steps(llm: LLM, batch: int, new: int) -> float:
    """µs per step of LLM.generate (engine-loop thread), wall / steps, prefill included."""
    engine, inner = llm.engine, [0]
    step = engine.step

    def counted():
        inner[0] += 1
        return step()

    engine.step = counted
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    llm.generate([list(PROMPT)] * batch, params, use_tqdm=False)
    wall = time.perf_counter() - t
    engine.step = step
    return wall / inner[0] * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--new", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5, help="best of this many runs")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for batch in args.batches:
        llm = build_llm(max(batch, 8))
        loop_steps(llm, batch, 8)  # warm-up
        loop = min(loop_steps(llm, batch, args.new) for _ in range(args.repeats))
        llm._loop.shutdown()  # from here the engine is stepped on this thread only
        direct = min(direct_steps(llm, batch, args.new, False) for _ in range(args.repeats))
        stream = min(direct_steps(llm, batch, args.new, False, stream=True) for _ in range(args.repeats))
        if args.profile:
            print(f"\n=== cProfile, batch {batch} ===")
            direct_steps(llm, batch, args.new, True)
        rows.append((batch, direct, stream, loop))
    print("\n| batch | Engine.step µs/step | streaming Engine.step µs/step | LLM.generate µs/step |\n|---|---|---|---|")
    for batch, direct, stream, loop in rows:
        print(f"| {batch} | {direct:.1f} | {stream:.1f} | {loop:.1f} |")


if __name__ == "__main__":
    main()
