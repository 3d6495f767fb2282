"""trtllm-bench when requests fail while running, on the demo model (CPU): a failed request
in the timed run, in the warm-up or in the --profile run, stops the benchmark with one line naming how many failed
and the first error, exit code 1, and no figures: no table, no report files."""
import pytest

import trtllm.runtime.llm as llm_module
from trtllm.cli.bench import main

FLAT = ["--batch_size", "3", "--input_len", "8", "--output_len", "4"]


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # many steps: the ops' torch references


class _FailedWhileRunning:
    """A request's stream whose outputs say it failed (as the engine's do for NaN logits)."""

    def __init__(self, stream):
        self._stream, self.request_id = stream, stream.request_id

    async def __aiter__(self):
        async for out in self._stream:
            out.error = "non-finite logits (injected)"
            yield out


def _fail_calls(monkeypatch, calls: set[int], at_submission: bool) -> list[int]:
    """LLM.generate_async fails the given calls (0-based, warm-up calls first): refused at
    submission (ValueError) or failed while running; the list grows by one a call."""
    real, seen = llm_module.LLM.generate_async, []

    def generate_async(self, prompt, *args, **kwargs):
        number = len(seen)
        seen.append(number)
        if number in calls and at_submission:
            raise ValueError("the engine refused it (injected)")
        stream = real(self, prompt, *args, **kwargs)
        return _FailedWhileRunning(stream) if number in calls else stream
    monkeypatch.setattr(llm_module.LLM, "generate_async", generate_async)
    return seen


def _stopped(capsys, tmp_path, argv, *words):
    report, log = tmp_path / "report.json", tmp_path / "steps.jsonl"
    assert main([*FLAT, *argv, "--report_json", str(report), "--iteration_log", str(log)]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err
    assert "tokens/s" not in out and "request/s" not in out and "latency" not in out, out
    assert not report.exists() and not log.exists()


def test_a_request_failed_in_the_timed_run_reports_no_figures(tmp_path, capsys, monkeypatch):
    _fail_calls(monkeypatch, {1}, at_submission=False)
    _stopped(capsys, tmp_path, ["--warmup", "0"], "the timed run: 1 of 3 request(s) failed",
             "the first: non-finite logits (injected)", "no figures")


def test_a_request_refused_at_submission_in_the_timed_run_reports_no_figures(tmp_path, capsys, monkeypatch):
    _fail_calls(monkeypatch, {0, 2}, at_submission=True)
    _stopped(capsys, tmp_path, ["--warmup", "0"], "the timed run: 2 of 3 request(s) failed",
             "the engine refused it (injected)")


def test_a_failed_warm_up_stops_the_bench_before_the_timed_run(tmp_path, capsys, monkeypatch):
    seen = _fail_calls(monkeypatch, {0}, at_submission=False)
    _stopped(capsys, tmp_path, ["--warmup", "2"], "the warm-up: 1 of 2 request(s) failed",
             "non-finite logits (injected)")
    assert len(seen) == 2  # the warm-up's: the timed run never started


@pytest.mark.parametrize("at_submission, error", [(False, "non-finite logits (injected)"),
                                                  (True, "request 1: the engine refused it (injected)")])
def test_a_request_failed_in_the_profile_run_stops_the_bench(at_submission, error, tmp_path, capsys, monkeypatch):
    """The --profile run's own aborts are no failure; any other is, as in the timed run."""
    trace = tmp_path / "trace.json"
    seen = _fail_calls(monkeypatch, {4}, at_submission=at_submission)  # the timed run's are 0-2
    _stopped(capsys, tmp_path, ["--warmup", "0", "--profile", "--profile_steps", "2", "--profile_trace", str(trace)],
             "the profile run: 1 of 3 request(s) failed", f"the first: {error}", "no figures")
    assert len(seen) == 6 and not trace.exists()
