"""Slow, obviously correct float64 references for routing and for a whole MoE layer."""

from __future__ import annotations

import math

import torch

from activepath import ExpertWeights, RouterConfig


def route_oracle(
    cfg: RouterConfig,
    logits_TE: torch.Tensor,
    correction_E: torch.Tensor | None = None,
    *,
    round_scores: torch.dtype | None = None,
    norm_eps: float = 0.0,
):
    """Per token, in plain Python over float64 values: (sorted ids, weights by id).

    Ties go to the lower expert (and group) id. ``round_scores`` rounds each score, choice
    and group score to that dtype first (the ties a float32 computation sees when values
    underflow or saturate); ``norm_eps`` is added to the normalising sum (DeepSeek's 1e-20).
    """
    rnd = _rounder(round_scores)
    result = []
    for row in logits_TE.double().tolist():
        scores, choice = token_scores_oracle(cfg, row, correction_E, rnd)
        if cfg.order == "topk_then_softmax":
            ids = sorted(range(len(row)), key=lambda e: -row[e])[: cfg.top_k]
        else:
            # allowed experts in id order first: equal choice values go to the lower id
            ids = sorted(sorted(_allowed_experts(cfg, choice, rnd)), key=lambda e: -choice[e])[: cfg.top_k]
        result.append((sorted(ids), dict(zip(ids, token_weights_oracle(cfg, row, scores, ids, norm_eps)))))
    return result


def token_scores_oracle(cfg: RouterConfig, row: list[float], correction_E: torch.Tensor | None = None, rnd=None):
    """One token's float64 (scores, choice values): choice = score + selection bias,
    except that plain softmax routing and ``topk_then_softmax`` choose on the raw logits."""
    rnd = rnd or (lambda v: v)
    if cfg.order == "topk_then_softmax":
        return list(row), list(row)
    if cfg.scoring == "softmax":
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        scores = [rnd(v / sum(ex)) for v in ex]
        if cfg.n_group == 1 and correction_E is None:
            return scores, list(row)  # exp is monotone: the logits' order, without underflow's ties
    else:
        scores = [rnd(_sigmoid(v)) for v in row]
    choice = [rnd(s + (0.0 if correction_E is None else float(correction_E[e]))) for e, s in enumerate(scores)]
    return scores, choice


def token_weights_oracle(
    cfg: RouterConfig, row: list[float], scores: list[float], ids: list[int], norm_eps: float = 0.0
) -> list[float]:
    """The float64 weights of chosen experts ``ids`` (in that order) of one token."""
    if cfg.order == "topk_then_softmax":
        top = max(row[e] for e in ids)
        z = [math.exp(row[e] - top) for e in ids]
        return [zi / sum(z) for zi in z]
    w = [scores[e] for e in ids]
    if cfg.normalize_topk:
        total = sum(w)
        w = [v / (total + norm_eps) for v in w]
    return [v * cfg.routed_scaling_factor for v in w]


def _rounder(dtype: torch.dtype | None):
    if dtype is None:
        return lambda v: v
    return lambda v: torch.tensor(v, dtype=torch.float64).to(dtype).double().item()


def _sigmoid(v: float) -> float:
    # 1 / (1 + exp(-v)) overflows for v < -709; this form does not (equal up to rounding).
    return 1 / (1 + math.exp(-v)) if v >= 0 else math.exp(v) / (1 + math.exp(v))


def group_scores_oracle(cfg: RouterConfig, choice: list[float], rnd=lambda v: v) -> list[float]:
    """Each expert group's score (its best, or its best two summed) from one token's choice values."""
    size = cfg.num_experts // cfg.n_group
    scores = []
    for g in range(cfg.n_group):
        vals = sorted(choice[g * size : (g + 1) * size], reverse=True)
        scores.append(vals[0] if cfg.group_score == "max" else rnd(sum(vals[:2])))
    return scores


def _allowed_experts(cfg: RouterConfig, choice: list[float], rnd=lambda v: v) -> list[int]:
    size = cfg.num_experts // cfg.n_group
    groups = [list(range(g * size, (g + 1) * size)) for g in range(cfg.n_group)]
    by_group = group_scores_oracle(cfg, choice, rnd)

    def group_score(g: list[int]) -> float:
        return by_group[g[0] // size]

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


def capacity_oracle(
    capacity: int, policy: str, ids: list[list[int]], weights: list[list[float]], logits: list[list[float]]
):
    """GShard-order capacity in plain Python: slots claim room by (k, t); overflow is dropped
    or moved to the token's best unused expert with room (logits descending, lower id on
    ties). Returns (ids, float64 weights, kept, dropped, rerouted)."""
    num_experts = len(logits[0]) if logits else 0
    ids = [list(r) for r in ids]
    T, K = len(ids), len(ids[0]) if ids else 0
    load = [0] * num_experts
    kept = [[False] * K for _ in range(T)]
    for k in range(K):
        for t in range(T):
            if load[ids[t][k]] < capacity:
                load[ids[t][k]] += 1
                kept[t][k] = True
    rerouted = 0
    for k in range(K if policy == "reroute" else 0):
        for t in range(T):
            if kept[t][k]:
                continue
            for e in sorted(range(num_experts), key=lambda e: (-logits[t][e], e)):
                if e not in ids[t] and load[e] < capacity:
                    ids[t][k], kept[t][k], load[e], rerouted = e, True, load[e] + 1, rerouted + 1
                    break
    new_w = []
    for t in range(T):
        total, kept_sum = sum(weights[t]), sum(w for w, ok in zip(weights[t], kept[t]) if ok)
        if all(kept[t]):
            new_w.append(list(weights[t]))
        else:
            new_w.append([w * total / kept_sum if ok and kept_sum > 0 else 0.0 for w, ok in zip(weights[t], kept[t])])
    dropped = sum(not ok for row in kept for ok in row)
    return ids, new_w, kept, dropped, rerouted


def combine_oracle(out_sorted_SH: torch.Tensor, order_S: torch.Tensor, w_TK: torch.Tensor, num_tokens: int):
    """y[t] = sum over sorted rows j whose slot order[j] belongs to token t of w[slot] * out[j], float64."""
    top_k = w_TK.shape[1] if w_TK.dim() == 2 else 1
    w_S = w_TK.reshape(-1).double()
    y = torch.zeros(num_tokens, out_sorted_SH.shape[1], dtype=torch.float64)
    for j, slot in enumerate(order_S.tolist()):
        y[slot // top_k] += float(w_S[slot]) * out_sorted_SH[j].double()
    return y
