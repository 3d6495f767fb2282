"""How `trtllm-bench` drives an `LLM`: the public API, as an application would.

    timings = run_requests(llm, requests, concurrency=None, streaming=False, temperature=0.0)
    recorder = StepRecorder(); llm.engine.on_step = recorder    # one StepRecord per engine step
    window = ProfileWindow(steps=8); recorder.profile = window  # torch profiler over decode steps

Each request goes in through `llm.generate_async(token_ids, SamplingParams(max_tokens=
output_tokens, ignore_eos=True, temperature=...), streaming=...)` from one asyncio task,
at most `concurrency` in flight (None: all submitted at once, offline), and is timed by
its reader: when it was submitted, when each output with new tokens came, when it
finished (bench_stats.RequestTiming). Nothing here reaches into the engine but the
`on_step` observer, which only records.
"""
from __future__ import annotations

import asyncio
import threading
import time

from trtllm.cli.bench_dataset import BenchRequest
from trtllm.cli.bench_stats import RequestTiming
from trtllm.runtime.engine_stats import StepRecord


class ProfileWindow:
    """A torch profiler over `steps` engine steps, started on the engine's thread (the
    profiler records the CPU ops of the thread that starts it; CUDA kernels it sees from
    any thread) at the end of the first decode-only step with no request waiting, and
    stopped after `steps` more, or when the engine runs out of requests. `done` is set
    then; `error` holds why the profiler could not run, if it could not."""

    def __init__(self, steps: int):
        self.steps, self.seen = steps, 0
        self.profiler = None
        self.error: str | None = None
        self.done = threading.Event()

    def observe(self, record: StepRecord) -> None:  # on the engine thread; must not raise
        if self.done.is_set():
            return
        empty = not (record.stats.num_running or record.stats.num_waiting)
        try:
            if self.profiler is None:
                decode = record.num_sequences and record.num_tokens == record.num_sequences
                if decode and record.stats.num_waiting == 0 and not empty:
                    self.profiler = _new_profiler()
                    self.profiler.start()
                elif empty:  # the run ended before a decode step to profile
                    self.done.set()
                return
            self.seen += 1
            if self.seen >= self.steps or empty:
                self.profiler.stop()
                self.done.set()
        except Exception as e:  # an engine step must not fail for a profiler
            self.error = f"{type(e).__name__}: {e}"
            self.done.set()


def prepare_profiler() -> None:
    """Start and stop a profiler on this (the main) thread: the profiler's backend
    initializes on the thread of the first one, and one first started on the engine's
    thread complains on stderr ("External init callback must run in same thread")."""
    with _new_profiler():
        pass


def _new_profiler():
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return profile(activities=activities)


class StepRecorder:
    """`Engine.on_step` observer: the StepRecords since `clear()`, and a ProfileWindow's."""

    def __init__(self):
        self.records: list[StepRecord] = []
        self.profile: ProfileWindow | None = None

    def __call__(self, record: StepRecord) -> None:
        self.records.append(record)  # list.append is atomic: the main thread reads after the run
        if self.profile is not None:
            self.profile.observe(record)

    def clear(self) -> None:
        self.records = []


def run_requests(llm, requests: list[BenchRequest], concurrency: int | None = None, streaming: bool = False,
                 temperature: float = 0.0, progress: str | None = None,
                 stop: threading.Event | None = None) -> list[RequestTiming]:
    """Run `requests` through `llm`; their timings, in the requests' order. `progress`: a
    tqdm bar with this description. `stop`: once set, the requests still in flight are
    aborted (the profile run)."""
    return asyncio.run(_run_all(llm, requests, concurrency, streaming, temperature, progress, stop))


async def _run_all(llm, requests, concurrency, streaming, temperature, progress, stop):
    from tqdm import tqdm

    from trtllm.sampling_params import SamplingParams

    limit = asyncio.Semaphore(concurrency or len(requests))
    timings = [RequestTiming(0.0, input_tokens=len(r.input_ids)) for r in requests]
    in_flight: dict[str, RequestTiming] = {}
    bar = tqdm(total=len(requests), desc=progress, unit="req", leave=False,
               disable=None if progress is not None else True)  # None: on a terminal only

    async def one(r: BenchRequest, t: RequestTiming) -> None:
        params = SamplingParams(max_tokens=r.output_tokens, ignore_eos=True, temperature=temperature)
        async with limit:
            t.submitted_s = time.perf_counter()
            try:
                stream = llm.generate_async(r.input_ids, params, streaming=streaming)
            except ValueError as e:  # checked before the run: should not happen
                t.error, t.finished_s = f"{r.where}: {e}", time.perf_counter()
                return
            in_flight[stream.request_id] = t
            seen, out = 0, None
            async for out in stream:
                now = time.perf_counter()
                n = len(out.outputs[0].token_ids)
                if n > seen:
                    t.arrivals.append((now, n - seen))
                    seen = n
            t.finished_s, t.output_tokens = time.perf_counter(), seen
            t.error = out.error if out is not None else "no output"
            in_flight.pop(stream.request_id, None)
        bar.update(1)

    async def abort_when_stopped() -> None:
        await asyncio.to_thread(stop.wait)
        for request_id in list(in_flight):
            llm.abort(request_id)

    tasks = [asyncio.create_task(one(r, t)) for r, t in zip(requests, timings)]
    watcher = asyncio.create_task(abort_when_stopped()) if stop is not None else None
    try:
        await asyncio.gather(*tasks)
    finally:
        bar.close()
        if watcher is not None:
            stop.set()  # ends the watcher's wait if the requests ended first
            await watcher
    return timings
