# route → dispatch → [experts] → combine
"""Where the experts stage used to live, kept so old imports keep working.

The stage is now split by concern: the stores in ``moe.weights`` (``ExpertStore``,
``ExpertWeights``) and ``moe.weights_int8``, the activation in ``moe.activation``, the backends
and their registry in ``activepath.backends``. Import from there.
"""

from __future__ import annotations

from activepath.backends.cpu_native import native_experts
from activepath.backends.reference import reference_experts
from activepath.backends.registry import (
    DIFFERENTIABLE_FALLBACK,
    BackendSpec,
    backend_names,
    fuses_combine,
    get_backend,
    is_batch_invariant,
    is_differentiable,
    register_backend,
    run_experts,
    uses_workspace,
)
from activepath.backends.torch import grouped_experts, grouped_loop_experts, rowwise_experts
from activepath.kernels.policy import NATIVE_MAX_ROWS, NATIVE_MAX_ROWS_BF16
from activepath.moe.activation import ActivationConfig, ActivationKind, activate_into, gated_activation
from activepath.moe.weights import ExpertStore, ExpertWeights

__all__ = [
    "DIFFERENTIABLE_FALLBACK", "NATIVE_MAX_ROWS", "NATIVE_MAX_ROWS_BF16", "ActivationConfig", "ActivationKind",
    "BackendSpec", "ExpertStore", "ExpertWeights", "activate_into", "backend_names", "fuses_combine",
    "gated_activation", "get_backend", "grouped_experts", "grouped_loop_experts", "is_batch_invariant",
    "is_differentiable", "native_experts", "reference_experts", "register_backend", "rowwise_experts",
    "run_experts", "uses_workspace",
]  # fmt: skip
