"""OpenAI's response bodies from `RequestOutput`s: whole JSON, stream chunks, logprobs, usage.

    render = Renderer(tokenizer, served_model_name)
    body = render.whole_body(job, outputs)           # /v1/completions or chat, not streamed
    encode = render.encoder(job); encode(render.piece(job, progress, completion, index))  # SSE
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from itertools import accumulate

from trtllm.lora_request import LoRARequest
from trtllm.runtime.outputs import RequestOutput
from trtllm.runtime.tokenizer import IncrementalDetokenizer
from trtllm.sampling_params import SamplingParams
from trtllm.serve.errors import RequestError
from trtllm.serve.tools import ToolCallStream, ToolPlan


@dataclass
class Job:
    endpoint: str                       # "completions" | "chat"
    id: str
    prompts: list[tuple[str | None, list[int]]]
    params: list[SamplingParams]        # one per prompt
    logprobs: int | None
    stream: bool
    include_usage: bool
    echo: bool = False
    prompt_only: bool = False           # max_tokens=0 with echo: the prompt, no new token (one is run and dropped)
    tools: ToolPlan | None = None      # chat with tools (tool_choice other than "none")
    lora_request: LoRARequest | None = None  # the adapter the request's `model` named, None: the base model
    multimodal: object | None = None  # a chat's images (runtime/multimodal_inputs.MultimodalData), None: none
    request_fields: dict = field(default_factory=dict)  # /v1/responses: instructions, metadata as sent (echoed)
    created: int = field(default_factory=lambda: int(time.time()))
    arrival: float = field(default_factory=time.perf_counter)


@dataclass
class ChoiceProgress:
    """How much of one completion a stream has sent."""
    text_sent: int = 0
    tokens_sent: int = 0
    finished: bool = False
    tool_stream: ToolCallStream | None = None  # a chat choice with tools: content held back, calls at the end
    # completions' text_offset over every token sent (Renderer.stream_offsets): the text so far, as a
    # detokenizer, or its length where there is no tokenizer ("token_id:N" texts)
    offset_text: IncrementalDetokenizer | None = None
    offset_len: int = 0


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


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # one, not one per call
_STRING = json.encoder.encode_basestring  # a str as a JSON string literal (C), non-ASCII kept


def dumps(obj) -> bytes:
    return _ENCODER.encode(obj).encode()


def event(obj) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"



class Renderer:
    def __init__(self, tokenizer, served_model_name: str, tool_parser: str = "hermes"):
        self.tokenizer, self.name, self.tool_parser = tokenizer, served_model_name, tool_parser
        self._token_text: dict[int, str] = {}
        self._anchor: int | None = None  # the token "a" (_in_text), -1 where the vocabulary has none

    def model(self, job: Job) -> str:
        """The `model` a response names: the adapter's name for a request routed through one."""
        return job.lora_request.lora_name if job.lora_request is not None else self.name

    def piece(self, job: Job, state: ChoiceProgress, c, idx: int) -> dict | None:
        """The chunk choice for what completion `c` added since `state`, or None."""
        new_text = c.text[state.text_sent:]
        new_ids = c.token_ids[state.tokens_sent:]
        done = c.finish_reason is not None and not state.finished
        if not new_text and not new_ids and not done:  # a token whose text is held back still shows progress
            return None
        if job.prompt_only:  # the echo chunk was the whole text; the one token run for it is not shown
            state.finished = state.finished or done
            return {"index": idx, "text": "", "logprobs": None, "finish_reason": "length"} if done else None
        logprobs = None
        if job.logprobs is not None and new_ids:
            entries = (c.logprobs or [])[state.tokens_sent:state.tokens_sent + len(new_ids)]
            logprobs = self.logprobs(job, new_ids, entries, state.text_sent,
                                     offsets=self.stream_offsets(job, state, new_ids) if job.endpoint != "chat" else None)
        state.text_sent, state.tokens_sent = len(c.text), len(c.token_ids)
        state.finished = state.finished or done
        reason = c.finish_reason if done else None
        if job.endpoint == "chat" and job.tools is not None:
            if state.tool_stream is None:
                state.tool_stream = ToolCallStream(job.tools, self.tool_parser)
            content, calls = state.tool_stream.feed(c.text, done)
            delta = {"content": content} if content else {}
            if calls:
                delta["tool_calls"] = calls
            if reason == "stop" and state.tool_stream.called:
                reason = "tool_calls"
            return {"index": idx, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        if job.endpoint == "chat":
            return {"index": idx, "delta": {"content": new_text} if new_text else {}, "logprobs": logprobs,
                    "finish_reason": reason}
        return {"index": idx, "text": new_text, "logprobs": logprobs, "finish_reason": reason}

    def encoder(self, job: Job):
        """choice -> the SSE event of a chunk holding it; the chunk's fixed fields encoded once,
        and a choice with only new text (the usual streamed token) written by hand: json.dumps would
        take ~19 us of each event under cProfile (bench/probes/serve_capacity.py's stand-in engine)."""
        head = dumps({k: v for k, v in self.chunk(job, None).items() if k not in ("choices", "usage")})
        head = b"data: " + head[:-1] + b',"choices":['
        tail = b'],"usage":null}\n\n' if job.include_usage else b"]}\n\n"
        chat = job.endpoint == "chat"

        def encode(choice: dict) -> bytes:
            if choice["logprobs"] is None and choice["finish_reason"] is None:
                if chat and "content" in choice["delta"] and len(choice["delta"]) == 1:
                    body = '{"index":%d,"delta":{"content":%s},"logprobs":null,"finish_reason":null}' % (
                        choice["index"], _STRING(choice["delta"]["content"]))
                    return head + body.encode() + tail
                if not chat:
                    body = '{"index":%d,"text":%s,"logprobs":null,"finish_reason":null}' % (
                        choice["index"], _STRING(choice["text"]))
                    return head + body.encode() + tail
            return head + dumps(choice) + tail
        return encode

    def chunk(self, job: Job, choice: dict | None, usage: dict | None = None) -> dict:
        chunk = {"id": job.id, "object": "chat.completion.chunk" if job.endpoint == "chat" else "text_completion",
                 "created": job.created, "model": self.model(job), "choices": [choice] if choice is not None else []}
        if job.include_usage:
            chunk["usage"] = usage
        return chunk

    def whole_body(self, job: Job, outs: list[RequestOutput]) -> dict:
        n = job.params[0].n
        choices = []
        for i, out in enumerate(outs):
            for c in out.outputs:
                lp = self.logprobs(job, c.token_ids, c.logprobs or [], 0) if job.logprobs is not None else None
                if job.endpoint == "chat" and job.tools is not None:
                    content, calls = job.tools.parse(c.text, self.tool_parser)
                    message = {"role": "assistant", "content": content}
                    if calls:
                        message["tool_calls"] = calls
                    reason = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
                    choices.append({"index": i * n + c.index, "message": message, "logprobs": lp,
                                    "finish_reason": reason})
                elif job.endpoint == "chat":
                    choices.append({"index": i * n + c.index, "message": {"role": "assistant", "content": c.text},
                                    "logprobs": lp, "finish_reason": c.finish_reason})
                else:
                    prefix, text, reason = "", c.text, c.finish_reason
                    if job.prompt_only:
                        text, reason, lp = "", "length", None
                    if job.echo:
                        prefix, prompt_lp = self.echoed(job, i, out)
                        if prompt_lp is not None:
                            lp = joined(prompt_lp, self.logprobs(job, c.token_ids, c.logprobs or [], len(prefix))
                                        if lp is not None else None)
                    choices.append({"index": i * n + c.index, "text": prefix + text, "logprobs": lp,
                                    "finish_reason": reason})
        return {"id": job.id, "object": "chat.completion" if job.endpoint == "chat" else "text_completion",
                "created": job.created, "model": self.model(job), "system_fingerprint": None, "choices": choices,
                "usage": usage(job, dict(enumerate(outs)))}

    def echoed(self, job: Job, i: int, out: RequestOutput | None) -> tuple[str, dict | None]:
        """Prompt i as /v1/completions echoes it: its text, and with logprobs asked its tokens'
        logprobs in OpenAI's layout (the first token's None), from `out.prompt_logprobs`."""
        text, ids = job.prompts[i]
        if out is not None and out.prompt is not None:
            text = out.prompt
        elif text is None:
            text = self.decode(ids)
        if job.logprobs is None or out is None or out.prompt_logprobs is None:
            return text, None
        first = self.decode(ids[:1])  # the text's start: a SentencePiece "▁word" without its space, as echoed
        rest = self.logprobs(job, ids[1:], out.prompt_logprobs[1:], len(first), context=ids[:1])
        return text, {"tokens": [first] + rest["tokens"], "token_logprobs": [None] + rest["token_logprobs"],
                      "top_logprobs": [None] + rest["top_logprobs"], "text_offset": [0] + rest["text_offset"]}

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

    def text_offsets(self, job: Job, ids: list[int], offset: int, context: list[int] | None) -> list[int]:
        """Where each token's text starts: `offset` plus the length of the text the tokens before it
        make, as the engine's detokenizer makes it (a character split across tokens counts where it
        completes, a skipped special token not at all). Summing each token's own text miscounted
        both: a split character's U+FFFD per token."""
        if self.tokenizer is None:  # "token_id:N" texts
            return list(accumulate((len(self.text_of(t)) for t in ids[:-1]), initial=offset))[:len(ids)]
        if context is None:
            context = [self.anchor()] if self.anchor() >= 0 else []
        skip = job.params[0].skip_special_tokens if job.params and job.params[0] is not None else True
        det, offsets = IncrementalDetokenizer(self.tokenizer, context, skip), []
        for tid in ids:
            offsets.append(offset + len(det.text))
            det.append(tid)
        return offsets

    def stream_offsets(self, job: Job, state: ChoiceProgress, ids: list[int]) -> list[int]:
        """A stream's text_offset of its next tokens `ids`, counted over every token the stream
        sent (a detokenizer kept in `state`). From the text sent they ran short wherever text was
        held back when its tokens went out (a possible stop string, an unfinished character)."""
        if self.tokenizer is None:  # "token_id:N" texts
            start = state.offset_len
            state.offset_len += sum(len(self.text_of(t)) for t in ids)
            return list(accumulate((len(self.text_of(t)) for t in ids[:-1]), initial=start))[:len(ids)]
        if state.offset_text is None:
            skip = job.params[0].skip_special_tokens if job.params and job.params[0] is not None else True
            state.offset_text = IncrementalDetokenizer(self.tokenizer, [self.anchor()] if self.anchor() >= 0 else [],
                                                       skip)
        offsets = []
        for tid in ids:
            offsets.append(len(state.offset_text.text))
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



class ChunkEvents:
    """The server-sent events of a streamed completions or chat job (serve/handler.py writes them):
    each choice's first chunk (chat: the role; echo: the prompt), the chunks of what each output
    added, then the usage chunk if asked and [DONE]. Echo with logprobs: a prompt's echo chunk
    waits for its first output, which brings the prompt's logprobs."""

    def __init__(self, render: Renderer, job: Job, num_streams: int):
        self.render, self.job, self.n = render, job, job.params[0].n
        self.choices = [ChoiceProgress() for _ in range(num_streams * self.n)]
        self.echo_later = job.echo and job.logprobs is not None
        self.encode = render.encoder(job)
        self.started: set[int] = set()

    def opening(self) -> bytes:
        render, job, events = self.render, self.job, []
        for idx in range(len(self.choices)):
            if job.endpoint == "chat":
                events.append(event(render.chunk(job, {"index": idx, "delta": {"role": "assistant", "content": ""},
                                                       "logprobs": None, "finish_reason": None})))
            elif job.echo and not self.echo_later:
                text, _ = render.echoed(job, idx // self.n, None)
                events.append(event(render.chunk(job, {"index": idx, "text": text, "logprobs": None,
                                                       "finish_reason": None})))
        return b"".join(events)

    def output(self, i: int, out: RequestOutput) -> bytes:
        """The chunks of what stream i's latest output added (one write for all its choices)."""
        render, job, n, events = self.render, self.job, self.n, []
        if self.echo_later and i not in self.started:
            text, lp = render.echoed(job, i, out)
            events += [event(render.chunk(job, {"index": i * n + k, "text": text, "logprobs": lp,
                                                "finish_reason": None})) for k in range(n)]
        self.started.add(i)
        events += [self.encode(piece) for c in out.outputs
                   if (piece := render.piece(job, self.choices[i * n + c.index], c, i * n + c.index)) is not None]
        return b"".join(events)

    def closing(self, last: dict[int, RequestOutput]) -> bytes:
        head = event(self.render.chunk(self.job, None, usage=usage(self.job, last))) if self.job.include_usage else b""
        return head + b"data: [DONE]\n\n"

    def failed(self, status: int, message: str) -> bytes:
        return b"data: " + RequestError(status, message).encode() + b"\n\ndata: [DONE]\n\n"


def joined(prompt: dict, completion: dict | None) -> dict:
    """An echoed prompt's logprobs followed by its completion's (None: a prompt-only choice)."""
    if completion is None:
        return prompt
    return {key: prompt[key] + completion[key] for key in prompt}


def usage(job: Job, last: dict[int, RequestOutput]) -> dict:
    prompt = sum(len(ids) for _, ids in job.prompts)
    completion = 0 if job.prompt_only else sum(len(c.token_ids) for out in last.values() for c in out.outputs)
    cached = sum(out.num_cached_tokens for out in last.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}

