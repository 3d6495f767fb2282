"""`Engine`: requests in, `RequestOutput`s out, one step at a time.

    engine.add_request(request_id, prompt_token_ids, sampling_params)   # may raise ValueError
    while engine.has_unfinished():
        for output in engine.step(): ...        # requests that changed this step
    engine.abort(request_id)

A step: the scheduler picks tokens, the model runner computes the logits to sample,
the sampler picks tokens, and each sequence is checked for its stop conditions (EOS,
stop token ids, stop strings, max_tokens, the model's length). One request's failure
(bad input at admission, NaN logits) never touches another's.

The overlap scheduler (TensorRT-LLM's; on unless `disable_overlap_scheduler`): when a
step is a greedy decode-graph step, the engine launches the next decode step right
after it, fed by its picks on the GPU, and only then waits for it and does its
bookkeeping (stop checks, detokenizing, outputs), so the host's share of a step runs
while the GPU computes the next. `step()` then returns the first step's outputs and
leaves the second in flight (`_ahead`); a sequence that stopped at the first has its
row of the second dropped (its blocks are freed: nothing it wrote there is ever read).
Sequences that end by length at the first are left out of the second; a request
waiting for admission with a slot free for it, a short block, or a row that needs the
sampler (logprobs, penalties, temperature) makes the next step an ordinary one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from trtllm.runtime.block_manager import BlockManager
from trtllm.runtime.model_runner import LaunchedStep, ModelRunner
from trtllm.runtime.outputs import CompletionOutput, RequestOutput
from trtllm.runtime.sampler import Sampler, SamplingBatch, draw_seed
from trtllm.runtime.scheduler import Scheduler
from trtllm.runtime.sequence import Sequence
from trtllm.runtime.tokenizer import IncrementalDetokenizer, find_stop_span, safe_prefix_len
from trtllm.sampling_params import SamplingParams

log = logging.getLogger("trtllm")


@dataclass
class EngineLimits:
    max_num_seqs: int
    max_num_tokens: int
    max_input_len: int
    max_seq_len: int


@dataclass
class _Request:
    output: RequestOutput
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer | None]
    checked: list[int] = field(default_factory=list)   # text length already searched for stops
    streamed: list[int] = field(default_factory=list)  # text length already streamed
    streamed_tokens: list[int] = field(default_factory=list)
    stream: bool = False  # emit every step's progress, not only the final output


class Engine:
    def __init__(self, runner: ModelRunner, block_manager: BlockManager, scheduler: Scheduler,
                 tokenizer, limits: EngineLimits, vocab_size: int, eos_token_ids: list[int],
                 stream_interval: int = 1, disable_overlap_scheduler: bool = False):
        check_stream_interval(stream_interval)
        self.runner, self.block_manager, self.scheduler = runner, block_manager, scheduler
        # a streaming request gets an output every stream_interval new tokens (its first at
        # once, its last when it ends): fewer, larger outputs at large batch
        self.stream_interval = stream_interval
        self.tokenizer, self.limits = tokenizer, limits
        self.vocab_size, self.eos_token_ids = vocab_size, eos_token_ids
        self.sampler = Sampler()
        self.requests: dict[str, _Request] = {}
        # outputs as RequestOutput.delta() tuples instead of snapshots: what the engine
        # process sends (no per-step copy of each stream's whole output)
        self.emit_deltas = False
        self.overlap = not disable_overlap_scheduler
        self._ahead: LaunchedStep | None = None  # launched by the last step(), not yet read

    # -- requests ----------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError saying what is wrong with a request, before any work."""
        validate_request(prompt_token_ids, params, self.limits, self.vocab_size, self.tokenizer is not None)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, stream: bool = False) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in flight")
        self.validate(prompt_token_ids, params)
        seqs = [Sequence(request_id, list(prompt_token_ids), params, index=i) for i in range(params.n)]
        for seq in seqs:
            seq.seed = params.seed if params.seed is not None else draw_seed()
        added = []
        try:
            for seq in seqs:
                self.scheduler.add(seq)  # raises ValueError if it can never fit the pool
                added.append(seq)
        except ValueError:
            self.scheduler.abort(request_id)
            raise
        detok = self.tokenizer is not None and params.detokenize
        self.requests[request_id] = _Request(
            output=RequestOutput(request_id, prompt, list(prompt_token_ids),
                                 [CompletionOutput(i, logprobs=[] if params.logprobs is not None else None,
                                                   cumulative_logprob=0.0 if params.logprobs is not None else None)
                                  for i in range(params.n)]),
            params=params, seqs=seqs,
            detokenizers=[IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
                          if detok else None for _ in seqs],
            checked=[0] * params.n, streamed=[0] * params.n, streamed_tokens=[0] * params.n, stream=stream)

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        self.scheduler.abort(request_id)
        if req is None:
            return None
        self._drop_dead_ahead()
        for c in req.output.outputs:
            c.finish_reason = c.finish_reason or "abort"
        req.output.finished = True
        return self._emit(req)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- a step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        changed: dict[str, _Request] = {}
        launched, self._ahead = self._ahead, None
        if launched is None:
            scheduled = self.scheduler.schedule()
            for seq in self.scheduler.pop_finished():  # "length": the pool cannot hold it
                self._finished(seq, seq.finish_reason or "length", changed)
            launched = self.runner.execute(scheduled) if scheduled else None
        if launched is not None:
            # argmax is every row's token: the graph's picks serve, and can feed a step ahead
            picks_serve = launched.picks is not None and _all_plain_greedy(launched.to_sample)
            if self.overlap and picks_serve:
                self._ahead = self._launch_ahead(launched)
            sampled, extra = self._sample(launched, picks_serve, changed)
            for seq in self.scheduler.update(launched.scheduled, sampled):
                self._on_token(seq, sampled[seq], extra.get(seq), changed)
            self._drop_dead_ahead()
        outputs = []
        for r in changed.values():  # only these are copied: a non-streaming request, at its end
            if r.output.finished:
                outputs.append(self._emit(r))
                self.requests.pop(r.output.request_id, None)
            elif r.stream and self._stream_due(r):
                outputs.append(self._emit(r))
        if not self.requests:
            self._check_books()
        return outputs

    def _drop_dead_ahead(self) -> None:
        """Forget the step in flight if every sequence in it has finished: it computes
        nothing anyone will read (and an idle engine must not hold it)."""
        if self._ahead is not None and all(s.is_finished for s in self._ahead.to_sample):
            self._ahead = None

    def _launch_ahead(self, launched: LaunchedStep) -> LaunchedStep | None:
        """The next decode step, launched before `launched`'s tokens reach the host (whose
        graph picks are every row's token; see the module docstring)."""
        if len(launched.to_sample) != len(launched.scheduled):  # a prefill chunk rides along
            return None
        plan = self.scheduler.schedule_ahead(launched.scheduled, self._ends_by_length)
        return self.runner.execute_ahead(launched, *plan) if plan is not None else None

    def _ends_by_length(self, seq: Sequence) -> bool:
        """Whether the token `seq` is about to get is its last by max_tokens or max_seq_len."""
        return len(seq.output_token_ids) + 1 >= seq.sampling_params.max_tokens \
            or seq.num_tokens + 1 >= self.limits.max_seq_len

    def _sample(self, launched: LaunchedStep, picks_serve: bool, changed) -> tuple[dict, dict]:
        seqs = launched.to_sample
        if not seqs:
            return {}, {}
        launched.wait()
        if picks_serve:
            tokens, finite = launched.picks.tolist()  # picked inside the decode graph
            if all(finite):  # the usual step: no row failed, none wants logprobs
                return dict(zip(seqs, tokens)), {}
            chosen, top = None, None
        else:
            # (never a step with one launched after it: that replay may reuse these logits)
            logits = launched.logits
            batch = SamplingBatch.build(seqs, logits.shape[-1], logits.device, self.eos_token_ids)
            out = self.sampler(logits, batch)
            tokens, finite = out.token_ids.tolist(), out.finite.tolist()
            chosen = out.logprobs.tolist()
            top = [list(zip(*pair)) for pair in zip(out.top_logprobs[0].tolist(), out.top_logprobs[1].tolist())] \
                if out.top_logprobs is not None else None
        sampled, extra = {}, {}
        for i, seq in enumerate(seqs):
            if not finite[i]:  # fails alone; finished before update, so its blocks stay unpublished
                self.scheduler.finish(seq, "error", "the model produced NaN or Inf logits")
                self._finished(seq, "error", changed)
                continue
            sampled[seq] = tokens[i]
            k = seq.sampling_params.logprobs
            if k is not None:
                extra[seq] = (chosen[i], top[i][:k] if top is not None else [])
        return sampled, extra

    def _on_token(self, seq: Sequence, token: int, logprob, changed) -> None:
        req = self.requests.get(seq.request_id)
        if req is None:
            return
        changed[seq.request_id] = req
        i, params = seq.index, req.params
        completion = req.output.outputs[i]
        completion.token_ids.append(token)
        if logprob is not None:
            chosen, top = logprob
            entry = {token: chosen}
            entry.update({t: v for t, v in top if t != token})
            completion.logprobs.append(entry)
            completion.cumulative_logprob += chosen
        detok = req.detokenizers[i]
        if detok is not None:
            completion.text += detok.append(token)
        reason, stop_reason = None, None
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason, stop_reason = "stop", token
        elif params.stop and detok is not None:
            span = find_stop_span(completion.text, params.stop, req.checked[i])
            req.checked[i] = len(completion.text)
            if span is not None:
                reason, stop_reason = "stop", completion.text[span[0]:span[1]]
                completion.text = completion.text[: span[1] if params.include_stop_str_in_output else span[0]]
        if reason is None and (len(seq.output_token_ids) >= params.max_tokens
                               or seq.num_tokens >= self.limits.max_seq_len):
            reason = "length"
        if reason is not None:
            completion.stop_reason = stop_reason
            self.scheduler.finish(seq, reason)
            self._finished(seq, reason, changed)

    def _finished(self, seq: Sequence, reason: str, changed) -> None:
        req = self.requests.get(seq.request_id)
        if req is None:
            return
        changed[seq.request_id] = req
        completion = req.output.outputs[seq.index]
        completion.finish_reason = reason
        detok = req.detokenizers[seq.index]
        if detok is not None and not isinstance(completion.stop_reason, str):
            completion.text += detok.flush()  # a held-back unfinished character, if any
        req.output.finished = all(c.finish_reason is not None for c in req.output.outputs)
        req.output.num_cached_tokens = max(s.num_cached_tokens for s in req.seqs)

    def _stream_due(self, req: _Request) -> bool:
        if self.stream_interval == 1:
            return True
        for i, c in enumerate(req.output.outputs):
            sent = req.streamed_tokens[i]
            if (sent == 0 and c.token_ids) or len(c.token_ids) - sent >= self.stream_interval:
                return True
        return False

    def _emit(self, req: _Request) -> RequestOutput | tuple:
        """A snapshot for the caller (or its delta, with emit_deltas); unfinished text holds
        back a possible stop-string start."""
        for i, c in enumerate(req.output.outputs):
            visible = len(c.text) if c.finish_reason or not req.params.stop else safe_prefix_len(c.text, req.params.stop)
            c.text_diff = c.text[req.streamed[i]:visible]
            req.streamed[i] = max(req.streamed[i], visible)
            c.token_ids_diff = c.token_ids[req.streamed_tokens[i]:]
            req.streamed_tokens[i] = len(c.token_ids)
        if self.emit_deltas:
            return req.output.delta()
        return req.output.snapshot(text_lengths=req.streamed)

    def _check_books(self) -> None:
        try:
            self.block_manager.check_invariants()
        except AssertionError as e:  # says so loudly, but keeps serving
            log.error("KV block pool books do not add up with no request in flight: %s", e)



