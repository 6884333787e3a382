"""Tiny random configs of every supported transformers MoE family, built the way users
build them (real model classes), with seeded weights large enough to route decisively."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers import (
    DeepseekV2Config,
    DeepseekV3Config,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

COMMON = dict(vocab_size=160, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# MLA: every attention head has its own latent key/value
_MLA = dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


def tiny_config(family: str) -> PretrainedConfig:
    if family == "mixtral":
        return MixtralConfig(**COMMON, num_hidden_layers=2, intermediate_size=48, num_local_experts=8,
                             num_experts_per_tok=2)
    if family == "qwen2_moe":
        # layer 1 is dense: optimize must leave it alone
        return Qwen2MoeConfig(**COMMON, num_hidden_layers=3, intermediate_size=80, moe_intermediate_size=32,
                              shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=3,
                              norm_topk_prob=False, mlp_only_layers=[1])
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**COMMON, num_hidden_layers=2, head_dim=16, intermediate_size=80,
                              moe_intermediate_size=32, num_experts=10, num_experts_per_tok=4, norm_topk_prob=True)
    if family == "olmoe":
        return OlmoeConfig(**COMMON, num_hidden_layers=2, intermediate_size=32, num_experts=8, num_experts_per_tok=2)
    if family == "deepseek_v3":
        return DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, **_MLA, num_hidden_layers=3, intermediate_size=80, moe_intermediate_size=32,
                                n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                                n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
                                norm_topk_prob=True)
    if family == "deepseek_v2":
        return DeepseekV2Config(**{**COMMON, "num_key_value_heads": 4}, **_MLA, num_hidden_layers=3, intermediate_size=80,
                                moe_intermediate_size=32, n_routed_experts=12, num_experts_per_tok=3, n_group=4,
                                topk_group=2, topk_method="group_limited_greedy", n_shared_experts=2,
                                first_k_dense_replace=1, routed_scaling_factor=1.5)
    if family == "gpt_oss":
        return GptOssConfig(**COMMON, num_hidden_layers=2, head_dim=16, intermediate_size=32, num_local_experts=8,
                            num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    raise ValueError(family)


FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2", "gpt_oss")


def tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: object):
    """An eval-mode model of ``family`` with seeded random weights, HF experts on 'eager'."""
    config = tiny_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    randomize_(model, seed)
    return model.to(dtype).eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights with spread: HF's init leaves routers and correction biases at zero."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if not p.is_floating_point() or "inv_freq" in name:
            continue
        if "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif p.dim() >= 2:
            fan_in = p.shape[-1] if "gate_up_proj" not in name or "gpt_oss" not in type(model).__module__ else p.shape[-2]
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
