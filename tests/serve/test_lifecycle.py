"""Servers of their own: the API key guards every route but /health (and never shows in
the logs), --max-concurrent-requests answers 429 at once, SIGTERM stops the server within
its grace period, in-flight requests finished or aborted, exit code 0; a dead engine
process is logged, shown on /health, and makes the exit code 1."""
import json
import socket
import threading
import time

import httpx
import openai
import pytest

from tests.serve.server import Server, wait_until

KEY = "sk-test-0123456789-secret"
ROUTES = [("GET", "/v1/models"), ("GET", "/v1/models/tiny"), ("POST", "/v1/completions"),
          ("POST", "/v1/chat/completions"), ("GET", "/metrics"), ("GET", "/version"), ("GET", "/docs"),
          ("GET", "/openapi.json"), ("GET", "/no/such/route"), ("DELETE", "/v1/models")]
BODIES = {"/v1/completions": {"prompt": "hi", "max_tokens": 2},
          "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}


@pytest.fixture(scope="module")
def guarded(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("guarded") / "server.log"
    with Server(model_dir, "--api-key", KEY, "--max-concurrent-requests", "2", log_path=log) as s:
        yield s
    assert s.proc.returncode == 0, s.log()
    assert KEY not in s.log()


def call(server, method, path, key=None):
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.request(method, server.url + path, json=BODIES.get(path, {}), headers=headers, timeout=60)


def test_api_key_guards_every_route_but_health(guarded):
    for method, path in ROUTES:
        for key in (None, "wrong", KEY[:-1], KEY + "x", KEY.upper()):
            r = call(guarded, method, path, key)
            assert r.status_code == 401, (method, path, key, r.status_code)
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert KEY not in r.text
        assert call(guarded, method, path, KEY).status_code != 401, (method, path)
    assert httpx.get(guarded.url + "/health", timeout=10).status_code == 200
    # a key in another header or scheme is not the key
    for header in (KEY, f"Basic {KEY}", f"Bearer{KEY}", f"bearer {KEY.upper()}"):
        r = httpx.get(guarded.url + "/v1/models", headers={"authorization": header, "x-api-key": KEY}, timeout=10)
        assert r.status_code == 401, header
    # the scheme is case-insensitive (RFC 9110), as TensorRT-LLM's and vLLM's clients may send it
    for scheme in ("bearer", "BEARER", "BeArEr"):
        r = httpx.get(guarded.url + "/v1/models", headers={"authorization": f"{scheme} {KEY}"}, timeout=10)
        assert r.status_code == 200, scheme
    with openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0) as client:
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=3).usage.completion_tokens >= 1
    with openai.OpenAI(base_url=guarded.url + "/v1", api_key="nope", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def _stalled_stream(server, key=KEY) -> socket.socket:
    """A streaming request whose client never reads: far more output than socket buffers hold."""
    body = json.dumps(dict(prompt=[3, 4, 5], max_tokens=50, n=16, logprobs=20, temperature=1.0, ignore_eos=True,
                           stream=True)).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's writes block
    sock.settimeout(30)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def _in_flight(server) -> float:
    return server.metrics(headers={"authorization": f"Bearer {KEY}"})["trtllm_requests_in_flight"]


def test_beyond_max_concurrent_requests_429_fast(guarded):
    socks = [_stalled_stream(guarded) for _ in range(2)]
    try:
        wait_until(lambda: _in_flight(guarded) == 2, 30, what="two requests in flight")
        for _ in range(5):
            t = time.monotonic()
            r = call(guarded, "POST", "/v1/completions", KEY)
            assert r.status_code == 429 and time.monotonic() - t < 10  # refused at the door, not queued
            assert r.json()["error"]["type"] == "rate_limit_error"
        assert call(guarded, "GET", "/v1/models", KEY).status_code == 200  # only generation is limited
    finally:
        for s in socks:
            s.close()
    wait_until(lambda: _in_flight(guarded) == 0, 30, what="the stalled requests gone")
    assert call(guarded, "POST", "/v1/completions", KEY).status_code == 200
    m = guarded.metrics(headers={"authorization": f"Bearer {KEY}"})
    assert m['trtllm_requests_total{endpoint="completions",outcome="rejected"}'] == 5
    assert m["trtllm_kv_cache_blocks_used"] == 0


def test_sigterm_finishes_or_aborts_in_flight_and_exits_0(model_dir, tmp_path):
    # a grace period far shorter than the work in flight: 4 x 16 sequences of 55 tokens, 8 at a time
    server = Server(model_dir, "--shutdown-timeout", "0.5", log_path=tmp_path / "server.log").start()
    try:
        stalled = [_stalled_stream(server, key="x") for _ in range(2)]
        done = {}

        def reader(i):  # well-behaved streaming clients, mid-stream at SIGTERM
            try:
                with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                                  json=dict(prompt=[9, i], max_tokens=55, n=16, ignore_eos=True, stream=True)) as r:
                    done[i] = [line for line in r.iter_lines() if line.startswith("data: ")]
            except httpx.HTTPError as e:
                done[i] = e

        threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(2)]
        for t in threads:
            t.start()
        wait_until(lambda: server.metrics()["trtllm_requests_in_flight"] == 4, 30, what="4 requests in flight")
        t = time.monotonic()
        code = server.stop(timeout=60)
        elapsed = time.monotonic() - t
        for sock in stalled:
            sock.close()
        for thread in threads:
            thread.join(30)
            assert not thread.is_alive()
        assert code == 0, server.log()
        assert elapsed < 0.5 + 30, elapsed  # the grace period, aborts, engine shutdown (slack for CI load)
        reasons = []
        for events in done.values():
            assert not isinstance(events, Exception), events
            assert events[-1] == "data: [DONE]"
            reasons += [c["finish_reason"] for e in events[:-1] for c in json.loads(e[6:])["choices"]
                        if c["finish_reason"]]
        assert len(reasons) == 32 and "abort" in reasons, reasons  # every choice ended, some aborted
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health", timeout=5)
        log = server.log()
        assert "Traceback" not in log, log
    finally:
        server.kill()


