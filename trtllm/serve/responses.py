"""OpenAI's Responses API (`POST /v1/responses`), stateless: a request is the chat it means, and its
outputs come back as a Response object or the Responses stream events.

    chat = ResponsesRequest(...).chat_request()    # instructions -> a system message, input -> messages
    job = await jobs.chat_job(chat)                # every chat check; then job.endpoint = "responses"
    body = response_body(job, out, model)          # or, streamed, ResponseEvents(job, model)

What maps: `input` (a string, or message items whose content is a string or `input_text` /
`output_text` / `input_image` parts), `instructions`, `max_output_tokens`, `temperature`, `top_p`,
`text.format` (text, json_object, json_schema: structured output), `stream`, `user` (and the
chat's sampling extensions: `seed`, `top_k`, `stop`, `ignore_eos`, ...); function
`tools`, `tool_choice` and `parallel_tool_calls` as the chat's (serve/tools.py), with
`function_call` / `function_call_output` input items as the assistant's calls and the tool
messages, and the calls the model makes as `function_call` output items. What a stateless server
cannot do is refused by name: `previous_response_id` and `conversation` (no response is kept:
send the whole conversation as `input`), `background`, built-in tools (web search, files, ...),
`include`, `prompt` (stored prompt templates), `reasoning`, `max_tool_calls`; `truncation` and
`top_logprobs` are taken only as "disabled" and 0. `store` is accepted and answered with
`"store": false`.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trtllm.serve.errors import RequestError
from trtllm.serve.protocol import ChatCompletionRequest
from trtllm.serve.render import dumps
from trtllm.serve.tools import ToolCallStream

_REFUSED = {
    "previous_response_id": "previous_response_id: this server keeps no responses (stateless); send the whole "
                            "conversation as input",
    "conversation": "conversation: this server keeps no conversations (stateless); send the whole conversation as "
                    "input",
    "background": "background responses are not supported",
    "include": "include is not supported (no extra output items)",
    "prompt": "prompt (a stored prompt template) is not supported; send instructions and input",
    "reasoning": "reasoning options are not supported",
    "max_tool_calls": "max_tool_calls is not supported (the model's tool calls are not capped)",
}
# fields taken at the value that asks for nothing more (accepted and ignored otherwise, they would change
# what the request gets without a word): name -> (values taken, why another is refused)
_NEUTRAL = {
    "truncation": ((None, "disabled"), "truncation 'auto' is not supported: input over the context is refused, "
                                       "not cut ('disabled' is taken)"),
    "top_logprobs": ((None, 0), "top_logprobs is not supported on /v1/responses (no logprobs in its output items; "
                                "/v1/chat/completions returns them)"),
}
_PARTS = {"input_text": "text", "output_text": "text", "input_image": "image_url"}
# sampling fields outside OpenAI's Responses API that the chat takes (vLLM's names), passed through
_SAMPLING_EXTRAS = ("seed", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "stop",
                    "stop_token_ids", "ignore_eos", "min_tokens", "logit_bias", "skip_special_tokens", "cache_salt")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None
    input: str | list[dict]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool | None = None
    metadata: dict | None = None
    text: dict | None = None
    user: str | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None

    def chat_request(self) -> ChatCompletionRequest:
        """The chat this request means; RequestError naming what cannot map."""
        extra = self.model_extra or {}
        for name, why in _REFUSED.items():
            value = extra.get(name)
            if value is not None and value is not False and value != [] and value != {}:
                raise RequestError(400, why, param=name, code="unsupported_parameter")
        for name, (taken, why) in _NEUTRAL.items():
            if name in extra and not any(type(extra[name]) is type(v) and extra[name] == v for v in taken):
                raise RequestError(400, why, param=name, code="unsupported_parameter")
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if not isinstance(self.input, str) and not self.input:
            raise RequestError(400, "input is empty: give a string or at least one input item", param="input")
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
        else:
            for i, item in enumerate(self.input):
                _add_item(messages, item, i)
        fields = dict(model=self.model, messages=messages, max_tokens=self.max_output_tokens, stream=self.stream,
                      temperature=self.temperature, top_p=self.top_p, user=self.user,
                      parallel_tool_calls=self.parallel_tool_calls)
        fields.update({name: extra[name] for name in _SAMPLING_EXTRAS if name in extra})
        if self.tools:
            fields["tools"] = [_chat_tool(t, i) for i, t in enumerate(self.tools)]
        if self.tool_choice is not None:
            choice = self.tool_choice
            named = isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice
            fields["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}} if named else choice
        fmt = (self.text or {}).get("format")
        if fmt is not None:
            if not isinstance(fmt, dict):
                raise RequestError(400, "text.format must be an object ({\"type\": \"text\" | \"json_object\" | "
                                   "\"json_schema\", ...})", param="text")
            fields["response_format"] = _response_format(fmt)
        try:
            return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            if err["loc"][0] == "messages":  # the chat's messages are this request's instructions + input
                raise RequestError(400, f"input, as chat {where}: {err['msg']}", param="input") from None
            raise RequestError(400, f"{where}: {err['msg']}", param=str(err["loc"][0])) from None


def _chat_tool(tool: dict, i: int) -> dict:
    """A Responses function tool ({"type": "function", "name", "parameters", ...}) -> the chat's."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
        raise RequestError(400, f"tools[{i}]: tools of type {kind!r} are not supported (function tools only)",
                           param="tools")
    return {"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters", "strict")
                                             if k in tool}}


