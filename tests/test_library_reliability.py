"""The library as a careless user drives it (issue 14): grad mode (a forward outside
``no_grad``, a loss with labels, its backward) and the refusals of bad checkpoints,
options, input ids and settings, each a ``ValueError``/``TypeError`` naming the value."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import activepath
from activepath.models import embedded_path
from activepath.tolerances import MODEL_LOGITS_ATOL_FP32, tolerance
from families import tiny_model


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


# -- load: a damaged checkpoint is refused, naming what and where ----------------------------


def _saved(tmp_path: Path, family: str = "qwen3_moe", **overrides: object) -> Path:
    directory = tmp_path / family
    tiny_model(family, **overrides).save_pretrained(directory, safe_serialization=True)
    return directory


def _edit_weights(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


Q_PROJ = "model.layers.1.self_attn.q_proj.weight"
EXPERT = "model.layers.0.mlp.experts.3.gate_proj.weight"


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop(Q_PROJ), rf"lacks tensors {re.escape(Q_PROJ)} \(looked in \['model.safetensors'\]\)"),
    (lambda t: t.__setitem__("model.layers.1.mlp.extra.weight", torch.zeros(3)),
     r"no place for: model\.layers\.1\.mlp\.extra\.weight \(in model\.safetensors\)"),
    (lambda t: t.__setitem__(Q_PROJ, torch.zeros(3, 64)),
     rf"wrong shape: {re.escape(Q_PROJ)} in model\.safetensors: \(3, 64\), the model expects \(64, 64\)"),
    (lambda t: t.pop(EXPERT), rf"lacks expert tensors {re.escape(EXPERT)} \(other experts have them\)"),
    (lambda t: t.__setitem__(EXPERT, torch.zeros(3, 64)),
     rf"wrong shape: {re.escape(EXPERT)} in model\.safetensors: shape \(3, 64\), other experts \(32, 64\)"),
], ids=["missing", "unexpected", "wrong_shape", "missing_expert", "expert_wrong_shape"])  # fmt: skip
def test_load_refuses_missing_unexpected_and_misshapen_tensors(tmp_path: Path, edit, message: str) -> None:
    # transformers loads all of these (the first two with a logged report, the rest raise
    # a RuntimeError naming no key); its model would compute with random weights.
    directory = _saved(tmp_path)
    _edit_weights(directory, edit)
    with pytest.raises(ValueError, match=message):
        activepath.load(directory)


def test_load_refuses_a_missing_stacked_expert_tensor(tmp_path: Path) -> None:
    # GPT-OSS ships its experts stacked: a missing stack is a missing key, named.
    directory = _saved(tmp_path, "gpt_oss")
    key = "model.layers.1.mlp.experts.down_proj"
    _edit_weights(directory, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=rf"lacks tensors {re.escape(key)} "):
        activepath.load(directory)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_load_names_a_corrupt_safetensors_file(tmp_path: Path, damage: str) -> None:
    directory = _saved(tmp_path)
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not safetensors " * 64, "empty": b""}[damage])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is not a readable safetensors file"):
        activepath.load(directory)


@pytest.mark.parametrize("text, message", [("[1, 2]", "must hold a JSON object, got a JSON list"),
                                           ('{"model_type": "qwen3_moe",', "is not valid JSON")])  # fmt: skip
def test_load_names_a_bad_config_json(tmp_path: Path, text: str, message: str) -> None:
    directory = _saved(tmp_path)
    (directory / "config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"{re.escape(str(directory / 'config.json'))} {message}"):
        activepath.load(directory)


def test_tied_embeddings_and_per_expert_checkpoints_still_load(tmp_path: Path) -> None:
    # A tied lm_head is not on disk and is not "missing"; per-expert keys are stacked.
    reference = tiny_model("qwen3_moe", tie_word_embeddings=True)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "lm_head.weight" not in keys and EXPERT in keys
    model = activepath.load(tmp_path)
    ids = torch.randint(3, 160, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (model(ids).logits - reference(ids).logits).abs().max().item()
    assert err <= MODEL_LOGITS_ATOL_FP32
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


# -- options, input ids and settings: ValueError naming value and range ----------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_load_refuses_an_absent_device_before_reading_weights() -> None:
    with pytest.raises(ValueError, match=r"device='cuda' is not available here; available: \['cpu'"):
        activepath.load("tiny", device="cuda")


def test_load_refuses_unknown_devices_and_dtypes() -> None:
    with pytest.raises(ValueError, match="device='gpu0' is not a device name"):
        activepath.load("tiny", device="gpu0")
    with pytest.raises(ValueError, match=r"dtype='int8' is not supported; expected a float dtype.*expert_dtype='int8'"):
        activepath.load("tiny", dtype="int8")
    with pytest.raises(ValueError, match="dtype=torch.int8 is not supported"):
        activepath.load("tiny", dtype=torch.int8)
    with pytest.raises(TypeError, match="dtype must be a torch dtype"):
        activepath.load("tiny", dtype=8)  # type: ignore[arg-type]


@pytest.mark.parametrize("ids, error, message", [
    (torch.tensor([[1, 8192]]), ValueError, r"must lie in \[0, 8191\] \(the vocabulary\), got ids from 1 to 8192"),
    (torch.tensor([[-1, 5]]), ValueError, r"must lie in \[0, 8191\].*from -1 to 5"),
    (torch.tensor([1, 2, 3]), ValueError, r"2-D \[batch, sequence\] with at least one token, got shape \(3,\)"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, r"at least one token, got shape \(1, 0\)"),
    (torch.zeros(0, 4, dtype=torch.long), ValueError, r"at least one token, got shape \(0, 4\)"),
    (torch.tensor([[1.0, 2.0]]), TypeError, "integer token ids, got torch.float32"),
], ids=["past_vocab", "negative", "1d", "no_tokens", "no_sequences", "float"])  # fmt: skip
def test_model_refuses_bad_input_ids(plain_and_optimized, ids: torch.Tensor, error: type, message: str) -> None:
    _, model, _ = plain_and_optimized
    with torch.no_grad(), pytest.raises(error, match=message):
        model(input_ids=ids)
    with torch.no_grad(), pytest.raises(error, match=message):
        model(ids)  # positional, as a user calls it


def test_input_id_check_follows_a_resized_vocabulary() -> None:
    model = activepath.optimize(tiny_model("qwen3_moe"))
    with pytest.raises(ValueError, match=r"\[0, 159\]"):
        model(torch.tensor([[170]]))
    model.resize_token_embeddings(176)
    with torch.no_grad():
        assert model(torch.tensor([[170]])).logits.shape == (1, 1, 176)
    activepath.optimize(model)  # optimizing twice installs no second check
    assert len(model._forward_pre_hooks) == 1


def test_top_k_is_checked_when_set(plain_and_optimized) -> None:
    _, model, _ = plain_and_optimized
    layer = activepath.moe_layers(model)[0][1]
    experts = layer.experts.num_experts
    for bad in (0, -1, experts + 1):
        with pytest.raises(ValueError, match=rf"top_k={bad} is out of range: expected 1 <= top_k <= {experts}"):
            layer.top_k = bad
    with pytest.raises(TypeError, match="top_k must be an int"):
        layer.top_k = 2.0  # type: ignore[assignment]
    before = layer.top_k
    try:
        layer.top_k = 4
        assert layer.router.config.top_k == 4
        with torch.no_grad():
            _, routing = layer.forward_with_routing(torch.randn(3, layer.experts.hidden_size))
        assert routing.topk_ids_TK.shape == (3, 4)
    finally:
        layer.top_k = before
