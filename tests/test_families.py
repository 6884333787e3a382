"""Integration: every supported transformers family, optimized in place, against the same
model running transformers' eager experts."""

from __future__ import annotations

import pytest
import torch

import activepath
from activepath.tolerances import HALF_ERROR_RATIO, HALF_ERROR_SLACK, MODEL_LOGITS_ATOL_FP32, tolerance
from families import FAMILIES, tiny_model

VOCAB = 160


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_routers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """MoE block path → its transformers router module."""
    found = {}
    for name, m in model.named_modules():
        router = getattr(m, "router", None) if type(m).__name__ == "GptOssMLP" else getattr(m, "gate", None)
        if router is not None and hasattr(m, "experts"):
            found[name] = router
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_logits_match_eager(family: str) -> None:
    reference, model = tiny_model(family), tiny_model(family)
    activepath.optimize(model)
    ids = random_ids(3, 19, seed=1)
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids).logits
    assert (got - expected).abs().max().item() <= MODEL_LOGITS_ATOL_FP32


@pytest.mark.parametrize("family", FAMILIES)
def test_only_moe_blocks_replaced(family: str) -> None:
    model = tiny_model(family)
    before = {n: type(m).__name__ for n, m in model.named_modules()}
    n_blocks = len(hf_routers(model))
    activepath.optimize(model)
    layers = activepath.moe_layers(model)
    assert len(layers) == n_blocks > 0
    replaced = {name for name, _ in layers}
    for name, cls in before.items():
        if name in replaced or any(name.startswith(r + ".") for r in replaced):
            continue
        assert type(model.get_submodule(name)).__name__ == cls  # dense layers untouched


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_choices_identical_fp32(family: str) -> None:
    model = tiny_model(family)
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(name: str):
        def hook(module, args, output):
            captured[name] = (args[0].reshape(-1, args[0].shape[-1]).clone(), output[2].clone())
        return hook

    handles = [r.register_forward_hook(capture(n)) for n, r in hf_routers(model).items()]
    with torch.no_grad():
        model(random_ids(2, 23, seed=2))
    for h in handles:
        h.remove()
    activepath.optimize(model)
    ours = dict(activepath.moe_layers(model))
    assert captured.keys() == ours.keys()
    for name, (x_TH, hf_ids_TK) in captured.items():
        with torch.no_grad():
            ids_TK = ours[name].router(x_TH).topk_ids_TK
        assert torch.equal(ids_TK.sort(dim=1).values, hf_ids_TK.sort(dim=1).values), name


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_no_worse_than_reference(family: str) -> None:
    truth = tiny_model(family)
    reference, model = tiny_model(family, dtype=torch.bfloat16), tiny_model(family, dtype=torch.bfloat16)
    activepath.optimize(model)
    ids = random_ids(4, 17, seed=3)
    with torch.no_grad():
        exact = truth(ids).logits
        ref_err = (reference(ids).logits.float() - exact).abs().mean().item()
        our_err = (model(ids).logits.float() - exact).abs().mean().item()
    assert our_err <= HALF_ERROR_RATIO * ref_err + HALF_ERROR_SLACK, (our_err, ref_err)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_identical(family: str) -> None:
    reference, model = tiny_model(family), tiny_model(family)
    activepath.optimize(model)
    prompt = random_ids(1, 7, seed=4)
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = reference.generate(prompt, **kwargs)
        got = model.generate(prompt, **kwargs)
    assert got.shape == (1, 7 + 24)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_eager(family: str) -> None:
    # A loss with labels and its backward, outside no_grad: every parameter's gradient as
    # transformers' eager experts compute it — routers (through the top-k weights; DeepSeek's
    # grouped sigmoid routing, GPT-OSS's top-k-then-softmax), biases and stacked experts.
    # 4 x 128 tokens: at least 1024 slots, enough that `grouped` leases its workspace.
    reference, model = tiny_model(family), tiny_model(family)
    by_name = dict(model.named_parameters())  # the SparseMoE layers take these very tensors
    activepath.optimize(model)
    ids = random_ids(4, 128, seed=5)
    reference(input_ids=ids, labels=ids).loss.backward()
    model(input_ids=ids, labels=ids).loss.backward()
    routed = 0
    for name, p in reference.named_parameters():
        got = by_name[name].grad
        assert got is not None, f"no gradient reached {name}"
        err = (got - p.grad).abs().max().item()
        assert err <= tolerance(torch.float32).bound(p.grad), (name, err)
        routed += ".experts." in name or name.endswith((".gate.weight", ".router.weight"))
    assert routed >= 3
