"""Bad input, sent raw with httpx: each gets its 4xx in OpenAI's error shape, with a
message naming the problem, before any work is done; the server still serves after."""
import http.client
import json

import httpx
import pytest

from trtllm.serve.protocol import MAX_PROMPTS

OK = {"model": "tiny", "prompt": "Hello", "max_tokens": 4}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
JSON = {"content-type": "application/json"}


def completion(**changes):
    return ("/v1/completions", {**OK, **changes})


def chat(**changes):
    return ("/v1/chat/completions", {**CHAT, **changes})


# (case, path, JSON body or raw bytes, headers, status, words the message must contain)
CASES = [
    ("malformed JSON", "/v1/completions", b'{"prompt": "x",', JSON, 400, ["JSON"]),
    ("body is a list", "/v1/completions", b"[1, 2]", JSON, 400, ["JSON object"]),
    ("body is a string", "/v1/completions", b'"hello"', JSON, 400, ["JSON object"]),
    ("body is null", "/v1/chat/completions", b"null", JSON, 400, ["JSON object"]),
    ("empty body", "/v1/completions", b"", JSON, 400, ["JSON object"]),
    ("not UTF-8", "/v1/completions", b'{"prompt": "\xff\xfe"}', JSON, 400, []),
    ("deep nesting", "/v1/completions", b"[" * 100000 + b"]" * 100000, JSON, 400, []),
    ("text/plain", "/v1/completions", b'{"prompt": "x"}', {"content-type": "text/plain"}, 415, ["application/json"]),
    ("no content type", "/v1/completions", b'{"prompt": "x"}', {}, 415, ["application/json"]),
    ("form", "/v1/chat/completions", b"a=b", {"content-type": "application/x-www-form-urlencoded"}, 415,
     ["application/json"]),
    ("unknown model", *completion(model="gpt-4"), None, 404, ["gpt-4"]),
    ("unknown model, chat", *chat(model="nope"), None, 404, ["nope"]),
    ("empty prompt", *completion(prompt=""), None, 400, ["empty"]),
    ("empty token list", *completion(prompt=[]), None, 400, ["empty"]),
    ("empty prompt in a list", *completion(prompt=["a", ""]), None, 400, ["empty"]),
    ("too many prompts", *completion(prompt=["a"] * (MAX_PROMPTS + 1)), None, 400, ["prompts"]),
    ("token id past the vocabulary", *completion(prompt=[1, 2, 512]), None, 400, ["512", "vocabulary"]),
    ("one bad prompt in a batch", *completion(prompt=[[1, 2], [3, 600]]), None, 400, ["600"]),
    ("negative token id", *completion(prompt=[-1, 5]), None, 400, ["-1", "vocabulary"]),
    ("huge token id", *completion(prompt=[10**30]), None, 400, []),
    ("prompt too long", *completion(prompt=list(range(1, 70))), None, 400, ["max_input_len"]),
    ("prompt + max_tokens over the context", *completion(prompt=list(range(1, 20)), max_tokens=50), None, 400,
     ["max_tokens", "max_seq_len"]),
    ("chat over the context", *chat(max_tokens=64), None, 400, ["max_seq_len"]),
    ("max_tokens 0", *completion(max_tokens=0), None, 400, ["max_tokens"]),
    ("max_tokens negative", *completion(max_tokens=-3), None, 400, ["max_tokens"]),
    ("max_tokens a string", *completion(max_tokens="lots"), None, 400, ["max_tokens"]),
    ("temperature negative", *completion(temperature=-0.5), None, 400, ["temperature"]),
    ("top_p 0", *completion(top_p=0), None, 400, ["top_p"]),
    ("top_p above 1", *completion(top_p=1.5), None, 400, ["top_p"]),
    ("top_k below -1", *completion(top_k=-2), None, 400, ["top_k"]),
    ("min_p above 1", *completion(min_p=2), None, 400, ["min_p"]),
    ("presence_penalty 3", *completion(presence_penalty=3), None, 400, ["presence_penalty"]),
    ("frequency_penalty -3", *completion(frequency_penalty=-3), None, 400, ["frequency_penalty"]),
    ("repetition_penalty 0", *completion(repetition_penalty=0), None, 400, ["repetition_penalty"]),
    ("seed negative", *completion(seed=-1), None, 400, ["seed"]),
    ("seed 2**64", *completion(seed=2**64), None, 400, ["seed"]),
    ("min_tokens over max_tokens", *completion(min_tokens=9, max_tokens=4), None, 400, ["min_tokens"]),
    ("temperature NaN", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', JSON, 400, ["temperature"]),
    ("top_p Infinity", "/v1/completions", b'{"prompt": "x", "top_p": Infinity}', JSON, 400, ["top_p"]),
    ("penalty -Infinity", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "x"}], "presence_penalty": -Infinity}', JSON, 400,
     ["presence_penalty"]),
    ("temperature 1e999", "/v1/completions", b'{"prompt": "x", "temperature": 1e999}', JSON, 400, ["temperature"]),
    ("n 0", *completion(n=0), None, 400, ["n"]),
    ("n 17", *completion(n=17), None, 400, ["n"]),
    ("prompts x n", *completion(prompt=["a"] * 8, n=16), None, 400, ["n"]),
    ("logprobs 21", *completion(logprobs=21), None, 400, ["logprobs"]),
    ("top_logprobs 21", *chat(logprobs=True, top_logprobs=21), None, 400, ["top_logprobs"]),
    ("top_logprobs without logprobs", *chat(top_logprobs=2), None, 400, ["logprobs"]),
    ("17 stop strings", *completion(stop=[f"s{i}" for i in range(17)]), None, 400, ["stop"]),
    ("empty stop string", *completion(stop=[""]), None, 400, ["stop"]),
    ("stop string too long", *completion(stop=["x" * 300]), None, 400, ["stop"]),
    ("too many stop_token_ids", *completion(stop_token_ids=list(range(100))), None, 400, ["stop_token_ids"]),
    # with beam search and min_tokens, an id past the vocabulary was an IndexError in the engine step
    # (a 500) and a negative one masked another token; without them, ids that can never stop anything
    ("stop_token_ids past the vocabulary", *completion(stop_token_ids=[100000], min_tokens=2, use_beam_search=True,
                                                       n=2, temperature=0.0), None, 400, ["stop_token_ids", "100000"]),
    ("stop_token_ids negative", *completion(stop_token_ids=[3, -5]), None, 400, ["stop_token_ids", "-5"]),
    ("max_tokens 0 without echo", *completion(max_tokens=0), None, 400, ["max_tokens", "echo"]),
    ("max_tokens 0 in a chat", *chat(max_tokens=0), None, 400, ["max_tokens"]),
    ("echo with logprobs and beam search", *completion(echo=True, logprobs=1, use_beam_search=True, best_of=2,
                                                       temperature=0.0), None, 400, ["beam"]),
    ("best_of below n", *completion(best_of=1, n=2), None, 400, ["best_of"]),
    ("beam search with presence_penalty", *completion(use_beam_search=True, best_of=2, temperature=0.0,
                                                      presence_penalty=1.0), None, 400, ["presence_penalty"]),
    ("beam search with guided_regex", *completion(use_beam_search=True, best_of=2, temperature=0.0,
                                                  guided_regex="[a-z]+"), None, 400, ["guided_regex"]),
    ("beam search with response_format", *chat(use_beam_search=True, n=2, temperature=0.0,
                                               response_format={"type": "json_object"}), None, 400, ["response_format"]),
    ("beam search with temperature", *completion(use_beam_search=True, best_of=2, temperature=0.5), None, 400,
     ["temperature"]),
    ("logit_bias token outside the vocabulary", *completion(logit_bias={"100000": 10}), None, 400, ["logit_bias"]),
    ("logit_bias key not a token id", *completion(logit_bias={"abc": 10}), None, 400, ["logit_bias"]),
    # str.isdigit() holds for these, but int() refuses "²" (a 500) and reads "٣" as token 3
    ("logit_bias key a superscript digit", *completion(logit_bias={"²": 10}), None, 400, ["logit_bias", "²"]),
    ("logit_bias key a non-ASCII digit", *completion(logit_bias={"٣": 10}), None, 400, ["logit_bias", "٣"]),
    ("logit_bias over 100", *completion(logit_bias={"5": 101}), None, 400, ["logit_bias", "100"]),
    ("logit_bias with beam search", *completion(logit_bias={"5": 1}, use_beam_search=True, best_of=2,
                                                temperature=0.0), None, 400, ["logit_bias", "beam"]),
    ("suffix", *completion(suffix="end"), None, 400, ["suffix"]),
    # vLLM's extensions that change the output were ignored: the answer was not the one asked for
    ("vLLM's allowed_token_ids", *completion(allowed_token_ids=[5, 6]), None, 400, ["allowed_token_ids"]),
    ("vLLM's bad_words", *chat(bad_words=["the"]), None, 400, ["bad_words"]),
    ("vLLM's truncate_prompt_tokens", *completion(truncate_prompt_tokens=2), None, 400, ["truncate_prompt_tokens"]),
    ("vLLM's continue_final_message", *chat(continue_final_message=True), None, 400, ["continue_final_message"]),
    ("echo on chat", *chat(echo=True), None, 400, ["echo"]),
    ("stream_options without stream", *completion(stream_options={"include_usage": True}), None, 400,
     ["stream_options"]),
    ("prompt a number", *completion(prompt=123), None, 400, ["prompt"]),
    ("bad prompt, streaming", *completion(prompt="", stream=True), None, 400, ["empty"]),
    ("bad sampling value, streaming", *chat(temperature=-1, stream=True), None, 400, ["temperature"]),
    ("no messages", *chat(messages=[]), None, 400, ["messages"]),
    ("messages not a list", *chat(messages="hi"), None, 400, ["messages"]),
    # a field that must be an object: named (was "the request body must be a JSON object")
    ("a message that is a string", *chat(messages=["hi"]), None, 400, ["messages.0", "object"]),
    ("a message that is null", *chat(messages=[None]), None, 400, ["messages.0"]),
    ("stream_options a string", *completion(stream=True, stream_options="yes"), None, 400, ["stream_options"]),
    ("unknown role", *chat(messages=[{"role": "wizard", "content": "x"}]), None, 400, ["role"]),
    ("image content", *chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     None, 400, ["text"]),
    # JSON text nested past Python's stack (the body itself parses: it is one string): was a 500
    ("tool call arguments nested too deeply", *chat(messages=[
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "f", "arguments": '{"a":' * 5000 + "1" + "}" * 5000}}]},
        {"role": "user", "content": "x"}]), None, 400, ["arguments", "deep"]),
    ("chat template from the request", *chat(chat_template="{{ 'pwned' }}"), None, 400, ["chat template"]),
    ("chat_template_kwargs", *chat(chat_template_kwargs={"x": 1}), None, 400, ["chat_template_kwargs"]),
    ("tools", *chat(tools=[{"type": "function", "function": {"name": "f"}}]), None, 400, ["tools"]),
    ("unknown response_format", *chat(response_format={"type": "xml"}), None, 400, ["response_format"]),
    ("bad guided_regex", *completion(guided_regex="a(b"), None, 400, ["guided_regex", "parenthesis"]),
    ("logits processors", *completion(logits_processors=["f"]), None, 400, ["logits processors"]),
    ("max_tokens and max_completion_tokens disagree", *chat(max_tokens=3, max_completion_tokens=4), None, 400,
     ["max_tokens"]),
    # a lone surrogate is valid JSON ("\udcff") but no text: 400 naming the field (was a plain-text 500)
    ("lone surrogate in the prompt", "/v1/completions", b'{"prompt": "hi \\udcff"}', JSON, 400,
     ["prompt", "surrogate"]),
    ("lone surrogate in a batched prompt", "/v1/completions", b'{"prompt": ["ok", "hi \\ud800"]}', JSON, 400,
     ["prompt[1]", "surrogate"]),
    ("lone surrogate, streaming", "/v1/completions", b'{"prompt": "\\udcff", "stream": true}', JSON, 400,
     ["prompt", "surrogate"]),
    ("reversed surrogate pair", "/v1/completions", b'{"prompt": "\\ude00\\ud83d"}', JSON, 400, ["surrogate"]),
    ("lone surrogate in a stop string", "/v1/completions", b'{"prompt": "x", "stop": ["a", "\\udcff"]}', JSON, 400,
     ["stop[1]", "surrogate"]),
    ("lone surrogate in the model name", "/v1/completions", b'{"prompt": "x", "model": "\\udcff"}', JSON, 400,
     ["model", "surrogate"]),
    ("lone surrogate in chat content", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi \\udcff"}]}', JSON, 400, ["messages[0].content", "surrogate"]),
    ("lone surrogate in a chat content part", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udcff"}]}], "stream": true}', JSON,
     400, ["messages[0].content[0].text", "surrogate"]),
    ("lone surrogate in a message name", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "x", "name": "\\udcff"}]}', JSON, 400, ["messages[0].name"]),
    ("unknown route", "/v1/embeddings", OK, None, 404, ["/v1/embeddings"]),
    ("wrong method", "/v1/completions", None, None, 405, []),
    ("body over the limit", "/v1/completions", b'{"prompt": "' + b"a" * (5 << 20) + b'"}', JSON, 413, ["bytes"]),
]


