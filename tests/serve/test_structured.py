"""Structured output and tool calls through the real server, driven by the official `openai`
client (streaming and not): response_format json_object / json_schema, guided_json /
guided_regex / guided_choice / guided_grammar; tools with tool_choice named, required, auto
and none on a checkpoint whose chat template renders tools; bad guides and tools refused
with 400 naming the field; the tool-call parsers (serve/tools.py) on their own."""
import json
import re

import jsonschema
import openai
import pytest

from tests.models.checkpoints import write_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from tests.serve.server import Server
from trtllm.serve.tools import ToolCallStream, ToolPlan

pytest.importorskip("xgrammar")

# ChatML with tools, as Qwen2.5 / Hermes write them (shortened: the tiny model's context is short)
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:\n{% for tool in tools %}{{ tool.function | tojson }}\n{% endfor %}"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{% for call in message.tool_calls %}<tool_call>{{ {'name': call.function.name, "
    "'arguments': call.function.arguments} | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>{{ message.content }}</tool_response>"
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 4}},
                                       "required": ["tz"]}}}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"]}
USER = [{"role": "user", "content": "Hi"}]
SAMPLED = dict(temperature=1.0, seed=7)


@pytest.fixture(scope="module")
def tools_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("tools_model")
    write_checkpoint("llama31", path, vocab_size=512, max_position_embeddings=1024)
    make_tokenizer(path, chat_template=TOOLS_TEMPLATE)
    with Server(path, "--max_seq_len", "1024", "--max_num_tokens", "256", "--tool_parser", "hermes",
                log_path=tmp_path_factory.mktemp("tools_log") / "server.log") as s:
        yield s
    assert s.proc.returncode == 0, s.log()


@pytest.fixture(scope="module")
def client(tools_server):
    with openai.OpenAI(base_url=tools_server.url + "/v1", api_key="unused", timeout=120, max_retries=0) as c:
        yield c


def test_response_format_json_schema_and_json_object(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        out = client.chat.completions.create(model="tiny", messages=USER, response_format=fmt, max_tokens=300,
                                             temperature=1.0, seed=seed)
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, response_format=fmt, max_tokens=300,
                                                 stream=True, **SAMPLED))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # it streamed
    obj = client.chat.completions.create(model="tiny", messages=USER, response_format={"type": "json_object"},
                                         max_tokens=300, **SAMPLED)
    # any object: a random model may write one key until max_tokens; one that stopped parses
    text = obj.choices[0].message.content
    assert text.startswith("{") and (obj.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))


def test_guided_fields_on_completions_and_chat(client):
    regex = r"[0-9]{3}-[a-z]{2,4}"
    out = client.completions.create(model="tiny", prompt="Code:", max_tokens=40, n=3,
                                    extra_body={"guided_regex": regex}, **SAMPLED)
    assert all(re.fullmatch(regex, c.text) for c in out.choices)
    out = client.completions.create(model="tiny", prompt="Pick:", max_tokens=40,
                                    extra_body={"guided_choice": ["red", "green", "blue"]}, **SAMPLED)
    assert out.choices[0].text in ("red", "green", "blue")
    out = client.completions.create(model="tiny", prompt="x", max_tokens=60,
                                    extra_body={"guided_grammar": 'root ::= "<" [a-z]{1,5} ">"'}, **SAMPLED)
    assert re.fullmatch(r"<[a-z]{1,5}>", out.choices[0].text)
    chat = client.chat.completions.create(model="tiny", messages=USER, max_tokens=300,
                                          extra_body={"guided_json": SCHEMA}, **SAMPLED)
    jsonschema.validate(json.loads(chat.choices[0].message.content), SCHEMA)
    streamed = client.completions.create(model="tiny", prompt="Code:", max_tokens=40, stream=True,
                                         extra_body={"guided_regex": regex}, **SAMPLED)
    assert re.fullmatch(regex, "".join(c.choices[0].text for c in streamed if c.choices))


def _nested(key: str, depth: int) -> dict:
    """A schema `depth` levels deep, each under `key` ("a": an unknown keyword, no subschema)."""
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema} if key == "items" else {key: schema}
    return schema


