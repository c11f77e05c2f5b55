"""Prometheus metrics of a served build, per arm (own registry: several servers can live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
KLD_BUCKETS = (1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1, 3)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("quantprism_requests", "Requests answered, by arm, endpoint and HTTP status",
                                ["arm", "endpoint", "status"], registry=r)
        self.tokens = Counter("quantprism_tokens", "Tokens, by arm and kind (prompt|completion)", ["arm", "kind"], registry=r)
        self.latency = Histogram("quantprism_request_seconds", "Request latency (server in to last byte), by arm", ["arm"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("quantprism_ttft_seconds", "Time to first token inside the runtime, by arm", ["arm"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("quantprism_errors", "Failures by arm and kind (overload|timeout|runtime|down|bad_request)",
                              ["arm", "kind"], registry=r)
        self.queue = Gauge("quantprism_queue_depth", "Requests in the arm's runtime process (running + waiting)", ["arm"],
                           registry=r)
        self.up = Gauge("quantprism_arm_up", "1 while the arm's runtime process serves", ["arm"], registry=r)
        self.share = Gauge("quantprism_flag_share", "The candidate's share of users", registry=r)
        self.shadow_share = Gauge("quantprism_flag_shadow", "The shadowed share of baseline requests", registry=r)
        self.flag_version = Gauge("quantprism_flag_version", "Version of the flag file in effect", registry=r)
        self.shadow = Counter("quantprism_shadow", "Shadow compares by result (compared|skipped|failed)", ["result"],
                              registry=r)
        self.shadow_match = Counter("quantprism_shadow_exact_match", "Shadow compares whose tokens matched exactly",
                                    registry=r)
        self.shadow_kld = Histogram("quantprism_shadow_kld", "Candidate's teacher-forced KLD on the baseline's output",
                                    buckets=KLD_BUCKETS, registry=r)
        self.shadow_divergence = Histogram("quantprism_shadow_first_divergence", "First differing token position",
                                           buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
