"""Weight-only int8: the native kernel (int8 weights with a scale per output channel, fp32
activations) against a float64 reference of the dequantized weights on awkward sizes, its
batch invariance and argument checks; ``quantize_rows``; ``Int8ExpertWeights`` on both
paths (native kernel, fbgemm fallback) and the accuracy the weight-only path guarantees."""

from __future__ import annotations

import pytest
import torch

import activepath
from activepath.kernels import cpu as native
from activepath.kernels.cpu import build as native_build
from activepath.kernels.cpu import int8 as native_int8
from activepath.kernels.cpu.int8 import grouped_nk_gemm_i8, linear_i8, quantize_rows
from activepath.moe import weights_int8
from activepath.moe.weights_int8 import Int8ExpertWeights
from activepath.tolerances import (
    INT8_FALLBACK_DEQUANTIZED_MEAN_RTOL,
    INT8_FALLBACK_DEQUANTIZED_MEAN_RTOL_7BIT,
    INT8_LAYER_RTOL,
    INT8_WEIGHT_ONLY_LOGITS_MEAN_RTOL,
    INT8_WEIGHT_ONLY_TOP1_AGREEMENT,
    tolerance,
)
from families import FAMILIES, tiny_model
from test_families import random_ids
from test_layer import H, I, make_layer

needs_native = pytest.mark.skipif(
    not native_int8.available(), reason=f"native int8 kernel unavailable: {native.unavailable_reason()}"
)
U32 = 2.0**-24  # fp32 unit roundoff


