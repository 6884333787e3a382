"""The library as a careless user drives it (issue 14): grad mode (a forward outside
``no_grad``, a loss with labels, its backward) and the refusals of bad checkpoints,
options, input ids and settings, each a ``ValueError``/``TypeError`` naming the value."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import activepath
from activepath.models import embedded_path
from activepath.tolerances import tolerance


@pytest.fixture(scope="module")
def plain_and_optimized():
    """The embedded model twice: as transformers runs it, and optimized (a deep copy, so
    the two hold separate parameters); plus the optimized one's parameters by the names
    transformers gives them (the SparseMoE layers share the very tensors)."""
    plain = AutoModelForCausalLM.from_pretrained(embedded_path("tiny"), dtype=torch.float32,
                                                 experts_implementation="eager").eval()  # fmt: skip
    copied = copy.deepcopy(plain)
    by_name = dict(copied.named_parameters())
    return plain, activepath.optimize(copied), by_name


def _ids(tokens: int, vocab: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, tokens), generator=torch.Generator().manual_seed(tokens))


@pytest.mark.parametrize("tokens", [1, 127, 128, 300])
def test_grad_mode_forward_matches_no_grad(plain_and_optimized, tokens: int) -> None:
    # From 128 tokens the layer leased its shared workspace, whose gather writes with out=
    # (no autograd): grad mode raised. Now it takes torch ops there, same logits.
    _, model, _ = plain_and_optimized
    ids = _ids(tokens, model.config.vocab_size)
    got = model(input_ids=ids).logits
    assert got.requires_grad
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    err = (got - expected).abs().max().item()
    assert err <= tolerance(torch.float32).bound(expected), err


def test_loss_backward_gives_transformers_gradients(plain_and_optimized) -> None:
    # A perplexity with labels and its backward: every parameter's gradient as transformers'
    # eager model computes it, the routers' and the stacked experts' included.
    plain, model, by_name = plain_and_optimized
    ids = _ids(128, model.config.vocab_size, batch=2)
    try:
        plain(input_ids=ids, labels=ids).loss.backward()
        loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        checked = 0
        for name, p in plain.named_parameters():
            got = by_name[name].grad
            assert got is not None, f"no gradient reached {name}"
            err = (got - p.grad).abs().max().item()
            assert err <= tolerance(torch.float32).bound(p.grad), f"{name}: {err}"
            checked += ".mlp.gate." in name or ".mlp.experts." in name
        assert checked >= 3 * model.config.num_hidden_layers
    finally:
        plain.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
