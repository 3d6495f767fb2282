"""LoRA serving cost: generation with adapters against the same engine's base model, same run.

    PYTHONPATH=$PWD python bench/bench_lora.py [--smoke] [--no-many]

Llama-3.1-8B shapes (bench_e2e's random bf16 weights), PEFT adapters of rank 16 on every
linear (q/k/v/o, gate/up/down), random weights, written to a temporary directory as PEFT
checkpoints. Greedy, ignore_eos, token-id prompts of 128 tokens, 128 new tokens:
- batch 1 with one adapter vs batch 1 base;
- 64 requests over 8 adapters vs 64 base requests;
- 256 requests over 64 adapters, more than the GPU slots (--slots, 32: 3.8 GB at rank 16; the
  rest wait for a slot) vs 256 base requests. The slots bound this row: at most `slots`
  adapters' requests run at once, 4 each here, so 8 slots ran 32 sequences at a time against
  the base's 256 (0.187x on the H200, 2026-12-03: about what batch 32 decodes against 256);
- the time to the first token of a 128-token prompt with an adapter (the ratio column: base
  TTFT / LoRA TTFT, so higher is better as in the other rows);
- loading a rank-16 adapter from the host cache into a GPU slot (median of 10).
"base" is an LLM without lora_config on the same weights; the LoRA engine's base requests are
reported too (the cost of the LoRA ops when no token has an adapter). Correctness first: the
compiled model's logits with an adapter in a slot against the eager model with the adapter
added by forward hooks, and the adapter must move the logits (else the check could not fail).
Prefix reuse is off in both engines (every run's prefill is computed). Table last; JSON under
$OUT when set. --smoke: tiny shapes, runs on CPU in seconds; --only-many: the 256-request row alone.
"""
import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_e2e import LLAMA3_8B, NEW, PROMPT, SMOKE, build_models, prompts, timed  # noqa: E402
from bench.report import report  # noqa: E402
from trtllm.config import BuildConfig, KvCacheConfig, LoraConfig  # noqa: E402
from trtllm.lora_request import LoRARequest  # noqa: E402
from trtllm.runtime.adapters import read_peft_weights  # noqa: E402
from trtllm.runtime.llm import LLM  # noqa: E402
from trtllm.sampling_params import SamplingParams  # noqa: E402

RANK, ALPHA = 16, 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(model, directory: Path, seed: int) -> None:
    """A PEFT LoRA checkpoint for `model`: A ~ N(0, 1/K), B ~ N(0, 0.5/r) on every target linear."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            k, n = module.in_features, module.out_features
            tensors[f"base_model.model.{name}.lora_A.weight"] = (torch.randn(RANK, k, generator=gen) * k ** -0.5
                                                                 ).to(torch.bfloat16)
            tensors[f"base_model.model.{name}.lora_B.weight"] = (torch.randn(n, RANK, generator=gen) * 0.5 / RANK
                                                                 ).to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), bias="none", lora_dropout=0.0)))


def eager_with_adapter(model, weights: dict, ids, pos):
    """The eager model's logits with the adapter added by forward hooks: y += x A^T (sB)^T."""
    hooks = []
    for name, module in model.named_modules():
        if name in weights:
            a, b = (w.to(module.weight.device) for w in weights[name])
            hooks.append(module.register_forward_hook(
                lambda m, args, out, a=a, b=b: out + (args[0].float() @ a.float().T @ b.float().T).to(out.dtype)))
    try:
        with torch.no_grad():
            return model(ids, pos).float()
    finally:
        for h in hooks:
            h.remove()


