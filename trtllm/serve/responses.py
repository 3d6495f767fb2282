"""OpenAI's Responses API (`POST /v1/responses`), stateless: a request is the chat it means, and its
outputs come back as a Response object or the Responses stream events.

    chat = ResponsesRequest(...).chat_request()    # instructions -> a system message, input -> messages
    job = await jobs.chat_job(chat)                # every chat check; then job.endpoint = "responses"
    body = response_body(job, out, model)          # or, streamed, ResponseEvents(job, model)

What maps: `input` (a string, or message items whose content is a string or `input_text` /
`output_text` / `input_image` parts), `instructions`, `max_output_tokens`, `temperature`, `top_p`,
`text.format` (text, json_object, json_schema: structured output), `stream`, `user`. What a
stateless server cannot do is refused by name: `previous_response_id` and `conversation` (no
response is kept: send the whole conversation as `input`), `background`, `tools` (use
/v1/chat/completions), `include`, `prompt` (stored prompt templates), `reasoning`. `store` is
accepted and answered with `"store": false`.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trtllm.serve.errors import RequestError
from trtllm.serve.protocol import ChatCompletionRequest
from trtllm.serve.render import dumps

_REFUSED = {
    "previous_response_id": "previous_response_id: this server keeps no responses (stateless); send the whole "
                            "conversation as input",
    "conversation": "conversation: this server keeps no conversations (stateless); send the whole conversation as "
                    "input",
    "background": "background responses are not supported",
    "tools": "tools are not supported on /v1/responses; use /v1/chat/completions",
    "include": "include is not supported (no extra output items)",
    "prompt": "prompt (a stored prompt template) is not supported; send instructions and input",
    "reasoning": "reasoning options are not supported",
}
_PARTS = {"input_text": "text", "output_text": "text", "input_image": "image_url"}


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

    def chat_request(self) -> ChatCompletionRequest:
        """The chat this request means; RequestError naming what cannot map."""
        extra = self.model_extra or {}
        for name, why in _REFUSED.items():
            value = extra.get(name)
            if value is not None and value is not False and value != [] and value != {}:
                raise RequestError(400, why, param=name, code="unsupported_parameter")
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
        else:
            messages += [_message(item, i) for i, item in enumerate(self.input)]
        fields = dict(model=self.model, messages=messages, max_tokens=self.max_output_tokens, stream=self.stream,
                      temperature=self.temperature, top_p=self.top_p, user=self.user)
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
            raise RequestError(400, f"{where}: {err['msg']}", param=str(err["loc"][0])) from None


def _message(item: dict, i: int) -> dict:
    """An input item -> a chat message (text and image_url parts)."""
    kind = item.get("type", "message")
    if kind != "message" or "role" not in item:
        raise RequestError(400, f"input[{i}]: items of type {kind!r} are not supported (message items only)",
                           param="input")
    content = item.get("content")
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


def response_object(job, model: str, text: str, out, status: str) -> dict:
    """The Response object; `out` None (no output yet) or the request's last output."""
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
    output = [] if out is None else [_message_item(job, text, "completed")]
    fields = job.request_fields
    return {"id": job.id, "object": "response", "created_at": job.created, "status": status, "error": None,
            "incomplete_details": details, "instructions": fields.get("instructions"),
            "max_output_tokens": fields.get("max_output_tokens"), "model": model, "output": output, "parallel_tool_calls": False,
            "temperature": params.temperature, "tool_choice": "none", "tools": [], "top_p": params.top_p,
            "store": False, "metadata": fields.get("metadata", {}),
            "text": fields.get("text", {"format": {"type": "text"}}),
            "truncation": "disabled", "usage": usage}


def _message_item(job, text: str, status: str) -> dict:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
    return {"type": "message", "id": item_id(job), "status": status, "role": "assistant", "content": content}


def item_id(job) -> str:
    """The id of a response's one message item (msg_ + the response id's hex)."""
    return "msg_" + job.id.removeprefix("resp_")


class ResponseEvents:
    """The Responses stream of one job: created, the message item and its text part opened, a
    delta per new text, then each closed and `response.completed` (or `.incomplete`)."""

    def __init__(self, job, model: str):
        self.job, self.model = job, model
        self.seq, self.text_sent = 0, 0

    def _event(self, kind: str, **fields) -> bytes:
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + dumps({"type": kind, "sequence_number": self.seq - 1,
                                                                    **fields}) + b"\n\n"

    def opening(self) -> bytes:
        job, at = self.job, dict(output_index=0)
        return b"".join([
            self._event("response.created", response=response_object(job, self.model, "", None, "in_progress")),
            self._event("response.in_progress", response=response_object(job, self.model, "", None, "in_progress")),
            self._event("response.output_item.added", item=_message_item(job, "", "in_progress"), **at),
            self._event("response.content_part.added", item_id=item_id(job), content_index=0,
                        part={"type": "output_text", "text": "", "annotations": []}, **at)])

    def output(self, i: int, out) -> bytes:
        """The text delta of the one stream's latest output."""
        text = out.outputs[0].text
        new, self.text_sent = text[self.text_sent:], len(text)
        if not new:
            return b""
        return self._event("response.output_text.delta", item_id=item_id(self.job), output_index=0, content_index=0,
                           delta=new, logprobs=[])

    def closing(self, last: dict) -> bytes:
        job, out = self.job, last[0]
        text = out.outputs[0].text
        response = response_object(job, self.model, text, out, "completed")
        return b"".join([
            self._event("response.output_text.done", item_id=item_id(job), output_index=0, content_index=0,
                        text=text, logprobs=[]),
            self._event("response.content_part.done", item_id=item_id(job), output_index=0, content_index=0,
                        part={"type": "output_text", "text": text, "annotations": []}),
            self._event("response.output_item.done", output_index=0, item=_message_item(job, text, "completed")),
            self._event(f"response.{response['status']}", response=response)])

    def failed(self, status: int, message: str) -> bytes:
        response = response_object(self.job, self.model, "", None, "failed")
        response.update(error={"code": "server_error" if status >= 500 else "invalid_request", "message": message})
        return self._event("response.failed", response=response)
