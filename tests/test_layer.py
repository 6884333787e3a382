"""SparseMoE and its stages on tiny shapes: every backend against the float64 oracle,
awkward token counts and loads, dispatch/combine invariants, stats, and bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from activepath import (
    ActivationConfig,
    ExpertWeights,
    Router,
    RouterConfig,
    SharedExperts,
    SparseMoE,
    backend_names,
    combine,
    fuses_combine,
    get_backend,
    plan_dispatch,
    register_backend,
)
from activepath.moe import dispatch
from activepath.kernels import cpu as native
from activepath.backends import triton as triton_moe
from activepath.tolerances import tolerance, triton_tolerance
from oracle import _act, moe_oracle

H, I, E, K = 32, 24, 8, 2


def _runnable(backend: str, act: str = "silu", dtype: torch.dtype = torch.float32) -> None:
    """Skip the backends that cannot run this case here (their refusals are tested elsewhere)."""
    if backend != "triton":
        return
    if not triton_moe.available() or not triton_moe.interpreting():
        pytest.skip("triton is not installed, or not in its CPU interpreter (tests/conftest.py)")
    if dtype == torch.float64:
        pytest.skip("no Triton kernel for float64 (tests/test_triton_moe.py checks the refusal)")
ACTIVATIONS = {
    "silu": (ActivationConfig(kind="silu"), False, False),
    "gelu": (ActivationConfig(kind="gelu"), False, False),
    "gelu_tanh": (ActivationConfig(kind="gelu_tanh"), False, False),
    "gpt_oss": (ActivationConfig(kind="clamped_swiglu", alpha=1.702, limit=1.5, interleaved=True), True, True),
}


def make_layer(act: str = "silu", dtype: torch.dtype = torch.float32, seed: int = 0, top_k: int = K,
               hot_expert: int | None = None, dead_experts: tuple[int, ...] = (), shared: bool = False) -> SparseMoE:
    activation, transposed, biases = ACTIVATIONS[act]
    gen = torch.Generator().manual_seed(seed)
    w_gu = torch.randn((E, H, 2 * I) if transposed else (E, 2 * I, H), generator=gen) / H**0.5
    w_dn = torch.randn((E, I, H) if transposed else (E, H, I), generator=gen) / I**0.5
    b_gu = 0.1 * torch.randn(E, 2 * I, generator=gen) if biases else None
    b_dn = 0.1 * torch.randn(E, H, generator=gen) if biases else None
    router_w = torch.randn(E, H, generator=gen)
    correction = torch.zeros(E)
    if hot_expert is not None:
        correction[hot_expert] = 1e4  # selection-only bias: every token picks it
    correction[list(dead_experts)] = -1e4  # never picked
    cfg = RouterConfig(num_experts=E, top_k=top_k, scoring="sigmoid" if hot_expert is not None or dead_experts else "softmax",
                       normalize_topk=True)
    router = Router(cfg, router_w, correction_bias_E=correction if cfg.scoring == "sigmoid" else None)
    experts = ExpertWeights(w_gu, w_dn, activation, transposed=transposed, b_gate_up_E2I=b_gu, b_down_EH=b_dn)
    shared_mod = None
    if shared:
        mlp = torch.nn.Sequential(torch.nn.Linear(H, I, bias=False), torch.nn.SiLU(), torch.nn.Linear(I, H, bias=False))
        shared_mod = SharedExperts(mlp, gate=torch.nn.Linear(H, 1, bias=False))
    return SparseMoE(router, experts, shared_mod).to(dtype)


def check_against_oracle(layer: SparseMoE, x_TH: torch.Tensor) -> None:
    with torch.no_grad():
        routing = layer.router(x_TH)
        y_TH = layer(x_TH)
        expected = moe_oracle(layer.experts, x_TH, routing.topk_ids_TK, routing.topk_weights_TK)
        if layer.shared is not None:
            expected += layer.shared(x_TH).double()
    assert y_TH.dtype == x_TH.dtype and y_TH.shape == x_TH.shape
    tol = triton_tolerance(x_TH.dtype) if layer.backend == "triton" else tolerance(x_TH.dtype)
    err = (y_TH.double() - expected).abs().max().item()
    assert err <= tol.bound(expected), f"max abs err {err} > {tol.bound(expected)}"


@pytest.mark.parametrize("backend", backend_names())
@pytest.mark.parametrize("num_tokens", [1, 2, 13, 97])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_backend_matches_oracle(backend: str, num_tokens: int, act: str) -> None:
    _runnable(backend, act)
    layer = make_layer(act, seed=num_tokens)
    layer.backend = backend
    x = torch.randn(num_tokens, H, generator=torch.Generator().manual_seed(100 + num_tokens))
    check_against_oracle(layer, x)


@pytest.mark.parametrize("backend", backend_names())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_half_and_double_precision(backend: str, dtype: torch.dtype) -> None:
    _runnable(backend, dtype=dtype)
    layer = make_layer("silu", dtype=dtype)
    layer.backend = backend
    check_against_oracle(layer, torch.randn(31, H).to(dtype))


@pytest.mark.parametrize("backend", backend_names())
def test_every_token_on_one_expert(backend: str) -> None:
    _runnable(backend)
    layer = make_layer(hot_expert=3, top_k=1)
    layer.backend = backend
    x = torch.randn(29, H)
    assert layer.router(x).topk_ids_TK.unique().tolist() == [3]
    check_against_oracle(layer, x)


@pytest.mark.parametrize("backend", backend_names())
def test_experts_with_no_tokens_are_skipped(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _runnable(backend)
    dead = (0, 2, 5, 7)
    layer = make_layer(dead_experts=dead)
    layer.backend = backend
    x = torch.randn(40, H)
    counts = plan_dispatch(layer.router(x).topk_ids_TK, E).counts
    assert all(counts[e] == 0 for e in dead)
    called: list[int] = []
    original = ExpertWeights.gate_up
    monkeypatch.setattr(ExpertWeights, "gate_up", lambda self, xs, e: called.append(e) or original(self, xs, e))
    check_against_oracle(layer, x)
    if backend == "grouped_loop":
        assert sorted(called) == [e for e in range(E) if e not in dead]


def _shared_oracle(shared: SharedExperts, x_TH: torch.Tensor) -> torch.Tensor:
    """sigmoid(x W_g^T) * (W_2 silu(W_1 x)) in float64 from make_layer's raw weights, so a
    dropped or misplaced gate cannot cancel out of the expected value."""
    first, _, second = shared.mlp
    x = x_TH.double()
    h = x @ first.weight.double().t()
    y = (h / (1 + torch.exp(-h))) @ second.weight.double().t()
    return torch.sigmoid(x @ shared.gate.weight.double().t()) * y


def test_shared_experts_added() -> None:
    layer = make_layer(shared=True)
    x = torch.randn(7, H, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        routing = layer.router(x)
        expected = moe_oracle(layer.experts, x, routing.topk_ids_TK, routing.topk_weights_TK)
        expected += _shared_oracle(layer.shared, x)
        y = layer(x)
    gate = torch.sigmoid(x.double() @ layer.shared.gate.weight.double().t())
    assert (gate - 1).abs().min() > 0.05  # the gate visibly scales every row
    err = (y.double() - expected).abs().max().item()
    assert err <= tolerance(torch.float32).bound(expected), err


def test_leading_dims_and_empty_batch() -> None:
    layer = make_layer()
    x = torch.randn(3, 5, H)
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x.reshape(15, H)).reshape(3, 5, H))
        assert layer(torch.randn(0, H)).shape == (0, H)


def test_grouped_equals_reference_and_batch_invariant_bitwise() -> None:
    layer = make_layer(seed=3)
    x = torch.randn(64, H)
    with torch.no_grad():
        full = layer(x)
        for t in (0, 17, 63):
            assert torch.equal(layer(x[t : t + 1])[0], full[t]) or (layer(x[t : t + 1])[0] - full[t]).abs().max() < 1e-6


def test_grad_mode_gives_same_result_and_gradients() -> None:
    layer = make_layer()
    x = torch.randn(9, H, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        assert torch.allclose(y, layer(x), atol=1e-6)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _trainable(layer: SparseMoE) -> list[torch.nn.Parameter]:
    params = [layer.router.weight, layer.experts.w_gate_up, layer.experts.w_down]
    params += [p for p in (layer.experts.b_gate_up, layer.experts.b_down) if p is not None]
    for p in params:
        p.requires_grad_(True)
    return params


def _oracle_grads(layer: SparseMoE, x_TH: torch.Tensor, dy_TH: torch.Tensor) -> list[torch.Tensor]:
    """d<y, dy>/d(x, router weight, expert weights, biases) of a float64 layer written out
    per token and slot (softmax routing, normalised top-k): the routing *choices* are the
    layer's, the routing *weights* are recomputed here, so gradients reach the router."""
    cfg, experts = layer.router.config, layer.experts
    assert cfg.scoring == "softmax" and cfg.order == "score_then_topk" and cfg.normalize_topk
    leaves = [t.detach().double().requires_grad_() for t in (x_TH, *_trainable(layer))]
    x, w_r, w_gu, w_dn = leaves[:4]
    b_gu, b_dn = leaves[4:] if len(leaves) == 6 else (None, None)
    with torch.no_grad():
        ids_TK = layer.router(x_TH).topk_ids_TK
    probs_TE = torch.softmax(x @ w_r.t(), dim=-1)
    w_TK = probs_TE.gather(1, ids_TK)
    w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
    act, rows = experts.activation, []
    for t in range(x.shape[0]):
        y = torch.zeros(x.shape[1], dtype=torch.float64)
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            gu = x[t] @ w_gu[e] if experts.transposed else w_gu[e] @ x[t]
            gu = gu if b_gu is None else gu + b_gu[e]
            half = gu.shape[0] // 2
            gate, up = (gu[0::2], gu[1::2]) if act.interleaved else (gu[:half], gu[half:])
            h = _act(act, gate, up)
            out = h @ w_dn[e] if experts.transposed else w_dn[e] @ h
            y = y + w_TK[t, k] * (out if b_dn is None else out + b_dn[e])
        rows.append(y)
    (torch.stack(rows) * dy_TH.double()).sum().backward()
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend", backend_names())
@pytest.mark.parametrize("num_tokens", [1, 13])
@pytest.mark.parametrize("act", ["silu", "gpt_oss"])
def test_gradients_match_the_float64_oracle(backend: str, num_tokens: int, act: str) -> None:
    # Gradients w.r.t. the input, the router and every expert weight, against a float64
    # layer written out by hand: a cut graph (a detached routing weight in the combine, a
    # kernel without a backward) gives zero or missing gradients here. Backends without a
    # backward (triton) take the differentiable fallback, so they are checked too.
    layer = make_layer(act, seed=20 + num_tokens)
    layer.backend = backend
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, H, generator=gen).requires_grad_()
    dy = torch.randn(num_tokens, H, generator=gen)
    expected = _oracle_grads(layer, x, dy)
    params = _trainable(layer)
    (layer(x) * dy).sum().backward()
    names = ["x", "router", "w_gate_up", "w_down", "b_gate_up", "b_down"]
    for name, got, want in zip(names, [x.grad] + [p.grad for p in params], expected):
        assert got is not None, f"no gradient reached {name}"
        assert want.abs().max() > 0, name
        err = (got.double() - want).abs().max().item()
        assert err <= tolerance(torch.float32).bound(want), f"{name}: max abs err {err}"


