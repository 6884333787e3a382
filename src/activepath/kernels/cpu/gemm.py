"""Grouped small-batch GEMM for weights in nn.Linear layout (``nk_gemm.cpp``): the experts'
segments and the dense linears.

Shape legend: M rows of activations, K input features, N output features, E stacked
weight matrices (experts), G segments (expert, row range).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from activepath.kernels.cpu.build import available, require_library, threads_for
from activepath.kernels.policy import needs_autograd

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

# Weight dtypes the GEMM kernels read (activations are always fp32).
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


def supports_weight(w: torch.Tensor) -> bool:
    """Whether the kernels can read ``w`` (fp32 or bf16 CPU, unit stride along K, no
    autograd on it); callers bring activations to fp32 themselves."""
    return (
        w.dtype in WEIGHT_DTYPES
        and w.device.type == "cpu"
        and w.stride(-1) == 1
        and not needs_autograd(w)
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
        and not needs_autograd(x_MK)
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
    lib = require_library()
    _check(x_MK, w_ENK, out_MN, bias_EN)
    flat = flat_segments(segments, w_ENK.shape[0], x_MK.shape[0])
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
    lib = require_library()
    _check(x_MK, w_ENK, out_MN, bias_EN)
    if w_ENK.dtype != torch.float32:
        raise TypeError(f"the panel kernel reads float32 weights, got {w_ENK.dtype}")
    flat = flat_segments(segments, w_ENK.shape[0], x_MK.shape[0])
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
        *blocking, threads_for(w_ENK.element_size() * n * k * groups),
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


def flat_segments(
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
