"""The layout of activepath.kernels.cpu: build / gemm / moe_ops behind a re-exporting
``__init__``, public names across module boundaries, one grad-mode check (kernels.policy)."""

from __future__ import annotations

import ast
import ctypes
from pathlib import Path

import pytest
import torch

from activepath.kernels import cpu as native
from activepath.kernels.cpu import build as native_build

SRC = Path(native.__file__).resolve().parents[3]
CPU = SRC / "activepath" / "kernels" / "cpu"
BENCHMARKS = SRC.parent / "benchmarks"
needs_native = pytest.mark.skipif(not native.available(), reason=str(native.unavailable_reason()))

# Names other modules (moe/, dense/, serving/, bench, tests, benchmarks/) use as ``native.X``.
USED_ELSEWHERE = (
    "available", "unavailable_reason", "set_enabled", "is_enabled", "disabled_by_env", "build_flags", "simd_width",
    "grouped_nk_gemm", "grouped_nk_gemm_panel", "linear", "panel_scratch_numel", "supports", "supports_weight",
    "softmax_topk", "route_softmax_topk", "route_softmax_topk_prechecked", "router_inputs_fit", "plan_dispatch",
    "combine", "combine_prechecked", "combine_inputs_fit", "PANEL_ROWS", "WEIGHT_DTYPES", "N_BLOCK", "M_BLOCK",
)  # fmt: skip


def _modules(*roots: Path) -> list[Path]:
    return sorted(p for root in roots if root.exists() for p in root.rglob("*.py"))


def _cpu_aliases(tree: ast.Module) -> set[str]:
    """Local names bound to a module of activepath.kernels.cpu (``from activepath.kernels import cpu as native``)."""
    submodules = {p.stem for p in CPU.glob("*.py")}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("activepath.kernels", "activepath.kernels.cpu"):
            wanted = {"cpu"} if node.module == "activepath.kernels" else submodules
            names |= {a.asname or a.name for a in node.names if a.name in wanted}
        elif isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.asname and a.name.startswith("activepath.kernels.cpu")}
    return names


def _private_uses(path: Path) -> list[str]:
    """``from activepath.kernels.cpu[.x] import _name`` or ``alias._name`` on a kernels.cpu module."""
    tree = ast.parse(path.read_text())
    aliases = _cpu_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("activepath.kernels.cpu"):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
              and node.attr.startswith("_") and not node.attr.startswith("__")):  # fmt: skip
            found.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    return found


def test_public_names_import_from_the_package() -> None:
    missing = [name for name in USED_ELSEWHERE if not hasattr(native, name)]
    assert not missing, missing
    assert set(native.__all__) >= set(USED_ELSEWHERE)


def test_init_only_re_exports() -> None:
    tree = ast.parse((CPU / "__init__.py").read_text())
    defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    assert not defined, f"kernels/cpu/__init__.py defines {defined}; it re-exports build / gemm / moe_ops only"
    assert all(not name.startswith("_") for name in native.__all__)


def test_no_module_reaches_into_private_names_of_kernels_cpu() -> None:
    """Private names stay inside their own module: siblings and callers use the public ones
    (build.call, build.threads_for, gemm.flat_segments, moe_ops.*_prechecked)."""
    assert BENCHMARKS.is_dir() and (SRC / "activepath").is_dir(), (SRC, BENCHMARKS)
    offenders = {str(p.relative_to(SRC.parent)): uses for p in _modules(SRC, BENCHMARKS) if (uses := _private_uses(p))}
    assert not offenders, offenders


def test_kernels_cpu_imports_nothing_above_it() -> None:
    # kernels/triton/moe.py still imports moe/ until its backend moves to backends/triton.py.
    for path in [*_modules(CPU), SRC / "activepath" / "kernels" / "policy.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [module or ""]
            bad = [n for n in names if n.split(".")[:2] in (["activepath", m] for m in ("moe", "backends", "dense", "api"))]
            assert not bad, f"{path.name} imports {bad}"


def test_grad_mode_is_asked_of_the_policy_only() -> None:
    """kernels.policy.needs_autograd is the package's one torch.is_grad_enabled() check."""
    callers = [p.name for p in _modules(CPU) if "is_grad_enabled" in p.read_text()]
    assert not callers, callers


@needs_native
def test_supports_follows_autograd() -> None:
    w = torch.randn(4, 8, requires_grad=True)
    x = torch.randn(2, 8)
    assert not native.supports_weight(w) and not native.supports(x, w)
    with torch.no_grad():
        assert native.supports_weight(w) and native.supports(x, w)
    assert native.supports_weight(w.detach()) and not native.supports(x.requires_grad_(), w.detach())


@needs_native
def test_install_library_swaps_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    """What benchmarks/native_ab.py does: another loaded build serves every kernel until swapped back."""
    ours = native_build.library()
    monkeypatch.setitem(native_build._state, "lib", ours)  # restored after the test
    other = ctypes.CDLL(ours._name)  # the same file, a distinct handle
    native_build.declare(other)
    assert native_build.install_library(other) is ours
    assert native_build.library() is other and native_build.require_library() is other
    x = torch.randn(3, 8)
    w = torch.randn(5, 8)
    torch.testing.assert_close(native.linear(x, w), x @ w.T)
    assert native_build.install_library(ours) is other
    with pytest.raises(TypeError, match="CDLL"):
        native_build.install_library(None)  # type: ignore[arg-type]


def test_is_enabled_follows_set_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    native.available()  # settle the environment's state first, so undo restores it
    monkeypatch.setitem(native_build._state, "enabled", native.is_enabled())
    native.set_enabled(False)
    assert not native.is_enabled() and not native.available()
    native.set_enabled(True)
    assert native.is_enabled()