@pytest.mark.parametrize("body, param, words", [
    (dict(extra_body={"guided_regex": "a(b"}), "guided_regex", ["guided_regex", "parenthesis"]),
    (dict(extra_body={"guided_json": {"type": "object", "properties": 3}}), "guided_json", ["JSON Schema"]),
    (dict(extra_body={"guided_grammar": "root ::= nope"}), "guided_grammar", ["nope"]),
    (dict(extra_body={"guided_choice": []}), "guided_choice", ["non-empty"]),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}),
     "response_format", ["strin"]),
    (dict(response_format={"type": "xml"}), "response_format", ["xml"]),
    (dict(response_format={"type": "json_object"}, extra_body={"guided_regex": "a"}), "guided_regex",
     ["at most one"]),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice",
     ["nope"]),
    (dict(tool_choice="required"), "tool_choice", ["needs tools"]),
    (dict(tools=[{"type": "function"}]), "tools", ["tools[0]"]),
    (dict(extra_body={"logits_processors": ["x"]}), "logits_processors", ["user code"]),
    # nested past Python's stack: the meta-schema check raised RecursionError (a 500), and a schema
    # it did not descend (unknown keywords) killed the thread that sends requests to the engine
    (dict(extra_body={"guided_json": _nested("items", 150)}), "guided_json", ["levels deep"]),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": _nested("a", 600)}}),
     "response_format", ["levels deep"]),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": _nested("a", 70)}}],
          tool_choice="required"), "tools", ["levels deep"]),
    # a reference outside the schema is never fetched: xgrammar let any JSON value stand in for it
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}, "required": ["a"]}}}),
     "response_format", ["$ref", "https://example.com/a.json"]),
    (dict(extra_body={"guided_json": {"$ref": "other.json#/x"}}), "guided_json", ["other.json#/x"]),
])
def test_bad_structured_requests_are_400_naming_the_field(client, body, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=20, **body)
    err = e.value.body
    assert err["param"] == param, err
    assert all(w in err["message"] for w in words), err
    ok = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3)  # the server is unaffected
    assert ok.choices[0].message.content is not None


def _validate_call(call, tools):
    fn = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), fn["parameters"])
    assert call.type == "function" and call.id.startswith("call_")


def test_named_and_required_tool_calls(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(2):
        out = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER, TIME], tool_choice=named,
                                             max_tokens=200, temperature=1.0, seed=seed)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
        _validate_call(choice.message.tool_calls[0], [WEATHER, TIME])
    out = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER, TIME], tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=200, **SAMPLED)
    calls = out.choices[0].message.tool_calls
    assert len(calls) == 1 and out.choices[0].finish_reason == "tool_calls"
    _validate_call(calls[0], [WEATHER, TIME])


def test_tool_calls_stream_as_deltas(client):
    whole = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=200, **SAMPLED)
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], tool_choice="required",
                                                 parallel_tool_calls=False, max_tokens=200, stream=True, **SAMPLED))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole.choices[0].message.tool_calls]


def test_auto_and_none_and_a_tool_conversation(client):
    out = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], max_tokens=8, **SAMPLED)
    # the random model writes no <tool_call>: its text is content
    assert out.choices[0].message.tool_calls is None and out.choices[0].message.content
    none = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], tool_choice="none",
                                          max_tokens=8, **SAMPLED)
    assert none.choices[0].message.tool_calls is None
    history = USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Rome", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    after = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=4, **SAMPLED)
    assert after.usage.prompt_tokens > out.usage.prompt_tokens


def test_tools_need_a_template_that_renders_them(server):
    r = server.post("/v1/chat/completions", {"messages": USER, "tools": [WEATHER], "max_tokens": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    assert "does not render tools" in r.json()["error"]["message"]
    # "none": the tools are not rendered, so any template serves
    assert server.post("/v1/chat/completions", {"messages": USER, "tools": [WEATHER], "tool_choice": "none",
                                                "max_tokens": 3}).status_code == 200


# -- the parsers alone --------------------------------------------------------------------------------
def plan(choice="auto"):
    return ToolPlan.of([WEATHER, TIME], choice, None)


def test_hermes_parser():
    text = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}\n' \
           '</tool_call><tool_call>{"name": "get_time", "arguments": {"tz": "CET"}}'  # the last unclosed (EOS)
    content, calls = plan().parse(text, "hermes")
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Rome", "days": 2}), ("get_time", {"tz": "CET"})]
    assert plan().parse("no calls here", "hermes") == ("no calls here", [])
    assert plan().parse("<tool_call>{not json</tool_call>", "hermes") == ("<tool_call>{not json</tool_call>", [])


@pytest.mark.parametrize("parser, choice", [("hermes", "auto"), ("llama3", "auto"), ("hermes", "required")])
def test_a_reply_without_calls_is_its_text_streamed_or_not(parser, choice):
    # the whole response stripped it ("Hi" of "\nHi "), the stream sent it as written
    text = "\nHi there \n"
    stream = ToolCallStream(plan(choice), parser)
    streamed = stream.feed(text[:4], done=False)[0] + stream.feed(text, done=True)[0]
    assert plan(choice).parse(text, parser) == (streamed, []) and streamed == text


@pytest.mark.parametrize("parser, choice", [("hermes", "auto"), ("llama3", "auto"), ("hermes", "required")])
def test_a_reply_nested_past_the_stack_is_content(parser, choice):
    """A model can write JSON nested ~1000 deep (one token per bracket): that is text, not a call
    (json.loads raised RecursionError, and the finished request answered 500)."""
    deep = '{"name": "get_time", "arguments": ' + '{"a": ' * 3000 + "1" + "}" * 3000 + "}"
    text = {"hermes": f"<tool_call>{deep}</tool_call>", "llama3": deep}[parser] if choice == "auto" else \
        "[" * 3000 + "]" * 3000
    assert plan(choice).parse(text, parser) == (text, [])
    stream = ToolCallStream(plan(choice), parser)
    assert stream.feed(text, done=True) == (text, []) and not stream.called


def test_llama3_parser():
    text = '{"name": "get_weather", "parameters": {"city": "Paris", "days": 1}}; {"name": "get_time", ' \
           '"parameters": {"tz": "UTC"}}'
    content, calls = plan().parse(text, "llama3")
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"tz": "UTC"}
    assert plan().parse("Hello {there}", "llama3") == ("Hello {there}", [])


