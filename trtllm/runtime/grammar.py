"""Structured output and logits processors: what changes a sequence's logits row before the
sampler picks its token (`SamplingParams.guided_decoding`, `.logits_processor`,
`.apply_batched_logits_processor`).

    guides.check_guide(guide)               # at submission (runtime/guides.py): the schema / regex / grammar parses
    hooks = LogitsHooks(tokenizer, vocab_size, eos_token_ids)   # one per engine
    hooks.attach(seqs, params)              # add_request: compile (cached), one matcher per sequence
    hooks.mask_picks(launched)              # a greedy decode-graph step: its guided rows re-picked
                                            #   under their masks on the device (the overlap scheduler's path)
    step = hooks.prepare(seqs)              # a step that samples, before waiting for its logits:
                                            #   the guided rows' token bitmasks filled on the host
    failed = step.apply(logits, batch)      # after the wait: user processors edit their rows in
                                            #   place; batch.token_bitmask set for the sampler
    reason, error = hooks.accept(seq, token)  # after the pick: the matcher takes the token;
                                            #   "stop" once its grammar has ended

Guides are compiled by xgrammar, an optional dependency (`pip install 'trtllm[guided]'`):
without it the engine runs as before and refuses a guided request by name. A guide is parsed
without the tokenizer at submission (`guides.check_guide`: a bad schema, regex or grammar is a
ValueError naming it, before the request reaches the engine); the engine compiles it against
its vocabulary once per distinct guide (`LogitsHooks.compiled`, keyed by the guide's canonical
text; the tokenizer's `TokenizerInfo` is built once per engine, on the first guided request)
and gives each sequence a `GrammarMatcher` of its own (`Sequence.guide`), which survives
preemption (it tracks output tokens, which are kept).

Per step, the host work is xgrammar's: one multi-threaded `batch_fill_next_token_bitmask`
over the guided rows, done while the GPU computes the step. Two paths:

- greedy decode-graph steps (`argmax_serves`: a guide alone does not stop the graph's picks
  from serving): `mask_picks` fills the bitmask of step n (each matcher holds the tokens up
  to n - 1, accepted by the previous `step()` call), and queues after the graph the masked
  argmax of its logits, written over the graph's own picks, on the device and into a pinned
  host buffer. The overlap scheduler then launches step n + 1 from those picks, as for any
  greedy batch: guided requests keep the engine's fast path.
- any other step (sampling, penalties, logprobs, a logits processor, prefill): `prepare`
  fills the bitmask before the engine waits for the logits, and the sampler applies the whole
  [N, ceil(V / 32)] int32 bitmask in one masked fill (sampler.apply_token_bitmask; unguided
  rows are all ones).

JSON is compact: `any_whitespace=False` (separators ", " and ": ", no free whitespace), so a
model cannot spend its tokens on whitespace, and `strict_mode=True` (no properties or items
the schema does not name; the output still validates against the schema). `json_object` is
any JSON object. The grammar's end is the engine's EOS: once the guide is complete only EOS
is allowed, and a sequence whose matcher took it finishes with "stop" (also under
ignore_eos). min_tokens with a guide is refused (SamplingParams), since it would mask the
only allowed token.
"""
from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from trtllm.guided_decoding_params import GuidedDecodingParams
from trtllm.runtime import guides
from trtllm.runtime.sampler import greedy_picks, token_bitmask_allows
from trtllm.runtime.sequence import Sequence
from trtllm.sampling_params import SamplingParams

_COMPILED_CACHE = 256    # compiled grammars kept per engine


