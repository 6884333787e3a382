"""The kernel policy: which kernel path runs for given inputs, and why.

Every stage asks one ``select_*()`` here and branches on the returned ``Choice.path``; every
size threshold that decides a path lives in this module, with the measurement it came from.
Inputs are plain values and tensors (dtype, device, row counts, a store's format string), never
pipeline objects: ``kernels/`` imports nothing from ``moe/``, ``backends/`` or ``dense/``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class Choice:
    """A selected kernel path (e.g. ``"native_panel"``, ``"torch_grouped_mm"``) and the reason for it."""

    path: str
    reason: str

    def __post_init__(self) -> None:
        if not self.path or not isinstance(self.path, str):
            raise ValueError(f"Choice.path must be a non-empty string, got {self.path!r}")


@functools.cache
def _choice(path: str, reason: str) -> Choice:
    """One shared ``Choice`` per (path, reason): stages ask on every call, so no new object each time."""
    return Choice(path=path, reason=reason)


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """True when autograd records these tensors' ops: the native kernels and in-place / ``out=``
    torch paths have no backward, so a path that needs the graph must use plain torch ops.
    The package's one ``torch.is_grad_enabled()`` check."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def grad_mode() -> bool:
    """True outside ``no_grad``/``inference_mode``: paths that reuse buffers across calls (a leased
    workspace, in-place accumulation) must not, since autograd may still hold those buffers."""
    return torch.is_grad_enabled()


# -- the experts stage -----------------------------------------------------------------------

# Above this many tokens per expert BLAS's blocked GEMM catches up with the native kernels
# (fp32, Qwen3-30B-A3B experts, benchmarks/native_gemm.py: the panel kernel 1.2-1.5x BLAS at
# 64-256 rows, 0.95-1.1x at 512), so ``grouped`` hands such experts to it.
NATIVE_MAX_ROWS = 512
# With bf16 weights BLAS has the CPU's bf16 dot-product instructions (twice the fp32 FLOP
# rate) while the native kernel widens to fp32, so BLAS wins sooner. Measured on Zen 4,
# Qwen3-30B-A3B experts, native vs torch bf16: 2.4-2.6x at 1 row, 1.3-1.6x at 8, 1.0x at 16,
# 0.7-0.8x at 32 rows per expert.
NATIVE_MAX_ROWS_BF16 = 12
# From this many rows per expert (one full panel of the panel kernel, kernels.cpu.PANEL_ROWS)
# fp32 experts take the panel kernel, which packs the rows and reuses each weight load
# across them; below it the dot kernel (one weight stream per row) is as fast.
PANEL_ROWS = 16
# torch's CPU grouped GEMM visits every expert (an empty matmul and a host sync each), so
# when at most 1/8 of the experts are active (decode: 8 of 128) the loop over the active
# ones is cheaper (issue 6 measurements, Qwen3-30B-A3B layer at 1-8 tokens).
FEW_ACTIVE_RATIO = 8


def native_max_rows(dtype: torch.dtype, *, batch_invariant: bool) -> int | None:
    """Rows per expert up to which ``grouped`` keeps an expert in the native kernels (None: no
    limit, as the batch-invariant ``native`` backend needs every expert in the dot kernel)."""
    if batch_invariant:
        return None
    return NATIVE_MAX_ROWS if dtype == torch.float32 else NATIVE_MAX_ROWS_BF16


def use_panel(dtype: torch.dtype, small_rows: Sequence[int], *, batch_invariant: bool) -> bool:
    """Whether the native experts take the panel kernel: fp32, not batch-invariant (its
    summation order depends on the panel a row falls in), some expert with ``PANEL_ROWS`` rows."""
    return dtype == torch.float32 and not batch_invariant and any(n >= PANEL_ROWS for n in small_rows)


