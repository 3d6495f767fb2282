"""/v1/responses through the official `openai` client: the Response object and its stream events
carry the text the same chat gives on /v1/chat/completions (instructions as the system message,
message items with input_text / output_text parts), the length limit reads as "incomplete";
function tools give the chat's calls as function_call items (whole and streamed) and a tool
conversation continues as the chat's does; what a stateless server cannot do is refused by name."""
import json

import httpx
import jsonschema
import openai
import pytest

from tests.serve.test_structured import TIME, WEATHER, tools_server  # noqa: F401  (a template that renders tools)

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0) as c:
        yield c


def chat_text(client, messages, n):
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=n, **GREEDY)
    return out.choices[0].message.content, out.choices[0].finish_reason, out.usage


def test_response_equals_the_chat_it_means(client):
    r = client.responses.create(model="tiny", input="Hi there", instructions="Be brief.", max_output_tokens=6,
                                **GREEDY)
    text, reason, usage = chat_text(client, [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Hi there"}], 6)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "tiny"
    assert r.output_text == text and r.output[0].role == "assistant" and r.output[0].id.startswith("msg_")
    assert r.status == ("incomplete" if reason == "length" else "completed")
    if reason == "length":
        assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens == usage.prompt_tokens and r.usage.output_tokens == usage.completion_tokens
    assert r.usage.total_tokens == usage.total_tokens
    assert r.instructions == "Be brief." and r.store is False and r.max_output_tokens == 6
    tagged = client.responses.create(model="tiny", input="Hi", max_output_tokens=2, metadata={"run": "7"}, **GREEDY)
    assert tagged.metadata == {"run": "7"}


def test_sampling_extensions_pass_through(client):
    """seed (and the chat's other extensions) reach the sampler: two seeded sampled responses agree."""
    kw = dict(model="tiny", input="Tell me", max_output_tokens=8, temperature=1.0,
              extra_body={"seed": 11, "ignore_eos": True})
    a, b = client.responses.create(**kw), client.responses.create(**kw)
    assert a.output_text == b.output_text and a.usage.output_tokens == 8
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell me"}], max_tokens=8,
                                          temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    assert a.output_text == chat.choices[0].message.content


def test_message_items_with_parts(client):
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi."}]},
             {"role": "user", "content": "And again?"}]
    r = client.responses.create(model="tiny", input=items, max_output_tokens=5, **GREEDY)
    text, _, _ = chat_text(client, [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."},
                                    {"role": "user", "content": "And again?"}], 5)
    assert r.output_text == text


def test_streamed_events(client):
    whole = client.responses.create(model="tiny", input="Tell me a story", max_output_tokens=8, **GREEDY)
    events = list(client.responses.create(model="tiny", input="Tell me a story", max_output_tokens=8, stream=True,
                                          **GREEDY))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] == f"response.{whole.status}"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


@pytest.mark.parametrize("body, words", [
    ({"previous_response_id": "resp_1"}, ["previous_response_id", "stateless"]),
    ({"conversation": "conv_1"}, ["conversation"]),
    ({"tools": [{"type": "web_search"}]}, ["tools[0]", "web_search"]),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, ["chat template does not render tools"]),
    ({"background": True}, ["background"]),
    # accepted and ignored before: the request got other than it asked, without a word
    ({"max_tool_calls": 1}, ["max_tool_calls"]),
    ({"truncation": "auto"}, ["truncation 'auto'", "refused, not cut"]),
    ({"top_logprobs": 2}, ["top_logprobs", "/v1/chat/completions"]),
    ({"top_logprobs": False}, ["top_logprobs"]),
    ({"reasoning": {"effort": "low"}}, ["reasoning"]),
    ({"input": [{"type": "reasoning", "summary": []}]}, ["reasoning"]),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, ["input_file"]),
    ({"max_output_tokens": 0}, ["max_output_tokens"]),
    ({"text": {"format": {"type": "yaml"}}}, ["response_format"]),
    ({"temperature": -1}, ["temperature"]),
    ({"text": {"format": "json"}}, ["text.format"]),
    ({"input": []}, ["input is empty"]),
    ({"input": [{"role": "user"}]}, ["input[0]", "needs its content"]),
    ({"input": [{"role": "user", "content": 5}]}, ["input, as chat messages.0"]),
])
def test_refused_by_name(server, body, words):
    r = httpx.post(server.url + "/v1/responses", json={"model": "tiny", "input": "Hi", **body}, timeout=30)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert all(w in message for w in words), message
    if "input" in body:
        assert r.json()["error"]["param"] == "input", r.json()


def test_the_server_still_serves_after_refusals(client):
    r = client.responses.create(model="tiny", input="Hi", max_output_tokens=2, truncation="disabled", top_logprobs=0,
                                **GREEDY)
    assert r.usage.output_tokens >= 1 and json.loads(r.model_dump_json())["status"] in ("completed", "incomplete")


def _function(tool: dict) -> dict:
    """The chat's tool object as a Responses function tool."""
    return {"type": "function", **tool["function"]}


@pytest.fixture(scope="module")
def tools_client(tools_server):  # noqa: F811
    with openai.OpenAI(base_url=tools_server.url + "/v1", api_key="unused", timeout=120, max_retries=0) as c:
        yield c


def test_function_tools_calls_and_a_tool_conversation(tools_client):
    tools, named = [_function(WEATHER), _function(TIME)], {"type": "function", "name": "get_weather"}
    r = tools_client.responses.create(model="tiny", input="Hi", tools=tools, tool_choice=named,
                                      max_output_tokens=200, **GREEDY)
    calls = [o for o in r.output if o.type == "function_call"]
    assert [c.name for c in calls] == ["get_weather"] and r.status == "completed"
    assert calls[0].call_id.startswith("call_") and calls[0].id.startswith("fc_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["function"]["parameters"])
    chat = tools_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                tools=[WEATHER, TIME], max_tokens=200, **GREEDY,
                                                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(calls[0].arguments) == json.loads(chat.choices[0].message.tool_calls[0].function.arguments)

    events = list(tools_client.responses.create(model="tiny", input="Hi", tools=tools, tool_choice=named,
                                                max_output_tokens=200, stream=True, **GREEDY))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [json.loads(e.arguments) for e in done] == [json.loads(calls[0].arguments)]
    assert not any(e.type == "response.output_text.delta" for e in events)  # only a call: no message item
    assert [o.type for o in events[-1].response.output] == ["function_call"]

    history = [{"role": "user", "content": "Hi"},
               {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
                "arguments": calls[0].arguments},
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}]
    follow = tools_client.responses.create(model="tiny", input=history, tools=tools, tool_choice="none",
                                           max_output_tokens=6, **GREEDY)
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": calls[0].call_id, "type": "function",
                     "function": {"name": "get_weather", "arguments": calls[0].arguments}}]},
                {"role": "tool", "tool_call_id": calls[0].call_id, "content": "sunny"}]
    same = tools_client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME],
                                                tool_choice="none", max_tokens=6, **GREEDY)
    assert follow.output_text == same.choices[0].message.content
