# shapes → build → (layer | generate) bench → report
"""Model shapes registry: the public layer dimensions of real MoE models.

A shape plus a layer count and a vocabulary size gives a transformers config; the bench
builds realistic-size layers, fewer of them, so the weights exceed the last-level cache
as the real models' do. Presets are plain functions; ``SHAPES`` maps CLI names to them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PretrainedConfig

from activepath.validation import check_choice, check_positive_int

Family = str  # a transformers model_type this registry knows how to configure


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """Public dimensions of one MoE model (per layer), plus its published depth.

    ``moe_intermediate_size`` is one routed expert's I; ``dense_intermediate_size`` is the
    dense MLP's (DeepSeek's first layers) or 0. Attention: ``num_heads`` query heads of
    ``head_dim`` and ``num_kv_heads`` key/value heads (MLA ranks live in ``mla``).
    """

    name: str
    family: Family
    hidden_size: int
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    norm_topk_prob: bool = False
    num_shared_experts: int = 0
    dense_intermediate_size: int = 0
    first_k_dense: int = 0
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    mla: tuple[int, int | None, int, int, int] | None = None  # kv_lora, q_lora, qk_rope, qk_nope, v_head

    def __post_init__(self) -> None:
        check_choice("family", self.family, tuple(_CONFIG_BUILDERS))
        for field in ("hidden_size", "moe_intermediate_size", "num_experts", "top_k", "num_layers", "num_heads",
                      "num_kv_heads", "head_dim", "vocab_size"):
            check_positive_int(field, getattr(self, field))
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be <= num_experts={self.num_experts}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")

    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up, down; GPT-OSS adds biases)."""
        biases = 2 * self.moe_intermediate_size + self.hidden_size if self.family == "gpt_oss" else 0
        return 3 * self.hidden_size * self.moe_intermediate_size + biases


def tiny() -> ModelShape:
    """Small enough for CI: every figure is cache-resident and says so."""
    return ModelShape(name="tiny", family="qwen3_moe", hidden_size=64, moe_intermediate_size=32, num_experts=16,
                      top_k=4, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=256,
                      norm_topk_prob=True, max_position_embeddings=1024)


def qwen3_30b_a3b() -> ModelShape:
    return ModelShape(name="qwen3-30b-a3b", family="qwen3_moe", hidden_size=2048, moe_intermediate_size=768,
                      num_experts=128, top_k=8, num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128,
                      vocab_size=151936, norm_topk_prob=True, rope_theta=1_000_000.0, max_position_embeddings=40960)


def mixtral_8x7b() -> ModelShape:
    return ModelShape(name="mixtral-8x7b", family="mixtral", hidden_size=4096, moe_intermediate_size=14336,
                      num_experts=8, top_k=2, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                      vocab_size=32000, norm_topk_prob=True, rope_theta=1_000_000.0, max_position_embeddings=32768)


def olmoe_1b_7b() -> ModelShape:
    return ModelShape(name="olmoe-1b-7b", family="olmoe", hidden_size=2048, moe_intermediate_size=1024,
                      num_experts=64, top_k=8, num_layers=16, num_heads=16, num_kv_heads=16, head_dim=128,
                      vocab_size=50304, max_position_embeddings=4096)


def deepseek_v2_lite() -> ModelShape:
    return ModelShape(name="deepseek-v2-lite", family="deepseek_v2", hidden_size=2048, moe_intermediate_size=1408,
                      num_experts=64, top_k=6, num_layers=27, num_heads=16, num_kv_heads=16, head_dim=192,
                      vocab_size=102400, num_shared_experts=2, dense_intermediate_size=10944, first_k_dense=1,
                      max_position_embeddings=163840, mla=(512, None, 64, 128, 128))


def gpt_oss_20b() -> ModelShape:
    return ModelShape(name="gpt-oss-20b", family="gpt_oss", hidden_size=2880, moe_intermediate_size=2880,
                      num_experts=32, top_k=4, num_layers=24, num_heads=64, num_kv_heads=8, head_dim=64,
                      vocab_size=201088, rope_theta=150000.0, max_position_embeddings=131072, sliding_window=128)


