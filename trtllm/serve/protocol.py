"""OpenAI-compatible request bodies, their caps, and their translation to `SamplingParams`.

Fields OpenAI defines are accepted with OpenAI's meaning; vLLM-style extensions that the
engine implements (top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
stop_token_ids, ...) ride along (the `openai` client sends them with `extra_body`).
Structured output: OpenAI's `response_format` (`text`, `json_object`, `json_schema`) and vLLM's
`guided_json / guided_regex / guided_choice / guided_grammar`, at most one of them, become
`SamplingParams.guided_decoding`; chat's `tools` / `tool_choice` are serve/tools.py's.
Unknown fields are ignored, as OpenAI-compatible servers do, except those whose meaning
the engine does not implement (functions, suffix, ...), logits processors (user
code: never over HTTP) and a request-supplied chat template: those are refused by name, so a
client never gets an answer that silently ignored what it asked for.

Every check here runs before any work reaches the engine; a failure is a `RequestError`
(serve/errors.py) that the app turns into OpenAI's error JSON (`{"error": {message, type, param, code}}`).
Chat content parts (text, image_url) are serve/content_parts.py's.
"""
from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trtllm.config import ConfigError
from trtllm.guided_decoding_params import GuidedDecodingParams
from trtllm.runtime.engine_limits import MAX_CACHE_SALT_CHARS
from trtllm.sampling_params import MAX_LOGPROBS, MAX_N, MAX_STOP_STRINGS, SamplingParams
from trtllm.serve.content_parts import TextPart, image_urls, template_content
from trtllm.serve.errors import RequestError

MAX_PROMPTS = 32              # prompts in one /v1/completions request (a list of prompts)
MAX_SEQUENCES = 64            # prompts x n in one request
MAX_MESSAGES = 1024           # chat messages in one request
MAX_STOP_TOKEN_IDS = 64
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# OpenAI's logit_bias entries a request may carry
MAX_LOGIT_BIAS = 1024

# A request may carry these, but only with a value that asks for nothing unimplemented.
_REFUSED = {
    "chat_template": "a request-supplied chat template is refused: the server uses the checkpoint's own",
    "chat_template_kwargs": "chat_template_kwargs are refused: the server renders the checkpoint's "
                            "chat template as it is",
    "functions": "functions (the legacy function calling) are not supported; use tools",
    "function_call": "function_call (the legacy function calling) is not supported; use tool_choice",
    "logits_processor": "logits processors are user code, which the server never runs: use the LLM API's "
                        "SamplingParams(logits_processor=...)",
    "logits_processors": "logits processors are user code, which the server never runs: use the LLM API's "
                         "SamplingParams(logits_processor=...)",
    "suffix": "suffix (insertion) is not supported",
    "prompt_logprobs": "prompt_logprobs is not supported",
    # vLLM's extensions that would change the output: ignored, the request would get another answer than it asked
    "allowed_token_ids": "allowed_token_ids is not supported; use logit_bias",
    "bad_words": "bad_words is not supported; use logit_bias to ban tokens",
    "truncate_prompt_tokens": "truncate_prompt_tokens is not supported: a prompt over the context is refused, "
                              "not cut",
    "continue_final_message": "continue_final_message is not supported: the chat template starts a new "
                              "assistant turn",
    "echo": "echo is not supported on /v1/chat/completions (it is on /v1/completions)",
    "return_tokens_as_token_ids": "return_tokens_as_token_ids is not supported",
    "guided_whitespace_pattern": "guided_whitespace_pattern is not supported: JSON guides allow the "
                                 "grammar's own whitespace",
}


