"""The engine in a process of its own: `core_main` runs in the child that
`EngineCoreClient` (trtllm/runtime/engine_client.py) starts, builds the engine and steps it.

Why a process: with the engine on a thread, the engine loop and the HTTP server's event
loop share one GIL, and every SSE event the server writes delays the next GPU step
(streaming through the server ran at 0.50x `LLM.generate`, docs/decisions/serving.md).
Here the core process only schedules, runs the model, samples, detokenizes and checks
stop conditions; the server process only parses HTTP, renders JSON and writes events.

The wire (trtllm/runtime/wire.py): two one-way pipes of pickled messages. Requests come
in lists of AddRequest / AbortRequest / Stop; Ready (or BuildFailed) goes out once, then
one StepDeltas per step: what each request gained in that step, taken from the engine's
own outputs (`copy_outputs` off) as the step returns them. The core steps without
waiting on the client (an `EngineDriver`); it exits when told to stop or when its pipe
closes (the server is gone).
"""
from __future__ import annotations

import os
import queue
import signal
import sys
import threading

from trtllm.runtime.engine_driver import EngineDriver
from trtllm.runtime.engine_stats import EngineStats
from trtllm.runtime.wire import BuildFailed, Ready, StepDeltas


def core_main(build, inbox, outbox) -> None:
    """The core process: build the engine, then step it for as long as the client wants."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when the core stops
    try:
        engine = build()
    except BaseException as e:  # noqa: BLE001 - the client reports it as the load error
        outbox.send(BuildFailed(f"{type(e).__name__}: {e}"))
        return
    engine.copy_outputs = False
    image_token_id = getattr(engine.runner.compiled.module.config, "image_token_id", None) \
        if engine.runner.multimodal is not None else None
    outbox.send(Ready(engine.limits, engine.vocab_size, engine.tokenizer is not None, EngineStats.of(engine),
                      image_token_id))
    # each step's deltas go out on a sender thread, so pickling and writing overlap the
    # next GPU step (the engine waits for the GPU without the GIL) and a server slow to
    # read never holds a step back
    outgoing: queue.SimpleQueue = queue.SimpleQueue()
    sender = threading.Thread(target=_send_loop, args=(outgoing, outbox), name="trtllm-core-out", daemon=True)
    sender.start()
    driver = EngineDriver(engine, lambda outputs: outgoing.put(StepDeltas.of(outputs, EngineStats.of(engine))))
    try:
        driver.run(lambda block: inbox.recv() if inbox.poll(None if block else 0) else None)
    except (EOFError, OSError):  # the client is gone
        return
    finally:
        outgoing.put(None)
        sender.join(10)
        tp = engine.runner.compiled.tensor_parallel
        if tp is not None and tp.workers is not None:  # tensor-parallel workers end with the core
            tp.workers.shutdown()
        if os.environ.get("TRTLLM_CORE_TIMING"):
            print(f"trtllm engine core: {driver.steps} steps, {driver.step_s:.3f} s in Engine.step "
                  f"({driver.step_s / max(driver.steps, 1) * 1e3:.3f} ms/step)", file=sys.stderr, flush=True)


def _send_loop(outgoing: queue.SimpleQueue, outbox) -> None:
    while (item := outgoing.get()) is not None:
        try:
            outbox.send(item)
        except OSError:  # the client is gone; the main loop sees it on its pipe
            return
