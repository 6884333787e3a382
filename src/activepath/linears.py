"""The model's dense projections (attention, shared experts, lm_head) through the native
small-batch kernel.

At decode a model reads every dense weight once per token; BLAS's one-row product leaves a
third of the memory bandwidth unused on the CPUs we measured, the native kernel does not.
Patching is per module instance (``forward`` replaced), so the model keeps its classes,
parameters and state dict; the original path is used for many rows (prefill, where BLAS's
blocked GEMM is faster), for autograd, and for anything not fp32 on CPU.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from . import native

# Up to this many rows the native kernel measured faster than BLAS (see NATIVE_MAX_ROWS).
LINEAR_MAX_ROWS = 64


def patch_linears(model: nn.Module, *, max_rows: int = LINEAR_MAX_ROWS) -> int:
    """Route every fp32 CPU ``nn.Linear`` of ``model`` through the native kernel when the
    input has at most ``max_rows`` rows. Returns how many modules were patched (0 when the
    native kernels are unavailable)."""
    if not native.available():
        return 0
    patched = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu":
            module.forward = types.MethodType(_make_forward(max_rows), module)
            patched += 1
    return patched


def _make_forward(max_rows: int):
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        x_MK = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
        if 0 < x_MK.shape[0] <= max_rows and native.supports(x_MK, self.weight):
            y_MN = native.linear(x_MK, self.weight, self.bias)
            return y_MN.reshape(*x.shape[:-1], y_MN.shape[-1])
        return F.linear(x, self.weight, self.bias)

    return forward
