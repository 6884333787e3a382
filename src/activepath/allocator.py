"""Keep the C allocator from handing activations back to the kernel between layers.

glibc's malloc serves every allocation above its mmap threshold (128 KiB at first, raised
on the fly up to 32 MiB) with a fresh ``mmap`` and unmaps it when freed, and it trims the
top of its heap whenever more than the trim threshold is free there. A forward pass
allocates and frees the same multi-MB activations at every layer (a 128-token prefill of a
Qwen3-30B-A3B-shaped model: 2 MiB for each rotary product, q/k norm and attention
score), so some of them keep coming back as fresh pages that fault in on first touch:
0 to 3,400 page faults per prefill in steady state, and the next prefill may differ.

``tune_allocator`` sets both thresholds once per process, so that freed activations stay
in the heap and are reused. That is process-wide state, so the library never does it on
its own: the ``activepath`` command does (``--malloc default`` turns it off), and programs
that embed activepath call it themselves. The cost is memory: up to
``trim_threshold_bytes`` of freed heap stays mapped. It is the in-process form of what
CPU inference guides do by preloading jemalloc or tcmalloc.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit systems.
MAX_MMAP_THRESHOLD_BYTES = 32 << 20
_C_INT_MAX = 2**31 - 1
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


@dataclass(frozen=True, kw_only=True)
class AllocatorConfig:
    """``mmap_threshold_bytes``: allocations below this come from the heap (and are reused)
    instead of a fresh mapping; at most 32 MiB. ``trim_threshold_bytes``: free memory at
    the top of the heap goes back to the kernel only beyond this much."""

    mmap_threshold_bytes: int = MAX_MMAP_THRESHOLD_BYTES
    trim_threshold_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        for name in ("mmap_threshold_bytes", "trim_threshold_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.mmap_threshold_bytes > MAX_MMAP_THRESHOLD_BYTES:
            raise ValueError(
                f"mmap_threshold_bytes must be at most {MAX_MMAP_THRESHOLD_BYTES} (glibc's limit), "
                f"got {self.mmap_threshold_bytes}"
            )
        if self.trim_threshold_bytes > _C_INT_MAX:
            raise ValueError(f"trim_threshold_bytes must fit a C int (<= {_C_INT_MAX}), got {self.trim_threshold_bytes}")


@dataclass(frozen=True)
class AllocatorState:
    """What ``tune_allocator`` did: ``tuned`` is True when both thresholds were set;
    otherwise ``reason`` says why the allocator was left as it was."""

    tuned: bool
    reason: str
    config: AllocatorConfig | None = None

    def describe(self) -> str:
        if not self.tuned or self.config is None:
            return f"default ({self.reason})"
        return (f"glibc malloc tuned: mmap threshold {self.config.mmap_threshold_bytes >> 20} MiB, "
                f"trim threshold {self.config.trim_threshold_bytes >> 20} MiB")


def tune_allocator(config: AllocatorConfig | None = None) -> AllocatorState:
    """Set glibc malloc's mmap and trim thresholds for this process (see the module
    docstring). Does nothing, and says why, on other C libraries or when another
    allocator is preloaded. Calling it again just sets the thresholds again."""
    config = AllocatorConfig() if config is None else config
    if not isinstance(config, AllocatorConfig):
        raise TypeError(f"config must be an AllocatorConfig, got {type(config).__name__}")
    preloaded = os.environ.get("LD_PRELOAD", "")
    other = next((name for name in _OTHER_ALLOCATORS if name in preloaded), None)
    if other is not None:
        return AllocatorState(False, f"{other} is preloaded")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return AllocatorState(False, "not glibc")
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Setting either threshold also ends glibc's own adjustment of both, so set both.
    if not (mallopt(_M_TRIM_THRESHOLD, config.trim_threshold_bytes)
            and mallopt(_M_MMAP_THRESHOLD, config.mmap_threshold_bytes)):
        return AllocatorState(False, "mallopt refused the thresholds")
    return AllocatorState(True, "set by tune_allocator", config)
