"""Beam search's decode step vs greedy's at the same tokens per step: 16 requests of beam
width 4 against 64 greedy requests, 64 sequences a step either way.

    PYTHONPATH=$PWD python bench/bench_beam.py [--smoke] [--new 128]

Llama-3.1-8B shapes (bench_e2e.py's random bf16 weights) on the GPU; --smoke: tiny shapes in
fp32, on the CPU when there is no GPU (checks the pipeline, times nothing worth quoting).
Prompts of 128 random token ids, EOS ignored (every beam runs to max_tokens: the same number
of steps for both). A step's time is (wall of `new` tokens - wall of 1 token) / (new - 1):
prefill and startup cancel out. The goal (issue 23): beam step <= 1.3x the greedy step.

Correctness first: the cumulative_logprob of each returned beam equals the sum of its
tokens' log-probabilities recomputed by a plain prefill of prompt + beam (prompt_logprobs,
no beams, no shared blocks), so a beam that read another's K/V (a copy-on-write gone wrong)
would show; and beam width 1 must give the greedy tokens. Table last; JSON under $OUT.
"""
import argparse
import time

import torch

from bench.bench_e2e import LLAMA3_8B, SMOKE, build_models
from bench.report import report
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

PROMPT, WIDTH, BEAM_BATCH, GREEDY_BATCH = 128, 4, 16, 64


def prompt_ids(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, PROMPT), generator=g).tolist()


def beam_params(new: int, width: int = WIDTH, n: int = 1) -> SamplingParams:
    return SamplingParams(beam_width=width, n=n, max_tokens=new, ignore_eos=True, temperature=0.0)


def greedy_params(new: int) -> SamplingParams:
    return SamplingParams(max_tokens=new, ignore_eos=True, temperature=0.0)


def wall(llm, prompts, params) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t


def step_ms(llm, prompts, params_of, new: int) -> float:
    """Decode step time: (wall of `new` tokens - wall of 1) / (new - 1), each the best of 2."""
    wall(llm, prompts, params_of(new))  # warm-up: every graph and code path of the run
    long = min(wall(llm, prompts, params_of(new)) for _ in range(2))
    short = min(wall(llm, prompts, params_of(1)) for _ in range(2))
    return (long - short) / (new - 1) * 1e3


def check(llm, vocab: int, new: int, tol_per_token: float) -> dict:
    """Beams' cumulative logprobs vs a plain prefill's; width 1 vs greedy."""
    prompts = prompt_ids(2, vocab, seed=7)
    outs = llm.generate(prompts, beam_params(new, n=WIDTH), use_tqdm=False)
    worst = 0.0
    for prompt, out in zip(prompts, outs):
        for c in out.outputs:
            ref = llm.generate([prompt + c.token_ids], SamplingParams(max_tokens=1, prompt_logprobs=0),
                               use_tqdm=False)[0]
            lps = [next(iter(e.values())) for e in ref.prompt_logprobs[len(prompt):]]
            worst = max(worst, abs(sum(lps) - c.cumulative_logprob) / len(lps))
        assert [c.cumulative_logprob for c in out.outputs] == sorted((c.cumulative_logprob for c in out.outputs),
                                                                       reverse=True)
    assert worst <= tol_per_token, f"a beam's cumulative logprob is off by {worst:.4f} a token from a prefill's"
    one = llm.generate(prompts, beam_params(new, width=1), use_tqdm=False)
    greedy = llm.generate(prompts, greedy_params(new), use_tqdm=False)
    same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(one, greedy))
    print(f"check: beams' cumulative logprobs within {worst:.2e} a token of a plain prefill's; "
          f"width 1 = greedy for {same}/2 prompts", flush=True)
    return dict(logprob_max_diff_per_token=worst, width1_equals_greedy=same)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, fp32 (on the CPU without a GPU)")
    ap.add_argument("--new", type=int, default=None, help="new tokens a request (default 128; smoke 8)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    shape = SMOKE if args.smoke else LLAMA3_8B
    if args.smoke and not cuda:
        shape = dict(shape, hidden_size=128, intermediate_size=256, vocab_size=512)
    new = args.new or (8 if args.smoke else 128)
    vocab = shape["vocab_size"]
    _, model = build_models(shape, device="cuda" if cuda else "cpu")
    if args.smoke:
        model = model.float()
    llm = LLM(model, dtype="float32" if args.smoke else "auto",
              build_config=BuildConfig(max_batch_size=GREEDY_BATCH, max_num_tokens=8192, max_seq_len=PROMPT + new + 8,
                                       max_beam_width=WIDTH),
              kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=0.85) if cuda else
              KvCacheConfig(max_tokens=GREEDY_BATCH * (PROMPT + new + 32)))
    results = dict(shape=shape, new_tokens=new, prompt=PROMPT, device=torch.cuda.get_device_name() if cuda else "cpu")
    results.update(check(llm, vocab, min(new, 16), 1e-3 if args.smoke else 5e-2))

    beam_prompts, greedy_prompts = prompt_ids(BEAM_BATCH, vocab, 1), prompt_ids(GREEDY_BATCH, vocab, 2)
    greedy = step_ms(llm, greedy_prompts, greedy_params, new)
    beams = step_ms(llm, beam_prompts, beam_params, new)
    llm.shutdown()
    results.update(greedy_step_ms=greedy, beam_step_ms=beams, ratio=beams / greedy)
    rows = [(f"greedy, batch {GREEDY_BATCH}", greedy, GREEDY_BATCH / greedy * 1e3),
            (f"beam width {WIDTH}, batch {BEAM_BATCH}", beams, BEAM_BATCH * WIDTH / beams * 1e3)]
    table = ["| decode, 64 sequences a step | step ms | sequence-tokens/s |", "|---|---|---|"]
    table += [f"| {name} | {ms:.2f} | {rate:,.0f} |" for name, ms, rate in rows]
    table.append(f"\nbeam step / greedy step = {beams / greedy:.2f} (goal <= 1.3); {results['device']}, "
                 f"prompt {PROMPT}, {new} new tokens" + (" (smoke shapes: not a figure to quote)" if args.smoke else ""))
    report("bench_beam", "\n".join(table), results)


if __name__ == "__main__":
    main()
