"""The ``triton`` experts backend, on CPU under Triton's interpreter (``TRITON_INTERPRET=1``)
on tiny shapes: its kernels against the float64 oracle and against the CPU stages, inside
real transformers models, and its refusals. Skipped when triton is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import activepath
from activepath import ActivationConfig, ExpertWeights, combine, fuses_combine, plan_dispatch
from activepath.backends import triton as triton_moe
from activepath.tolerances import MODEL_LOGITS_ATOL_FP32, triton_tolerance
from families import tiny_model
from oracle import moe_oracle

pytest.importorskip("triton")
if not triton_moe.interpreting():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (see conftest.py)", allow_module_level=True)

import triton  # noqa: E402  (after the skip: triton may be absent)
import triton.language as tl  # noqa: E402

from activepath.kernels.triton import kernels as triton_kernels  # noqa: E402


@triton.jit
def _block_probe(counts_ptr, out_ptr, E, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Stores each program's (expert, lo, hi) as ``triton_kernels._block`` finds it."""
    e, lo, hi = triton_kernels._block(counts_ptr, E, E_POW2, BLOCK_M)
    b = tl.program_id(0)
    tl.store(out_ptr + 3 * b, e)
    tl.store(out_ptr + 3 * b + 1, lo)
    tl.store(out_ptr + 3 * b + 2, hi)

E, H, I = 6, 48, 40  # H and I not multiples of the tiles below: every tile loop has a tail
TILES = [triton_moe.TritonConfig(block_m=16, block_n=16, block_k=16),
         triton_moe.TritonConfig(block_m=32, block_n=64, block_k=32)]  # fmt: skip


def _weights(act: str = "silu", *, biases: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w_gu = torch.randn(E, 2 * I, H, generator=gen) / H**0.5
    w_dn = torch.randn(E, H, I, generator=gen) / I**0.5
    b_gu = 0.1 * torch.randn(E, 2 * I, generator=gen) if biases else None
    b_dn = 0.1 * torch.randn(E, H, generator=gen) if biases else None
    weights = ExpertWeights(w_gu, w_dn, ActivationConfig(kind=act), b_gate_up_E2I=b_gu, b_down_EH=b_dn)
    return weights.to(dtype)


def _routing(tokens: int, top_k: int, seed: int, experts: tuple[int, ...] = tuple(range(E))):
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts)
    ids_TK = torch.stack([pool[torch.randperm(len(experts), generator=gen)[:top_k]] for _ in range(tokens)])
    return ids_TK, torch.rand(tokens, top_k, generator=gen)


def _check(weights: ExpertWeights, x_TH: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor,
           config: triton_moe.TritonConfig) -> None:  # fmt: skip
    plan = plan_dispatch(ids_TK, E)
    y_TH = triton_moe.triton_experts(weights, x_TH, plan, topk_weights_TK=w_TK, config=config)
    expected = moe_oracle(weights, x_TH, ids_TK, w_TK)
    assert y_TH.dtype == x_TH.dtype and y_TH.shape == x_TH.shape
    err = (y_TH.double() - expected).abs().max().item()
    assert err <= triton_tolerance(x_TH.dtype).bound(expected), err


@pytest.mark.parametrize("config", TILES, ids=["tiles16", "tiles32-64"])
@pytest.mark.parametrize("tokens", [1, 13, 40])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_matches_float64_oracle(config: triton_moe.TritonConfig, tokens: int, act: str) -> None:
    weights = _weights(act, biases=tokens == 13, seed=tokens)
    ids_TK, w_TK = _routing(tokens, 2, seed=tokens)
    _check(weights, torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens)), ids_TK, w_TK, config)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype: torch.dtype) -> None:
    ids_TK, w_TK = _routing(29, 3, seed=2)
    _check(_weights(dtype=dtype), torch.randn(29, H).to(dtype), ids_TK, w_TK, TILES[0])


def test_all_tokens_on_one_expert_and_idle_experts() -> None:
    # 37 slots of expert 4: three blocks of 16 for one expert, five experts with none
    ids_TK, w_TK = _routing(37, 1, seed=3, experts=(4,))
    _check(_weights(), torch.randn(37, H), ids_TK, w_TK, TILES[0])
    ids_TK, w_TK = _routing(11, 2, seed=4, experts=(1, 5))
    _check(_weights(), torch.randn(11, H), ids_TK, w_TK, TILES[1])


