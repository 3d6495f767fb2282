"""Perplexity of a long text, in sliding windows, as perplexity and bits per byte.

    ids = text_tokens(scorer, text)                  # [prefix] + the text's tokens: all scored
    ids = entry_tokens(scorer, entries)              # prefix entry eos, entry after entry
    windows(len(ids), window, stride) -> [(begin, end, first)]
    result = perplexity(scorer, ids, n_bytes, window, stride)   # a PerplexityResult

The windows are Hugging Face's recipe ("Perplexity of fixed-length models"): window k
covers tokens [k * stride, min(k * stride + window, n)) and scores the tokens after the
previous window's end, so every token but the first is scored once, each with at least
window - stride tokens before it once past the first window. stride = window - 1 gives
disjoint windows overlapping by one token: the demo model's training measure
(trtllm.demo.perplexity with seq_len = window - 1). The first token of the stream is
never scored, so a text starts from the tokenizer's bos (or eos, as lm-eval does): every
token of the text is then scored and bits per byte is exact over its UTF-8 bytes.

perplexity = exp(NLL / tokens); bits per byte = NLL / ln 2 / bytes (NLL summed in nats).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from trtllm.eval.scorer import EvalInputError, Scorer


@dataclass
class PerplexityResult:
    perplexity: float
    bits_per_byte: float
    nll: float            # summed over the scored tokens, nats
    tokens: int           # scored
    bytes: int            # UTF-8 bytes of the text
    windows: int
    window: int
    stride: int

    def as_dict(self) -> dict:
        return asdict(self)


def text_tokens(scorer: Scorer, text: str) -> list[int]:
    """The text as the model reads it from the start, behind the tokenizer's own bos, or a
    prefix token when it adds none."""
    plain = scorer.encode(text, special=False)
    with_special = scorer.encode(text)
    if len(with_special) > len(plain) and with_special[-len(plain):] == plain:
        return with_special
    return [scorer.prefix_token()] + plain


def entry_tokens(scorer: Scorer, entries: list[str]) -> list[int]:
    """Entries packed as one stream, each as `prefix entry eos` (the demo model's training
    layout, trtllm.demo.pack)."""
    eos = scorer.tokenizer.eos_token_id
    if eos is None:
        raise EvalInputError("--entries packs each entry as bos entry eos, but the tokenizer has no eos token")
    prefix, ids = scorer.prefix_token(), []
    for e in entries:
        ids += [prefix] + scorer.encode(e, special=False) + [eos]
    return ids


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) per window over n tokens (see the module docstring)."""
    if not 0 < stride <= window - 1:
        raise EvalInputError(f"--stride must be in [1, window - 1 = {window - 1}], got {stride}")
    out, prev_end = [], 1  # token 0 is never scored
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        if end > prev_end:
            out.append((begin, end, prev_end))
        prev_end = end
        if end == n:
            break
    return out


def perplexity(scorer: Scorer, ids: list[int], n_bytes: int, window: int, stride: int) -> PerplexityResult:
    if len(ids) < 2:
        raise EvalInputError("perplexity needs a text of at least one token")
    if window < 2:
        raise EvalInputError(f"--window must be at least 2 tokens, got {window}")
    if min(window, len(ids)) > scorer.max_len:
        raise EvalInputError(f"--window {window} is longer than the engine scores ({scorer.max_len} tokens: "
                             "max_seq_len - 1, at most max_input_len); use a smaller --window")
    spans = windows(len(ids), window, stride)
    nll, tokens = 0.0, 0
    for (begin, _, first), entries in zip(spans, scorer.prompt_logprobs([ids[b:e] for b, e, _ in spans])):
        # entries[i] scores token begin + 1 + i
        for token, entry in zip(ids[first:], entries[first - begin - 1:]):
            nll -= entry[token]
            tokens += 1
    if tokens != len(ids) - 1:
        raise AssertionError(f"windows scored {tokens} tokens of {len(ids) - 1}")
    return PerplexityResult(math.exp(nll / tokens), nll / math.log(2) / n_bytes, nll, tokens, n_bytes,
                            len(spans), window, stride)
