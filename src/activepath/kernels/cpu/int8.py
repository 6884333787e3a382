"""Weight-only int8 kernels: int8 weights with one fp32 scale per output channel, fp32
activations (``nk_gemm_i8.cpp``).

Shape legend: M rows of activations, K input features, N output features, E stacked
weight matrices (experts), G segments (expert, row range).

``y[m, n] = scale[e, n] * sum_k x[m, k] * q[e, n, k] (+ bias[e, n])``: the int8 values are
widened to fp32 in registers, so the only error against fp32 weights is the weights'
rounding (at most half a step, ``scale / 2``, per weight); activations are never quantized.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# ``available``: the int8 kernel lives in the one native library.
from activepath.kernels.cpu.build import available, require_library, threads_for  # noqa: F401
from activepath.kernels.cpu.gemm import flat_segments

# Weight rows per work item. An int8 row is a quarter of an fp32 row, so 4x the fp32
# N_BLOCK reads the same 256 KiB per item (Qwen3-30B-A3B: 12 items per gate_up expert,
# 16 per down expert, enough for 2-16 threads at decode).
N_BLOCK_I8 = 128
# Activation rows per pass over a weight tile (they stay in L2 while the tile streams).
M_BLOCK_I8 = 64
_SYMBOL = "ap_grouped_nk_gemm_i8"
_F32, _I8 = torch.float32, torch.int8


def grouped_nk_gemm_i8(
    x_MK: torch.Tensor,
    q_ENK: torch.Tensor,
    scale_EN: torch.Tensor,
    segments_G3: torch.Tensor | Sequence[tuple[int, int, int]],
    out_MN: torch.Tensor,
    bias_EN: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[lo:hi] = (x[lo:hi] @ q[e].T) * scale[e] (+ bias[e])`` for each ``(e, lo, hi)`` of
    ``segments_G3`` (an integer [G, 3] tensor or a sequence of triples). ``x``, ``scale``,
    ``bias`` and ``out`` are fp32, ``q`` int8; all CPU with unit last stride. Rows of ``out``
    outside every segment are left as they are. ``out`` must not overlap ``x``.

    Each output element's summation order is fixed (independent of M, the segments and
    the threads), so results are batch-invariant.
    """
    lib = require_library()
    _check(x_MK, q_ENK, scale_EN, out_MN, bias_EN)
    num_experts, n, k = q_ENK.shape
    flat = flat_segments(segments_G3, num_experts, x_MK.shape[0])
    groups = len(flat) // 3
    rc = lib.ap_grouped_nk_gemm_i8(
        x_MK.data_ptr(), x_MK.stride(0), q_ENK.data_ptr(), q_ENK.stride(0), q_ENK.stride(1),
        scale_EN.data_ptr(), scale_EN.stride(0),
        None if bias_EN is None else bias_EN.data_ptr(), 0 if bias_EN is None else bias_EN.stride(0),
        out_MN.data_ptr(), out_MN.stride(0), n, k, flat, groups, N_BLOCK_I8, M_BLOCK_I8, threads_for(n * k * groups),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"{_SYMBOL} failed with code {rc}")
    return out_MN


def linear_i8(
    x_MK: torch.Tensor, q_NK: torch.Tensor, scale_N: torch.Tensor, bias_N: torch.Tensor | None = None
) -> torch.Tensor:
    """``(x @ q.T) * scale (+ bias)`` for 2-D fp32 ``x``: the one-segment case."""
    out_MN = torch.empty(x_MK.shape[0], q_NK.shape[0], dtype=torch.float32)
    bias = None if bias_N is None else bias_N.unsqueeze(0)
    return grouped_nk_gemm_i8(x_MK, q_NK.unsqueeze(0), scale_N.unsqueeze(0), ((0, 0, x_MK.shape[0]),), out_MN, bias)


