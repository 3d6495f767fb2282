"""What does a beam-search decode step cost beyond a greedy one, host and device?

    PYTHONPATH=$PWD python bench/probes/beam_step.py [--profile] [--new 64] [--vocab 512]
        [--device-vocab 128256] [--repeats 3] [--device-part-on-cpu]

Two parts (bench_beam.py's batch: 16 requests x beam width 4 against 64 greedy requests):

1. Host time per decode step, phase by phase, with the model's forward made (nearly) free:
   a tiny random Llama behind a real `LLM`. On the CPU its runner gets host_step.py's stand-in
   "decode graphs" (replay() puts the next of a few fixed random logits tables in the graph's
   logits, the greedy picks are their argmax), so a step takes the path it takes on the GPU
   minus the device work; on a GPU the tiny model runs with real CUDA graphs. Phases are
   the engine's own calls, timed by wrapping them (perf_counter, this probe only): schedule,
   copy-on-write block copies, execute (inputs + graph replay), sample (the wait, the
   sampler or the graph picks read back), take_beam_rows, postprocess (scheduler.update +
   stop checks), step_groups (the search: device top-k, host bookkeeping, forks), outputs;
   queue_search (the search's device work queued behind a decode-graph step, before its wait).
   Greedy steps run with the overlap scheduler as the engine runs them, so its "execute"
   column holds the step launched ahead. `--profile`: cProfile's top functions of the beam steps.
2. With CUDA, the device time of a beam step's sampling work at `--device-vocab` (Llama-3's
   128,256), 64 rows of bf16 logits, by CUDA events over 20 back-to-back launches, against
   greedy's in-graph picks and the bytes each moves (H200: ~4.3 TB/s).

Prints tables; with $OUT set, writes $OUT/beam_step.{md,json}.
"""
import argparse
import functools
import time
from collections import defaultdict
from types import SimpleNamespace

import torch

from bench.probes.host_step import ZeroLogits, steps_to_end
from bench.report import report
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.models.llama import LlamaConfig, LlamaForCausalLM
from trtllm.runtime import beam_search, engine as engine_module
from trtllm.runtime.cuda_graphs import cuda_graph_batch_sizes
from trtllm.runtime.llm import LLM
from trtllm.runtime.sampler import greedy_picks
from trtllm.sampling_params import SamplingParams

WIDTH, BEAM_BATCH, GREEDY_BATCH, PROMPT_LEN = 4, 16, 64, 128


def tiny(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=False)


class _LogitsGraph:
    """A decode graph's stand-in on the CPU: replay() writes the next of a few random logits
    tables into the graph's logits and their argmax into its picks (what the real graph leaves)."""

    def __init__(self, logits: torch.Tensor, picks: torch.Tensor, tables: list[torch.Tensor]):
        self.logits, self.picks, self.tables, self.turn = logits, picks, tables, 0

    def replay(self) -> None:
        table = self.tables[self.turn % len(self.tables)]
        self.turn += 1
        self.logits.copy_(table)
        self.picks.copy_(greedy_picks(table))


def build_llm(vocab: int, new: int) -> LLM:
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig.from_hf(__import__("transformers").LlamaConfig(**tiny(vocab))))
    for p in model.parameters():  # bench_e2e's random weights: norms around 1, matrices ~ N(0, 1/fan_in)
        with torch.no_grad():
            p.normal_(1.0, 0.05) if p.dim() == 1 else p.normal_(0.0, p.shape[-1] ** -0.5)
    model.init_buffers(device)
    model.eval().requires_grad_(False)
    llm = LLM(model, enable_cuda_graph=cuda, device=str(device), dtype="float32",
              build_config=BuildConfig(max_batch_size=GREEDY_BATCH, max_num_tokens=GREEDY_BATCH * PROMPT_LEN,
                                       max_seq_len=PROMPT_LEN + new + 8, max_beam_width=WIDTH),
              kv_cache_config=KvCacheConfig(tokens_per_block=32, max_tokens=GREEDY_BATCH * (PROMPT_LEN + new + 64)))
    if not cuda:
        runner = llm.engine.runner
        runner.compiled = ZeroLogits(vocab)
        g = torch.Generator().manual_seed(1)
        for b in cuda_graph_batch_sizes(GREEDY_BATCH):  # what CudaGraphs.capture_decode leaves, minus CUDA
            logits, picks = torch.zeros(b, vocab), torch.zeros(2, b, dtype=torch.long)
            tables = [torch.randn(b, vocab, generator=g) * 3 for _ in range(4)]
            runner.cuda_graphs.decode[b] = (_LogitsGraph(logits, picks, tables), logits, picks)
    llm._loop.shutdown()  # the engine is stepped on this thread only
    return llm


