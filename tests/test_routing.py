"""Routing against a float64 plain-Python oracle, and its config validation."""

from __future__ import annotations

import pytest
import torch

from activepath import RouterConfig, route
from oracle import route_oracle

CONFIGS = {
    "softmax_topk": RouterConfig(num_experts=8, top_k=2),
    "softmax_topk_norm": RouterConfig(num_experts=10, top_k=4, normalize_topk=True),
    "topk_then_softmax": RouterConfig(num_experts=8, top_k=3, order="topk_then_softmax"),
    "sigmoid_grouped_v3": RouterConfig(num_experts=16, top_k=4, scoring="sigmoid", normalize_topk=True,
                                       n_group=4, topk_group=2, routed_scaling_factor=2.5, logits_precision="fp32"),
    "softmax_grouped_v2": RouterConfig(num_experts=12, top_k=3, n_group=4, topk_group=2, group_score="max",
                                       routed_scaling_factor=1.5, logits_precision="fp32"),
    "top1_of_1": RouterConfig(num_experts=1, top_k=1),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("num_tokens", [1, 13, 64])
def test_route_matches_oracle(name: str, num_tokens: int) -> None:
    cfg = CONFIGS[name]
    gen = torch.Generator().manual_seed(num_tokens)
    x_TH = torch.randn(num_tokens, 24, generator=gen)
    w_EH = torch.randn(cfg.num_experts, 24, generator=gen) / 5
    correction = 0.2 * torch.randn(cfg.num_experts, generator=gen) if cfg.scoring == "sigmoid" else None
    result = route(cfg, x_TH, w_EH, correction_bias_E=correction)
    expected = route_oracle(cfg, x_TH.double() @ w_EH.double().t(), correction)
    assert result.topk_ids_TK.shape == (num_tokens, cfg.top_k)
    assert result.topk_weights_TK.dtype == torch.float32
    for t, (ids, weights) in enumerate(expected):
        got_ids = result.topk_ids_TK[t].tolist()
        assert sorted(got_ids) == ids
        for k, e in enumerate(got_ids):
            assert result.topk_weights_TK[t, k].item() == pytest.approx(weights[e], rel=1e-5, abs=1e-7)


def test_correction_bias_changes_choice_not_weight() -> None:
    cfg = CONFIGS["sigmoid_grouped_v3"]
    x_TH = torch.randn(32, 24)
    w_EH = torch.randn(16, 24)
    bias = torch.zeros(16)
    bias[5] = 100.0  # expert 5 always wins selection...
    plain = route(cfg, x_TH, w_EH)
    biased = route(cfg, x_TH, w_EH, correction_bias_E=bias)
    assert (biased.topk_ids_TK == 5).any(dim=1).all()
    # ...but its weight is still its own sigmoid score, renormalised and scaled.
    scores = torch.sigmoid(x_TH @ w_EH.t())
    picked = scores.gather(1, biased.topk_ids_TK)
    expected = picked / picked.sum(1, keepdim=True) * cfg.routed_scaling_factor
    torch.testing.assert_close(biased.topk_weights_TK, expected)
    assert not torch.equal(plain.topk_ids_TK, biased.topk_ids_TK)


def test_router_logits_precision() -> None:
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    w = torch.randn(8, 24, dtype=torch.bfloat16)
    as_input = route(RouterConfig(num_experts=8, top_k=2), x, w)
    as_fp32 = route(RouterConfig(num_experts=8, top_k=2, logits_precision="fp32"), x, w)
    assert as_input.logits_TE.dtype == torch.bfloat16
    assert as_fp32.logits_TE.dtype == torch.float32
    assert as_input.topk_weights_TK.dtype == as_fp32.topk_weights_TK.dtype == torch.float32


def test_routing_is_deterministic_and_row_local() -> None:
    cfg = CONFIGS["softmax_topk_norm"]
    x_TH, w_EH = torch.randn(50, 24), torch.randn(10, 24)
    full = route(cfg, x_TH, w_EH)
    again = route(cfg, x_TH, w_EH)
    assert torch.equal(full.topk_ids_TK, again.topk_ids_TK)
    assert torch.equal(full.topk_weights_TK, again.topk_weights_TK)
    alone = route(cfg, x_TH[17:18], w_EH)
    assert torch.equal(alone.topk_ids_TK[0], full.topk_ids_TK[17])


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(num_experts=8, top_k=0), ValueError),
        (dict(num_experts=8, top_k=-1), ValueError),
        (dict(num_experts=8, top_k=9), ValueError),
        (dict(num_experts=8, top_k=2.0), TypeError),
        (dict(num_experts=0, top_k=1), ValueError),
        (dict(num_experts=8, top_k=2, scoring="relu"), ValueError),
        (dict(num_experts=10, top_k=2, n_group=4), ValueError),
        (dict(num_experts=8, top_k=2, n_group=2, topk_group=3), ValueError),
        (dict(num_experts=8, top_k=5, n_group=4, topk_group=2), ValueError),
        (dict(num_experts=8, top_k=2, order="topk_then_softmax", scoring="sigmoid"), ValueError),
        (dict(num_experts=8, top_k=2, routed_scaling_factor=0.0), ValueError),
    ],
)
def test_bad_router_config(kwargs: dict, error: type) -> None:
    with pytest.raises(error) as info:
        RouterConfig(**kwargs)
    assert str(info.value)  # says what was wrong


def test_router_config_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        RouterConfig(8, 2)  # type: ignore[misc]
