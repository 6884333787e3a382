"""activepath: sparse Mixture-of-Experts inference — only what is used is executed."""

from __future__ import annotations

from activepath.adapters import OptimizeOptions, supported_model_types
from activepath.moe.combine import combine
from activepath.moe.dispatch import DispatchPlan, plan_dispatch
from activepath.backends import backend_names, fuses_combine, get_backend, is_batch_invariant, register_backend
from activepath.moe.activation import ActivationConfig
from activepath.moe.weights import ExpertWeights
from activepath.api import load, moe_layers, optimize
from activepath.moe.layer import MoEStats, SharedExperts, SparseMoE
from activepath.runtime.process import AllocatorConfig, AllocatorState, freeze_loaded_objects, frozen_gc, tune_allocator
from activepath.moe.routing import Router, RouterConfig, RoutingResult, route

__version__ = "0.1.0"

__all__ = [
    "ActivationConfig",
    "AllocatorConfig",
    "AllocatorState",
    "DispatchPlan",
    "ExpertWeights",
    "MoEStats",
    "OptimizeOptions",
    "Router",
    "RouterConfig",
    "RoutingResult",
    "SharedExperts",
    "SparseMoE",
    "backend_names",
    "combine",
    "freeze_loaded_objects",
    "frozen_gc",
    "fuses_combine",
    "get_backend",
    "is_batch_invariant",
    "load",
    "moe_layers",
    "optimize",
    "plan_dispatch",
    "register_backend",
    "route",
    "supported_model_types",
    "tune_allocator",
]
