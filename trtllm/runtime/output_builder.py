"""`OutputBuilder`: one request's `RequestOutput` as the engine grows it, a token at a time.

    req = OutputBuilder(request_id, prompt, prompt_token_ids, params, seqs, tokenizer, eos_token_ids,
                        max_seq_len, stream)
    req.set_prompt_logprobs(start, entries)    # prompt_logprobs asked: a chunk's worth
    reason = req.append(seq, token, logprob)   # "stop" | "length" | None
    if reason: scheduler.finish(seq, reason); req.finish(seq, reason)
    if req.output.finished or req.stream and req.due(stream_interval): emit(req.emit(copy=True))

Each new token goes into its completion with its logprobs and its detokenized text; the
stop conditions (EOS, stop token ids, stop strings, max_tokens, the model's length) are
checked; an output is emitted when the request ends or, streaming, every stream_interval
tokens. Text that could be the start of a stop string is held back until it is not.
"""
from __future__ import annotations

import torch

from trtllm.runtime.outputs import CompletionOutput, RequestOutput, logprob_entry, new_output
from trtllm.runtime.sequence import Sequence
from trtllm.runtime.tokenizer import IncrementalDetokenizer, find_stop_span, safe_prefix_len, special_stop_tokens
from trtllm.sampling_params import SamplingParams


