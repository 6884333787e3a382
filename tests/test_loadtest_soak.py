"""``activepath loadtest``'s soak options: varied prompt lengths, clients that abort streams
or time out, a server it starts itself with its RSS over time, 5xx counted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from activepath.serving.loadtest import LoadTestConfig, RequestRecord, _request_plan, summarize
from activepath.serving.soak import ServerProcess, rss_report
from test_serving_fixtures import standin_checkpoint


def test_soak_options_end_to_end(tmp_path: Path) -> None:
    directory = standin_checkpoint(tmp_path / "standin")
    out = tmp_path / "soak"
    cmd = [sys.executable, "-m", "activepath.cli", "loadtest", "--serve",
           f"--model {directory} --max-len 128 --threads 1", "--concurrency", "3", "--duration", "4",
           "--max-tokens", "8", "--prompt-words", "1:6", "--abort-fraction", "0.3", "--timeout-fraction", "0.3",
           "--warmup", "1", "--rss-interval", "0.25", "--max-rss-growth", "50", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(Path(f"{out}.json").read_text())
    r = doc["requests"]
    assert r["lost"] == 0 and r["duplicated"] == 0 and r["server_errors_5xx"] == 0 and r["rejected_503"] == 0
    assert all(n > 0 for n in r["by_kind"].values()), r["by_kind"]
    assert r["aborted_by_client"] > 0 and r["complete"] > 0
    assert r["complete"] + r["aborted_by_client"] == r["sent"]
    rss = doc["rss"]
    assert len(rss["samples"]) >= 8 and rss["warm_mib"] > 100 and rss["growth_after_warmup_pct"] is not None
    assert Path(f"{out}.png").stat().st_size > 1000
    assert "after the 1 s warm-up" in Path(f"{out}.md").read_text()
    assert Path(f"{out}.server.log").exists() and str(directory) in doc["server"]["command"]


def test_request_plan_mixes_kinds_and_lengths_deterministically() -> None:
    cfg = LoadTestConfig(concurrency=1, prompt_words=(2, 9), abort_fraction=0.25, timeout_fraction=0.25, max_tokens=5)
    plans = [_request_plan(cfg, i) for i in range(400)]
    assert plans == [_request_plan(cfg, i) for i in range(400)]
    kinds = [k for k, _, _ in plans]
    assert 70 < kinds.count("abort") < 130 and 70 < kinds.count("timeout") < 130
    assert {len(p.split()) for _, p, _ in plans} == set(range(2, 10))
    assert all(0 <= at <= 4 for k, _, at in plans if k == "abort")
    assert all(0.05 <= at <= 1.0 for k, _, at in plans if k == "timeout")


def test_summary_counts_5xx_and_aborts() -> None:
    cfg = LoadTestConfig(concurrency=1)
    ok = RequestRecord(0, 0.0, status=200, token_s=[0.1], finish_reasons=["length"], done_markers=1,
                       response_ids={"a"})
    failed = RequestRecord(1, 0.0, status=500, error="boom", server_error=True)
    left = RequestRecord(2, 0.0, kind="abort", status=200, token_s=[0.1], response_ids={"b"}, aborted=True)
    doc = summarize(cfg, [ok, failed, left], 1.0)
    r = doc["requests"]
    assert (r["complete"], r["server_errors_5xx"], r["aborted_by_client"], r["lost"]) == (1, 1, 1, 1)
    assert not doc["ok"]
    assert summarize(cfg, [ok, left], 1.0)["ok"]


def test_rss_report_growth_after_warmup() -> None:
    doc = rss_report([(0.0, 400.0), (5.0, 500.0), (10.0, 510.0), (15.0, 505.0)], warmup_s=5.0, pid=1)
    assert (doc["warm_mib"], doc["max_after_warmup_mib"], doc["growth_after_warmup_pct"]) == (500.0, 510.0, 2.0)
    assert rss_report([(0.0, 400.0)], warmup_s=5.0, pid=1)["growth_after_warmup_pct"] is None


@pytest.mark.parametrize("kwargs, match", [
    ({"prompt_words": (0, 5)}, "prompt_words"), ({"prompt_words": (9, 5)}, "prompt_words"),
    ({"abort_fraction": 1.5}, "abort_fraction"), ({"abort_fraction": 0.6, "timeout_fraction": 0.6}, "<= 1"),
    ({"warmup_s": 60.0}, "warmup_s"), ({"rss_interval_s": 0.0}, "rss_interval_s"),
])
def test_config_rejects_bad_soak_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LoadTestConfig(concurrency=1, duration_s=60.0, **kwargs)


def test_serve_args_may_not_pick_the_port() -> None:
    with pytest.raises(ValueError, match="--port"):
        ServerProcess("--model tiny --port 9000")


def test_cli_rejects_bad_word_range() -> None:
    proc = subprocess.run([sys.executable, "-m", "activepath.cli", "loadtest", "--concurrency", "1",
                           "--prompt-words", "5"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "MIN:MAX" in proc.stderr


@pytest.mark.parametrize("extra", [["--serve", "--model tiny --port 9000"], ["--abort-fraction", "1.5"]])
def test_cli_value_errors_are_one_line(extra: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "activepath.cli", "loadtest", "--concurrency", "1", *extra],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("activepath loadtest: error: ") and "Traceback" not in proc.stderr