class LogitsHooks:
    """An engine's structured output and logits processors (see the module docstring)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]):
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, list(eos_token_ids)
        self.batched_logits_processor = None  # LLM(batched_logits_processor=...)
        self.compiled: OrderedDict[tuple[str, str], object] = OrderedDict()
        self.compile_s = 0.0   # seconds spent compiling guides (tokenizer info included)
        self.fill_s = 0.0      # seconds spent filling bitmasks (bench/bench_guided.py reads both)
        self._compiler = None
        self._json_safe: torch.Tensor | None = None  # [ceil(V / 32)] int32: tokens with no byte < 0x20
        self._batch_matcher = None
        self._host_bitmask: torch.Tensor | None = None     # [rows, ceil(V / 32)] int32, pinned on CUDA
        self._device_bitmask: torch.Tensor | None = None
        self._host_picks: torch.Tensor | None = None       # flat [2 * rows] int64, pinned on CUDA
        # the sequences with a matcher, while they live: a batch with none costs the hot path
        # one truth test, not a look at every row
        self._guided: weakref.WeakSet[Sequence] = weakref.WeakSet()

    # -- submission ----------------------------------------------------------------------
    def validate(self, params: SamplingParams) -> None:
        """What only the engine can check of a request's hooks (validate_request checks its guide)."""
        if params.apply_batched_logits_processor and self.batched_logits_processor is None:
            raise ValueError("apply_batched_logits_processor=True, but this LLM has no batched_logits_processor "
                             "(LLM(batched_logits_processor=...))")

    def attach(self, seqs: list[Sequence], params: SamplingParams) -> None:
        """A matcher of the request's compiled guide for each of its sequences."""
        if params.guided_decoding is None:
            return
        compiled = self.compile(params.guided_decoding)
        xgr = guides.xgrammar_module()
        for seq in seqs:
            seq.guide = xgr.GrammarMatcher(compiled)
            self._guided.add(seq)

    def compile(self, guide: GuidedDecodingParams):
        """The guide compiled against this engine's vocabulary, once per distinct guide."""
        key = guides.guide_key(guide)
        compiled = self.compiled.get(key)
        if compiled is not None:
            self.compiled.move_to_end(key)
            return compiled
        started = time.perf_counter()
        grammar = guides.check_guide(guide)
        try:
            compiled = self._grammar_compiler().compile_grammar(grammar)
        except Exception as e:
            raise ValueError(f"guided_decoding.{key[0]}: {guides.xgrammar_message(e)}") from None
        self.compile_s += time.perf_counter() - started
        self.compiled[key] = compiled
        if len(self.compiled) > _COMPILED_CACHE:
            self.compiled.popitem(last=False)
        return compiled

    def _grammar_compiler(self):
        if self._compiler is None:
            xgr = guides.xgrammar_module()
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.eos_token_ids)
            self._compiler = xgr.GrammarCompiler(info)
            self._json_safe = guides.json_safe_words(info.decoded_vocab, self.vocab_size, self.eos_token_ids)
        return self._compiler

    # -- a step ------------------------------------------------------------------------
    def mask_picks(self, launched) -> None:
        """A greedy decode-graph step (`LaunchedStep` with picks) whose picks serve: its guided
        rows' tokens become the argmax under their grammar's bitmask, replacing the graph's
        picks on the device (what a step launched ahead gathers) and on the host (what the
        engine reads after `wait`). Queued after the graph; the step's done event is recorded
        again after it. Nothing happens without a guided row."""
        if not self._guided:
            return
        seqs = launched.to_sample
        guided = [i for i, s in enumerate(seqs) if s.guide is not None and not s.is_finished]
        if not guided:
            return
        rows = len(seqs)
        bitmask = self._fill(seqs, guided)
        logits = launched.logits  # [rows, V], the graph's
        allowed = token_bitmask_allows(self._device_rows(bitmask, logits.device), logits.shape[-1])
        picks = greedy_picks(logits.masked_fill(~allowed, float("-inf")))  # [2, rows]
        launched.device_picks[:, :rows].copy_(picks)
        host = self._host_picks
        if host is None or host.numel() < 2 * rows:
            host = self._host_picks = torch.empty(2 * max(rows, 64), dtype=torch.int64,
                                                  pin_memory=logits.is_cuda)
        out = host[: 2 * rows].view(2, rows)  # contiguous: one async copy
        out.copy_(picks, non_blocking=True)
        launched.picks = out
        if launched.done is not None:
            launched.done.record()

    def prepare(self, seqs: list[Sequence]) -> StepHooks | None:
        """None when no sequence of the step has a guide or a processor; else the step's
        hooks, with the guided rows' bitmasks already filled on the host."""
        guided = [i for i, s in enumerate(seqs) if s.guide is not None]
        processed = [i for i, s in enumerate(seqs) if s.guide is None and s.sampling_params.processes_logits]
        if not guided and not processed:
            return None
        return StepHooks(self, seqs, self._fill(seqs, guided) if guided else None)

    def _fill(self, seqs: list[Sequence], guided: list[int]) -> torch.Tensor:
        """[len(seqs), ceil(V / 32)] int32 on the host: the rows `guided` from their matchers,
        the others all ones."""
        started = time.perf_counter()
        n, words = len(seqs), (self.vocab_size + 31) // 32
        host = self._host_bitmask
        if host is None or host.shape[0] < n:
            host = self._host_bitmask = torch.empty((max(n, 64), words), dtype=torch.int32,
                                                    pin_memory=torch.cuda.is_available())
        bitmask = host[:n]
        if len(guided) < n:
            bitmask.fill_(-1)  # all tokens allowed in the unguided rows
        matchers = [seqs[i].guide for i in guided]
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(host, guided[0])
        else:
            if self._batch_matcher is None:
                self._batch_matcher = guides.xgrammar_module().BatchGrammarMatcher()
            self._batch_matcher.batch_fill_next_token_bitmask(matchers, host, guided)
        json_rows = [i for i in guided if seqs[i].sampling_params.guided_decoding.kind in guides.JSON_KINDS]
        if json_rows:
            bitmask[json_rows] &= self._json_safe
        self.fill_s += time.perf_counter() - started
        return bitmask

    def accept(self, seq: Sequence, token: int) -> tuple[str | None, str | None]:
        """Advance `seq`'s matcher by its new token: ("stop", None) once its grammar has
        ended, ("error", why) if the grammar refuses the token (only a bug could pick it)."""
        if not seq.guide.accept_token(token):
            return "error", f"guided decoding: the grammar refused token {token}"
        return ("stop", None) if seq.guide.is_terminated() else (None, None)

    def _device_rows(self, bitmask: torch.Tensor, device) -> torch.Tensor:
        dev = self._device_bitmask
        if dev is None or dev.device != torch.device(device) or dev.shape[0] < bitmask.shape[0]:
            dev = self._device_bitmask = torch.empty(self._host_bitmask.shape, dtype=torch.int32, device=device)
        out = dev[: bitmask.shape[0]]
        out.copy_(bitmask, non_blocking=True)
        return out


