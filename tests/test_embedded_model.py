"""The embedded ``tiny`` model as shipped: loads offline, is small, and behaves like a trained
MoE — it predicts held-out prose far better than a unigram model, its expert load is skewed,
and code is routed differently from prose — by margins a random-weight model of the same
config does not reach. The figures must also still match its model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import activepath
from activepath.analysis import routing_stats
from activepath.models import embedded_path

MODEL_DIR = embedded_path("tiny")
WINDOW = 128  # the training sequence length, as in training/model_card.py
DOMAINS = ("prose", "code", "shifted")
MAX_DIR_BYTES = 25_000_000
# Thresholds the shipped model clears with margin (its figures: README.md, eval_metrics.json)
MIN_MAX_OVER_MEAN = 2.0  # busiest expert's load over the mean, every layer, on prose (uniform: ~1.1)
MAX_ENTROPY = 0.9  # normalised entropy of the load, every layer, on prose (1 = uniform)
MIN_JS_BITS = 0.007  # Jensen-Shannon divergence prose ↔ code, every layer
MIN_ROUTER_CONFIDENCE = 0.4  # mean top-1 router probability, every layer (random weights: ~0.11)


def test_js_divergence_bounds():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25]])
    assert routing_stats.js_divergence(p, q).tolist() == pytest.approx([1.0, 0.0])
    assert routing_stats.js_divergence(p, q).tolist() == pytest.approx(routing_stats.js_divergence(q, p).tolist())
    assert routing_stats.normalized_entropy(q).tolist() == pytest.approx([0.5, 1.0])
    assert routing_stats.max_over_mean(p).tolist() == pytest.approx([2.0, 1.0])


def test_unigram_perplexity_of_uniform_counts_is_vocab_size():
    ids_BW = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    assert routing_stats.unigram_perplexity([5, 5, 5, 5, 5], ids_BW) == pytest.approx(5.0)


def test_windows_drop_the_ragged_tail():
    assert routing_stats.windows(list(range(7)), 3).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="at least 3 tokens"):
        routing_stats.windows([1, 2], 3)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return activepath.load("tiny", dtype="float32")


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(MODEL_DIR)
    return activepath.optimize(AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval())


@pytest.fixture(scope="module")
def ids(tokenizer) -> dict[str, torch.Tensor]:
    texts = {d: (MODEL_DIR / f"eval_{d}.txt").read_text(encoding="utf-8") for d in DOMAINS}
    return {d: routing_stats.windows(tokenizer(t, verbose=False)["input_ids"], WINDOW) for d, t in texts.items()}


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((MODEL_DIR / "eval_metrics.json").read_text())


def test_directory_is_complete_and_small():
    names = {p.name for p in MODEL_DIR.iterdir()}
    needed = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
              "eval_prose.txt", "eval_code.txt", "eval_shifted.txt", "eval_metrics.json", "unigram_counts.json"}
    assert needed <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) <= MAX_DIR_BYTES


def test_loads_by_name_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    model = activepath.load("tiny")
    assert model.config.model_type == "qwen3_moe"
    assert len(activepath.moe_layers(model)) == model.config.num_hidden_layers
    # trained in fp32, stored in bf16 to stay small: loads in fp32 unless asked otherwise
    assert next(model.parameters()).dtype == torch.float32
    assert next(activepath.load("tiny", dtype="bfloat16").parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    text = "def f(x):\n    return x ** 2  # naïve → ok\n"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: every string round-trips


def test_prose_perplexity_far_below_unigram_baseline(model, ids):
    counts = json.loads((MODEL_DIR / "unigram_counts.json").read_text())
    ppl = routing_stats.perplexity(model, ids["prose"])
    baseline = routing_stats.unigram_perplexity(counts, ids["prose"])
    assert ppl < 0.25 * baseline, (ppl, baseline)
    for domain in DOMAINS:  # the trained model beats the baseline out of distribution too
        assert routing_stats.perplexity(model, ids[domain]) < routing_stats.unigram_perplexity(counts, ids[domain])


def test_expert_load_is_skewed_on_prose(model, ids):
    load_LE = routing_stats.expert_load(model, ids["prose"])
    assert torch.allclose(load_LE.sum(dim=1), torch.ones(load_LE.shape[0], dtype=load_LE.dtype))
    assert (routing_stats.max_over_mean(load_LE) >= MIN_MAX_OVER_MEAN).all(), routing_stats.max_over_mean(load_LE)
    assert (routing_stats.normalized_entropy(load_LE) <= MAX_ENTROPY).all(), routing_stats.normalized_entropy(load_LE)


def _js_and_null95(model, ids) -> tuple[torch.Tensor, torch.Tensor]:
    prose, code = routing_stats.window_loads(model, ids["prose"]), routing_stats.window_loads(model, ids["code"])
    prose_LE, code_LE = prose.sum(0), code.sum(0)
    js_L = routing_stats.js_divergence(prose_LE / prose_LE.sum(-1, keepdim=True), code_LE / code_LE.sum(-1, keepdim=True))
    return js_L, routing_stats.js_permutation_null(prose, code).quantile(0.95, dim=0)


def test_code_is_routed_differently_from_prose(model, random_model, ids):
    """Beyond chance in every layer: above the 95th percentile of re-splitting the pooled windows."""
    js_L, null95_L = _js_and_null95(model, ids)
    assert (js_L >= MIN_JS_BITS).all(), js_L
    assert (js_L >= 1.4 * null95_L).all(), (js_L, null95_L)


def test_router_is_confident(model, ids):
    confidence_L = routing_stats.router_confidence(model, ids["prose"])
    assert (confidence_L >= MIN_ROUTER_CONFIDENCE).all(), confidence_L


def test_figures_match_the_model_card(model, ids, card):
    for domain in DOMAINS:
        measured = routing_stats.perplexity(model, ids[domain])
        assert measured == pytest.approx(card["domains"][domain]["perplexity"], rel=1e-3)
    js_L = routing_stats.js_divergence(routing_stats.expert_load(model, ids["prose"]),
                                       routing_stats.expert_load(model, ids["code"]))
    assert js_L.tolist() == pytest.approx(card["layers"]["js_prose_code_bits"], abs=1e-4)
    readme = (MODEL_DIR / "README.md").read_text()
    assert f"{card['domains']['prose']['perplexity']:.1f}" in readme
    assert f"{card['layers']['js_prose_code_bits'][0]:.3f}" in readme


def test_random_weights_fail_the_same_checks(random_model, ids):
    """The thresholds above are about training: a random-weight model of this config misses them.
    (Its loads are skewed too — routing by token identity — so skew alone proves nothing.)"""
    counts = json.loads((MODEL_DIR / "unigram_counts.json").read_text())
    assert routing_stats.perplexity(random_model, ids["prose"]) > routing_stats.unigram_perplexity(counts, ids["prose"])
    assert (routing_stats.router_confidence(random_model, ids["prose"]) < MIN_ROUTER_CONFIDENCE).all()
    js_L, null95_L = _js_and_null95(random_model, ids)
    assert not (js_L >= 1.4 * null95_L).any(), (js_L, null95_L)  # its drift is window-to-window noise
