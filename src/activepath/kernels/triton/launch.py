# route → dispatch → [experts → combine] on a GPU: the tensor-level Triton launches
"""Tensor-level launches of the Triton MoE kernels (``kernels``), on raw tensors only.

The ``triton`` experts backend (``activepath.backends.triton``) turns an expert store and a
dispatch plan into these calls. Importing this module does not import triton: the jit
kernels load on the first launch. Nothing here imports ``moe``, ``backends`` or ``dense``.

Shape legend: T tokens, K experts per token, S = T*K slots (sorted by expert), H hidden,
I expert intermediate, E experts; N output and K reduction columns of a weight.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from types import ModuleType

import torch

_ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "clamped_swiglu": 3}  # kind → triton_kernels' ACT constant


def available() -> bool:
    """Whether the triton package can be imported (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter. Triton fixes that when it is first
    imported (from ``TRITON_INTERPRET=1``), so once it is imported its own mode decides."""
    standard = sys.modules.get("triton.language.standard")
    if standard is not None:
        return type(standard.zeros).__name__ == "InterpretedFunction"
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True, kw_only=True)
class TritonConfig:
    """Tile sizes of the grouped GEMMs. ``block_m`` slots per block (``tl.dot`` needs ≥ 16),
    ``block_n`` output columns and ``block_k`` reduction steps per program; powers of two."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps!r}")