SHAPES: dict[str, Callable[[], ModelShape]] = {
    "tiny": tiny,
    "qwen3-30b-a3b": qwen3_30b_a3b,
    "mixtral-8x7b": mixtral_8x7b,
    "olmoe-1b-7b": olmoe_1b_7b,
    "deepseek-v2-lite": deepseek_v2_lite,
    "gpt-oss-20b": gpt_oss_20b,
}


def get_shape(name: str) -> ModelShape:
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    return SHAPES[name]()


def hf_config(shape: ModelShape, *, layers: int | None = None, vocab: int | None = None) -> PretrainedConfig:
    """The transformers config of ``shape`` with ``layers`` decoder layers (default: the
    published depth) and a ``vocab``-token vocabulary (default: the published one)."""
    layers = shape.num_layers if layers is None else layers
    vocab = shape.vocab_size if vocab is None else vocab
    check_positive_int("layers", layers)
    check_positive_int("vocab", vocab)
    if layers <= shape.first_k_dense:
        raise ValueError(f"{shape.name} has {shape.first_k_dense} dense first layer(s): layers must be > that, got {layers}")
    common = dict(vocab_size=vocab, hidden_size=shape.hidden_size, num_hidden_layers=layers,
                  num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
                  max_position_embeddings=shape.max_position_embeddings, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return _CONFIG_BUILDERS[shape.family](shape, common)


def _qwen3_moe(shape: ModelShape, common: dict) -> PretrainedConfig:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**common, head_dim=shape.head_dim, intermediate_size=6144,
                          moe_intermediate_size=shape.moe_intermediate_size, num_experts=shape.num_experts,
                          num_experts_per_tok=shape.top_k, norm_topk_prob=shape.norm_topk_prob, rms_norm_eps=1e-6)


def _mixtral(shape: ModelShape, common: dict) -> PretrainedConfig:
    from transformers import MixtralConfig

    return MixtralConfig(**common, head_dim=shape.head_dim, intermediate_size=shape.moe_intermediate_size,
                         num_local_experts=shape.num_experts, num_experts_per_tok=shape.top_k, rms_norm_eps=1e-5)


def _olmoe(shape: ModelShape, common: dict) -> PretrainedConfig:
    from transformers import OlmoeConfig

    return OlmoeConfig(**common, intermediate_size=shape.moe_intermediate_size, num_experts=shape.num_experts,
                       num_experts_per_tok=shape.top_k, norm_topk_prob=shape.norm_topk_prob, rms_norm_eps=1e-5)


def _deepseek_v2(shape: ModelShape, common: dict) -> PretrainedConfig:
    from transformers import DeepseekV2Config

    assert shape.mla is not None
    kv_lora, q_lora, qk_rope, qk_nope, v_head = shape.mla
    return DeepseekV2Config(**common, intermediate_size=shape.dense_intermediate_size,
                            moe_intermediate_size=shape.moe_intermediate_size, n_routed_experts=shape.num_experts,
                            n_shared_experts=shape.num_shared_experts, num_experts_per_tok=shape.top_k,
                            first_k_dense_replace=shape.first_k_dense, kv_lora_rank=kv_lora, q_lora_rank=q_lora,
                            qk_rope_head_dim=qk_rope, qk_nope_head_dim=qk_nope, v_head_dim=v_head,
                            topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
                            norm_topk_prob=False, rms_norm_eps=1e-6)


def _gpt_oss(shape: ModelShape, common: dict) -> PretrainedConfig:
    from transformers import GptOssConfig

    layers = common["num_hidden_layers"]
    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    common = {**common, "rope_parameters": {"rope_type": "yarn", "rope_theta": shape.rope_theta, "factor": 32.0,
                                            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                            "original_max_position_embeddings": 4096}}
    return GptOssConfig(**common, head_dim=shape.head_dim, intermediate_size=shape.moe_intermediate_size,
                        num_local_experts=shape.num_experts, num_experts_per_tok=shape.top_k,
                        sliding_window=shape.sliding_window, layer_types=types, rms_norm_eps=1e-5)


_CONFIG_BUILDERS: dict[str, Callable[[ModelShape, dict], PretrainedConfig]] = {
    "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral,
    "olmoe": _olmoe,
    "deepseek_v2": _deepseek_v2,
    "gpt_oss": _gpt_oss,
}
