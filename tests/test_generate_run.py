"""One impl's generation for ``bench generate`` (``activepath.bench.generate_run``): each impl's
state is undone on exit, and a generation records what the report reads."""

from __future__ import annotations

import pytest
import torch
from families import tiny_model

from activepath.bench.energy import EnergyMeter
from activepath.bench.generate_run import Trace, generate_once, model_bytes, prepared, seeded_prompt
from activepath.bench.timing import Clock


@pytest.mark.parametrize("impl", ["activepath", "activepath-int8-all", "hf-eager"])
def test_prepared_undoes_its_state_and_generation_fills_the_trace(impl: str) -> None:
    model = tiny_model("qwen3_moe")
    prompt_BP = seeded_prompt(model.config.vocab_size, 2, 5, seed=3, device="cpu")
    assert torch.equal(prompt_BP, seeded_prompt(model.config.vocab_size, 2, 5, seed=3, device="cpu"))
    with torch.no_grad():
        before = model(input_ids=prompt_BP).logits
    types_before = [type(m) for m in model.modules()]
    mbytes = model_bytes(model, batch=2)
    trace = Trace()
    default = model.config._experts_implementation
    with prepared(model, impl, default, "grouped", mbytes) as (tap, label, step_mbytes):
        generate_once(model, prompt_BP, 3, tap, Clock("cpu"), EnergyMeter("cpu", 10.0), step_mbytes, trace)
    assert impl.split("-")[0] in label or "transformers" in label
    assert len(trace.ttft_s) == 1 and len(trace.step_s) == len(trace.step_bytes) == 2
    assert trace.ids[0].shape == (2, 3) and all(b > step_mbytes.static_bytes for b in trace.step_bytes)
    assert trace.counts is not None and len(trace.counts) == len(mbytes.expert_bytes_by_layer)
    # Prefill and two decode steps each routed 2 * (5 + 1 + 1) tokens, top_k experts per token.
    assert all(int(c.sum()) == 2 * 7 * model.config.num_experts_per_tok for c in trace.counts)
    model.set_experts_implementation(default)
    assert [type(m) for m in model.modules()] == types_before
    with torch.no_grad():
        assert torch.equal(model(input_ids=prompt_BP).logits, before)
