"""`CudaGraphs`: the step CUDA graphs a `ModelRunner` captured, their capture and replay.

Pure-decode steps replay graphs captured for batch sizes 1, 2, 4, 8, 16, ... up to
max_num_seqs (`cuda_graph_batch_sizes`; a step pads to the next captured size: padded
tokens write no cache slot and belong to no sequence). A decode graph also computes its
rows' greedy picks (argmax and a finite check, `greedy_picks`), which come back to one of
two pinned host buffers by turns (the runner's `_turn`), so step n+1's copy never
overwrites step n's before the host reads it.

Verify steps of speculative decoding (runtime/speculative) replay graphs of b sequences of
`verify_len` tokens each, every token a logits row, when `capture_verify` captured them
(opt-in: the speculative configs' `verify_cuda_graphs`; not yet run on a GPU at the time of
writing) and every sequence of the step verifies exactly verify_len - 1 drafts.

Steps of several tokens a sequence (prefill, chunked prefill, decode + prefill chunks, verify
steps no verify graph fits) of at most `CudaGraphConfig.max_prefill_tokens` tokens replay
prefill graphs, captured for token buckets (`prefill_token_sizes`: 16, 32, ... 512, then
every 256) on the prefill attention path with capture-time bounds that cover any such step:
num_seqs min(max_num_seqs, T), max_query_len T, max_seq_len the model's length; their logits
rows are the first min(T, max_num_seqs) flat indices the runner stages (the rows to sample
first, the rest padding). What they save is host time: an eager 128-token prefill of
Llama-3.1-8B launched for ~24 ms against ~5.5 ms of kernels (H200, bench/RESULTS.md). Not
captured past 33 tokens for latent attention (longer steps expand per sequence on the
host); image rows and M-RoPE's three position rows are staged into fixed buffers before
every replay, padding past the step's tokens -1 / zeros (runtime/model_runner.py
`prefill_graphs_serve`). With LoRA adapters they are captured with the adapters' kernels,
once: a replay refills each token's slot (-1 for padding and the base), so one graph serves
steps with adapters and without.

With LoRA adapters, each decode size is captured twice: with the adapters' kernels, and
inside `no_adapters()` (kernels/linear_lora.py) without them (the fused LoRA linears launch the base GEMV
alone), for steps in which no token has an adapter (`replay(..., adapters=False)`).

Steps that no graph serves run eagerly; the kernels the shortest of them choose (the prefill
attention kernel's small tiles) are compiled at startup by running one such step
(`warm_short_steps`), so a ragged verify step or a chunk's tail does not pay ~0.8 s mid-run.

A graph reads the runner's fixed-address buffers (token ids, positions, logits rows, the
attention metadata, LoRA slots, staged image features) and writes fixed output buffers:
replaying one is refilling those inputs in place, then `graph.replay()`. The runner's
input staging (`_stage`, `_staging`, `_inputs`, `_inputs_copied`) and step events
(`_step_launched`) are the runner's; this file uses them, it does not own them.
"""
from __future__ import annotations

import bisect
import contextlib
import gc
import math
import time

import torch

from trtllm.attention_context import attention_context
from trtllm.config import CudaGraphConfig
from trtllm.kernels.linear_lora import no_adapters
from trtllm.runtime.launched_step import LaunchedStep
from trtllm.runtime.sampler import greedy_picks

# One sequence of each, run at startup (warm_short_steps): q x G rows within 16, then within 32,
# for GQA groups G of 1, 2, 4, 8 and 16.
SHORT_STEP_LENS = (2, 3, 5, 9, 17)


def cuda_graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return sizes + [max_num_seqs]


def decode_batch_sizes(config: CudaGraphConfig, max_num_seqs: int) -> list[int]:
    """The decode (and verify) batch sizes `config` asks for, within the engine's max_num_seqs."""
    if config.batch_sizes is not None:
        over = sorted(b for b in config.batch_sizes if b > max_num_seqs)
        if over:
            raise ValueError(f"CudaGraphConfig.batch_sizes {over} exceed max_batch_size={max_num_seqs}")
        return sorted(set(config.batch_sizes))
    return cuda_graph_batch_sizes(min(config.max_batch_size or max_num_seqs, max_num_seqs))


def prefill_token_sizes(max_tokens: int) -> list[int]:
    """Token buckets of the prefill graphs: 16, 32, ..., 512, then every 256 (a step pads to
    the next: at most 255 padding tokens once the kernels, not the host, take the time), and
    max_tokens itself."""
    sizes, t = [], 16
    while t < max_tokens:
        sizes.append(t)
        t = t * 2 if t < 512 else t + 256
    return sizes + [max_tokens] if max_tokens > 0 else []


