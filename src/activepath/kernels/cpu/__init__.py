"""Native CPU kernels: small-batch fp32 GEMM for weights in nn.Linear layout, its int8 and
one-token variants, and the MoE glue around them.

Shape legend: M rows of activations, K input features, N output features, E stacked
weight matrices (experts), G segments (expert, row range).

``build`` compiles the C++ on first use for this CPU and says why the kernels are unavailable
when they are (``ACTIVEPATH_NATIVE=0``, ``ACTIVEPATH_NATIVE_FLAGS``: see there); ``gemm`` holds
the grouped GEMM entry points, ``moe_ops`` routing, dispatch-plan and combine glue, ``int8``
and ``token`` the int8 GEMM and the one-token decode calls. This module only re-exports the
public names, so ``from activepath.kernels import cpu as native; native.linear(...)`` works.
"""

from __future__ import annotations

from activepath.kernels.cpu.build import (
    DEFAULT_FLAGS,
    PARALLEL_MIN_BYTES,
    available,
    build_flags,
    disabled_by_env,
    is_enabled,
    set_enabled,
    simd_width,
    unavailable_reason,
)
from activepath.kernels.cpu.gemm import (
    M_BLOCK,
    N_BLOCK,
    PANEL_N_BLOCK,
    PANEL_ROWS,
    WEIGHT_DTYPES,
    grouped_nk_gemm,
    grouped_nk_gemm_panel,
    linear,
    panel_scratch_numel,
    supports,
    supports_weight,
)
from activepath.kernels.cpu.moe_ops import (
    combine,
    combine_inputs_fit,
    combine_prechecked,
    plan_dispatch,
    route_softmax_topk,
    route_softmax_topk_prechecked,
    router_inputs_fit,
    softmax_topk,
)

__all__ = [
    "DEFAULT_FLAGS",
    "M_BLOCK",
    "N_BLOCK",
    "PANEL_N_BLOCK",
    "PANEL_ROWS",
    "PARALLEL_MIN_BYTES",
    "WEIGHT_DTYPES",
    "available",
    "build_flags",
    "combine",
    "combine_inputs_fit",
    "combine_prechecked",
    "disabled_by_env",
    "grouped_nk_gemm",
    "grouped_nk_gemm_panel",
    "is_enabled",
    "linear",
    "panel_scratch_numel",
    "plan_dispatch",
    "route_softmax_topk",
    "route_softmax_topk_prechecked",
    "router_inputs_fit",
    "set_enabled",
    "simd_width",
    "softmax_topk",
    "supports",
    "supports_weight",
    "unavailable_reason",
]
