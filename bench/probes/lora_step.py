"""Where does a LoRA engine's decode time go? bench_lora's engine (Llama-3.1-8B shapes, rank-16
adapters on every linear, 8 GPU slots), kernels of whole `generate` calls under torch.profiler:
batch 1 with one adapter, 64 requests over 8 adapters, and 64 base requests in the same engine;
per case the wall time, GPU busy time and the top kernels (name, total ms, launches); then
the same generate unprofiled, its steps timed by class (gemv_ab.step_classes: a decode graph,
launched ahead, eager) and, over the steps with adapters, the most adapters any 16-token
block of a step met (the LoRA kernels loop over them; the scheduler groups decodes by slot).

    PYTHONPATH=$PWD python bench/probes/lora_step.py [--new 32] [--slots 8] [--many]
"""
import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.bench_e2e import LLAMA3_8B, PROMPT, SMOKE, build_models, prompts
from bench.bench_lora import RANK, write_adapter
from bench.probes.gemv_ab import step_classes
from trtllm.config import BuildConfig, KvCacheConfig, LoraConfig
from trtllm.lora_request import LoRARequest
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams


def kernel_table(prof, top: int) -> tuple[float, list[dict]]:
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    us = lambda e: getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)  # noqa: E731
    events.sort(key=lambda e: -us(e))
    return sum(us(e) for e in events) / 1e3, [dict(kernel=e.key[:90], ms=round(us(e) / 1e3, 3), launches=e.count)
                                              for e in events[:top]]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def watch_block_adapters(runner) -> list:
    """Wrap the runner's LoRA slot staging: the list gets, per step with adapters, (its
    sequences, the most distinct adapters among any 16 consecutive tokens: the kernels'
    token block)."""
    seen, real = [], runner._stage_lora_slots

    def staged(scheduled, n):
        any_adapter = real(scheduled, n)
        if any_adapter:
            slots = runner._staging_np[3][:n]
            seen.append((len(scheduled), max(len(set(slots[i:i + 16].tolist())) for i in range(0, n, 16))))
        return any_adapter
    runner._stage_lora_slots = staged
    return seen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=32, help="new tokens a request (decode steps profiled)")
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--slots", type=int, default=8, help="max_loras (bench_lora.py: 32)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the probe runs")
    ap.add_argument("--many", action="store_true", help="bench_lora's third row instead: 256 requests over 64 "
                    "adapters (and 256 base requests); give --slots 32 as it does")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled generate (its trace of 256 "
                    "requests takes minutes on the host): steps by class only")
    args = ap.parse_args()
    shape = SMOKE if args.smoke else LLAMA3_8B
    _, model = build_models(shape, device="cpu" if args.smoke else "cuda")
    vocab = shape["vocab_size"]
    tmp = Path(tempfile.mkdtemp(prefix="lora_step_"))
    requests, num_adapters = [], 64 if args.many else 8
    for i in range(num_adapters):
        write_adapter(model, tmp / f"adapter{i}", seed=i)
        requests.append(LoRARequest(f"adapter{i}", i + 1, str(tmp / f"adapter{i}")))
    llm = LLM(model, build_config=BuildConfig(max_batch_size=256, max_num_tokens=8192, max_seq_len=PROMPT + 128),
              kv_cache_config=KvCacheConfig(max_tokens=256 * (PROMPT + 128) + 4096),
              lora_config=LoraConfig(max_lora_rank=RANK, max_loras=args.slots, max_cpu_loras=num_adapters))
    block_adapters = watch_block_adapters(llm.engine.runner)
    greedy = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)
    out = {}
    cases = [("b1, one adapter", 1, [requests[0]]), ("b64 over 8 adapters", 64, requests),
             ("b64 base requests", 64, None)]
    if args.many:
        cases = [("b256 over 64 adapters", 256, requests), ("b256 base requests", 256, None),
                 ("b128 base requests", 128, None)]  # the LoRA engine runs 128 at once (32 slots x 4)
    for name, b, loras in cases:
        batch = prompts(b, vocab, seed=b + 100).tolist()
        per = [loras[i % len(loras)] for i in range(b)] if loras else None
        llm.generate(batch, greedy, use_tqdm=False, lora_request=per)  # warm (and the adapters into slots)
        batch = prompts(b, vocab, seed=b + 200).tolist()  # fresh prompts: no prefix-cache hits
        sync()
        out[name] = {}
        if not args.no_profile:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                llm.generate(batch, greedy, use_tqdm=False, lora_request=per)
                sync()
                wall = (time.perf_counter() - t0) * 1e3
            busy, table = kernel_table(prof, args.top)
            out[name] = dict(wall_ms=round(wall, 2), gpu_ms=round(busy, 2), kernels=table)
            print(f"--- {name}: {args.new} new tokens, wall {wall:.1f} ms, GPU kernels {busy:.1f} ms", flush=True)
            for row in table:
                print(f"   {row['ms']:9.3f} ms x{row['launches']:6d}  {row['kernel']}")
        batch = prompts(b, vocab, seed=b + 300).tolist()
        real_step, real_execute = llm.engine.step, llm.engine.runner.execute
        times = step_classes(llm.engine)
        block_adapters.clear()
        sync()
        t0 = time.perf_counter()
        llm.generate(batch, greedy, use_tqdm=False, lora_request=per)
        sync()
        wall = (time.perf_counter() - t0) * 1e3
        llm.engine.step, llm.engine.runner.execute = real_step, real_execute
        steps = {k: dict(n=len(v), mean_ms=round(sum(v) / len(v) * 1e3, 3)) for k, v in times.items()}
        most = max((m for _, m in block_adapters), default=0)
        rows = [r for r, _ in block_adapters]
        out[name].update(unprofiled_wall_ms=round(wall, 2), steps=steps, most_adapters_a_block=most,
                         adapter_steps=len(rows), adapter_step_seqs=dict(sorted(Counter(rows).items())))
        print(f"    unprofiled: wall {wall:.1f} ms, steps {steps}, most adapters a 16-token block {most}; "
              f"steps with adapters by their sequences {out[name]['adapter_step_seqs']}", flush=True)
    llm.shutdown()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "lora_step.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
