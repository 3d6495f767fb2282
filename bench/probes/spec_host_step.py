"""Host (Python) time of a speculative decoding step, by phase, against a plain decode step.

    PYTHONPATH=$PWD python bench/probes/spec_host_step.py [--batches 1 32] [--new 64] [--draft-len 4] [--profile]
    PYTHONPATH=$PWD python bench/probes/spec_host_step.py --device cuda [--shape llama8b]   # on a GPU

CPU (the default): a tiny random Llama target and a 1-layer draft behind real `LLM`s, whose
runners are given what a GPU run has: decode graphs (target and draft) and verify graphs
for every batch bucket, here stand-ins whose replay() does nothing and whose outputs are
fixed, so a step takes the very path it takes on the H200 (graph replays, picks read
back, the verify path) minus the device work; eager calls (prefill, the draft's catch-up)
go to a stub returning fixed logits. The target's every pick is token 0; the draft's is
token 0 ("draft", every draft accepted) or token 1 ("random draft", none accepted); the
n-gram workload's drafts (0 after 0) are all accepted once its text repeats. What is left
is the host's work per step.

--device cuda: the real models and CUDA graphs (tiny shapes, or --shape llama8b:
bench_speculative's zeroed 8B target and its 2-layer draft, bf16, ~100% acceptance); the
phases then include the host's waits for the GPU (`wait` and the reads of picks).

Per workload and batch: ms per decode step of `Engine.step` called directly (prefill
steps excluded), tokens a step gains per sequence, and the ms per step of each phase:
propose (all of the draft's work; n-gram lookup), and inside it the draft runner's
launches and host reads; schedule; execute (the target's launch); sample (its wait, verify,
accept); postprocess (the scheduler's books, stop checks); outputs. Phases nest where
named so; the rest of a step is the remainder. "draft reads/step": how many times a step
the host waited for the draft's tokens (on a GPU each is a wait for the device). --profile:
cProfile of one draft run.
"""
import argparse
import cProfile
import functools
import pstats
import time
from collections import defaultdict

import torch

from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.models.llama import LlamaConfig, LlamaForCausalLM
from trtllm.runtime.cuda_graphs import cuda_graph_batch_sizes
from trtllm.runtime.llm import LLM
from trtllm.runtime.speculative.config import DraftTargetDecodingConfig, NGramDecodingConfig
from trtllm.sampling_params import SamplingParams

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-5,
            rope_theta=10000.0)
PROMPT = list(range(1, 129))
TARGET_TOKEN, RANDOM_DRAFT_TOKEN = 0, 1


class _NoGraph:
    def replay(self) -> None:
        pass


class _PeakLogits:
    """The compiled model's call signature: logits whose argmax is `token`, every row."""

    tensor_parallel = None  # what LLM.shutdown asks of a compiled model

    def __init__(self, vocab: int, token: int):
        self.vocab, self.token = vocab, token

    def __call__(self, input_ids, positions, rows=None):
        n = input_ids.shape[1] if rows is None else rows.shape[0]
        logits = torch.zeros(n, self.vocab)
        logits[:, self.token] = 1.0
        return logits


def _stand_in(runner, vocab: int, token: int, max_batch: int, verify_len: int = 0) -> None:
    """What capture_decode / capture_verify leave on a GPU, minus CUDA: graphs for every bucket."""
    runner.compiled = _PeakLogits(vocab, token)
    for b in cuda_graph_batch_sizes(max_batch):
        logits = torch.zeros(b, vocab)
        logits[:, token] = 1.0
        greedy = torch.stack([torch.full((b,), token), torch.ones(b, dtype=torch.long)])
        runner.cuda_graphs.decode[b] = (_NoGraph(), logits, greedy)
        if verify_len:
            vlogits = torch.zeros(b * verify_len, vocab)
            vlogits[:, token] = 1.0
            runner.cuda_graphs.verify[b] = (_NoGraph(), vlogits)
    runner.cuda_graphs.verify_len = verify_len


def random_llama(shape: dict, layers: int, seed: int, device: str, dtype) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**dict(shape, num_hidden_layers=layers))).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0, 0.05) if p.dim() == 1 else p.normal_(0.0, p.shape[-1] ** -0.5)
    model.init_buffers(torch.device(device))
    return model.eval().requires_grad_(False)