def test_dispatch_plan() -> None:
    ids = torch.tensor([[3, 1], [1, 0], [3, 2], [1, 3]])
    plan = plan_dispatch(ids, 5)
    assert plan.counts == (1, 3, 1, 3, 0)
    assert plan.offsets == (0, 1, 4, 5, 8, 8)
    assert plan.active_experts == (0, 1, 2, 3)
    # stable: inside an expert, slots stay in token order
    assert plan.order_S.tolist() == [3, 1, 2, 6, 5, 0, 4, 7]
    assert plan.token_idx_S.tolist() == [1, 0, 1, 3, 2, 0, 2, 3]
    with pytest.raises(ValueError):
        plan_dispatch(torch.tensor([[0, 5]]), 5)
    with pytest.raises(ValueError):
        plan_dispatch(torch.tensor([0, 1]), 5)


@pytest.mark.parametrize("tokens, k, experts", [(1, 2, 8), (13, 3, 8), (40, 4, 6), (7, 1, 128), (0, 2, 4)])
def test_device_plan_matches_the_host_plan(tokens: int, k: int, experts: int) -> None:
    # The plan built off the CPU (sort + searchsorted, no read back), run here on CPU
    # tensors: the same sorted order, tokens, experts and counts as the CPU plan; idle
    # experts and all slots on one expert included.
    gen = torch.Generator().manual_seed(tokens)
    for ids in (torch.rand(tokens, experts, generator=gen).topk(k, dim=1).indices, torch.full((tokens, 1), experts - 1)):
        host = plan_dispatch(ids, experts)
        device = dispatch._device_plan(ids, experts, validate=True)
        for name in ("order_S", "token_idx_S", "expert_ids_S", "counts_E"):
            assert torch.equal(getattr(host, name), getattr(device, name)), name
        assert device.counts == host.counts and device.offsets == host.offsets
    with pytest.raises(ValueError, match="expert ids must lie in"):
        dispatch._device_plan(torch.tensor([[0, 5]]), 5, validate=True)


