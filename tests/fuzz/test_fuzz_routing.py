"""Property-based fuzzing of routing against the float64 oracle (tests/oracle.py): every
router family, generated ties (duplicated logits, all-equal rows), extreme values, every
input dtype, with the native kernels and without."""

from __future__ import annotations

import pytest
import torch
from fuzz_support import (
    DTYPES,
    SEEDS,
    fuzz,
    grid_bias,
    grid_logits,
    native_kernels,
    randn,
    router_configs,
    tie_patterns,
)
from hypothesis import assume, given
from hypothesis import strategies as st
from oracle import (
    group_scores_oracle,
    route_oracle,
    token_scores_oracle,
    token_weights_oracle,
)

from activepath import RouterConfig, route
from activepath.tolerances import tolerance

ROUTE_DTYPES = (*DTYPES, torch.float64)


def route_logits(cfg: RouterConfig, logits_TE: torch.Tensor, dtype: torch.dtype, correction_E=None):
    """Route with logits exactly ``logits_TE``: the token rows are the logits, the router an identity."""
    eye_EE = torch.eye(cfg.num_experts, dtype=dtype)
    return route(cfg, logits_TE.to(dtype).contiguous(), eye_EE, correction_bias_E=correction_E)


def check_weights(cfg: RouterConfig, result, row_logits: list[list[float]], scores_rows, dtype) -> None:
    """Each chosen expert's weight is the float64 oracle's for the chosen set."""
    want = torch.tensor([token_weights_oracle(cfg, row, scores, ids, 1e-20) for row, scores, ids in
                         zip(row_logits, scores_rows, result.topk_ids_TK.tolist())], dtype=torch.float64)  # fmt: skip
    want = want.view(result.topk_weights_TK.shape)
    rtol = 1e-9 if result.topk_weights_TK.dtype == torch.float64 else 2e-6
    atol = rtol * cfg.routed_scaling_factor * 1e-3
    torch.testing.assert_close(result.topk_weights_TK.double(), want, rtol=rtol, atol=atol)


def check_basic(cfg: RouterConfig, result, num_tokens: int, dtype: torch.dtype) -> None:
    ids_TK, w_TK = result.topk_ids_TK, result.topk_weights_TK
    assert ids_TK.shape == w_TK.shape == (num_tokens, cfg.top_k) and ids_TK.dtype == torch.int64
    assert w_TK.dtype == (torch.float64 if result.logits_TE.dtype == torch.float64 else torch.float32)
    assert ((ids_TK >= 0) & (ids_TK < cfg.num_experts)).all()
    assert all(len(set(row)) == cfg.top_k for row in ids_TK.tolist()), "an expert chosen twice by one token"
    assert torch.isfinite(w_TK).all() and (w_TK >= 0).all()
    if cfg.normalize_topk or cfg.order == "topk_then_softmax":
        sums_T = w_TK.double().sum(-1) / cfg.routed_scaling_factor
        assert ((sums_T - 1).abs() < 1e-5).all() or cfg.scoring == "sigmoid", sums_T


def check_order(choice_rows: list[list[float]], ids_TK: torch.Tensor) -> None:
    """Along K: choice values descending; exactly equal ones by ascending id."""
    for choice, ids in zip(choice_rows, ids_TK.tolist()):
        keys = [(-choice[e], e) for e in ids]
        assert keys == sorted(keys), f"top-k order {ids} for choice values {[choice[e] for e in ids]}"


@fuzz(80)
@given(cfg=router_configs(), num_tokens=st.integers(1, 48), pattern=tie_patterns(),
       dtype=st.sampled_from(ROUTE_DTYPES), biased=st.booleans(), use_native=st.booleans())  # fmt: skip
