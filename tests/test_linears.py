"""Dense projections: the native-kernel patch of nn.Linear (and its undo) and the
weight-only int8 ``Int8Linear``, against float64 references; optimize's dense options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import activepath
from activepath.kernels import cpu as native
from activepath.dense.linears import Int8Linear, patch_linears, quantize_linears, unpatch_linears
from activepath.kernels.cpu import int8 as native_int8
from activepath.tolerances import INT8_WEIGHT_ONLY_LAYER_RTOL
from families import tiny_model
from test_families import random_ids


def _dequantized_reference(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    w = layer.q_weight.double() * layer.scale.double().unsqueeze(1)
    y = x.double() @ w.T
    return y if layer.bias is None else y + layer.bias.double()


@pytest.mark.parametrize("shape", [(1, 33), (7, 33), (2, 3, 33), (0, 33)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("use_native", [True, False])
def test_int8_linear_matches_its_dequantized_weights(shape, bias, use_native, monkeypatch) -> None:
    if use_native and not native_int8.available():
        pytest.skip("native kernels unavailable")
    if not use_native:
        monkeypatch.setattr(native_int8, "available", lambda: False)
    float_layer = nn.Linear(33, 37, bias=bias)
    layer = Int8Linear(float_layer)
    x = torch.randn(shape)
    with torch.no_grad():
        got = layer(x)
    expected = _dequantized_reference(layer, x)
    assert got.shape == (*shape[:-1], 37) and got.dtype == torch.float32
    if x.numel():
        assert (got.double() - expected).abs().max().item() <= 1e-5 * (1 + expected.abs().max().item())
        # and the quantization itself stays within the weight-only bound of the float layer
        with torch.no_grad():
            exact = float_layer(x).double()
        assert (got.double() - exact).abs().max() <= INT8_WEIGHT_ONLY_LAYER_RTOL * exact.abs().max() + 1e-6


def test_int8_linear_rejects_wrong_width() -> None:
    with pytest.raises(ValueError, match="expects 33"):
        Int8Linear(nn.Linear(33, 4))(torch.randn(2, 32))


def test_quantize_linears_replaces_float_linears_only() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4, bias=False)))
    assert quantize_linears(model) == 2
    assert isinstance(model[0], Int8Linear) and isinstance(model[2][0], Int8Linear)
    assert quantize_linears(model) == 0
    assert model(torch.randn(3, 8)).shape == (3, 4)


def test_patch_and_unpatch_linears() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    assert patch_linears(model) == 0  # below the size where the kernel pays
    patched = patch_linears(model, min_weight_bytes=0)
    assert patched == (2 if native.available() else 0)
    assert all(("forward" in m.__dict__) == bool(patched) for m in model)
    assert unpatch_linears(model) == patched
    assert all("forward" not in m.__dict__ for m in model)


def test_optimize_dense_options() -> None:
    model = tiny_model("qwen3_moe")
    ids = random_ids(1, 8, seed=3)
    with torch.no_grad():
        expected = model(ids).logits
    with pytest.raises(ValueError, match="dense_dtype"):
        activepath.optimize(tiny_model("qwen3_moe"), dense_dtype="int4")
    with pytest.raises(TypeError, match="native_linears"):
        activepath.optimize(tiny_model("qwen3_moe"), native_linears="yes")
    activepath.optimize(model, expert_dtype="int8", dense_dtype="int8")
    assert not any(type(m) is nn.Linear for m in model.modules())
    with torch.no_grad():
        got = model(ids).logits
    assert (got - expected).abs().mean() <= 0.05 * expected.abs().mean()


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
def test_patched_model_logits_match_transformers() -> None:
    from activepath.tolerances import MODEL_LOGITS_ATOL_FP32

    model = tiny_model("qwen3_moe")
    ids = random_ids(1, 9, seed=5)
    with torch.no_grad():
        expected = model(ids).logits
        activepath.optimize(model)
        assert patch_linears(model, min_weight_bytes=0) > 0  # every projection, even tiny ones
        prefill = model(ids).logits
        one_row = model(ids[:, :1]).logits  # decode-sized input: every linear in the kernel
    assert (prefill - expected).abs().max() <= MODEL_LOGITS_ATOL_FP32
    assert (one_row[0, 0] - expected[0, 0]).abs().max() <= MODEL_LOGITS_ATOL_FP32


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
def test_patched_bf16_linear_close_to_blas_and_blas_above_the_row_limit() -> None:
    from activepath.dense.linears import LINEAR_MAX_ROWS_BF16

    layer = nn.Linear(300, 700).bfloat16()
    x = torch.randn(3, 300).bfloat16()
    with torch.no_grad():
        expected = nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
        assert patch_linears(layer, min_weight_bytes=0) == 1
        got = layer(x)
        many = torch.randn(LINEAR_MAX_ROWS_BF16 + 1, 300).bfloat16()
        torch.testing.assert_close(layer(many), nn.functional.linear(many, layer.weight, layer.bias))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)
