"""The server's Prometheus metrics (prometheus_client), in a registry of its own so that several
servers in one process (tests) do not collide; /metrics renders it in the text format."""

from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

disable_created_metrics()  # no *_created series: their values are timestamps, not metrics

PREFIX = "llm_runtime"
# seconds; decode steps of a CPU demo take milliseconds, a 314B model's tens of milliseconds,
# and a long prompt's first token seconds
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


class Metrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "Requests answered, by endpoint and HTTP "
                                "status", ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens admitted",
                                     registry=registry)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens generated",
                                        registry=registry)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "From the request's "
                              "arrival to its first generated token", buckets=LATENCY_BUCKETS,
                              registry=registry)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Between consecutive "
                             "tokens of one request", buckets=LATENCY_BUCKETS, registry=registry)
        self.slots_busy = Gauge(f"{PREFIX}_slots_busy", "Engine slots serving a request",
                                registry=registry)
        self.slots = Gauge(f"{PREFIX}_slots", "Engine slots", registry=registry)
        self.queue_length = Gauge(f"{PREFIX}_queue_length", "Requests waiting for a slot",
                                  registry=registry)

    def text(self) -> bytes:
        return generate_latest(self.registry)
