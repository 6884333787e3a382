"""What ``activepath loadtest`` needs for a memory soak: a server it starts itself
(``ServerProcess``), the resident memory of a process over time read from
``/proc/<pid>/status`` (``RssSampler``), the growth after warm-up, and a plot of it."""

from __future__ import annotations

import asyncio
import logging
import shlex
import socket
import subprocess
import textwrap
import sys
import time
from pathlib import Path
from typing import Any, Self

log = logging.getLogger(__name__)


def process_rss_mib(pid: int) -> float | None:
    """Resident set size of ``pid`` in MiB, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """``activepath serve SERVE_ARGS`` on a free loopback port, as a child process; its
    output goes to ``log_path`` (or is discarded)."""

    def __init__(self, serve_args: str, *, log_path: Path | None = None, ready_timeout_s: float = 180.0) -> None:
        args = shlex.split(serve_args)
        if any(a == "--port" or a.startswith("--port=") or a == "--host" for a in args):
            raise ValueError(f"--serve must not set --host/--port (the loadtest picks them), got {serve_args!r}")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "activepath.cli", "serve", *args, "--port", str(self.port)]
        self.log_path, self.ready_timeout_s = log_path, ready_timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        out = open(self.log_path, "w") if self.log_path is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT)
        self._wait_ready()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _wait_ready(self) -> None:
        import httpx

        assert self.proc is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode} before it was ready: "
                                   f"{shlex.join(self.command)} (log: {self.log_path})")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server was not ready within {self.ready_timeout_s:g} s: {shlex.join(self.command)}")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 30 s; returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RssSampler:
    """Samples ``pid``'s RSS every ``interval_s`` while the load runs (an asyncio task)."""

    def __init__(self, pid: int, interval_s: float) -> None:
        if not interval_s > 0:
            raise ValueError(f"rss interval must be > 0 s, got {interval_s}")
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[tuple[float, float]] = []  # (seconds since the test started, MiB)
        self._task: asyncio.Task | None = None

    def start(self, t0: float) -> None:
        self.sample(t0)
        self._task = asyncio.create_task(self._run(t0))

    def sample(self, t0: float) -> None:
        rss = process_rss_mib(self.pid)
        if rss is not None:
            self.samples.append((round(time.perf_counter() - t0, 2), round(rss, 1)))

    async def _run(self, t0: float) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.sample(t0)

    async def stop(self, t0: float) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.sample(t0)


def rss_report(samples: list[tuple[float, float]], warmup_s: float, pid: int) -> dict[str, Any]:
    """RSS at the end of warm-up (the first sample at or after ``warmup_s``), the largest
    after it, and the growth between them in percent (None without a post-warm-up sample)."""
    after = [rss for t, rss in samples if t >= warmup_s]
    doc: dict[str, Any] = {"pid": pid, "warmup_s": warmup_s, "samples": [list(s) for s in samples],
                           "start_mib": samples[0][1] if samples else None,
                           "end_mib": samples[-1][1] if samples else None}
    if after:
        doc |= {"warm_mib": after[0], "max_after_warmup_mib": max(after),
                "growth_after_warmup_pct": round(100 * (max(after) / after[0] - 1), 2)}
    else:
        doc |= {"warm_mib": None, "max_after_warmup_mib": None, "growth_after_warmup_pct": None}
    return doc


def plot_rss(rss: dict[str, Any], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times, values = zip(*rss["samples"]) if rss["samples"] else ((), ())
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(times, values, marker=".", linewidth=1)
    ax.axvspan(0, rss["warmup_s"], color="grey", alpha=0.2, label=f"warm-up ({rss['warmup_s']:g} s)")
    if rss["warm_mib"] is not None:
        ax.axhline(rss["warm_mib"] * 1.05, color="red", linestyle=":", label="RSS at end of warm-up + 5 %")
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title("\n".join(textwrap.wrap(title, 120)), fontsize=8)  # the command, whole
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