def test_stats_only_when_asked() -> None:
    layer = make_layer()
    x = torch.randn(11, H)
    with torch.no_grad():
        layer(x)
        assert layer.last_stats is None
        layer.collect_stats = True
        y_stats = layer(x)
        layer.collect_stats = False
        assert torch.equal(y_stats, layer(x))
    stats = layer.last_stats
    assert stats is not None and int(stats.tokens_per_expert_E.sum()) == 11 * K
    assert stats.tokens_per_expert_E.shape == (E,)
    assert min(stats.routing_s, stats.dispatch_s, stats.experts_s, stats.combine_s) >= 0
    assert 0 <= stats.routing_overhead_ratio <= 1


def test_bad_inputs_and_options() -> None:
    layer = make_layer()
    with pytest.raises(ValueError, match="hidden size"):
        layer(torch.randn(4, H + 1))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(4, H, dtype=torch.float64))
    with pytest.raises(TypeError):
        layer([[0.0] * H])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown experts backend"):
        layer.backend = "cuda-magic"
    with pytest.raises(ValueError, match="reference"):
        register_backend("reference", lambda w, x, p: x)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        SparseMoE(Router(RouterConfig(num_experts=E, top_k=2), torch.randn(E, H + 1)), layer.experts)
    with pytest.raises(ValueError, match="experts"):
        SparseMoE(Router(RouterConfig(num_experts=E + 1, top_k=2), torch.randn(E + 1, H)), layer.experts)
    with pytest.raises(ValueError, match="expert weights must be"):
        ExpertWeights(torch.randn(E, 2 * I, H), torch.randn(E, H, I + 1), ActivationConfig())
    with pytest.raises(TypeError, match="dtypes differ"):
        ExpertWeights(torch.randn(E, 2 * I, H), torch.randn(E, H, I).double(), ActivationConfig())
    with pytest.raises(ValueError, match="hidden_act"):
        ActivationConfig.from_hf("relu6")