class PhaseTimer:
    """perf_counter around the engine's calls (the probe's own wrappers, removed after)."""

    def __init__(self, engine):
        self.engine, self.ms, self.undo = engine, defaultdict(float), []
        self.wrap(engine.scheduler, "schedule", "schedule")
        self.wrap(engine.runner, "copy_blocks", "block copies")
        self.wrap(engine.runner, "execute", "execute")
        self.wrap(engine.runner, "execute_ahead", "execute")
        self.wrap(engine.step_sampler, "finish", "sample")
        self.wrap(engine, "_postprocess", "postprocess")
        self.wrap(engine, "_outputs", "outputs")
        self.wrap(engine_module, "take_beam_rows", "take_beam_rows")
        self.wrap(engine_module, "step_groups", "step_groups")
        self.wrap(engine_module, "queue_search", "queue_search")  # launches only: no sync

    def wrap(self, owner, name, phase):
        fn = getattr(owner, name)
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        @functools.wraps(fn)
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if phase in ("take_beam_rows", "step_groups", "block copies"):
                    sync()  # their device work counts to them, not to the next phase's wait
                self.ms[phase] += (time.perf_counter() - t) * 1e3

        setattr(owner, name, timed)
        self.undo.append((owner, name, fn, name in vars(owner)))

    def remove(self):
        for owner, name, fn, own in reversed(self.undo):
            if own:
                setattr(owner, name, fn)
            else:  # a method: the instance's wrapper goes, the class's shows again
                delattr(owner, name)


PHASES = ["schedule", "block copies", "execute", "queue_search", "sample", "take_beam_rows", "postprocess", "step_groups", "outputs"]


def run_steps(llm: LLM, prompts, params, profile: bool = False) -> tuple[float, dict, int]:
    """(ms per decode step, ms per step of each phase, steps); prefill steps excluded."""
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", list(p), params)
    while not any(s.output_token_ids for s in engine.scheduler.running):  # prefill, and the first pick
        engine.step()
    timer = PhaseTimer(engine)
    steps, wall = steps_to_end(engine, profile, top=25)
    timer.remove()
    return wall / steps * 1e3, {k: v / steps for k, v in timer.ms.items()}, steps


