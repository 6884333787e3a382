"""Slow, obviously correct float64 references for routing and for a whole MoE layer."""

from __future__ import annotations

import math

import torch

from activepath import ExpertWeights, RouterConfig


def route_oracle(cfg: RouterConfig, logits_TE: torch.Tensor, correction_E: torch.Tensor | None = None):
    """Per token, in plain Python over float64 values: (sorted ids, weights by id)."""
    result = []
    for row in logits_TE.double().tolist():
        if cfg.order == "topk_then_softmax":
            ids = sorted(range(len(row)), key=lambda e: -row[e])[: cfg.top_k]
            z = [math.exp(row[e] - row[ids[0]]) for e in ids]
            result.append((sorted(ids), {e: zi / sum(z) for e, zi in zip(ids, z)}))
            continue
        if cfg.scoring == "softmax":
            m = max(row)
            ex = [math.exp(v - m) for v in row]
            scores = [v / sum(ex) for v in ex]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in row]
        choice = [s + (0.0 if correction_E is None else float(correction_E[e])) for e, s in enumerate(scores)]
        allowed = _allowed_experts(cfg, choice)
        ids = sorted(allowed, key=lambda e: -choice[e])[: cfg.top_k]
        w = {e: scores[e] for e in ids}
        if cfg.normalize_topk:
            total = sum(w.values())
            w = {e: v / total for e, v in w.items()}
        result.append((sorted(ids), {e: v * cfg.routed_scaling_factor for e, v in w.items()}))
    return result


def _allowed_experts(cfg: RouterConfig, choice: list[float]) -> list[int]:
    size = cfg.num_experts // cfg.n_group
    groups = [list(range(g * size, (g + 1) * size)) for g in range(cfg.n_group)]

    def group_score(g: list[int]) -> float:
        vals = sorted((choice[e] for e in g), reverse=True)
        return vals[0] if cfg.group_score == "max" else sum(vals[:2])

    best = sorted(range(cfg.n_group), key=lambda g: -group_score(groups[g]))[: cfg.topk_group]
    return [e for g in best for e in groups[g]]


def moe_oracle(weights: ExpertWeights, x_TH: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_k w[t,k] * expert_{ids[t,k]}(x[t]) in float64, one token at a time."""
    act = weights.activation
    y = torch.zeros(x_TH.shape, dtype=torch.float64)
    for t in range(x_TH.shape[0]):
        x = x_TH[t].double()
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            w_gu = weights.w_gate_up[e].double()
            gu = x @ w_gu if weights.transposed else w_gu @ x
            if weights.b_gate_up is not None:
                gu = gu + weights.b_gate_up[e].double()
            gate, up = (gu[0::2], gu[1::2]) if act.interleaved else (gu[: len(gu) // 2], gu[len(gu) // 2 :])
            h = _act(act, gate, up)
            w_dn = weights.w_down[e].double()
            out = h @ w_dn if weights.transposed else w_dn @ h
            if weights.b_down is not None:
                out = out + weights.b_down[e].double()
            y[t] += float(w_TK[t, k]) * out
    return y


def _act(act, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if act.kind == "silu":
        return gate / (1 + torch.exp(-gate)) * up
    if act.kind == "gelu":
        return 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2))) * up
    if act.kind == "gelu_tanh":
        return 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3))) * up
    g = gate.clamp(max=act.limit)
    u = up.clamp(-act.limit, act.limit)
    return (u + 1) * g / (1 + torch.exp(-act.alpha * g))
