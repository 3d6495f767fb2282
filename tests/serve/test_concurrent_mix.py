"""Many clients at once on the three generation routes (completions, chat, responses), whole and
streamed, with n > 1, echo + logprobs, seeded sampling, clients that drop mid-stream and bad
requests among them, on the plain server and on one with n-gram speculation: every answered
request gives what it gives alone, the bad ones get their 400, and afterwards the server holds
no request and no KV block and answers at once."""
from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from tests.serve.server import Server, wait_until
from tests.serve.test_openai import _settled

PROMPTS = ["Once upon a time", "The quick brown fox", "Hello there", "In the beginning", "A B C D E F"]


def make_request(rng: random.Random) -> dict:
    route = rng.choice(["/v1/completions", "/v1/chat/completions", "/v1/responses"])
    prompt = rng.choice(PROMPTS)
    n_tokens = rng.randint(1, 12)
    sampling = {"temperature": 0.0} if rng.random() < 0.5 else {"temperature": 0.9, "seed": rng.randint(0, 99)}
    if route == "/v1/completions":
        body = {"prompt": prompt, "max_tokens": n_tokens, **sampling}
        if rng.random() < 0.3:
            body.update(echo=True, logprobs=1)
        if rng.random() < 0.3:
            body["n"] = 2
    elif route == "/v1/chat/completions":
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": n_tokens, **sampling}
    else:
        body = {"input": prompt, "max_output_tokens": n_tokens, **sampling}
    body.update(model="tiny", ignore_eos=True, stream=rng.random() < 0.5)
    kind = "ok"
    if rng.random() < 0.1:
        body["temperature"], kind = -1.0, "bad"
    elif body["stream"] and rng.random() < 0.25:
        kind = "drop"
    return {"route": route, "body": body, "kind": kind}


def texts(route: str, body: dict, payload) -> list[str]:
    """The completions' texts of a whole response (JSON) or a stream (its SSE data lines)."""
    if not body["stream"]:
        if route == "/v1/responses":
            return [payload["output"][0]["content"][0]["text"]]
        choices = sorted(payload["choices"], key=lambda c: c["index"])
        return [c["message"]["content"] if route == "/v1/chat/completions" else c["text"] for c in choices]
    out: dict[int, str] = {}
    for event in payload:
        if route == "/v1/responses":  # the message item's text: "" from its opening, then the deltas
            if event.get("type") == "response.content_part.added":
                out[0] = ""
            elif event.get("type") == "response.output_text.delta":
                out[0] += event["delta"]
            continue
        for c in event.get("choices", []):
            piece = (c.get("delta") or {}).get("content") if route == "/v1/chat/completions" else c.get("text")
            out[c["index"]] = out.get(c["index"], "") + (piece or "")
    return [out[i] for i in sorted(out)]


async def send(client: httpx.AsyncClient, req: dict):
    """(status, payload): the JSON body, or a stream's data events; a dropping client reads one
    event and goes away (None)."""
    route, body = req["route"], req["body"]
    if not body["stream"]:
        r = await client.post(route, json=body)
        return r.status_code, r.json()
    async with client.stream("POST", route, json=body) as r:
        if r.status_code != 200:
            return r.status_code, json.loads(await r.aread())
        events = []
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append(json.loads(line[len("data: "):]))
            if req["kind"] == "drop":
                return 200, None
        return 200, events


def check_crowd(server, reqs: list[dict], bad_words: str) -> None:
    """Send `reqs` (make_request's form) at once; then: every request and KV block back, the bad
    ones a 400 naming `bad_words`, each answered one the same as itself sent alone (whole)."""
    wait_until(lambda: _settled(server), 60, what="an idle server")

    async def crowd():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(send(client, r) for r in reqs))

    results = asyncio.run(crowd())
    after = wait_until(lambda: _settled(server), 60, what="every request and block back")
    assert after["trtllm_kv_cache_blocks_free"] + after["trtllm_kv_cache_blocks_cached"] \
        == after["trtllm_kv_cache_blocks_total"]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for req, (status, payload) in zip(reqs, results):
            if req["kind"] == "bad":
                assert status == 400 and bad_words in payload["error"]["message"], payload
                continue
            assert status == 200, payload
            if req["kind"] == "drop":
                continue
            alone = client.post(req["route"], json={**req["body"], "stream": False}).json()
            assert texts(req["route"], req["body"], payload) == texts(req["route"], {"stream": False}, alone), req


@pytest.mark.parametrize("seed", [0, 1])
def test_a_crowd_of_mixed_requests(server, seed):
    rng = random.Random(seed)
    check_crowd(server, [make_request(rng) for _ in range(24)], "temperature")


@pytest.fixture(scope="module")
def ngram_server(model_dir, tmp_path_factory):
    with Server(model_dir, "--speculative", "ngram", "--max_draft_len", "3", "--max_matching_ngram_size", "2",
                log_path=tmp_path_factory.mktemp("ngram_log") / "server.log") as s:
        yield s
    assert s.proc.returncode == 0, s.log()


def test_a_crowd_on_a_speculating_server(ngram_server):
    """The same crowd with n-gram speculation: drafts verified beside prefills and sampled rows,
    requests ending inside an accepted run, clients dropping while their drafts are in flight."""
    rng = random.Random(2)
    check_crowd(ngram_server, [make_request(rng) for _ in range(24)], "temperature")
