"""`Sampler`: picks every row's next token from the model's logits, batched on the device.

One row per sequence; rows never interact, and all the math is tensor ops over [N, V].
Order of operations (each a module function, so tests can check it alone):

  0. fp32. A row with a NaN, a +inf, or no finite logit at all is flagged
     `finite=False` and zeroed so it disturbs nothing; its token is meaningless and the
     engine finishes it with "error". (-inf alone is fine: models mask tokens with it.)
  0b. `apply_embedding_bias`: a row's SamplingParams.embedding_bias [V] added.
  1. `apply_token_bitmask`: a guided row's tokens its grammar does not allow → -inf
     (runtime/grammar.py fills the bitmask; one masked fill over all rows).
  1b. `apply_penalties`: repetition (HF/CTRL, over prompt+output tokens: logit > 0 → /p,
     else *p), then presence and frequency (OpenAI, over output tokens only:
     logit -= presence * (count > 0) + frequency * count).
  2. `apply_min_tokens`: EOS ids (not under ignore_eos) and the row's stop_token_ids → -inf while
     len(output) < min_tokens; and the row's banned tokens (SamplingParams.bans: bad_token_ids,
     and a bad word's last token where prompt + output end with the rest of it) → -inf.
     A row left with no finite logit by these masks fails (finite=False) rather than
     take a banned token.
  3. `apply_temperature` (greedy rows divide by 1).
  4. `apply_top_k_top_p`: top-k (the k largest), then top-p on the renormalised
     top-k distribution (the smallest set with cumulative prob ≥ top_p, never empty);
     a run of equal logits at either threshold is kept whole.
  5. `apply_min_p`: drop p < min_p * p_max.
  6. choose: greedy rows (`SamplingParams.greedy`; their top-k/p/min-p are off) take
     the argmax; the others take argmax(logits + Gumbel noise), an exact sample of
     softmax(logits), with noise from a counter-based hash of (seed, completion index,
     step = len(output), token id) (kernels/sample_rows.py). So a request's tokens depend on its seed and its own
     logits only: not on the batch it shares, its position in it, or preemption.

Logprobs are those of the processed distribution actually sampled from (vLLM's
"processed_logprobs"): log_softmax of the logits after step 5. For greedy rows that is
the penalised distribution at temperature 1.
"""
from __future__ import annotations

import random
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from trtllm.kernels.sample_rows import (
    finite_rows_ref as _finite_rows,
    sample_rows_ref,
    sample_rows_triton,
)
from trtllm.kernels.top_k_top_p import top_k_top_p_ref, top_k_top_p_triton
from trtllm.runtime.sampling_masks import banned, bias_rows, flat_index, repeats, to_device
from trtllm.runtime.sequence import Sequence
from trtllm.sampling_params import SamplingParams

_NEG_INF = float("-inf")


def draw_seed(rng: random.Random | None = None) -> int:
    """A seed for a request that gave none (the engine calls this at admission)."""
    return (rng or random).getrandbits(63)