def _plain_greedy_params(p: SamplingParams) -> bool:
    return (p.temperature < 1e-5 or p.top_k == 1) and p.logprobs is None and p.repetition_penalty == 1.0 \
        and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0


def _all_plain_greedy(seqs: list[Sequence]) -> bool:
    """Argmax of the raw logits is every sequence's next token (no logprobs wanted, past
    min_tokens). A run of sequences sharing one SamplingParams (an `LLM.generate` batch:
    all of them) has its params looked at once: ~0.8 us a sequence less."""
    last = None
    for seq in seqs:
        p = seq.sampling_params
        if p is not last:
            if not _plain_greedy_params(p):
                return False
            last = p
        if len(seq.output_token_ids) < p.min_tokens:
            return False
    return True


def check_stream_interval(stream_interval) -> None:
    if isinstance(stream_interval, bool) or not isinstance(stream_interval, int) or stream_interval < 1:
        raise ValueError(f"stream_interval must be an integer >= 1, got {stream_interval!r}")


def validate_request(prompt_token_ids: list[int], params: SamplingParams, lim: EngineLimits, vocab_size: int,
                     has_tokenizer: bool) -> None:
    """Raise ValueError saying what is wrong with a request (also used where the engine
    runs in another process: the front end checks before it sends)."""
    n = len(prompt_token_ids)
    if n == 0:
        raise ValueError("the prompt is empty")
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")
    if n > lim.max_input_len:
        raise ValueError(f"the prompt has {n} tokens, more than max_input_len={lim.max_input_len}")
    if n + params.max_tokens > lim.max_seq_len:
        raise ValueError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds "
                         f"max_seq_len={lim.max_seq_len}")
    if params.detokenize and not has_tokenizer and params.stop:
        raise ValueError("stop strings need a tokenizer; this LLM was built without one")