def build_llm(args, max_batch: int, workload: str) -> LLM:
    cuda = args.device == "cuda"
    k = args.draft_len
    if cuda and args.shape == "llama8b":
        from bench.bench_speculative import LLAMA31_8B, random_llama as random_bf16, zeroed_target_and_draft
        shape, (target, draft) = LLAMA31_8B, zeroed_target_and_draft(LLAMA31_8B, "cuda", torch.bfloat16)
        random_draft = random_bf16(shape, 2, 1, "cuda", torch.bfloat16) if workload == "random" else None
    else:
        dtype = torch.float32
        shape = TINY
        target = random_llama(shape, 2, 0, args.device, dtype)
        draft = target if cuda else random_llama(shape, 1, 1, args.device, dtype)  # cuda: ~100% acceptance
        random_draft = random_llama(shape, 1, 2, args.device, dtype) if workload == "random" else None
    spec = {"plain": None,
            "draft": DraftTargetDecodingConfig(max_draft_len=k, speculative_model_dir=draft),
            "random": DraftTargetDecodingConfig(max_draft_len=k, speculative_model_dir=random_draft),
            "ngram": NGramDecodingConfig(max_draft_len=k, max_matching_ngram_size=3)}[workload]
    llm = LLM(target, tokenizer=None, device=args.device, enable_cuda_graph=cuda,
              build_config=BuildConfig(max_batch_size=max_batch, max_num_tokens=max(2048, 160 * max_batch),
                                       max_seq_len=len(PROMPT) + args.new + 64),
              kv_cache_config=KvCacheConfig(tokens_per_block=32, max_tokens=max_batch * 512),
              speculative_config=spec)
    if not cuda:
        vocab = shape["vocab_size"]
        _stand_in(llm.engine.runner, vocab, TARGET_TOKEN, max_batch, k + 1 if spec is not None else 0)
        proposer = llm.engine.speculative.draft if spec is not None else None
        if proposer is not None:
            _stand_in(proposer.runner, vocab, RANDOM_DRAFT_TOKEN if workload == "random" else TARGET_TOKEN,
                      max_batch)
    llm._loop.shutdown()  # from here the engine is stepped on this thread only
    return llm


class PhaseTimers:
    """Wall seconds spent in named bound methods (instance attributes wrap them), and calls."""

    def __init__(self):
        self.seconds, self.calls, self.enabled = defaultdict(float), defaultdict(int), False

    def wrap(self, name: str, obj, attr: str) -> None:
        fn = getattr(obj, attr)

        @functools.wraps(fn)
        def timed(*a, **kw):
            if not self.enabled:
                return fn(*a, **kw)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[name] += time.perf_counter() - t
                self.calls[name] += 1

        setattr(obj, attr, timed)


PHASES = ["propose", "  draft launches", "  draft waits+reads", "schedule", "execute", "sample", "postprocess",
          "outputs"]


def instrument(llm: LLM) -> PhaseTimers:
    engine, timers = llm.engine, PhaseTimers()
    timers.wrap("schedule", engine, "_schedule")
    timers.wrap("execute", engine.runner, "execute")
    timers.wrap("sample", engine.step_sampler, "finish")
    timers.wrap("postprocess", engine, "_postprocess")
    timers.wrap("outputs", engine, "_outputs")
    spec = engine.speculative
    if spec is not None:
        timers.wrap("propose", spec, "propose")
        if spec.draft is not None:
            runner = spec.draft.runner
            timers.wrap("  draft launches", runner, "execute")
            timers.wrap("  draft launches", runner, "execute_ahead")
            if hasattr(spec.draft, "_read_picks"):
                timers.wrap("  draft waits+reads", spec.draft, "_read_picks")
            else:  # before the chained proposals: a wait and a read after every draft step
                timers.wrap("  draft waits+reads", spec.draft, "_sample")
    return timers


def measure(llm: LLM, timers: PhaseTimers, batch: int, new: int, profile: bool = False):
    """(ms per decode step, tokens per step per sequence, {phase: ms per step})."""
    engine = llm.engine
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{time.perf_counter_ns()}-{i}", list(PROMPT), params)
    engine.step()  # the prefill of all of them (max_num_tokens covers it)
    assert all(s.output_token_ids for s in engine.scheduler.running)
    timers.seconds.clear()
    timers.calls.clear()
    timers.enabled = True
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    steps, t = 0, time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    wall = time.perf_counter() - t
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    timers.enabled = False
    tokens = (new - 1) / steps
    phases = {p: timers.seconds[p] / steps * 1e3 for p in PHASES}
    phases["draft reads"] = timers.calls["  draft waits+reads"] / steps  # a count: host reads a step
    return wall / steps * 1e3, tokens, phases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--new", type=int, default=64, help="new tokens a request")
    ap.add_argument("--draft-len", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    ap.add_argument("--workloads", nargs="+", default=["plain", "draft", "random", "ngram"],
                    choices=["plain", "draft", "random", "ngram"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default="tiny", choices=["tiny", "llama8b"], help="cuda only")
    ap.add_argument("--profile", action="store_true", help="cProfile of the draft workload at the first batch")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for workload in args.workloads:
        llm = build_llm(args, max(args.batches), workload)
        timers = instrument(llm)
        for batch in args.batches:
            measure(llm, timers, batch, 8)  # warm-up
            best = min((measure(llm, timers, batch, args.new) for _ in range(args.repeats)), key=lambda r: r[0])
            rows.append((workload, batch, *best))
            print(rows[-1][:4], flush=True)
        if args.profile and workload == "draft":
            print(f"\n=== cProfile, draft, batch {args.batches[0]} ===")
            measure(llm, timers, args.batches[0], args.new, profile=True)
        llm.shutdown()
    print(f"\ndevice {args.device}, shape {args.shape if args.device == 'cuda' else 'tiny (stand-in graphs)'}, "
          f"draft len {args.draft_len}, {args.new} new tokens\n")
    print("| workload | batch | ms/step | tokens/step | " + " | ".join(p.strip() for p in PHASES)
          + " | draft reads/step |")
    print("|---" * (5 + len(PHASES)) + "|")
    for workload, batch, ms, tokens, phases in rows:
        print(f"| {workload} | {batch} | {ms:.3f} | {tokens:.2f} | " + " | ".join(f"{phases[p]:.3f}" for p in PHASES)
              + f" | {phases['draft reads']:.2f} |")


if __name__ == "__main__":
    main()