def send(server, path, body, headers):
    if body is None and path == "/v1/completions":
        return httpx.get(server.url + path, timeout=60)
    if isinstance(body, bytes):
        return httpx.post(server.url + path, content=body, headers=headers, timeout=60)
    return httpx.post(server.url + path, json=body, timeout=60)


def test_every_bad_input_gets_its_4xx(server):
    before = server.metrics()
    failures = []
    for case, path, body, headers, status, words in CASES:
        r = send(server, path, body, headers)
        try:
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, error
            assert r.status_code == status, (r.status_code, error)
            assert error["type"] != "server_error", error  # a 4xx is the client's error (405 said server_error)
            missing = [w for w in words if w.lower() not in error["message"].lower()
                       and w != error.get("param")]
            assert not missing, (missing, error)
        except Exception as e:  # collect all, report together
            failures.append(f"{case}: {e!r} ({r.status_code} {r.text[:300]})")
    assert not failures, "\n".join(failures)
    after = server.metrics()
    # nothing reached the engine: no prompt tokens admitted, no sequence scheduled
    assert after["trtllm_prompt_tokens_total"] == before["trtllm_prompt_tokens_total"]
    assert after["trtllm_kv_cache_blocks_used"] == 0
    r = server.post("/v1/completions", json=OK)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_a_chat_whose_prompt_fills_the_context_is_refused_for_its_prompt(server, model_dir):
    # without max_tokens a chat gets the rest of the context: a prompt that leaves none was refused naming
    # max_tokens (1), which the client never sent
    from transformers import AutoTokenizer

    from tests.serve.server import BUILD
    tok = AutoTokenizer.from_pretrained(model_dir)
    def prompt_len(k):  # the server renders the template, then tokenizes the text without special tokens added
        text = tok.apply_chat_template([{"role": "user", "content": "x" * k}], add_generation_prompt=True,
                                       tokenize=False)
        return len(tok.encode(text, add_special_tokens=False))
    k = next(k for k in range(1, BUILD["max_seq_len"]) if prompt_len(k) == BUILD["max_seq_len"])
    r = server.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * k}]})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "messages", error
    assert "no room" in error["message"] and "max_seq_len" in error["message"], error
    r = server.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * k}], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # one the client sent: named
    r = server.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * (k - 1)}]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


