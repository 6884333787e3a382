"""Native CPU kernels: small-batch fp32 GEMM for weights in nn.Linear layout.

Shape legend: M rows of activations, K input features, N output features, E stacked
weight matrices (experts), G segments (expert, row range).

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
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=gnu++17")
# Weight rows per work item: 32 rows of a 2048-wide matrix is 256 KiB, enough to amortise
# scheduling and few enough that 8 decode experts still give every thread work.
N_BLOCK = 32
# Activation rows per pass over a weight tile: they stay in L2 while the tile streams.
M_BLOCK = 64
# The panel kernel (see nk_gemm.cpp) packs x in panels of this many rows; segments with
# fewer rows gain nothing from it. Weight rows per panel work item: 48 rows of a 2048-wide
# matrix (384 KiB) plus a 32-row pair of panels (256 KiB) stay in a 1 MiB L2.
PANEL_ROWS = 16
PANEL_N_BLOCK = 48
# Below this many weight bytes a call runs on one thread. A parallel region waits for its
# slowest thread, and when another process holds a core that thread may not run for a
# whole scheduler slice (milliseconds) — far more than a 1 MiB router product is worth.
PARALLEL_MIN_BYTES = 1 << 20

_lock = threading.Lock()
_state: dict[str, object] = {}


def disabled_by_env() -> bool:
    return os.environ.get("ACTIVEPATH_NATIVE", "1").lower() in _OFF


_OFF = ("0", "false", "no", "off")


def set_enabled(enabled: bool) -> None:
    """Turn the native kernels on or off for this process (callers fall back to PyTorch).
    ``ACTIVEPATH_NATIVE=0`` in the environment sets the initial state; it is read once, at
    first use, not on every call (this check runs several times per layer per decode step)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    _state["enabled"] = enabled


def available() -> bool:
    """True when the kernels are built (building them now if needed) and enabled."""
    return _library() is not None


def unavailable_reason() -> str | None:
    """Why ``available()`` is False (None when it is True)."""
    return None if _library() is not None else _state.get("reason")  # type: ignore[return-value]


def _library() -> ctypes.CDLL | None:
    lib = _state.get("lib")
    if lib is not None and _state["enabled"]:  # the hot path: two dict lookups
        return lib  # type: ignore[return-value]
    if "enabled" not in _state:
        _state["enabled"] = not disabled_by_env()
    if not _state["enabled"]:
        _state["reason"] = "disabled by ACTIVEPATH_NATIVE=0 or native.set_enabled(False)"
        return None
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
    return _state["lib"]  # type: ignore[return-value]


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


def build_flags() -> tuple[str, ...]:
    """The compiler flags of the build: the defaults, then ``ACTIVEPATH_NATIVE_FLAGS``
    (whitespace-separated, each starting with ``-``; ValueError naming the first that does not)."""
    extra = shlex.split(os.environ.get("ACTIVEPATH_NATIVE_FLAGS", ""))
    bad = [f for f in extra if not f.startswith("-") or f == "-o"]
    if bad:
        raise ValueError(f"ACTIVEPATH_NATIVE_FLAGS must hold compiler flags starting with '-' (not -o), got {bad[0]!r}")
    return (*_FLAGS, *extra)


def simd_width() -> int | None:
    """The vector branch the loaded build compiled: 512 (AVX-512), 256 (AVX2) or 0 (scalar);
    None when the kernels are unavailable."""
    lib = _library()
    return None if lib is None else int(lib.ap_simd_width())


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
    _declare(lib)
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


def _declare(lib: ctypes.CDLL) -> None:
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


# Weight dtypes the GEMM kernels read (activations are always fp32).
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


def supports_weight(w: torch.Tensor) -> bool:
    """Whether the kernels can read ``w`` (fp32 or bf16 CPU, unit stride along K, no
    autograd on it); callers bring activations to fp32 themselves."""
    return (
        w.dtype in WEIGHT_DTYPES
        and w.device.type == "cpu"
        and w.stride(-1) == 1
        and not (torch.is_grad_enabled() and w.requires_grad)
        and available()
    )


