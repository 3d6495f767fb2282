"""The figures `trtllm-bench` reports, from what each request's reader saw: plain Python,
no torch, no engine.

    percentile(values, p) -> float          linear interpolation between closest ranks
    summarize(values) -> {"mean", "p50", "p90", "p99", "min", "max"}
    RequestTiming(submitted_s, arrivals, finished_s, input_tokens, output_tokens, error)
    request_figures(timings, streaming) -> dict    throughput and latency figures of a run

Definitions (times in seconds on one clock, `time.perf_counter()`; latencies reported in ms):
- duration: first submission to last finish. request/s, output tok/s and total (input +
  output) tok/s are counts over it; failed requests count in none of them.
- tokens/s per user: the mean over requests of output tokens / end-to-end latency
  (TensorRT-LLM's "per user output throughput").
- end-to-end latency: submission to the output that finished the request.
- with streaming only (without it a reader sees one output, at the end):
  TTFT: submission to the first output that carries a token;
  TPOT: (last token - first token) / (output tokens - 1), per request of two tokens or more;
  ITL: the gaps between consecutive tokens of a request, over all requests. An output
  carrying k > 1 tokens spreads them evenly over the gap since the previous output (the
  k tokens of a first output all arrive at its time).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0..100) of `values`: sorted x, position (n - 1) * p / 100,
    interpolated linearly between the two ranks around it (numpy's default, "linear")."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is outside 0..100")
    x = sorted(values)
    pos = (len(x) - 1) * p / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(x) - 1)
    return x[lo] + (x[hi] - x[lo]) * (pos - lo)


def summarize(values: list[float], scale: float = 1.0) -> dict[str, float] | None:
    """mean, p50, p90, p99, min and max of values * scale; None for no values."""
    if not values:
        return None
    x = [v * scale for v in values]
    out = {"mean": sum(x) / len(x)}
    out.update({f"p{p}": percentile(x, p) for p in PERCENTILES})
    out.update({"min": min(x), "max": max(x)})
    return out


@dataclass
class RequestTiming:
    """One request as its reader saw it."""
    submitted_s: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, new tokens) per output with tokens
    finished_s: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    def token_times(self) -> list[float]:
        """Each output token's arrival time (see the module docstring for outputs of k tokens)."""
        times: list[float] = []
        previous = None
        for t, k in self.arrivals:
            if previous is None:
                times += [t] * k
            else:
                times += [previous + (t - previous) * (i + 1) / k for i in range(k)]
            previous = t
        return times


def request_figures(timings: list[RequestTiming], streaming: bool) -> dict:
    """Throughput and latency figures of one run (keys as in the JSON report)."""
    ok = [r for r in timings if r.error is None and r.finished_s is not None]
    start = min((r.submitted_s for r in timings), default=0.0)
    end = max((r.finished_s for r in ok), default=start)
    duration = end - start
    inputs = sum(r.input_tokens for r in ok)
    outputs = sum(r.output_tokens for r in ok)
    e2e = [r.finished_s - r.submitted_s for r in ok]
    per_user = [r.output_tokens / (r.finished_s - r.submitted_s) for r in ok if r.finished_s > r.submitted_s]
    ttft, tpot, itl = [], [], []
    if streaming:
        for r in ok:
            times = r.token_times()
            if not times:
                continue
            ttft.append(times[0] - r.submitted_s)
            if len(times) > 1:
                tpot.append((times[-1] - times[0]) / (len(times) - 1))
            itl += [b - a for a, b in zip(times, times[1:])]

    def rate(count: float) -> float | None:
        return count / duration if duration > 0 else None

    return {
        "num_requests": len(timings),
        "num_failed": len(timings) - len(ok),
        "duration_s": duration,
        "total_input_tokens": inputs,
        "total_output_tokens": outputs,
        "request_throughput_req_s": rate(len(ok)),
        "output_throughput_tok_s": rate(outputs),
        "total_throughput_tok_s": rate(inputs + outputs),
        "per_user_output_throughput_tok_s": sum(per_user) / len(per_user) if per_user else None,
        "ttft_ms": summarize(ttft, 1e3) if streaming else None,
        "tpot_ms": summarize(tpot, 1e3) if streaming else None,
        "itl_ms": summarize(itl, 1e3) if streaming else None,
        "e2e_latency_ms": summarize(e2e, 1e3),
    }