def quantize_rows(w_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``scale[n] = max_k |w[n, k]| / 127`` (at least the
    smallest normal fp32, so an all-zero row gets zeros), ``q = round(w / scale)``.

    Returns ``(q_NK int8 contiguous, scale_N fp32)``; ``q * scale[:, None]`` is within
    ``scale / 2`` of ``w`` everywhere. Any float dtype and strides are accepted.
    """
    if not isinstance(w_NK, torch.Tensor) or w_NK.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got {getattr(w_NK, 'shape', type(w_NK).__name__)}")
    if not w_NK.is_floating_point():
        raise TypeError(f"expected float weights, got {w_NK.dtype}")
    w_NK = w_NK.detach().to(torch.float32)
    if w_NK.shape[1] == 0:
        return torch.zeros(w_NK.shape, dtype=torch.int8), torch.full((w_NK.shape[0],), torch.finfo(torch.float32).tiny)
    if not bool(torch.isfinite(w_NK).all()):
        raise ValueError("cannot quantize non-finite weights (inf or nan)")
    scale_N = (w_NK.abs().amax(dim=1) / 127.0).clamp_(min=torch.finfo(torch.float32).tiny)
    q_NK = torch.empty(w_NK.shape, dtype=torch.int8)
    # The quotient w / scale in float64, not fp32: rounded to fp32 first, a quotient within
    # half an fp32 ulp of a half-integer (common for bf16 weights: w = -126 with max 252
    # gives 63.49999976) becomes the tie and may round to the far integer, half a step and
    # more from w. The float64 quotient of two fp32 values is never that close to a
    # half-integer unless it is one, so q is the nearest integer. Row chunks bound the
    # float64 copy (32 MiB) for the largest dense layers.
    rows = max(1, _QUANTIZE_CHUNK // max(1, w_NK.shape[1]))
    for lo in range(0, w_NK.shape[0], rows):
        quotient = w_NK[lo : lo + rows].double() / scale_N[lo : lo + rows].double().unsqueeze(1)
        q_NK[lo : lo + rows] = quotient.round_().clamp_(-127, 127).to(torch.int8)
    return q_NK, scale_N


_QUANTIZE_CHUNK = 1 << 22  # float64 elements per quotient chunk of quantize_rows


def _check(
    x_MK: torch.Tensor,
    q_ENK: torch.Tensor,
    scale_EN: torch.Tensor,
    out_MN: torch.Tensor,
    bias_EN: torch.Tensor | None,
) -> None:
    # The kernel trusts its pointers, so every dtype, shape, stride and range is checked here
    # (compactly: this runs twice per MoE layer per decode step).
    specs = [("x", x_MK, 2, _F32), ("q", q_ENK, 3, _I8), ("scale", scale_EN, 2, _F32),
             ("out", out_MN, 2, _F32)]  # fmt: skip
    if bias_EN is not None:
        specs.append(("bias", bias_EN, 2, _F32))
    for name, t, dims, dtype in specs:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise TypeError(f"{name} must be a CPU tensor, got device {t.device}")
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
        if t.dim() != dims:
            raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along its last dim, got strides {t.stride()}")
    num_experts, n, k = q_ENK.shape
    m = x_MK.shape[0]
    if n == 0:
        raise ValueError(f"q must have at least one output row, got shape {tuple(q_ENK.shape)}")
    if x_MK.shape[1] != k:
        raise ValueError(f"x has {x_MK.shape[1]} features but q rows have {k}: x {tuple(x_MK.shape)}, "
                         f"q {tuple(q_ENK.shape)}")  # fmt: skip
    if tuple(out_MN.shape) != (m, n):
        raise ValueError(f"out must be [{m}, {n}], got {tuple(out_MN.shape)}")
    if tuple(scale_EN.shape) != (num_experts, n):
        raise ValueError(f"scale must be [{num_experts}, {n}], got {tuple(scale_EN.shape)}")
    if bias_EN is not None and tuple(bias_EN.shape) != (num_experts, n):
        raise ValueError(f"bias must be [{num_experts}, {n}], got {tuple(bias_EN.shape)}")
    if m > 1 and out_MN.stride(0) < n:
        raise ValueError(f"out rows overlap: row stride {out_MN.stride(0)} < {n} columns")
    storage = out_MN.untyped_storage().data_ptr()
    for name, t in (("x", x_MK), ("scale", scale_EN), ("bias", bias_EN)):
        if t is not None and t.untyped_storage().data_ptr() == storage and _overlap(out_MN, t):
            raise ValueError(f"out overlaps {name} in memory; the kernel reads {name} while it writes out")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of two (strided) tensors intersect."""
    if a.numel() == 0 or b.numel() == 0:
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1