def check_correctness(llm, model, request: LoRARequest, vocab: int, device, results: dict) -> None:
    adapters = llm.engine.adapters
    slots = adapters.slots
    weights = read_peft_weights(adapters.check(request), adapters.dtype)
    ids = prompts(2, vocab, seed=7).to(device)
    pos = torch.arange(PROMPT, device=device)[None].expand(2, PROMPT)
    slots.load(0, weights)  # slot 0, before any request: the adapter cache loads its own there later
    slots.slot_ids[:PROMPT] = 0  # sequence 0 under the adapter, sequence 1 under the base model
    slots.slot_ids[PROMPT:2 * PROMPT] = -1
    with torch.no_grad():
        got = llm.compiled(ids, pos).float()
    slots.slot_ids.fill_(-1)
    want_lora = eager_with_adapter(model, weights, ids[:1], pos[:1])
    with torch.no_grad():
        want_base = model(ids, pos).float()
    rel = lambda x, y: ((x - y).norm() / y.norm()).item()  # noqa: E731
    results["compiled_vs_eager_rel_err_adapter"] = rel(got[:1], want_lora)
    results["compiled_vs_eager_rel_err_base"] = rel(got[1:], want_base[1:])
    results["adapter_moves_logits_rel"] = rel(want_lora, want_base[:1])
    print(f"compiled vs eager logits, rel err: with the adapter {results['compiled_vs_eager_rel_err_adapter']:.2e}, "
          f"base {results['compiled_vs_eager_rel_err_base']:.2e}; the adapter moves the logits by "
          f"{results['adapter_moves_logits_rel']:.2e}", flush=True)
    # bf16 through the layers: as bench_e2e, ~2e-2; the adapter must move them well past that
    assert results["compiled_vs_eager_rel_err_adapter"] < 5e-2 and results["compiled_vs_eager_rel_err_base"] < 5e-2
    assert results["adapter_moves_logits_rel"] > 0.1, "the adapter barely changes the logits: the check is blind"


def tok_s(llm, batch, loras, runs: int) -> tuple[float, list]:
    greedy = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    generate = functools.partial(llm.generate, batch, greedy, use_tqdm=False, lora_request=loras)
    times = []
    for _ in range(runs):
        outs, dt = timed(generate)
        assert all(len(o.outputs[0].token_ids) == NEW for o in outs)
        times.append(dt)
    return len(batch) * NEW / statistics.median(times), [len(batch) * NEW / t for t in times]


