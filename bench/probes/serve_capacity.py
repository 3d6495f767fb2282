"""How many SSE events per second the server process can write: the HTTP stack alone.

    PYTHONPATH=$PWD python bench/probes/serve_capacity.py [--requests 256] [--new 128] [--step-ms 20]

The app (`build_app` + uvicorn, as trtllm-serve runs it) in a subprocess over a stand-in
engine (`StandInEngine`: the serving calls of `EngineCoreClient`, fed from a thread the
way the client's reader feeds it: every `--step-ms` each running request gains one
token, a delta grown into its MirrorStream on the event loop). No model,
no GPU: what is measured is the server process's work per event (dispatch, JSON, SSE,
socket writes). The client is bench_serve.py's minimal one, all requests at once.

Printed: output tok/s and the ratio to the rate the stand-in produces (requests x 1000 /
step-ms while all run): below 1, the server process is the bottleneck at that rate.
Table last; $OUT/serve_capacity.{md,json}.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import threading
import time

from bench.report import report


class StandInEngine:
    """EngineCoreClient's serving calls over a token generator (no model)."""

    def __init__(self, step_ms: float, vocab: int = 1000, max_seq_len: int = 4096):
        from trtllm.runtime.engine_limits import EngineLimits
        from trtllm.runtime.engine_stats import EngineStats
        self.tokenizer = None
        self.limits = EngineLimits(1024, 8192, max_seq_len, max_seq_len)
        self.vocab_size, self.step_s = vocab, step_ms / 1e3
        self._stats = EngineStats()
        self._running: dict = {}  # request id -> [stream, params, loop, streaming, tokens so far]
        self.admitted: list[float] = []  # when each request reached the engine
        self._lock = threading.Lock()
        threading.Thread(target=self._steps, daemon=True).start()

    def validate(self, ids, params) -> None:
        from trtllm.runtime.engine_limits import validate_request
        validate_request(ids, params, self.limits, self.vocab_size, False)

    def generate_async(self, prompt, sampling_params=None, streaming=False, request_id=None):
        from trtllm.runtime.outputs import CompletionOutput, RequestOutput
        from trtllm.runtime.request_stream import MirrorStream, new_request_id
        request_id = request_id or new_request_id()
        self.admitted.append(time.perf_counter())
        loop = asyncio.get_running_loop()
        stream = MirrorStream(request_id, loop, RequestOutput(request_id, None, list(prompt), [CompletionOutput(0)]))
        with self._lock:
            self._running[request_id] = [stream, sampling_params, loop, streaming, 0]
        return stream

    def abort(self, request_id) -> None:
        with self._lock:
            self._running.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self._running)

    def admission_spread(self, burst: int) -> dict:
        """First to last arrival at the engine of the last `burst` requests, in seconds."""
        t = sorted(self.admitted)[-burst:]
        return {"requests": len(t), "spread_s": (t[-1] - t[0]) if t else 0.0}

    def is_alive(self) -> bool:
        return True

    def dead_reason(self) -> None:
        return None

    def engine_stats(self):
        return self._stats

    def shutdown(self) -> None:
        pass

    def _steps(self) -> None:
        """One token per running request per step; each loop woken once per step, as
        EngineCoreClient's reader does."""
        from trtllm.runtime.wire import StepDeltas
        next_t = time.perf_counter()
        while True:
            next_t += self.step_s
            time.sleep(max(0.0, next_t - time.perf_counter()))
            with self._lock:
                running = list(self._running.items())
            by_loop: dict = {}  # loop -> (streams, their deltas)
            for request_id, entry in running:
                stream, params, loop, streaming, n = entry
                n = entry[4] = n + 1
                done = n >= params.max_tokens
                # what the engine's delta carries: the tokens since the last one sent
                tokens = [(i * 7919) % self.vocab_size for i in range(n - 1 if streaming else 0, n)]
                if done:
                    with self._lock:
                        self._running.pop(request_id, None)
                if streaming or done:
                    if loop not in by_loop:
                        by_loop[loop] = ([], StepDeltas())
                    streams, d = by_loop[loop]
                    streams.append(stream)
                    for column, value in ((d.request_ids, request_id), (d.finished, done), (d.errors, None),
                                          (d.num_cached_tokens, 0), (d.starts, len(d.texts)), (d.texts, ""),
                                          (d.token_ids, tokens), (d.logprobs, None), (d.cumulative_logprobs, None),
                                          (d.finish_reasons, "length" if done else None), (d.stop_reasons, None)):
                        column.append(value)
            for loop, (streams, d) in by_loop.items():
                loop.call_soon_threadsafe(_dispatch, streams, d)


def _dispatch(streams, deltas) -> None:
    for row, stream in enumerate(streams):
        stream.grow(deltas, row)


def role_server(args) -> None:
    from trtllm.serve.app import build_app, run_server
    engine = StandInEngine(args.step_ms)
    from bench.bench_serve import NAME
    app = build_app(engine, NAME, max_concurrent_requests=4096)

    @app.get("/admissions")
    async def admissions(burst: int):  # how spread out the last burst's admissions were
        out = engine.admission_spread(burst)
        engine.admitted.clear()
        return out

    signal.signal(signal.SIGTERM, lambda *_: None)
    run_server(app, "127.0.0.1", args.port, shutdown_timeout=2, log_level="warning", access_log=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--step-ms", type=float, default=20.0)
    ap.add_argument("--role", default="main", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "server":
        return role_server(args)
    import httpx

    from bench.bench_serve import free_port, make_prompts, measure, run_async
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--role", "server", "--port", str(port),
                               "--step-ms", str(args.step_ms)])
    url = f"http://127.0.0.1:{port}"
    results = vars(args).copy()
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        prompts = make_prompts(args.requests, args.prompt_len, 1000, seed=0)
        ideal = args.requests * args.new / (args.new * args.step_ms / 1e3)
        for stream in (True, False):
            r = run_async(measure(url, prompts, args, stream=stream))
            r["admissions"] = httpx.get(url + "/admissions", params={"burst": args.requests}, timeout=10).json()
            r["ratio_to_stand_in"] = r["tok_s"] / ideal
            results["stream" if stream else "whole"] = r
            print(f"{'streaming' if stream else 'whole'}: {r}", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    table = [f"stand-in engine: {args.requests} requests x {args.new} tokens, one token per request every "
             f"{args.step_ms:g} ms (= {ideal:,.0f} tok/s while all run)", "",
             "| path | output tok/s | vs stand-in rate | admission spread | TTFT p50 | client CPU s |",
             "|---|---:|---:|---:|---:|---:|"]
    for key in ("stream", "whole"):
        r = results[key]
        ttft = f"{r['ttft_p50_s'] * 1e3:,.0f} ms" if "ttft_p50_s" in r else "-"
        table.append(f"| {'SSE' if key == 'stream' else 'whole JSON'} | {r['tok_s']:,.0f} | "
                     f"{r['ratio_to_stand_in']:.3f} | {r['admissions']['spread_s'] * 1e3:,.0f} ms | {ttft} | "
                     f"{r['client_cpu_s']:.2f} |")
    report("serve_capacity", "\n".join(table), results)


if __name__ == "__main__":
    main()
