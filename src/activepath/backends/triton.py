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

The dispatch stage uses one more kernel: on CUDA, ``plan_dispatch`` builds its plan with
``moe.dispatch.plan_on_device`` (``kernels.triton.plan``: a stable counting sort in one
launch) for every backend. The launches themselves are ``kernels.triton.launch``.

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

import torch

from activepath.backends.registry import register_backend
from activepath.kernels.policy import PLAN_MAX_SLOTS, Choice
from activepath.kernels.triton import launch
from activepath.kernels.triton.aot import compile_kernels
from activepath.kernels.triton.launch import (
    GatedActivation,
    TritonConfig,
    activation_code,
    available,
    default_config,
    down_weighted,
    gate_up_act,
    interpreting,
    max_blocks,
)
from activepath.moe.dispatch import plan_on_device
from activepath.moe.types import DispatchPlan
from activepath.moe.weights import ExpertStore

__all__ = ["PLAN_MAX_SLOTS", "TritonConfig", "available", "combine_sorted", "compile_kernels", "default_config",
           "interpreting", "max_blocks", "plan_on_device", "triton_experts", "unsupported_reason"]  # fmt: skip
_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
_pow2 = launch.pow2  # the tests size their probe grids with it


def unsupported_reason(store: ExpertStore, x_TH: torch.Tensor) -> str | None:
    """Why the Triton backend cannot run this layer on ``x_TH`` (None: it can)."""
    if not available():
        return "the triton package is not installed (pip install triton)"
    if x_TH.device.type != "cuda" and not interpreting():
        return (f"tensors on {x_TH.device} need CUDA, or Triton's CPU interpreter (TRITON_INTERPRET=1, set "
                "before triton is first imported)")
    if store.format != "float":
        return f"{store.format!r} expert stores (quantized weights) have no Triton kernel"
    if activation_code(store.activation.kind) is None:
        return f"activation {store.activation.kind!r} has no Triton kernel"
    if x_TH.dtype != store.dtype or x_TH.dtype not in _FLOAT:
        return f"activations {x_TH.dtype} with {store.dtype} weights (expected the same float dtype)"
    if x_TH.device != store.device:
        return f"activations on {x_TH.device}, weights on {store.device}"
    tensors = [t for t in (store.w_gate_up, store.w_down, store.b_gate_up, store.b_down) if t is not None]
    if any(t.stride(-1) != 1 for t in tensors):
        return "expert weights and biases must be contiguous along their last dimension"
    return None


def triton_experts(
    store: ExpertStore, x_TH: torch.Tensor, plan: DispatchPlan, *, topk_weights_TK: torch.Tensor,
    config: TritonConfig | None = None,
) -> torch.Tensor:  # fmt: skip
    """The layer's combined expert output y_TH [T, H], in the dtype of ``x_TH``. ``config``
    None: tiles by ``default_config``. Reads nothing back from the device: with a plan made
    on the device, the call never waits for the GPU (and can be captured in a CUDA graph)."""
    reason = unsupported_reason(store, x_TH)
    if reason is not None:
        raise RuntimeError(f"the triton experts backend cannot run here: {reason}")
    if config is None:
        config = default_config(plan.order_S.shape[0], store.num_experts, x_TH.dtype)
    x_TH = x_TH.contiguous()
    transposed = store.layout == "kn"
    act = store.activation
    gated = GatedActivation(kind=act.kind, alpha=act.alpha, limit=act.limit, interleaved=act.interleaved)
    h_SI = gate_up_act(x_TH, plan.token_idx_S, plan.counts_E, store.w_gate_up.detach(), _detached(store.b_gate_up),
                       transposed=transposed, act=gated, inter=store.intermediate_size, config=config)  # fmt: skip
    weights_S = topk_weights_TK.reshape(-1).to(torch.float32).contiguous()  # no copy when already fp32
    out_SH = down_weighted(h_SI, plan.order_S, weights_S, plan.counts_E, store.w_down.detach(),
                           _detached(store.b_down), transposed=transposed, hidden=store.hidden_size,
                           config=config)  # fmt: skip
    return combine_sorted(out_SH, plan, x_TH.dtype)


def combine_sorted(weighted_SH: torch.Tensor, plan: DispatchPlan, dtype: torch.dtype, block_h: int = 128) -> torch.Tensor:
    """y_TH[t] = the sum of token t's already-weighted rows of ``weighted_SH`` (sorted
    order), added in fp32 in ascending sorted position (= ascending expert id), cast to
    ``dtype``. Slots a capacity stage dropped are absent from the plan and add nothing."""
    return launch.combine_sorted(weighted_SH, plan.position_S, plan.num_tokens, plan.top_k, dtype, block_h)


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _select(store: ExpertStore, x_TH: torch.Tensor, plan: DispatchPlan) -> Choice:
    reason = unsupported_reason(store, x_TH)
    return Choice(path="triton", reason=reason or "fused gate/up+activation, down+weight, combine kernels")


def _triton_experts(store: ExpertStore, x_TH: torch.Tensor, plan: DispatchPlan, *,
                    topk_weights_TK: torch.Tensor) -> torch.Tensor:  # fmt: skip
    return triton_experts(store, x_TH, plan, topk_weights_TK=topk_weights_TK)


TRITON = register_backend("triton", _triton_experts, fuses_combine=True, devices=frozenset({"cuda", "cpu"}),
                          dtypes=frozenset(_FLOAT), formats=frozenset({"float"}), select=_select)  # fmt: skip