def test_unknown_fields_are_ignored(server):
    r = server.post("/v1/completions", json={**OK, "metadata": {"a": 1}, "store": False, "some_new_field": 3})
    assert r.status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_model_may_be_omitted(server, path):
    body = dict(OK if path == "/v1/completions" else CHAT)
    del body["model"]
    assert server.post(path, json=body).status_code == 200


def test_lone_surrogate_keeps_the_connection_and_logs_nothing(server):
    """A 400 like any other: the keep-alive connection stays open (a 500 closed it, and the
    openai client retried), and no traceback reaches the log."""
    log_before = len(server.log())
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    sockets = []
    try:
        for path, body in [("/v1/completions", b'{"prompt": "hi \\udcff", "max_tokens": 2}'),
                           ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udcff"}]}'),
                           ("/v1/completions", b'{"prompt": "fine", "max_tokens": 2}')]:
            conn.request("POST", path, body=body, headers=JSON)
            r = conn.getresponse()
            answer = json.loads(r.read())
            assert r.status == (200 if b"fine" in body else 400), answer
            assert r.status == 200 or "surrogate" in answer["error"]["message"]
            assert not r.will_close, r.getheaders()
            sockets.append(conn.sock)
        assert sockets[0] is not None and all(s is sockets[0] for s in sockets)  # one connection served all
    finally:
        conn.close()
    new_log = server.log()[log_before:]
    assert "Traceback" not in new_log and "Exception" not in new_log, new_log


