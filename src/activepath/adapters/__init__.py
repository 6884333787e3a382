"""Family adapters: one small file per transformers MoE family."""

from __future__ import annotations

from activepath.adapters import deepseek_v2, deepseek_v3, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe
from activepath.adapters.base import FamilyAdapter, OptimizeOptions

ADAPTERS: dict[str, FamilyAdapter] = {
    m.ADAPTER.model_type: m.ADAPTER for m in (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, deepseek_v2, gpt_oss)
}


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(ADAPTERS))


def adapter_for(model_type: str) -> FamilyAdapter:
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())}")
    return ADAPTERS[model_type]


__all__ = ["ADAPTERS", "FamilyAdapter", "OptimizeOptions", "adapter_for", "supported_model_types"]