def select_experts(
    *,
    store_format: str,
    dtype: torch.dtype,
    device_type: str,
    native_fits: bool,
    grouped_mm_fits: bool,
    segment_rows: Sequence[int],
    num_experts: int,
    batch_invariant: bool,
) -> Choice:
    """The kernel path of the ``grouped`` (``batch_invariant=False``) or ``native``
    (``batch_invariant=True``) backend. ``native_fits``: the native kernels are built and take
    these weights and activations (no autograd); ``grouped_mm_fits``: torch's grouped GEMM
    takes them; ``segment_rows``: rows per active expert (read only on the CPU)."""
    if native_fits:
        if store_format == "int8":
            return _choice("native_int8", "int8 experts: their own kernel keeps up with BLAS at any rows")
        return _native_choice(dtype, segment_rows, batch_invariant)
    if batch_invariant:
        return _choice("torch_rowwise", "native kernels do not apply: one-row products keep rows alone")
    if device_type != "cpu" and grouped_mm_fits:
        return _choice("torch_grouped_mm", "off the CPU: grouped GEMM, no read back of the counts")
    if grouped_mm_fits and len(segment_rows) * FEW_ACTIVE_RATIO > num_experts:
        return _choice("torch_grouped_mm", f"more than 1/{FEW_ACTIVE_RATIO} of the experts active: one grouped GEMM")
    if not grouped_mm_fits and grad_mode():
        return _choice("torch_loop", "grad mode: torch's grouped GEMM steps aside, a loop over the experts")
    return _choice("torch_loop", f"at most 1/{FEW_ACTIVE_RATIO} of the experts active: a loop over them")


_PANEL_WHY = f"CPU experts within the native row limit, some >= {PANEL_ROWS} rows → panel kernel"
_DOT_WHY = f"CPU experts within the native row limit, all < {PANEL_ROWS} rows (or bf16) → dot kernel"


def _native_choice(dtype: torch.dtype, segment_rows: Sequence[int], batch_invariant: bool) -> Choice:
    limit = native_max_rows(dtype, batch_invariant=batch_invariant)
    small = [n for n in segment_rows if limit is None or n <= limit]
    kernel = "native_panel" if use_panel(dtype, small, batch_invariant=batch_invariant) else "native_dot"
    if len(small) < len(segment_rows):
        return _choice(f"{kernel}+blas", "experts past the native row limit → BLAS, the rest native")
    if batch_invariant:
        return _choice(kernel, "batch-invariant: every expert in the dot kernel (fixed summation order)")
    why = _PANEL_WHY if kernel == "native_panel" else _DOT_WHY
    return _choice(kernel, why)


def grouped_mm_fits(*, available: bool, dtype: torch.dtype, device_type: str, num_rows: int,
                    alignments: Sequence[int]) -> bool:  # fmt: skip
    """torch's grouped GEMM: no autograd, fp32/bf16/fp16 on the CPU and bf16 elsewhere (its
    CUDA kernel takes bf16 only; its meta kernel checks the same), 16-byte aligned rows and
    pointers (``alignments``: the row byte counts and data pointers)."""
    if not available or grad_mode() or num_rows == 0:
        return False
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if device_type != "cpu" and dtype != torch.bfloat16:
        return False
    return all(n % 16 == 0 for n in alignments)


# -- the dispatch stage ----------------------------------------------------------------------

# Up to this many slots the GPU plan is one Triton launch (a counting sort: S^2/BLOCK_S compares
# per program); past it, torch's sort (the GPU is busy with the GEMMs there anyway).
PLAN_MAX_SLOTS = 8192


def select_dispatch(*, capacity: bool, ids_dtype: torch.dtype, device_type: str, contiguous: bool,
                    native_available: bool) -> Choice:  # fmt: skip
    """How ``plan_dispatch`` sorts the slots: ``"native_sort"`` (one counting sort in native
    code), ``"device_sort"`` (off the CPU without reading back: the one-launch Triton plan on
    CUDA where it applies, else torch's sort and searchsorted) or ``"torch_sort"``."""
    if capacity:
        return _choice("torch_sort", "a capacity mask: torch's sort with a sentinel for dropped slots")
    if ids_dtype == torch.int64 and device_type == "cpu" and contiguous and native_available:
        return _choice("native_sort", "int64 CPU ids: one native counting sort")
    if device_type != "cpu":
        return _choice("device_sort", "off the CPU: a plan without reading counts back")
    return _choice("torch_sort", "no native kernels for these ids: torch's stable sort")


# -- the router and the combine --------------------------------------------------------------


def select_router(*, plain_softmax_topk: bool, num_tokens: int, inputs_fit: bool, autograd: bool,
                  native_available: bool) -> Choice:  # fmt: skip
    """Whether ``route`` runs logits and top-k in one native call (``"native_fused_router"``):
    plain softmax top-k routing of fp32 CPU inputs the kernel takes, without autograd."""
    if plain_softmax_topk and num_tokens > 0 and inputs_fit and not autograd and native_available:
        return _choice("native_fused_router", "fp32 CPU softmax top-k: logits and top-k in one call")
    return _choice("torch", "not plain fp32 CPU softmax top-k without autograd")


