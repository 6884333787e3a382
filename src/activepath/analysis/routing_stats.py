# measuring: what the router did (expert load per layer) and how well the model predicts
"""Routing behaviour and language-model quality of a model, measured on token ids.

Used by ``activepath demo``, the embedded-model tests and the model card. Expert loads
need an optimized model (``activepath.optimize``/``load``); perplexities take any causal LM.

Shape legend: L MoE layers, E experts, B windows, W window length, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from activepath.api import moe_layers


def windows(ids: Sequence[int], length: int) -> torch.Tensor:
    """Non-overlapping windows of ``length`` tokens, the ragged tail dropped: [B, W].

    Raises ``ValueError`` when ``ids`` holds fewer than ``length`` tokens.
    """
    if length < 2:
        raise ValueError(f"window length must be at least 2, got {length}")
    n = len(ids) // length
    if n == 0:
        raise ValueError(f"need at least {length} tokens for one window, got {len(ids)}")
    return torch.as_tensor(list(ids[: n * length]), dtype=torch.long).view(n, length)


@torch.no_grad()
def expert_load(model: nn.Module, ids_BW: torch.Tensor) -> torch.Tensor:
    """Fraction of top-k slots each expert received, per MoE layer: [L, E], rows sum to 1.

    ``model`` must be optimized; ``collect_stats`` is switched on for the call and restored.
    """
    layers = [layer for _, layer in moe_layers(model)]
    if not layers:
        raise ValueError("model has no SparseMoE layers: call activepath.optimize(model) first")
    saved = [layer.collect_stats for layer in layers]
    try:
        for layer in layers:
            layer.collect_stats = True
        model(input_ids=ids_BW, use_cache=False)
        counts_LE = torch.stack([layer.last_stats.tokens_per_expert_E.double() for layer in layers])
    finally:
        for layer, flag in zip(layers, saved):
            layer.collect_stats = flag
    return counts_LE / counts_LE.sum(dim=1, keepdim=True)


@torch.no_grad()
def window_loads(model: nn.Module, ids_BW: torch.Tensor) -> torch.Tensor:
    """Top-k slot counts per window, layer and expert: [B, L, E] (one forward per window)."""
    return torch.stack([expert_load(model, ids_BW[b : b + 1]) * ids_BW.shape[1] for b in range(ids_BW.shape[0])])


def js_permutation_null(counts_a_BLE: torch.Tensor, counts_b_BLE: torch.Tensor, rounds: int = 200,
                        seed: int = 0) -> torch.Tensor:
    """JS divergence between random re-splits of the pooled windows of two samples: [rounds, L].

    The null distribution for "the two samples route alike": windows, not tokens, are
    shuffled, so correlation between tokens of one window is kept. Compare the observed
    JS against, e.g., its 95th percentile.
    """
    pooled = torch.cat([counts_a_BLE, counts_b_BLE]).double()
    n_a = counts_a_BLE.shape[0]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rounds):
        perm = torch.randperm(pooled.shape[0], generator=gen)
        a_LE, b_LE = pooled[perm[:n_a]].sum(0), pooled[perm[n_a:]].sum(0)
        out.append(js_divergence(a_LE / a_LE.sum(-1, keepdim=True), b_LE / b_LE.sum(-1, keepdim=True)))
    return torch.stack(out)


@torch.no_grad()
def router_confidence(model: nn.Module, ids_BW: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the router's top-1 softmax probability, per MoE layer: [L].

    1/E for a router that cannot tell experts apart (random weights); a trained router is sure.
    """
    layers = [layer for _, layer in moe_layers(model)]
    if not layers:
        raise ValueError("model has no SparseMoE layers: call activepath.optimize(model) first")
    seen: list[torch.Tensor] = []

    def tap(router: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        logits_TE = inputs[0].double() @ router.weight.double().T
        if router.bias is not None:
            logits_TE = logits_TE + router.bias.double()
        seen.append(logits_TE.softmax(dim=-1).amax(dim=-1).mean())

    handles = [layer.router.register_forward_pre_hook(tap) for layer in layers]
    try:
        model(input_ids=ids_BW, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(seen)


@torch.no_grad()
def perplexity(model: nn.Module, ids_BW: torch.Tensor) -> float:
    """exp(mean next-token cross entropy) over every window, each read from its start."""
    logits_BWV = model(input_ids=ids_BW, use_cache=False).logits.double()
    nll = nn.functional.cross_entropy(logits_BWV[:, :-1].flatten(0, 1), ids_BW[:, 1:].flatten(), reduction="mean")
    return math.exp(nll.item())


def unigram_perplexity(counts_V: Sequence[int] | torch.Tensor, ids_BW: torch.Tensor) -> float:
    """Perplexity of the predicted tokens of ``ids_BW`` under the add-one-smoothed unigram
    distribution ``counts_V`` (training-token frequencies): the baseline a LM must beat."""
    counts = torch.as_tensor(counts_V, dtype=torch.float64) + 1.0
    log_p_V = counts.log() - counts.sum().log()
    return math.exp(-log_p_V[ids_BW[:, 1:].flatten()].mean().item())


def js_divergence(p_LE: torch.Tensor, q_LE: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in bits (0 = same, 1 = disjoint) per row: [L]."""
    if p_LE.shape != q_LE.shape:
        raise ValueError(f"distributions differ in shape: {tuple(p_LE.shape)} vs {tuple(q_LE.shape)}")
    p, q = p_LE.double(), q_LE.double()
    m = 0.5 * (p + q)
    return 0.5 * (_kl_bits(p, m) + _kl_bits(q, m))


def _kl_bits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    terms = torch.where(p > 0, p * (p / q.clamp_min(1e-300)).log2(), torch.zeros_like(p))
    return terms.sum(dim=-1)


def normalized_entropy(p_LE: torch.Tensor) -> torch.Tensor:
    """Entropy of each row divided by log(E): 1 = perfectly uniform load: [L]."""
    p = p_LE.double()
    h = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(dim=-1)
    return h / math.log(p.shape[-1])


def max_over_mean(p_LE: torch.Tensor) -> torch.Tensor:
    """Busiest expert's load over the mean load per row (1 = uniform, E = one hot expert): [L]."""
    return p_LE.double().amax(dim=-1) * p_LE.shape[-1] / p_LE.double().sum(dim=-1)