class OutputBuilder:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 seqs: list[Sequence], tokenizer, eos_token_ids: list[int], max_seq_len: int, stream: bool):
        self.output = new_output(request_id, prompt, list(prompt_token_ids), params)
        self.params, self.seqs = params, seqs
        # best_of > n: all best_of completions grow here; the n of the highest cumulative
        # logprob are the output (emitted once, when all are done)
        self.ranked = params.num_sequences > params.n and not params.is_beam_search
        if self.ranked:
            self.output.outputs += [CompletionOutput(i, logprobs=[] if params.logprobs is not None else None)
                                    for i in range(params.n, params.num_sequences)]
            for c in self.output.outputs:
                c.cumulative_logprob = 0.0
        self.generation_rows: list[list[torch.Tensor]] = [[] for _ in self.output.outputs]
        self.eos_token_ids, self.max_seq_len = params.eos_ids(eos_token_ids), max_seq_len
        self.stream = stream  # emit every step's progress, not only the final output
        detok = tokenizer is not None and params.detokenize
        self.detokenizers = [IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
                             if detok else None for _ in seqs]
        # stop strings the text never holds (a skipped special token's, "<|im_end|>"): matched as the token
        self.special_stops = special_stop_tokens(tokenizer, params) if detok else {}
        m = len(self.output.outputs)
        self.checked = [0] * m          # text length already searched for stop strings
        self.streamed = [0] * m         # text length already emitted
        self.streamed_tokens = [0] * m  # tokens already emitted

    def append(self, seq: Sequence, token: int, logprob: tuple | None) -> str | None:
        """Add `seq`'s new token (with `logprob`: (chosen, [(id, value), ...])); the reason
        it must finish ("stop", "length"), if it must."""
        i, params = seq.index, self.params
        completion = self.output.outputs[i]
        completion.token_ids.append(token)
        if logprob is not None:
            chosen, top = logprob
            if completion.logprobs is not None:
                completion.logprobs.append(logprob_entry(token, chosen, top))
            completion.cumulative_logprob += chosen
        detok = self.detokenizers[i]
        stop_token = (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids
        # a stop token's text is left out unless include_stop_str_in_output (vLLM's rule; TensorRT-LLM
        # drops the token itself): a stop string's is cut the same way below
        if detok is not None and not (stop_token and not params.include_stop_str_in_output):
            completion.text += detok.append(token)
        if stop_token:  # the EOS (the model's or end_id) is no stop_reason: TensorRT-LLM's and vLLM's rule
            completion.stop_reason = token if token in params.stop_token_ids else None
            return "stop"
        if params.stop and detok is not None and len(completion.token_ids) < params.min_tokens:
            self.checked[i] = len(completion.text)  # min_tokens holds stop strings off too (vLLM's rule)
        elif token in self.special_stops:  # the text is not cut: what it holds back ends it, as at an EOS
            completion.stop_reason = self.special_stops[token]
            completion.text += detok.flush() + (completion.stop_reason if params.include_stop_str_in_output else "")
            return "stop"
        elif params.stop and detok is not None:
            span = find_stop_span(completion.text, params.stop, self.checked[i])
            self.checked[i] = len(completion.text)
            if span is not None:
                completion.stop_reason = completion.text[span[0]:span[1]]
                completion.text = completion.text[: span[1] if params.include_stop_str_in_output else span[0]]
                return "stop"
        # the completion's length, not the sequence's: a verify step's tokens are all in
        # seq.output_token_ids before they come here one by one (runtime/speculative)
        if len(completion.token_ids) >= params.max_tokens \
                or len(self.output.prompt_token_ids) + len(completion.token_ids) >= self.max_seq_len:
            completion.stop_reason = None
            return "length"
        return None

    def set_prompt_logprobs(self, start: int, entries: list[dict[int, float]]) -> None:
        """Logprob entries of prompt tokens start + 1 .. start + len(entries) (position p's
        logits score token p + 1; runtime/prompt_logprobs.py)."""
        self.output.prompt_logprobs[start + 1:start + 1 + len(entries)] = entries

    def set_context_logits(self, start: int, rows: torch.Tensor) -> None:
        """Prompt positions start .. start + len(rows) - 1's logits (return_context_logits)."""
        ctx = self.output.context_logits
        if ctx is None:
            ctx = self.output.context_logits = torch.zeros((len(self.output.prompt_token_ids), rows.shape[-1]),
                                                           dtype=rows.dtype)
        ctx[start:start + len(rows)] = rows.to("cpu")

    def add_logits_row(self, seq: Sequence, row: torch.Tensor) -> None:
        """The logits `seq`'s next token is sampled from: a generation_logits row; the prompt's
        last position's when it is the first token (context_logits, the first sequence's)."""
        row = row.detach().to("cpu", copy=True)
        if self.params.return_context_logits and not seq.output_token_ids and seq.index == 0:
            self.set_context_logits(len(self.output.prompt_token_ids) - 1, row[None])
        if self.params.return_generation_logits:
            if seq.beam is not None:  # a beam's rows follow it through its forks (runtime/beams.py)
                seq.beam.step_logits[seq] = row
            else:
                self.generation_rows[seq.index].append(row)

    def set_results(self, completions: list[CompletionOutput]) -> None:
        """The request's final completions, chosen among its sequences (beam search)."""
        self.output.outputs = completions
        self.output.finished = True
        if self.seqs[0].perf is not None:  # the search's leader's, for every beam
            for c in completions:
                c.request_perf_metrics = self.seqs[0].perf.metrics(self.seqs[0])
        self.output.num_cached_tokens = max(s.num_cached_tokens for s in self.seqs)

    def fail(self, error: str) -> None:
        """The request failed whole (a beam of its search did): every completion "error"."""
        for c in self.output.outputs:
            c.finish_reason = c.finish_reason or "error"
        self.output.error = self.output.error or error
        self.output.finished = True

    def finish(self, seq: Sequence, reason: str) -> None:
        """`seq` is done (stopped, out of length, failed): the request is, once all its sequences are."""
        completion = self.output.outputs[seq.index]
        completion.finish_reason = reason
        if self.generation_rows[seq.index]:
            completion.generation_logits = torch.stack(self.generation_rows[seq.index])
        if seq.num_verify_steps:  # speculative decoding's counts (runtime/speculative)
            completion.num_draft_tokens = seq.num_draft_tokens
            completion.num_accepted_draft_tokens = seq.num_accepted_draft_tokens
            completion.num_verify_steps = seq.num_verify_steps
        if seq.perf is not None:
            completion.request_perf_metrics = seq.perf.metrics(seq)
        if reason == "error" and self.output.error is None:  # the request names why it failed
            self.output.error = seq.error or "the sequence failed while it ran"
        detok = self.detokenizers[seq.index]
        if detok is not None and not isinstance(completion.stop_reason, str):
            completion.text += detok.flush()  # a held-back unfinished character, if any
        self.output.finished = all(c.finish_reason is not None for c in self.output.outputs)
        self.output.num_cached_tokens = max(s.num_cached_tokens for s in self.seqs)
        if self.output.finished and self.ranked:  # the n best of best_of, by cumulative logprob
            best = sorted(self.output.outputs, key=lambda c: -c.cumulative_logprob)[:self.params.n]
            for i, c in enumerate(best):
                c.index = i
            self.output.outputs = best

    def abort(self) -> None:
        unranked = len(self.output.outputs) > self.params.n  # best_of > n, aborted before all were done
        for c, detok in zip(self.output.outputs, self.detokenizers):
            if c.finish_reason is None and detok is not None:
                c.text += detok.flush()  # the end, as finish's: a held-back unfinished character
        for c in self.output.outputs:
            # an unranked candidate is not the request's answer even where it had finished (it may
            # be the worse one): "abort" on each, never a "length" or "stop" that reads as chosen
            c.finish_reason = "abort" if unranked else c.finish_reason or "abort"
        self.output.finished = True
        if unranked:  # the first n candidates
            self.output.outputs = self.output.outputs[:self.params.n]

    def due(self, stream_interval: int) -> bool:
        """A streaming request's next output is due: its first token, or stream_interval new
        ones in a completion."""
        if self.ranked or self.params.is_beam_search:
            return False  # the outputs are chosen when all are done: emitted then
        if stream_interval == 1:
            return True
        for i, c in enumerate(self.output.outputs):
            sent = self.streamed_tokens[i]
            if (sent == 0 and c.token_ids) or len(c.token_ids) - sent >= stream_interval:
                return True
        return False

    def emit(self, copy: bool) -> RequestOutput:
        """The output with its diffs since the last emit set; a snapshot the engine will not
        change with `copy`, else the growing output itself (for StepDeltas.of at once)."""
        for i, c in enumerate(self.output.outputs):
            visible = len(c.text) if c.finish_reason or not self.params.stop \
                else safe_prefix_len(c.text, self.params.stop)
            c.text_diff = c.text[self.streamed[i]:visible]
            self.streamed[i] = max(self.streamed[i], visible)
            c.token_ids_diff = c.token_ids[self.streamed_tokens[i]:]
            self.streamed_tokens[i] = len(c.token_ids)
        return self.output.snapshot(text_lengths=self.streamed) if copy else self.output
