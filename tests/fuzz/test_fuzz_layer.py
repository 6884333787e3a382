"""Property-based fuzzing of the whole SparseMoE layer, every registered CPU backend, against
the float64 oracle (tests/oracle.py) within the dtype's tolerance (activepath.tolerances):
random T (primes, kernel thresholds), E, K, odd H and I, every activation, shared experts,
capacity drops, hot and idle experts, the native kernels on and off, grad mode."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fuzz_support import DTYPES, SEEDS, TOKEN_COUNTS, fuzz, native_kernels
from hypothesis import given, note
from hypothesis import strategies as st
from oracle import capacity_oracle, moe_oracle

from activepath import (
    ActivationConfig,
    ExpertWeights,
    Router,
    RouterConfig,
    SharedExperts,
    SparseMoE,
    backend_names,
)
from activepath.backends import triton as triton_moe
from activepath.moe.capacity import CapacityConfig, expert_capacity
from activepath.tolerances import tolerance
from activepath.runtime.workspace import Workspace

ACTIVATIONS = {  # (config, transposed [E, H, 2I] weights, biases): GPT-OSS is the last
    "silu": (ActivationConfig(kind="silu"), False, False),
    "gelu": (ActivationConfig(kind="gelu"), False, False),
    "gelu_tanh": (ActivationConfig(kind="gelu_tanh"), False, False),
    "gpt_oss": (ActivationConfig(kind="clamped_swiglu", alpha=1.702, limit=1.5, interleaved=True), True, True),
}
TRITON_RUNS = triton_moe.available() and triton_moe.interpreting()
BACKENDS = tuple(b for b in backend_names() if b != "triton" or TRITON_RUNS)
TRITON_MAX_TOKENS = 24  # Triton's CPU interpreter takes ~2 s at 300 tokens


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerCase:
    num_tokens: int
    num_experts: int
    top_k: int
    hidden: int
    inter: int
    act: str
    shared: bool
    dtype: torch.dtype
    backend: str
    use_native: bool
    routing: str  # "softmax", "hot" (one expert in every token's top-k) or "idle" (experts never chosen)
    capacity: CapacityConfig | None
    grad_mode: bool
    workspace: bool  # a shared Workspace, as ``optimize`` gives every layer
    seed: int


@st.composite
def layer_cases(draw: st.DrawFn) -> LayerCase:
    backend = draw(st.sampled_from(BACKENDS))
    num_tokens = draw(TOKEN_COUNTS)
    if backend == "triton":
        num_tokens = min(num_tokens, TRITON_MAX_TOKENS)
    num_experts = draw(st.integers(1, 16))
    capacity = draw(st.none() | st.builds(CapacityConfig, capacity_factor=st.sampled_from([0.25, 0.5, 1.0, 1.5]),
                                          policy=st.sampled_from(["drop", "reroute"])))  # fmt: skip
    return LayerCase(
        num_tokens=num_tokens, num_experts=num_experts, top_k=draw(st.integers(1, min(4, num_experts))),
        hidden=draw(st.integers(1, 72)), inter=draw(st.integers(1, 40)), act=draw(st.sampled_from(sorted(ACTIVATIONS))),
        shared=draw(st.booleans()), dtype=draw(st.sampled_from(DTYPES)), backend=backend, use_native=draw(st.booleans()),
        routing=draw(st.sampled_from(["softmax", "hot", "idle"])), capacity=capacity if draw(st.booleans()) else None,
        grad_mode=draw(st.booleans()), workspace=draw(st.booleans()), seed=draw(SEEDS),
    )  # fmt: skip


def build_layer(case: LayerCase) -> SparseMoE:
    activation, transposed, biases = ACTIVATIONS[case.act]
    E, H, I = case.num_experts, case.hidden, case.inter
    gen = torch.Generator().manual_seed(case.seed)
    w_gu = torch.randn((E, H, 2 * I) if transposed else (E, 2 * I, H), generator=gen) / H**0.5
    w_dn = torch.randn((E, I, H) if transposed else (E, H, I), generator=gen) / I**0.5
    b_gu = 0.1 * torch.randn(E, 2 * I, generator=gen) if biases else None
    b_dn = 0.1 * torch.randn(E, H, generator=gen) if biases else None
    correction = None
    if case.routing != "softmax":
        correction = torch.zeros(E)
        if case.routing == "hot":
            correction[int(torch.randint(E, (1,), generator=gen))] = 1e4
        else:  # as many idle experts as leave top_k live
            correction[torch.randperm(E, generator=gen)[: E - case.top_k]] = -1e4
    cfg = RouterConfig(num_experts=E, top_k=case.top_k, scoring="softmax" if correction is None else "sigmoid",
                       normalize_topk=True)  # fmt: skip
    router = Router(cfg, torch.randn(E, H, generator=gen) / H**0.5, correction_bias_E=correction)
    experts = ExpertWeights(w_gu, w_dn, activation, transposed=transposed, b_gate_up_E2I=b_gu, b_down_EH=b_dn)
    shared = None
    if case.shared:
        mlp = torch.nn.Sequential(torch.nn.Linear(H, I, bias=False), torch.nn.SiLU(), torch.nn.Linear(I, H, bias=False))
        shared = SharedExperts(mlp, gate=torch.nn.Linear(H, 1, bias=False))
    layer = SparseMoE(router, experts, shared, backend=case.backend).to(case.dtype)
    layer.capacity = case.capacity
    layer.workspace = Workspace() if case.workspace else None
    return layer


def shared_oracle(shared: SharedExperts, x_TH: torch.Tensor) -> torch.Tensor:
    """sigmoid(gate(x)) * W2 silu(W1 x) in float64, from the weights (not SharedExperts.forward)."""
    w1, w2 = shared.mlp[0].weight.double(), shared.mlp[2].weight.double()
    x = x_TH.double()
    h = x @ w1.t()
    return torch.sigmoid(x @ shared.gate.weight.double().t()) * ((h * torch.sigmoid(h)) @ w2.t())


@torch.no_grad()
def expected_output(layer: SparseMoE, x_TH: torch.Tensor) -> torch.Tensor:
    routing = layer.router(x_TH)
    ids_TK, w_TK = routing.topk_ids_TK, routing.topk_weights_TK
    if layer.capacity is not None:
        T, K = ids_TK.shape
        cap = expert_capacity(layer.capacity, T, K, layer.experts.num_experts)
        ids, weights, *_ = capacity_oracle(cap, layer.capacity.policy, ids_TK.tolist(), w_TK.double().tolist(),
                                           routing.logits_TE.double().tolist())  # fmt: skip
        ids_TK, w_TK = torch.tensor(ids).view(T, K), torch.tensor(weights, dtype=torch.float64).view(T, K)
    expected = moe_oracle(layer.experts, x_TH, ids_TK, w_TK)
    return expected if layer.shared is None else expected + shared_oracle(layer.shared, x_TH)


def run_layer(layer: SparseMoE, x_TH: torch.Tensor, grad_mode: bool) -> torch.Tensor:
    if not grad_mode:
        with torch.no_grad():
            return layer(x_TH)
    x_TH = x_TH.clone().requires_grad_(True)
    y_TH = layer(x_TH)
    y_TH.float().sum().backward()
    assert x_TH.grad is not None and torch.isfinite(x_TH.grad).all()
    return y_TH.detach()


@fuzz(150)
@given(case=layer_cases())
def test_layer_matches_the_float64_oracle(case: LayerCase) -> None:
    note(repr(case))
    layer = build_layer(case)
    x_TH = torch.randn(case.num_tokens, case.hidden, generator=torch.Generator().manual_seed(case.seed + 1))
    x_TH = x_TH.to(case.dtype)
    with native_kernels(case.use_native):
        y_TH = run_layer(layer, x_TH, case.grad_mode)
        again = run_layer(layer, x_TH, False)
        expected = expected_output(layer, x_TH)
    assert y_TH.dtype == case.dtype and y_TH.shape == x_TH.shape
    err = (y_TH.double() - expected).abs().max().item()
    bound = tolerance(case.dtype).bound(expected)
    assert err <= bound, f"max abs err {err} > {bound}"
    if not case.grad_mode:
        assert torch.equal(y_TH, again), "two identical calls differ"


# Regressions of issue 14 item 1, found before and by this fuzz.
def test_grouped_in_grad_mode_from_128_tokens() -> None:
    case = LayerCase(num_tokens=128, num_experts=4, top_k=2, hidden=256, inter=8, act="silu", shared=False,
                     dtype=torch.float32, backend="grouped", use_native=True, routing="softmax", capacity=None,
                     grad_mode=True, workspace=True, seed=0)  # fmt: skip
    layer = build_layer(case)
    for p in layer.parameters():
        p.requires_grad_(True)  # as a loaded model's are
    layer(torch.randn(128, 256, requires_grad=True))  # 256 KiB of slots: the workspace is leased


@pytest.mark.skipif(not TRITON_RUNS, reason="triton is not installed, or not in its CPU interpreter")
def test_triton_in_grad_mode_keeps_the_graph() -> None:
    case = LayerCase(num_tokens=1, num_experts=1, top_k=1, hidden=1, inter=1, act="gelu", shared=False,
                     dtype=torch.float32, backend="triton", use_native=False, routing="softmax", capacity=None,
                     grad_mode=True, workspace=False, seed=0)  # fmt: skip
    x_TH = torch.randn(1, 1, requires_grad=True)
    assert build_layer(case)(x_TH).grad_fn is not None, "gradient silently cut"