def max_blocks(num_slots: int, num_experts: int, block_m: int) -> int:
    """The most blocks ``num_slots`` sorted slots can need: one per ``block_m`` slots, plus
    at most one partial block per active expert. The GEMM grids have this many rows, from
    host ints alone (no read of the per-expert counts); the programs past the real blocks
    find an empty block and return (``triton_kernels._block``)."""
    return -(-num_slots // block_m) + min(num_experts, num_slots)


def default_config(num_slots: int, num_experts: int, dtype: torch.dtype) -> TritonConfig:
    """Tiles by the mean slots per active expert, m = S / min(E, S) (host ints: no sync).
    Chosen from the tile sweep on an H200 (bf16, Qwen3-30B-A3B layer,
    benchmarks/results/qwen3-30b-a3b_layer_h200_bf16_before_tiles.json, kernels alone):
    16x32x128 was the fastest at 1-64 tokens (m 1-4), 64x64x64 at 512 tokens (m 32, 0.36 vs
    0.46 ms for 16x64x64) and 128x128x64 with 8 warps at 4096 (m 256, 1.0 vs 2.2 ms). fp32
    keeps the small tiles: its tiles take twice the registers and shared memory, and no
    fp32 sweep has been run."""
    if dtype == torch.float32:
        return TritonConfig()
    m = num_slots / max(1, min(num_experts, num_slots))
    if m < 24:
        return _DECODE_TILES
    if m < 128:
        return TritonConfig(block_m=64, block_n=64, block_k=64, num_warps=4)
    return TritonConfig(block_m=128, block_n=128, block_k=64, num_warps=8)


_DECODE_TILES = TritonConfig(block_m=16, block_n=32, block_k=128, num_warps=4)



def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()


def jit_kernels() -> ModuleType:
    """The kernels; importing them imports triton, which only a launch does."""
    from activepath.kernels.triton import kernels as triton_kernels

    return triton_kernels


def activation_code(kind: str) -> int | None:
    """``kernels``' ACT constant of a gated activation kind (None: no kernel for it)."""
    return _ACTIVATIONS.get(kind)


@dataclass(frozen=True, kw_only=True)
class GatedActivation:
    """The activation's parameters as the gate/up kernel takes them."""

    kind: str
    alpha: float
    limit: float
    interleaved: bool


def gate_up_act(x_TH: torch.Tensor, token_idx_S: torch.Tensor, counts_E: torch.Tensor, w: torch.Tensor,
                bias: torch.Tensor | None, *, transposed: bool, act: GatedActivation, inter: int,
                config: TritonConfig) -> torch.Tensor:  # fmt: skip
    """h_SI = act(gate) * up of each sorted slot's token row (gathered in the kernel) through its
    expert's stacked gate/up weights ``w`` ([E, 2I, H], or [E, H, 2I] when ``transposed``)."""
    num_experts, hidden = counts_E.shape[0], x_TH.shape[1]
    h_SI = torch.empty(token_idx_S.shape[0], inter, dtype=x_TH.dtype, device=x_TH.device)
    blocks = max_blocks(h_SI.shape[0], num_experts, config.block_m)
    if blocks == 0:
        return h_SI
    gate_step, up_off = (2, 1) if act.interleaved else (1, inter)
    grid = (blocks, -(-inter // config.block_n))
    jit_kernels().gate_up_act[grid](
        x_TH, token_idx_S, w, w if bias is None else bias, h_SI, counts_E, num_experts, hidden,
        inter, x_TH.stride(0), w.stride(0), *_nk_strides(w, transposed), 0 if bias is None else bias.stride(0),
        h_SI.stride(0), gate_step, up_off, float(act.alpha), float(act.limit),
        ACT=_ACTIVATIONS[act.kind], HAS_BIAS=bias is not None, IEEE=x_TH.dtype == torch.float32,
        UPCAST=interpreting(), E_POW2=pow2(num_experts),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
    )  # fmt: skip
    return h_SI


def down_weighted(h_SI: torch.Tensor, order_S: torch.Tensor, weights_S: torch.Tensor, counts_E: torch.Tensor,
                  w: torch.Tensor, bias: torch.Tensor | None, *, transposed: bool, hidden: int,
                  config: TritonConfig) -> torch.Tensor:  # fmt: skip
    """out_SH (fp32) = each sorted slot's down projection scaled by its routing weight
    ``weights_S[order_S[j]]`` (fp32, slot order)."""
    num_experts, inter = counts_E.shape[0], h_SI.shape[1]
    # fp32 rows: they are summed in fp32 by the combine kernel, as the CPU combine does.
    out_SH = torch.empty(h_SI.shape[0], hidden, dtype=torch.float32, device=h_SI.device)
    blocks = max_blocks(h_SI.shape[0], num_experts, config.block_m)
    if blocks == 0:
        return out_SH
    grid = (blocks, -(-hidden // config.block_n))
    jit_kernels().down_weighted[grid](
        h_SI, w, w if bias is None else bias, order_S, weights_S, out_SH, counts_E, num_experts,
        inter, hidden, h_SI.stride(0), w.stride(0), *_nk_strides(w, transposed),
        0 if bias is None else bias.stride(0), out_SH.stride(0),
        HAS_BIAS=bias is not None, IEEE=h_SI.dtype == torch.float32, UPCAST=interpreting(), E_POW2=pow2(num_experts),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
    )  # fmt: skip
    return out_SH


def _nk_strides(w: torch.Tensor, transposed: bool) -> tuple[int, int]:
    """(stride along the output dim N, stride along the reduction dim K) of stacked weights
    stored [E, N, K] (the nn.Linear layout) or, transposed (GPT-OSS), [E, K, N]."""
    return (w.stride(2), w.stride(1)) if transposed else (w.stride(1), w.stride(2))


def combine_sorted(weighted_SH: torch.Tensor, position_S: torch.Tensor, num_tokens: int, top_k: int,
                   dtype: torch.dtype, block_h: int = 128) -> torch.Tensor:  # fmt: skip
    """y_TH[t] = the sum of token t's already-weighted rows of ``weighted_SH`` (sorted order;
    ``position_S[t*K + k]`` the sorted position of slot (t, k), -1 when dropped), added in fp32
    in ascending sorted position (= ascending expert id), cast to ``dtype``."""
    hidden = weighted_SH.shape[1]
    y_TH = torch.empty(num_tokens, hidden, dtype=dtype, device=weighted_SH.device)
    if num_tokens == 0:
        return y_TH
    grid = (num_tokens, -(-hidden // block_h))
    jit_kernels().combine[grid](weighted_SH, position_S, y_TH, hidden, top_k, weighted_SH.stride(0), y_TH.stride(0),
                                K_POW2=pow2(top_k), BLOCK_H=block_h)  # fmt: skip
    return y_TH
