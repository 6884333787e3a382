"""``activepath demo`` as a user runs it: the embedded model, with and without activepath."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import activepath.cli.demo
from activepath.cli import main


def test_demo_reports_and_agrees(capsys, tmp_path):
    rc = main(["demo", "--new-tokens", "12", "--repeats", "1", "--plot", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "outputs agree: yes" in out
    for line in ("transformers", "activepath", "p50 ms", "p95 ms", "routing overhead ratio", "drift prose → code"):
        assert line in out
    assert out.count("  layer ") == 4  # expert utilisation, one line per MoE layer
    assert {p.name for p in tmp_path.iterdir()} == {"demo_expert_load.png", "demo_latency.png"}


def test_demo_fails_when_outputs_disagree(capsys, monkeypatch):
    real_load = activepath.cli.demo.load

    def broken_load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        for _, layer in activepath.moe_layers(model):
            layer.experts.w_down.data.mul_(-3.0)  # a wrong expert computation
        return model

    monkeypatch.setattr(activepath.cli.demo, "load", broken_load)
    assert main(["demo", "--new-tokens", "12", "--repeats", "1"]) == 1
    assert "NO — token ids differ" in capsys.readouterr().out


def test_demo_rejects_unknown_model():
    with pytest.raises(SystemExit, match="neither an embedded model"):
        main(["demo", "--model", "no-such-model"])


def test_demo_command_finishes_within_a_minute():
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "activepath.cli", "demo"], capture_output=True, text=True,
                          timeout=120)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stdout + done.stderr
    assert "outputs agree: yes" in done.stdout
    assert elapsed < 60, elapsed


def test_demo_reports_prefill_and_decode_apart_against_transformers_default(capsys, monkeypatch):
    monkeypatch.setattr(activepath.cli.demo.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert main(["demo", "--new-tokens", "6", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    # The reference is what a transformers user gets by default, never the slow eager loop.
    assert "transformers (grouped_mm experts)" in out and "eager" not in out
    assert "prefill p50 ms" in out and "decode p50 ms" in out
    assert "decode ×" in out and "prefill of " in out  # two ratios, not one mixed tokens/s
    assert "machine not idle" not in out


def test_demo_warns_on_a_busy_machine(capsys, monkeypatch):
    monkeypatch.setattr(activepath.cli.demo.os, "getloadavg", lambda: (3.5, 2.0, 1.0))
    assert main(["demo", "--new-tokens", "4", "--repeats", "1"]) == 0
    assert "machine not idle (1-min load average 3.50" in capsys.readouterr().out