@pytest.mark.parametrize("counts", [[0, 41, 0, 17, 16, 65], [1, 1, 1, 1, 1, 1], [0, 0, 0, 123, 0, 0], [0] * 6, [5]])
@pytest.mark.parametrize("block_m", [16, 32])
def test_blocks_cover_each_expert_run_once(counts: list[int], block_m: int) -> None:
    # What each GEMM program finds as its block (triton_kernels._block), read out by a
    # probe kernel: every sorted slot in exactly one block, a block inside one expert's run,
    # at most block_m slots, and the programs past the last block (the grid is sized by
    # max_blocks from S and E alone) empty.
    num_slots, num_experts = sum(counts), len(counts)
    grid = triton_moe.max_blocks(num_slots, num_experts, block_m)
    assert grid >= sum(-(-c // block_m) for c in counts)
    out = torch.full((max(grid, 1), 3), -7, dtype=torch.int64)
    if grid:
        _block_probe[(grid,)](torch.tensor(counts), out, num_experts, E_POW2=triton_moe._pow2(num_experts), BLOCK_M=block_m)
    offsets = [0, *torch.tensor(counts).cumsum(0).tolist()]
    covered = []
    for e, lo, hi in out[:grid].tolist():
        assert 0 <= e < num_experts
        if lo >= hi:
            continue
        assert hi - lo <= block_m and offsets[e] <= lo < hi <= offsets[e + 1]
        covered += range(lo, hi)
    assert covered == list(range(num_slots))


def _gpt_oss_weights(*, dtype: torch.dtype = torch.float32, seed: int = 0) -> ExpertWeights:
    """GPT-OSS's layout: transposed [E, H, 2I] / [E, I, H], gate/up rows interleaved, biases,
    the clamped SwiGLU; a scale that drives some gates and ups past the clamp."""
    gen = torch.Generator().manual_seed(seed)
    act = ActivationConfig(kind="clamped_swiglu", interleaved=True, alpha=1.702, limit=1.5)
    weights = ExpertWeights(3 * torch.randn(E, H, 2 * I, generator=gen) / H**0.5, torch.randn(E, I, H, generator=gen) / I**0.5,
                            act, transposed=True, b_gate_up_E2I=0.1 * torch.randn(E, 2 * I, generator=gen),
                            b_down_EH=0.1 * torch.randn(E, H, generator=gen))  # fmt: skip
    return weights.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 13, 37])
def test_gpt_oss_layout_matches_float64_oracle(tokens: int, dtype: torch.dtype) -> None:
    weights = _gpt_oss_weights(dtype=dtype, seed=tokens)
    ids_TK, w_TK = _routing(tokens, 2, seed=tokens)
    x_TH = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    for config in TILES:
        _check(weights, x_TH, ids_TK, w_TK, config)
    gate_up = torch.einsum("th,ehn->ten", x_TH.double(), weights.w_gate_up.double())
    assert (gate_up[..., 0::2] > weights.activation.limit).any()  # the clamps are exercised
    assert (gate_up[..., 1::2].abs() > weights.activation.limit).any()


def test_default_tiles_follow_slots_per_expert() -> None:
    decode = triton_moe.default_config(8, 128, torch.bfloat16)
    assert decode.block_m == 16
    assert triton_moe.default_config(4096, 128, torch.bfloat16).block_m == 64
    assert triton_moe.default_config(32768, 128, torch.bfloat16).block_m == 128
    assert triton_moe.default_config(32768, 128, torch.float32) == triton_moe.TritonConfig()


def test_combine_matches_the_cpu_combine_bitwise_with_dropped_slots() -> None:
    # The same products, added in the same order (ascending expert) as combine(); slots a
    # capacity stage dropped add nothing.
    ids_TK, w_TK = _routing(23, 3, seed=6)
    kept_TK = torch.rand(23, 3, generator=torch.Generator().manual_seed(7)) > 0.3
    plan = plan_dispatch(ids_TK, E, kept_TK)
    out_SH = torch.randn(plan.order_S.shape[0], H)
    weighted_SH = out_SH * w_TK.reshape(-1).index_select(0, plan.order_S).unsqueeze(1)
    got = triton_moe.combine_sorted(weighted_SH, plan, torch.float32)
    assert torch.equal(got, combine(out_SH.clone(), plan, w_TK))


def test_empty_batch() -> None:
    plan = plan_dispatch(torch.zeros(0, 2, dtype=torch.long), E)
    y = triton_moe.triton_experts(_weights(), torch.zeros(0, H), plan, topk_weights_TK=torch.zeros(0, 2))
    assert y.shape == (0, H)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_real_models_match_transformers_eager(family: str) -> None:
    reference, model = tiny_model(family), tiny_model(family)
    activepath.optimize(model, backend="triton", collect_stats=True)
    ids = torch.randint(3, 160, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids).logits
    assert (got - expected).abs().max().item() <= MODEL_LOGITS_ATOL_FP32
    stats = activepath.moe_layers(model)[0][1].last_stats
    assert stats is not None and stats.experts_s > 0  # the fused call: combine is inside it


def test_refusals_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fuses_combine("triton")
    plan = plan_dispatch(torch.zeros(3, 1, dtype=torch.long), E)
    x, w = torch.randn(3, H), torch.ones(3, 1)
    strided = ExpertWeights(torch.randn(E, H, 2 * I).transpose(1, 2), torch.randn(E, H, I), ActivationConfig())
    with pytest.raises(RuntimeError, match="contiguous along their last dimension"):
        triton_moe.triton_experts(strided, x, plan, topk_weights_TK=w)
    with pytest.raises(RuntimeError, match="float64"):
        triton_moe.triton_experts(_weights(dtype=torch.float64), x.double(), plan, topk_weights_TK=w)
    monkeypatch.setattr(triton_moe, "interpreting", lambda: False)  # as on a CPU-only machine without it
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_moe.triton_experts(_weights(), x, plan, topk_weights_TK=w)
    monkeypatch.setattr(triton_moe, "available", lambda: False)
    with pytest.raises(RuntimeError, match="pip install triton"):
        triton_moe.triton_experts(_weights(), x, plan, topk_weights_TK=w)