def test_odd_but_valid_text_comes_back_whole(server):
    """NULs, RTL marks, astral code points and escaped surrogate pairs are text: served, and
    echoed back as sent (plain and streamed)."""
    text = "a\u0000b \u202eevil\u202c \u200f\U0010ffff \U0001f600 e\u0301 \ufeff"
    raw = json.dumps({"prompt": text, "max_tokens": 2, "echo": True, "temperature": 0}).encode()  # \ud83d\ude00
    assert b"\\ud83d\\ude00" in raw
    r = httpx.post(server.url + "/v1/completions", content=raw, headers=JSON, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].startswith(text)
    streamed = json.dumps({"prompt": text, "max_tokens": 2, "echo": True, "stream": True}).encode()
    r = httpx.post(server.url + "/v1/completions", content=streamed, headers=JSON, timeout=60)
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["text"] == text


@pytest.mark.parametrize("fields, param", [(dict(n=8), "n"), (dict(best_of=8), "best_of"), (dict(n=2, best_of=6), "best_of")])
def test_a_beam_search_past_max_beam_width_names_its_field(server, fields, param):
    """The beam width is best_of (or n): the error names that field (it said param "prompt")."""
    r = server.post("/v1/completions", json={**OK, "use_beam_search": True, "temperature": 0.0, **fields})
    error = r.json()["error"]
    assert r.status_code == 400 and "max_beam_width" in error["message"] and error["param"] == param, error


def test_nesting_the_json_parser_takes_is_served_or_refused(server):
    """Python's JSON decoder takes a body nested ~960 deep, with little stack left over: the
    checks that walk the body (lone surrogates) ran out of it, a 500. Every depth is a 200 or
    a 400 in OpenAI's shape."""
    for depth in range(900, 1000, 4):
        for key, value in (("some_unknown_field", b"[" * depth + b"]" * depth),
                           ("guided_json", b'{"a":' * depth + b"1" + b"}" * depth)):
            body = b'{"prompt": "x", "max_tokens": 1, "' + key.encode() + b'": ' + value + b"}"
            r = httpx.post(server.url + "/v1/completions", content=body, headers=JSON, timeout=60)
            assert r.status_code in (200, 400), (depth, key, r.status_code, r.text[:300])
            assert r.status_code == 200 or set(r.json()["error"]) == {"message", "type", "param", "code"}