def test_grouped_uses_grouped_gemm_when_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.nn.functional as F

    calls: list[int] = []
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(9, H)
    with torch.no_grad():
        # fp16 (no native kernel), 16-byte rows: one grouped GEMM for gate/up, one for down
        make_layer(dtype=torch.float16)(x.half())
        assert len(calls) == 2
        make_layer()(x)  # fp32: the native kernel when it is built, else grouped GEMM
        assert len(calls) == (2 if native.available() else 4)
        calls.clear()
        calls.extend([1, 1])
        make_layer(dtype=torch.float64)(x.double())  # not a grouped-GEMM dtype: the loop
        assert len(calls) == 2
        make_layer(top_k=1)(x[:1])  # 1 of 8 experts active (decode): the loop is cheaper
        assert len(calls) == 2
    make_layer()(x)  # grad mode: torch's CPU grouped GEMM has no backward, so the loop
    assert len(calls) == 2


def test_a_backend_that_fuses_the_combine(monkeypatch: pytest.MonkeyPatch) -> None:
    # It returns the combined y_TH itself, and the layer skips its own combine stage.
    calls: list[tuple[int, int]] = []

    def fused(weights: ExpertWeights, x_TH: torch.Tensor, plan, *, topk_weights_TK: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(topk_weights_TK.shape))
        return combine(get_backend("reference")(weights, x_TH, plan), plan, topk_weights_TK)

    from activepath.backends import registry

    # registered into a copy of the registry, so no other test sees it
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    register_backend("test_fused", fused, fuses_combine=True)
    assert fuses_combine("test_fused") and not fuses_combine("grouped")
    layer = make_layer(seed=4)
    layer.backend = "test_fused"
    layer.collect_stats = True
    check_against_oracle(layer, torch.randn(9, H))
    assert calls == [(9, K)] and layer.last_stats.combine_s < layer.last_stats.experts_s
    with pytest.raises(ValueError, match="workspace"):
        register_backend("test_fused_ws", fused, fuses_combine=True, uses_workspace=True)


