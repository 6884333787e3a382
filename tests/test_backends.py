"""The backends registry (``BackendSpec``, ``run_experts``), the kernel policy's choices, the
kernel path recorded in ``MoEStats``, stores as a protocol, and the dependency rules of
``kernels/`` (imports nothing from the pipeline; one grad-mode check)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from activepath import ActivationConfig, ExpertWeights, Router, RouterConfig, SparseMoE, combine, plan_dispatch
from activepath.backends import registry
from activepath.backends.registry import BackendSpec, get_backend, register_backend, run_experts
from activepath.kernels import cpu as native
from activepath.kernels import policy
from activepath.moe.types import DispatchPlan, ExpertsOutput
from activepath.moe.weights_int8 import Int8ExpertWeights

SRC = Path(__file__).resolve().parents[1] / "src" / "activepath"
H, I, E, K = 32, 24, 8, 2
needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")


def _layer(seed: int = 0, experts: int = E) -> SparseMoE:
    gen = torch.Generator().manual_seed(seed)
    store = ExpertWeights(torch.randn(experts, 2 * I, H, generator=gen) / H**0.5,
                          torch.randn(experts, H, I, generator=gen) / I**0.5, ActivationConfig())  # fmt: skip
    router = Router(RouterConfig(num_experts=experts, top_k=K), torch.randn(experts, H, generator=gen))
    return SparseMoE(router, store, collect_stats=True)


@pytest.fixture
def private_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))  # registrations vanish after the test


# -- the registry --------------------------------------------------------------------------


def test_specs_declare_what_callers_ask() -> None:
    grouped, native_spec, triton = get_backend("grouped"), get_backend("native"), get_backend("triton")
    assert isinstance(grouped, BackendSpec) and grouped.name == "grouped"
    assert grouped.uses_workspace and grouped.one_token_path and not grouped.batch_invariant
    assert native_spec.batch_invariant and native_spec.one_token_path
    assert triton.fuses_combine and triton.formats == frozenset({"float"}) and not triton.one_token_path
    assert get_backend("reference").batch_invariant and not get_backend("rowwise").one_token_path


def test_register_backend_validates_and_returns_the_spec(private_registry: None) -> None:
    spec = register_backend("test_ref_copy", get_backend("reference").fn, batch_invariant=True)
    assert get_backend("test_ref_copy") is spec and spec.batch_invariant and not spec.one_token_path
    with pytest.raises(ValueError, match="reference"):
        register_backend("reference", spec.fn)
    with pytest.raises(TypeError, match="callable"):
        register_backend("test_not_callable", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="workspace"):
        register_backend("test_both", spec.fn, fuses_combine=True, uses_workspace=True)


def test_run_experts_combines_unless_the_backend_fuses(private_registry: None) -> None:
    layer = _layer(seed=1)
    x_TH = torch.randn(11, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        routing = layer.router(x_TH)
        plan = plan_dispatch(routing.topk_ids_TK, E)
        reference = get_backend("reference")
        want = combine(reference(layer.experts, x_TH, plan), plan, routing.topk_weights_TK)

        def fused(store, x, p, *, topk_weights_TK):  # type: ignore[no-untyped-def]
            return combine(reference(store, x, p), p, topk_weights_TK)

        fused_spec = register_backend("test_fused_run", fused, fuses_combine=True)
        for spec in (reference, fused_spec):
            out = run_experts(spec, layer.experts, x_TH, plan, routing.topk_weights_TK, record_path=True)
            assert isinstance(out, ExpertsOutput) and out.path == spec.name  # no select declared: the name
            assert torch.equal(out.y_TH, want)


# -- capabilities come from the spec, not the name ------------------------------------------


@needs_native
def test_a_registered_backend_declaring_the_one_token_path_takes_it(private_registry: None) -> None:
    # Before: the decode path was for backends *named* grouped or native only.
    native_spec = get_backend("native")
    register_backend("test_dot", native_spec.fn, batch_invariant=True, uses_workspace=True, one_token_path=True,
                     select=native_spec.select)  # fmt: skip
    layer = _layer(seed=2)
    layer.backend = "test_dot"
    x_1H = torch.randn(1, H, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y_1H = layer(x_1H)
        assert layer.last_stats.experts_path == "native_decode"
        layer.token_fast_path = False
        assert torch.equal(layer(x_1H), y_1H)  # the general path at one token: the same bits
        assert layer.last_stats.experts_path == "native_dot"


# -- the kernel path in MoEStats ------------------------------------------------------------


@needs_native
def test_stats_record_the_experts_path_that_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    panel_calls: list[int] = []
    real = native.grouped_nk_gemm_panel
    monkeypatch.setattr(native, "grouped_nk_gemm_panel", lambda *a, **k: panel_calls.append(1) or real(*a, **k))
    layer = _layer(seed=3, experts=2)
    with torch.no_grad():
        layer(torch.randn(40, H, generator=torch.Generator().manual_seed(3)))  # 40 rows on each of 2 experts
        assert layer.last_stats.experts_path == "native_panel" and len(panel_calls) == 2
        layer.backend = "native"  # batch-invariant: the dot kernel whatever the rows
        layer(torch.randn(40, H))
        assert layer.last_stats.experts_path == "native_dot" and len(panel_calls) == 2
        layer.backend = "reference"
        layer(torch.randn(3, H))
        assert layer.last_stats.experts_path == "reference"
    layer.collect_stats = False
    with torch.no_grad():
        layer(torch.randn(3, H))
    assert layer.last_stats.experts_path == "reference"  # stats off: the last recorded call stays


def test_stats_say_torch_loop_when_the_native_kernels_step_aside() -> None:
    layer = _layer(seed=4).to(torch.float64)  # no native kernel for float64, few experts: the loop
    layer(torch.randn(5, H, dtype=torch.float64))
    assert layer.last_stats.experts_path == "torch_loop"


# -- the policy on plain values -------------------------------------------------------------


def _experts_choice(rows: list[int], *, dtype: torch.dtype = torch.float32, fmt: str = "float", native_fits: bool = True,
                    grouped_mm_fits: bool = False, device: str = "cpu", experts: int = 128,
                    invariant: bool = False) -> str:  # fmt: skip
    return policy.select_experts(store_format=fmt, dtype=dtype, device_type=device, native_fits=native_fits,
                                 grouped_mm_fits=grouped_mm_fits, segment_rows=rows, num_experts=experts,
                                 batch_invariant=invariant).path  # fmt: skip


def test_select_experts_paths_and_thresholds() -> None:
    assert _experts_choice([1, 1, 1]) == "native_dot"
    assert _experts_choice([policy.PANEL_ROWS, 3]) == "native_panel"
    assert _experts_choice([policy.PANEL_ROWS - 1]) == "native_dot"
    assert _experts_choice([policy.NATIVE_MAX_ROWS + 1, 20]) == "native_panel+blas"
    assert _experts_choice([policy.NATIVE_MAX_ROWS, 3]) == "native_panel"
    assert _experts_choice([policy.NATIVE_MAX_ROWS + 1, 3]) == "native_dot+blas"
    assert _experts_choice([policy.NATIVE_MAX_ROWS_BF16 + 1], dtype=torch.bfloat16) == "native_dot+blas"
    assert _experts_choice([policy.NATIVE_MAX_ROWS_BF16], dtype=torch.bfloat16) == "native_dot"
    assert _experts_choice([5000, 40], invariant=True) == "native_dot"  # no limit, no panel
    assert _experts_choice([5000], fmt="int8") == "native_int8"
    assert _experts_choice([1] * 16, native_fits=False, grouped_mm_fits=True) == "torch_loop"  # 16 * 8 <= 128
    assert _experts_choice([1] * 17, native_fits=False, grouped_mm_fits=True) == "torch_grouped_mm"
    assert _experts_choice([], native_fits=False, grouped_mm_fits=True, device="cuda") == "torch_grouped_mm"
    assert _experts_choice([3], native_fits=False, invariant=True) == "torch_rowwise"


def test_select_stage_paths() -> None:
    fits = {"plain_softmax_topk": True, "num_tokens": 1, "inputs_fit": True, "native_available": True}
    assert policy.select_router(**fits, autograd=False).path == "native_fused_router"
    assert policy.select_router(**fits, autograd=True).path == "torch"
    assert policy.select_dispatch(capacity=False, ids_dtype=torch.int64, device_type="cpu", contiguous=True,
                                  native_available=True).path == "native_sort"  # fmt: skip
    assert policy.select_dispatch(capacity=True, ids_dtype=torch.int64, device_type="cuda", contiguous=True,
                                  native_available=True).path == "torch_sort"  # fmt: skip
    assert policy.select_dispatch(capacity=False, ids_dtype=torch.int64, device_type="cuda", contiguous=True,
                                  native_available=True).path == "device_sort"  # fmt: skip
    with torch.no_grad():
        assert policy.select_combine(fits_native=True, native_available=True, device_type="cpu").path == "native_combine"
    assert policy.select_combine(fits_native=True, native_available=True, device_type="cpu").path == "torch_index_add"
    assert policy.select_combine(fits_native=False, native_available=True, device_type="cuda").path == "torch_gather_sum"
    linear = {"max_rows": 256, "same_dtype": True, "autograd": False, "weight_fits": True, "out_features": 2048}
    assert policy.select_linear(rows=16, weight_dtype=torch.float32, **linear).path == "native_panel"
    assert policy.select_linear(rows=16, weight_dtype=torch.bfloat16, **linear).path == "native_dot"
    assert policy.select_linear(rows=257, weight_dtype=torch.float32, **linear).path == "torch"
    assert policy.linear_max_rows(torch.bfloat16, 256) == policy.LINEAR_MAX_ROWS_BF16


def test_choice_needs_a_path() -> None:
    with pytest.raises(ValueError, match="path"):
        policy.Choice(path="", reason="nothing")


# -- stores are a protocol ------------------------------------------------------------------


def test_int8_store_is_a_sibling_of_the_float_store() -> None:
    store = Int8ExpertWeights.from_weights(_layer().experts)
    assert not isinstance(store, ExpertWeights)
    assert (store.format, store.layout, _layer().experts.format) == ("int8", "nk", "float")
    x_SH = torch.randn(5, H)
    segments = [(1, 0, 2), (4, 2, 5)]
    out_SH = torch.full((5, H), float("nan"))
    assert store.run_segments(x_SH, segments, out_SH) is out_SH
    assert torch.equal(out_SH, store.run_segments(x_SH, segments))


def test_plan_slot_segments_cover_every_slot_alone() -> None:
    plan = plan_dispatch(torch.tensor([[3, 1], [1, 0], [3, 2]]), 4)
    assert isinstance(plan, DispatchPlan)
    assert plan.slot_segments == [(0, 0, 1), (1, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (3, 5, 6)]


# -- dependency rules -----------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_kernels_import_nothing_from_the_pipeline() -> None:
    forbidden = ("activepath.moe", "activepath.backends", "activepath.dense", "activepath.api")
    for path in sorted((SRC / "kernels").rglob("*.py")):
        bad = sorted(m for m in _imports(path) if m.startswith(forbidden))
        assert not bad, f"{path.relative_to(SRC)} imports {bad}"


def test_one_grad_mode_check_outside_the_native_build() -> None:
    # kernels/cpu is being split by another change, which moves its own checks onto the policy.
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "kernels/policy.py" or rel.startswith("kernels/cpu/"):
            continue
        assert "is_grad_enabled" not in path.read_text(), rel


def test_no_store_sniffing_in_the_pipeline() -> None:
    # Backends and stages branch on store.format / store.layout, never on a store's class.
    store = r"(store|weights|experts|source|layer\.experts|self\.experts)"
    sniffing = re.compile(rf"hasattr\({store}\b|type\({store}\)|isinstance\({store}\b")
    for folder in ("moe", "backends"):
        for path in sorted((SRC / folder).glob("*.py")):
            found = sniffing.search(path.read_text())
            assert found is None, f"{folder}/{path.name}: {found and found.group(0)}"
