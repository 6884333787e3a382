"""What bounds the native memory of a server fed every prompt length (issue 14, item 10):
the runner's attention runs at bucketed widths only (torch's CPU attention keeps a compiled
kernel per shape forever), and the ``activepath`` command caps oneDNN's primitive caches."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import activepath
from activepath import cli
from activepath.runtime.process import ONEDNN_CACHE_VARIABLES, bound_onednn_caches
from activepath.serving.runner import ModelRunner, RunnerConfig
from activepath.serving.scheduler import DecodeItem, PrefillItem, StepPlan
from activepath.tolerances import MODEL_LOGITS_ATOL_FP32
from test_serving_fixtures import standin_model


def record_attention_shapes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(query length, key length) of every scaled_dot_product_attention call from now on."""
    shapes: list[tuple[int, int]] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        shapes.append((q.shape[-2], k.shape[-2]))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return shapes


@pytest.mark.parametrize("exact", [False, True])
def test_attention_shapes_stay_bounded_over_every_prompt_length(exact: bool, monkeypatch) -> None:
    runner = ModelRunner(activepath.optimize(standin_model()), RunnerConfig(max_slots=2, max_len=128, exact=exact))
    shapes = record_attention_shapes(monkeypatch)
    for length in range(1, 100):
        prompt = tuple(range(1, length + 1))
        runner.execute(StepPlan((), (PrefillItem("p", 0, prompt),), ()))
        runner.execute(StepPlan((), (), (DecodeItem("p", 0, 5, length),)))
    widths = {k for _, k in shapes}
    assert widths <= {64, 128}, sorted(widths)  # 99 prompt lengths, 2 attention widths
    assert {q for q, _ in shapes} <= {1, 64, 128}


def test_bucketed_prefill_ignores_stale_keys_in_its_slot() -> None:
    """The padded width reaches past the prompt into keys a longer earlier prompt left in the
    slot; causality keeps them out: logits equal a plain forward of the prompt alone."""
    model = activepath.optimize(standin_model())
    reference = activepath.optimize(standin_model())
    runner = ModelRunner(model, RunnerConfig(max_slots=1, max_len=128))
    gen = torch.Generator().manual_seed(3)
    long_ids = tuple(torch.randint(1, 380, (60,), generator=gen).tolist())
    short_ids = tuple(torch.randint(1, 380, (13,), generator=gen).tolist())
    runner.execute(StepPlan((), (PrefillItem("old", 0, long_ids),), ()))
    out = runner.execute(StepPlan((), (PrefillItem("new", 0, short_ids),), ()))
    with torch.no_grad():
        expected = reference(torch.tensor([short_ids])).logits[0, -1]
    assert (out.logits_RV[0] - expected).abs().max().item() <= MODEL_LOGITS_ATOL_FP32


def test_runner_config_rejects_bad_bucket() -> None:
    for bad in (0, -64, 1.5, True):
        with pytest.raises(ValueError, match="attention_bucket"):
            RunnerConfig(attention_bucket=bad)


def test_bound_onednn_caches_sets_unset_variables_only(monkeypatch) -> None:
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "500")
    assert bound_onednn_caches(32) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "32", "LRU_CACHE_CAPACITY": "500"}
    for bad in (0, -1, "64", 2.0, False):
        with pytest.raises(ValueError, match="capacity"):
            bound_onednn_caches(bad)


def test_activepath_command_caps_the_caches_before_its_subcommand(monkeypatch) -> None:
    for name in ONEDNN_CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    seen: dict[str, str | None] = {}

    def parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser()
        p.add_argument("--verbose", action="store_true")
        p.add_argument("--malloc", default="default")
        p.set_defaults(handler=lambda args: seen.update({n: os.environ.get(n) for n in ONEDNN_CACHE_VARIABLES}))
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    assert cli.main([]) == 0
    assert all(value is not None and int(value) >= 1 for value in seen.values()), seen


_GROWTH_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.nn.functional as F
    from activepath.runtime.process import bound_onednn_caches
    if sys.argv[1] == "capped":
        bound_onednn_caches(8)  # after torch is imported, before the first bf16 matmul
    def rss():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
    w = torch.randn(4096, 1024, dtype=torch.bfloat16)
    with torch.inference_mode():
        for m in range(1, 401):
            if m == 101:
                warm = rss()
            F.linear(torch.randn(m, 1024, dtype=torch.bfloat16), w)
    print(rss() - warm)
""")


def _growth_mib(mode: str) -> float:
    proc = subprocess.run([sys.executable, "-c", _GROWTH_SCRIPT, mode], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k not in ONEDNN_CACHE_VARIABLES})
    assert proc.returncode == 0, proc.stderr
    return float(proc.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not torch.backends.mkldnn.is_available(),
                    reason="needs /proc and oneDNN")
def test_capped_caches_keep_rss_flat_over_new_gemm_shapes() -> None:
    """300 new bf16 GEMM shapes after a warm-up: each left a cached oneDNN primitive behind;
    with the caches capped, RSS stays put."""
    uncapped = _growth_mib("default")
    if uncapped < 30:
        pytest.skip(f"bf16 GEMMs do not go through oneDNN's caches here (grew {uncapped:.0f} MiB uncapped)")
    assert _growth_mib("capped") < min(20.0, uncapped / 4)
