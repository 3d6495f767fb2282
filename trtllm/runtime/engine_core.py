"""The engine in a process of its own: `core_main` runs in the child that
`EngineCoreClient` (trtllm/runtime/engine_client.py) starts, builds the engine and steps it.

Why a process: with the engine on a thread, the engine loop and the HTTP server's event
loop share one GIL, and every SSE event the server writes delays the next GPU step
(streaming through the server ran at 0.50x `LLM.generate`, docs/decisions/serving.md).
Here the core process only schedules, runs the model, samples, detokenizes and checks
stop conditions; the server process only parses HTTP, renders JSON and writes events.

The wire: two one-way pipes of pickled messages.
- to the core, batches of: ("add", request_id, prompt_token_ids, params, prompt, streaming),
  ("abort", request_id), ("stop",);
- from the core: ("ready", limits, vocab_size, has_tokenizer, stats) once, or ("error",
  message) if the engine could not be built; then one (deltas, stats) per step, where a
  delta carries only what a request gained in that step (`RequestOutput.delta`, made by
  the engine itself with `emit_deltas`), and the client keeps the growing `RequestOutput`
  (`apply_delta`).
The core steps without waiting on the client: a step's deltas go out in one write. It
exits when told to stop or when its pipe closes (the server is gone).
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback

from trtllm.runtime.engine_stats import EngineStats

log = logging.getLogger("trtllm")


def failed_delta(request_id: str, n: int, error: str) -> tuple:
    """The delta that ends a request with `error` (n sequences, finish reason "error")."""
    return request_id, True, error, 0, [(i, "", [], None, None, "error", None) for i in range(n)]


# -- the core process ------------------------------------------------------------------------
def core_main(build, inbox, outbox) -> None:
    """The core process: build the engine, then step it for as long as the client wants."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when the core stops
    try:
        engine = build()
    except BaseException as e:  # noqa: BLE001 - the client reports it as the load error
        outbox.send(("error", f"{type(e).__name__}: {e}"))
        return
    engine.emit_deltas = True
    outbox.send(("ready", engine.limits, engine.vocab_size, engine.tokenizer is not None,
                 EngineStats.of(engine)))
    _Core(engine, outbox).run(inbox)


class _Core:
    """Steps the engine; each step's deltas go out on a sender thread, so pickling and
    writing overlap the next GPU step (the engine waits for the GPU without the GIL) and
    a server slow to read never holds a step back."""

    def __init__(self, engine, outbox):
        self.engine, self.outbox = engine, outbox
        self._outgoing: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="trtllm-core-out", daemon=True)
        self.steps, self.step_s = 0, 0.0

    def run(self, inbox) -> None:
        self._sender.start()
        try:
            while True:
                busy = self.engine.has_unfinished()
                deltas, took = [], False
                # busy: take what has arrived and step; idle: sleep until something arrives
                while inbox.poll(0 if busy else None):
                    if not self._take(inbox.recv(), deltas):
                        self._abort_all(deltas)
                        self._send(deltas)
                        return
                    busy = took = True
                if took:  # arrivals show in the stats (waiting, blocks) before the step runs
                    self._send(deltas)
                    deltas = []
                if self.engine.has_unfinished():
                    deltas += self._step()
                if deltas or busy:
                    self._send(deltas)
        except (EOFError, OSError):  # the client is gone
            return
        finally:
            self._outgoing.put(None)
            self._sender.join(10)
            if os.environ.get("TRTLLM_CORE_TIMING"):
                print(f"trtllm engine core: {self.steps} steps, {self.step_s:.3f} s in Engine.step "
                      f"({self.step_s / max(self.steps, 1) * 1e3:.3f} ms/step)", file=sys.stderr, flush=True)

    def _send(self, deltas: list) -> None:
        self._outgoing.put((deltas, EngineStats.of(self.engine)))

    def _send_loop(self) -> None:
        while (item := self._outgoing.get()) is not None:
            try:
                self.outbox.send(item)
            except OSError:  # the client is gone; the main loop sees it on its pipe
                return

    def _take(self, messages: list, deltas: list) -> bool:
        """Apply a batch of messages; False when told to stop."""
        for msg in messages:
            if msg[0] == "add":
                _, request_id, ids, params, prompt, streaming = msg
                try:
                    self.engine.add_request(request_id, ids, params, prompt, stream=streaming)
                except ValueError as e:  # bad on its own (or a duplicate id): fails alone
                    deltas.append(failed_delta(request_id, params.n, str(e)))
                except Exception:  # a bug: this request fails, the core keeps serving
                    log.error("adding request %s failed:\n%s", request_id, traceback.format_exc())
                    self.engine.abort(request_id)
                    deltas.append(failed_delta(request_id, params.n, "internal error adding the request"))
            elif msg[0] == "abort":
                delta = self.engine.abort(msg[1])
                if delta is not None:
                    deltas.append(delta)
            elif msg[0] == "stop":
                return False
        return True

    def _step(self) -> list:
        t = time.perf_counter()
        try:
            outputs = self.engine.step()
            self.steps += 1
            self.step_s += time.perf_counter() - t
        except Exception:  # a bug, not a bad request: fail what is in flight, keep serving
            log.error("engine step failed:\n%s", traceback.format_exc())
            return self._end_all("internal error in the engine step")
        return outputs

    def _abort_all(self, deltas: list) -> None:
        deltas += [self.engine.abort(request_id) for request_id in list(self.engine.requests)]

    def _end_all(self, error: str) -> list:
        """Every request in flight ends with `error` (its blocks freed by the abort)."""
        failed = []
        for request_id, req in list(self.engine.requests.items()):
            self.engine.abort(request_id)
            failed.append(failed_delta(request_id, req.params.n, error))
        return failed
