"""Fuzz the server with schemathesis and hypothesis: none of it may get a 5xx, and the
server still serves afterwards.

- every operation of the OpenAPI schema, valid and invalid bodies (shapes), with some of
  each body's strings swapped for hostile text: lone surrogates (valid JSON as "\\udcff"),
  NULs, RTL and other format marks, unassigned and private-use code points, huge strings;
- well-formed completions and chats (echoed, streamed) whose every text field is hostile:
  a 200 that gives the text back, or a 400 naming the field, on a connection kept alive.
"""
import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings, strategies as st
from schemathesis.checks import not_a_server_error

from tests.serve.server import wait_until

EXAMPLES = 25  # per operation and mode: the schemathesis run stays around a minute on 2 CPU cores
HOSTILE_EXAMPLES = 40  # well-formed requests with hostile text: ~10 s on 2 CPU cores

PIECES = ["\udcff", "\ud800", "\udfff", "\ude00\ud83d", "\x00", "\u202e", "\u200f", "\u2066", "\ufeff", "\ufffe",
          "\uffff", "\U0010ffff", "\U000e0001", "\U0001f600", "e\u0301\u0301\u0301", "\r\n", "\x1b[2J", "<|im_end|>",
          "a", " ", "hello"]
# surrogates, controls, format marks (RTL), private use, unassigned, combining marks
ODD_CHARACTERS = st.characters(codec=None, categories=["Cs", "Cc", "Cf", "Co", "Cn", "Mn"])
HOSTILE_TEXT = st.one_of(
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=8).map("".join),
    st.text(ODD_CHARACTERS, min_size=1, max_size=16),
    st.sampled_from(PIECES).map(lambda piece: piece * (8192 // len(piece))),  # huge: ~8k characters
)


def with_hostile_text(value):
    """A strategy: the JSON `value` as it is, or with some of its strings hostile."""
    if isinstance(value, str):
        return st.one_of(st.just(value), HOSTILE_TEXT)
    if isinstance(value, list):
        return st.tuples(*(with_hostile_text(v) for v in value)).map(list)
    if isinstance(value, dict):
        keys = list(value)
        return st.tuples(*(with_hostile_text(value[k]) for k in keys)).map(lambda vs: dict(zip(keys, vs)))
    return st.just(value)


@pytest.fixture(scope="module")
def api_schema(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")

    def flatmap_body(ctx, body):
        return with_hostile_text(body)

    schema.hooks.hook(flatmap_body)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, server):
    case.call_and_validate(base_url=server.url, checks=[not_a_server_error], timeout=60)


TEXT = st.one_of(HOSTILE_TEXT, st.just("plain words"))
COMPLETION = st.fixed_dictionaries(
    {"prompt": st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=3))},
    optional={"stop": st.lists(TEXT, max_size=2), "model": st.one_of(st.just("tiny"), TEXT),
              "user": TEXT, "echo": st.booleans(), "stream": st.booleans()})
PART = st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                 "content": st.one_of(TEXT, st.lists(PART, min_size=1, max_size=2))},
                                optional={"name": TEXT})
CHAT = st.fixed_dictionaries({"messages": st.lists(MESSAGE, min_size=1, max_size=3)},
                             optional={"stop": TEXT, "stream": st.booleans()})


@pytest.fixture(scope="module")
def keep_alive(server):
    with httpx.Client(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=1)) as c:
        yield c


@given(request=st.one_of(st.tuples(st.just("/v1/completions"), COMPLETION),
                         st.tuples(st.just("/v1/chat/completions"), CHAT)))
@settings(max_examples=HOSTILE_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_hostile_text_is_served_or_refused_by_name(request, keep_alive):
    path, body = request
    body = dict(body, max_tokens=2, temperature=0)
    content = json.dumps(body).encode()  # ASCII: a lone surrogate goes as its \\u escape, as a client sends it
    r = keep_alive.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    if _has_lone_surrogate(body):
        error = r.json()["error"]
        assert r.status_code == 400 and "surrogate" in error["message"] and error["param"], error
        return
    if r.status_code != 200:  # too long, an unknown model: OpenAI's shape, naming the field
        error = r.json()["error"]
        assert r.status_code in (400, 404) and error["param"], error
        return
    if body.get("stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all("error" not in c for c in chunks), chunks
    else:
        chunks = [r.json()]
    if path == "/v1/completions" and body.get("echo"):  # the text came back whole
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        first = [c["choices"][0]["text"] for c in chunks if c["choices"]]
        if body.get("stream"):
            assert first[:len(prompts)] == prompts
        else:
            assert all(ch["text"].startswith(prompts[ch["index"]]) for ch in chunks[0]["choices"])


def _has_lone_surrogate(body) -> bool:
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


def test_still_serves_after_fuzzing(server):
    wait_until(lambda: server.metrics()["trtllm_num_requests_running"] == 0, 120, what="fuzz requests done")
    r = server.post("/v1/completions", json={"prompt": "still here", "max_tokens": 4}, timeout=30)
    assert r.status_code == 200
