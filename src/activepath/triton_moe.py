# route → dispatch → [experts → combine], fused, on a GPU
"""The ``triton`` experts backend: the MoE layer's expert work in three Triton kernels.

1. **gate/up + activation.** A grouped GEMM over the slots sorted by expert. The gather is
   fused: rows of x are loaded by token index, so no [S, H] copy exists. The gated
   activation runs in the epilogue, so only h = act(gate) * up ([S, I]) is written.
2. **down + routing weight.** The second grouped GEMM; its epilogue scales each slot's row
   by its routing weight.
3. **combine.** Each token sums its K weighted rows in a fixed order: ascending expert id,
   the order the CPU ``combine`` uses. There are no atomics, so the result does not depend
   on scheduling (``torch.index_add_`` on CUDA does).

The grouped GEMMs run over *blocks*: runs of up to ``block_m`` sorted slots of a single
expert (``plan_blocks``). A program computes one block × ``block_n`` output columns and
streams that expert's weights once per block. Idle experts get no blocks.

Where it runs: CUDA tensors, or CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, how CI checks the kernels on tiny shapes). Where it does not apply
(GPT-OSS's transposed, interleaved experts and clamped SwiGLU; no Triton; CPU tensors without
the interpreter) the backend says why, with a clear error.

Other tile sizes are one registration away (the defaults are not yet tuned on a GPU):

    register_backend("triton_m64", functools.partial(triton_experts, config=TritonConfig(block_m=64)),
                     fuses_combine=True)

Shape legend: T tokens, K experts per token, S = T*K slots (sorted by expert), H hidden,
I expert intermediate, E experts, B blocks.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from types import ModuleType

import torch

from .combine import token_slot_positions
from .dispatch import DispatchPlan
from .experts import ExpertWeights

_ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}  # kind → triton_kernels' ACT constant


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


@dataclass(frozen=True)
class BlockPlan:
    """Block b covers sorted slots ``lo_B[b]:hi_B[b]`` of expert ``expert_B[b]`` (int32, on
    the device of the slots)."""

    expert_B: torch.Tensor
    lo_B: torch.Tensor
    hi_B: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.expert_B.shape[0]


def plan_blocks(plan: DispatchPlan, block_m: int, device: torch.device) -> BlockPlan:
    """Cut every active expert's run of sorted slots into blocks of at most ``block_m``,
    on the host from ``plan``'s counts (host ints already), then one host → device copy.
    A Python list while blocks are few (decode: ~20 us for 8 blocks), tensor ops past
    ``_LIST_MAX_BLOCKS`` (a 4096-token prefill: ~2000 blocks in 0.15 ms instead of 0.8)."""
    if sum((c + block_m - 1) // block_m for c in plan.counts) <= _LIST_MAX_BLOCKS:
        rows = [(e, lo, min(lo + block_m, hi)) for e, start, hi in plan.segments for lo in range(start, hi, block_m)]
        table = torch.tensor(rows, dtype=torch.int32).reshape(-1, 3).t()
    else:
        counts_E = torch.tensor(plan.counts, dtype=torch.int64)
        starts_E = torch.tensor(plan.offsets[:-1], dtype=torch.int64)
        blocks_E = (counts_E + block_m - 1) // block_m
        expert_B = torch.repeat_interleave(torch.arange(len(plan.counts)), blocks_E)
        first_E = torch.cumsum(blocks_E, 0) - blocks_E  # each expert's first block
        lo_B = starts_E[expert_B] + (torch.arange(expert_B.shape[0]) - first_E[expert_B]) * block_m
        hi_B = torch.minimum(lo_B + block_m, starts_E[expert_B] + counts_E[expert_B])
        table = torch.stack([expert_B, lo_B, hi_B]).to(torch.int32)
    table = table.contiguous().to(device)
    return BlockPlan(table[0], table[1], table[2])


_LIST_MAX_BLOCKS = 256


def unsupported_reason(weights: ExpertWeights, x_TH: torch.Tensor) -> str | None:
    """Why the Triton backend cannot run this layer on ``x_TH`` (None: it can)."""
    if not available():
        return "the triton package is not installed (pip install triton)"
    if x_TH.device.type != "cuda" and not interpreting():
        return (f"tensors on {x_TH.device} need CUDA, or Triton's CPU interpreter (TRITON_INTERPRET=1, set "
                "before triton is first imported)")
    if type(weights) is not ExpertWeights:
        return f"{type(weights).__name__} experts (quantized weights) have no Triton kernel"
    if weights.transposed or weights.activation.interleaved:
        return "transposed / interleaved gate-up experts (GPT-OSS) have no Triton kernel"
    if weights.activation.kind not in _ACTIVATIONS:
        return f"activation {weights.activation.kind!r} has no Triton kernel"
    if x_TH.dtype != weights.dtype or x_TH.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"activations {x_TH.dtype} with {weights.dtype} weights (expected the same float dtype)"
    if x_TH.device != weights.w_gate_up.device:
        return f"activations on {x_TH.device}, weights on {weights.w_gate_up.device}"
    tensors = [t for t in (weights.w_gate_up, weights.w_down, weights.b_gate_up, weights.b_down) if t is not None]
    if any(t.stride(-1) != 1 for t in tensors):
        return "expert weights and biases must be contiguous along their last dimension (the kernels' K)"
    return None


def triton_experts(
    weights: ExpertWeights, x_TH: torch.Tensor, plan: DispatchPlan, *, topk_weights_TK: torch.Tensor,
    config: TritonConfig = TritonConfig(),
) -> torch.Tensor:
    """The layer's combined expert output y_TH [T, H], in the dtype of ``x_TH``."""
    reason = unsupported_reason(weights, x_TH)
    if reason is not None:
        raise RuntimeError(f"the triton experts backend cannot run here: {reason}")
    x_TH = x_TH.contiguous()
    blocks = plan_blocks(plan, config.block_m, x_TH.device)
    h_SI = _gate_up(weights, x_TH, plan, blocks, config)
    out_SH = _down_weighted(weights, h_SI, plan, blocks, topk_weights_TK, config)
    return combine_sorted(out_SH, plan, x_TH.dtype)


