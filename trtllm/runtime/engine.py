"""`Engine`: requests in, `RequestOutput`s out, one step at a time.

    engine.add_request(request_id, prompt_token_ids, sampling_params)   # may raise ValueError
    while engine.has_unfinished():
        for output in engine.step(): ...        # requests that changed this step
    engine.abort(request_id)

A step: the scheduler picks tokens, the model runner computes the logits to sample, the
step sampler (step_sampler.py) picks tokens, and each request's output grows by its new tokens and is checked
for its stop conditions (output_builder.py). Guided requests' grammars and logits
processors act on the logits in between (runtime/grammar.py). One request's failure (bad input at
admission, NaN logits) never touches another's. Request ids must be unique among those
in flight: the front ends refuse a duplicate (request_stream.OpenStreams).

The overlap scheduler (TensorRT-LLM's; on unless `disable_overlap_scheduler`): when a
step is a decode-graph step whose tokens are on the GPU before the host reads them
(greedy: the graph's picks; sampled: the sampler queued behind the step, no row's logits
read on the host), the engine launches the next decode step right after it, fed by those
tokens on the GPU, and only then waits for it and does its
bookkeeping (stop checks, detokenizing, outputs), so the host's share of a step runs
while the GPU computes the next. `step()` then returns the first step's outputs and
leaves the second in flight (`_ahead`); a sequence that stopped at the first has its
row of the second dropped (its blocks are freed: nothing it wrote there is ever read).
Sequences that end by length at the first are left out of the second; a request
waiting that could be admitted (a seat, room in the pool, an adapter slot), a short block, a grammar or logits processor,
or a row whose logits the host reads (beams, returned logits, best_of) makes the next step an
ordinary one (runtime/step_sampler.py, `next_step_tokens`).

Beam search (runtime/beams.py): a beam's logits row goes to its group, not the sampler
(`take_beam_rows`); once the scheduler has updated the step, `step_groups` searches and forks
the beams; a search that ends frees its beams and its best hypotheses become the outputs.
Copy-on-write block copies the scheduler queued are run before the step. Greedy and sampled
requests in the same batch are untouched. A decode-graph step of beams and greedy rows runs
no sampler (the graph's picks and NaN/Inf flags serve: `graph_picks_serve`); one with a row
the picks do not serve (sampled, logprobs, a grammar) runs it over every row.
`return_generation_logits` / `return_context_logits` copy each sampled row (and the prompt
rows, through the prompt-logprobs path) to the request's output on the host.

Speculative decoding (`engine.speculative`, runtime/speculative): before each schedule
the decoder proposes draft tokens for the decoding sequences; the step verifies them in
the target and a sequence may gain several tokens (each through the stop checks, a stop
inside the run cutting it there). The overlap scheduler runs only while no sequence
may get drafts at the next step (every one backed off after its drafts were rejected).

Pipeline parallelism (`set_pipeline_depth`, runtime/micro_batches.py): a step launches
micro-batches until one a stage is in flight and finishes the oldest; drafts are proposed
for the sequences no micro-batch holds.

`engine.on_step`, when set (trtllm-bench's --iteration_log and --profile set it), is
called on the engine's thread at the end of every step with a `StepRecord`; it observes,
it changes nothing. `engine.startup` (set by build_engine) says where building took time.
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

from trtllm.runtime.beam_search import queue_search, step_groups
from trtllm.runtime.beams import BeamGroup, take_beam_rows
from trtllm.runtime.block_manager import BlockManager
from trtllm.runtime.engine_limits import EngineLimits, check_stream_interval, validate_request
from trtllm.runtime.engine_stats import EngineStats, StartupTimes, StepRecord
from trtllm.runtime.grammar import LogitsHooks
from trtllm.runtime.micro_batches import MicroBatches
from trtllm.runtime.model_runner import LaunchedStep, ModelRunner
from trtllm.runtime.multimodal_stager import check_multimodal_request
from trtllm.runtime.output_builder import OutputBuilder
from trtllm.runtime.outputs import RequestOutput
from trtllm.runtime.prompt_logprobs import deliver_prompt_logprobs
from trtllm.runtime.request_perf import mark_beam_tokens, mark_scheduled
from trtllm.runtime.request_sequences import request_sequences
from trtllm.runtime.sampler import argmax_serves
from trtllm.runtime.scheduler import Scheduler
from trtllm.runtime.sequence import Sequence
from trtllm.runtime.speculative.decoder import SpeculativeDecoder, append_tokens
from trtllm.runtime.step_sampler import SampledStep, StepSampler
from trtllm.sampling_params import SamplingParams

log = logging.getLogger("trtllm")


class Engine:
    def __init__(self, runner: ModelRunner, block_manager: BlockManager, scheduler: Scheduler,
                 tokenizer, limits: EngineLimits, vocab_size: int, eos_token_ids: list[int],
                 stream_interval: int = 1, disable_overlap_scheduler: bool = False, adapters=None):
        check_stream_interval(stream_interval)
        self.runner, self.block_manager, self.scheduler = runner, block_manager, scheduler
        # a streaming request gets an output every stream_interval new tokens (its first at
        # once, its last when it ends): fewer, larger outputs at large batch
        self.stream_interval = stream_interval
        self.tokenizer, self.limits = tokenizer, limits
        self.vocab_size, self.eos_token_ids = vocab_size, eos_token_ids
        # guided decoding and logits processors (runtime/grammar.py); `logits_hooks.batched_logits_processor`
        # is LLM(batched_logits_processor=...)
        self.logits_hooks = LogitsHooks(tokenizer, vocab_size, eos_token_ids)
        self.step_sampler = StepSampler(self.logits_hooks, eos_token_ids)  # runtime/step_sampler.py
        self.requests: dict[str, OutputBuilder] = {}
        self.timed: set[str] = set()  # requests in flight with return_perf_metrics (runtime/request_perf.py)
        self.iteration = 0  # steps run: RequestPerfMetrics.first_iter / last_iter
        # outputs as snapshots; off, the engine's own growing outputs, valid until the next
        # call: what the engine process turns into StepDeltas at once (no per-step copy of
        # each stream's whole output)
        self.copy_outputs = True
        self.overlap = not disable_overlap_scheduler
        self._ahead: LaunchedStep | None = None  # launched by the last step(), not yet read
        self.on_step: Callable[[StepRecord], None] | None = None  # see the module docstring
        self.startup: StartupTimes | None = None
        self.beam_groups: dict[str, BeamGroup] = {}  # beam search requests in flight (runtime/beams.py)
        self.speculative: SpeculativeDecoder | None = None  # set by build_engine: see set_speculative
        self.adapters = adapters  # runtime/adapters.Adapters with LoRA (the scheduler's too), else None
        # pipeline parallelism: micro-batches kept in flight (set_pipeline_depth); depth 1 without
        self.micro_batches = MicroBatches()

    def set_speculative(self, decoder: SpeculativeDecoder) -> None:
        """Speculative decoding (runtime/speculative): each step proposes draft tokens and
        verifies them. The overlap scheduler runs only after a decode step none of whose
        sequences may get drafts at the next (all backed off: `decoder.speculates_next`):
        the next step's drafts depend on this step's tokens, which an ahead-launched step
        cannot wait for."""
        self.speculative = decoder

    def set_pipeline_depth(self, depth: int) -> None:
        """Pipeline parallelism (trtllm/parallel): keep `depth` micro-batches in flight, each of
        sequences the others do not hold, so that every stage has one to run; `step()` then
        launches micro-batches until `depth` are in flight and finishes the oldest. It turns
        the overlap scheduler off (a micro-batch's sequences wait for its logits anyway)."""
        self.micro_batches.depth, self.overlap = depth, False

    @property
    def pipeline_depth(self) -> int:
        return self.micro_batches.depth

    # -- requests ----------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError saying what is wrong with a request, before any work."""
        validate_request(prompt_token_ids, params, self.limits, self.vocab_size, self.tokenizer is not None)
        self.logits_hooks.validate(params)

    def check_lora(self, lora_request) -> None:
        """Raise ValueError (TypeError) naming what is wrong with a request's LoRA adapter."""
        if lora_request is None:
            return
        if self.adapters is None:
            raise ValueError(f"LoRA adapter {getattr(lora_request, 'lora_name', lora_request)!r} asked, but this "
                             "engine was built without lora_config")
        self.adapters.check(lora_request)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, stream: bool = False, lora_request=None, multimodal=None,
                    cache_salt: str | None = None) -> None:
        assert request_id not in self.requests, f"request id {request_id!r} is already in flight"
        self.validate(prompt_token_ids, params)
        check_multimodal_request(self.runner.multimodal, multimodal, prompt_token_ids)
        if multimodal is not None and not multimodal.images:
            multimodal = None
        self.check_lora(lora_request)
        if params.bad:  # banned words as token sequences, on a copy: the caller's params stay as given
            params = params.with_bad_words(lambda word: self.tokenizer.encode(word, add_special_tokens=False))
        seqs, group = request_sequences(request_id, prompt_token_ids, params, self.eos_token_ids,
                                        self.limits.max_seq_len, self.tokenizer, self.block_manager.block_size,
                                        lora_request, multimodal, cache_salt)
        self.logits_hooks.attach(seqs, params)  # compiles its guide (cached); ValueError if it cannot
        try:
            for seq in seqs[:1] if group is not None else seqs:  # a beam group's leader queues for it
                self.scheduler.add(seq)  # raises ValueError if it can never fit the pool
        except ValueError:
            self.scheduler.abort(request_id)
            raise
        if params.return_perf_metrics:
            self.timed.add(request_id)
        self.requests[request_id] = OutputBuilder(request_id, prompt, prompt_token_ids, params, seqs,
                                                  self.tokenizer, self.eos_token_ids, self.limits.max_seq_len,
                                                  stream)
        if group is not None:
            self.beam_groups[request_id] = group

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        self.timed.discard(request_id)
        self.scheduler.abort(request_id)
        self.beam_groups.pop(request_id, None)
        if req is None:
            return None
        self._drop_dead_ahead()
        req.abort()
        if not self.requests:  # no step may run after this one
            self._went_idle()
        return req.emit(self.copy_outputs)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- a step: schedule -> run -> sample -> postprocess ---------------------------------
    def step(self) -> list[RequestOutput]:
        if self.pipeline_depth == 1:
            return self._step()
        try:
            return self._step()
        except BaseException:  # the parallel group is broken (parallel/workers.py): nothing in flight is read
            self.micro_batches.forget(self.scheduler)
            raise

    def _step(self) -> list[RequestOutput]:
        started = time.perf_counter() if self.on_step is not None else 0.0
        self.iteration += 1
        changed: dict[str, OutputBuilder] = {}
        launched, self._ahead = self._ahead, None
        launched_ahead = launched is not None
        if self.pipeline_depth > 1:
            if self.speculative is not None:  # drafts for the sequences no micro-batch holds
                self.speculative.propose(self.scheduler.running, self.scheduler.in_flight, self.scheduler.waiting)
            launched = self.micro_batches.next(self.scheduler, functools.partial(self._schedule, changed),
                                               self._execute)
        elif launched is None:
            if self.speculative is not None:
                self.speculative.propose(self.scheduler.running, waiting=self.scheduler.waiting)
            scheduled = self._schedule(changed)
            launched = self._execute(scheduled) if scheduled else None
        if launched is not None:
            # argmax is every row's token: the graph's picks serve, and can feed a step ahead
            picks_serve = launched.picks is not None and argmax_serves(launched.to_sample)
            if picks_serve:  # guided rows: their picks re-made under their grammar, on the device
                self.logits_hooks.mask_picks(launched)
            pending = self.step_sampler.launch(launched, picks_serve)  # the sampler queued, if it can be
            # the beams' search queued behind a decode graph (not under parallelism: its logits come later)
            search = queue_search(launched.to_sample, launched.logits) \
                if self.beam_groups and launched.device_picks is not None else None
            # speculative decoding: only when no sequence may get drafts at the next step
            if self.overlap and (self.speculative is None or not self.speculative.speculates_next(launched.to_sample)):
                tokens = launched.device_picks[0] if picks_serve else self.step_sampler.next_step_tokens(launched, pending)
                if tokens is not None:
                    self._ahead = self._launch_ahead(launched, tokens)
            step = self.step_sampler.finish(launched, pending, self.speculative)
            self._take_sampled(step, changed)
            sampled, logprobs = step.tokens, step.logprobs
            beams = take_beam_rows(launched.to_sample, launched.logits, sampled) if self.beam_groups else ()
            if beams and self.timed:  # a search's token this step is its groups' (runtime/request_perf.py)
                mark_beam_tokens(beams, self.iteration)
            if launched.prompt_spans:
                deliver_prompt_logprobs(launched, self.requests)
            self._postprocess(launched, sampled, logprobs, changed)
            for group in step_groups(beams, self.block_manager, search) if beams else ():  # after update:
                self._end_beam_search(group, changed)                         # a fork needs it
            self._drop_dead_ahead()
        outputs = self._outputs(changed)
        if self.on_step is not None:
            scheduled = launched.scheduled if launched is not None else []
            self.on_step(StepRecord(started, time.perf_counter() - started, len(scheduled),
                                    sum(n for _, n in scheduled), launched_ahead, EngineStats.of(self)))
        return outputs

    def _schedule(self, changed, max_seqs: int | None = None) -> list[tuple[Sequence, int]]:
        """The scheduler's next step; the sequences it finds the pool cannot hold finish."""
        scheduled = self.scheduler.schedule(max_seqs=max_seqs)
        if self.timed:  # return_perf_metrics (runtime/request_perf.py)
            mark_scheduled(scheduled)
        for seq in self.scheduler.pop_finished():  # "length": the pool cannot hold it
            self._finish(seq, seq.finish_reason or "length", changed)
        return scheduled

    def _execute(self, scheduled: list[tuple[Sequence, int]]) -> LaunchedStep:
        if self.block_manager.pending_copies:  # beams' copy-on-write blocks, before the step writes
            self.runner.copy_blocks(self.block_manager.pending_copies)
            self.block_manager.pending_copies = []
        return self.runner.execute(scheduled)

    def _launch_ahead(self, launched: LaunchedStep, tokens) -> LaunchedStep | None:
        """The next decode step, launched before `launched`'s tokens reach the host; `tokens`
        holds them on the device, by row (the graph's picks, or the sampler's output queued
        before; see the module docstring)."""
        if len(launched.to_sample) != len(launched.scheduled):  # a prefill chunk rides along
            return None
        plan = self.scheduler.schedule_ahead(launched.scheduled, self._ends_by_length)
        return self.runner.execute_ahead(launched, *plan, tokens) if plan is not None else None

    def _ends_by_length(self, seq: Sequence) -> bool:
        """Whether the token `seq` is about to get is its last by max_tokens or max_seq_len."""
        return len(seq.output_token_ids) + 1 >= seq.sampling_params.max_tokens \
            or seq.num_tokens + 1 >= self.limits.max_seq_len

    def _drop_dead_ahead(self) -> None:
        """Forget the step in flight if every sequence in it has finished: it computes
        nothing anyone will read (and an idle engine must not hold it)."""
        if self._ahead is not None and all(s.is_finished for s in self._ahead.to_sample):
            self._ahead = None

    def _take_sampled(self, step: SampledStep, changed) -> None:
        """A step's failed rows finish with "error"; rows whose logits were asked for are copied."""
        for seq, why in step.failed.items():
            self.scheduler.finish(seq, "error", why)
            self._finish(seq, "error", changed)
        for seq, row in step.logits_rows:
            req = self.requests.get(seq.request_id)
            if req is not None:
                req.add_logits_row(seq, row)

    def _postprocess(self, launched: LaunchedStep, sampled: dict, logprobs: dict, changed) -> None:
        """Each new token into its request's output; a stop condition finishes its sequence."""
        for seq in self.scheduler.update(launched.scheduled, sampled):
            req = self.requests.get(seq.request_id)
            if req is None:
                continue
            changed[seq.request_id] = req
            token = sampled[seq]
            if seq.perf is not None:
                seq.perf.token(seq, self.iteration)
            reason = append_tokens(req, seq, token) if isinstance(token, list) \
                else req.append(seq, token, logprobs.get(seq))
            error = None
            if reason is None and seq.guide is not None:  # its grammar takes the token; "stop" at its end
                reason, error = self.logits_hooks.accept(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason, error)
                req.finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str, changed) -> None:
        req = self.requests.get(seq.request_id)
        if req is not None:
            changed[seq.request_id] = req
            if seq.beam is None:
                req.finish(seq, reason)
            elif reason == "error":  # one beam failed: the request fails whole
                self.scheduler.abort(seq.request_id)
                self.beam_groups.pop(seq.request_id, None)
                req.fail(seq.error or "the sequence failed while it ran")
            elif seq.request_id in self.beam_groups:  # "length": its beams alone fill the KV pool
                seq.beam.end_early()
                self._end_beam_search(seq.beam, changed)

    def _end_beam_search(self, group: BeamGroup, changed) -> None:
        """A beam search is over: its beams' blocks freed, its best hypotheses the outputs."""
        request_id = group.beams[0].request_id
        for beam in group.beams:
            self.scheduler.finish(beam, "stop")
        self.beam_groups.pop(request_id, None)
        req = self.requests.get(request_id)
        if req is not None:
            changed[request_id] = req
            req.set_results(group.results())

    def _outputs(self, changed: dict[str, OutputBuilder]) -> list[RequestOutput]:
        """The finished requests' outputs (which leave the engine), and the streaming ones'
        that are due; only these are copied."""
        outputs = []
        for req in changed.values():
            if req.output.finished:
                outputs.append(req.emit(self.copy_outputs))
                self.requests.pop(req.output.request_id, None)
                self.timed.discard(req.output.request_id)
            elif req.stream and req.due(self.stream_interval):
                outputs.append(req.emit(self.copy_outputs))
        if not self.requests:
            self._went_idle()
        return outputs

    def _went_idle(self) -> None:
        """No request is left (the last finished, or was aborted): a draft model's mirrors
        freed, the KV books checked."""
        if self.speculative is not None:
            self.speculative.release()  # a draft model's KV of the sequences that left
        try:
            self.block_manager.check_when_idle()
        except AssertionError as e:  # says so loudly, but keeps serving
            log.error("KV block pool books do not add up with no request in flight: %s", e)
