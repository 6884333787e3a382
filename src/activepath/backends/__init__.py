"""The experts backends: ``registry`` (``BackendSpec``, ``register_backend``, ``run_experts``) and
the built-in ones, registered on import: ``reference``, ``torch`` (``grouped``, ``grouped_loop``,
``rowwise``), ``cpu_native`` (``native``) and ``triton`` (imports triton only when it runs)."""

from __future__ import annotations

from activepath.backends import cpu_native, reference, torch, triton
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

__all__ = [
    "DIFFERENTIABLE_FALLBACK",
    "BackendSpec",
    "backend_names",
    "cpu_native",
    "fuses_combine",
    "get_backend",
    "is_batch_invariant",
    "is_differentiable",
    "reference",
    "register_backend",
    "run_experts",
    "torch",
    "triton",
    "uses_workspace",
]