@pytest.mark.parametrize("tokens", [0, 1, 13])
def test_accelerator_combine_is_a_deterministic_gather_sum(tokens: int) -> None:
    # Off the CPU, combine() sums each token's rows with a gather and a sum instead of
    # index_add_ (atomics on a GPU: run-to-run different sums). Same values as the CPU path,
    # capacity-dropped slots included; on the meta device the path runs end to end.
    import importlib

    combine_mod = importlib.import_module("activepath.moe.combine")  # the module (the package exports the function)

    gen = torch.Generator().manual_seed(tokens)
    ids_TK = torch.randint(0, E, (tokens, 3), generator=gen)
    kept_TK = torch.rand(tokens, 3, generator=gen) > 0.25
    plan = plan_dispatch(ids_TK, E, kept_TK)
    out_SH = torch.randn(plan.order_S.shape[0], H, generator=gen)
    w_TK = torch.rand(tokens, 3, generator=gen)
    weighted_SH = out_SH * w_TK.reshape(-1).index_select(0, plan.order_S).unsqueeze(1)
    got = combine_mod._gather_sum(weighted_SH, plan)
    assert got.shape == (tokens, H)
    torch.testing.assert_close(got, combine(out_SH.clone(), plan, w_TK), rtol=1e-6, atol=1e-6)
    assert torch.equal(got, combine_mod._gather_sum(weighted_SH, plan))
    fields = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}  # not the cached properties
    on_meta = type(plan)(**{f: (v.to("meta") if isinstance(v, torch.Tensor) else v) for f, v in fields.items()})
    assert combine(out_SH.to("meta"), on_meta, w_TK.to("meta")).shape == (tokens, H)


def test_grouped_off_the_cpu_reads_no_counts_back() -> None:
    # On a GPU, `grouped` runs torch's grouped GEMM with the expert offsets computed on the
    # device, and the combine gathers by the plan's positions: no read of the counts (a
    # sync there). The meta device runs that path end to end (bf16, as CUDA requires) and
    # would fail on any read of a value.
    from activepath.backends import torch as experts_mod

    gen = torch.Generator().manual_seed(0)
    ids_TK = torch.rand(7, E, generator=gen).topk(K, dim=1).indices
    plan = dispatch._device_plan(ids_TK.to("meta"), E, validate=False)
    weights = ExpertWeights(torch.randn(E, 2 * I, H, dtype=torch.bfloat16, device="meta"),
                            torch.randn(E, H, I, dtype=torch.bfloat16, device="meta"), ActivationConfig(kind="silu"))  # fmt: skip
    with torch.no_grad():
        out_SH = experts_mod.grouped_experts(weights, torch.randn(7, H, dtype=torch.bfloat16, device="meta"), plan)
        y_TH = combine(out_SH, plan, torch.rand(7, K, device="meta"))
    assert out_SH.shape == (7 * K, H) and y_TH.shape == (7, H)
    assert "counts" not in plan.__dict__ and "offsets" not in plan.__dict__


def test_int8_experts_pass_input_gradients() -> None:
    # Int8 weights take no gradient, but the input does, through the dequantized weights:
    # the native int8 kernel (no backward) steps aside in grad mode, as the loop does.
    from activepath.moe.weights_int8 import Int8ExpertWeights

    grads = {}
    for backend in ("grouped", "grouped_loop"):
        layer = make_layer(seed=5)
        layer.experts = Int8ExpertWeights.from_weights(layer.experts)
        layer.backend = backend
        x = torch.randn(13, H, generator=torch.Generator().manual_seed(13)).requires_grad_()
        (layer(x) * torch.linspace(-1, 1, H)).sum().backward()
        grads[backend] = x.grad
    torch.testing.assert_close(grads["grouped"], grads["grouped_loop"], rtol=1e-5, atol=1e-6)