@dataclass
class SamplerOutput:
    token_ids: Tensor                            # [N] int64
    logprobs: Tensor                             # [N] fp32, of the chosen token
    top_logprobs: tuple[Tensor, Tensor] | None   # ids [N, K] int64, values [N, K] fp32
    finite: Tensor                               # [N] bool; False: the row failed
    all_masked: Tensor | None = None             # [N] bool: failed because its bans left no token

    def copy_to_host(self) -> tuple[SamplerOutput, torch.cuda.Event]:
        """Pinned host copies, queued on the stream now, and the event they are done at: read
        after it, not by `.tolist()` on the device tensors, which would also wait for whatever
        was queued since (the next step, launched ahead: a sampled batch-1 step lost 9% so)."""
        def pinned(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return host.copy_(t, non_blocking=True)

        top = None if self.top_logprobs is None else (pinned(self.top_logprobs[0]), pinned(self.top_logprobs[1]))
        host = SamplerOutput(pinned(self.token_ids), pinned(self.logprobs), top, pinned(self.finite),
                             pinned(self.all_masked))
        copied = torch.cuda.Event()
        copied.record()
        return host, copied

    def host_logprobs(self) -> tuple[list[float], list[list[tuple[int, float]]] | None]:
        """The chosen tokens' logprobs and each row's top (token, logprob) pairs, on the host."""
        top = None if self.top_logprobs is None else \
            [list(zip(*pair)) for pair in zip(self.top_logprobs[0].tolist(), self.top_logprobs[1].tolist())]
        return self.logprobs.tolist(), top


@dataclass
class SamplingBatch:
    """Per-step parameter tensors ([N] unless noted) for the sequences being sampled.
    The Python flags let the sampler skip whole [N, V] passes no row needs, without a
    device sync; a neutral value (k = V, p = 1, penalty 1/0) is an exact no-op, so a
    row's result does not depend on which flags its batch mates switch on."""
    vocab_size: int
    temperature: Tensor          # fp32, 1 for greedy rows
    top_k: Tensor                # int64, V when off
    top_p: Tensor                # fp32, 1 when off
    min_p: Tensor                # fp32, 0 when off
    repetition_penalty: Tensor   # fp32
    presence_penalty: Tensor     # fp32
    frequency_penalty: Tensor    # fp32
    greedy: Tensor               # bool
    seed: Tensor                 # int64 in [0, 2**63)
    index: Tensor                # int64, completion index within the request
    step: Tensor                 # int64, len(output_token_ids)
    prompt_index: Tensor | None  # flat row * V + id of prompt tokens (repetition rows)
    output_index: Tensor | None  # flat row * V + id of output tokens (penalty rows)
    min_tokens_index: Tensor | None  # flat row * V + id to mask (EOS/stop, min_tokens; banned tokens)
    all_greedy: bool
    do_temperature: bool
    do_top_k: bool               # a row with top_k < V
    do_top_p: bool               # a row with top_p < 1
    do_min_p: bool
    max_logprobs: int | None     # K for top_logprobs; None when no row asked
    token_bitmask: Tensor | None = None  # [N, ceil(V / 32)] int32, bit t of row r: token t allowed (grammar.py)
    bias: Tensor | None = None   # [N, V] fp32, SamplingParams.embedding_bias (0 for rows without), when any row has one

    @property
    def plain(self) -> bool:
        """Whether temperature is all that acts on the logits: no mask, bias, penalty, filter
        or logprobs wanted."""
        return self.bias is None and self.token_bitmask is None and self.prompt_index is None \
            and self.output_index is None and self.min_tokens_index is None and not self.do_top_k \
            and not self.do_top_p and not self.do_min_p and not self.max_logprobs

    @staticmethod
    def build(seqs: list[Sequence], vocab_size: int, device, eos_token_ids: list[int]
              ) -> SamplingBatch:
        V, n, key = vocab_size, len(seqs), (vocab_size, tuple(eos_token_ids))
        rows = [_row(s, key) for s in seqs]  # cached: no per-token work, ~1 µs a row
        steps = [len(s.output_token_ids) for s in seqs]
        f = torch.tensor([r.floats for r in rows], dtype=torch.float32).reshape(n, 6)
        i = torch.tensor([(r.top_k, s.seed, s.index, st, r.greedy)
                          for s, r, st in zip(seqs, rows, steps)], dtype=torch.int64).reshape(n, 5)
        f, i = to_device(f, device), to_device(i, device)
        return SamplingBatch(
            V, temperature=f[:, 0], top_k=i[:, 0], top_p=f[:, 1], min_p=f[:, 2],
            repetition_penalty=f[:, 3], presence_penalty=f[:, 4], frequency_penalty=f[:, 5],
            greedy=i[:, 4].bool(), seed=i[:, 1], index=i[:, 2], step=i[:, 3],
            prompt_index=flat_index([s.prompt_token_ids if r.rep else ()
                                      for s, r in zip(seqs, rows)], V, device),
            output_index=flat_index([s.output_token_ids if r.penalised else ()
                                      for s, r in zip(seqs, rows)], V, device),
            min_tokens_index=flat_index([(r.stop if st < r.min_tokens else ()) + (banned(s, r.bans) if r.bans else ())
                                          + (repeats(s, r.no_repeat) if r.no_repeat else ())
                                          for s, r, st in zip(seqs, rows, steps)], V, device),
            all_greedy=all(r.greedy for r in rows),
            do_temperature=any(r.floats[0] != 1.0 for r in rows),
            do_top_k=any(r.top_k < V for r in rows),
            do_top_p=any(r.floats[1] < 1.0 for r in rows),
            do_min_p=any(r.floats[2] > 0.0 for r in rows),
            max_logprobs=max((r.logprobs for r in rows if r.logprobs is not None),
                             default=None),
            bias=bias_rows(seqs, V, device))


class _Row(NamedTuple):
    """What of a sequence's sampling does not change from step to step."""
    key: tuple                 # (vocab_size, eos ids) it was made for
    params: SamplingParams     # ... and from
    floats: tuple              # temperature, top_p, min_p, repetition, presence, frequency
    top_k: int
    greedy: bool
    rep: bool                  # repetition penalty on: prompt tokens needed
    penalised: bool            # any penalty on: output tokens needed
    stop: tuple                # ids masked while len(output) < min_tokens
    min_tokens: int
    logprobs: int | None
    bans: tuple                # token sequences (SamplingParams.bans) inside the vocabulary
    no_repeat: int | None      # SamplingParams.no_repeat_ngram_size


_rows: weakref.WeakKeyDictionary[Sequence, _Row] = weakref.WeakKeyDictionary()


def _row(seq: Sequence, key: tuple) -> _Row:
    """Cached per sequence (the entry dies with it). Replacing seq.sampling_params is
    seen; mutating its fields after the first step is not (the engine must not)."""
    row, sp = _rows.get(seq), seq.sampling_params
    if row is not None and row.key == key and row.params is sp:
        return row
    V, eos = key
    g = sp.greedy or sp.is_beam_search  # a beam's token is beams.py's pick: no noise drawn for it
    row = _Row(key, sp, (1.0 if g else sp.temperature, 1.0 if g else sp.top_p,
                     0.0 if g else sp.min_p, sp.repetition_penalty, sp.presence_penalty,
                     sp.frequency_penalty),
               V if g or sp.top_k == 0 else min(sp.top_k, V), g, sp.repetition_penalty != 1.0, sp.penalised,
               tuple(sorted({t for t in (*(() if sp.ignore_eos else sp.eos_ids(eos)), *sp.stop_token_ids) if 0 <= t < V})),
               sp.min_tokens, sp.logprobs, tuple(b for b in sp.bans if all(0 <= t < V for t in b)),
               sp.no_repeat_ngram_size)
    _rows[seq] = row
    return row


def token_bitmask_allows(bitmask: Tensor, vocab_size: int) -> Tensor:
    """[N, ceil(V / 32)] int32 -> [N, V] bool: token t is allowed when bit t % 32 of word t // 32
    is set (xgrammar's layout; an arithmetic shift of a negative word still reads its bits)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask[:, :, None] >> shifts) & 1).view(bitmask.shape[0], -1)[:, :vocab_size] != 0


def apply_embedding_bias(logits: Tensor, batch: SamplingBatch) -> Tensor:
    return logits + batch.bias if batch.bias is not None else logits


def apply_token_bitmask(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Tokens a row's grammar does not allow → -inf."""
    if batch.token_bitmask is None:
        return logits
    return logits.masked_fill(~token_bitmask_allows(batch.token_bitmask, logits.shape[-1]), _NEG_INF)


def apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    if batch.prompt_index is None and batch.output_index is None:
        return logits
    n, V = logits.shape
    counts = torch.zeros(n * V, dtype=torch.float32, device=logits.device)
    if batch.output_index is not None:
        idx = batch.output_index
        counts.scatter_add_(0, idx, torch.ones(idx.shape, dtype=counts.dtype, device=idx.device))
    seen = counts > 0
    if batch.prompt_index is not None:
        seen.index_fill_(0, batch.prompt_index, True)
    counts, seen = counts.view(n, V), seen.view(n, V)
    rp = batch.repetition_penalty[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    return (logits - batch.presence_penalty[:, None] * (counts > 0)
            - batch.frequency_penalty[:, None] * counts)


def apply_min_tokens(logits: Tensor, batch: SamplingBatch) -> Tensor:
    if batch.min_tokens_index is None:
        return logits
    return logits.flatten().index_fill(0, batch.min_tokens_index, _NEG_INF).view_as(logits)


def apply_temperature(logits: Tensor, batch: SamplingBatch) -> Tensor:
    return logits / batch.temperature[:, None] if batch.do_temperature else logits


def apply_top_k_top_p(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """top-k keeps x >= the k-th largest, then top-p keeps a token when the mass of the tokens
    above it (renormalised over top-k's) is still < top_p, so the first always stays; ties at
    either threshold all stay (kernels/top_k_top_p.py: thresholds by radix select on the GPU,
    no sort; on the CPU its sort-based reference)."""
    if not (batch.do_top_k or batch.do_top_p):
        return logits
    if logits.is_cuda:  # the batch's flags, not the tensors', say which searches run: no device sync
        return top_k_top_p_triton(logits.contiguous(), batch.top_k, batch.top_p, has_top_k=batch.do_top_k,
                                  has_top_p=batch.do_top_p)
    return top_k_top_p_ref(logits, batch.top_k, batch.top_p)


def apply_min_p(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """p < min_p * p_max ⇔ logit < max_logit + log(min_p): no softmax needed."""
    if not batch.do_min_p:
        return logits
    floor = logits.amax(-1, keepdim=True) + torch.log(batch.min_p)[:, None]
    return logits.masked_fill(logits < floor, _NEG_INF)


def process_logits(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Steps 1-5 on fp32 logits; returns a new tensor (the input is left alone)."""
    for step in (apply_embedding_bias, apply_token_bitmask, apply_penalties, apply_min_tokens, apply_temperature, apply_top_k_top_p,
                 apply_min_p):
        logits = step(logits, batch)
    return logits


def argmax_serves(seqs: list[Sequence]) -> bool:
    """Whether the argmax of the raw logits is every sequence's next token (greedy, no
    penalty, no logprobs wanted, no logits processor, no banned tokens, past min_tokens): then a decode graph's
    own picks (`greedy_picks`) serve and no sampler runs (a guided row's are re-picked under
    its grammar's mask on the device: grammar.LogitsHooks.mask_picks). A run of sequences sharing one
    SamplingParams (an `LLM.generate` batch: all of them) has its params looked at once:
    ~0.8 us a sequence less."""
    last = None
    for seq in seqs:
        p = seq.sampling_params
        if p is not last:
            if not p.greedy or p.penalised or p.logprobs is not None or p.reads_logits \
                    or p.logits_processor is not None or p.apply_batched_logits_processor or p.bans \
                    or p.no_repeat_ngram_size is not None or p.embedding_bias is not None:
                return False
            last = p
        if len(seq.output_token_ids) < p.min_tokens:
            return False
    return True


def draw_tokens(x: Tensor, batch: SamplingBatch) -> Tensor:
    """[N] tokens from processed logits x [N, V] (temperature already applied): argmax(x) for
    greedy rows, argmax(x + Gumbel noise of (seed, index, step, token)) for the others
    (kernels/sample_rows.py); one kernel on the GPU."""
    return _sample_rows(x, torch.ones_like(batch.temperature), batch)[0]


def greedy_picks(logits: Tensor) -> Tensor:
    """[2, B] int64 from logits [B, V]: each row's argmax (the first maximum on ties) and
    1/0 for whether the row is sound by `_finite_rows`' rule (no NaN, no +inf, a finite
    logit). Its own kernels, so a decode CUDA graph can end with them.

    A row is one long reduction, and a batch-1 row of Llama-3's 128,256 logits is one
    thread block's work: `argmax` plus `isfinite().all()` take 50 us of a batch-1 step on
    the H100, these picks 7.7 (bench/probes/decode_kernels.py). So: the maximum of each
    chunk of ~500 (many blocks), then the maximum of the chunk maxima. `max` carries a NaN
    through, so the row maximum is finite exactly when the row is sound."""
    b, v = logits.shape
    n = _chunk_len(v)
    values, index = logits.view(b, v // n, n).max(-1)      # [B, C]
    top, chunk = values.max(-1)                             # [B]
    token = chunk * n + index.gather(1, chunk[:, None])[:, 0]
    return torch.stack([token, torch.isfinite(top).long()])


def _chunk_len(v: int) -> int:
    """The smallest divisor of v that is >= 256 (v itself when none is <= v // 8)."""
    return next((n for n in range(256, v // 8 + 1) if v % n == 0), v)


class Sampler:
    @torch.no_grad()
    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.shape != (batch.greedy.shape[0], batch.vocab_size):
            raise ValueError(f"logits {tuple(logits.shape)} do not match the batch "
                             f"({batch.greedy.shape[0]} rows, vocab {batch.vocab_size})")
        if batch.plain:  # temperature alone: one pass over the raw logits (kernels/sample_rows.py)
            token_ids, chosen, finite = _sample_rows(logits, batch.temperature, batch)
            return SamplerOutput(token_ids, chosen, None, finite)
        finite = _finite_rows(logits)
        x = process_logits(torch.where(finite[:, None], logits.float(), 0.0), batch)  # temperature applied
        token_ids, chosen, _ = _sample_rows(x, torch.ones_like(batch.temperature), batch)
        all_masked = None
        if batch.min_tokens_index is not None:  # the masks may leave a row nothing (a ban against a grammar)
            all_masked = finite & ~torch.isfinite(x).any(-1)
            finite = finite & ~all_masked
        top = None
        if batch.max_logprobs:
            values, ids = x.log_softmax(-1).topk(min(batch.max_logprobs, batch.vocab_size), dim=-1)
            top = (ids, values)
        return SamplerOutput(token_ids, chosen, top, finite, all_masked)


def _sample_rows(x: Tensor, temperature: Tensor, batch: SamplingBatch) -> tuple[Tensor, Tensor, Tensor]:
    """kernels/sample_rows' launcher on the GPU (not the registered op: its dispatch costs
    12-33 us more of host time a call, bench/bench_sampler.py); on the CPU its reference (the
    interpreted kernel would cost every CPU engine step tens of ms; tests/kernels/test_sample_rows.py
    runs it)."""
    op = sample_rows_triton if x.is_cuda else sample_rows_ref
    return op(x, temperature, batch.greedy, batch.seed, batch.index, batch.step)