class CudaGraphs:
    def __init__(self, runner):
        self.runner = runner  # the ModelRunner whose buffers the graphs read and write
        # batch size -> (graph, logits [b, V], greedy [2, b]: argmax ids and 1/0 for finite rows)
        self.decode: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._decode_sizes: list[int] = []  # sorted(self.decode), not re-sorted every step
        # with LoRA: the same sizes captured inside no_adapters() (kernels/linear_lora.py), for steps without adapters
        self.decode_base: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        # verify steps (runtime/speculative): batch size -> (graph, logits [b * L, V]), L tokens a sequence
        self.verify: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.verify_len = 0
        # prefill steps (several tokens a sequence): token bucket -> (graph, logits [R, V]), R rows
        self.prefill: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._prefill_sizes: list[int] = []
        self.padding = True  # CudaGraphConfig.enable_padding: decode steps pad to the next captured size
        self._pool = None  # the memory pool every graph shares (captured largest first, replayed one at a time)
        self._replay_views: dict[tuple[int, int, int, bool], tuple] = {}  # (size, rows, turn, adapters): see replay
        # a decode graph's greedy picks, [2, b], go to pinned host memory right after the
        # replay, while the GPU runs, so reading them after `wait` is no synchronous
        # device-to-host copy (`.tolist()` of the device tensor: ~20 us under cProfile on
        # the H100). Two buffers per size, used by turns (the runner's `_turn`).
        self._greedy_host: dict[tuple[int, int], torch.Tensor] = {}  # (batch size, turn) -> [2, b]
        self.capture_s = 0.0  # seconds in capture_decode / capture_verify (their warm-up calls' compilation too)

    # -- which graph runs a step -----------------------------------------------------------
    def decode_size(self, num_tokens: int, num_seqs: int, sample_rows: list[int]) -> int | None:
        """The captured batch size that runs this step, if one can: every sequence has one
        new token (n >= 1 each, so tokens == sequences says it), and the rows to sample are
        the first ones (a graph's logits and greedy picks are read as their leading rows;
        the scheduler puts decodes first, so only a 1-token prefill chunk, last, is not)."""
        if num_tokens != num_seqs or (sample_rows and sample_rows[-1] != len(sample_rows) - 1):
            return None
        if len(self._decode_sizes) != len(self.decode):  # graphs added since: sort once more
            self._decode_sizes = sorted(self.decode)
        i = bisect.bisect_left(self._decode_sizes, num_tokens)
        if i == len(self._decode_sizes) or not self.padding and self._decode_sizes[i] != num_tokens:
            return None
        return self._decode_sizes[i]

    def prefill_size(self, num_tokens: int, num_sampled: int) -> int | None:
        """The captured token bucket that runs a step of num_tokens tokens with num_sampled
        logits rows, if one can (its graph computes min(bucket, max_num_seqs) rows)."""
        if len(self._prefill_sizes) != len(self.prefill):
            self._prefill_sizes = sorted(self.prefill)
        i = bisect.bisect_left(self._prefill_sizes, num_tokens)
        if i == len(self._prefill_sizes):
            return None
        size = self._prefill_sizes[i]
        return size if num_sampled <= self.prefill[size][1].shape[0] else None

    def verify_size(self, query_lens: list[int], num_rows: list[int]) -> int | None:
        """The captured verify batch size that runs this step: every sequence verifies
        verify_len - 1 drafts (so each of its tokens is a logits row, in order)."""
        L = self.verify_len
        if len(num_rows) != len(query_lens) or any(n != L for n in query_lens) or any(r != L for r in num_rows):
            return None
        sizes = sorted(self.verify)
        i = bisect.bisect_left(sizes, len(query_lens))
        return sizes[i] if i < len(sizes) else None

    # -- replay ----------------------------------------------------------------------------
    def replay_verify(self, size: int, ids: list[int], positions: list[int], scheduled, to_sample,
                      num_rows: list[int]) -> LaunchedStep:
        """A verify step by the graph captured for `size` sequences: its first len(ids)
        logits rows are the step's (padding tokens write no slot and belong to no sequence)."""
        runner = self.runner
        graph, logits = self.verify[size]
        total = size * self.verify_len
        runner._stage(ids, positions, [], total)
        runner._inputs[:, :total].copy_(runner._staging[:3, :total], non_blocking=True)
        if runner.adapters is not None:  # each token's LoRA slot, padding none (staged by the runner)
            runner.adapters.slots.slot_ids[:total].copy_(runner._staging[3, :total], non_blocking=True)
        if runner._inputs_copied is not None:
            runner._inputs_copied.record()
        graph.replay()
        return LaunchedStep(scheduled, to_sample, logits[:len(ids)], None, None, runner._step_launched(),
                            num_rows=num_rows)

    def replay_prefill(self, size: int, ids: list[int], positions: list[int], rows: list[int], scheduled,
                       to_sample, num_rows: list[int] | None) -> LaunchedStep:
        """A step of several tokens a sequence by the graph captured for `size` tokens: the
        step's tokens first, padding after (no slot written, no sequence's); logits rows
        `rows` first among the graph's rows."""
        runner = self.runner
        graph, logits = self.prefill[size]
        runner._stage(ids, positions, rows, size)
        runner._inputs[:, :size].copy_(runner._staging[:3, :size], non_blocking=True)
        if runner.adapters is not None:  # each token's LoRA slot, padding none (staged by the runner)
            runner.adapters.slots.slot_ids[:size].copy_(runner._staging[3, :size], non_blocking=True)
        if runner._inputs_copied is not None:
            runner._inputs_copied.record()
        graph.replay()
        return LaunchedStep(scheduled, to_sample, logits[:len(rows)], None, None, runner._step_launched(),
                            num_rows=num_rows)

    def replay(self, size: int, ids: list[int], positions: list[int], rows, scheduled, to_sample,
               gather_ids: torch.Tensor | None = None, adapters: bool = True) -> LaunchedStep:
        """A decode step by the graph captured for `size`; its first len(to_sample) rows
        are the ones to sample. With `gather_ids`, the input ids are gather_ids[rows]
        (on the device); else `ids`. adapters=False: no token has a LoRA adapter, the graph
        captured without their kernels runs (if there is one). The tensor views it needs are
        made once per (size, rows, turn, adapters), not every step: a slice costs ~4 us of
        host time, and a step would take four (bench/probes/host_step.py --profile)."""
        runner = self.runner
        num_rows, turn = len(to_sample), runner._turn
        adapters = adapters or size not in self.decode_base
        views = self._replay_views.get((size, num_rows, turn, adapters))
        if views is None:
            graph, logits, greedy = (self.decode if adapters else self.decode_base)[size]
            # whole [2, size] tensors on both sides: contiguous, so the copy is one async
            # memcpy (a strided one would go through an unpinned buffer, synchronously)
            host = self._greedy_host.get((size, turn))
            if host is None:
                host = self._greedy_host[size, turn] = torch.empty(greedy.shape, dtype=greedy.dtype,
                                                                   pin_memory=runner.device.type == "cuda")
            lora = None if runner.adapters is None else (runner.adapters.slots.slot_ids[:size],
                                                         runner._staging[3, :size])
            views = (graph, runner._inputs[:, :size], runner._staging[:3, :size], greedy, host,
                     host[:, :num_rows], logits[:num_rows], lora)
            self._replay_views[(size, num_rows, turn, adapters)] = views
        graph, inputs, staging, greedy, greedy_host, picks, logits, lora = views
        runner._stage(ids, positions, rows, size)
        inputs.copy_(staging, non_blocking=True)
        if lora is not None:  # each token's adapter slot
            lora[0].copy_(lora[1], non_blocking=True)
        if gather_ids is not None:  # the row of the previous step each sequence's token is at
            n = len(rows)
            torch.index_select(gather_ids, 0, runner.logits_indices[:n], out=runner.input_ids[:n])
        if runner._inputs_copied is not None:
            runner._inputs_copied.record()
        graph.replay()
        greedy_host.copy_(greedy, non_blocking=True)  # in greedy_host once the step is done
        return LaunchedStep(scheduled, to_sample, logits, picks, greedy, runner._step_launched())

    # -- capture ---------------------------------------------------------------------------
    @torch.no_grad()
    def capture_decode(self, batch_sizes: list[int]) -> None:
        """Capture decode steps of each batch size, largest first (they share one pool); with
        LoRA adapters, each size once more without their kernels (`decode_base`)."""
        self._replay_views.clear()
        self._greedy_host.clear()
        variants = [(self.decode, False)] + ([(self.decode_base, True)] if self.runner.adapters is not None else [])
        with self._frozen_heap():
            for graphs, base in variants:
                for b in sorted(batch_sizes, reverse=True):
                    with no_adapters(base):
                        graphs[b] = self._capture_one([1] * b, greedy=True)  # logits [b, V]
            torch.cuda.synchronize()

    @torch.no_grad()
    def capture_verify(self, tokens_per_seq: int, batch_sizes: list[int]) -> None:
        """Capture verify steps (runtime/speculative) of b sequences with tokens_per_seq
        tokens each (the last known token and its drafts), every token a logits row, on the
        prefill attention path (whose host-side bounds num_seqs / max_query_len /
        max_seq_len the capture fixes), largest first, one pool."""
        meta = self.runner.meta
        with self._frozen_heap():
            for b in sorted(batch_sizes, reverse=True):
                if b * tokens_per_seq > meta.max_num_tokens or b > meta.max_num_seqs:
                    continue
                graph, logits, _ = self._capture_one([tokens_per_seq] * b)  # logits [b * L, V]
                self.verify[b] = (graph, logits)
            self.verify_len = tokens_per_seq
            torch.cuda.synchronize()

    @torch.no_grad()
    def capture_prefill(self, token_sizes: list[int]) -> None:
        """Capture steps of T tokens for each T (largest first, the shared pool): T tokens over
        min(max_num_seqs, T) sequences at capture, launched with the bounds of any step of at
        most T tokens (see the module docstring); min(T, max_num_seqs) logits rows."""
        max_num_seqs = self.runner.meta.max_num_seqs
        with self._frozen_heap():
            for t in sorted(token_sizes, reverse=True):
                seqs = min(max_num_seqs, t)
                lens = [t // seqs] * seqs
                lens[0] += t - sum(lens)
                graph, logits, _ = self._capture_one(lens, rows=seqs)  # logits [seqs, V]
                self.prefill[t] = (graph, logits)
            torch.cuda.synchronize()

    @torch.no_grad()
    def warm_short_steps(self) -> None:
        """Run (not capture) one sequence of each of SHORT_STEP_LENS new tokens on the ordinary
        compilation, no slot written: what the first eager step of so few tokens a sequence (a
        ragged verify step no graph fits, a chunk's tail) would otherwise compile mid-run, the
        prefill attention kernel's small tiles (launch_shape.prefill_config: 16 and 32 rows, any
        GQA group up to 16). The first such step took 799 ms on the H100, 762 of them that
        compilation (bench/probes/step_compiles.py --ragged-end, 2026-12-06)."""
        started = time.perf_counter()
        runner = self.runner
        for n in SHORT_STEP_LENS:
            if n > min(runner.meta.max_num_tokens, runner.max_model_len):
                break
            args = self._dummy_step([n], rows=1)
            with attention_context(runner.cache, runner.meta), runner.graph_inputs():
                runner.compiled(*args)
        torch.cuda.synchronize()
        self.capture_s += time.perf_counter() - started

    @contextlib.contextmanager
    def _frozen_heap(self):
        """The Python heap frozen while capturing: torch.cuda.graph runs gc.collect() at every
        capture, which otherwise walks every object the load and the compilations left (vLLM's
        measure: capture from 35 s to 2 s). The time goes to capture_s."""
        started = time.perf_counter()
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            self.capture_s += time.perf_counter() - started

    def _dummy_step(self, lens: list[int], rows: int | None) -> tuple:
        """The metadata (refilled) and the model's arguments of a step of sequences of `lens`
        new tokens each, every one in block 0, no slot to write, max_seq_len the model's length."""
        runner, meta = self.runner, self.runner.meta
        meta.fill(lens, lens, [[0] * math.ceil(n / runner.block_size) for n in lens], runner.block_size)
        meta.slot_mapping.fill_(-1)
        meta.max_seq_len = runner.max_model_len
        ids, pos = runner._flat_batch(sum(lens))
        return (ids, pos) if rows is None else (ids, pos, runner.logits_indices[:rows])

    def _capture_one(self, lens: list[int], greedy: bool = False, rows: int | None = None):
        """(graph, logits, greedy picks or None) of one step of sequences of `lens` new tokens
        each, with no slot to write, in the shared pool: capture-time values only; every replay
        refills the same buffers. max_seq_len = the model's length, so the captured kernels'
        split choice covers any later context. rows None: a decode or verify step, every token
        a logits row, on the decode-graph compilation (its GEMV linears serve any call of few
        tokens; attention takes its prefill path from max_query_len > 1 itself). rows R: a
        prefill step on the ordinary compilation, launched with max_query_len = all its tokens
        (a bound for any step of as many), logits for the first R flat indices staged."""
        runner = self.runner
        args = self._dummy_step(lens, rows)
        if rows is not None:
            runner.meta.max_query_len = sum(lens)
        variant = runner.compiled.decode_graphs() if rows is None else contextlib.nullcontext()
        with attention_context(runner.cache, runner.meta), runner.graph_inputs(), variant:
            for _ in range(2):  # compile for this shape and warm up outside the graph
                runner.compiled(*args)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = runner.compiled(*args)
                logits = logits[0] if rows is None else logits  # [total or rows, V]
                # greedy decoding needs no sampler launches: argmax and the NaN/Inf
                # check ride in the graph, and one read brings both back
                picks = greedy_picks(logits) if greedy else None
                if picks is not None and runner.pick_map is not None:  # an EAGLE-3 head's draft vocabulary
                    picks = torch.stack([runner.pick_map[picks[0]], picks[1]])
        self._pool = graph.pool()
        return graph, logits, picks
