# [roofline] → (layer | generate) bench → report
"""The measured roofline of this machine, taken in the same run as the figures it judges:
memory bandwidth from a large tensor copy (bytes = read + write), GEMM peak from a large
square matmul in the bench dtype. Each is the best of a few repeats after a warm-up
(a peak, as STREAM reports it)."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch

from activepath.validation import check_positive_int
from activepath.bench.timing import Clock

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RooflineConfig:
    copy_bytes: int = 1 << 30
    gemm_n: int = 4096
    repeats: int = 3

    def __post_init__(self) -> None:
        check_positive_int("copy_bytes", self.copy_bytes)
        check_positive_int("gemm_n", self.gemm_n)
        check_positive_int("repeats", self.repeats)


@dataclass(frozen=True, kw_only=True)
class Roofline:
    """``bandwidth_GBps`` (1e9 B/s) and ``gemm_GFLOPs`` (1e9 FLOP/s, in ``dtype``).
    ``copy_exceeds_llc`` is False when the copy fit in the last-level cache (then the
    "memory" bandwidth is cache bandwidth), None when the cache size is unknown."""

    bandwidth_GBps: float
    gemm_GFLOPs: float
    dtype: str
    copy_bytes: int
    gemm_n: int
    repeats: int
    copy_exceeds_llc: bool | None
    method: str


def measure_roofline(
    config: RooflineConfig, dtype: torch.dtype, device: torch.device | str, llc_bytes: int | None
) -> Roofline:
    """Measure bandwidth and GEMM peak now, on ``device``."""
    clock = Clock(device)
    bandwidth = _copy_bandwidth(config, device, clock)
    gemm = _gemm_rate(config, dtype, device, clock)
    exceeds = None if llc_bytes is None else config.copy_bytes >= 2 * llc_bytes
    log.info("roofline: %.1f GB/s copy, %.1f GFLOP/s %s GEMM", bandwidth, gemm, dtype)
    return Roofline(
        bandwidth_GBps=bandwidth,
        gemm_GFLOPs=gemm,
        dtype=str(dtype).removeprefix("torch."),
        copy_bytes=config.copy_bytes,
        gemm_n=config.gemm_n,
        repeats=config.repeats,
        copy_exceeds_llc=exceeds,
        method=(
            f"bandwidth: best of {config.repeats} dst.copy_(src) of {config.copy_bytes / 2**20:.0f} MiB, "
            f"counting read + write; GEMM: best of {config.repeats} [{config.gemm_n}]^3 matmuls in the bench dtype, "
            "2·n³ FLOPs; one warm-up each, excluded"
        ),
    )


def measure_bandwidth(config: RooflineConfig, device: torch.device | str) -> float:
    """Only the copy bandwidth, GB/s (to re-check it at the end of a run: on shared hosts it drifts)."""
    return _copy_bandwidth(config, device, Clock(device))


def remeasure_bandwidth(roofline: Roofline, device: torch.device | str) -> float:
    """The copy bandwidth again, GB/s, with the settings ``roofline`` was measured with: on
    shared hosts it drifts within a run. Collects garbage first, so freed tensors are not
    counted against the copy's memory."""
    gc.collect()
    config = RooflineConfig(copy_bytes=roofline.copy_bytes, gemm_n=roofline.gemm_n, repeats=roofline.repeats)
    return measure_bandwidth(config, device)


def _copy_bandwidth(config: RooflineConfig, device: torch.device | str, clock: Clock) -> float:
    src = torch.ones(config.copy_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)  # touched now, so page faults stay out of the timing
    dst.copy_(src)
    best = float("inf")
    for _ in range(config.repeats):
        start = clock.now()
        dst.copy_(src)
        best = min(best, clock.now() - start)
    return 2 * src.numel() * src.element_size() / best / 1e9


def _gemm_rate(config: RooflineConfig, dtype: torch.dtype, device: torch.device | str, clock: Clock) -> float:
    n = config.gemm_n
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    out = torch.mm(a, b)
    best = float("inf")
    for _ in range(config.repeats):
        start = clock.now()
        torch.mm(a, b, out=out)
        best = min(best, clock.now() - start)
    return 2 * n**3 / best / 1e9