def supports(x_MK: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the kernels apply: fp32 CPU tensors, unit stride along K, no autograd."""
    return (
        x_MK.dtype == torch.float32
        and w.dtype == torch.float32
        and x_MK.device.type == "cpu"
        and x_MK.dim() == 2
        and x_MK.stride(-1) == 1
        and not (torch.is_grad_enabled() and x_MK.requires_grad)
        and supports_weight(w)
    )


def grouped_nk_gemm(
    x_MK: torch.Tensor,
    w_ENK: torch.Tensor,
    segments: torch.Tensor | Sequence[tuple[int, int, int]],
    out_MN: torch.Tensor,
    bias_EN: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[lo:hi] = x[lo:hi] @ w[e].T (+ bias[e])`` for each ``(e, lo, hi)`` in
    ``segments`` (triples or an integer [G, 3] tensor). Rows of ``out`` outside every segment are left as they are. ``w`` is fp32
    or bf16 (widened to fp32 in registers); ``x``, ``out`` and ``bias`` are fp32.

    Each output element's summation order is fixed (independent of M, the segments and
    the threads), so results are batch-invariant.
    """
    lib = _require_library()
    _check(x_MK, w_ENK, out_MN, bias_EN)
    flat = _flat_segments(segments, w_ENK.shape[0], x_MK.shape[0])
    kernel = lib.ap_grouped_nk_gemm if w_ENK.dtype == torch.float32 else lib.ap_grouped_nk_gemm_bf16
    return _launch(kernel, x_MK, w_ENK, flat, out_MN, bias_EN, N_BLOCK, M_BLOCK)


def grouped_nk_gemm_panel(
    x_MK: torch.Tensor,
    w_ENK: torch.Tensor,
    segments: torch.Tensor | Sequence[tuple[int, int, int]],
    out_MN: torch.Tensor,
    bias_EN: torch.Tensor | None = None,
    *,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """``grouped_nk_gemm`` for segments with many rows (fp32 weights only): each segment's
    full 16-row panels in the outer-product panel kernel, its last ``rows % 16`` rows in the
    dot kernel. 1.2-1.4x the dot kernel's FLOP rate from 16 rows per segment up.

    Every output element is still summed in a fixed order (one chain over k), but not the
    dot kernel's, and which kernel a row takes depends on its position in its segment: the
    result is deterministic, not batch-invariant. Use ``grouped_nk_gemm`` where that matters.
    ``scratch``: fp32, contiguous, at least ``panel_scratch_numel`` elements, overwritten
    (allocated here when None).
    """
    lib = _require_library()
    _check(x_MK, w_ENK, out_MN, bias_EN)
    if w_ENK.dtype != torch.float32:
        raise TypeError(f"the panel kernel reads float32 weights, got {w_ENK.dtype}")
    flat = _flat_segments(segments, w_ENK.shape[0], x_MK.shape[0])
    need = _panel_numel(flat, w_ENK.shape[2])
    if scratch is None:
        scratch = torch.empty(need, dtype=torch.float32)
    elif scratch.dtype != torch.float32 or scratch.device.type != "cpu" or not scratch.is_contiguous():
        raise TypeError(f"scratch must be a contiguous float32 CPU tensor, got {scratch.dtype} on {scratch.device}")
    elif scratch.numel() < need:
        raise ValueError(f"scratch holds {scratch.numel()} floats, these segments need {need}")
    return _launch(lib.ap_grouped_nk_gemm_panel, x_MK, w_ENK, flat, out_MN, bias_EN, scratch.data_ptr(), PANEL_N_BLOCK)


def _launch(
    kernel: ctypes._CFuncPtr,
    x_MK: torch.Tensor,
    w_ENK: torch.Tensor,
    flat: ctypes.Array,
    out_MN: torch.Tensor,
    bias_EN: torch.Tensor | None,
    *blocking: object,
) -> torch.Tensor:
    """Call a grouped GEMM kernel of nk_gemm.cpp (arguments checked by the caller): they
    share every argument but their blocking ones, which come between the segments and
    the thread count."""
    _, n, k = w_ENK.shape
    groups = len(flat) // 3
    rc = kernel(
        x_MK.data_ptr(), x_MK.stride(0), w_ENK.data_ptr(), w_ENK.stride(0), w_ENK.stride(1),
        None if bias_EN is None else bias_EN.data_ptr(), 0 if bias_EN is None else bias_EN.stride(0),
        out_MN.data_ptr(), out_MN.stride(0), n, k, flat, groups,
        *blocking, _threads_for(w_ENK.element_size() * n * k * groups),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"{kernel.__name__} failed with code {rc}")
    return out_MN


def panel_scratch_numel(segments: Sequence[tuple[int, int, int]], k: int) -> int:
    """Floats of packed activations ``grouped_nk_gemm_panel`` needs for ``segments`` with
    K = ``k``: the full 16-row panels of every segment."""
    return _panel_numel([v for segment in segments for v in segment], k)


def _panel_numel(flat: Sequence[int], k: int) -> int:
    panels = sum((flat[i + 2] - flat[i + 1]) // PANEL_ROWS for i in range(0, len(flat), 3))
    return max(panels, 1) * PANEL_ROWS * k


def linear(
    x_MK: torch.Tensor, w_NK: torch.Tensor, bias_N: torch.Tensor | None = None, *, panel: bool = False
) -> torch.Tensor:
    """``x @ w.T (+ bias)`` for 2-D ``x``: the one-segment case. ``panel``: through
    ``grouped_nk_gemm_panel`` (fp32 weights; faster from 16 rows, not batch-invariant)."""
    out_MN = x_MK.new_empty(x_MK.shape[0], w_NK.shape[0])
    bias_1N = None if bias_N is None else bias_N.unsqueeze(0)
    gemm = grouped_nk_gemm_panel if panel else grouped_nk_gemm
    return gemm(x_MK, w_NK.unsqueeze(0), ((0, 0, x_MK.shape[0]),), out_MN, bias_1N)


def _flat_segments(
    segments: torch.Tensor | Sequence[tuple[int, int, int]], num_experts: int, rows: int
) -> ctypes.Array:
    """Segments (an integer [G, 3] tensor or triples) as a C int64 array, every bound checked
    on the host in plain Python ints: for an MoE layer's few segments this is cheaper than
    any tensor op, and the kernels trust these bounds."""
    if isinstance(segments, torch.Tensor):
        if segments.dtype.is_floating_point or segments.dtype.is_complex or segments.dtype == torch.bool:
            raise TypeError(f"segments must be an integer tensor, got {segments.dtype}")
        if segments.dim() != 2 or segments.shape[1] != 3:
            raise ValueError(f"segments must be [G, 3] (expert, lo, hi), got shape {tuple(segments.shape)}")
        flat = [v for segment in segments.tolist() for v in segment]
    else:
        flat = []
        for segment in segments:
            if len(segment) != 3:
                raise ValueError(f"a segment is (expert, lo, hi), got {segment!r}")
            flat += (int(segment[0]), int(segment[1]), int(segment[2]))
    es, los, his = flat[0::3], flat[1::3], flat[2::3]
    if flat and (min(es) < 0 or max(es) >= num_experts or min(los) < 0 or max(his) > rows
                 or any(lo > hi for lo, hi in zip(los, his))):  # fmt: skip
        bad = next(s for s in zip(es, los, his) if not (0 <= s[0] < num_experts and 0 <= s[1] <= s[2] <= rows))
        raise ValueError(f"segment (expert, lo, hi) = {list(bad)} out of range for E={num_experts} experts, "
                         f"M={rows} rows")  # fmt: skip
    return (ctypes.c_int64 * len(flat))(*flat)


def _threads_for(weight_bytes: int) -> int:
    """All of torch's threads, or one below PARALLEL_MIN_BYTES (see there)."""
    return torch.get_num_threads() if weight_bytes >= PARALLEL_MIN_BYTES else 1


def _check(x_MK: torch.Tensor, w_ENK: torch.Tensor, out_MN: torch.Tensor, bias_EN: torch.Tensor | None) -> None:
    # The kernel trusts its pointers, so every shape and stride is checked here.
    if w_ENK.dim() != 3 or x_MK.dim() != 2 or out_MN.dim() != 2:
        raise ValueError(f"expected x [M, K], w [E, N, K], out [M, N]; got {tuple(x_MK.shape)}, "
                         f"{tuple(w_ENK.shape)}, {tuple(out_MN.shape)}")  # fmt: skip
    num_experts, n, k = w_ENK.shape
    if w_ENK.dtype not in WEIGHT_DTYPES or w_ENK.device.type != "cpu" or w_ENK.stride(-1) != 1:
        raise TypeError(f"w must be a float32 or bfloat16 CPU tensor with unit last stride; got {w_ENK.dtype} on "
                        f"{w_ENK.device}, strides {w_ENK.stride()}")  # fmt: skip
    for name, t in (("x", x_MK), ("out", out_MN), ("bias", bias_EN)):
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1):
            raise TypeError(f"{name} must be a float32 CPU tensor with unit last stride; got {t.dtype} on "
                            f"{t.device}, strides {t.stride()}")  # fmt: skip
    if x_MK.shape[1] != k or out_MN.shape != (x_MK.shape[0], n) or n == 0:
        raise ValueError(f"shapes do not chain: x {tuple(x_MK.shape)}, w {tuple(w_ENK.shape)}, out {tuple(out_MN.shape)}")
    if bias_EN is not None and tuple(bias_EN.shape) != (num_experts, n):
        raise ValueError(f"bias must be [{num_experts}, {n}], got {tuple(bias_EN.shape)}")


# -- routing, dispatch and combine glue (native/moe_glue.cpp) ----------------------------


def _require_library() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError(f"native kernels are not available: {unavailable_reason()}")
    return lib


def _call(name: str, *args: object) -> None:
    rc = getattr(_require_library(), name)(*args)
    if rc != 0:
        raise ValueError(f"{name} rejected its arguments (code {rc})")


def softmax_topk(logits_TE: torch.Tensor, k: int, *, normalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax routing of fp32 logits: (ids [T, K] by descending probability, ties to the
    lower id; weights [T, K] fp32: the chosen probabilities, renormalised over the K when
    ``normalize``, times ``scale``)."""
    if logits_TE.dtype != torch.float32 or logits_TE.dim() != 2 or logits_TE.device.type != "cpu":
        raise TypeError(f"logits must be a 2-D float32 CPU tensor, got {logits_TE.dtype} {tuple(logits_TE.shape)}")
    num_tokens, num_experts = logits_TE.shape
    if not 0 < k <= num_experts:
        raise ValueError(f"k must be in [1, {num_experts}], got {k}")
    logits_TE = logits_TE.contiguous()
    ids_TK = torch.empty(num_tokens, k, dtype=torch.int64)
    weights_TK = torch.empty(num_tokens, k, dtype=torch.float32)
    _call("ap_softmax_topk", logits_TE.data_ptr(), num_tokens, num_experts, k, int(normalize), scale,
          ids_TK.data_ptr(), weights_TK.data_ptr())  # fmt: skip
    return ids_TK, weights_TK


def route_softmax_topk(
    x_TH: torch.Tensor, weight_EH: torch.Tensor, bias_E: torch.Tensor | None, k: int, *, normalize: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The softmax router in one call: logits = x @ weight.T (+ bias) by the native GEMM,
    then ``softmax_topk``. All fp32 CPU, ``x`` and ``weight`` with contiguous rows.
    Returns (ids [T, K], weights [T, K], logits [T, E])."""
    if not router_inputs_fit(x_TH, weight_EH, bias_E):
        raise TypeError(f"x, weight and bias must be contiguous float32 CPU tensors, got x {x_TH.dtype} on "
                        f"{x_TH.device}, weight {weight_EH.dtype} on {weight_EH.device}")  # fmt: skip
    return _route_softmax_topk(x_TH, weight_EH, bias_E, k, normalize=normalize, scale=scale)


def router_inputs_fit(x_TH: torch.Tensor, weight_EH: torch.Tensor, bias_E: torch.Tensor | None) -> bool:
    """The dtype/device/layout conditions of ``route_softmax_topk``; callers that checked
    them (``routing.route``) call ``_route_softmax_topk`` and skip a second check."""
    # One flat expression, not a loop: this runs once per layer per decode step, on cold caches.
    return (
        x_TH.dtype == weight_EH.dtype == torch.float32
        and x_TH.device.type == weight_EH.device.type == "cpu"
        and x_TH.is_contiguous() and weight_EH.is_contiguous()
        and (bias_E is None or (bias_E.dtype == torch.float32 and bias_E.device.type == "cpu" and bias_E.is_contiguous()))
    )  # fmt: skip


def _route_softmax_topk(
    x_TH: torch.Tensor, weight_EH: torch.Tensor, bias_E: torch.Tensor | None, k: int, *, normalize: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_tokens, hidden = x_TH.shape
    num_experts = weight_EH.shape[0]
    if weight_EH.shape != (num_experts, hidden) or (bias_E is not None and bias_E.shape != (num_experts,)):
        raise ValueError(f"router shapes do not chain: x {tuple(x_TH.shape)}, weight {tuple(weight_EH.shape)}")
    if not 0 < k <= num_experts:
        raise ValueError(f"k must be in [1, {num_experts}], got {k}")
    logits_TE = torch.empty(num_tokens, num_experts, dtype=torch.float32)
    weights_TK = torch.empty(num_tokens, k, dtype=torch.float32)
    ids_TK = torch.empty(num_tokens, k, dtype=torch.int64)
    threads = _threads_for(4 * weight_EH.numel())
    _call("ap_route_softmax_topk", x_TH.data_ptr(), num_tokens, hidden, weight_EH.data_ptr(),
          None if bias_E is None else bias_E.data_ptr(), num_experts, k, int(normalize), scale,
          logits_TE.data_ptr(), ids_TK.data_ptr(), weights_TK.data_ptr(), N_BLOCK, M_BLOCK, threads)  # fmt: skip
    return ids_TK, weights_TK, logits_TE


def plan_dispatch(ids: torch.Tensor, top_k: int, num_experts: int) -> tuple[torch.Tensor, ...]:
    """Stable counting sort of slot ids (int64, contiguous, any shape — [T, K] or [S] — each
    in [0, E)) by expert: (order_S, token_idx_S, sorted_ids_S, counts_E, offsets_E1).
    Out-of-range ids raise ValueError."""
    if ids.dtype != torch.int64 or ids.device.type != "cpu" or not ids.is_contiguous():
        raise TypeError(f"ids must be a contiguous int64 CPU tensor, got {ids.dtype} on {ids.device}")
    num_slots = ids.numel()
    # Five plain allocations, not views of one: at decode this runs right after the experts
    # streamed their weights through the caches, where the first view op (split, slice)
    # measured 15-20 us and a further torch.empty 1-2 us.
    order_S = torch.empty(num_slots, dtype=torch.int64)
    token_idx_S = torch.empty(num_slots, dtype=torch.int64)
    sorted_ids_S = torch.empty(num_slots, dtype=torch.int64)
    counts_E = torch.empty(num_experts, dtype=torch.int64)
    offsets_E1 = torch.empty(num_experts + 1, dtype=torch.int64)
    try:
        _call("ap_plan_dispatch", ids.data_ptr(), num_slots, top_k, num_experts, order_S.data_ptr(),
              token_idx_S.data_ptr(), sorted_ids_S.data_ptr(), counts_E.data_ptr(), offsets_E1.data_ptr())  # fmt: skip
    except ValueError:
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got {ids.min().item()}..{ids.max().item()}") from None
    return order_S, token_idx_S, sorted_ids_S, counts_E, offsets_E1


def combine(
    out_SH: torch.Tensor, weights_TK: torch.Tensor, order_S: torch.Tensor, token_idx_S: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """``y[t] = sum over sorted slots j of token t, in order, of out[j] * w[order[j]]``, fp32,
    each product rounded before its add (no FMA)."""
    if not combine_inputs_fit(out_SH, weights_TK, order_S, token_idx_S):
        raise TypeError("combine needs contiguous CPU tensors: out/weights float32 or bfloat16, order/token_idx int64")
    return _combine(out_SH, weights_TK, order_S, token_idx_S, num_tokens)


def combine_inputs_fit(
    out_SH: torch.Tensor, weights_TK: torch.Tensor, order_S: torch.Tensor, token_idx_S: torch.Tensor
) -> bool:
    """The dtype/device/layout conditions of ``combine``; callers that checked them
    (``combine.combine``) call ``_combine`` and skip a second check."""
    # One flat expression, not a loop over the four: this runs once per layer per decode step.
    return (
        out_SH.dtype in _COMBINE_DTYPES and weights_TK.dtype in _COMBINE_DTYPES
        and order_S.dtype == token_idx_S.dtype == torch.int64
        and out_SH.device.type == weights_TK.device.type == order_S.device.type == token_idx_S.device.type == "cpu"
        and out_SH.is_contiguous() and weights_TK.is_contiguous()
        and order_S.is_contiguous() and token_idx_S.is_contiguous()
    )  # fmt: skip


_COMBINE_DTYPES = (torch.float32, torch.bfloat16)  # widened exactly to fp32 in the kernel


def _combine(
    out_SH: torch.Tensor, weights_TK: torch.Tensor, order_S: torch.Tensor, token_idx_S: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """y_TH in fp32 (the caller casts it to the activations' dtype)."""
    num_slots, hidden = out_SH.shape
    if order_S.shape != (num_slots,) or token_idx_S.shape != (num_slots,):
        raise ValueError(f"order and token_idx must be [{num_slots}], got {tuple(order_S.shape)}, {tuple(token_idx_S.shape)}")
    y_TH = torch.empty(num_tokens, hidden, dtype=torch.float32)
    threads = _threads_for(4 * out_SH.numel())
    _call("ap_combine", out_SH.data_ptr(), int(out_SH.dtype == torch.bfloat16), num_slots, hidden,
          weights_TK.data_ptr(), int(weights_TK.dtype == torch.bfloat16), order_S.data_ptr(), weights_TK.numel(),
          token_idx_S.data_ptr(), num_tokens, y_TH.data_ptr(), threads)  # fmt: skip
    return y_TH
