"""Building, loading and calling the native CPU library (every ``*.cpp`` of this package).

The C++ source ships with the package and is compiled on first use with the system C++
compiler for *this* CPU (``-march=native``), into a per-user cache keyed by the source,
compiler flags and CPU. No compiler, a failed build, or ``ACTIVEPATH_NATIVE=0`` → the
kernels report unavailable and every caller keeps its pure-PyTorch path (the reason, with
the compiler's error, is in ``unavailable_reason()``). The library links the OpenMP runtime
torch already loaded, so both share one thread pool.

``ACTIVEPATH_NATIVE_FLAGS`` (read once, at first use, like ``ACTIVEPATH_NATIVE``) appends
compiler flags to the build, e.g. ``-mno-avx512f`` (the AVX2 branches on an AVX-512 CPU) or
``-mno-avx2`` (the scalar ones): the kernels' non-AVX-512 code is built and tested that way
(tests/test_native_builds.py). The flags are part of the cache key, so each variant is its
own cached file; ``simd_width()`` says which branch a build took.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

# Every C++ file here is compiled into one library; the headers they share are part of the
# cache key too.
_SOURCES = tuple(sorted(Path(__file__).parent.glob("*.cpp")))
_HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))
DEFAULT_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=gnu++17")
# Below this many weight bytes a call runs on one thread. A parallel region waits for its
# slowest thread, and when another process holds a core that thread may not run for a
# whole scheduler slice (milliseconds) — far more than a 1 MiB router product is worth.
PARALLEL_MIN_BYTES = 1 << 20

_lock = threading.Lock()
# "enabled" (bool, settled at first use), "lib" (the loaded CDLL or None), "reason" (why not).
_state: dict[str, object] = {}
_OFF = ("0", "false", "no", "off")


def disabled_by_env() -> bool:
    return os.environ.get("ACTIVEPATH_NATIVE", "1").lower() in _OFF


def set_enabled(enabled: bool) -> None:
    """Turn the native kernels on or off for this process (callers fall back to PyTorch).
    ``ACTIVEPATH_NATIVE=0`` in the environment sets the initial state; it is read once, at
    first use, not on every call (this check runs several times per layer per decode step)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    _state["enabled"] = enabled


def is_enabled() -> bool:
    """Whether the kernels are switched on (``set_enabled``, else ``ACTIVEPATH_NATIVE``), built or not."""
    if "enabled" not in _state:
        _state["enabled"] = not disabled_by_env()
    return bool(_state["enabled"])


def available() -> bool:
    """True when the kernels are built (building them now if needed) and enabled."""
    return library() is not None


def unavailable_reason() -> str | None:
    """Why ``available()`` is False (None when it is True)."""
    return None if library() is not None else _state.get("reason")  # type: ignore[return-value]


def library() -> ctypes.CDLL | None:
    """The loaded library (built now if needed), or None when unavailable or disabled."""
    lib = _state.get("lib")
    if lib is not None and _state["enabled"]:  # the hot path: two dict lookups
        return lib  # type: ignore[return-value]
    if not is_enabled():
        _state["reason"] = "disabled by ACTIVEPATH_NATIVE=0 or native.set_enabled(False)"
        return None
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
    return _state["lib"]  # type: ignore[return-value]


def install_library(lib: ctypes.CDLL) -> ctypes.CDLL | None:
    """Make ``lib`` (loaded and ``declare``-d by the caller) the library every kernel calls,
    returning the one it replaces (None when none had built): an A/B benchmark swaps two
    builds in one process."""
    if not isinstance(lib, ctypes.CDLL):
        raise TypeError(f"lib must be a loaded ctypes.CDLL, got {type(lib).__name__}")
    library()  # settles the first build, so the previous library is the real one
    previous = _state.get("lib")
    _state["lib"] = lib
    _state["reason"] = None
    return previous  # type: ignore[return-value]


def require_library() -> ctypes.CDLL:
    """The library, or RuntimeError saying why it is unavailable."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"native kernels are not available: {unavailable_reason()}")
    return lib


def call(name: str, *args: object) -> None:
    """Call the library's function ``name``; a non-zero return code is a ValueError (the C
    side rejects arguments it cannot run on, e.g. out-of-range ids)."""
    rc = getattr(require_library(), name)(*args)
    if rc != 0:
        raise ValueError(f"{name} rejected its arguments (code {rc})")


def threads_for(weight_bytes: int) -> int:
    """All of torch's threads, or one below PARALLEL_MIN_BYTES (see there)."""
    return torch.get_num_threads() if weight_bytes >= PARALLEL_MIN_BYTES else 1


def build_flags() -> tuple[str, ...]:
    """The compiler flags of the build: the defaults, then ``ACTIVEPATH_NATIVE_FLAGS``
    (whitespace-separated, each starting with ``-``; ValueError naming the first that does not)."""
    extra = shlex.split(os.environ.get("ACTIVEPATH_NATIVE_FLAGS", ""))
    bad = [f for f in extra if not f.startswith("-") or f == "-o"]
    if bad:
        raise ValueError(f"ACTIVEPATH_NATIVE_FLAGS must hold compiler flags starting with '-' (not -o), got {bad[0]!r}")
    return (*DEFAULT_FLAGS, *extra)