def host_part(vocab: int, new: int, repeats: int, profile: bool) -> tuple[str, dict]:
    llm = build_llm(vocab, new)
    g = torch.Generator().manual_seed(2)
    greedy_prompts = torch.randint(3, vocab, (GREEDY_BATCH, PROMPT_LEN), generator=g).tolist()
    beam_prompts = greedy_prompts[:BEAM_BATCH]
    greedy = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    beam = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, beam_width=WIDTH)
    run_steps(llm, greedy_prompts, greedy)  # warm-up
    run_steps(llm, beam_prompts, beam)
    results = {}
    for name, prompts, params in (("greedy x64", greedy_prompts, greedy), (f"beam {BEAM_BATCH}x{WIDTH}", beam_prompts,
                                                                           beam)):
        runs = [run_steps(llm, prompts, params) for _ in range(repeats)]
        results[name] = min(runs, key=lambda r: r[0])
    if profile:
        print(f"\n=== cProfile, beam {BEAM_BATCH}x{WIDTH} decode steps ===")
        run_steps(llm, beam_prompts, beam, profile=True)
    llm._loop.shutdown()  # (not llm.shutdown(): on the CPU the compiled model is a stand-in)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (stand-in graphs)"
    lines = [f"host ms per decode step ({device}, vocab {vocab}, {new} new tokens, best of {repeats}):", "",
             "| step | total | " + " | ".join(PHASES) + " |", "|---" * (len(PHASES) + 2) + "|"]
    for name, (total, phases, _) in results.items():
        lines.append(f"| {name} | {total:.3f} | " + " | ".join(f"{phases.get(p, 0.0):.3f}" for p in PHASES) + " |")
    (g_total, _, _), (b_total, _, _) = results.values()
    lines.append(f"\nbeam step - greedy step = {b_total - g_total:.3f} ms of host time (x{b_total / g_total:.2f})")
    return "\n".join(lines), {k: dict(total_ms=v[0], phases_ms=v[1], steps=v[2]) for k, v in results.items()}


