"""OpenAI's response bodies from `RequestOutput`s: whole JSON, stream chunks, usage (the logprobs
objects: serve/logprobs.py).

    render = Renderer(tokenizer, served_model_name)
    body = render.whole_body(job, outputs)           # /v1/completions or chat, not streamed
    encode = render.encoder(job); encode(render.piece(job, progress, completion, index))  # SSE
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from trtllm.lora_request import LoRARequest
from trtllm.runtime.outputs import RequestOutput
from trtllm.runtime.tokenizer import IncrementalDetokenizer
from trtllm.sampling_params import SamplingParams
from trtllm.serve.errors import RequestError
from trtllm.serve.logprobs import TokenLogprobs
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
    cache_salt: str | None = None  # the request's (vLLM's field): prefix-cache isolation
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
    # completions' text_offset over every token sent (TokenLogprobs.stream_offsets): the text so far, as a
    # detokenizer, or its length where there is no tokenizer ("token_id:N" texts)
    offset_text: IncrementalDetokenizer | None = None
    offset_len: int = 0
    offset_start: int = 0  # echo: the echoed prompt's length, where the completion's text_offset starts


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # one, not one per call
_STRING = json.encoder.encode_basestring  # a str as a JSON string literal (C), non-ASCII kept


def dumps(obj) -> bytes:
    return _ENCODER.encode(obj).encode()


def event(obj) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


class Renderer:
    def __init__(self, tokenizer, served_model_name: str, tool_parser: str = "hermes"):
        self.tokenizer, self.name, self.tool_parser = tokenizer, served_model_name, tool_parser
        self.tokens = TokenLogprobs(tokenizer)
        self.logprobs = self.tokens.logprobs  # (job, ids, entries, offset, context=None, offsets=None) -> dict

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
                                     offsets=self.tokens.stream_offsets(job, state, new_ids) if job.endpoint != "chat" else None)
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
            text = self.tokens.decode(ids)
        if job.logprobs is None or out is None or out.prompt_logprobs is None:
            return text, None
        first = self.tokens.decode(ids[:1])  # the text's start: a SentencePiece "▁word" without its space, as echoed
        # the echoed text shows the prompt's special tokens (as sent, or decoded with them): its offsets count them
        offsets = self.tokens.text_offsets(job, ids[1:], len(first), ids[:1], skip_special_tokens=False)
        rest = self.logprobs(job, ids[1:], out.prompt_logprobs[1:], len(first), context=ids[:1], offsets=offsets)
        return text, {"tokens": [first] + rest["tokens"], "token_logprobs": [None] + rest["token_logprobs"],
                      "top_logprobs": [None] + rest["top_logprobs"], "text_offset": [0] + rest["text_offset"]}

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
            for k in range(n):  # the completion's text_offset counts on from the echoed prompt, as whole_body's
                self.choices[i * n + k].offset_start = len(text)
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

