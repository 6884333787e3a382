# (layer | generate) bench → [timing] → report
"""The one timing helper every bench shares: warm-up excluded, inputs rotated by call
index, wall time per call (device-synchronised), summarised by median and tail."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from activepath.runtime.process import frozen_gc


@dataclass(frozen=True, kw_only=True)
class Summary:
    """Per-call seconds: ``n`` samples, median, tail percentiles (linear interpolation)."""

    n: int
    mean_s: float
    median_s: float
    p95_s: float
    p99_s: float
    min_s: float
    max_s: float


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``samples``, interpolating between ranks."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"q must lie in [0, 100], got {q}")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(samples: Sequence[float]) -> Summary:
    return Summary(
        n=len(samples),
        mean_s=sum(samples) / len(samples),
        median_s=percentile(samples, 50),
        p95_s=percentile(samples, 95),
        p99_s=percentile(samples, 99),
        min_s=min(samples),
        max_s=max(samples),
    )


class Clock:
    """``perf_counter``, synchronised on an accelerator so a lap covers queued work."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self._sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None

    def now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()


@dataclass(frozen=True, kw_only=True)
class TimingPlan:
    """``warmup`` calls excluded, then up to ``iters`` timed calls, stopping early (after
    at least ``min_iters``) once ``budget_s`` of timed calls has been spent."""

    warmup: int = 2
    iters: int = 20
    min_iters: int = 3
    budget_s: float = 15.0

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.iters < 1 or not 1 <= self.min_iters <= self.iters:
            raise ValueError(f"need 1 <= min_iters ({self.min_iters}) <= iters ({self.iters})")
        if not self.budget_s > 0:
            raise ValueError(f"budget_s must be > 0, got {self.budget_s}")


def time_calls(
    call: Callable[[int], None],
    plan: TimingPlan,
    clock: Clock,
    on_sample: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Run ``call(i)`` for i = 0, 1, ... (the index picks the rotating input); return the
    timed calls' seconds. ``on_sample(i, seconds)`` runs after each timed call, outside
    the timed region (to collect per-call stats)."""
    for i in range(plan.warmup):
        call(i)
    samples: list[float] = []
    spent = 0.0
    i = plan.warmup
    with frozen_gc():  # no full GC pass over the loaded model inside a timed call, as in `activepath serve`
        while len(samples) < plan.iters and (len(samples) < plan.min_iters or spent < plan.budget_s):
            start = clock.now()
            call(i)
            elapsed = clock.now() - start
            samples.append(elapsed)
            spent += elapsed
            if on_sample is not None:
                on_sample(i, elapsed)
            i += 1
    return samples


def progress_bar(total: int, desc: str, enabled: bool):  # noqa: ANN201 - a tqdm bar
    """A tqdm bar on stderr; silent when ``enabled`` is False or stderr is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False, dynamic_ncols=True)