def _add_item(messages: list[dict], item: dict, i: int) -> None:
    """An input item onto the chat's messages: a message; a function_call (consecutive ones: one
    assistant message's tool_calls); a function_call_output (a tool message)."""
    kind = item.get("type", "message")
    if kind == "function_call":
        call = {"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last.get("content"):
            last["tool_calls"].append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output")})
    else:
        messages.append(_message(item, i, kind))


def _message(item: dict, i: int, kind: str) -> dict:
    """A message input item -> a chat message (text and image_url parts)."""
    if kind != "message" or "role" not in item:
        raise RequestError(400, f"input[{i}]: items of type {kind!r} are not supported (message, function_call, "
                           "function_call_output)", param="input")
    content = item.get("content")
    if content is None:
        raise RequestError(400, f"input[{i}]: a message item needs its content", param="input")
    if isinstance(content, list):
        parts = []
        for part in content:
            part_kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            name = _PARTS.get(part_kind) if isinstance(part, dict) else None
            if name is None:
                raise RequestError(400, f"input[{i}].content: a part of type {part_kind!r} is not supported "
                                   "(input_text, output_text, input_image)", param="input")
            if name == "text":
                parts.append({"type": "text", "text": part.get("text")})
            else:
                parts.append({"type": "image_url", "image_url": {"url": part.get("image_url")}})
        content = parts
    return {"role": item["role"], "content": content}


def _response_format(fmt: dict) -> dict:
    """text.format -> chat's response_format."""
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    return {"type": fmt.get("type")}


def response_object(job, model: str, text: str, out, status: str, parser: str = "hermes") -> dict:
    """The Response object; `out` None (no output yet) or the request's last output (its text
    parsed for tool calls by `parser` when the job has tools)."""
    params = job.params[0]
    usage, details = None, None
    if out is not None:
        c = out.outputs[0]
        prompt = len(job.prompts[0][1])
        usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": out.num_cached_tokens},
                 "output_tokens": len(c.token_ids), "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": prompt + len(c.token_ids)}
        if c.finish_reason == "length":
            status, details = "incomplete", {"reason": "max_output_tokens"}
    output = [] if out is None else output_items(job, text, parser)
    fields = job.request_fields
    return {"id": job.id, "object": "response", "created_at": job.created, "status": status, "error": None,
            "incomplete_details": details, "instructions": fields.get("instructions"),
            "max_output_tokens": fields.get("max_output_tokens"), "model": model, "output": output,
            "parallel_tool_calls": job.tools.parallel if job.tools else False, "temperature": params.temperature,
            "tool_choice": fields.get("tool_choice", "none"), "tools": fields.get("tools", []), "top_p": params.top_p,
            "store": False, "metadata": fields.get("metadata", {}),
            "text": fields.get("text", {"format": {"type": "text"}}),
            "truncation": "disabled", "usage": usage}


def output_items(job, text: str, parser: str) -> list[dict]:
    """The output items of a finished reply: its text as a message item (none when a tool call is
    all it wrote), then a function_call item per call."""
    if job.tools is None:
        return [_message_item(job, text, "completed")]
    content, calls = job.tools.parse(text, parser)
    items = [_message_item(job, content, "completed")] if content else []
    return items + [function_call_item(call, "completed") for call in calls]


