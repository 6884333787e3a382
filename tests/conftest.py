"""Session-wide test settings."""

import os

import pytest

# CI has no GPU: the Triton kernels are checked in Triton's CPU interpreter. Triton reads
# this once, when it is first imported, so it is set before any test can import it.
os.environ.setdefault("TRITON_INTERPRET", "1")

_OFF = ("", "0", "false", "no", "off")


def native_required() -> bool:
    """Whether this run must have the native kernels: ``ACTIVEPATH_REQUIRE_NATIVE`` when set,
    else whether ``CI`` is set. Without them every native test would skip and a broken C++
    build would leave the suite green."""
    required = os.environ.get("ACTIVEPATH_REQUIRE_NATIVE")
    if required is not None:
        return required.strip().lower() not in _OFF
    return os.environ.get("CI", "").strip().lower() not in _OFF


def pytest_sessionstart(session: pytest.Session) -> None:
    from activepath.kernels import cpu as native

    # An explicit ACTIVEPATH_NATIVE=0 is a run of the PyTorch fallbacks, not a broken build.
    if native_required() and not native.disabled_by_env() and not native.available():
        pytest.exit(
            "the native kernels are required (CI or ACTIVEPATH_REQUIRE_NATIVE=1; set ACTIVEPATH_NATIVE=0 to test "
            f"the PyTorch fallbacks instead) but did not build:\n{native.unavailable_reason()}",
            returncode=3,
        )


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest's TerminalReporter
    from activepath.kernels import cpu as native

    if not native.available():
        terminalreporter.write_sep("!", "native kernels UNAVAILABLE: their tests were skipped", red=True, bold=True)
        terminalreporter.write_line(str(native.unavailable_reason()))
