"""Int8 expert weights: accuracy against the float model, interface, and bad input."""

from __future__ import annotations

import pytest
import torch

import activepath
from activepath.moe.weights_int8 import Int8ExpertWeights
from activepath.kernels.cpu import int8 as native_int8
from activepath.tolerances import INT8_LAYER_RTOL, INT8_LOGITS_MEAN_RTOL, INT8_WEIGHT_ONLY_LAYER_RTOL
from families import FAMILIES, tiny_model
from oracle import moe_oracle
from test_families import random_ids
from test_layer import H, make_layer


@pytest.mark.parametrize("act", ["silu", "gpt_oss"])
@pytest.mark.parametrize("backend", ["grouped", "grouped_loop", "native", "rowwise", "reference"])
def test_int8_layer_close_to_float(act: str, backend: str) -> None:
    layer = make_layer(act, seed=2)
    x = torch.randn(23, H)
    with torch.no_grad():
        routing = layer.router(x)
        exact = moe_oracle(layer.experts, x, routing.topk_ids_TK, routing.topk_weights_TK)
        layer.experts = Int8ExpertWeights.from_weights(layer.experts)
        layer.backend = backend
        got = layer(x).double()
    rel = (got - exact).abs().max() / exact.abs().max()
    # Weight-only int8 with the native kernels; else fbgemm (8-bit weights, 7-bit activations).
    bound = INT8_WEIGHT_ONLY_LAYER_RTOL if native_int8.available() else INT8_LAYER_RTOL
    assert rel < bound, rel


def test_int8_dequantized_matrices_round_trip() -> None:
    layer = make_layer("gpt_oss")
    q = Int8ExpertWeights.from_weights(layer.experts)
    for e in (0, 5):
        for w_float, w_deq in zip(layer.experts.matrices(e), q.matrices(e)):
            step = w_float.abs().amax(dim=1, keepdim=True) / 127  # per output channel
            assert ((w_float - w_deq).abs() <= step / 2 + 1e-7).all()
        torch.testing.assert_close(q.biases(e)[0], layer.experts.biases(e)[0])
    assert q.weight_bytes_per_expert < layer.experts.matrices(0)[0].numel() * 4 * 3 / 2 / 3


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_model_logits_within_tolerance(family: str) -> None:
    reference = tiny_model(family)
    model = activepath.optimize(tiny_model(family), expert_dtype="int8")
    assert all(isinstance(layer.experts, Int8ExpertWeights) for _, layer in activepath.moe_layers(model))
    ids = random_ids(2, 16, seed=11)
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids).logits
    assert (got - expected).abs().mean() <= INT8_LOGITS_MEAN_RTOL * expected.abs().mean()


def test_int8_bf16_model_and_bad_options() -> None:
    model = activepath.optimize(tiny_model("qwen3_moe", dtype=torch.bfloat16), expert_dtype="int8")
    with torch.no_grad():
        assert model(random_ids(1, 5, seed=1)).logits.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="expert_dtype"):
        activepath.optimize(tiny_model("olmoe"), expert_dtype="int4")


@pytest.mark.parametrize("domain", ["prose", "code", "shifted"])
def test_int8_top1_agreement_on_embedded_model(domain: str) -> None:
    from transformers import AutoTokenizer

    from activepath.models import embedded_path
    from activepath.analysis.routing_stats import windows
    from activepath.tolerances import INT8_TOP1_AGREEMENT

    directory = embedded_path("tiny")
    text = (directory / f"eval_{domain}.txt").read_text()
    ids_BW = windows(AutoTokenizer.from_pretrained(directory)(text)["input_ids"], 128)
    fp32, int8 = activepath.load("tiny"), activepath.load("tiny", expert_dtype="int8")
    with torch.no_grad():
        agree = (fp32(ids_BW).logits.argmax(-1) == int8(ids_BW).logits.argmax(-1)).float().mean().item()
    assert agree >= INT8_TOP1_AGREEMENT, agree
