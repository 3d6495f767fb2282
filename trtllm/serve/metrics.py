"""Prometheus metrics of one server (one registry per app, so several apps in one
process, as in tests, never share counters).

    trtllm_requests_total{endpoint, outcome}     counter; outcome: success, invalid (4xx),
                                                 unauthorized, rejected (429), aborted
                                                 (client gone / shutdown), failed (engine error)
    trtllm_requests_in_flight                    gauge: HTTP generation requests being served
    trtllm_time_to_first_token_seconds           histogram: arrival -> first generated token
    trtllm_time_per_output_token_seconds         histogram: (last - first token time) / (tokens - 1)
    trtllm_e2e_request_latency_seconds           histogram: arrival -> last token
    trtllm_prompt_tokens_total                   counter: prompt tokens admitted
    trtllm_prompt_tokens_cached_total            counter: of those, served from the prefix cache
    trtllm_generation_tokens_total               counter: tokens generated
    trtllm_num_requests_running / _waiting       gauges: sequences in the scheduler
    trtllm_num_preemptions_total                 counter: sequences preempted (recompute)
    trtllm_kv_cache_blocks_used / _free / _cached / _total
                                                 gauges: the KV block pool
    trtllm_kv_cache_usage_ratio                  gauge: used / total
    trtllm_prefix_cache_hit_rate                 gauge: prompt tokens found cached / looked up
    trtllm_spec_decode_num_draft_tokens_total    counter: draft tokens verified (speculative decoding)
    trtllm_spec_decode_num_accepted_tokens_total counter: of those, accepted
    trtllm_spec_decode_num_verify_steps_total    counter: sequence-steps that verified drafts
    trtllm_lora_requests_total{lora_name}        counter: generation requests routed through each LoRA
                                                 adapter (`model` = the adapter's name)

Gauges of engine state are `llm.engine_stats()` at scrape time: read from the scheduler
and block manager (engine on a thread; never locked or waited on), or the counters the
engine process sent with its latest step (engine in its own process).
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from trtllm.runtime.client_protocol import EngineClient

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector:
    """Engine state, read when scraped."""

    def __init__(self, llm: EngineClient):
        self.llm = llm

    def collect(self):
        st = self.llm.engine_stats()
        running = GaugeMetricFamily("trtllm_num_requests_running", "Sequences being generated (in the batch)")
        waiting = GaugeMetricFamily("trtllm_num_requests_waiting", "Sequences waiting for admission")
        running.add_metric([], st.num_running)
        waiting.add_metric([], st.num_waiting)
        yield running
        yield waiting
        preempt = CounterMetricFamily("trtllm_num_preemptions", "Sequences preempted (recomputed later)")
        preempt.add_metric([], st.num_preemptions)
        yield preempt
        for name, value, doc in (("used", st.blocks_used, "KV-cache blocks held by sequences"),
                                 ("free", st.blocks_free, "KV-cache blocks on the free list"),
                                 ("cached", st.blocks_cached, "KV-cache blocks holding reusable "
                                                              "prefixes, evictable"),
                                 ("total", st.blocks_total, "KV-cache blocks in the pool")):
            g = GaugeMetricFamily(f"trtllm_kv_cache_blocks_{name}", doc)
            g.add_metric([], value)
            yield g
        usage = GaugeMetricFamily("trtllm_kv_cache_usage_ratio", "Used KV-cache blocks / all blocks")
        usage.add_metric([], st.blocks_used / st.blocks_total if st.blocks_total else 0.0)
        yield usage
        hit = GaugeMetricFamily("trtllm_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / "
                                                                "prompt tokens looked up")
        hit.add_metric([], st.prefix_hit_rate)
        yield hit
        for name, value, doc in (("draft_tokens", st.spec_draft_tokens, "Draft tokens the target verified"),
                                 ("accepted_tokens", st.spec_accepted_tokens, "Draft tokens the target accepted"),
                                 ("verify_steps", st.spec_verify_steps, "Sequence-steps that verified drafts")):
            c = CounterMetricFamily(f"trtllm_spec_decode_num_{name}", doc)
            c.add_metric([], value)
            yield c


class ServerMetrics:
    def __init__(self, llm: EngineClient):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("trtllm_requests", "HTTP requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.in_flight = Gauge("trtllm_requests_in_flight", "HTTP generation requests being served",
                               registry=r)
        self.ttft = Histogram("trtllm_time_to_first_token_seconds", "Request arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("trtllm_time_per_output_token_seconds", "Mean time per output token after the "
                              "first, per completion", buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("trtllm_e2e_request_latency_seconds", "Request arrival to its last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("trtllm_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.cached_tokens = Counter("trtllm_prompt_tokens_cached", "Prompt tokens served from the prefix cache",
                                     registry=r)
        self.generation_tokens = Counter("trtllm_generation_tokens", "Tokens generated", registry=r)
        self.lora_requests = Counter("trtllm_lora_requests", "Generation requests by LoRA adapter", ["lora_name"],
                                     registry=r)
        r.register(_EngineCollector(llm))

    def outcome(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(endpoint, outcome).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