def ttft_ms(llm, vocab: int, lora, runs: int = 5) -> float:
    """Median ms of a 128-token prompt's first token (max_tokens=1), a fresh prompt each run
    (the prefix cache would skip the prefill)."""
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for i in range(runs + 1):  # the first: warm-up
        prompt = prompts(1, vocab, seed=1000 + i + (0 if lora is None else 100)).tolist()
        _, dt = timed(functools.partial(llm.generate, prompt, first, use_tqdm=False, lora_request=lora))
        times.append(dt * 1e3)
    return statistics.median(times[1:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU is fine): checks the pipeline")
    ap.add_argument("--no-many", action="store_true", help="skip 256 requests over 64 adapters")
    ap.add_argument("--only-many", action="store_true", help="only 256 requests over 64 adapters (and the load)")
    ap.add_argument("--slots", type=int, default=None, help="GPU adapter slots, max_loras (32; smoke 4)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = SMOKE if args.smoke else LLAMA3_8B
    hf_config, model = build_models(shape, device=device)
    vocab = shape["vocab_size"]
    num_many = 8 if args.smoke else 64
    slots = args.slots or (4 if args.smoke else 32)
    tmp = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    requests = []
    for i in range(num_many):
        write_adapter(model, tmp / f"adapter{i}", seed=i)
        requests.append(LoRARequest(f"adapter{i}", i + 1, str(tmp / f"adapter{i}")))
    build = BuildConfig(max_batch_size=256, max_num_tokens=8192, max_seq_len=PROMPT + NEW)
    # prefix reuse off: the warm-up and the repeated runs send the same prompts, whose cached blocks would skip
    # the timed prefills (with reuse on, a whole-batch warm-up took the base's 256-request row from ~15k to 20.5k
    # tok/s, and the LoRA engine's base requests, under another cache key, stayed at ~15k: H100, 2026-12-08)
    kv = KvCacheConfig(max_tokens=256 * (PROMPT + NEW) + 4096, enable_block_reuse=False)
    batch_sizes = (256,) if args.only_many else (1, 64, 256) if not args.no_many else (1, 64)
    results, rows = {}, []

    base_llm = LLM(model, build_config=build, kv_cache_config=kv)
    base = {}
    for b in batch_sizes:
        batch = prompts(b, vocab, seed=b).tolist()
        # warm-up: the whole batch once (its prefill's shapes compile here, not in the timed run: with one
        # prompt as warm-up, a fresh machine's first 64-request base run gave 5,309 tok/s against 7,600 later)
        tok_s(base_llm, batch, None, 1)
        base[b], results[f"base_b{b}_runs"] = tok_s(base_llm, batch, None, 3 if b == 1 else 1)
    base_ttft = ttft_ms(base_llm, vocab, None)
    base_llm.shutdown()
    del base_llm
    if device == "cuda":
        torch.cuda.empty_cache()

    t0 = time.perf_counter()
    llm = LLM(model, build_config=build, kv_cache_config=kv,
              lora_config=LoraConfig(max_lora_rank=RANK, max_loras=slots, max_cpu_loras=num_many))
    results["lora_startup_s"] = time.perf_counter() - t0
    print(llm.compiled.summary(), flush=True)
    print(f"LoRA slots: {llm.engine.adapters.slots.nbytes() / 2**20:.0f} MiB", flush=True)
    check_correctness(llm, model, requests[0], vocab, device, results)

    cases = [] if args.only_many else [(1, [requests[0]], "batch 1, one adapter"),
                                       (64, requests[:8], "64 requests over 8 adapters")]
    if not args.no_many:
        cases.append((256, requests[:num_many], f"256 requests over {num_many} adapters, {slots} slots"))
    for b, pool, name in cases:
        batch = prompts(b, vocab, seed=b).tolist()
        loras = [pool[i % len(pool)] for i in range(b)]
        tok_s(llm, batch, loras, 1)  # warm-up: every adapter of the case in the host cache, the shapes compiled
        lora_tok_s, results[f"lora_b{b}_runs"] = tok_s(llm, batch, loras, 3 if b == 1 else 1)
        base_in_lora, _ = tok_s(llm, batch, None, 3 if b == 1 else 1)
        results[f"lora_b{b}"], results[f"base_b{b}"], results[f"lora_engine_base_b{b}"] = \
            lora_tok_s, base[b], base_in_lora
        rows.append(dict(workload=name, base=f"{base[b]:,.0f}", lora=f"{lora_tok_s:,.0f}",
                         ratio=f"{lora_tok_s / base[b]:.3f}", lora_engine_base=f"{base_in_lora:,.0f}",
                         lora_engine_base_ratio=f"{base_in_lora / base[b]:.3f}"))
        print(rows[-1], flush=True)

    # time to the first token of a 128-token prompt (LoRA prefill steps replay prefill graphs since 2026-12-05)
    lora_ttft, lora_engine_base_ttft = ttft_ms(llm, vocab, requests[0]), ttft_ms(llm, vocab, None)
    results.update(ttft_ms_base=base_ttft, ttft_ms_lora=lora_ttft, ttft_ms_lora_engine_base=lora_engine_base_ttft)
    rows.append(dict(workload=f"TTFT, {PROMPT}-token prompt, one adapter (ms, median of 5)", base=f"{base_ttft:.2f}",
                     lora=f"{lora_ttft:.2f}", ratio=f"{base_ttft / lora_ttft:.3f}",
                     lora_engine_base=f"{lora_engine_base_ttft:.2f}",
                     lora_engine_base_ratio=f"{base_ttft / lora_engine_base_ttft:.3f}"))
    print(rows[-1], flush=True)

    # slot load time from the host cache (every adapter above is there)
    adapters = llm.engine.adapters
    image = adapters.host_image(requests[1])
    load_ms = []
    for _ in range(10):
        started = time.perf_counter()
        adapters.slots.load_image(adapters.slots.max_loras - 1, image)  # what admission does
        if device == "cuda":
            torch.cuda.synchronize()
        load_ms.append((time.perf_counter() - started) * 1e3)
    results["slot_load_ms_runs"] = load_ms
    results["slot_load_ms"] = statistics.median(load_ms)
    weights = read_peft_weights(adapters.check(requests[1]), adapters.dtype)
    mib = sum(a.nbytes + b.nbytes for a, b in weights.values()) / 2**20
    rows.append(dict(workload=f"rank-{RANK} adapter ({mib:.0f} MiB) host cache -> GPU slot", base="",
                     lora=f"{results['slot_load_ms']:.2f} ms (median of 10)", ratio="", lora_engine_base="",
                     lora_engine_base_ratio=""))
    llm.shutdown()
    table = ["| workload | base tok/s | LoRA tok/s | LoRA / base | LoRA engine, base requests | / base |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['workload']} | {r['base']} | {r['lora']} | {r['ratio']} | {r['lora_engine_base']} | "
              f"{r['lora_engine_base_ratio']} |" for r in rows]
    report("bench_lora", "\n".join(table), results)


if __name__ == "__main__":
    main()
