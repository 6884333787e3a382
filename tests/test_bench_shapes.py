"""The shapes registry carries the public dimensions and builds the right transformers models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from activepath.bench.build import build_model, moe_blocks
from activepath.bench.shapes import SHAPES, get_shape, hf_config

# (shape, experts, top-k, gate_up shape of one layer's stacked experts)
PUBLIC = {
    "qwen3-30b-a3b": (128, 8, (128, 1536, 2048)),
    "mixtral-8x7b": (8, 2, (8, 28672, 4096)),
    "olmoe-1b-7b": (64, 8, (64, 2048, 2048)),
    "deepseek-v2-lite": (64, 6, (64, 2816, 2048)),
    "gpt-oss-20b": (32, 4, (32, 2880, 5760)),
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_shapes_build_on_meta(name):
    shape = get_shape(name)
    config = hf_config(shape, layers=shape.first_k_dense + 1, vocab=64)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    blocks = moe_blocks(model)
    assert len(blocks) == 1
    experts, top_k, gate_up = PUBLIC[name]
    assert tuple(blocks[0][1].experts.gate_up_proj.shape) == gate_up
    assert (shape.num_experts, shape.top_k) == (experts, top_k)


def test_registry_names_and_errors():
    assert set(SHAPES) == {"tiny", *PUBLIC}
    with pytest.raises(ValueError, match="unknown shape"):
        get_shape("nope")
    with pytest.raises(ValueError, match="dense first layer"):
        hf_config(get_shape("deepseek-v2-lite"), layers=1)


def test_build_is_seeded_and_routers_spread():
    config = hf_config(get_shape("tiny"), layers=1)
    a, b = build_model(config, seed=3), build_model(config, seed=3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    gate = moe_blocks(a)[0][1].gate.weight.detach()
    assert 0.5 < float(gate.std()) * 64**0.5 < 1.5  # std ≈ 1/sqrt(H)
