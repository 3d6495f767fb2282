"""EngineDriver, the loop of the engine thread and the engine process, on a stand-in engine:
bad requests fail alone, a step that raises fails every request in flight and the loop
goes on, Stop aborts what is left."""
from types import SimpleNamespace

from trtllm.runtime.engine_driver import EngineDriver
from trtllm.runtime.outputs import RequestOutput, new_output
from trtllm.runtime.wire import AbortRequest, AddRequest, Stop
from trtllm.sampling_params import SamplingParams


class StandInEngine:
    """Requests take `steps` steps; a step raises while `broken`."""

    def __init__(self, steps: int = 2):
        self.requests, self.steps, self.broken = {}, steps, False

    def add_request(self, request_id, prompt_token_ids, params, prompt=None, stream=False):
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        self.requests[request_id] = SimpleNamespace(params=params, left=self.steps)

    def abort(self, request_id):
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        out = new_output(request_id, None, [], req.params)
        out.finished = True
        for c in out.outputs:
            c.finish_reason = "abort"
        return out

    def has_unfinished(self):
        return bool(self.requests)

    def step(self):
        if self.broken:
            raise RuntimeError("a bug")
        outputs = []
        for request_id, req in list(self.requests.items()):
            req.left -= 1
            if req.left == 0:
                del self.requests[request_id]
                out = new_output(request_id, None, [], req.params)
                out.finished = True
                outputs.append(out)
        return outputs


def run(engine, batches: list[list]) -> list[RequestOutput]:
    delivered = []
    inbox = list(batches)
    EngineDriver(engine, delivered.extend).run(lambda block: inbox.pop(0) if inbox else None)
    return delivered


def add(request_id, ids=(1,), n=1):
    return AddRequest(request_id, list(ids), SamplingParams(n=n))


def test_bad_requests_fail_alone_and_stop_aborts_the_rest():
    engine = StandInEngine(steps=3)
    out = run(engine, [[add("ok"), add("empty", ids=(), n=2), add("long")], [AbortRequest("long")],
                       [Stop()]])
    by_id = {o.request_id: o for o in out}
    assert by_id["empty"].error == "the prompt is empty" and len(by_id["empty"].outputs) == 2
    assert by_id["long"].outputs[0].finish_reason == "abort"
    assert by_id["ok"].outputs[0].finish_reason == "abort" and not engine.requests  # stopped before it ended


def test_a_step_that_raises_fails_every_request_and_the_loop_goes_on():
    engine = StandInEngine(steps=2)
    engine.broken = True
    delivered = []
    inbox = [[add("a"), add("b", n=3)]]

    def receive(block):
        if inbox:
            return inbox.pop(0)
        if not engine.requests and engine.broken:  # after the crash: a good request, then stop
            engine.broken = False
            return [add("c")]
        return [Stop()] if block else None

    EngineDriver(engine, delivered.extend).run(receive)
    by_id = {o.request_id: o for o in delivered}
    assert by_id["a"].error == by_id["b"].error == "internal error in the engine step: RuntimeError: a bug"
    assert [c.finish_reason for c in by_id["b"].outputs] == ["error"] * 3
    assert by_id["c"].error is None and by_id["c"].finished
