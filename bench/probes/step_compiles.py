"""Which path each step of a speculative run takes, how long it lasts, and what compiled in it.

    PYTHONPATH=$PWD python bench/probes/step_compiles.py                 # GPU: bench_speculative's 8B draft row
    PYTHONPATH=$PWD python bench/probes/step_compiles.py --smoke         # CPU: its tiny shapes

The question (bench/RESULTS.md, speculative decoding, 2026-12-05): bench_speculative's
batch-32 draft-model row ran at 0.86x while its verify steps were graphed at 11.2 ms; a
per-step log showed its timed run's last step (2 tokens each for all 32 sequences, which no
graph serves) taking 1,240 ms, the first launch of that shape in the process. What ran for
that second: a dynamo recompilation of the model (a guard that failed) or Triton compiling a
kernel for a specialization it had not seen (an int argument divisible by 16 or equal to 1, a
constexpr config)? Since 787a6ad that step is a graphed one (max_tokens no longer shortens the
drafts under verify graphs); `--ragged-end` brings the ragged step back. This probe runs the row as the bench did before it warmed up twice: one
warm-up (its chunked prefill staggers the batch), then the timed run (the prompts cached: the
batch in step), and prints each step of the timed run with its path (decode / verify /
prefill graph, eager), the query lengths of its sequences, its ms (`Engine.on_step`), and the
Triton kernels (name, ms, specialization key) and dynamo frames compiled during it.
"""
import argparse
import collections
import time
import types

import torch
import triton.runtime.jit as triton_jit
from torch._dynamo.utils import counters

from bench.bench_speculative import LLAMA31_8B, SMOKE, make_llm, prompts, zeroed_target_and_draft
from trtllm.runtime.speculative.config import DraftTargetDecodingConfig
from trtllm.sampling_params import SamplingParams


class CompileLog:
    """Triton kernels compiled (JITFunction._do_compile: name, ms, key) while on."""

    def __init__(self):
        self.on, self.events = False, []
        real = triton_jit.JITFunction._do_compile
        log = self

        def logged(fn, key, *args, **kwargs):
            started = time.perf_counter()
            out = real(fn, key, *args, **kwargs)
            if log.on:
                log.events.append(f"triton {getattr(fn, '__name__', fn)} {(time.perf_counter() - started) * 1e3:.0f} ms "
                                  f"key={str(key)[:160]}")
            return out
        triton_jit.JITFunction._do_compile = logged  # this probe's process only

    def take(self) -> list[str]:
        events, self.events = self.events, []
        return events


def instrument(llm, steps: list, compiles: CompileLog) -> None:
    """Each target step appended to `steps` as [query-length classes, path, ms, compiled]."""
    runner = llm.engine.runner
    graphs = runner.cuda_graphs
    for name in ("replay", "replay_verify", "replay_prefill"):
        real = getattr(graphs, name)

        def replayed(*a, real=real, name=name, **kw):
            steps[-1][1] = name.removeprefix("replay_") if name != "replay" else "decode"
            return real(*a, **kw)
        setattr(graphs, name, replayed)
    execute = runner.execute

    def executed(scheduled):
        lens = collections.Counter(n for _, n in scheduled)
        steps.append([dict(sorted(lens.items())), "eager", 0.0, []])
        return execute(scheduled)
    runner.execute = executed
    frames = [counters["stats"]["unique_graphs"]]

    def on_step(record):
        if steps:
            graphs_now = counters["stats"]["unique_graphs"]
            compiled = compiles.take() + ([f"dynamo: {graphs_now - frames[0]} new graph(s)"]
                                          if graphs_now != frames[0] else [])
            frames[0] = graphs_now
            steps[-1][2], steps[-1][3] = record.duration_s * 1e3, compiled
    llm.engine.on_step = on_step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny fp32 shapes on the CPU (the default without a GPU)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--ragged-end", action="store_true",
                    help="max_tokens shortens the drafts again (uniform_verify off, as before 787a6ad): the "
                         "last step ragged, outside the verify graphs, as in the 1,240 ms step")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype, shape = ("cuda", torch.bfloat16, LLAMA31_8B) if cuda else ("cpu", torch.float32, SMOKE)
    target, draft = zeroed_target_and_draft(shape, device, dtype)
    bench_args = types.SimpleNamespace(prompt=128, new=args.new, draft_len=4)
    llm = make_llm(target, bench_args, device, args.batch,
                   speculative_config=DraftTargetDecodingConfig(max_draft_len=4, speculative_model_dir=draft))
    if args.ragged_end:
        llm.engine.speculative.uniform_verify = False
    batch = prompts(args.batch, 128, shape["vocab_size"], 1)
    params = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)
    compiles, steps = CompileLog(), []
    instrument(llm, steps, compiles)
    llm.generate(batch, params, use_tqdm=False)  # the warm-up: the batch staggered by its chunked prefill
    steps.clear()
    compiles.take()
    compiles.on = True
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    llm.generate(batch, params, use_tqdm=False)
    wall = time.perf_counter() - started
    llm.shutdown()
    print(f"timed run: {args.batch * args.new / wall:,.0f} tok/s, {wall * 1e3:.0f} ms, {len(steps)} steps\n")
    print("| step | path | query lengths: sequences | ms | compiled in it |")
    print("|---:|---|---|---:|---|")
    for i, (lens, path, ms, compiled) in enumerate(steps):
        print(f"| {i} | {path} | {lens} | {ms:.1f} | {'; '.join(compiled) or '-'} |")


if __name__ == "__main__":
    main()
