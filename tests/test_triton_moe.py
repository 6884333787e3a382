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
from activepath import ActivationConfig, ExpertWeights, combine, fuses_combine, plan_dispatch, triton_moe
from activepath.tolerances import MODEL_LOGITS_ATOL_FP32, tolerance
from families import tiny_model
from oracle import moe_oracle

pytest.importorskip("triton")
if not triton_moe.interpreting():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (see conftest.py)", allow_module_level=True)

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
    assert err <= tolerance(x_TH.dtype).bound(expected), err


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


@pytest.mark.parametrize("list_max_blocks", [256, 0])  # both ways of building the table
def test_blocks_cover_each_expert_run_once(list_max_blocks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_moe, "_LIST_MAX_BLOCKS", list_max_blocks)
    ids_TK, _ = _routing(41, 3, seed=5, experts=(0, 2, 3))
    plan = plan_dispatch(ids_TK, E)
    blocks = triton_moe.plan_blocks(plan, 16, torch.device("cpu"))
    covered = []
    for e, lo, hi in zip(blocks.expert_B.tolist(), blocks.lo_B.tolist(), blocks.hi_B.tolist()):
        assert 0 < hi - lo <= 16 and plan.offsets[e] <= lo < hi <= plan.offsets[e + 1]
        covered += range(lo, hi)
    assert covered == list(range(41 * 3))
    empty = plan_dispatch(torch.zeros(0, 2, dtype=torch.long), E)
    assert triton_moe.plan_blocks(empty, 16, torch.device("cpu")).num_blocks == 0


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


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "deepseek_v3"])
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
    gpt_oss = ExpertWeights(torch.randn(E, H, 2 * I), torch.randn(E, I, H),
                            ActivationConfig(kind="clamped_swiglu", interleaved=True), transposed=True)  # fmt: skip
    with pytest.raises(RuntimeError, match="GPT-OSS"):
        triton_moe.triton_experts(gpt_oss, x, plan, topk_weights_TK=w)
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
    script = ("import json, sys; from activepath import triton_moe; "
              f"ptx = triton_moe.compile_kernels({arch}); "
              "json.dump({k: ('mma' in v, len(v)) for k, v in ptx.items()}, sys.stdout)")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert len(result) == 9 and all(size > 0 for _, size in result.values())
    for variant, (tensor_cores, _) in result.items():
        gemm = not variant.startswith("combine")
        assert tensor_cores == (gemm and "fp32" not in variant), variant  # fp32 stays IEEE: no TF32


def test_other_tiles_are_one_registration_away(monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    from activepath import experts

    monkeypatch.setattr(experts, "_BACKENDS", dict(experts._BACKENDS))
    monkeypatch.setattr(experts, "_FUSES_COMBINE", set(experts._FUSES_COMBINE))
    tiles = triton_moe.TritonConfig(block_m=32, block_n=16, block_k=32)
    activepath.register_backend("triton_m32", functools.partial(triton_moe.triton_experts, config=tiles),
                                fuses_combine=True)  # fmt: skip
    reference, model = tiny_model("olmoe"), tiny_model("olmoe")
    activepath.optimize(model, backend="triton_m32")
    ids = torch.randint(3, 160, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max().item() <= MODEL_LOGITS_ATOL_FP32
