"""The native build itself: a failed build fails a CI run with the compiler's error (and
only skips, loudly, outside CI), and the kernels' non-AVX-512 branches — AVX2 and scalar,
built through ``ACTIVEPATH_NATIVE_FLAGS`` into their own cache files — pass the key
correctness checks of test_native.py and test_native_int8.py.

Each build runs in a subprocess: a process loads one native library, once."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from activepath.kernels import cpu as native

ROOT = Path(__file__).resolve().parent.parent
SRC = Path(native.__file__).resolve().parents[3]  # the activepath under test, not an installed copy
x86_only = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA flags")
needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")

# The key checks, for every kernel: fp32/bf16/int8 GEMMs against float64 on odd sizes and
# k tails, batch invariance bit for bit, the panel kernel, the fused router and the glue.
KEY_TESTS = " or ".join([
    "test_grouped_gemm_matches_float64", "test_batch_invariant_bitwise", "test_rows_outside_segments",
    "test_panel_gemm_matches_float64", "test_panel_gemm_is_deterministic", "test_backends_mix_native",
    "test_softmax_topk_matches_torch", "test_plan_and_combine_match_torch_bitwise", "test_fused_router",
    "test_kernel_matches_float64", "test_kernel_on_decode_shapes", "test_kernel_batch_invariant_bitwise",
    "test_empty_inputs_and_linear", "test_run_segments",
])  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACTIVEPATH_", "PYTEST_"))}
    env.pop("CI", None)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env | extra


def _pytest(env: dict[str, str], *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# A planted compile error in a real source line: the macro turns nk_gemm_i8.cpp's
# ``int ap_simd_width(void)`` into ``int 1+(void)``.
BROKEN = "-Dap_simd_width=1+"
ONE_NATIVE_TEST = "tests/test_native.py::test_rows_outside_segments_are_untouched_and_strided_inputs_work"


@pytest.mark.parametrize("setting", [{"CI": "true"}, {"ACTIVEPATH_REQUIRE_NATIVE": "1"}])
def test_a_failed_build_fails_a_ci_run_with_the_compilers_error(setting: dict[str, str], tmp_path: Path) -> None:
    env = _env(ACTIVEPATH_CACHE=str(tmp_path), ACTIVEPATH_NATIVE_FLAGS=BROKEN, **setting)
    run = _pytest(env, ONE_NATIVE_TEST, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 3, out
    assert "native kernels are required" in out and "error:" in out and "nk_gemm_i8.cpp" in out, out


def test_a_failed_build_outside_ci_skips_loudly(tmp_path: Path) -> None:
    env = _env(ACTIVEPATH_CACHE=str(tmp_path), ACTIVEPATH_NATIVE_FLAGS=BROKEN)
    run = _pytest(env, ONE_NATIVE_TEST, timeout=300)
    assert run.returncode == 0 and "1 skipped" in run.stdout, run.stdout + run.stderr
    assert "native kernels UNAVAILABLE" in run.stdout and "error:" in run.stdout, run.stdout


def test_ci_with_the_kernels_disabled_runs_the_fallbacks(tmp_path: Path) -> None:
    # ACTIVEPATH_NATIVE=0 is a deliberate run of the PyTorch paths: CI may do it, nothing builds.
    env = _env(ACTIVEPATH_CACHE=str(tmp_path), ACTIVEPATH_NATIVE="0", CI="true")
    run = _pytest(env, ONE_NATIVE_TEST, timeout=300)
    assert run.returncode == 0 and "1 skipped" in run.stdout, run.stdout + run.stderr
    assert not list(tmp_path.rglob("*.so"))


def test_bad_extra_flags_are_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACTIVEPATH_NATIVE_FLAGS", "-mno-avx512f avx2")
    with pytest.raises(ValueError, match="'avx2'"):
        native.build_flags()
    monkeypatch.setenv("ACTIVEPATH_NATIVE_FLAGS", " -mno-avx512f  -mno-fma ")
    assert native.build_flags()[-2:] == ("-mno-avx512f", "-mno-fma")


def _widest_simd() -> int:
    """What ``-march=native`` gives on this CPU."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return 512 if " avx512f" in cpuinfo else 256 if " avx2" in cpuinfo else 0


@needs_native
@pytest.mark.skipif("ACTIVEPATH_NATIVE_FLAGS" in os.environ, reason="a variant build was asked for")
def test_the_default_build_is_the_widest_this_cpu_has() -> None:
    assert native.simd_width() == _widest_simd()


@x86_only
@needs_native
@pytest.mark.parametrize(("flags", "cap"), [("-mno-avx512f", 256), ("-mno-avx2", 0)])
def test_kernels_without_avx512_pass_the_key_checks(flags: str, cap: int) -> None:
    width = min(cap, _widest_simd())
    env = _env(ACTIVEPATH_NATIVE_FLAGS=flags, ACTIVEPATH_REQUIRE_NATIVE="1")
    if "ACTIVEPATH_CACHE" in os.environ:
        env["ACTIVEPATH_CACHE"] = os.environ["ACTIVEPATH_CACHE"]
    probe = subprocess.run([sys.executable, "-c", "from activepath.kernels import cpu as native; print(native.simd_width())"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert probe.stdout.strip() == str(width), probe.stdout + probe.stderr  # the branch the flags name
    run = _pytest(env, "tests/test_native.py", "tests/test_native_int8.py", "-k", KEY_TESTS)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-3000:]
