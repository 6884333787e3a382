"""Prometheus metrics of one engine, in their own registry (no process-global state).

Latency histograms (time to first token, inter-token, end to end), queue depth, running
batch size, generated tokens (a counter, and a gauge over the last 10 s), requests by
outcome, and per MoE layer: tokens routed to each expert, the routing overhead ratio of
the last step, and capacity overflows.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from activepath.moe.layer import SparseMoE

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0)
_RATE_WINDOW_S = 10.0
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServingMetrics:
    """Everything ``GET /metrics`` shows. The engine thread calls the ``observe_*`` methods."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.ttft = Histogram("activepath_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=reg)
        self.itl = Histogram("activepath_inter_token_latency_seconds", "Time between consecutive tokens of a request",
                             buckets=_LATENCY_BUCKETS, registry=reg)
        self.e2e = Histogram("activepath_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=reg)
        self.queue_depth = Gauge("activepath_queue_depth", "Requests waiting for a slot", registry=reg)
        self.running = Gauge("activepath_running_batch_size", "Sequences in the last step", registry=reg)
        self.step_tokens = Gauge("activepath_step_tokens", "Tokens (decode + prefill) in the last step", registry=reg)
        self.generated = Counter("activepath_generated_tokens", "Generated tokens", registry=reg)
        self.prompt_tokens = Counter("activepath_prompt_tokens", "Prefilled prompt tokens", registry=reg)
        self.tokens_per_s = Gauge("activepath_generated_tokens_per_second",
                                  f"Generated tokens per second over the last {_RATE_WINDOW_S:g} s", registry=reg)
        self.requests = Counter("activepath_requests", "Requests by outcome", ["outcome"], registry=reg)
        self.expert_tokens = Counter("activepath_expert_tokens", "Token slots routed to each expert",
                                     ["layer", "expert"], registry=reg)
        self.routing_overhead = Gauge("activepath_routing_overhead_ratio",
                                      "(routing + dispatch + combine) / MoE layer time, last step", ["layer"],
                                      registry=reg)
        self.overflow = Counter("activepath_capacity_overflow", "Slots over an expert's capacity",
                                ["layer", "policy"], registry=reg)
        self._recent: deque[tuple[float, int]] = deque()
        self._overflow_seen: dict[tuple[str, str], int] = {}

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_step(self, *, queue_depth: int, running: int, step_tokens: int, generated: int,
                     prompt_tokens: int, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self.queue_depth.set(queue_depth)
        self.running.set(running)
        self.step_tokens.set(step_tokens)
        self.generated.inc(generated)
        self.prompt_tokens.inc(prompt_tokens)
        self._recent.append((now, generated))
        while self._recent and self._recent[0][0] < now - _RATE_WINDOW_S:
            self._recent.popleft()
        span = max(now - self._recent[0][0], 1e-3) if len(self._recent) > 1 else _RATE_WINDOW_S
        self.tokens_per_s.set(sum(n for _, n in self._recent) / span)

    def observe_layers(self, layers: list[tuple[str, SparseMoE]]) -> None:
        """Read each layer's ``last_stats`` (the step's one call) and overflow counters."""
        for name, layer in layers:
            stats = layer.last_stats
            if stats is not None:
                for expert, count in enumerate(stats.tokens_per_expert_E.tolist()):
                    if count:
                        self.expert_tokens.labels(name, str(expert)).inc(count)
                self.routing_overhead.labels(name).set(stats.routing_overhead_ratio)
            self._observe_overflow(name, "drop", int(layer.overflow_dropped))
            self._observe_overflow(name, "reroute", int(layer.overflow_rerouted))

    def _observe_overflow(self, layer: str, policy: str, total: int) -> None:
        key = (layer, policy)
        seen = self._overflow_seen.get(key)
        if seen is None:
            self.overflow.labels(layer, policy)  # show the series at 0
        elif total > seen:
            self.overflow.labels(layer, policy).inc(total - seen)
        self._overflow_seen[key] = total
