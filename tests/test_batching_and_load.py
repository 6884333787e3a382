"""Batch invariance, awkward batch shapes, load() round trips, memory, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import activepath
from activepath.tolerances import BATCH_INVARIANCE_ATOL, MODEL_LOGITS_ATOL_FP32
from families import FAMILIES, tiny_model
from test_families import random_ids


def batch_drift(model: torch.nn.Module, batch: torch.Tensor) -> float:
    """Max abs difference of each sequence's logits alone vs inside ``batch``."""
    with torch.no_grad():
        together = model(batch).logits
        return max((model(batch[b : b + 1]).logits[0] - together[b]).abs().max().item() for b in range(len(batch)))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", [b for b in activepath.backend_names() if activepath.is_batch_invariant(b)])
def test_batch_invariance(family: str, backend: str) -> None:
    model = activepath.optimize(tiny_model(family), backend=backend)
    assert batch_drift(model, random_ids(4, 16, seed=5)) <= BATCH_INVARIANCE_ATOL


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_grouped_batch_drift_is_last_bits_only(family: str) -> None:
    """``grouped`` picks BLAS kernels by group size, so it is not bitwise batch-invariant;
    its drift stays at rounding level, like transformers' own."""
    batch = random_ids(4, 16, seed=5)
    ours = batch_drift(activepath.optimize(tiny_model(family)), batch)
    assert ours <= 10 * max(batch_drift(tiny_model(family), batch), BATCH_INVARIANCE_ATOL)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("length", [1, 2, 13])
def test_awkward_lengths_match_eager(family: str, length: int) -> None:
    reference, model = tiny_model(family), activepath.optimize(tiny_model(family))
    ids = random_ids(1, length, seed=length)
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max().item() <= MODEL_LOGITS_ATOL_FP32


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3", "gpt_oss"])
def test_padded_batch_matches_eager(family: str) -> None:
    """A padded batch (pad tokens are routed like any other token) gives the reference's
    logits at real positions, and the reference's greedy continuations with left padding."""
    reference, model = tiny_model(family), activepath.optimize(tiny_model(family))
    short, long_ = random_ids(1, 5, seed=6), random_ids(1, 11, seed=7)
    pad, none = torch.zeros(1, 6, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long)
    real, full = torch.ones(1, 5, dtype=torch.long), torch.ones(1, 11, dtype=torch.long)
    right = dict(input_ids=torch.cat([torch.cat([short, pad], 1), long_]),
                 attention_mask=torch.cat([torch.cat([real, none], 1), full]))
    left = dict(input_ids=torch.cat([torch.cat([pad, short], 1), long_]),
                attention_mask=torch.cat([torch.cat([none, real], 1), full]))
    with torch.no_grad():
        got, expected = model(**right).logits, reference(**right).logits
        assert (got[0, :5] - expected[0, :5]).abs().max() <= MODEL_LOGITS_ATOL_FP32
        assert (got[1] - expected[1]).abs().max() <= MODEL_LOGITS_ATOL_FP32
        kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(**left, **kwargs), reference.generate(**left, **kwargs))


@pytest.mark.parametrize("family", FAMILIES)
def test_load_round_trip(family: str, tmp_path: Path) -> None:
    reference = tiny_model(family)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    keys = json.dumps(sorted(_safetensors_keys(tmp_path)))
    # per-expert keys on disk, as checkpoints ship them (GPT-OSS ships its experts stacked)
    assert ("experts.0." in keys) == (family != "gpt_oss")
    model = activepath.load(tmp_path)
    assert len(activepath.moe_layers(model)) > 0
    ids = random_ids(2, 9, seed=8)
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max().item() <= MODEL_LOGITS_ATOL_FP32
        out = model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 14)


def test_load_dtype_and_options(tmp_path: Path) -> None:
    tiny_model("olmoe").save_pretrained(tmp_path)
    model = activepath.load(tmp_path, dtype="bfloat16", backend="reference", collect_stats=True)
    layer = activepath.moe_layers(model)[0][1]
    assert layer.experts.w_gate_up.dtype == torch.bfloat16
    assert layer.backend == "reference" and layer.collect_stats
    with torch.no_grad():
        model(random_ids(1, 5, seed=9))
    assert int(layer.last_stats.tokens_per_expert_E.sum()) == 5 * 2


def test_load_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        activepath.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="safetensors"):
        activepath.load(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="supported: .*mixtral"):
        activepath.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(ValueError, match="dtype='int3' is not supported"):
        activepath.load(tmp_path, dtype="int3")
    with pytest.raises(ValueError, match="backend"):
        activepath.load(tmp_path, backend="nope")
    with pytest.raises(TypeError):
        activepath.load(42)  # type: ignore[arg-type]


def test_optimize_rejects_bad_input() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="unsupported architecture 'llama'.*supported: "):
        activepath.optimize(dense)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        activepath.optimize(torch.nn.Linear(2, 2))
    model = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match="unknown experts backend"):
        activepath.optimize(model, backend="fastest")
    with pytest.raises(ValueError, match="top_k"):
        activepath.optimize(model, top_k=0)
    with pytest.raises(ValueError, match="top_k=11"):
        activepath.optimize(model, top_k=11)
    assert not activepath.moe_layers(model)  # a failed optimize leaves the model untouched
    activepath.optimize(model, top_k=1)
    assert all(layer.router.config.top_k == 1 for _, layer in activepath.moe_layers(model))


def test_optimize_holds_no_second_copy_of_weights() -> None:
    """Peak RSS while optimizing a ~200 MB model stays within 1.1x of the RSS before."""
    script = textwrap.dedent(
        """
        import torch, activepath
        from transformers import AutoModelForCausalLM, Qwen3MoeConfig
        cfg = Qwen3MoeConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=64, moe_intermediate_size=256, num_experts=64,
                             num_experts_per_tok=4)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        model = model.to_empty(device="cpu").eval()
        for p in model.parameters():
            p.data.normal_()
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1])
        def storage_bytes(m):
            seen = {}
            for t in list(m.parameters()) + list(m.buffers()):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return sum(seen.values())
        before_rss, before_bytes = status("VmRSS:"), storage_bytes(model)
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM)
        activepath.optimize(model)
        print(before_rss, status("VmHWM:"), status("VmRSS:"), before_bytes, storage_bytes(model))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    before_rss, peak_rss, after_rss, before_bytes, after_bytes = map(int, out)
    # the weights are shared, not copied: only small per-layer counters are added
    assert before_bytes > 150e6 and before_bytes <= after_bytes <= before_bytes + 4096
    assert peak_rss <= 1.1 * before_rss and after_rss <= 1.1 * before_rss


def _safetensors_keys(directory: Path) -> list[str]:
    from safetensors import safe_open

    keys: list[str] = []
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            keys.extend(f.keys())
    return keys