def function_call_item(call: dict, status: str, arguments: str | None = None) -> dict:
    """A chat tool call ({"id", "function": {"name", "arguments"}}) as a function_call item."""
    fn = call["function"]
    return {"type": "function_call", "id": "fc_" + call["id"].removeprefix("call_"), "call_id": call["id"],
            "name": fn["name"], "arguments": fn["arguments"] if arguments is None else arguments, "status": status}


def _message_item(job, text: str, status: str) -> dict:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
    return {"type": "message", "id": item_id(job), "status": status, "role": "assistant", "content": content}


def item_id(job) -> str:
    """The id of a response's one message item (msg_ + the response id's hex)."""
    return "msg_" + job.id.removeprefix("resp_")


class ResponseEvents:
    """The Responses stream of one job: created and in_progress; the message item opened at its
    first text (a reply that is only tool calls has none), a delta per new text, closed at the
    end; then each tool call as a function_call item (added, its arguments, done); then
    `response.completed` (or `.incomplete`). With tools, text that may start a call is held back
    (serve/tools.py's ToolCallStream)."""

    def __init__(self, job, model: str, parser: str = "hermes"):
        self.job, self.model, self.parser = job, model, parser
        self.seq, self.text, self.opened = 0, "", False
        self.calls = ToolCallStream(job.tools, parser) if job.tools is not None else None

    def _event(self, kind: str, **fields) -> bytes:
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + dumps({"type": kind, "sequence_number": self.seq - 1,
                                                                    **fields}) + b"\n\n"

    def opening(self) -> bytes:
        job = self.job
        return b"".join(self._event(kind, response=response_object(job, self.model, "", None, "in_progress"))
                        for kind in ("response.created", "response.in_progress"))

    def output(self, i: int, out) -> bytes:
        """The text delta of the one stream's latest output (the message item opened first)."""
        c, job = out.outputs[0], self.job
        if self.calls is None:
            new = c.text[len(self.text):]
        else:
            new, _ = self.calls.feed(c.text, c.finish_reason is not None)
        if not new:
            return b""
        head = self._open_message()
        self.text += new
        return head + self._event("response.output_text.delta", item_id=item_id(job), output_index=0,
                                  content_index=0, delta=new, logprobs=[])

    def _open_message(self) -> bytes:
        """The message item's added events, once."""
        if self.opened:
            return b""
        self.opened, job = True, self.job
        return self._event("response.output_item.added", output_index=0, item=_message_item(job, "", "in_progress")) \
            + self._event("response.content_part.added", item_id=item_id(job), output_index=0, content_index=0,
                          part={"type": "output_text", "text": "", "annotations": []})

    def closing(self, last: dict) -> bytes:
        job, out = self.job, last[0]
        response = response_object(job, self.model, out.outputs[0].text, out, "completed", self.parser)
        events = []
        if any(item["type"] == "message" for item in response["output"]):
            # a reply whose text stayed empty (a token that decodes to nothing) still has its message
            # item, as the whole response does: opened and closed with ""
            events.append(self._open_message())
        if self.opened:
            text = self.text
            events += [self._event("response.output_text.done", item_id=item_id(job), output_index=0,
                                   content_index=0, text=text, logprobs=[]),
                       self._event("response.content_part.done", item_id=item_id(job), output_index=0,
                                   content_index=0, part={"type": "output_text", "text": text, "annotations": []}),
                       self._event("response.output_item.done", output_index=0,
                                   item=_message_item(job, text, "completed"))]
        index = int(self.opened)
        for item in response["output"]:
            if item["type"] != "function_call":
                continue
            events += [self._event("response.output_item.added", output_index=index,
                                   item={**item, "arguments": "", "status": "in_progress"}),
                       self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                   delta=item["arguments"]),
                       self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                   arguments=item["arguments"]),
                       self._event("response.output_item.done", output_index=index, item=item)]
            index += 1
        if self.opened:  # the streamed text as the message's (a parse strips what the deltas sent)
            for item in response["output"]:
                if item["type"] == "message":
                    item["content"][0]["text"] = self.text
        return b"".join(events + [self._event(f"response.{response['status']}", response=response)])

    def failed(self, status: int, message: str) -> bytes:
        response = response_object(self.job, self.model, "", None, "failed")
        response.update(error={"code": "server_error" if status >= 500 else "invalid_request", "message": message})
        return self._event("response.failed", response=response)
