"""The one-token path of SparseMoE (``token_path``): the general path's results bit for
bit, stats that add up, and the general path wherever it does not apply."""

from __future__ import annotations

import pytest
import torch

import activepath
from activepath import ActivationConfig, ExpertWeights, Router, RouterConfig, SparseMoE
from activepath.kernels import cpu as native
from activepath.moe.capacity import CapacityConfig
from activepath.kernels.cpu import token as native_token
from activepath.moe.weights_int8 import Int8ExpertWeights
from families import tiny_model
from test_layer import H, make_layer

pytestmark = pytest.mark.skipif(not native.available(), reason="the one-token path runs the native kernels")


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Counts the calls of ``native_token.<name>`` (one entry per call)."""
    taken: list[int] = []
    real = getattr(native_token, name)

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        taken.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(native_token, name, counted)
    return taken


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the one-token path's native calls."""
    return _count_calls(monkeypatch, "token_route_gate_up")


def _both_ways(layer: SparseMoE, x: torch.Tensor) -> tuple[tuple, tuple]:
    with torch.no_grad():
        layer.token_fast_path = True
        fast = layer.forward_with_routing(x)
        layer.token_fast_path = False
        general = layer.forward_with_routing(x)
    return fast, general


def _assert_same(fast: tuple, general: tuple) -> None:
    (y_fast, r_fast), (y_general, r_general) = fast, general
    assert torch.equal(y_fast, y_general)
    assert torch.equal(r_fast.topk_ids_TK, r_general.topk_ids_TK)
    assert torch.equal(r_fast.topk_weights_TK, r_general.topk_weights_TK)
    assert torch.equal(r_fast.logits_TE, r_general.logits_TE)


@pytest.mark.parametrize("backend", ["grouped", "native"])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("shared", [False, True])
def test_one_token_is_the_general_path_bit_for_bit(backend: str, act: str, shared: bool, calls: list[int]) -> None:
    layer = make_layer(act=act, seed=5, shared=shared)
    layer.backend = backend
    for seed in range(4):
        x = torch.randn(1, H, generator=torch.Generator().manual_seed(seed))
        _assert_same(*_both_ways(layer, x))
    assert len(calls) == 4


@pytest.fixture
def int8_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the int8 one-token path's native calls."""
    return _count_calls(monkeypatch, "token_route_gate_up_i8")


@pytest.mark.parametrize("backend", ["grouped", "native"])
@pytest.mark.parametrize("act", ["silu", "gelu", "gpt_oss"])
def test_int8_experts_too(backend: str, act: str, int8_calls: list[int]) -> None:
    """Int8 experts (GPT-OSS's with biases and interleaved gate/up included): the general
    path's bits."""
    layer = make_layer(act=act, seed=7)
    layer.experts = Int8ExpertWeights.from_weights(layer.experts)
    layer.backend = backend
    for seed in range(4):
        x = torch.randn(1, H, generator=torch.Generator().manual_seed(seed))
        _assert_same(*_both_ways(layer, x))
    assert len(int8_calls) == 4


def test_many_experts_and_leading_dims(calls: list[int]) -> None:
    """Qwen3-30B-A3B's routing shape (128 experts, top-8, renormalised), a [1, 1, H] input."""
    gen = torch.Generator().manual_seed(0)
    e, k, h, i = 128, 8, 64, 24
    router = Router(RouterConfig(num_experts=e, top_k=k, normalize_topk=True), torch.randn(e, h, generator=gen))
    w_gate_up = torch.randn(e, 2 * i, h, generator=gen) / h**0.5
    w_down = torch.randn(e, h, i, generator=gen) / i**0.5
    experts = ExpertWeights(w_gate_up, w_down, ActivationConfig(kind="silu"))
    layer = SparseMoE(router, experts)
    for seed in range(8):
        x = torch.randn(1, 1, h, generator=torch.Generator().manual_seed(seed))
        fast, general = _both_ways(layer, x)
        _assert_same(fast, general)
        assert fast[0].shape == (1, 1, h)
    assert len(calls) == 8


def test_stats_add_up(calls: list[int]) -> None:
    layer = make_layer(seed=2)
    layer.collect_stats = True
    x = torch.randn(1, H)
    with torch.no_grad():
        layer(x)
        fast = layer.last_stats
        layer.token_fast_path = False
        layer(x)
        general = layer.last_stats
    assert calls == [1]
    assert torch.equal(fast.tokens_per_expert_E, general.tokens_per_expert_E)
    assert int(fast.tokens_per_expert_E.sum()) == layer.router.config.top_k
    assert min(fast.routing_s, fast.dispatch_s, fast.experts_s, fast.combine_s, fast.shared_s) >= 0
    assert 0 <= fast.routing_overhead_ratio <= 1


def _skipped(layer: SparseMoE, x: torch.Tensor, calls: list[int]) -> None:
    with torch.no_grad():
        layer(x)
    assert calls == []


def test_two_tokens_take_the_general_path(calls: list[int]) -> None:
    _skipped(make_layer(), torch.randn(2, H), calls)


def test_capacity_takes_the_general_path(calls: list[int]) -> None:
    layer = make_layer()
    layer.capacity = CapacityConfig(capacity_factor=1.0)
    _skipped(layer, torch.randn(1, H), calls)


def test_reference_backend_takes_the_general_path(calls: list[int]) -> None:
    layer = make_layer()
    layer.backend = "reference"
    _skipped(layer, torch.randn(1, H), calls)


@pytest.mark.parametrize("case", ["bf16", "sigmoid_router", "gpt_oss", "switched_off"])
def test_what_the_one_token_path_does_not_cover(case: str, calls: list[int]) -> None:
    layer = {"bf16": lambda: make_layer(dtype=torch.bfloat16),
             "sigmoid_router": lambda: make_layer(dead_experts=(3,)),
             "gpt_oss": lambda: make_layer(act="gpt_oss"),
             "switched_off": make_layer}[case]()  # fmt: skip
    layer.token_fast_path = case != "switched_off"
    _skipped(layer, torch.randn(1, H, dtype=layer.experts.dtype), calls)


@pytest.mark.parametrize("family, expert_dtype", [("qwen3_moe", "native"), ("mixtral", "native"),
                                                  ("olmoe", "native"), ("qwen2_moe", "native"), ("qwen3_moe", "int8")])
def test_greedy_decoding_in_real_models_is_unchanged(family: str, expert_dtype: str, calls: list[int],
                                                     int8_calls: list[int]) -> None:
    """Prefill, then 6 one-token decode steps, with and without the path: the same logits."""
    model = activepath.optimize(tiny_model(family, seed=1), expert_dtype=expert_dtype)
    layers = [layer for _, layer in activepath.moe_layers(model)]
    prompt = torch.randint(3, 160, (1, 9), generator=torch.Generator().manual_seed(0))
    runs = []
    for fast in (True, False):
        for layer in layers:
            layer.token_fast_path = fast
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        runs.append(out)
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert all(torch.equal(a, b) for a, b in zip(runs[0].logits, runs[1].logits))
    # every decode step after the prefill, in every MoE layer
    assert len(calls if expert_dtype == "native" else int8_calls) == 5 * len(layers)
