"""Process-wide settings that keep a forward pass from paying for the Python process
around it. The library never applies them on its own (they change the whole process); the
``activepath`` command does, and programs that embed activepath call them themselves.

**The C allocator** (``tune_allocator``). glibc's malloc serves every allocation above its
mmap threshold (128 KiB at first, raised on the fly up to 32 MiB) with a fresh ``mmap``
and unmaps it when freed, and it trims the top of its heap whenever more than the trim
threshold is free there. A forward pass allocates and frees the same multi-MB activations
at every layer (a 128-token prefill of a Qwen3-30B-A3B-shaped model: 2 MiB for each rotary
product and q/k norm), so some of them keep coming back as fresh pages that fault in on
first touch: 0 to 3,500 page faults per prefill in steady state, and the next prefill may
differ. ``tune_allocator`` sets both thresholds once, so that freed activations stay in
the heap and are reused. The cost is memory: up to ``trim_threshold_bytes`` of freed heap
stays mapped. It is the in-process form of what CPU inference guides do by preloading
jemalloc or tcmalloc. ``activepath --malloc default`` leaves malloc alone.

**Python's cyclic garbage collector** (``freeze_loaded_objects``, ``frozen_gc``). A full
(oldest-generation) collection walks every tracked object: with a transformers model,
torch and activepath loaded, ~360,000 objects and 100-170 ms on the bench machine. It runs
once enough new objects have survived (a quarter as many as there are old ones), in the
middle of a decode step if that is where it falls. Freezing the objects alive after
loading (``gc.freeze``) takes them out of every later collection; the collector still runs,
over what is new. ``activepath serve`` freezes once the model is loaded; the benches
freeze around their timed calls.

**oneDNN's caches** (``bound_onednn_caches``). torch runs bf16/fp16 CPU GEMMs through
oneDNN, which compiles a primitive per GEMM shape and keeps up to 1024 of them in each of
two caches (oneDNN's own, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, and ideep's in torch,
``LRU_CACHE_CAPACITY``); a primitive with its scratch buffers holds up to ~1 MiB. A server
whose step sizes vary (every prompt length) filled them: RSS rose by hundreds of MiB and was
still rising after 1,000 requests (benchmarks/results/rss_shapes.md). ``activepath`` sets
both capacities to ``DEFAULT_ONEDNN_CACHE_CAPACITY`` unless the environment already does;
both are read when the first primitive is created, so this must run before the first bf16
matmul. fp32 GEMMs go to MKL and keep no such cache.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit systems.
MAX_MMAP_THRESHOLD_BYTES = 32 << 20
_C_INT_MAX = 2**31 - 1
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
# Enough for the shapes a serving step mix keeps reusing; small enough to bound the caches
# at a few tens of MiB (the measured trade-off is in benchmarks/results/rss_shapes.md).
DEFAULT_ONEDNN_CACHE_CAPACITY = 64


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
            raise ValueError(
                f"trim_threshold_bytes must fit a C int (<= {_C_INT_MAX}), got {self.trim_threshold_bytes}"
            )


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


MALLOC_CHOICES = ("tuned", "default")


def apply_malloc_option(choice: str) -> AllocatorState:
    """What a command's ``--malloc`` asks for: ``tuned`` runs ``tune_allocator``,
    ``default`` leaves malloc alone (and says so in the state)."""
    if choice not in MALLOC_CHOICES:
        raise ValueError(f"--malloc must be one of {MALLOC_CHOICES}, got {choice!r}")
    return tune_allocator() if choice == "tuned" else AllocatorState(False, "--malloc default")


def freeze_loaded_objects() -> int:
    """Collect, then move every object alive now (the loaded model, the libraries) out of
    the cyclic garbage collector's reach (``gc.freeze``), so later collections walk only
    objects created afterwards. Call it once the model is loaded and optimised. Returns how
    many objects are frozen. Frozen objects are never collected, so do not freeze again and
    again while objects come and go (``frozen_gc`` unfreezes when done)."""
    gc.collect()
    gc.freeze()
    # At exit, frozen objects would never be collected, and libraries that check for leaks
    # at shutdown (triton's nanobind bindings) would report them all: unfreeze first.
    atexit.unregister(gc.unfreeze)
    atexit.register(gc.unfreeze)
    return gc.get_freeze_count()


@contextlib.contextmanager
def frozen_gc() -> Iterator[int]:
    """``freeze_loaded_objects`` for the duration of a block (a timed run), then everything
    frozen goes back to the oldest generation, where it can be collected again. Yields the
    number of frozen objects. If objects are frozen already (an enclosing block, or the
    program's own ``freeze_loaded_objects``), it leaves the freeze as it is, on entry and
    on exit."""
    if gc.get_freeze_count() > 0:
        yield gc.get_freeze_count()
        return
    try:
        yield freeze_loaded_objects()
    finally:
        gc.unfreeze()


def bound_onednn_caches(capacity: int = DEFAULT_ONEDNN_CACHE_CAPACITY) -> dict[str, str]:
    """Cap oneDNN's primitive cache and ideep's (see the module docstring) at ``capacity``
    entries each, through their environment variables; a variable already set is left as it
    is (the user's choice wins). Takes effect only before the process's first oneDNN
    primitive (its first bf16/fp16 CPU matmul). Returns the value each variable now has."""
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
    for name in ONEDNN_CACHE_VARIABLES:
        os.environ.setdefault(name, str(capacity))
    return {name: os.environ[name] for name in ONEDNN_CACHE_VARIABLES}
