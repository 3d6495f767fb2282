"""Server overhead: the same requests through trtllm-serve (HTTP + SSE) and through LLM.generate.

    tools/fetch_serve_wheels.sh                      # once, where there is network: wheels into .whl/
    pip install --no-index --find-links .whl fastapi uvicorn prometheus-client httpx uvloop httptools
    PYTHONPATH=$PWD python bench/bench_serve.py [--smoke] [--requests 256] [--prompt-len 128] [--new 128]

Llama-3-8B shapes, random bf16 weights (bench/bench_e2e.py's model), no tokenizer (so
neither side detokenizes), token-id prompts, greedy with ignore_eos: every request makes
exactly --new tokens. In one run, each side in a fresh subprocess (so both get the whole
GPU and the HTTP client never shares the server's GIL):
1. offline: `LLM.generate(prompts)`, all at once, after a warm-up;
2. server: the same engine built the same way, in a process of its own behind
   `EngineCoreClient` + `build_app` + uvicorn (the `trtllm-serve` stack; with
   --engine-in-thread, an `LLM` on a thread of the server process), after the same warm-up; from this process an asyncio client
   (a minimal HTTP/1.1 one, so that the client is never the bottleneck; its CPU time is
   reported) sends all requests at once (full concurrency) to /v1/completions, streaming
   (TTFT per request = first content event), then again non-streaming; then SIGTERM.
Output tok/s = generated tokens / wall (first request sent -> last response complete).
Also the server process's CPU seconds during each run (its threads, not the engine process)
and the SSE events the client read: CPU per event, the server-side cost of streaming.
Target: server >= 0.90 x offline. Table last; JSON under $OUT when set.
`--smoke` (tiny shapes, 64 requests of 32/32; with `--device cpu` it runs without a GPU)
checks the pipeline in about a minute.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

from bench.report import report

NAME = "llama3-8b-random"


# -- the model and the engine (the same in both subprocesses) -----------------------------
def build_model(args):
    """The random-weight model and the engine configs; (module, options, vocab size)."""
    import torch
    import transformers

    from bench.bench_e2e import LLAMA3_8B, SMOKE
    from trtllm.config import BuildConfig, KvCacheConfig
    from trtllm.models.llama import LlamaConfig, LlamaForCausalLM

    shape = SMOKE if args.smoke else LLAMA3_8B
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32)
    with device:
        model = LlamaForCausalLM(LlamaConfig.from_hf(transformers.LlamaConfig(**shape)))
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # norms around 1, matrices ~ N(0, 1/fan_in), as bench_e2e
            p.normal_(1.0, 0.05) if p.dim() == 1 else p.normal_(0.0, p.shape[-1] ** -0.5)
    model.init_buffers(device)
    model.eval().requires_grad_(False)
    if device.type == "cuda":
        build = BuildConfig(max_batch_size=max(256, args.requests), max_num_tokens=8192, max_seq_len=2048)
        kv = KvCacheConfig(free_gpu_memory_fraction=0.85)
    else:
        build = BuildConfig(max_batch_size=64, max_num_tokens=512, max_seq_len=2 * (args.prompt_len + args.new))
        kv = KvCacheConfig(max_tokens=64 * 2 * (args.prompt_len + args.new))
    return model, dict(build_config=build, kv_cache_config=kv), shape["vocab_size"]


def build_engine(args):
    """In the engine process (EngineCoreClient runs it there)."""
    from trtllm.runtime.build_engine import build_engine as build
    model, options, _ = build_model(args)
    return build(model, **options)


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed)).tolist()


async def warm_up(llm, args, vocab):
    """The same warm-up on both sides: a full batch, then a staggered one (mixed steps)."""
    from trtllm.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    await asyncio.gather(*(llm.generate_async(p, params).aresult()
                           for p in make_prompts(args.requests, args.prompt_len, vocab, seed=1)))
    streams = []
    for p in make_prompts(32, args.prompt_len, vocab, seed=2):
        streams.append(llm.generate_async(p, params, streaming=True))
        await asyncio.sleep(0.002)
    for s in streams:
        await s.aresult()


def sync(args):
    if args.device == "cuda":
        import torch
        torch.cuda.synchronize()


def role_offline(args) -> None:
    from trtllm.runtime.llm import LLM
    from trtllm.sampling_params import SamplingParams
    model, options, vocab = build_model(args)
    llm = LLM(model, **options)
    asyncio.run(warm_up(llm, args, vocab))
    prompts = make_prompts(args.requests, args.prompt_len, vocab, seed=1234)
    params = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)
    sync(args)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync(args)
    wall = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    llm.shutdown()
    print("RESULT " + json.dumps({"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall}), flush=True)


def role_server(args) -> None:
    """The trtllm-serve stack: the engine in its own process (EngineCoreClient), or with
    --engine-in-thread on a thread of the server process (the way before 2026-11-25)."""
    import functools

    from bench.bench_e2e import LLAMA3_8B, SMOKE
    from trtllm.serve.app import build_app, run_server
    vocab = (SMOKE if args.smoke else LLAMA3_8B)["vocab_size"]
    if args.engine_in_thread:
        from trtllm.runtime.llm import LLM
        model, options, vocab = build_model(args)
        llm = LLM(model, **options)
    else:
        from trtllm.runtime.engine_client import EngineCoreClient
        llm = EngineCoreClient(functools.partial(build_engine, args))
    asyncio.run(warm_up(llm, args, vocab))
    app = build_app(llm, NAME, max_concurrent_requests=max(1024, 2 * args.requests))
    signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn re-raises it after its graceful stop
    profile = None
    if args.profile_server:  # where the server process's time goes (all threads: yappi-free, main only)
        import cProfile
        profile = cProfile.Profile()
        profile.enable()
    try:
        run_server(app, "127.0.0.1", args.port, shutdown_timeout=5, log_level="warning", access_log=False,
                   switch_interval=args.switch_interval if args.switch_interval > 0 else None)
    finally:
        if profile is not None:
            profile.disable()
            import pstats
            profile.dump_stats(args.profile_server)
            pstats.Stats(profile).sort_stats("tottime").print_stats(30)
        llm.shutdown()


# -- the client (this process) ------------------------------------------------------------
# A minimal HTTP/1.1 client on asyncio streams: one connection per request, the body read
# chunk by chunk and only scanned. A general client (httpx: pure-Python h11 per chunk, a
# connection pool scanned per event) costs tens of microseconds per SSE event, which at
# 256 x 128 events is seconds of client CPU: the client would be what is measured.
_USAGE = re.compile(rb'"completion_tokens":(\d+)')


async def one(host: str, port: int, prompt, args, stream: bool):
    body = {"model": NAME, "prompt": prompt, "max_tokens": args.new, "temperature": 0.0, "ignore_eos": True,
            "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    data = json.dumps(body).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
        head = (await reader.readuntil(b"\r\n\r\n")).lower()
        status = int(head.split(b" ", 2)[1])
        ttft, tail, events = None, b"", 0
        if b"transfer-encoding: chunked" in head:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                events += chunk.count(b"data: ")
                if ttft is None and b'"choices":[{' in chunk:
                    ttft = time.perf_counter() - t0
                tail = (tail + chunk)[-4096:]
        else:
            length = int(re.search(rb"content-length: *(\d+)", head).group(1))
            tail = await reader.readexactly(length)
    finally:
        writer.close()
    end = time.perf_counter() - t0
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {tail[-500:]!r}")
    m = _USAGE.findall(tail)
    return ttft, end, int(m[-1]) if m else 0, events


async def measure(url: str, prompts, args, stream: bool) -> dict:
    host, port = url.removeprefix("http://").split(":")
    port = int(port)
    await asyncio.gather(*(one(host, port, p, args, stream) for p in prompts[:8]))  # warm the HTTP path
    cpu, t = time.process_time(), time.perf_counter()
    results = await asyncio.wait_for(asyncio.gather(*(one(host, port, p, args, stream) for p in prompts)), 900)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    tokens = sum(r[2] for r in results)
    assert tokens == len(prompts) * args.new, (tokens, len(prompts) * args.new)
    out = {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "client_cpu_s": cpu,
           "sse_events": sum(r[3] for r in results),
           "e2e_p50_s": statistics.median(r[1] for r in results)}
    if stream:
        ttfts = sorted(r[0] for r in results if r[0] is not None)
        out.update(ttft_p50_s=ttfts[len(ttfts) // 2], ttft_p99_s=ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
                   ttft_count=len(ttfts))
    return out


def run_async(coro):
    """With uvloop when it is installed (the server uses it too, through uvicorn)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def child(args, role: str, port: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, os.path.abspath(__file__), "--role", role, "--requests", str(args.requests),
           "--prompt-len", str(args.prompt_len), "--new", str(args.new), "--device", args.device]
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--port", str(port), "--switch-interval", str(args.switch_interval)] if port else []
    cmd += ["--engine-in-thread"] if args.engine_in_thread and role == "server" else []
    cmd += ["--profile-server", args.profile_server] if args.profile_server and role == "server" else []
    return subprocess.Popen(cmd, stdout=subprocess.PIPE if role == "offline" else None, text=True)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (its threads, not its children), or nan."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 64 requests of 32/32")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--startup-timeout", type=float, default=1200.0)
    ap.add_argument("--switch-interval", type=float, default=0.001,
                    help="the server process's sys.setswitchinterval (0: Python's default 5 ms)")
    ap.add_argument("--engine-in-thread", action="store_true",
                    help="the server's engine on a thread of its process (trtllm-serve --engine-in-thread)")
    ap.add_argument("--profile-server", default=None, metavar="PATH",
                    help="cProfile the server process's event loop thread; stats to PATH, top 30 printed")
    ap.add_argument("--role", choices=["main", "offline", "server"], default="main", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.requests = args.requests or (64 if args.smoke else 256)
    args.prompt_len = args.prompt_len or (32 if args.smoke else 128)
    args.new = args.new or (32 if args.smoke else 128)
    if args.role == "offline":
        return role_offline(args)
    if args.role == "server":
        return role_server(args)

    import httpx
    results = {"requests": args.requests, "prompt_len": args.prompt_len, "new": args.new, "smoke": args.smoke,
               "switch_interval": args.switch_interval,
               "engine": "thread of the server process" if args.engine_in_thread else "own process"}
    try:
        import httptools  # noqa: F401
        import uvloop  # noqa: F401
        results["uvicorn_stack"] = "uvloop + httptools"
    except ImportError:
        results["uvicorn_stack"] = "asyncio + h11 (install uvloop and httptools for the fast path)"
    print(f"server stack: {results['uvicorn_stack']}", flush=True)
    # 1. offline
    proc = child(args, "offline")
    out, _ = proc.communicate(timeout=args.startup_timeout + 600)
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, f"offline run failed ({proc.returncode}):\n{out[-3000:]}"
    results["offline"] = json.loads(line[7:])
    print(f"offline: {results['offline']}", flush=True)
    # 2. server
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = child(args, "server", port)
    try:
        deadline = time.monotonic() + args.startup_timeout
        while True:
            assert server.poll() is None, f"the server exited with {server.returncode}"
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start in time"
            time.sleep(1)
        from bench.bench_e2e import LLAMA3_8B, SMOKE
        vocab = (SMOKE if args.smoke else LLAMA3_8B)["vocab_size"]
        prompts = make_prompts(args.requests, args.prompt_len, vocab, seed=1234)
        cpu = process_cpu_s(server.pid)
        results["server_stream"] = run_async(measure(url, prompts, args, stream=True))
        results["server_stream"]["server_process_cpu_s"] = process_cpu_s(server.pid) - cpu
        print(f"server, streaming: {results['server_stream']}", flush=True)
        cpu = process_cpu_s(server.pid)
        results["server_whole"] = run_async(measure(url, prompts, args, stream=False))
        results["server_whole"]["server_process_cpu_s"] = process_cpu_s(server.pid) - cpu
        print(f"server, non-streaming: {results['server_whole']}", flush=True)
        metrics = httpx.get(url + "/metrics", timeout=30).text
        results["server_metrics_excerpt"] = [x for x in metrics.splitlines() if x.startswith(
            ("trtllm_requests_total", "trtllm_generation_tokens_total", "trtllm_kv_cache_blocks_used",
             "trtllm_prefix_cache_hit_rate"))]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            results["server_exit_code"] = server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()
            results["server_exit_code"] = "killed"

    off = results["offline"]["tok_s"]
    st, wh = results["server_stream"], results["server_whole"]
    rows = [("LLM.generate (offline)", off, None, None, None),
            ("trtllm-serve, streaming (SSE)", st["tok_s"], st["ttft_p50_s"], st["ttft_p99_s"], st),
            ("trtllm-serve, non-streaming", wh["tok_s"], None, None, wh)]
    results["ratio_stream"] = results["server_stream"]["tok_s"] / off
    results["ratio_whole"] = results["server_whole"]["tok_s"] / off
    table = [f"{args.requests} requests {args.prompt_len}/{args.new}, all at once"
             f"{' (smoke shapes)' if args.smoke else ' (Llama-3-8B shapes, random bf16)'}; server: uvicorn "
             f"{results['uvicorn_stack']}, switch interval {args.switch_interval * 1e3:g} ms; engine: "
             f"{results['engine']}", "",
             "| path | output tok/s | vs LLM.generate | TTFT p50 | TTFT p99 | server-process CPU s | SSE events | CPU µs/event |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, tok_s, p50, p99, r in rows:
        ttft = f"{p50 * 1e3:,.0f} ms | {p99 * 1e3:,.0f} ms" if p50 is not None else "- | -"
        cpu = "- | - | -" if r is None else (
            f"{r['server_process_cpu_s']:.2f} | {r['sse_events']:,} | "
            + (f"{r['server_process_cpu_s'] / r['sse_events'] * 1e6:.0f}" if r["sse_events"] else "-"))
        table.append(f"| {name} | {tok_s:,.0f} | {tok_s / off:.3f} | {ttft} | {cpu} |")
    report("bench_serve", "\n".join(table), results)
    print(f"server exit code after SIGTERM: {results['server_exit_code']}")


if __name__ == "__main__":
    main()