def _gate_up(weights: ExpertWeights, x_TH: torch.Tensor, plan: DispatchPlan, blocks: BlockPlan,
             config: TritonConfig) -> torch.Tensor:  # fmt: skip
    kernels = _kernels()
    inter, hidden = weights.intermediate_size, weights.hidden_size
    h_SI = torch.empty(plan.order_S.shape[0], inter, dtype=x_TH.dtype, device=x_TH.device)
    if blocks.num_blocks == 0:
        return h_SI
    w = weights.w_gate_up.detach()
    bias = weights.b_gate_up
    grid = (blocks.num_blocks, -(-inter // config.block_n))
    kernels.gate_up_act[grid](
        x_TH, plan.token_idx_S.to(torch.int32), w, w if bias is None else bias.detach(), h_SI,
        blocks.expert_B, blocks.lo_B, blocks.hi_B, hidden, inter,
        x_TH.stride(0), w.stride(0), w.stride(1), 0 if bias is None else bias.stride(0), h_SI.stride(0),
        ACT=_ACTIVATIONS[weights.activation.kind], HAS_BIAS=bias is not None, IEEE=x_TH.dtype == torch.float32,
        UPCAST=interpreting(),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
    )  # fmt: skip
    return h_SI


def _down_weighted(weights: ExpertWeights, h_SI: torch.Tensor, plan: DispatchPlan, blocks: BlockPlan,
                   topk_weights_TK: torch.Tensor, config: TritonConfig) -> torch.Tensor:  # fmt: skip
    kernels = _kernels()
    hidden, inter = weights.hidden_size, weights.intermediate_size
    # fp32 rows: they are summed in fp32 by the combine kernel, as the CPU combine does.
    out_SH = torch.empty(h_SI.shape[0], hidden, dtype=torch.float32, device=h_SI.device)
    if blocks.num_blocks == 0:
        return out_SH
    w = weights.w_down.detach()
    bias = weights.b_down
    slot_weight_S = topk_weights_TK.reshape(-1).index_select(0, plan.order_S).to(torch.float32).contiguous()
    grid = (blocks.num_blocks, -(-hidden // config.block_n))
    kernels.down_weighted[grid](
        h_SI, w, w if bias is None else bias.detach(), slot_weight_S, out_SH,
        blocks.expert_B, blocks.lo_B, blocks.hi_B, inter, hidden,
        h_SI.stride(0), w.stride(0), w.stride(1), 0 if bias is None else bias.stride(0), out_SH.stride(0),
        HAS_BIAS=bias is not None, IEEE=h_SI.dtype == torch.float32, UPCAST=interpreting(),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
    )  # fmt: skip
    return out_SH


def combine_sorted(weighted_SH: torch.Tensor, plan: DispatchPlan, dtype: torch.dtype, block_h: int = 128) -> torch.Tensor:
    """y_TH[t] = the sum of token t's already-weighted rows of ``weighted_SH`` (sorted
    order), added in fp32 in ascending sorted position (= ascending expert id), cast to
    ``dtype``. Slots a capacity stage dropped are absent from the plan and add nothing."""
    kernels = _kernels()
    num_tokens, top_k, hidden = plan.num_tokens, plan.top_k, weighted_SH.shape[1]
    pos_TK = token_slot_positions(plan, missing=-1, dtype=torch.int32).contiguous()  # the kernel skips -1
    y_TH = torch.empty(num_tokens, hidden, dtype=dtype, device=weighted_SH.device)
    if num_tokens == 0:
        return y_TH
    grid = (num_tokens, -(-hidden // block_h))
    kernels.combine[grid](weighted_SH, pos_TK, y_TH, hidden, top_k, weighted_SH.stride(0), y_TH.stride(0),
                          BLOCK_H=block_h)  # fmt: skip
    return y_TH


def _kernels() -> ModuleType:
    """The kernels; importing them imports triton, which only a call to this backend does."""
    from . import triton_kernels

    return triton_kernels


def compile_kernels(arch: int = 90) -> dict[str, str]:
    """Compile every kernel, in representative variants, for NVIDIA ``sm_{arch}``; no GPU is
    needed (triton ships the compiler and ptxas). Returns variant → PTX. Catches what the CPU
    interpreter cannot: compile-time rules (constexpr globals, types) and whether the bf16
    GEMMs use tensor cores. Needs triton imported in compiled mode (TRITON_INTERPRET unset)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = _kernels()
    target = GPUTarget("cuda", arch, 32)
    ptx: dict[str, str] = {}
    for act, dtype, bias in (("silu", "bf16", False), ("gelu", "fp32", True), ("gelu_tanh", "fp16", False)):
        ptrs = {"x_ptr": f"*{dtype}", "tok_ptr": "*i32", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}",
                "h_ptr": f"*{dtype}", "blk_e_ptr": "*i32", "blk_lo_ptr": "*i32", "blk_hi_ptr": "*i32"}  # fmt: skip
        flags = {"ACT": _ACTIVATIONS[act], "HAS_BIAS": bias, "IEEE": dtype == "fp32", "UPCAST": False,
                 "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}  # fmt: skip
        signature = {**ptrs, "H": "i32", "I": "i32", "stride_xt": "i32", "stride_we": "i64", "stride_wn": "i32",
                     "stride_be": "i32", "stride_hs": "i32", **dict.fromkeys(flags, "constexpr")}  # fmt: skip
        ptx[f"gate_up_act {act} {dtype}"] = _compile(triton, ASTSource, kernels.gate_up_act, signature, flags, target)
        down_ptrs = {"h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "sw_ptr": "*fp32",
                     "out_ptr": "*fp32", "blk_e_ptr": "*i32", "blk_lo_ptr": "*i32", "blk_hi_ptr": "*i32"}  # fmt: skip
        down_flags = {k: flags[k] for k in ("HAS_BIAS", "IEEE", "UPCAST", "BLOCK_M", "BLOCK_N", "BLOCK_K")}
        down_sig = {**down_ptrs, "I": "i32", "H": "i32", "stride_hs": "i32", "stride_we": "i64", "stride_wn": "i32",
                    "stride_be": "i32", "stride_os": "i32", **dict.fromkeys(down_flags, "constexpr")}  # fmt: skip
        ptx[f"down_weighted {dtype}"] = _compile(triton, ASTSource, kernels.down_weighted, down_sig, down_flags, target)
        comb_sig = {"src_ptr": "*fp32", "pos_ptr": "*i32", "y_ptr": f"*{dtype}", "H": "i32", "K": "i32",
                    "stride_ss": "i32", "stride_yt": "i32", "BLOCK_H": "constexpr"}  # fmt: skip
        ptx[f"combine {dtype}"] = _compile(triton, ASTSource, kernels.combine, comb_sig, {"BLOCK_H": 128}, target)
    return ptx


def _compile(triton: ModuleType, ast_source: type, fn: object, signature: dict, constexprs: dict, target: object) -> str:
    source = ast_source(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=target, options={"num_warps": 4}).asm["ptx"]