def test_engine_in_thread_serves_the_same(server, model_dir, tmp_path):
    """--engine-in-thread: the engine on a thread of the server process, same answers."""
    body = {"model": "tiny", "prompt": "hello there", "max_tokens": 12, "temperature": 0}
    expected = server.post("/v1/completions", json=body).json()["choices"][0]["text"]
    with Server(model_dir, "--engine-in-thread", log_path=tmp_path / "thread.log") as s:
        assert s.post("/v1/completions", json=body).json()["choices"][0]["text"] == expected
        with httpx.stream("POST", s.url + "/v1/completions", json=dict(body, stream=True), timeout=60) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
        assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events) == expected
        assert s.stop() == 0, s.log()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def test_a_dead_engine_process_fails_requests_not_the_server(model_dir, tmp_path):
    import os
    import signal
    with Server(model_dir, log_path=tmp_path / "dead.log") as s:
        assert "ERROR" not in s.log()
        # the engine core is the server's multiprocessing-spawned child (not its resource tracker)
        cores = [c for c in _children(s.proc.pid) if b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read()]
        assert cores, "no engine process under the server"
        for c in cores:
            os.kill(c, signal.SIGKILL)
        wait_until(lambda: s.get("/health").status_code == 503, 30, what="/health to say 503")
        assert s.get("/health").json() == {"status": "unavailable",
                                           "reason": "the engine process was killed by SIGKILL"}
        t = time.monotonic()
        r = s.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 4}, timeout=30)
        assert r.status_code == 503 and "killed by SIGKILL" in r.json()["error"]["message"]
        assert time.monotonic() - t < 10
        assert s.get("/v1/models").status_code == 200  # the rest of the server still answers
        # logged when it happened, at ERROR, with the signal
        assert "ERROR trtllm: the engine process was killed by SIGKILL" in s.log(), s.log()
        assert s.stop() == 1, s.log()  # a later SIGTERM: the exit code says the server had failed
        assert "ERROR trtllm.serve: trtllm-serve stopped; the engine had failed" in s.log()