@dataclass
class StepHooks:
    hooks: LogitsHooks
    seqs: list[Sequence]
    bitmask: torch.Tensor | None  # [N, ceil(V / 32)] int32 on the host, or None

    def apply(self, logits: torch.Tensor, batch) -> dict[Sequence, str]:
        """Run the rows' logits processors in place on `logits` [N, V] (the request's own
        processors, then the LLM's batched one), and hand the sampler the bitmask
        (`batch.token_bitmask`). Returns the sequences whose processor raised, with why: they
        fail alone."""
        failed: dict[Sequence, str] = {}
        stream = torch.cuda.current_stream(logits.device).cuda_stream if logits.is_cuda else None
        V = logits.shape[-1]
        batched = []
        for i, seq in enumerate(self.seqs):
            params = seq.sampling_params
            if params.logits_processor is not None:
                row = logits[i].view(1, 1, V)
                try:
                    for proc in params.logits_processors:
                        proc(seq.request_id, row, [seq.token_ids], stream, None)
                except Exception as e:
                    failed[seq] = f"the logits processor raised {type(e).__name__}: {e}"
            if params.apply_batched_logits_processor:
                batched.append(i)
        if batched:
            seqs = [self.seqs[i] for i in batched]
            try:
                self.hooks.batched_logits_processor([s.request_id for s in seqs],
                                                    [logits[i].view(1, 1, V) for i in batched],
                                                    [[s.token_ids] for s in seqs], stream, [None] * len(seqs))
            except Exception as e:
                for s in seqs:
                    failed[s] = f"the batched logits processor raised {type(e).__name__}: {e}"
        if self.bitmask is not None:
            batch.token_bitmask = self.hooks._device_rows(self.bitmask, logits.device)
        return failed