def _quantized_stack(num_experts: int, n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(num_experts, n, k, generator=gen) * torch.rand(num_experts, n, 1, generator=gen)
    pairs = [quantize_rows(w[e]) for e in range(num_experts)]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


def _reference(x_MK, q_ENK, scale_EN, segments, bias_EN, rows):
    """float64 result of the dequantized weights, and an elementwise rounding-error bound
    for an fp32 evaluation in any summation order of depth <= K + 4."""
    n, k = q_ENK.shape[1:]
    out = torch.zeros(rows, n, dtype=torch.float64)
    bound = torch.zeros(rows, n, dtype=torch.float64)
    for e, lo, hi in segments:
        w_NK = q_ENK[e].double() * scale_EN[e].double().unsqueeze(1)
        b_N = torch.zeros(n, dtype=torch.float64) if bias_EN is None else bias_EN[e].double()
        out[lo:hi] = x_MK[lo:hi].double() @ w_NK.T + b_N
        bound[lo:hi] = 2 * (k + 4) * U32 * (x_MK[lo:hi].double().abs() @ w_NK.abs().T + b_N.abs())
    return out, bound


# -- the kernel ------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("k", [1, 7, 16, 33, 100])
@pytest.mark.parametrize("n", [1, 3, 37, 130])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_float64_of_dequantized_weights(k: int, n: int, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(k * 1000 + n)
    q_ENK, scale_EN = _quantized_stack(5, n, k, gen)
    bias_EN = torch.randn(5, n, generator=gen) if with_bias else None
    # Row counts 1, 0 (an expert with no rows), 2, 5, 13, 97 (prime); experts 1 and 3 skipped.
    rows = [1, 0, 2, 5, 13, 97]
    bounds = [0] + torch.tensor(rows).cumsum(0).tolist()
    segments = [(e, lo, hi) for e, lo, hi in zip([4, 0, 2, 0, 4, 2], bounds, bounds[1:])]
    x_MK = torch.randn(bounds[-1], k, generator=gen)
    out = torch.full((bounds[-1], n), float("nan"))
    grouped_nk_gemm_i8(x_MK, q_ENK, scale_EN, segments, out, bias_EN)
    expected, bound = _reference(x_MK, q_ENK, scale_EN, segments, bias_EN, bounds[-1])
    err = (out.double() - expected).abs()
    assert (err <= bound + 1e-30).all(), float((err - bound).max())


@needs_native
def test_kernel_on_decode_shapes_and_segments_as_tensor() -> None:
    gen = torch.Generator().manual_seed(3)
    q_ENK, scale_EN = _quantized_stack(16, 256, 2048, gen)  # > 1 MiB over 8 experts: multi-threaded
    x_MK = torch.randn(8, 2048, generator=gen)
    segments = [(e, j, j + 1) for j, e in enumerate([15, 3, 0, 7, 8, 9, 1, 12])]
    out = torch.empty(8, 256)
    grouped_nk_gemm_i8(x_MK, q_ENK, scale_EN, torch.tensor(segments, dtype=torch.int32), out)
    expected, bound = _reference(x_MK, q_ENK, scale_EN, segments, None, 8)
    assert ((out.double() - expected).abs() <= bound).all()


@needs_native
def test_rows_outside_segments_untouched_and_strided_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    q_big, scale_big = _quantized_stack(2, 64, 48, gen)
    q_ENK = q_big[:, :, :40]  # row stride 48, unit last stride
    scale_EN = torch.cat([scale_big, torch.ones(2, 5)], dim=1)[:, :64]  # expert stride 69
    x_MK = torch.randn(6, 80, generator=gen)[:, :40]  # row stride 80
    bias_EN = torch.randn(2, 64, generator=gen)
    out_big = torch.full((6, 70), 7.0)
    out = out_big[:, 3:67]  # row stride 70
    grouped_nk_gemm_i8(x_MK, q_ENK, scale_EN, [(1, 2, 5)], out, bias_EN)
    assert (out_big[:2] == 7).all() and (out_big[5:] == 7).all()
    assert (out_big[:, :3] == 7).all() and (out_big[:, 67:] == 7).all()
    expected, bound = _reference(x_MK, q_ENK, scale_EN, [(1, 2, 5)], bias_EN, 6)
    assert ((out[2:5].double() - expected[2:5]).abs() <= bound[2:5]).all()


@needs_native
def test_empty_inputs_and_linear() -> None:
    q_NK, scale_N = quantize_rows(torch.randn(9, 20))
    out = torch.empty(0, 9)
    grouped_nk_gemm_i8(torch.empty(0, 20), q_NK.unsqueeze(0), scale_N.unsqueeze(0), [], out)
    grouped_nk_gemm_i8(torch.empty(0, 20), q_NK.unsqueeze(0), scale_N.unsqueeze(0), [(0, 0, 0)], out)
    x_MK, bias_N = torch.randn(3, 20), torch.randn(9)
    w_NK = q_NK.float() * scale_N.unsqueeze(1)
    torch.testing.assert_close(linear_i8(x_MK, q_NK, scale_N, bias_N), x_MK @ w_NK.T + bias_N)
    # K = 0: the product is empty, the bias remains.
    torch.testing.assert_close(
        linear_i8(torch.empty(2, 0), torch.empty(4, 0, dtype=torch.int8), torch.ones(4), bias_N[:4]),
        bias_N[:4].expand(2, 4),
    )


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_batch_invariant_bitwise(threads: int) -> None:
    gen = torch.Generator().manual_seed(1)
    q_ENK, scale_EN = _quantized_stack(3, 520, 2050, gen)  # K tail of 2; > 1 MiB: threaded
    bias_EN = torch.randn(3, 520, generator=gen)
    x_MK = torch.randn(41, 2050, generator=gen)
    full = torch.empty(41, 520)
    grouped_nk_gemm_i8(x_MK, q_ENK, scale_EN, [(2, 0, 41)], full, bias_EN)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for t in (0, 5, 38, 40):  # inside a 4-row tile, and in the 1-row tail
            alone = torch.empty(1, 520)
            grouped_nk_gemm_i8(x_MK[t : t + 1].contiguous(), q_ENK, scale_EN, [(2, 0, 1)], alone, bias_EN)
            assert torch.equal(alone[0], full[t])
        # The same rows split across segments of the same expert: still the same bits.
        split = torch.empty(41, 520)
        grouped_nk_gemm_i8(x_MK, q_ENK, scale_EN, [(2, 0, 3), (2, 3, 17), (2, 17, 41)], split, bias_EN)
        assert torch.equal(split, full)
    finally:
        torch.set_num_threads(previous)


def _good_args() -> dict[str, object]:
    q_ENK, scale_EN = _quantized_stack(2, 6, 8, torch.Generator().manual_seed(0))
    return {"x": torch.randn(4, 8), "q": q_ENK, "scale": scale_EN, "segments": [(1, 0, 4)],
            "out": torch.empty(4, 6), "bias": torch.zeros(2, 6)}  # fmt: skip


def _with(name: str, make) -> dict[str, object]:  # noqa: ANN001 - a small lambda
    args = _good_args()
    args[name] = make(args)
    return args


BAD_INPUTS = [
    (_with("x", lambda a: a["x"].double()), TypeError, "x must be torch.float32"),
    (_with("x", lambda a: a["x"].tolist()), TypeError, "x must be a torch.Tensor"),
    (_with("q", lambda a: a["q"].float()), TypeError, "q must be torch.int8"),
    (_with("scale", lambda a: a["scale"].half()), TypeError, "scale must be torch.float32"),
    (_with("bias", lambda a: a["bias"].double()), TypeError, "bias must be torch.float32"),
    (_with("q", lambda a: a["q"][0]), ValueError, "q must be 3-D"),
    (_with("x", lambda a: torch.randn(4, 9)), ValueError, "x has 9 features"),
    (_with("x", lambda a: torch.randn(4, 16)[:, ::2]), ValueError, "x must have unit stride"),
    (_with("q", lambda a: a["q"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "q must have unit"),
    (_with("out", lambda a: torch.empty(4, 5)), ValueError, r"out must be \[4, 6\]"),
    (_with("out", lambda a: torch.empty(1, 6).expand(4, 6)), ValueError, "out rows overlap"),
    (_with("scale", lambda a: torch.ones(2, 5)), ValueError, r"scale must be \[2, 6\]"),
    (_with("bias", lambda a: torch.zeros(6)), ValueError, "bias must be 2-D"),
    (_with("bias", lambda a: torch.zeros(3, 6)), ValueError, r"bias must be \[2, 6\]"),
    (_with("q", lambda a: a["q"][:, :0]), ValueError, "at least one output row"),
    (_with("segments", lambda a: [(2, 0, 4)]), ValueError, r"\[2, 0, 4\] out of range"),
    (_with("segments", lambda a: [(-1, 0, 4)]), ValueError, "out of range"),
    (_with("segments", lambda a: [(0, 3, 2)]), ValueError, "out of range"),
    (_with("segments", lambda a: [(0, 0, 5)]), ValueError, "out of range"),
    (_with("segments", lambda a: [(0, -1, 2)]), ValueError, "out of range"),
    (_with("segments", lambda a: [(0, 0)]), ValueError, "a segment is"),
    (_with("segments", lambda a: torch.zeros(1, 3)), TypeError, "integer tensor"),
    (_with("segments", lambda a: torch.zeros(1, 2, dtype=torch.int64)), ValueError, r"\[G, 3\]"),
]


@needs_native
@pytest.mark.parametrize(("args", "error", "match"), BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(args: dict[str, object], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        grouped_nk_gemm_i8(args["x"], args["q"], args["scale"], args["segments"], args["out"], args["bias"])


@needs_native
def test_out_overlapping_an_input_is_refused() -> None:
    q_ENK, scale_EN = _quantized_stack(1, 8, 8, torch.Generator().manual_seed(0))
    x_MK = torch.randn(4, 8)
    with pytest.raises(ValueError, match="out overlaps x"):
        grouped_nk_gemm_i8(x_MK, q_ENK, scale_EN, [(0, 0, 4)], x_MK)


def _disable_native(monkeypatch: pytest.MonkeyPatch) -> None:
    """``native.set_enabled(False)`` until the test ends (the environment is read only once)."""
    native.available()  # settle the initial state first, so undo restores it
    monkeypatch.setitem(native_build._state, "enabled", False)


def test_unavailable_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    _disable_native(monkeypatch)
    assert not native_int8.available()
    with pytest.raises(RuntimeError, match="not available"):
        linear_i8(torch.randn(1, 4), torch.zeros(2, 4, dtype=torch.int8), torch.ones(2))


# -- quantize_rows ---------------------------------------------------------------------


def _steps_off(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|w - q * scale| / scale, exactly: in float64 an int8 times an fp32 is exact, and so is
    its difference from an fp32 value this close (measured in fp32 the product's own
    rounding, up to 127 * 2**-24 of a step, would blur a half-step bound)."""
    scale_N1 = scale.double().unsqueeze(1)
    return (w.double() - q.double() * scale_N1).abs() / scale_N1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_quantize_rows_round_trip(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):  # seeded; bf16's coarse grid puts near-ties in a few of these (see quantize_rows)
        w = (torch.randn(40, 30, generator=gen) * torch.logspace(-6, 3, 40).unsqueeze(1)).to(dtype).T  # strided
        q, scale = quantize_rows(w)
        assert q.dtype == torch.int8 and q.is_contiguous() and q.shape == (30, 40)
        assert scale.dtype == torch.float32 and scale.shape == (30,)
        assert (q.abs().amax(dim=1) == 127).all()  # the full range is used per row
        assert (_steps_off(w.float(), q, scale) <= 0.5).all()  # the nearest integer: at most half a step


def test_quantize_rows_rounds_a_near_tie_to_the_nearest_integer() -> None:
    # max 252: scale = fl(252 / 127) is a hair above 252 / 127, so -126 / scale = -63.49999976,
    # which an fp32 quotient rounds to the tie -63.5 and then (to even) to -64.
    w = torch.tensor([[252.0, -126.0, 126.0, 1.0]], dtype=torch.bfloat16)
    q, scale = quantize_rows(w)
    assert q.tolist() == [[127, -63, 63, 1]]
    assert (_steps_off(w.float(), q, scale) <= 0.5).all()


def test_quantize_rows_edge_cases() -> None:
    w = torch.zeros(3, 5)
    w[1] = torch.tensor([1e-30, -2e-30, 0, 0, 0])  # tiny but nonzero
    q, scale = quantize_rows(w)
    assert (q[0] == 0).all() and scale[0] == torch.finfo(torch.float32).tiny
    assert q[1].tolist()[:2] == [64, -127] or q[1].tolist()[:2] == [63, -127]
    q0, s0 = quantize_rows(torch.empty(4, 0))
    assert q0.shape == (4, 0) and s0.shape == (4,)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rows(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rows(torch.tensor([[float("inf"), 1.0]]))
    with pytest.raises(ValueError, match="2-D"):
        quantize_rows(torch.randn(4))
    with pytest.raises(TypeError, match="float"):
        quantize_rows(torch.ones(2, 2, dtype=torch.int32))


# -- Int8ExpertWeights -----------------------------------------------------------------


@pytest.mark.parametrize("act", ["silu", "gpt_oss"])
def test_int8_weights_storage(act: str) -> None:
    source = make_layer(act).experts
    q = Int8ExpertWeights.from_weights(source)
    e_ = source.num_experts
    assert (q.q_gate_up.shape, q.q_gate_up.dtype) == ((e_, 2 * I, H), torch.int8)
    assert (q.q_down.shape, q.q_down.dtype) == ((e_, H, I), torch.int8)
    assert (q.scale_gate_up.shape, q.scale_down.shape) == ((e_, 2 * I), (e_, H))
    assert list(q.parameters()) == []  # the float weights are not kept
    assert {"q_gate_up", "scale_gate_up", "q_down", "scale_down"} <= set(q.state_dict())
    with_bias = act == "gpt_oss"
    assert (q.bias_gate_up is not None) == with_bias and q.b_gate_up is None and q.b_down is None
    assert q.weight_bytes_per_expert == 3 * H * I + 4 * (2 * I + H) * (2 if with_bias else 1)
    for e in (0, e_ - 1):
        w_gu, w_dn = source.matrices(e)  # views in nn.Linear layout, transposed storage for GPT-OSS
        for (qm, sm), w, deq in zip((quantize_rows(w_gu), quantize_rows(w_dn)), (w_gu, w_dn), q.matrices(e)):
            torch.testing.assert_close(deq, qm.float() * sm.unsqueeze(1), rtol=0, atol=0)
            assert deq.dtype == torch.float32 and deq.shape == w.shape


def _segments_and_x(seed: int = 4) -> tuple[list[tuple[int, int, int]], torch.Tensor]:
    # Experts 1, 3, 4, 6 skipped; expert 2 has no rows; 23 slots.
    segments = [(0, 0, 5), (2, 5, 5), (5, 5, 6), (7, 6, 19), (6, 19, 23)]
    return segments, torch.randn(23, H, generator=torch.Generator().manual_seed(seed))


def _dequantized_reference(weights: Int8ExpertWeights, x_SH: torch.Tensor, segments) -> torch.Tensor:
    from activepath.moe.experts import gated_activation

    out = torch.zeros(x_SH.shape, dtype=torch.float64)
    for e, lo, hi in segments:
        (w_gu, w_dn), (b_gu, b_dn) = weights.matrices(e), weights.biases(e)
        gu = x_SH[lo:hi].double() @ w_gu.double().T + (0 if b_gu is None else b_gu.double())
        out[lo:hi] = gated_activation(weights.activation, gu) @ w_dn.double().T + (0 if b_dn is None else b_dn.double())
    return out


@needs_native
@pytest.mark.parametrize("act", ["silu", "gpt_oss"])
def test_run_segments_matches_dequantized_reference(act: str) -> None:
    weights = Int8ExpertWeights.from_weights(make_layer(act, seed=3).experts)
    segments, x_SH = _segments_and_x()
    with torch.no_grad():
        got = weights.run_segments(x_SH, torch.tensor(segments))
        again = weights.run_segments(x_SH, iter(segments))  # any iterable of triples
        looped = torch.cat([weights.mlp(x_SH[lo:hi], e) for e, lo, hi in segments])
    expected = _dequantized_reference(weights, x_SH, segments)
    # Only fp32 rounding separates the kernel from float64 on the same (dequantized) weights.
    assert (got.double() - expected).abs().max() <= tolerance(torch.float32).bound(expected) * H**0.5
    assert torch.equal(got, again)
    assert torch.equal(got, looped)  # one grouped call == per-expert calls, bit for bit


@needs_native
def test_run_segments_batch_invariant_and_uncovered_rows_zero() -> None:
    weights = Int8ExpertWeights.from_weights(make_layer("silu", seed=5).experts)
    segments, x_SH = _segments_and_x()
    with torch.no_grad():
        full = weights.run_segments(x_SH, segments)
        for e, lo, hi in segments:
            for j in range(lo, hi):
                alone = weights.run_segments(x_SH[j : j + 1], [(e, 0, 1)])
                assert torch.equal(alone[0], full[j])
        partial = weights.run_segments(x_SH, [(7, 6, 19)])
    assert (partial[:6] == 0).all() and (partial[19:] == 0).all()
    assert torch.equal(partial[6:19], full[6:19])


@pytest.mark.parametrize("act", ["silu", "gpt_oss"])
def test_fallback_without_native_kernels(act: str, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_layer(act, seed=6)
    weights = Int8ExpertWeights.from_weights(layer.experts)
    segments, x_SH = _segments_and_x()
    expected = _dequantized_reference(weights, x_SH, segments)
    with torch.no_grad():
        native_out = weights.run_segments(x_SH, segments) if native_int8.available() else None
        _disable_native(monkeypatch)
        assert not native_int8.available()
        fallback = weights.run_segments(x_SH, segments)  # fbgemm: activations quantized too
    scale = expected.abs().max()
    fallback_err = (fallback.double() - expected).abs().max() / scale
    assert fallback_err < INT8_LAYER_RTOL
    # Tighter, on the mean: only the activations' rounding may separate the fallback from the
    # float64 result on the dequantized weights (a 1 % scale error fails this).
    mean_bound = INT8_FALLBACK_DEQUANTIZED_MEAN_RTOL_7BIT if weights_int8._REDUCE_RANGE else INT8_FALLBACK_DEQUANTIZED_MEAN_RTOL
    mean_err = (fallback.double() - expected).abs().mean() / expected.abs().mean()
    assert mean_err < mean_bound, mean_err
    if native_out is not None:
        assert (native_out.double() - expected).abs().max() / scale < fallback_err  # weight-only is closer


@needs_native
def test_half_precision_activations_and_dtype_moves() -> None:
    weights = Int8ExpertWeights.from_weights(make_layer("gpt_oss", dtype=torch.bfloat16).experts)
    assert weights.dtype == torch.bfloat16
    segments, x_SH = _segments_and_x()
    with torch.no_grad():
        out = weights.run_segments(x_SH.bfloat16(), segments)
        assert out.dtype == torch.bfloat16
        scale_before = weights.scale_gate_up.clone()
        weights.to(torch.float16)
        assert weights.dtype == torch.float16
        assert weights.scale_gate_up.dtype == torch.float32 and torch.equal(weights.scale_gate_up, scale_before)
        assert weights.bias_down.dtype == torch.float32 and weights.q_down.dtype == torch.int8
        assert weights.run_segments(x_SH.half(), segments).dtype == torch.float16


def test_autograd_flows_through_dequantized_weights() -> None:
    weights = Int8ExpertWeights.from_weights(make_layer("silu").experts)
    x_SH = torch.randn(3, H, requires_grad=True)
    weights.mlp(x_SH, 2).sum().backward()
    x_ref = x_SH.detach().clone().requires_grad_()
    w_gu, w_dn = weights.matrices(2)
    from activepath.moe.experts import gated_activation

    (gated_activation(weights.activation, x_ref @ w_gu.T) @ w_dn.T).sum().backward()
    torch.testing.assert_close(x_SH.grad, x_ref.grad)


@needs_native
@pytest.mark.parametrize("family", FAMILIES)
def test_weight_only_model_logits(family: str) -> None:
    reference = tiny_model(family)
    model = activepath.optimize(tiny_model(family), expert_dtype="int8")
    ids = random_ids(2, 16, seed=11)
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids).logits
    assert (got - expected).abs().mean() <= INT8_WEIGHT_ONLY_LOGITS_MEAN_RTOL * expected.abs().mean()


@pytest.fixture(scope="module")
def embedded_pair():
    return activepath.load("tiny"), {
        "experts": activepath.load("tiny", expert_dtype="int8"),
        "experts+dense": activepath.load("tiny", expert_dtype="int8", dense_dtype="int8"),
    }


@needs_native
@pytest.mark.parametrize("which", ["experts", "experts+dense"])
@pytest.mark.parametrize("domain", ["prose", "code", "shifted"])
def test_weight_only_top1_agreement_on_embedded_model(domain: str, which: str, embedded_pair) -> None:
    from transformers import AutoTokenizer

    from activepath.models import embedded_path
    from activepath.analysis.routing_stats import windows

    directory = embedded_path("tiny")
    text = (directory / f"eval_{domain}.txt").read_text()
    ids_BW = windows(AutoTokenizer.from_pretrained(directory)(text)["input_ids"], 128)
    fp32, int8 = embedded_pair[0], embedded_pair[1][which]
    with torch.no_grad():
        agree = (fp32(ids_BW).logits.argmax(-1) == int8(ids_BW).logits.argmax(-1)).float().mean().item()
    assert agree >= INT8_WEIGHT_ONLY_TOP1_AGREEMENT, agree