def device_ms(fn, device: torch.device, reps: int = 20) -> float:
    """ms per call of `fn` over `reps` back-to-back calls: CUDA events on a GPU, wall time
    on the CPU (there the ops' own work, not a GPU's)."""
    fn()
    if device.type != "cuda":
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e3
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def device_part(vocab: int, device: torch.device) -> tuple[str, dict]:
    """ms of the device work of one step's sampling, 64 rows of bf16 logits (CUDA events)."""
    from trtllm.attention_context import PagedKVCache
    from trtllm.kernels.copy_blocks import copy_blocks
    from trtllm.runtime.model_runner import ModelRunner
    from trtllm.runtime.sampler import Sampler, SamplingBatch
    from trtllm.runtime.sequence import Sequence
    rows, k = BEAM_BATCH * WIDTH, WIDTH
    logits = torch.randn(rows, vocab, device=device, dtype=torch.bfloat16) * 3
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, beam_width=WIDTH)
    seqs = [Sequence(str(i // k), [1, 2], params, index=i % k) for i in range(rows)]
    for s in seqs:
        s.output_token_ids = [3]
    batch = SamplingBatch.build(seqs, vocab, logits.device, [2])
    sampler = Sampler()
    scores = torch.zeros(BEAM_BATCH, k, device=device)
    index = torch.arange(rows, device=device)
    keep = 2 * k

    def beam_select():  # the search's device work as beams.py runs it
        logp = logits[index].float().log_softmax(-1)
        acc = (logp.index_select(0, index).view(BEAM_BATCH, k, -1) + scores[:, :, None]).view(BEAM_BATCH, -1)
        return torch.topk(acc, keep)

    timed = [("greedy picks (in the decode graph)", lambda: greedy_picks(logits), 2 * rows * vocab),
             ("sampler over all rows", lambda: sampler(logits, batch), None),
             ("log_softmax + add + top-k (beams.py)", beam_select, None)]
    if hasattr(beam_search, "select_beams"):
        timed.append(("select_beams (one batched call)",
                      lambda: beam_search.select_beams(logits, index, scores, keep, None), None))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU wall time, not a GPU's"
    # copy-on-write: 3 of each group's 4 beams copy their partial block (every beam a child of
    # one parent, the most a step can copy), Llama-3.1-8B's cache (32 layers, 8 KV heads x 128,
    # 32-token blocks; on the CPU 2 layers), the blocks holding 1..32 tokens (a fork at any position)
    layers, block_size = (32 if device.type == "cuda" else 2), 32
    cache = PagedKVCache.allocate(layers, 2 * rows, block_size, 8, 128, torch.bfloat16, device)
    holder = SimpleNamespace(cache=cache, device=device, compiled=None, block_size=block_size)
    copies = [(i, rows + i, i % block_size + 1) for i in range(BEAM_BATCH * (WIDTH - 1))]
    block_bytes = 2 * cache.k[:, 0].nbytes
    held_bytes = sum(block_bytes * n // block_size for _, _, n in copies)
    src, dst, held = torch.tensor(copies, dtype=torch.long, device=device).T
    whole = torch.full_like(src, block_size)

    def copy_held():  # copy_blocks since d17c2ac: the tokens each block holds
        for pool in (cache.k, cache.v):
            copy_blocks(pool, src, dst, held)
    timed.append((f"copy_blocks, {len(copies)} blocks of {block_bytes / 1e6:.1f} MB (K+V), the tokens held",
                  copy_held, 2 * held_bytes))
    # the runner's whole path: the host list to the device (its `.to` waits for the stream), then the kernels
    timed.append(("  the same through ModelRunner.copy_blocks (list to the device first)",
                  lambda: ModelRunner.copy_blocks(holder, copies), 2 * held_bytes))

    def copy_two_pass():  # copy_blocks until 2026-12-07: index_select / index_copy_ of int64 words, whole blocks
        for pool in (cache.k, cache.v):
            rows_ = pool.view(*pool.shape[:2], -1).view(torch.int64)
            rows_.index_copy_(1, dst, rows_.index_select(1, src))

    def copy_whole():  # copy_blocks of 7108390: one pass, whole blocks
        for pool in (cache.k, cache.v):
            copy_blocks(pool, src, dst, whole)

    def copy_as_bytes():  # copy_blocks until 2026-12-06: index_select / index_copy_ of a uint8 view
        for pool in (cache.k, cache.v):
            raw = pool.view(torch.uint8)
            raw.index_copy_(1, dst, raw.index_select(1, src))
    timed.append(("  whole blocks in one pass (7108390)", copy_whole, 2 * len(copies) * block_bytes))
    timed.append(("  whole blocks in two passes of int64 words (before 2026-12-07)", copy_two_pass,
                  2 * len(copies) * block_bytes))
    timed.append(("  whole blocks as uint8 (before 2026-12-06)", copy_as_bytes, 2 * len(copies) * block_bytes))
    lines = [f"device ms of a step's sampling work ({name}, {rows} rows x vocab {vocab}, "
             "bf16 logits; 20 launches; GB/s: bytes read + written that the work needs):", "",
             "| work | ms | GB/s |", "|---|---|---|"]
    out = {}
    for name, fn, nbytes in timed:
        with torch.no_grad():
            ms = device_ms(fn, device)
        out[name] = ms
        lines.append(f"| {name} | {ms:.4f} | {f'{nbytes / ms / 1e6:,.0f}' if nbytes else '-'} |")
    lines.append(f"\n(bf16 logits [{rows}, {vocab}]: {rows * vocab * 2 / 1e6:.1f} MB; fp32 copy "
                 f"{rows * vocab * 4 / 1e6:.1f} MB; at 4.3 TB/s a pass over the fp32 copy is "
                 f"{rows * vocab * 4 / 4.3e12 * 1e3:.4f} ms)")
    return "\n".join(lines), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=64, help="new tokens a request")
    ap.add_argument("--vocab", type=int, default=512, help="the tiny model's vocabulary (host part)")
    ap.add_argument("--device-vocab", type=int, default=128256, help="vocabulary of the device part (CUDA only)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--device-part-on-cpu", action="store_true", help="part 2 without a GPU (checks the script)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    text, results = host_part(args.vocab, args.new, args.repeats, args.profile)
    if torch.cuda.is_available() or args.device_part_on_cpu:
        dev_text, results["device_ms"] = device_part(args.device_vocab, torch.device(
            "cuda" if torch.cuda.is_available() else "cpu"))
        text += "\n\n" + dev_text
    report("beam_step", text, results)


if __name__ == "__main__":
    main()
