"""Tool calls on /v1/chat/completions: OpenAI's `tools` and `tool_choice`, rendered through the
checkpoint's chat template (its `tools=` argument), and the model's text parsed back into
OpenAI `tool_calls`.

    plan = ToolPlan.of(body.tools, body.tool_choice, body.parallel_tool_calls)  # RequestError if bad
    plan.template_tools      -> the tools for apply_chat_template (None for "none")
    plan.guide               -> GuidedDecodingParams for "required" / a named function, else None
    content, calls = plan.parse(text, parser)        # whole responses
    stream = ToolCallStream(plan, parser); content_delta, calls = stream.feed(text, done)   # SSE

`tool_choice`:
  - "none": the tools are not rendered and the text is plain content.
  - "auto" (the default with tools): the model decides; its text is parsed by the server's
    `--tool_parser` (`hermes`: Hermes / Qwen's `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
    blocks, any text outside them being content; `llama3`: Llama-3's JSON
    `{"name": ..., "parameters": ...}`, several joined by ";", as the whole reply).
  - "required" / {"type": "function", "function": {"name": ...}}: the output is constrained
    (guided decoding) by the tools' parameter schemas, independent of the parser, as vLLM does:
    a named function's output is its arguments object; "required"'s is a JSON array of
    {"name", "parameters"} objects (one at most with parallel_tool_calls=false).

A reply that parsed into calls ends with finish_reason "tool_calls" (when it stopped, not
when it ran out of tokens). Streaming: content streams as it comes, held back from the
point where a tool call may start (hermes: a prefix of "<tool_call>"; llama3: a reply whose
first non-space character is "{"; "required": all of it); the calls follow as
`delta.tool_calls` entries (index, id, type, function name and arguments) once the
completion ends. A named function's call streams as OpenAI's do: its id and name first,
then its arguments as they are written.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from trtllm.guided_decoding_params import GuidedDecodingParams

PARSERS = ("hermes", "llama3")
_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class ToolError(ValueError):
    """A bad `tools` / `tool_choice` (the server answers 400 naming `param`)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolPlan:
    tools: list[dict]               # OpenAI's tool objects, as sent
    mode: str                       # "none" | "auto" | "required" | "named"
    name: str | None = None         # the named function
    parallel: bool = True

    @classmethod
    def of(cls, tools: list | None, tool_choice, parallel_tool_calls: bool | None) -> ToolPlan | None:
        """None when the request has no tools (a tool_choice without tools is refused)."""
        if not tools:
            if tool_choice not in (None, "none"):
                raise ToolError("tool_choice needs tools", "tool_choice")
            return None
        names = []
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict) \
                    or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise ToolError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                "\"parameters\": {...}}}", "tools")
            if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                raise ToolError(f"tools[{i}].function.parameters must be a JSON Schema object", "tools")
            names.append(fn["name"])
        choice = "auto" if tool_choice is None else tool_choice
        plan = cls(list(tools), "auto", parallel=parallel_tool_calls is not False)
        if isinstance(choice, str):
            if choice not in ("none", "auto", "required"):
                raise ToolError(f"tool_choice {choice!r} must be 'none', 'auto', 'required' or "
                                "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
            plan.mode = choice
        else:
            name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
            if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
                raise ToolError("tool_choice must be 'none', 'auto', 'required' or "
                                "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
            if name not in names:
                raise ToolError(f"tool_choice names the function {name!r}, which is not among the tools "
                                f"({', '.join(names)})", "tool_choice")
            plan.mode, plan.name = "named", name
        return plan

    @property
    def template_tools(self) -> list[dict] | None:
        return None if self.mode == "none" else self.tools

    def _parameters(self, tool: dict) -> dict:
        params = tool["function"].get("parameters")
        return params if params else {"type": "object"}

    @property
    def guide(self) -> GuidedDecodingParams | None:
        if self.mode == "named":
            tool = next(t for t in self.tools if t["function"]["name"] == self.name)
            params = tool["function"].get("parameters")
            return GuidedDecodingParams(json=params) if params else GuidedDecodingParams(json_object=True)
        if self.mode == "required":
            calls = [{"type": "object", "properties": {"name": {"enum": [t["function"]["name"]]},
                                                       "parameters": self._parameters(t)},
                      "required": ["name", "parameters"]} for t in self.tools]
            schema = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
            if not self.parallel:
                schema["maxItems"] = 1
            return GuidedDecodingParams(json=schema)
        return None

    def parse(self, text: str, parser: str) -> tuple[str | None, list[dict]]:
        """(content, tool calls) of a whole reply; content None when empty. The content around
        calls is stripped; a reply without calls is its text as it is: as its stream sends it, and
        as a chat without tools returns it."""
        content, calls = self._parse(text, parser)
        if calls:
            content = content.strip()
        return (content or None), calls

    def _parse(self, text: str, parser: str) -> tuple[str, list[dict]]:
        """(content, calls), content unstripped: what was not a call (all of it if nothing parsed)."""
        if self.mode == "none":
            return text, []
        if self.mode == "named":  # the output is the arguments (cut short by max_tokens: as far as it got)
            return "", [_call(self.name, text)]
        if self.mode == "required":
            items = _json_value(text)
            if isinstance(items, list) and items and all(isinstance(i, dict) and "name" in i for i in items):
                return "", [_call(i["name"], i.get("parameters", {})) for i in items]
            return text, []
        return (_parse_hermes if parser == "hermes" else _parse_llama3)(text)


def _json_value(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # a model can write JSON nested past Python's stack
        return None


def _call(name: str, arguments) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments if isinstance(arguments, str)
                         else json.dumps(arguments, ensure_ascii=False)}}


def _named_call(obj, args_key: str) -> dict | None:
    if isinstance(obj, dict) and isinstance(obj.get("name"), str):
        args = obj.get(args_key, obj.get("arguments" if args_key == "parameters" else "parameters", {}))
        return _call(obj["name"], args if args is not None else {})
    return None


def _parse_hermes(text: str) -> tuple[str, list[dict]]:
    """Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (the last
    may lack its closing tag: the model stopped at EOS); the rest is content. A block that
    does not parse leaves the whole text as content."""
    start = text.find(_HERMES_OPEN)
    if start < 0:
        return text, []
    calls = []
    for m in _HERMES_BLOCK.finditer(text, start):
        call = _named_call(_json_value(m.group(1)), "arguments")
        if call is None:
            return text, []
        calls.append(call)
    rest = _HERMES_BLOCK.sub("", text[start:])
    return text[:start] + rest, calls


def _parse_llama3(text: str) -> tuple[str, list[dict]]:
    """Llama-3.x: the whole reply is `{"name": ..., "parameters": {...}}` (several joined by
    ";"), perhaps after <|python_tag|>; anything else is content."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            obj, end = decoder.raw_decode(body, at)
        except (ValueError, RecursionError):
            return text, []
        call = _named_call(obj, "parameters")
        if call is None:
            return text, []
        calls.append(call)
        at = end
        while at < len(body) and body[at] in " \t\r\n;":
            at += 1
    return "", calls


class ToolCallStream:
    """One streamed choice of a request with tools: what of the text may go out as content
    now, and the tool calls once it ends (see the module docstring)."""

    def __init__(self, plan: ToolPlan, parser: str):
        self.plan, self.parser = plan, parser
        self.sent = 0  # characters of content (a named call: of arguments) sent
        self._ended_with_calls = False
        self.opened = False  # a named call's first delta (id, name) went out

    @property
    def called(self) -> bool:
        """Tool calls went out (the choice ends with finish_reason "tool_calls")."""
        return self.opened or self._ended_with_calls

    def feed(self, text: str, done: bool) -> tuple[str, list[dict]]:
        """(content delta, tool-call deltas) given the choice's whole text so far."""
        if self.plan.mode == "named":
            new, self.sent = text[self.sent:], len(text)
            if not self.opened:
                self.opened = True
                return "", [{"index": 0, **_call(self.plan.name, new)}]
            return "", [{"index": 0, "function": {"arguments": new}}] if new else []
        if done:
            content, calls = self.plan._parse(text, self.parser)
            self._ended_with_calls = bool(calls)
            delta = content[self.sent:] if content.startswith(text[:self.sent]) else ""
            self.sent = len(content)
            return delta, [{"index": i, **call} for i, call in enumerate(calls)]
        visible = self._safe_len(text)
        delta = text[self.sent:visible] if visible > self.sent else ""
        self.sent = max(self.sent, visible)
        return delta, []

    def _safe_len(self, text: str) -> int:
        """How much of the text is content for sure (a tool call cannot start before it)."""
        mode = self.plan.mode
        if mode == "none":
            return len(text)
        if mode in ("named", "required"):
            return 0
        if self.parser == "llama3":
            head = text.lstrip()
            return 0 if not head or head.startswith(("{", "<")) else len(text)
        start = text.find(_HERMES_OPEN)
        if start >= 0:
            return start
        for k in range(min(len(_HERMES_OPEN) - 1, len(text)), 0, -1):  # a tail that may open a tag
            if _HERMES_OPEN.startswith(text[-k:]):
                return len(text) - k
        return len(text)
