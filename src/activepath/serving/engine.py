# schedule → execute → update, in a loop
"""The engine: one thread that owns the runner and loops schedule → execute → update.
Requests join between steps (``submit``) and leave when finished or aborted; each token
goes to the request's callback, on the engine thread (keep callbacks cheap)."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from activepath.moe.capacity import CapacityConfig
from activepath.api import moe_layers
from activepath.serving.metrics import ServingMetrics
from activepath.serving.runner import ModelRunner, RunnerConfig, StepOutput
from activepath.serving.scheduler import Scheduler, SchedulerConfig, StepPlan, TokenEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """``exact``: batch-invariant decoding (a request's tokens never depend on its batch
    mates). ``capacity``: per-expert capacity of every MoE layer; None is dropless."""

    scheduler: SchedulerConfig = SchedulerConfig()
    exact: bool = False
    capacity: CapacityConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.scheduler, SchedulerConfig):
            raise TypeError(f"scheduler must be a SchedulerConfig, got {type(self.scheduler).__name__}")
        if not isinstance(self.exact, bool):
            raise TypeError(f"exact must be a bool, got {self.exact!r}")
        if self.capacity is not None and not isinstance(self.capacity, CapacityConfig):
            raise TypeError(f"capacity must be a CapacityConfig or None, got {type(self.capacity).__name__}")


@dataclass(frozen=True)
class EngineError:
    """Sent instead of a token when the step that carried the request failed (``status``
    500) or the engine shut down before it finished (503)."""

    request_id: str
    message: str
    status: int = 500


class EngineClosed(Exception):
    """``submit`` after ``shutdown``: the engine takes no more requests."""


EventCallback = Callable[[TokenEvent | EngineError], None]


@dataclass
class _Tracked:
    callback: EventCallback
    arrival_s: float
    last_token_s: float | None = None


class Engine:
    """Continuous batching around one model. ``start()`` the loop, ``submit`` requests."""

    def __init__(self, model: nn.Module, config: EngineConfig, *, stop_ids: Sequence[int] = (),
                 metrics: ServingMetrics | None = None) -> None:
        self.config = config
        sched = config.scheduler
        self.layers = moe_layers(model)
        for _, layer in self.layers:
            layer.capacity = config.capacity
            layer.collect_stats = metrics is not None
        self.runner = ModelRunner(model, RunnerConfig(max_slots=sched.max_batch_size, max_len=sched.max_len,
                                                      exact=config.exact))
        self.scheduler = Scheduler(sched)
        self.metrics = metrics
        self.stop_ids = tuple(stop_ids)
        self._tracked: dict[str, _Tracked] = {}
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed: str | None = None  # the shutdown message, once closed

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="activepath-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, prompt_ids: Sequence[int], max_new_tokens: int, callback: EventCallback) -> str:
        """Queue a request; returns its id. Raises ``ValueError``, ``scheduler.QueueFull``
        or ``EngineClosed``."""
        with self._cond:
            if self._closed is not None:
                raise EngineClosed(self._closed)
            request_id = f"req-{next(self._ids)}"
            now = time.perf_counter()
            self.scheduler.add(request_id, prompt_ids, max_new_tokens, stop_ids=self.stop_ids, now=now)
            self._tracked[request_id] = _Tracked(callback, now)
            self._cond.notify()
        return request_id

    def abort(self, request_id: str) -> None:
        """Forget a request (client gone); its slot frees for the next step."""
        with self._cond:
            if self._tracked.pop(request_id, None) is not None:
                self.scheduler.abort(request_id)
                self._count("aborted")

    def shutdown(self, message: str = "the server is shutting down") -> int:
        """Refuse new requests and end every queued or running one now with an
        ``EngineError`` (status 503) carrying ``message``; returns how many were ended.
        The loop keeps running (idle) until ``stop``."""
        with self._cond:
            self._closed = message
            ended = list(self._tracked.items())
            self._tracked.clear()
            for request_id, _ in ended:
                self.scheduler.abort(request_id)
        for request_id, tracked in ended:
            self._count("shutdown")
            tracked.callback(EngineError(request_id, message, status=503))
        return len(ended)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, timeout_s: float = 300.0) -> list[int]:
        """Blocking convenience: submit and wait for every token."""
        done, tokens, errors = threading.Event(), [], []

        def on_event(event: TokenEvent | EngineError) -> None:
            if isinstance(event, EngineError):
                errors.append(event.message)
                done.set()
                return
            tokens.append(event.token_id)
            if event.finish_reason is not None:
                done.set()

        self.submit(prompt_ids, max_new_tokens, on_event)
        if not done.wait(timeout_s):
            raise TimeoutError(f"generation did not finish in {timeout_s} s")
        if errors:
            raise RuntimeError(errors[0])
        return tokens

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self.scheduler.has_work and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                plan = self.scheduler.schedule(time.perf_counter())
            try:
                output = self.runner.execute(plan)
            except Exception as exc:  # a bad step must not take the server down
                log.exception("step failed; failing its %d requests", len(plan.decodes) + len(plan.prefills))
                self._fail(plan, f"{type(exc).__name__}: {exc}")
                continue
            self._finish_step(plan, output)

    def _finish_step(self, plan: StepPlan, output: StepOutput) -> None:
        now = time.perf_counter()
        with self._cond:
            events = self.scheduler.update(plan, output.next_tokens, output.step_s)
            deliveries = [(self._tracked.get(e.request_id), e) for e in events]
            for event in events:
                if event.finish_reason is not None:
                    self._tracked.pop(event.request_id, None)
            waiting = self.scheduler.num_waiting
        for tracked, event in deliveries:
            if tracked is not None:
                self._observe_token(tracked, event, now)
                tracked.callback(event)
        if self.metrics is not None:
            self.metrics.observe_step(queue_depth=waiting, running=len(plan.decodes) + len(plan.prefills),
                                      step_tokens=plan.num_tokens, generated=len(events),
                                      prompt_tokens=plan.num_tokens - len(plan.decodes), now=now)
            self.metrics.observe_layers(self.layers)

    def _observe_token(self, tracked: _Tracked, event: TokenEvent, now: float) -> None:
        if self.metrics is None:
            return
        if tracked.last_token_s is None:
            self.metrics.ttft.observe(now - tracked.arrival_s)
        else:
            self.metrics.itl.observe(now - tracked.last_token_s)
        tracked.last_token_s = now
        if event.finish_reason is not None:
            self.metrics.e2e.observe(now - tracked.arrival_s)
            self._count("finished")

    def _fail(self, plan: StepPlan, message: str) -> None:
        with self._cond:
            failed = []
            for item in (*plan.decodes, *plan.prefills):
                self.scheduler.abort(item.request_id)
                tracked = self._tracked.pop(item.request_id, None)
                if tracked is not None:
                    failed.append((tracked, item.request_id))
        for tracked, request_id in failed:
            self._count("error")
            tracked.callback(EngineError(request_id, message))

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(outcome).inc()
