"""trtllm-bench's figures against a hand computation on a fixed trace."""
import numpy as np
import pytest

from trtllm.cli.bench_stats import RequestTiming, percentile, request_figures, summarize


def test_percentile_interpolates_between_ranks_as_numpy():
    x = [10.0, 1.0, 4.0, 2.0, 3.0]  # sorted: 1 2 3 4 10
    assert percentile(x, 50) == 3.0
    assert percentile(x, 90) == pytest.approx(4 + 0.6 * 6)   # position 3.6
    assert percentile(x, 99) == pytest.approx(4 + 0.96 * 6)  # position 3.96
    assert percentile(x, 0) == 1.0 and percentile(x, 100) == 10.0
    assert percentile([7.0], 99) == 7.0
    rng = np.random.default_rng(0)
    y = rng.exponential(size=37).tolist()
    for p in (50, 90, 99):
        assert percentile(y, p) == pytest.approx(float(np.percentile(y, p)))
    with pytest.raises(ValueError):
        percentile([], 50)
    assert summarize([]) is None


def _trace():
    # request 1: tokens at 0.1, 0.3, 0.6. Request 2: one token at 0.2, then two in one
    # output at 0.4 (spread: 0.3 and 0.4). Both submitted at 0, prompts of 4 tokens.
    return [RequestTiming(0.0, [(0.1, 1), (0.3, 1), (0.6, 1)], 0.6, 4, 3),
            RequestTiming(0.0, [(0.2, 1), (0.4, 2)], 0.4, 4, 3)]


def test_figures_of_a_fixed_streamed_trace():
    f = request_figures(_trace(), streaming=True)
    assert f["num_requests"] == 2 and f["num_failed"] == 0
    assert f["duration_s"] == pytest.approx(0.6)
    assert f["request_throughput_req_s"] == pytest.approx(2 / 0.6)
    assert f["output_throughput_tok_s"] == pytest.approx(6 / 0.6)
    assert f["total_throughput_tok_s"] == pytest.approx(14 / 0.6)
    assert f["per_user_output_throughput_tok_s"] == pytest.approx((3 / 0.6 + 3 / 0.4) / 2)
    ttft, tpot, itl, e2e = f["ttft_ms"], f["tpot_ms"], f["itl_ms"], f["e2e_latency_ms"]
    assert ttft["mean"] == pytest.approx(150) and ttft["p50"] == pytest.approx(150)
    assert ttft["p90"] == pytest.approx(190) and ttft["p99"] == pytest.approx(199)
    # TPOT: (0.6 - 0.1) / 2 = 250 ms and (0.4 - 0.2) / 2 = 100 ms
    assert tpot["mean"] == pytest.approx(175) and tpot["p90"] == pytest.approx(235)
    # ITL: 200, 300 (request 1); 100, 100 (request 2) -> sorted 100 100 200 300
    assert itl["mean"] == pytest.approx(175) and itl["p50"] == pytest.approx(150)
    assert itl["p90"] == pytest.approx(270) and itl["p99"] == pytest.approx(297)
    assert itl["min"] == pytest.approx(100) and itl["max"] == pytest.approx(300)
    assert e2e["mean"] == pytest.approx(500) and e2e["p99"] == pytest.approx(598)


def test_without_streaming_only_end_to_end_latency_and_failures_count_nowhere():
    trace = _trace() + [RequestTiming(0.0, [], 5.0, 4, 0, error="boom")]
    f = request_figures(trace, streaming=False)
    assert f["ttft_ms"] is None and f["tpot_ms"] is None and f["itl_ms"] is None
    assert f["num_requests"] == 3 and f["num_failed"] == 1
    assert f["duration_s"] == pytest.approx(0.6)  # the failed one's end is not the run's
    assert f["total_output_tokens"] == 6
    assert f["e2e_latency_ms"]["max"] == pytest.approx(600)