def test_ties_break_to_the_lower_id_like_the_oracle(cfg, num_tokens, pattern, dtype, biased, use_native) -> None:
    # Grid logits are exact in every dtype, so ties are ties everywhere, and distinct
    # values stay far apart after the scores: the choice is the oracle's, exactly.
    logits_TE = grid_logits(num_tokens, cfg.num_experts, **pattern)
    correction = grid_bias(cfg.num_experts, pattern["seed"]) if biased and cfg.order == "score_then_topk" else None
    with native_kernels(use_native):
        result = route_logits(cfg, logits_TE, dtype, correction)
        again = route_logits(cfg, logits_TE, dtype, correction)
        t = pattern["seed"] % num_tokens
        alone = route_logits(cfg, logits_TE[t : t + 1], dtype, correction)
    with native_kernels(not use_native):
        other_path = route_logits(cfg, logits_TE, dtype, correction)
    check_basic(cfg, result, num_tokens, dtype)
    rows = logits_TE.tolist()
    scores_choice = [token_scores_oracle(cfg, row, correction) for row in rows]
    if correction is None and cfg.n_group == 1:
        expected = route_oracle(cfg, logits_TE, correction, norm_eps=1e-20)
        assert [sorted(r) for r in result.topk_ids_TK.tolist()] == [ids for ids, _ in expected]
        check_order([c for _, c in scores_choice], result.topk_ids_TK)
    else:  # score + bias, and sums of two scores, can land within an fp32 rounding of each other
        eps = 1e-12 if result.logits_TE.dtype == torch.float64 else 1e-6
        for row, ids in zip(rows, result.topk_ids_TK.tolist()):
            check_choice_valid(cfg, ids, row, correction, eps)
    check_weights(cfg, result, rows, [s for s, _ in scores_choice], dtype)
    # deterministic, a function of the token's own row, and the same on either path
    assert torch.equal(result.topk_ids_TK, again.topk_ids_TK)
    assert torch.equal(result.topk_weights_TK, again.topk_weights_TK)
    assert torch.equal(alone.topk_ids_TK[0], result.topk_ids_TK[t])
    assert torch.equal(other_path.topk_ids_TK, result.topk_ids_TK)
    torch.testing.assert_close(other_path.topk_weights_TK, result.topk_weights_TK, rtol=1e-6, atol=1e-7)


def near_tie(values: list[float], chosen: set[int], eps: float) -> bool:
    """Whether a chosen and an unchosen value lie within ``eps`` but are not equal."""
    lo = min(values[e] for e in chosen)
    return any(0 < abs(values[u] - lo) <= eps or 0 < lo - values[u] <= eps for u in range(len(values)) if u not in chosen)