@pytest.mark.parametrize("bad", [dict(block_m=8), dict(block_n=48), dict(block_k=True), dict(num_warps=3)])
def test_config_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        triton_moe.TritonConfig(**bad)


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_the_gpu(arch: int) -> None:
    # What the interpreter cannot check: the compiled-mode rules, lowering to PTX and cubin
    # for Ampere / Hopper, and tensor cores for the half-precision GEMMs. Triton fixes its
    # mode at import, so this runs in a process of its own with the interpreter off.
    script = ("import json, sys; from activepath.backends import triton as triton_moe; "
              f"ptx = triton_moe.compile_kernels({arch}); "
              "json.dump({k: ('mma' in v, len(v)) for k, v in ptx.items()}, sys.stdout)")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert len(result) == 13 and all(size > 0 for _, size in result.values())
    for variant, (tensor_cores, _) in result.items():
        gemm = not variant.startswith(("combine", "plan_slots"))
        assert tensor_cores == (gemm and "fp32" not in variant), variant  # fp32 stays IEEE: no TF32


def test_other_tiles_are_one_registration_away(monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    from activepath.backends import registry

    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    tiles = triton_moe.TritonConfig(block_m=32, block_n=16, block_k=32)
    activepath.register_backend("triton_m32", functools.partial(triton_moe.triton_experts, config=tiles),
                                fuses_combine=True)  # fmt: skip
    reference, model = tiny_model("olmoe"), tiny_model("olmoe")
    activepath.optimize(model, backend="triton_m32")
    ids = torch.randint(3, 160, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max().item() <= MODEL_LOGITS_ATOL_FP32


def test_runs_from_the_device_plan_without_reading_counts_back() -> None:
    # The plan a GPU layer gets (sorted ids + searchsorted, dispatch._device_plan), here on
    # CPU tensors: the same result as from the CPU plan, and the backend never reads the
    # per-expert counts back to the host (off the CPU that read would be a sync, and would
    # make the layer impossible to capture in a CUDA graph).
    from activepath.moe import dispatch

    weights, x_TH = _weights(biases=True), torch.randn(19, H)
    ids_TK, w_TK = _routing(19, 3, seed=8, experts=(0, 1, 3, 5))
    plan = dispatch._device_plan(ids_TK, E, validate=False)
    y_TH = triton_moe.triton_experts(weights, x_TH, plan, topk_weights_TK=w_TK)
    assert "counts" not in plan.__dict__ and "offsets" not in plan.__dict__
    expected = triton_moe.triton_experts(weights, x_TH, plan_dispatch(ids_TK, E), topk_weights_TK=w_TK)
    assert torch.equal(y_TH, expected)


@pytest.mark.parametrize("tokens, k, experts, pool", [
    (1, 2, 6, None), (13, 3, 6, None), (300, 2, 6, None), (37, 1, 6, (4,)), (11, 2, 128, (1, 5, 127)),
    (97, 8, 128, None),
])  # fmt: skip
def test_one_launch_plan_matches_plan_dispatch(tokens: int, k: int, experts: int, pool: tuple[int, ...] | None) -> None:
    # The GPU layer's plan (triton_moe.plan_on_device: a counting sort in one launch), here
    # under the interpreter: the same stable order, tokens, experts and counts as the CPU
    # plan, and its positions the inverse of the order. One token, a prime count, several
    # programs (600 slots), all slots on one expert, idle experts, 128 experts.
    gen = torch.Generator().manual_seed(tokens)
    if pool is None:
        ids_TK = torch.rand(tokens, experts, generator=gen).topk(k, dim=1).indices
    else:
        choice = torch.tensor(pool)
        ids_TK = torch.stack([choice[torch.randperm(len(pool), generator=gen)[:k]] for _ in range(tokens)])
    plan = triton_moe.plan_on_device(ids_TK, experts)
    assert plan is not None
    host = plan_dispatch(ids_TK, experts)
    for name in ("order_S", "token_idx_S", "expert_ids_S", "counts_E"):
        assert torch.equal(getattr(plan, name), getattr(host, name)), name
    assert torch.equal(plan.position_S, host.position_S)
    assert triton_moe.plan_on_device(torch.zeros(0, 2, dtype=torch.long), experts) is None  # nothing to plan
    too_many = torch.zeros(triton_moe.PLAN_MAX_SLOTS // 2 + 1, 2, dtype=torch.long)
    assert triton_moe.plan_on_device(too_many, experts) is None  # torch's sort takes over
