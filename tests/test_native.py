"""The native small-batch GEMM (fp32, nn.Linear layout) against a float64 reference on
awkward sizes, its batch invariance, its argument checks, and the layers built on it:
the ``native``/``grouped`` experts backends and the patched nn.Linear forward."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from activepath import ActivationConfig, ExpertWeights, plan_dispatch
from activepath.kernels import cpu as native
from activepath.kernels.cpu import build as native_build
from activepath.moe.experts import NATIVE_MAX_ROWS, get_backend, reference_experts
from activepath.dense.linears import patch_linears
from activepath.tolerances import tolerance

# Subprocesses import the activepath under test, not whatever copy is installed.
SRC = str(Path(native.__file__).resolve().parents[3])
needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")


def _reference(x_MK, w_ENK, segments, bias_EN, n_rows):
    out = torch.zeros(n_rows, w_ENK.shape[1], dtype=torch.float64)
    for e, lo, hi in segments:
        out[lo:hi] = x_MK[lo:hi].double() @ w_ENK[e].double().T
        if bias_EN is not None:
            out[lo:hi] += bias_EN[e].double()
    return out


@needs_native
@pytest.mark.parametrize("k", [1, 7, 16, 33, 100, 2048])
@pytest.mark.parametrize("n", [1, 3, 37, 130])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_matches_float64(k: int, n: int, with_bias: bool, weight_dtype: torch.dtype) -> None:
    # bf16 weights are widened exactly, so the float64 reference of the same bf16 values
    # holds the kernel to the fp32 bound.
    gen = torch.Generator().manual_seed(k * 1000 + n)
    w_ENK = torch.randn(5, n, k, generator=gen).to(weight_dtype)
    bias_EN = torch.randn(5, n, generator=gen) if with_bias else None
    # Row counts 1, 0 (an expert with no rows), 2, 13, 97 (prime), experts 1 and 3 skipped.
    bounds = [0, 1, 1, 3, 16, 113]
    segments = [(e, lo, hi) for e, lo, hi in zip([4, 0, 2, 0, 4], bounds, bounds[1:])]
    x_MK = torch.randn(bounds[-1], k, generator=gen)
    out = torch.full((bounds[-1], n), float("nan"))
    native.grouped_nk_gemm(x_MK, w_ENK, segments, out, bias_EN)
    expected = _reference(x_MK, w_ENK, segments, bias_EN, bounds[-1])
    err = (out.double() - expected).abs().max().item()
    assert err <= tolerance(torch.float32).bound(expected) * k**0.5, err


@needs_native
def test_rows_outside_segments_are_untouched_and_strided_inputs_work() -> None:
    w_ENK = torch.randn(2, 64, 48)[:, :, :40]  # row stride 48, unit last stride
    x_MK = torch.randn(6, 80)[:, ::2].contiguous()
    out = torch.full((6, 64), 7.0)
    native.grouped_nk_gemm(x_MK[:, :40], w_ENK, [(1, 2, 5)], out)
    assert (out[:2] == 7).all() and (out[5:] == 7).all()
    torch.testing.assert_close(out[2:5], x_MK[2:5, :40] @ w_ENK[1].T, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("n", "k"),
    # 70 x 2050: long rows with a k tail; 605 x 777: short rows, and enough of them that a
    # lone row takes the longer one-row work items (128 rows, a 93-row last one) and the
    # 8-row tiles with their 1-row tail.
    [(70, 2050), (605, 777)],
)
def test_batch_invariant_bitwise(weight_dtype: torch.dtype, n: int, k: int) -> None:
    w_ENK = torch.randn(3, n, k).to(weight_dtype)
    x_MK = torch.randn(41, k)
    full = torch.empty(41, n)
    native.grouped_nk_gemm(x_MK, w_ENK, [(2, 0, 41)], full)
    torch.testing.assert_close(full, x_MK @ w_ENK[2].float().T, rtol=1e-4, atol=1e-3)
    for t in (0, 5, 40):
        alone = torch.empty(1, n)
        native.grouped_nk_gemm(x_MK[t : t + 1].contiguous(), w_ENK, [(2, 0, 1)], alone)
        assert torch.equal(alone[0], full[t])
    # One row per expert (decode), every row alone in its own segment, as the layer calls it.
    rows = torch.empty(3, n)
    native.grouped_nk_gemm(x_MK[:3].contiguous(), w_ENK, [(2, 0, 1), (0, 1, 2), (2, 2, 3)], rows)
    assert torch.equal(rows[0], full[0]) and torch.equal(rows[2], full[2])
    torch.testing.assert_close(rows[1], x_MK[1] @ w_ENK[0].float().T, rtol=1e-4, atol=1e-3)


@needs_native
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x": torch.randn(4, 8, dtype=torch.float64)}, TypeError, "float32"),
        ({"x": torch.randn(4, 9)}, ValueError, "do not chain"),
        ({"segments": [(2, 0, 4)]}, ValueError, "out of range"),
        ({"segments": [(-1, 0, 4)]}, ValueError, "out of range"),
        ({"segments": [(0, 3, 2)]}, ValueError, "out of range"),
        ({"segments": [(0, 0, 5)]}, ValueError, "out of range"),
        ({"segments": [(0, 4)]}, ValueError, "segment is"),
        ({"w": torch.randn(2, 6, 8)[:, :, ::2]}, TypeError, "unit last stride"),
        ({"bias": torch.randn(2, 5)}, ValueError, "bias"),
        ({"out": torch.empty(4, 5)}, ValueError, "do not chain"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match) -> None:
    args = {"x": torch.randn(4, 8), "w": torch.randn(2, 6, 8), "segments": [(1, 0, 4)],
            "out": torch.empty(4, 6), "bias": None} | kwargs  # fmt: skip
    with pytest.raises(error, match=match):
        native.grouped_nk_gemm(args["x"], args["w"], args["segments"], args["out"], args["bias"])


@needs_native
@pytest.mark.parametrize("k", [1, 7, 16, 33, 2048])
@pytest.mark.parametrize("n", [1, 5, 13, 37, 130])
@pytest.mark.parametrize("with_bias", [False, True])
def test_panel_gemm_matches_float64(k: int, n: int, with_bias: bool) -> None:
    # Segments of 0, 1, 15 (all remainder rows), 16 (one full panel), 17, 33 (two panels and
    # a remainder), 48 (three: a pair, then a single) and 97 rows; n covers full 12-row
    # tiles, the 4- and 1-row tails and blocks smaller than one tile. Rows outside every
    # segment (the last 3) stay as they were.
    gen = torch.Generator().manual_seed(k * 1000 + n + 7)
    w_ENK = torch.randn(5, n, k, generator=gen)
    bias_EN = torch.randn(5, n, generator=gen) if with_bias else None
    rows = [0, 1, 15, 16, 17, 33, 48, 97]
    bounds = [0, *torch.tensor(rows).cumsum(0).tolist()]
    segments = [(i % 5, lo, hi) for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]
    x_MK = torch.randn(bounds[-1] + 3, k, generator=gen)
    out = torch.full((bounds[-1] + 3, n), float("nan"))
    native.grouped_nk_gemm_panel(x_MK, w_ENK, segments, out, bias_EN)
    assert out[bounds[-1]:].isnan().all()
    expected = _reference(x_MK, w_ENK, segments, bias_EN, bounds[-1])
    err = (out[: bounds[-1]].double() - expected).abs().max().item()
    assert err <= tolerance(torch.float32).bound(expected) * k**0.5, err


@needs_native
def test_panel_gemm_is_deterministic_across_threads_and_neighbours() -> None:
    # Each output element is one FMA chain over k in one tile: the same bits on 1 or 2
    # threads, and a segment's rows do not depend on the other segments of the call.
    w_ENK = torch.randn(3, 100, 300)
    x_MK = torch.randn(80, 300)
    segments = [(2, 0, 37), (0, 37, 80)]
    threads = torch.get_num_threads()
    outs = []
    for t in (1, max(threads, 2)):
        torch.set_num_threads(t)
        try:
            outs.append(native.grouped_nk_gemm_panel(x_MK, w_ENK, segments, torch.empty(80, 100)))
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    alone = native.grouped_nk_gemm_panel(x_MK[:37].contiguous(), w_ENK, [(2, 0, 37)], torch.empty(37, 100))
    assert torch.equal(alone, outs[0][:37])


@needs_native
def test_panel_gemm_rejects_bf16_weights_and_bad_segments() -> None:
    x_MK, out = torch.randn(20, 8), torch.empty(20, 6)
    with pytest.raises(TypeError, match="float32 weights"):
        native.grouped_nk_gemm_panel(x_MK, torch.randn(2, 6, 8).bfloat16(), [(0, 0, 20)], out)
    with pytest.raises(ValueError, match="out of range"):
        native.grouped_nk_gemm_panel(x_MK, torch.randn(2, 6, 8), [(0, 0, 21)], out)


def _experts(seed: int, e: int = 6, h: int = 40, i: int = 24) -> ExpertWeights:
    gen = torch.Generator().manual_seed(seed)
    return ExpertWeights(torch.randn(e, 2 * i, h, generator=gen) / h**0.5, torch.randn(e, h, i, generator=gen) / i**0.5,
                         ActivationConfig(kind="silu"))  # fmt: skip


@needs_native
@pytest.mark.parametrize("backend", ["native", "grouped"])
def test_backends_mix_native_and_blas_segments(backend: str) -> None:
    # Expert 1 gets more than NATIVE_MAX_ROWS slots, so ``grouped`` sends it to BLAS, expert
    # 0 enough for the panel kernel (two panels and 5 rows) and the others to the dot
    # kernel, in one call; expert 4 gets none.
    weights = _experts(0)
    ids = [1] * (NATIVE_MAX_ROWS + 9) + [0] * 37 + [2, 3, 5] * 5 + [2]
    ids_TK = torch.tensor(ids).reshape(-1, 1)
    plan = plan_dispatch(ids_TK, weights.num_experts)
    x_TH = torch.randn(len(ids), weights.hidden_size)
    with torch.no_grad():
        got = get_backend(backend)(weights, x_TH, plan)
        want = reference_experts(weights, x_TH.double(), plan)
    assert (got.double() - want).abs().max().item() <= tolerance(torch.float32).bound(want)


def test_linear_patch_matches_nn_linear_and_respects_grad() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(33, 70), torch.nn.ReLU(), torch.nn.Linear(70, 5, bias=False))
    x = torch.randn(2, 3, 33)
    with torch.no_grad():
        before = model(x)
    patched = patch_linears(model, min_weight_bytes=0)
    assert patched == (2 if native.available() else 0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(torch.randn(0, 33)), torch.zeros(0, 5))
    x.requires_grad_(True)
    model(x).sum().backward()  # the BLAS path keeps autograd
    assert x.grad is not None


@needs_native
def test_linear_patch_panel_path_for_many_rows_of_a_wide_layer() -> None:
    # 40 rows of a layer with >= PANEL_MIN_OUT_FEATURES outputs take the panel kernel; 3 rows
    # and the narrow layer keep the dot kernel, which is batch-invariant.
    from activepath.dense.linears import PANEL_MIN_OUT_FEATURES

    model = torch.nn.Sequential(torch.nn.Linear(70, PANEL_MIN_OUT_FEATURES + 5), torch.nn.Linear(70, 9))
    assert patch_linears(model, min_weight_bytes=0) == 2
    wide, narrow = model[0], model[1]
    for layer in (wide, narrow):
        x = torch.randn(40, 70, dtype=torch.float64)
        with torch.no_grad():
            got = layer(x.float())
            want = x @ layer.weight.double().T + layer.bias.double()
        assert (got.double() - want).abs().max().item() <= tolerance(torch.float32).bound(want) * 70**0.5
    x = torch.randn(40, 70)
    with torch.no_grad():
        assert torch.equal(narrow(x)[5], narrow(x[5:6])[0])  # dot kernel: batch-invariant
        assert torch.equal(wide(x), native.linear(x, wide.weight, wide.bias, panel=True))


@needs_native
def test_set_enabled_turns_the_kernels_off_and_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(native_build._state, "enabled", True)  # restored after the test
    native.set_enabled(False)
    assert not native.available() and "set_enabled" in native.unavailable_reason()
    x = torch.randn(3, 8)
    layer = torch.nn.Linear(8, 5)
    patch_linears(torch.nn.Sequential(layer), min_weight_bytes=0)  # patches nothing while off
    assert not layer.__dict__.get("_activepath_patched", False)
    native.set_enabled(True)
    assert native.available() and native.unavailable_reason() is None
    torch.testing.assert_close(native.linear(x, layer.weight.detach()), x @ layer.weight.detach().T)
    with pytest.raises(TypeError, match="bool"):
        native.set_enabled(0)


def test_disabled_by_environment_falls_back() -> None:
    code = (
        "import torch; from activepath.kernels import cpu as native; from activepath.moe.experts import get_backend;"
        "assert not native.available() and 'ACTIVEPATH_NATIVE' in native.unavailable_reason();"
        "print('ok')"
    )
    env = {"ACTIVEPATH_NATIVE": "0", "PATH": "/usr/bin:/bin", "PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@needs_native
@pytest.mark.parametrize(("tokens", "experts", "k"), [(1, 128, 8), (13, 16, 2), (97, 64, 6), (0, 8, 2), (5, 3, 3)])
@pytest.mark.parametrize("normalize", [True, False])
def test_softmax_topk_matches_torch(tokens: int, experts: int, k: int, normalize: bool) -> None:
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(tokens + experts))
    ids, weights = native.softmax_topk(logits, k, normalize=normalize, scale=2.5)
    probs = torch.softmax(logits.double(), dim=-1)
    want_w, want_ids = probs.topk(k, dim=-1)
    if normalize:
        want_w = want_w / want_w.sum(-1, keepdim=True)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights.double(), 2.5 * want_w, rtol=1e-6, atol=1e-7)


@needs_native
def test_softmax_topk_breaks_ties_to_the_lower_id() -> None:
    ids, _ = native.softmax_topk(torch.tensor([[0.0, 1.0, 1.0, 0.5, 1.0]]), 2, normalize=True, scale=1.0)
    assert ids.tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="k must be"):
        native.softmax_topk(torch.zeros(1, 4), 5, normalize=True, scale=1.0)
    with pytest.raises(TypeError, match="float32"):
        native.softmax_topk(torch.zeros(1, 4, dtype=torch.float64), 2, normalize=True, scale=1.0)


@needs_native
@pytest.mark.parametrize(("tokens", "k", "experts"), [(1, 8, 128), (29, 1, 4), (97, 2, 8), (0, 2, 8)])
def test_plan_and_combine_match_torch_bitwise(tokens: int, k: int, experts: int) -> None:
    gen = torch.Generator().manual_seed(tokens)
    ids_S = torch.randint(0, experts, (tokens * k,), generator=gen)
    order, token_idx, sorted_ids, counts, offsets = native.plan_dispatch(ids_S, k, experts)
    assert offsets.tolist() == [0, *torch.cumsum(counts, 0).tolist()]
    as_tk = native.plan_dispatch(ids_S.reshape(tokens, k), k, experts)  # a [T, K] view: same plan
    assert all(torch.equal(a, b) for a, b in zip(as_tk, (order, token_idx, sorted_ids, counts, offsets)))
    want_ids, want_order = torch.sort(ids_S, stable=True)
    assert torch.equal(order, want_order) and torch.equal(sorted_ids, want_ids)
    assert torch.equal(token_idx, want_order // k)
    assert torch.equal(counts, torch.bincount(ids_S, minlength=experts))
    out_SH = torch.randn(tokens * k, 33, generator=gen)
    weights_TK = torch.rand(tokens, k, generator=gen)
    got = native.combine(out_SH, weights_TK, order, token_idx, tokens)
    scaled = out_SH * weights_TK.reshape(-1)[order].unsqueeze(1)
    want = torch.zeros(tokens, 33).index_add_(0, token_idx, scaled)
    assert torch.equal(got, want)


@needs_native
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_combine_widens_bf16_exactly(out_dtype: torch.dtype, w_dtype: torch.dtype) -> None:
    # bf16 expert outputs / routing weights: the same bits as the torch path, which widens
    # them to fp32 before the products (and through activepath.moe.combine, cast back).
    from activepath import combine, plan_dispatch as plan_of

    gen = torch.Generator().manual_seed(5)
    ids_TK = torch.randint(0, 7, (13, 3), generator=gen)
    plan = plan_of(ids_TK, 7)
    out_SH = torch.randn(39, 300, generator=gen).to(out_dtype)
    weights_TK = torch.rand(13, 3, generator=gen).to(w_dtype)
    got = native.combine(out_SH, weights_TK, plan.order_S, plan.token_idx_S, 13)
    scaled = out_SH.float() * weights_TK.reshape(-1)[plan.order_S].float().unsqueeze(1)
    want = torch.zeros(13, 300).index_add_(0, plan.token_idx_S, scaled)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    y = combine(out_SH.clone(), plan, weights_TK)
    assert y.dtype == out_dtype and torch.equal(y, want.to(out_dtype))
    native.set_enabled(False)
    try:
        assert torch.equal(combine(out_SH.clone(), plan, weights_TK), y)  # the torch path
    finally:
        native.set_enabled(True)


@needs_native
def test_plan_rejects_out_of_range_ids() -> None:
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        native.plan_dispatch(torch.tensor([0, 4]), 1, 4)
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        native.plan_dispatch(torch.tensor([-1, 2]), 1, 4)


def test_failed_build_falls_back_with_a_warning(tmp_path) -> None:
    # A compiler that always fails: the kernels report unavailable, the reason names the
    # failure, and a layer still computes (PyTorch path).
    code = (
        "import warnings, torch; from activepath.kernels import cpu as native\n"
        "from activepath import Router, RouterConfig, ExpertWeights, ActivationConfig, SparseMoE\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    assert not native.available()\n"
        "assert any('native kernels unavailable' in str(w.message) for w in caught), caught\n"
        "layer = SparseMoE(Router(RouterConfig(num_experts=4, top_k=2), torch.randn(4, 8)),\n"
        "                  ExpertWeights(torch.randn(4, 12, 8), torch.randn(4, 8, 6), ActivationConfig()))\n"
        "with torch.no_grad(): assert layer(torch.randn(3, 8)).shape == (3, 8)\n"
        "print('ok')\n"
    )
    env = {"CXX": "/bin/false", "ACTIVEPATH_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@needs_native
@pytest.mark.parametrize("tokens", [1, 13, 97])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_router_equals_gemm_then_softmax_topk(tokens: int, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(tokens)
    x, w = torch.randn(tokens, 300, generator=gen), torch.randn(64, 300, generator=gen)
    bias = torch.randn(64, generator=gen) if with_bias else None
    ids, weights, logits = native.route_softmax_topk(x, w, bias, 6, normalize=True, scale=1.5)
    assert torch.equal(logits, native.linear(x, w, bias))  # same kernel, same bits
    want_ids, want_w = native.softmax_topk(logits, 6, normalize=True, scale=1.5)
    assert torch.equal(ids, want_ids) and torch.equal(weights, want_w)
    with pytest.raises(ValueError, match="do not chain"):
        native.route_softmax_topk(x, w[:, :299].contiguous(), None, 6, normalize=True, scale=1.0)
