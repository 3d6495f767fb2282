"""OpenAI's logprobs objects of a response: each token's text and bytes as the response shows
them, its logprob (floored: JSON has no -inf) and its top alternatives; completions' text_offset.

    tokens = TokenLogprobs(tokenizer)
    tokens.logprobs(job, ids, entries, offset)   # chat: {"content": [...]}; completions: tokens, token_logprobs, ...
    tokens.stream_offsets(job, progress, ids)    # a stream's text_offset, over every token it sent
"""
from __future__ import annotations

from itertools import accumulate
from typing import TYPE_CHECKING

from trtllm.runtime.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from trtllm.serve.render import ChoiceProgress, Job

# the least logprob a response carries (vLLM's floor): a token the sampling's filters ruled out (top_k, top_p,
# min_p, bans; logprobs are the processed distribution's) has -inf, which JSON cannot write
MIN_LOGPROB = -9999.0


def _logprob(v: float) -> float:
    return max(v, MIN_LOGPROB)


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's (GPT-2, Llama 3, Qwen) character for each byte, inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_level_alphabet()
_REPLACEMENT = "\ufffd"


def raw_token_bytes(piece: str, text: str) -> bytes | None:
    """A token's own bytes from its vocabulary entry `piece`, where its decoded `text` lost some
    (part of a character: U+FFFD): a byte-level BPE piece, or SentencePiece's byte fallback <0xNN>.
    None where the piece is neither, or does not decode to `text`."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            raw = bytes([int(piece[3:5], 16)])
        except ValueError:
            return None
    elif piece and all(c in _BYTE_OF for c in piece):
        raw = bytes(_BYTE_OF[c] for c in piece)
    else:
        return None
    return raw if raw.decode("utf-8", "replace") == text else None


class TokenLogprobs:
    """A tokenizer's tokens as logprobs show them (their texts cached), and the logprobs objects."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._token_text: dict[int, str] = {}
        self._anchor: int | None = None  # the token "a" (_in_text), -1 where the vocabulary has none

    def logprobs(self, job: Job, ids: list[int], entries: list[dict], offset: int,
                 context: list[int] | None = None, offsets: list[int] | None = None) -> dict:
        """OpenAI's logprobs of tokens `ids` (their entries), their text starting at `offset`
        (completions' text_offset), after the tokens `context` (default: any word's start);
        `offsets`: completions' text_offset given (a stream's, stream_offsets)."""
        k = job.logprobs or 0
        if job.endpoint == "chat":
            content = []
            for tid, entry in zip(ids, entries):
                top = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
                text = self.text_of(tid)
                content.append({"token": text, "logprob": _logprob(entry.get(tid, 0.0)), "bytes": self.bytes_of(tid),
                                "top_logprobs": [{"token": self.text_of(t), "logprob": _logprob(v),
                                                  "bytes": self.bytes_of(t)} for t, v in top]})
            return {"content": content}
        tokens, token_logprobs, top_logprobs = [], [], []
        offsets = offsets if offsets is not None else self.text_offsets(job, ids, offset, context)
        for tid, entry in zip(ids, entries):
            text = self.text_of(tid)
            tokens.append(text)
            token_logprobs.append(_logprob(entry.get(tid, 0.0)))
            top: dict[str, float] = {}
            for t, v in sorted(entry.items(), key=lambda kv: -kv[1])[:k]:
                top.setdefault(self.text_of(t), _logprob(v))  # keyed by text (OpenAI's layout): two ids of one text keep the likelier
            top_logprobs.append(top)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}

    def text_offsets(self, job: Job, ids: list[int], offset: int, context: list[int] | None,
                     skip_special_tokens: bool | None = None) -> list[int]:
        """Where each token's text starts: `offset` plus the length of the text the tokens before it
        make, as the engine's detokenizer makes it (a character split across tokens counts where it
        completes, a skipped special token not at all). Summing each token's own text miscounted
        both: a split character's U+FFFD per token. `skip_special_tokens`: None, the request's."""
        if self.tokenizer is None:  # "token_id:N" texts
            return list(accumulate((len(self.text_of(t)) for t in ids[:-1]), initial=offset))[:len(ids)]
        if context is None:
            context = [self.anchor()] if self.anchor() >= 0 else []
        skip = skip_special_tokens
        if skip is None:
            skip = job.params[0].skip_special_tokens if job.params and job.params[0] is not None else True
        det, offsets = IncrementalDetokenizer(self.tokenizer, context, skip), []
        for tid in ids:
            offsets.append(offset + len(det.text))
            det.append(tid)
        return offsets

    def stream_offsets(self, job: Job, state: ChoiceProgress, ids: list[int]) -> list[int]:
        """A stream's text_offset of its next tokens `ids`, counted over every token the stream
        sent (a detokenizer kept in `state`), after the echoed prompt (`state.offset_start`). From
        the text sent they ran short wherever text was held back when its tokens went out (a
        possible stop string, an unfinished character)."""
        if self.tokenizer is None:  # "token_id:N" texts
            start = state.offset_start + state.offset_len
            state.offset_len += sum(len(self.text_of(t)) for t in ids)
            return list(accumulate((len(self.text_of(t)) for t in ids[:-1]), initial=start))[:len(ids)]
        if state.offset_text is None:
            skip = job.params[0].skip_special_tokens if job.params and job.params[0] is not None else True
            state.offset_text = IncrementalDetokenizer(self.tokenizer, [self.anchor()] if self.anchor() >= 0 else [],
                                                       skip)
        offsets = []
        for tid in ids:
            offsets.append(state.offset_start + len(state.offset_text.text))
            state.offset_text.append(tid)
        return offsets

    def text_of(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._in_text(token_id) if self.tokenizer is not None else f"token_id:{token_id}"
            if len(self._token_text) < 1_000_000:
                self._token_text[token_id] = text
        return text

    def _in_text(self, token_id: int) -> str:
        """A token's text as it reads inside a text, decoded after an anchor token ("a"): decoded
        alone, a SentencePiece "▁word" is a text's first word and loses its space (Llama 2's,
        Mistral's: joined, the logprobs' tokens ran the words together)."""
        if self.anchor() < 0:
            return self.decode([token_id])
        both = self.decode([self.anchor(), token_id])
        return both[1:] if both.startswith("a") else self.decode([token_id])

    def anchor(self) -> int:
        """The token "a", which a token decoded after reads as inside a text; -1 where there is none."""
        if self._anchor is None:
            anchor = self.tokenizer.convert_tokens_to_ids("a")
            self._anchor = anchor if isinstance(anchor, int) and self.tokenizer.convert_ids_to_tokens(anchor) == "a" \
                else -1
        return self._anchor

    def bytes_of(self, token_id: int) -> list[int]:
        """OpenAI's `bytes` of a token: its UTF-8 bytes, so a client can join the tokens of a
        character split across them. Its text's, unless that holds U+FFFD for part of a character:
        then the token's own bytes where its vocabulary entry gives them (was the U+FFFD's EF BF BD)."""
        text = self.text_of(token_id)
        if _REPLACEMENT in text and self.tokenizer is not None:
            raw = raw_token_bytes(self.tokenizer.convert_ids_to_tokens(token_id), text)
            if raw is not None:
                return list(raw)
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer is not None else ""
