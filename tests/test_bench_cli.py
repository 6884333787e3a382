"""End to end: ``activepath bench`` on the tiny shape, as a user runs it; the JSON report
carries every field the issue asks for."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from activepath.cli import main

FAST = ["--shape", "tiny", "--copy-mib", "16", "--gemm-n", "256", "--roofline-repeats", "2", "--no-progress"]
LAYER_FAST = ["--tokens", "1,8", "--iters", "3", "--min-iters", "2", "--row-budget-s", "0.5", "--inputs", "4"]
GEN_FAST = ["--layers", "2", "--prompt", "8", "--new", "4", "--repeats", "2"]

ROW_FIELDS = {"impl", "tokens", "timing", "distinct_experts_mean", "weight_bytes_mean", "achieved_GBps", "smbu_pct",
              "flops", "achieved_GFLOPs", "smfu_pct", "routing_overhead_ratio", "stage_median_s",
              "max_abs_diff_vs_first_impl", "samples_s"}
GEN_FIELDS = {"impl", "experts_implementation", "ttft", "prefill_tok_s", "decode", "decode_tok_s",
              "decode_bytes_per_step_mean", "decode_achieved_GBps", "decode_roofline_pct", "kv_bytes_measured",
              "energy_prefill_J_per_token", "energy_decode_J_per_token", "energy_estimated", "energy_method",
              "tokens_per_expert_by_layer", "load_by_layer", "generated_sha256", "same_tokens_as_first_impl",
              "decode_samples_s", "decode_median_ms_by_prompt", "decode_p95_over_p50_by_prompt",
              "decode_roofline_pct_by_prompt", "breakdown"}
TIMING_FIELDS = {"n", "mean_s", "median_s", "p95_s", "p99_s", "min_s", "max_s"}


@pytest.fixture(scope="module")
def all_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "all"
    assert main(["bench", "all", *FAST, *LAYER_FAST, *GEN_FAST, "--out", str(out), "--plot"]) == 0
    return out, json.loads(out.with_suffix(".json").read_text())


def test_all_writes_json_markdown_and_plots(all_report):
    out, doc = all_report
    for suffix in (".md", "_latency.png", "_expert_load.png", "_roofline.png"):
        assert out.with_name(out.name + suffix).stat().st_size > 0
    md = out.with_suffix(".md").read_text()
    assert doc["command"] in md and "S-MBU" in md and "estimated" in md


def test_json_header_fields(all_report):
    _, doc = all_report
    assert doc["schema"] == "activepath.bench/1" and doc["kind"] == "all"
    assert doc["command"].startswith("activepath bench all ") and "--shape tiny" in doc["command"]
    assert {"torch", "transformers", "activepath", "python"} <= set(doc["environment"]["versions"])
    assert {"cpu", "llc_bytes", "torch_threads", "load_avg_1m_at_start", "load_avg_1m_at_end"} <= set(doc["environment"])
    # The command tunes the allocator by default, and the report says what it ran under.
    assert doc["environment"]["allocator"].startswith(("glibc malloc tuned", "default ("))
    roof = doc["roofline"]
    assert roof["bandwidth_GBps"] > 0 and roof["gemm_GFLOPs"] > 0 and roof["method"]
    assert isinstance(doc["notes"], list)


def test_json_layer_fields(all_report):
    _, doc = all_report
    layer = doc["layer"]
    rows = layer["rows"]
    assert {(r["impl"], r["tokens"]) for r in rows} == {
        (i, t) for i in ("activepath", "hf-eager", "hf-grouped_mm", "dense") for t in (1, 8)}
    for r in rows:
        assert ROW_FIELDS <= set(r) and TIMING_FIELDS <= set(r["timing"])
        assert r["smbu_pct"] > 0 and r["smfu_pct"] > 0
        sparse = r["impl"] != "dense"
        assert (r["routing_overhead_ratio"] is None) == r["impl"].startswith("hf-")
        assert r["distinct_experts_mean"] <= (4 * r["tokens"] if sparse else 16)
        if r["max_abs_diff_vs_first_impl"] is not None:
            assert r["max_abs_diff_vs_first_impl"] < 1e-4  # every impl computes the same layer
    assert set(layer["load_by_tokens"]) == {"1", "8"}
    assert layer["load_by_tokens"]["1"]["idle_experts"] == 12  # 1 token, top-4 of 16
    assert layer["geometry"]["expert_bytes"] == 3 * 64 * 32 * 4
    assert layer["cold_weights"] is False  # tiny fits in cache, and the report says so
    assert any("cache-resident" in n for n in doc["notes"])


def test_json_generate_fields(all_report):
    _, doc = all_report
    gen = doc["generate"]
    assert [r["impl"] for r in gen["rows"]] == ["activepath", "hf"]
    for r in gen["rows"]:
        assert GEN_FIELDS <= set(r)
        assert r["decode"]["n"] == 2 * 3  # 2 repeats × (4 new - 1 from prefill)
        assert r["energy_estimated"] is True and "W per busy core" in r["energy_method"]
        assert len(r["tokens_per_expert_by_layer"]) == 2
        # every prefill + decode slot is counted: 2 repeats × (8 + 3) tokens × top-4
        assert sum(r["tokens_per_expert_by_layer"][0]) == 2 * (8 + 3) * 4
    assert gen["rows"][1]["same_tokens_as_first_impl"] is True
    assert any("ESTIMATED" in n for n in doc["notes"])
    # per prompt: bandwidth re-measured before each of the 2 rounds, and the figures per impl
    assert len(gen["prompt_bandwidth_GBps"]) == 2 and all(b > 0 for b in gen["prompt_bandwidth_GBps"])
    for r in gen["rows"]:
        assert len(r["decode_median_ms_by_prompt"]) == len(r["decode_roofline_pct_by_prompt"]) == 2
        assert all(t >= 1.0 for t in r["decode_p95_over_p50_by_prompt"])
        samples = r["decode_samples_s"]
        assert r["decode_median_ms_by_prompt"][0] == pytest.approx(1e3 * sorted(samples[:3])[1])


def test_markdown_has_the_per_prompt_table(all_report):
    out, _ = all_report
    md = out.with_suffix(".md").read_text()
    assert "### Decode per prompt" in md and "% of that prompt's roofline" in md


def test_generate_reports_where_the_time_goes(all_report):
    out, doc = all_report
    for r in doc["generate"]["rows"]:
        b = r["breakdown"]
        assert b["decode_steps"] == 2 * 3  # one instrumented generation per prompt, --new 4 tokens each
        for phase in ("prefill", "decode"):
            ms = b[phase]["ms"]
            assert sum(ms.values()) == pytest.approx(b[phase]["total_ms"])
            assert ms["attention"] > 0 and ms["experts"] > 0 and ms["router"] > 0
    md = out.with_suffix(".md").read_text()
    assert "### Where the time goes" in md and "| activepath prefill ms | activepath decode ms/step |" in md
    assert "| experts |" in md and "| **total** |" in md
    assert "| hf / activepath prefill | hf / activepath decode |" in md  # where the speed-up comes from
    total = next(line for line in md.splitlines() if line.startswith("| **total** |"))
    assert total.count("×") == 2


def test_generate_without_breakdown(tmp_path):
    out = tmp_path / "gen"
    args = ["bench", "generate", *FAST, "--no-roofline", "--layers", "2", "--prompt", "5", "--new", "2",
            "--no-breakdown", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert all(r["breakdown"] is None for r in doc["generate"]["rows"])
    assert "Where the time goes" not in out.with_suffix(".md").read_text()


def test_layer_subcommand_as_user_runs_it(tmp_path):
    out = tmp_path / "layer"
    cmd = [sys.executable, "-m", "activepath.cli", "bench", "layer", *FAST, *LAYER_FAST, "--impl", "activepath,dense",
           "--no-roofline", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["roofline"] is None and all(r["smbu_pct"] is None for r in doc["layer"]["rows"])
    assert "n/m" in done.stdout and doc["generate"] is None


def test_untuned_allocator_is_in_the_command_and_the_report(tmp_path):
    out = tmp_path / "layer"
    assert main(["--malloc", "default", "bench", "layer", *FAST, *LAYER_FAST, "--impl", "activepath",
                 "--no-roofline", "--out", str(out)]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["command"].startswith("activepath --malloc default bench layer ")
    assert doc["environment"]["allocator"] == "default (--malloc default)"
    assert "- allocator: default (--malloc default)" in out.with_suffix(".md").read_text()


def test_layer_compares_experts_backends_by_name(tmp_path):
    from activepath.backends import triton as triton_moe

    fused = "triton" if triton_moe.available() and triton_moe.interpreting() else "rowwise"
    out = tmp_path / "backends"
    impls = f"activepath:grouped,activepath:{fused},hf-batched_mm,dense"
    assert main(["bench", "layer", *FAST, *LAYER_FAST, "--impl", impls, "--no-roofline", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["layer"]["rows"]
    assert [r["impl"] for r in rows[:4]] == impls.split(",")
    for r in rows:
        assert r["max_abs_diff_vs_first_impl"] is None or r["max_abs_diff_vs_first_impl"] < 1e-4
        assert (r["routing_overhead_ratio"] is not None) == (not r["impl"].startswith("hf-"))
    with pytest.raises(ValueError, match="unknown experts backend 'nope'"):
        main(["bench", "layer", *FAST, *LAYER_FAST, "--impl", "activepath:nope", "--no-roofline",
              "--out", str(tmp_path / "x")])  # fmt: skip


def test_generate_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="impl"):
        main(["bench", "generate", *FAST, "--no-roofline", "--impl", "vllm", "--out", str(tmp_path / "g")])


def test_notes_flag_bandwidth_drift_between_start_and_end() -> None:
    from activepath.bench.cli import notes

    def doc(end: float) -> dict:
        return {"environment": {"llc_bytes": 1 << 25, "bandwidth_GBps_at_end": end},
                "roofline": {"bandwidth_GBps": 30.0, "copy_exceeds_llc": True}}  # fmt: skip

    assert any("drifted" in n and "30.0" in n and "40.0" in n for n in notes(doc(40.0)))
    assert not any("drifted" in n for n in notes(doc(31.0)))
