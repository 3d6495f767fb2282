"""TensorRT-LLM's per-iteration statistics: `LLM(enable_iter_perf_stats=True)` keeps one dict
per engine step (the last `iter_stats_max_iterations`, 1,000 by default), and `vars(llm.engine_stats())`
returns those recorded since the previous call (`await llm.get_stats_async()` too):

    {"iter": 12, "iterLatencyMS": 0.41, "timestamp": ...,           # the step's start, time.time()
     "numActiveRequests": 3, "numQueuedRequests": 0,
     "inflightBatchingStats": {"numScheduledRequests": 3, "numScheduledTokens": 3, "launchedAhead": True},
     "kvCacheStats": {"maxNumBlocks": 64, "freeNumBlocks": 50, "usedNumBlocks": 9, "cachedNumBlocks": 5,
                      "tokensPerBlock": 16, "cacheHitRate": 0.5},
     "specDecodingStats": {"numDraftTokens": 0, "numAcceptedTokens": 0, "numVerifySteps": 0}}

TensorRT-LLM's key names where it has the figure; `numScheduledTokens`, `launchedAhead`,
`cachedNumBlocks` and `numVerifySteps` are this engine's. Counts are sequences (a request with
n > 1 is n); the speculative counts are since the engine started, as /metrics's. Recorded by
`Engine.on_step` on the engine's thread (runtime/engine_stats.StepRecord); a deque append and
popleft are atomic, so the reader never locks it.
"""
from __future__ import annotations

import time
from collections import deque

from trtllm.runtime.engine_stats import StepRecord

DEFAULT_MAX_ITERATIONS = 1000  # TensorRT-LLM's iter_stats_max_iterations default


class IterationStats:
    """An `Engine.on_step` observer keeping the last `max_iterations` steps as TensorRT-LLM's dicts."""

    def __init__(self, block_size: int, max_iterations: int = DEFAULT_MAX_ITERATIONS):
        self.block_size, self.iteration = block_size, 0
        self._stats: deque[dict] = deque(maxlen=max_iterations)
        # perf_counter -> time.time(): StepRecord's start is on perf_counter
        self._wall_offset = time.time() - time.perf_counter()

    def __call__(self, record: StepRecord) -> None:
        self.iteration += 1
        s = record.stats
        self._stats.append({
            "iter": self.iteration, "iterLatencyMS": record.duration_s * 1e3,
            "timestamp": record.start_s + self._wall_offset,
            "numActiveRequests": s.num_running, "numQueuedRequests": s.num_waiting,
            "inflightBatchingStats": {"numScheduledRequests": record.num_sequences,
                                      "numScheduledTokens": record.num_tokens,
                                      "launchedAhead": record.launched_ahead},
            "kvCacheStats": {"maxNumBlocks": s.blocks_total, "freeNumBlocks": s.blocks_free,
                             "usedNumBlocks": s.blocks_used, "cachedNumBlocks": s.blocks_cached,
                             "tokensPerBlock": self.block_size, "cacheHitRate": s.prefix_hit_rate},
            "specDecodingStats": {"numDraftTokens": s.spec_draft_tokens, "numAcceptedTokens": s.spec_accepted_tokens,
                                  "numVerifySteps": s.spec_verify_steps}})

    @classmethod
    def observe(cls, engine, max_iterations: int) -> IterationStats:
        """A recorder of `engine`'s steps (its `on_step` observer from now on)."""
        engine.on_step = cls(engine.block_manager.block_size, max_iterations)
        return engine.on_step

    def drain(self) -> list[dict]:
        """The steps recorded since the last drain, oldest first (one popleft each: a step the engine
        records meanwhile stays for the next)."""
        return [self._stats.popleft() for _ in range(len(self._stats))]