def simd_width() -> int | None:
    """The vector branch the loaded build compiled: 512 (AVX-512), 256 (AVX2) or 0 (scalar);
    None when the kernels are unavailable."""
    lib = library()
    return None if lib is None else int(lib.ap_simd_width())


def _cache_dir() -> Path:
    root = os.environ.get("ACTIVEPATH_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "activepath" / "native"


def _cpu_key() -> str:
    # -march=native output differs by CPU, so the cache key names the CPU's flags.
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def _load() -> ctypes.CDLL | None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None or platform.system() != "Linux":
        _state["reason"] = "no C++ compiler found (set CXX) or not Linux"
        return None
    try:
        flags = build_flags()
    except ValueError as err:
        return _unavailable(str(err))
    digest = hashlib.sha256(
        b"".join(p.read_bytes() for p in _SOURCES + _HEADERS) + " ".join((compiler, *flags)).encode() + _cpu_key().encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"activepath_native-{digest}.so"
    try:
        if not target.exists():
            _build(compiler, flags, target)
        lib = ctypes.CDLL(str(target))
    except subprocess.CalledProcessError as err:
        # The compiler's own message: a CI log (and a user's warning) must say what failed.
        stderr = (err.stderr or b"").decode(errors="replace").strip()
        return _unavailable(f"the C++ build failed ({' '.join(map(str, err.cmd))}):\n{stderr[-4000:]}")
    except (OSError, subprocess.TimeoutExpired) as err:
        return _unavailable(str(err))
    declare(lib)
    _state["reason"] = None
    return lib


def _unavailable(why: str) -> None:
    _state["reason"] = f"native kernels unavailable: {why}"
    warnings.warn(f"activepath: {_state['reason']}; using PyTorch kernels", RuntimeWarning, stacklevel=4)


def _build(compiler: str, flags: Sequence[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build to a temporary name and rename: concurrent first uses never load a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run([compiler, *flags, *map(str, _SOURCES), "-o", str(out)], check=True, capture_output=True, timeout=300)
        os.replace(out, target)


def declare(lib: ctypes.CDLL) -> None:
    """Argument types of every exported function (ctypes does not read headers)."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn = lib.ap_grouped_nk_gemm
    fn.argtypes = [ptr, i64, ptr, i64, i64, ptr, i64, ptr, i64, i64, i64, ptr, i64, i64, i64, ctypes.c_int]
    fn.restype = ctypes.c_int
    lib.ap_grouped_nk_gemm_bf16.argtypes = fn.argtypes
    lib.ap_grouped_nk_gemm_bf16.restype = ctypes.c_int
    lib.ap_grouped_nk_gemm_panel.argtypes = [ptr, i64, ptr, i64, i64, ptr, i64, ptr, i64, i64, i64, ptr, i64, ptr,
                                             i64, ctypes.c_int]  # fmt: skip
    lib.ap_grouped_nk_gemm_panel.restype = ctypes.c_int
    lib.ap_grouped_nk_gemm_i8.argtypes = [ptr, i64, ptr, i64, i64, ptr, i64, ptr, i64, ptr, i64, i64, i64, ptr,
                                          i64, i64, i64, ctypes.c_int]  # fmt: skip
    lib.ap_grouped_nk_gemm_i8.restype = ctypes.c_int
    glue = {
        "ap_softmax_topk": [ptr, i64, i64, i64, ctypes.c_int, ctypes.c_float, ptr, ptr],
        "ap_route_softmax_topk": [ptr, i64, i64, ptr, ptr, i64, i64, ctypes.c_int, ctypes.c_float, ptr, ptr, ptr,
                                  i64, i64, ctypes.c_int],
        "ap_plan_dispatch": [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr],
        "ap_combine": [ptr, ctypes.c_int, i64, i64, ptr, ctypes.c_int, ptr, i64, ptr, i64, ptr, ctypes.c_int],
        "ap_token_route_gate_up": [ptr, i64, ptr, ptr, i64, i64, ctypes.c_int, ctypes.c_float, ptr, i64, i64, i64,
                                   ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, ctypes.c_int,
                                   ctypes.c_int],
        "ap_token_down_combine": [ptr, i64, ptr, i64, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, i64, i64,
                                  ctypes.c_int, ctypes.c_int],
        "ap_token_route_gate_up_i8": [ptr, i64, ptr, ptr, i64, i64, ctypes.c_int, ctypes.c_float, ptr, i64, i64,
                                      ptr, i64, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                                      i64, i64, i64, i64, ctypes.c_int, ctypes.c_int],
        "ap_token_down_combine_i8": [ptr, i64, ptr, i64, i64, ptr, i64, ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ptr,
                                     ptr, ptr, i64, i64, ctypes.c_int, ctypes.c_int],
    }
    lib.ap_simd_width.argtypes, lib.ap_simd_width.restype = [], ctypes.c_int
    for name, argtypes in glue.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = ctypes.c_int
