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

The dispatch stage borrows one more kernel from here: on CUDA, ``plan_dispatch`` builds its
plan with ``plan_on_device`` (a stable counting sort in one launch) for every backend.

The grouped GEMMs run over *blocks*: runs of up to ``block_m`` sorted slots of a single
expert. Each program works out its own block from the per-expert slot counts on the device,
so nothing is read back to the host and no block table is copied to the GPU: with the
device-side dispatch plan (``plan_dispatch`` off the CPU) a whole MoE layer runs without
waiting for the GPU, and can be captured in a CUDA graph. A program computes one block ×
``block_n`` output columns and streams that expert's weights once per block. Idle experts
get no blocks.

Where it runs: CUDA tensors, or CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, how CI checks the kernels on tiny shapes). Where it does not apply
(quantized experts, float64, no Triton, CPU tensors without the interpreter) the backend
says why, with a clear error. GPT-OSS's layout is supported: transposed [E, H, 2I] weights,
gate/up rows interleaved, biases and the clamped SwiGLU.

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

from activepath.moe.dispatch import DispatchPlan
from activepath.moe.experts import ExpertWeights

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


def unsupported_reason(weights: ExpertWeights, x_TH: torch.Tensor) -> str | None:
    """Why the Triton backend cannot run this layer on ``x_TH`` (None: it can)."""
    if not available():
        return "the triton package is not installed (pip install triton)"
    if x_TH.device.type != "cuda" and not interpreting():
        return (f"tensors on {x_TH.device} need CUDA, or Triton's CPU interpreter (TRITON_INTERPRET=1, set "
                "before triton is first imported)")
    if type(weights) is not ExpertWeights:
        return f"{type(weights).__name__} experts (quantized weights) have no Triton kernel"
    if weights.activation.kind not in _ACTIVATIONS:
        return f"activation {weights.activation.kind!r} has no Triton kernel"
    if x_TH.dtype != weights.dtype or x_TH.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"activations {x_TH.dtype} with {weights.dtype} weights (expected the same float dtype)"
    if x_TH.device != weights.w_gate_up.device:
        return f"activations on {x_TH.device}, weights on {weights.w_gate_up.device}"
    tensors = [t for t in (weights.w_gate_up, weights.w_down, weights.b_gate_up, weights.b_down) if t is not None]
    if any(t.stride(-1) != 1 for t in tensors):
        return "expert weights and biases must be contiguous along their last dimension"
    return None


def triton_experts(
    weights: ExpertWeights, x_TH: torch.Tensor, plan: DispatchPlan, *, topk_weights_TK: torch.Tensor,
    config: TritonConfig | None = None,
) -> torch.Tensor:
    """The layer's combined expert output y_TH [T, H], in the dtype of ``x_TH``. ``config``
    None: tiles by ``default_config``. Reads nothing back from the device: with a plan made
    on the device, the call never waits for the GPU (and can be captured in a CUDA graph)."""
    reason = unsupported_reason(weights, x_TH)
    if reason is not None:
        raise RuntimeError(f"the triton experts backend cannot run here: {reason}")
    if config is None:
        config = default_config(plan.order_S.shape[0], weights.num_experts, x_TH.dtype)
    x_TH = x_TH.contiguous()
    h_SI = _gate_up(weights, x_TH, plan, config)
    out_SH = _down_weighted(weights, h_SI, plan, topk_weights_TK, config)
    return combine_sorted(out_SH, plan, x_TH.dtype)