def test_streamed_content_is_held_back_where_a_call_may_start():
    stream = ToolCallStream(plan(), "hermes")
    pieces = ["Sure", ", here <tool", "_call>{\"name\": \"get_time\", ", "\"arguments\": {\"tz\": \"UTC\"}}</tool_call>"]
    text, content, calls = "", "", []
    for i, piece in enumerate(pieces):
        text += piece
        delta, new_calls = stream.feed(text, done=i == len(pieces) - 1)
        content += delta
        calls += new_calls
        if i == 1:
            assert content == "Sure, here "  # "<tool" may open a call: held back
    assert content == "Sure, here " and [c["function"]["name"] for c in calls] == ["get_time"]
    assert calls[0]["index"] == 0
    plain = ToolCallStream(plan(), "hermes")
    assert plain.feed("a <", False) == ("a ", []) and plain.feed("a < b!", True) == ("< b!", [])


def test_a_named_call_streams_its_arguments_as_written(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], tool_choice=named,
                                                 max_tokens=200, stream=True, **SAMPLED))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert len(deltas) > 3 and all(d.index == 0 and d.id is None for d in deltas[1:])  # fragments follow
    jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in deltas)),
                        WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_crowd_of_constrained_requests(tools_server):
    """20 requests at once on completions and chat, each under a grammar (regex, choice, JSON schema,
    json_object) or none, greedy or seeded, whole and streamed, clients dropping, bad grammars: each
    answered one equals itself alone; nothing is left held."""
    import random

    from tests.serve.test_concurrent_mix import check_crowd
    rng = random.Random(4)
    regex, choices = r"[0-9]{3}-[a-z]{2,4}", ["red", "green", "blue"]
    reqs = []
    for _ in range(20):
        sampling = {"temperature": 0.0} if rng.random() < 0.5 else {"temperature": 1.0, "seed": rng.randint(0, 99)}
        route = rng.choice(["/v1/completions", "/v1/chat/completions"])
        body = {"prompt": "Code:"} if route == "/v1/completions" else {"messages": USER}
        grammar = rng.choice(["regex", "choice", "schema", "json_object", "none"])
        if grammar == "regex":
            body["guided_regex"] = regex
        elif grammar == "choice":
            body["guided_choice"] = choices
        elif grammar == "schema":
            body["guided_json"] = SCHEMA
        elif grammar == "json_object" and route == "/v1/chat/completions":
            body["response_format"] = {"type": "json_object"}
        kind = "bad" if rng.random() < 0.1 else "ok"
        if kind == "bad":  # an unbalanced regex, alone
            for field in ("guided_json", "guided_choice", "response_format"):
                body.pop(field, None)
            body["guided_regex"] = "a(b"
        body.update(model="tiny", max_tokens=rng.randint(1, 60), stream=rng.random() < 0.5, **sampling)
        if kind == "ok" and body["stream"] and rng.random() < 0.25:
            kind = "drop"
        reqs.append({"route": route, "body": body, "kind": kind})
    assert {r["kind"] for r in reqs} == {"ok", "bad", "drop"}
    check_crowd(tools_server, reqs, "guided_regex")
