"""Per-request performance metrics, TensorRT-LLM's `return_perf_metrics`:

    out = llm.generate(prompt, SamplingParams(return_perf_metrics=True))
    m = out.outputs[0].request_perf_metrics
    ttft = m.timing_metrics.first_token_time - m.timing_metrics.arrival_time   # a timedelta
    m.kv_cache_metrics.num_reused_blocks, m.kv_cache_metrics.kv_cache_hit_rate
    m.speculative_decoding.acceptance_rate
    m.first_iter, m.last_iter                       # the engine steps of its first and last token

Times are `datetime.timedelta`s on the monotonic clock (one clock for every process of a
machine: the engine process's times compare with each other, not with wall time), taken when
the engine received the request, first scheduled it, and appended its first and last token.
Blocks: those the sequence held at most (`num_total_allocated_blocks`), the prompt's full
blocks found in the prefix cache when it was first scheduled (`num_reused_blocks`: a preempted
sequence finding its own blocks again is no hit), its other prompt blocks (`num_missed_blocks`),
and the rest allocated anew. A completion gets its metrics when it
finishes; with beam search, every beam's are the search's (its leader's recorder, a token a step).

`PerfRecorder` is the engine's side: one per sequence that asks (`Sequence.perf`), fed by
`Engine._schedule` (`mark_scheduled`) and `Engine._postprocess` (`token`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import timedelta


@dataclass
class TimingMetrics:
    arrival_time: timedelta
    first_scheduled_time: timedelta
    first_token_time: timedelta
    last_token_time: timedelta


@dataclass
class KvCacheMetrics:
    num_total_allocated_blocks: int
    num_new_allocated_blocks: int
    num_reused_blocks: int
    num_missed_blocks: int

    @property
    def kv_cache_hit_rate(self) -> float:
        looked_up = self.num_reused_blocks + self.num_missed_blocks
        return self.num_reused_blocks / looked_up if looked_up else 0.0


@dataclass
class SpeculativeDecodingMetrics:
    acceptance_rate: float  # accepted / verified draft tokens (0.0: none verified)
    total_accepted_draft_tokens: int
    total_draft_tokens: int


@dataclass
class RequestPerfMetrics:
    timing_metrics: TimingMetrics
    kv_cache_metrics: KvCacheMetrics
    speculative_decoding: SpeculativeDecodingMetrics
    first_iter: int  # the engine step that gave the first token (Engine.iteration), and the last's
    last_iter: int


def mark_scheduled(scheduled) -> None:
    """A step's (sequence, tokens) pairs are scheduled: those that record, note it."""
    now = time.monotonic()
    for seq, _ in scheduled:
        if seq.perf is not None:
            seq.perf.scheduled(seq, now)


def mark_beam_tokens(groups, iteration: int) -> None:
    """Beam searches that gained a token this step (their beams' tokens never pass `_postprocess`):
    each leader's recorder, whose metrics every beam's completion gets, notes it."""
    for group in groups:
        leader = group.beams[0]
        if leader.perf is not None:
            leader.perf.token(leader, iteration)


class PerfRecorder:
    """One sequence's times, steps and blocks as the engine runs it."""

    __slots__ = ("block_size", "arrival", "first_scheduled", "first_token", "last_token", "first_iter",
                 "last_iter", "max_blocks", "cached_tokens")

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.arrival = time.monotonic()
        self.first_scheduled = self.first_token = self.last_token = None
        self.first_iter = self.last_iter = -1
        self.max_blocks = self.cached_tokens = 0

    def scheduled(self, seq, now: float) -> None:
        if self.first_scheduled is None:  # (its blocks just allocated: the prefix cache's hits are set)
            self.first_scheduled, self.cached_tokens = now, seq.num_cached_tokens
        self.max_blocks = max(self.max_blocks, len(seq.block_table))

    def token(self, seq, iteration: int) -> None:
        self.last_token, self.last_iter = time.monotonic(), iteration
        if self.first_token is None:
            self.first_token, self.first_iter = self.last_token, iteration
        self.max_blocks = max(self.max_blocks, len(seq.block_table))

    def metrics(self, seq) -> RequestPerfMetrics:
        prompt_blocks = math.ceil(len(seq.prompt_token_ids) / self.block_size)
        reused = min(self.cached_tokens // self.block_size, prompt_blocks)
        total = max(self.max_blocks, reused)
        first_scheduled = self.first_scheduled if self.first_scheduled is not None else self.arrival
        first_token = self.first_token if self.first_token is not None else first_scheduled
        last_token = self.last_token if self.last_token is not None else first_token
        drafts, accepted = seq.num_draft_tokens, seq.num_accepted_draft_tokens
        return RequestPerfMetrics(
            TimingMetrics(*(timedelta(seconds=t) for t in (self.arrival, first_scheduled, first_token, last_token))),
            KvCacheMetrics(total, total - reused, reused, prompt_blocks - reused),
            SpeculativeDecodingMetrics(accepted / drafts if drafts else 0.0, accepted, drafts),
            self.first_iter, self.last_iter)
