"""`EngineDriver`: the loop that steps an engine for its front end, on the engine's own
thread (`EngineLoop`, for `LLM`) or in the engine process (engine_core.py, for
`EngineCoreClient`): take the messages that came (trtllm/runtime/wire.py), step, hand the
outputs over, and fail everything in flight if a step raises.

    driver = EngineDriver(engine, deliver)   # deliver(outputs): called on this thread
    driver.run(receive)                      # receive(block): a list of messages or None

While requests are in flight it takes what has arrived without waiting and steps; idle, it
waits for messages. `deliver` gets the outputs of the messages taken (failed adds,
aborts) before the step runs, and then the step's; busy, it is called every step, even
with nothing, so the engine process sends its counters each step. A request that is bad
on its own fails alone; a step that raises is a bug, not a bad request: every request in
flight fails with "internal error in the engine step: <exception type>: <message>", and
the loop goes on serving.
"""
from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable

from trtllm.runtime.engine import Engine
from trtllm.runtime.outputs import RequestOutput, failed_output
from trtllm.runtime.wire import AbortRequest, AddRequest, Stop

log = logging.getLogger("trtllm")


class EngineDriver:
    def __init__(self, engine: Engine, deliver: Callable[[list[RequestOutput]], None]):
        self.engine, self.deliver = engine, deliver
        self.steps, self.step_s = 0, 0.0  # Engine.step calls and the seconds spent in them

    def run(self, receive: Callable[[bool], list | None]) -> None:
        """Until a Stop message; then every request in flight is aborted (finish_reason
        "abort") and its output delivered."""
        engine = self.engine
        while True:
            busy = engine.has_unfinished()
            outputs, took = [], False
            # busy: take what has arrived and step; idle: wait until something arrives
            while (messages := receive(not busy)) is not None:
                if not self._take(messages, outputs):
                    outputs += [engine.abort(request_id) for request_id in list(engine.requests)]
                    self.deliver(outputs)
                    return
                busy = took = True
            if took:  # arrivals show in the engine process's counters before the step runs
                self.deliver(outputs)
                outputs = []
            if engine.has_unfinished():
                outputs = self._step()
            if outputs or busy:
                self.deliver(outputs)

    def _take(self, messages: list, outputs: list) -> bool:
        """Apply a batch of messages; False when told to stop."""
        for msg in messages:
            if isinstance(msg, AddRequest):
                try:
                    lora = {} if msg.lora_request is None else {"lora_request": msg.lora_request}  # stand-ins take none
                    if msg.multimodal is not None:
                        lora["multimodal"] = msg.multimodal
                    if msg.cache_salt is not None:
                        lora["cache_salt"] = msg.cache_salt
                    self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params, msg.prompt,
                                            stream=msg.streaming, **lora)
                except ValueError as e:  # bad on its own: fails alone
                    outputs.append(failed_output(msg.request_id, msg.params.n, str(e), msg.prompt,
                                                 msg.prompt_token_ids))
                except Exception:  # a bug: this request fails, the engine keeps serving
                    log.error("adding request %s failed:\n%s", msg.request_id, traceback.format_exc())
                    self.engine.abort(msg.request_id)
                    outputs.append(failed_output(msg.request_id, msg.params.n, "internal error adding the request",
                                                 msg.prompt, msg.prompt_token_ids))
            elif isinstance(msg, AbortRequest):
                output = self.engine.abort(msg.request_id)
                if output is not None:
                    outputs.append(output)
            elif isinstance(msg, Stop):
                return False
            else:
                raise TypeError(f"not a message to the engine: {msg!r}")
        return True

    def _step(self) -> list[RequestOutput]:
        t = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as e:  # a bug, not a bad request: fail what is in flight, keep serving
            log.error("engine step failed:\n%s", traceback.format_exc())
            why = f"internal error in the engine step: {step_failure(e)}"
            failed = []
            for request_id, req in list(self.engine.requests.items()):
                self.engine.abort(request_id)  # frees its blocks
                failed.append(failed_output(request_id, req.params.n, why))
            return failed
        self.steps += 1
        self.step_s += time.perf_counter() - t
        return outputs


def step_failure(e: BaseException) -> str:
    """The cause a failed request names: the exception's type and the first line of its
    message (at most 300 characters; the whole traceback goes to the log)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__