def lone_surrogate(text: str) -> int | None:
    """Where `text` holds a lone surrogate, or None. JSON may carry one ("\\udcff" is valid
    JSON), but it is no Unicode text: the tokenizer raises on it and UTF-8 cannot encode it."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _invalid_text(value, path: str) -> tuple[str, int, str] | None:
    """(path, index, character) of the first lone surrogate in the strings of `value` (a
    request model, or the JSON of an unknown field), or None."""
    if isinstance(value, str):
        at = lone_surrogate(value)
        return None if at is None else (path, at, value[at])
    if isinstance(value, BaseModel):
        items = [(f"{path}.{k}" if path else k, v) for k, v in (*value.__dict__.items(),
                                                               *(value.model_extra or {}).items())]
    elif isinstance(value, dict):
        items = [(f"{path}.{k}", v) for k, v in value.items()] + [(f"{path} (a key)", k) for k in value]
    elif isinstance(value, list):
        if not value or isinstance(value[0], (int, float)):  # token ids, numbers: no text
            return None
        items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None
    for where, v in items:
        found = _invalid_text(v, where)
        if found is not None:
            return found
    return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    """What /v1/completions and /v1/chat/completions share."""
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description=f"at most {MAX_STOP_STRINGS} strings")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    # OpenAI's: token id (a string) -> a bias in [-100, 100] added to its logit (SamplingParams.embedding_bias)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    user: str | None = None
    # engine extensions (vLLM's names); cache_salt: cached prefixes shared only among requests of one salt
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    # structured output: OpenAI's response_format, or one of vLLM's guided_* fields
    response_format: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # beam search (vLLM's names; SamplingParams, runtime/beams.py): width best_of (or n), n best returned
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    early_stopping: bool | Literal["never"] | None = None

    def refuse_invalid_text(self) -> None:
        """Every string the request carries (prompts, messages, stop strings, the model
        name, unknown fields) must be Unicode text: a lone surrogate is refused by name."""
        try:
            found = _invalid_text(self, "")
        except RecursionError:  # JSON's decoder takes ~960 levels, and leaves too little stack to walk them
            raise RequestError(400, "the request body nests objects and arrays too deeply") from None
        if found is not None:
            where, at, char = found
            raise RequestError(400, f"{where}: a lone surrogate (U+{ord(char):04X}) at character {at} is not "
                               "valid Unicode text; send text as UTF-8", param=re.split(r"[.\[ ]", where)[0])

    def refuse_unsupported(self) -> None:
        extra = self.model_extra or {}
        for name, why in _REFUSED.items():
            value = extra.get(name)
            if value is not None and value is not False and value != {} and value != []:
                raise RequestError(400, why, param=name, code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise RequestError(400, "stream_options is only allowed with stream=true", param="stream_options")

    def guide(self) -> tuple[GuidedDecodingParams | None, str | None]:
        """The request's structured-output constraint and the field that asked for it."""
        asked = [name for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
                 if getattr(self, name) is not None]
        fmt = self.response_format
        if fmt is not None:
            kind = fmt.get("type")
            if kind not in ("text", "json_object", "json_schema"):
                raise RequestError(400, f"response_format type {kind!r} must be 'text', 'json_object' or "
                                   "'json_schema'", param="response_format")
            if kind != "text":
                asked.insert(0, "response_format")
        if len(asked) > 1:
            raise RequestError(400, f"{' and '.join(asked)}: at most one structured-output constraint per request",
                               param=asked[1])
        if not asked:
            return None, None
        param = asked[0]
        try:
            if param == "response_format":
                if fmt["type"] == "json_object":
                    return GuidedDecodingParams(json_object=True), param
                spec = fmt.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                    raise RequestError(400, "response_format json_schema needs json_schema.schema (a JSON Schema "
                                       "object)", param=param)
                # strict or not, the output is constrained to the schema (as strict asks)
                return GuidedDecodingParams(json=spec["schema"]), param
            kind = param.removeprefix("guided_")
            return GuidedDecodingParams(**{"json" if kind == "json" else kind: getattr(self, param)}), param
        except ConfigError as e:
            raise RequestError(400, f"{param}: {e.problems[0][2]}", param=param) from None

    def embedding_bias(self, vocab_size: int):
        """logit_bias as a [vocab_size] fp32 tensor, or None; RequestError naming a bad entry."""
        if not self.logit_bias:
            return None
        import torch
        bias = torch.zeros(vocab_size, dtype=torch.float32)
        for key, value in self.logit_bias.items():
            if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size:  # "²".isdigit(), "٣".isdigit()
                raise RequestError(400, f"logit_bias: {key!r} is not a token id in [0, {vocab_size})",
                                   param="logit_bias")
            if not -100.0 <= value <= 100.0:
                raise RequestError(400, f"logit_bias: the bias of token {key} ({value}) is outside [-100, 100]",
                                   param="logit_bias")
            bias[int(key)] = value
        return bias

    def sampling_params(self, max_tokens: int, logprobs: int | None, guide: GuidedDecodingParams | None = None,
                        vocab_size: int | None = None, prompt_logprobs: int | None = None,
                        guide_param: str | None = None) -> SamplingParams:
        """prompt_logprobs: /v1/completions' echo with logprobs (the echoed prompt's tokens scored);
        guide_param: the field that asked for `guide` (response_format, guided_json, tools, ...)."""
        fields: dict[str, Any] = dict(max_tokens=max_tokens, n=self.n, logprobs=logprobs, guided_decoding=guide)
        if prompt_logprobs is not None:
            fields["prompt_logprobs"] = prompt_logprobs
        if self.logit_bias and vocab_size is not None:
            fields["embedding_bias"] = self.embedding_bias(vocab_size)
        elif self.logit_bias:
            raise RequestError(400, "logit_bias: this server cannot tell the vocabulary size", param="logit_bias")
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "min_p",
                     "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                     "skip_special_tokens", "include_stop_str_in_output", "best_of", "use_beam_search",
                     "length_penalty", "early_stopping"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        if self.top_k is not None:
            fields["top_k"] = self.top_k  # -1 (vLLM's "no limit") = 0 in SamplingParams
        if self.temperature is None:  # OpenAI's default, 1; SamplingParams' (TensorRT-LLM's) unset is greedy
            fields["temperature"] = 1.0
        if self.stop is not None:
            fields["stop"] = self.stop
        try:
            return SamplingParams(**fields)
        except ConfigError as e:
            field, _, rule = e.problems[0]
            param = field or next((f for f in rule.replace("(", " ").split() if f in SamplingParams.model_fields),
                                  None)
            if "embedding_bias" in (param, field) or "embedding_bias" in rule:  # the request said logit_bias
                field, rule, param = field and "logit_bias", rule.replace("embedding_bias", "logit_bias"), "logit_bias"
            if guide_param is not None and "guided_decoding" in (param, field):  # named as the request named it
                field, rule, param = field and guide_param, rule.replace("guided_decoding", guide_param), guide_param
            raise RequestError(400, f"{field}: {rule}" if field else rule, param=param) from None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description=f"a string, a list of token ids, or a list of up to {MAX_PROMPTS} of either")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # 0 with echo: the prompt alone, scored (logprobs) as the legacy API allowed
    max_tokens: int | None = Field(None, ge=0)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            prompts = [p]
        elif not p:
            raise RequestError(400, "prompt is empty", param="prompt")
        elif isinstance(p[0], int):
            prompts = [p]
        else:
            prompts = list(p)
        if len(prompts) > MAX_PROMPTS:
            raise RequestError(400, f"prompt: {len(prompts)} prompts in one request, more than {MAX_PROMPTS}",
                               param="prompt")
        if len(prompts) * max(self.n, self.best_of or 1) > MAX_SEQUENCES:
            raise RequestError(400, f"{len(prompts)} prompts x n={self.n} (best_of={self.best_of}) is more than "
                               f"{MAX_SEQUENCES} completions in one request", param="n")
        if any(len(q) == 0 for q in prompts):
            raise RequestError(400, "prompt is empty", param="prompt")
        if self.max_tokens == 0 and not self.echo:
            raise RequestError(400, "max_tokens=0 asks for no new tokens: it needs echo=true (the prompt back, "
                               "scored with logprobs)", param="max_tokens")
        return prompts

    @property
    def prompt_only(self) -> bool:
        """max_tokens=0 with echo: the prompt (and its logprobs) without new tokens."""
        return self.max_tokens == 0


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None   # an assistant's earlier calls, rendered by the chat template
    tool_call_id: str | None = None        # a tool message: the call it answers

    def as_template_input(self, image_token: str | None = None) -> dict:
        """The message for the chat template; an image part becomes `image_token` (the model's
        placeholder, which its processor expands), in the part's place."""
        content = template_content(self.content, image_token)
        role = "system" if self.role == "developer" else self.role
        message = {"role": role, "content": content or ""}
        if self.tool_calls:
            # templates (Qwen's, Llama-3's) write arguments with `| tojson`: give them the object
            message["tool_calls"] = [_template_call(c) for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None and role == "tool":
            message["name"] = self.name
        return message


def _template_call(call: dict) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise RequestError(400, "messages: a tool_calls entry must be {\"type\": \"function\", \"function\": "
                                "{\"name\": ..., \"arguments\": ...}}", param="messages")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            raise RequestError(400, "messages: a tool call's arguments must be JSON text", param="messages") from None
        except RecursionError:
            raise RequestError(400, "messages: a tool call's arguments nest too deeply", param="messages") from None
    return {**call, "function": {**fn, "arguments": args}}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(..., max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None

    def image_urls(self) -> list:
        """The image_url parts' URLs, in message and part order."""
        return image_urls(m.content for m in self.messages)

    def checked_messages(self, image_token: str | None = None) -> list[dict]:
        if not self.messages:
            raise RequestError(400, "messages is empty", param="messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise RequestError(400, "max_tokens and max_completion_tokens disagree", param="max_tokens")
        return [m.as_template_input(image_token) for m in self.messages]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
