"""`EngineStats`: the scheduler's and the KV pool's counters at one moment, as /metrics
shows them. Plain values, so they cross a process boundary as they are.

`StepRecord`: one `Engine.step` as its observer (`Engine.on_step`) sees it, e.g. for
trtllm-bench's --iteration_log. `StartupTimes`: where building an engine spent its time."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    num_running: int = 0          # sequences in the batch
    num_waiting: int = 0          # sequences waiting for admission
    num_preemptions: int = 0      # sequences preempted (recomputed later), since start
    blocks_used: int = 0          # KV blocks held by sequences
    blocks_free: int = 0          # on the free list
    blocks_cached: int = 0        # holding reusable prefixes, evictable
    blocks_total: int = 0
    prefix_hit_rate: float = 0.0  # prompt tokens found cached / looked up
    # speculative decoding (runtime/speculative), since start: draft tokens verified, accepted,
    # and sequence-steps that verified drafts (acceptance length = 1 + accepted / steps)
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_verify_steps: int = 0

    @classmethod
    def of(cls, engine) -> EngineStats:
        sched, bm = engine.scheduler, engine.block_manager
        spec = getattr(engine, "speculative", None)
        counts = (spec.num_draft_tokens, spec.num_accepted_tokens, spec.num_verify_steps) if spec else (0, 0, 0)
        return cls(sched.num_running, sched.num_waiting, sched.num_preemptions, bm.num_used_blocks,
                   bm.num_free_blocks, bm.num_cached_blocks, bm.num_blocks, bm.prefix_hit_rate, *counts)


@dataclass(frozen=True)
class StepRecord:
    start_s: float       # time.perf_counter() when Engine.step began
    duration_s: float    # until it returned (with the overlap scheduler: the next step is in flight)
    num_sequences: int   # sequences whose tokens the step computed (0: nothing ran)
    num_tokens: int      # tokens it computed: prompt chunks and one per decoding sequence
    launched_ahead: bool  # launched by the step before (overlap scheduler), not scheduled by this one
    stats: EngineStats   # the counters once the step was done


@dataclass(frozen=True)
class StartupTimes:
    """Seconds building an engine took (runtime/build_engine.py). Compilation is
    lazy: `compile_s` is what ran while building (on a GPU, the KV-sizing forward's graph
    and the decode graphs' warm-up calls); a CPU engine compiles at its first steps
    (`CompiledModel.compile_s` keeps counting)."""
    load_s: float                # reading the checkpoint into the module (0 for a module given)
    compile_s: float             # calls that compiled a graph: dynamo capture, passes, Inductor
    cuda_graph_capture_s: float  # capturing the decode CUDA graphs, their compilation left out
    total_s: float               # the whole build, tokenizer and KV sizing included
    captures: int = 0            # dynamo captures of the model while building
    graphs: int = 0              # graphs compiled from them (one per variant a capture serves)

    def line(self) -> str:
        """The one-line breakdown `LLM(...)` logs at INFO."""
        other = self.total_s - self.load_s - self.compile_s - self.cuda_graph_capture_s
        return (f"engine ready in {self.total_s:.1f} s: load {self.load_s:.1f} s, compile {self.compile_s:.1f} s "
                f"({self.captures} capture(s) of the model, {self.graphs} graph(s)), CUDA-graph capture "
                f"{self.cuda_graph_capture_s:.1f} s, other {other:.1f} s")