def _gate_up(weights: ExpertWeights, x_TH: torch.Tensor, plan: DispatchPlan, config: TritonConfig) -> torch.Tensor:
    kernels = _kernels()
    inter, hidden, num_experts = weights.intermediate_size, weights.hidden_size, weights.num_experts
    h_SI = torch.empty(plan.order_S.shape[0], inter, dtype=x_TH.dtype, device=x_TH.device)
    blocks = max_blocks(h_SI.shape[0], num_experts, config.block_m)
    if blocks == 0:
        return h_SI
    w = weights.w_gate_up.detach()
    bias = weights.b_gate_up
    act = weights.activation
    gate_step, up_off = (2, 1) if act.interleaved else (1, inter)
    grid = (blocks, -(-inter // config.block_n))
    kernels.gate_up_act[grid](
        x_TH, plan.token_idx_S, w, w if bias is None else bias.detach(), h_SI, plan.counts_E, num_experts, hidden,
        inter, x_TH.stride(0), w.stride(0), *_nk_strides(w, weights.transposed), 0 if bias is None else bias.stride(0),
        h_SI.stride(0), gate_step, up_off, float(act.alpha), float(act.limit),
        ACT=_ACTIVATIONS[act.kind], HAS_BIAS=bias is not None, IEEE=x_TH.dtype == torch.float32,
        UPCAST=interpreting(), E_POW2=_pow2(num_experts),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
    )  # fmt: skip
    return h_SI


def _down_weighted(weights: ExpertWeights, h_SI: torch.Tensor, plan: DispatchPlan, topk_weights_TK: torch.Tensor,
                   config: TritonConfig) -> torch.Tensor:  # fmt: skip
    kernels = _kernels()
    hidden, inter, num_experts = weights.hidden_size, weights.intermediate_size, weights.num_experts
    # fp32 rows: they are summed in fp32 by the combine kernel, as the CPU combine does.
    out_SH = torch.empty(h_SI.shape[0], hidden, dtype=torch.float32, device=h_SI.device)
    blocks = max_blocks(h_SI.shape[0], num_experts, config.block_m)
    if blocks == 0:
        return out_SH
    w = weights.w_down.detach()
    bias = weights.b_down
    weights_S = topk_weights_TK.reshape(-1).to(torch.float32).contiguous()  # no copy when already fp32
    grid = (blocks, -(-hidden // config.block_n))
    kernels.down_weighted[grid](
        h_SI, w, w if bias is None else bias.detach(), plan.order_S, weights_S, out_SH, plan.counts_E, num_experts,
        inter, hidden, h_SI.stride(0), w.stride(0), *_nk_strides(w, weights.transposed),
        0 if bias is None else bias.stride(0), out_SH.stride(0),
        HAS_BIAS=bias is not None, IEEE=h_SI.dtype == torch.float32, UPCAST=interpreting(), E_POW2=_pow2(num_experts),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
    )  # fmt: skip
    return out_SH


def _nk_strides(w: torch.Tensor, transposed: bool) -> tuple[int, int]:
    """(stride along the output dim N, stride along the reduction dim K) of stacked weights
    stored [E, N, K] (the nn.Linear layout) or, transposed (GPT-OSS), [E, K, N]."""
    return (w.stride(2), w.stride(1)) if transposed else (w.stride(1), w.stride(2))


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def combine_sorted(weighted_SH: torch.Tensor, plan: DispatchPlan, dtype: torch.dtype, block_h: int = 128) -> torch.Tensor:
    """y_TH[t] = the sum of token t's already-weighted rows of ``weighted_SH`` (sorted
    order), added in fp32 in ascending sorted position (= ascending expert id), cast to
    ``dtype``. Slots a capacity stage dropped are absent from the plan and add nothing."""
    kernels = _kernels()
    num_tokens, top_k, hidden = plan.num_tokens, plan.top_k, weighted_SH.shape[1]
    y_TH = torch.empty(num_tokens, hidden, dtype=dtype, device=weighted_SH.device)
    if num_tokens == 0:
        return y_TH
    grid = (num_tokens, -(-hidden // block_h))
    kernels.combine[grid](weighted_SH, plan.position_S, y_TH, hidden, top_k, weighted_SH.stride(0), y_TH.stride(0),
                          K_POW2=_pow2(top_k), BLOCK_H=block_h)  # fmt: skip
    return y_TH


# Up to this many slots the plan is one Triton launch (a counting sort: S^2/BLOCK_S compares per
# program); past it, torch's sort (the GPU is busy with the GEMMs there anyway).
PLAN_MAX_SLOTS = 8192
_PLAN_BLOCK_E = 16


def plan_on_device(topk_ids_TK: torch.Tensor, num_experts: int) -> DispatchPlan | None:
    """The dispatch plan of ``topk_ids_TK`` (ids in [0, E), unchecked) in one Triton launch:
    the same order, token ids, expert ids and counts as ``plan_dispatch`` (a stable sort),
    plus each slot's sorted position. None where it does not apply (no triton, CPU tensors
    without the interpreter, more than ``PLAN_MAX_SLOTS`` slots)."""
    num_tokens, top_k = topk_ids_TK.shape
    num_slots = num_tokens * top_k
    if not available() or (topk_ids_TK.device.type != "cuda" and not interpreting()):
        return None
    if not 0 < num_slots <= PLAN_MAX_SLOTS or topk_ids_TK.dtype not in (torch.int64, torch.int32):
        return None
    ids_S = topk_ids_TK.reshape(-1).contiguous()
    device = ids_S.device
    order_S, token_idx_S, expert_ids_S, position_S = (
        torch.empty(num_slots, dtype=torch.int64, device=device) for _ in range(4))  # fmt: skip
    counts_E = torch.empty(num_experts, dtype=torch.int64, device=device)
    # Small blocks of slots, long chunks: many programs, few serial steps each (on an H200,
    # 128-slot blocks took ~50 us at 4096 slots: 32 programs of 128 steps).
    chunk = min(128, max(16, _pow2(num_slots)))
    block_s = 16 if num_slots > 256 else chunk
    rank_programs, count_programs = -(-num_slots // block_s), -(-num_experts // _PLAN_BLOCK_E)
    _kernels().plan_slots[(rank_programs + count_programs,)](
        ids_S, order_S, token_idx_S, expert_ids_S, position_S, counts_E, num_slots, num_experts, top_k, rank_programs,
        BLOCK_S=block_s, BLOCK_E=_PLAN_BLOCK_E, CHUNK=chunk,
    )  # fmt: skip
    return DispatchPlan(order_S=order_S, token_idx_S=token_idx_S, expert_ids_S=expert_ids_S.to(topk_ids_TK.dtype),
                        counts_E=counts_E, num_tokens=num_tokens, top_k=top_k, given_position_S=position_S)  # fmt: skip


def _kernels() -> ModuleType:
    """The kernels; importing them imports triton, which only a call to this backend does."""
    from activepath.kernels.triton import kernels as triton_kernels

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
    variants = (("silu", "bf16", False), ("gelu", "fp32", True), ("gelu_tanh", "fp16", False),
                ("clamped_swiglu", "bf16", True))  # fmt: skip
    for act, dtype, bias in variants:
        ptrs = {"x_ptr": f"*{dtype}", "tok_ptr": "*i64", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}",
                "h_ptr": f"*{dtype}", "counts_ptr": "*i64"}  # fmt: skip
        flags = {"ACT": _ACTIVATIONS[act], "HAS_BIAS": bias, "IEEE": dtype == "fp32", "UPCAST": False,
                 "E_POW2": 128, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}  # fmt: skip
        signature = {**ptrs, "E": "i32", "H": "i32", "I": "i32", "stride_xt": "i32", "stride_we": "i64",
                     "stride_wn": "i32", "stride_wk": "i32", "stride_be": "i32", "stride_hs": "i32", "GATE_STEP": "i32",
                     "UP_OFF": "i32", "alpha": "fp32", "limit": "fp32", **dict.fromkeys(flags, "constexpr")}  # fmt: skip
        ptx[f"gate_up_act {act} {dtype}"] = _compile(triton, ASTSource, kernels.gate_up_act, signature, flags, target)
        down_ptrs = {"h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "order_ptr": "*i64",
                     "tw_ptr": "*fp32", "out_ptr": "*fp32", "counts_ptr": "*i64"}  # fmt: skip
        down_flags = {k: flags[k] for k in ("HAS_BIAS", "IEEE", "UPCAST", "E_POW2", "BLOCK_M", "BLOCK_N", "BLOCK_K")}
        down_sig = {**down_ptrs, "E": "i32", "I": "i32", "H": "i32", "stride_hs": "i32", "stride_we": "i64",
                    "stride_wn": "i32", "stride_wk": "i32", "stride_be": "i32", "stride_os": "i32",
                    **dict.fromkeys(down_flags, "constexpr")}  # fmt: skip
        ptx[f"down_weighted {act} {dtype}"] = _compile(triton, ASTSource, kernels.down_weighted, down_sig, down_flags, target)
        comb_sig = {"src_ptr": "*fp32", "pos_ptr": "*i64", "y_ptr": f"*{dtype}", "H": "i32", "K": "i32",
                    "stride_ss": "i32", "stride_yt": "i32", "K_POW2": "constexpr", "BLOCK_H": "constexpr"}  # fmt: skip
        ptx[f"combine {act} {dtype}"] = _compile(triton, ASTSource, kernels.combine, comb_sig, {"K_POW2": 8, "BLOCK_H": 128},
                                           target)  # fmt: skip
    plan_sig = {"ids_ptr": "*i64", **dict.fromkeys(("order_ptr", "token_ptr", "expert_ptr", "position_ptr", "counts_ptr"),
                "*i64"), "S": "i32", "E": "i32", "K": "i32", "RANK_PROGRAMS": "i32", "BLOCK_S": "constexpr",
                "BLOCK_E": "constexpr", "CHUNK": "constexpr"}  # fmt: skip
    ptx["plan_slots"] = _compile(triton, ASTSource, kernels.plan_slots, plan_sig,
                                 {"BLOCK_S": 16, "BLOCK_E": 16, "CHUNK": 128}, target)  # fmt: skip
    return ptx


def _compile(triton: ModuleType, ast_source: type, fn: object, signature: dict, constexprs: dict, target: object) -> str:
    source = ast_source(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=target, options={"num_warps": 4}).asm["ptx"]