def check_choice_valid(cfg: RouterConfig, ids: list[int], row: list[float], correction, eps: float) -> None:
    """``ids`` is a top-k of the oracle's choice values, up to swaps within ``eps``."""
    _, choice = token_scores_oracle(cfg, row, correction)
    if cfg.n_group > 1:
        groups = group_scores_oracle(cfg, choice)
        size = cfg.num_experts // cfg.n_group
        kept = sorted(range(cfg.n_group), key=lambda g: -groups[g])[: cfg.topk_group]
        if near_tie(groups, set(kept), eps):
            return  # a group boundary within rounding: either side is right
        assert all(e // size in kept for e in ids), f"expert of a losing group in {ids}"
        allowed = [e for e in range(cfg.num_experts) if e // size in kept]
    else:
        allowed = list(range(cfg.num_experts))
    worst = min((choice[e], -e) for e in ids)
    for u in set(allowed) - set(ids):
        # exactly equal values go to the lower id; values within eps may go either way
        assert (choice[u], -u) < worst or 0 < choice[u] - worst[0] <= eps, f"expert {u} beats chosen {ids}"


@fuzz(60)
@given(cfg=router_configs(), num_tokens=st.integers(1, 64), hidden=st.integers(1, 70), seed=SEEDS,
       dtype=st.sampled_from(ROUTE_DTYPES), with_bias=st.booleans(), use_native=st.booleans())  # fmt: skip
def test_random_routers_match_the_oracle(cfg, num_tokens, hidden, seed, dtype, with_bias, use_native) -> None:
    # Real matmuls in the input dtype: the logits within the dtype's tolerance of float64,
    # then the choice and weights are the oracle's on the logits as computed.
    x_TH = randn((num_tokens, hidden), seed).to(dtype)
    w_EH = randn((cfg.num_experts, hidden), seed + 1, scale=hidden**-0.5).to(dtype)
    bias_E = randn((cfg.num_experts,), seed + 2, 0.1).to(dtype) if with_bias else None
    correction = randn((cfg.num_experts,), seed + 3, 0.05) if cfg.scoring == "sigmoid" and seed % 2 else None
    with native_kernels(use_native):
        result = route(cfg, x_TH, w_EH, bias_E, correction)
    check_basic(cfg, result, num_tokens, dtype)
    want_TE = x_TH.double() @ w_EH.double().t() + (0 if bias_E is None else bias_E.double())
    err = (result.logits_TE.double() - want_TE).abs().max().item()
    assert err <= tolerance(result.logits_TE.dtype).bound(want_TE), f"router logits off by {err}"
    rows = result.logits_TE.double().tolist()
    eps = 1e-12 if dtype == torch.float64 else 1e-6
    for row, ids in zip(rows, result.topk_ids_TK.tolist()):
        check_choice_valid(cfg, ids, row, correction, eps)
    scores = [token_scores_oracle(cfg, row, correction)[0] for row in rows]
    check_weights(cfg, result, rows, scores, dtype)


@fuzz(50)
@given(cfg=router_configs(), num_tokens=st.integers(1, 24), pattern=tie_patterns(),
       dtype=st.sampled_from(ROUTE_DTYPES), use_native=st.booleans())  # fmt: skip
def test_extreme_logits_saturate_into_ties(cfg, num_tokens, pattern, dtype, use_native) -> None:
    # Logits up to ±8128 in steps of 64: fp32 scores underflow to 0 or saturate to 1, and
    # those become ties the float64 scores do not have; the oracle rounds its scores
    # to fp32 the same way. Weights stay finite and in range.
    assume(dtype != torch.float16 or pattern["levels"] <= 1)  # fp16 cannot hold ±8128's neighbours exactly
    logits_TE = grid_logits(num_tokens, cfg.num_experts, **{**pattern, "levels": min(pattern["levels"], 127)}, step=64.0)
    with native_kernels(use_native):
        result = route_logits(cfg, logits_TE, dtype)
    score_dtype = torch.float64 if result.logits_TE.dtype == torch.float64 else torch.float32
    check_basic(cfg, result, num_tokens, dtype)
    expected = route_oracle(cfg, logits_TE, round_scores=score_dtype, norm_eps=1e-20)
    assert [sorted(r) for r in result.topk_ids_TK.tolist()] == [ids for ids, _ in expected]
    scale = cfg.routed_scaling_factor
    assert (result.topk_weights_TK <= scale * (1 + 1e-6)).all()


@pytest.mark.parametrize("use_native", [True, False])
def test_an_all_zero_token_routes_the_same_on_every_path(use_native: bool) -> None:
    # Regression (found by the fuzz above): a zero hidden state gives an all-equal logit
    # row; the native router took experts 0..k-1 while torch.topk (bf16, grad mode, no
    # native kernels) took others (on torch 2.13 experts 10, 11 of 16).
    cfg = RouterConfig(num_experts=16, top_k=2)
    with native_kernels(use_native):
        for dtype in (torch.float32, torch.bfloat16):
            result = route(cfg, torch.zeros(3, 16, dtype=dtype), torch.randn(16, 16).to(dtype))
            assert result.topk_ids_TK.tolist() == [[0, 1]] * 3


@pytest.mark.parametrize("dtype, logit", [(torch.float64, -1 / 16), (torch.float32, -64.0)])
def test_sigmoid_routing_is_batch_invariant(dtype: torch.dtype, logit: float) -> None:
    # Regression (found by the fuzz above): torch's CPU sigmoid gave equal logits unequal
    # scores by their position in the vector, so all-equal rows went to different experts
    # by where they sat in the batch (float64: 18 experts in 3 groups; fp32: row 6 of 7).
    for cfg, tokens in ((RouterConfig(num_experts=18, top_k=1, scoring="sigmoid", n_group=3, topk_group=1), 2),
                        (RouterConfig(num_experts=5, top_k=1, scoring="sigmoid"), 7)):  # fmt: skip
        x_TH = torch.full((tokens, cfg.num_experts), logit, dtype=dtype)
        eye = torch.eye(cfg.num_experts, dtype=dtype)
        assert route(cfg, x_TH, eye).topk_ids_TK.tolist() == [[0]] * tokens
        assert route(cfg, x_TH[:1], eye).topk_ids_TK.tolist() == [[0]]


def test_sigmoid_routing_backpropagates() -> None:
    # Found by the layer fuzz, in this branch's own first version of the fix above: an
    # in-place add on exp's output broke autograd through a sigmoid router.
    cfg = RouterConfig(num_experts=4, top_k=2, scoring="sigmoid", normalize_topk=True)
    w_EH = torch.randn(4, 8, requires_grad=True)
    route(cfg, torch.randn(3, 8), w_EH).topk_weights_TK.sum().backward()
    assert w_EH.grad is not None and torch.isfinite(w_EH.grad).all()