def select_router_topk(*, plain_softmax_topk: bool, logits_dtype: torch.dtype, device_type: str, autograd: bool,
                       native_available: bool) -> Choice:  # fmt: skip
    """The top-k after the logits: ``"native_topk"`` (one call instead of five small ops, which
    cost 2-4x more right after the experts streamed their weights through the caches) for plain
    softmax routing of fp32 CPU logits without autograd, else ``"torch"``."""
    fits = logits_dtype == torch.float32 and device_type == "cpu"
    if plain_softmax_topk and fits and not autograd and native_available:
        return _choice("native_topk", "fp32 CPU logits, plain softmax top-k")
    return _choice("torch", "grouped, biased or non-softmax routing, autograd, or not fp32 CPU")


def select_combine(*, fits_native: bool, native_available: bool, device_type: str) -> Choice:
    """``"native_combine"`` (same products, same order, one call) where the kernel takes the
    inputs and no graph is recorded; else ``"torch_index_add"`` on the CPU and
    ``"torch_gather_sum"`` elsewhere (``index_add_`` adds with atomics there: run-to-run sums)."""
    if fits_native and not grad_mode() and native_available:
        return _choice("native_combine", "fp32/bf16 CPU rows, no autograd")
    if device_type != "cpu":
        return _choice("torch_gather_sum", "off the CPU: deterministic gather and sum, no atomics")
    return _choice("torch_index_add", "CPU index_add_ in slot order")


# -- dense linears ---------------------------------------------------------------------------

# Up to this many rows the native kernels measured faster than BLAS (see NATIVE_MAX_ROWS and
# NATIVE_MAX_ROWS_BF16). fp32, Qwen3-30B-A3B attention shapes at 16-256 rows: the panel kernel
# 1.1-2.2x BLAS for [4096, 2048] and [2048, 4096] weights.
LINEAR_MAX_ROWS = 256
LINEAR_MAX_ROWS_BF16 = 12
# The panel kernel splits work in blocks of 48 weight rows; narrower layers (k/v projections,
# [512, 2048]) leave too few blocks to balance and measured faster in the dot kernel.
PANEL_MIN_OUT_FEATURES = 1024
# Smaller weights stay in cache between steps, where BLAS is as fast and the ~10 us of a
# native call's checks and ctypes dispatch would be pure overhead.
LINEAR_MIN_WEIGHT_BYTES = 1 << 20


def linear_max_rows(weight_dtype: torch.dtype, max_rows: int) -> int:
    """Rows up to which a patched linear takes the native kernel: ``max_rows`` for fp32
    weights, at most ``LINEAR_MAX_ROWS_BF16`` for bf16 (BLAS catches up sooner)."""
    return max_rows if weight_dtype == torch.float32 else min(max_rows, LINEAR_MAX_ROWS_BF16)


def select_linear(*, rows: int, max_rows: int, same_dtype: bool, autograd: bool, weight_fits: bool,
                  weight_dtype: torch.dtype, out_features: int) -> Choice:  # fmt: skip
    """A patched ``nn.Linear``'s path: ``"native_panel"`` (fp32, from ``PANEL_ROWS`` rows and
    ``PANEL_MIN_OUT_FEATURES`` outputs), ``"native_dot"``, or ``"torch"`` (past ``max_rows``
    rows, a dtype mismatch, autograd, or weights the kernel does not take)."""
    if not (0 < rows <= max_rows and same_dtype and not autograd and weight_fits):
        return _choice("torch", "past the row limit, autograd, a dtype mismatch or unsupported weights")
    if rows >= PANEL_ROWS and weight_dtype == torch.float32 and out_features >= PANEL_MIN_OUT_FEATURES:
        return _choice("native_panel", f"fp32, >= {PANEL_ROWS} rows, >= {PANEL_MIN_OUT_FEATURES} outputs")
    return _choice("native_dot", "few rows, narrow or bf16 weights: the dot kernel")


# -- the one-token (decode) path -------------------------------------------------------------


def select_decode_path(*, num_tokens: int, capacity: bool, one_token_backend: bool, plain_router: bool,
                       store_fits: bool, fused_router: bool) -> Choice:  # fmt: skip
    """``"native_decode"``: one token through the layer in two native calls (router + plan +
    gate/up, then down + combine), the general path's bits; ``"general"`` otherwise."""
    if num_tokens == 1 and not capacity and one_token_backend and plain_router and store_fits and fused_router:
        return _choice("native_decode", "one fp32 CPU token, dot-kernel backend, native router")
    return _choice("general", "not one token through a dot-kernel backend and the native router")
