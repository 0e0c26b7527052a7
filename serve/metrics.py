"""Prometheus metrics of one server, in a registry of its own (several servers can share a
process, as tests do). Latency histograms are in seconds; token counts are per request.
gRPC and HTTP requests feed the same series (``jaxllm_requests`` counts an HTTP request once,
whatever its prompts and n); ``jaxllm_http_responses`` adds HTTP status codes."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from jaxllm.engine import Engine
from serve.admission import Admission

# Log-spaced from 1 ms: CPU test models answer in milliseconds, large models in seconds.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)
OUTCOMES = ("ok", "cancelled", "deadline_exceeded", "invalid", "rejected", "error", "draining")


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "jaxllm_requests", "Generate requests by outcome", ["outcome"], registry=r
        )
        for outcome in OUTCOMES:  # every series exists from the start, at 0
            self.requests.labels(outcome)
        self.queue_depth = Gauge("jaxllm_queue_depth", "Requests waiting to run", registry=r)
        self.slots_in_use = Gauge(
            "jaxllm_slots_in_use", "Sequences running (decoding or prefilling)", registry=r
        )
        self.in_flight = Gauge("jaxllm_in_flight", "Admitted requests not yet ended", registry=r)
        self.kv_cache_usage = Gauge(
            "jaxllm_kv_cache_usage", "Fraction of KV pages held by running requests", registry=r
        )
        self.kv_pages = Gauge("jaxllm_kv_pages", "KV pool pages by state", ["state"], registry=r)
        self.prefix_hit_rate = Gauge(
            "jaxllm_prefix_cache_hit_rate",
            "Prompt tokens served from the prefix cache over prompt tokens admitted",
            registry=r,
        )
        self.prefix_hit_tokens = Gauge(
            "jaxllm_prefix_cache_hit_tokens", "Prompt tokens served from the cache", registry=r
        )
        self.preemptions = Gauge(
            "jaxllm_preemptions", "Running requests preempted for lack of KV pages", registry=r
        )
        self.compiles = Gauge(
            "jaxllm_xla_compiles",
            "XLA compilations in this process (flat after warm-up)",
            registry=r,
        )
        self.ttft = Histogram(
            "jaxllm_time_to_first_token_seconds",
            "Admission to the first token sent",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "jaxllm_time_per_output_token_seconds",
            "Mean time per output token after the first, per request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "jaxllm_inter_token_latency_seconds",
            "Gap between consecutive streamed messages, per token they carry",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Histogram(
            "jaxllm_prompt_tokens", "Prompt tokens per request", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.output_tokens = Histogram(
            "jaxllm_output_tokens", "Output tokens per request", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.http_responses = Counter(
            "jaxllm_http_responses",
            "HTTP responses of the OpenAI-compatible API by route and status code",
            ["route", "status"],
            registry=r,
        )
        self.load_seconds = Gauge("jaxllm_model_load_seconds", "Time to load the model", registry=r)
        self.warm_up_seconds = Gauge(
            "jaxllm_warm_up_seconds", "Time to compile every shape", registry=r
        )
        self.startup_seconds = Gauge(
            "jaxllm_startup_seconds",
            "Start-up time by phase: read, place, compile, total (jaxllm.startup)",
            ["phase"],
            registry=r,
        )
        self.startup_programs = Gauge(
            "jaxllm_startup_programs",
            "XLA programs at start-up: compiled, or loaded from the compilation cache",
            ["source"],
            registry=r,
        )

        self.expert_tokens = Gauge(
            "jaxllm_moe_expert_tokens",
            "Mixture-of-Experts: tokens routed to each expert, summed over layers and steps",
            ["expert"],
            registry=r,
        )
        self.expert_imbalance = Gauge(
            "jaxllm_moe_load_imbalance",
            "Mixture-of-Experts: busiest expert's load over the mean (1 = even), layer average",
            registry=r,
        )

    def watch(self, engine: Engine, admission: Admission) -> None:
        """Reads the live figures at scrape time, so they are never stale."""
        self.queue_depth.set_function(lambda: engine.queue_depth)
        self.slots_in_use.set_function(lambda: engine.running)
        self.in_flight.set_function(lambda: admission.in_flight)
        self.kv_cache_usage.set_function(lambda: engine.kv_cache_usage)
        for state in ("used", "cached", "free"):
            self.kv_pages.labels(state).set_function(
                lambda state=state: engine.stats()[f"pages_{state}"]
            )
        self.prefix_hit_rate.set_function(lambda: engine.stats()["prefix_hit_rate"])
        self.prefix_hit_tokens.set_function(lambda: engine.stats()["prefix_hit_tokens"])
        self.preemptions.set_function(lambda: engine.stats()["preemptions"])
        self.compiles.set_function(lambda: engine.stats()["compiles"])
        report = engine.startup
        for phase in ("read", "place", "compile", "total"):
            self.startup_seconds.labels(phase).set_function(
                lambda phase=phase: getattr(report, f"{phase}_s")
            )
        self.startup_programs.labels("compiled").set_function(lambda: report.programs_compiled)
        self.startup_programs.labels("cache").set_function(lambda: report.programs_cached)
        if engine.expert_tokens is not None:
            for e in range(engine.expert_tokens.shape[1]):
                self.expert_tokens.labels(str(e)).set_function(
                    lambda e=e: int(engine.expert_tokens[:, e].sum())
                )
            self.expert_imbalance.set_function(lambda: engine.stats()["expert_load_imbalance"])
        self.registry.register(Speculation(engine.stats))

    def serve_http(self, host: str, port: int) -> int:
        """Starts the /metrics endpoint in a thread; returns the port bound (for port 0)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port


class Speculation:
    """Speculative decoding's figures, read from ``stats()`` (``Engine.stats``) at scrape
    time: all 0 when the engine does not speculate. The token counts are counters (the
    engine's running totals), so they take the ``_total`` suffix a gauge may not."""

    def __init__(self, stats: Callable[[], Mapping]):
        self.stats = stats

    FIGURES = (  # (kind, name, Engine.stats key, help)
        (CounterMetricFamily, "jaxllm_spec_draft_tokens", "spec_draft_tokens", "tokens drafted"),
        (
            CounterMetricFamily,
            "jaxllm_spec_accepted_tokens",
            "spec_accepted_tokens",
            "drafted tokens the model's own draws kept",
        ),
        (
            GaugeMetricFamily,
            "jaxllm_spec_acceptance_rate",
            "spec_acceptance_rate",
            "kept over drafted tokens",
        ),
        (
            GaugeMetricFamily,
            "jaxllm_spec_tokens_per_step",
            "spec_tokens_per_step",
            "mean tokens a verifying decode row produces (1 + kept drafts)",
        ),
    )

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        for kind, name, key, doc in self.FIGURES:
            yield kind(name, f"Speculative decoding: {doc}", value=stats.get(key, 0))
