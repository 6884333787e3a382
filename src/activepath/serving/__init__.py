"""Serving: a pure-Python scheduler that plans each step, a runner that owns the model and
a KV cache reserved up front, the engine loop between them, and an OpenAI-compatible HTTP
server with Prometheus metrics. See docs/serving.md."""

from __future__ import annotations

from activepath.serving.scheduler import QueueFull, Scheduler, SchedulerConfig, StepPlan

__all__ = ["QueueFull", "Scheduler", "SchedulerConfig", "StepPlan"]
