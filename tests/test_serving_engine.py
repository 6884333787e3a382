"""Runner and engine on a random tiny Qwen3-MoE: continuous batching gives the same greedy
tokens as transformers' generate, and with ``exact`` a request's logits are bitwise
independent of what else shares its steps. Capacity through the engine."""

from __future__ import annotations

import threading

import pytest
import torch

import activepath
from activepath.moe.capacity import CapacityConfig
from activepath.serving.engine import Engine, EngineConfig
from activepath.serving.metrics import ServingMetrics
from activepath.serving.runner import ModelRunner, RunnerConfig
from activepath.serving.scheduler import Scheduler, SchedulerConfig
from test_serving_fixtures import standin_model

N_NEW = 12


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(1, 320, (n,), generator=gen).tolist() for n in (3, 17, 40, 1, 9)]


@pytest.fixture(scope="module")
def hf_tokens(prompts: list[list[int]]) -> list[list[int]]:
    model = activepath.optimize(standin_model())
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                               do_sample=False)[0, len(p):].tolist() for p in prompts]


def run_all(runner: ModelRunner, requests: dict[str, list[int]], stagger: int = 0) -> dict[str, list[torch.Tensor]]:
    """Drive scheduler + runner by hand; request i joins at step i * stagger. Returns each
    request's logits rows, one per generated token."""
    sched = Scheduler(SchedulerConfig(max_batch_size=runner.config.max_slots, max_len=runner.config.max_len))
    pending = list(requests.items())
    logits: dict[str, list[torch.Tensor]] = {rid: [] for rid in requests}
    step = 0
    while pending or sched.has_work:
        while pending and step >= stagger * (len(requests) - len(pending)):
            rid, prompt = pending.pop(0)
            sched.add(rid, prompt, N_NEW)
        plan = sched.schedule(0.0)
        out = runner.execute(plan)
        rows = [d.request_id for d in plan.decodes] + [p.request_id for p in plan.prefills]
        for rid, row in zip(rows, out.logits_RV if out.logits_RV is not None else []):
            logits[rid].append(row.clone())
        sched.update(plan, out.next_tokens, out.step_s)
        step += 1
    return logits


@pytest.mark.parametrize("exact", [False, True])
def test_batched_tokens_match_transformers_generate(exact: bool, prompts, hf_tokens) -> None:
    runner = ModelRunner(activepath.optimize(standin_model()), RunnerConfig(max_slots=4, max_len=96, exact=exact))
    logits = run_all(runner, {str(i): p for i, p in enumerate(prompts)}, stagger=2)
    for i, expected in enumerate(hf_tokens):
        assert [int(row.argmax()) for row in logits[str(i)]] == expected


def test_exact_logits_are_bitwise_batch_invariant(prompts) -> None:
    runner = ModelRunner(activepath.optimize(standin_model()), RunnerConfig(max_slots=5, max_len=96, exact=True))
    alone = {str(i): run_all(runner, {str(i): p})[str(i)] for i, p in enumerate(prompts)}
    together = run_all(runner, {str(i): p for i, p in enumerate(prompts)}, stagger=1)
    for rid, rows in alone.items():
        assert len(rows) == N_NEW
        for a, b in zip(rows, together[rid]):
            assert torch.equal(a, b)


def test_engine_concurrent_requests_and_metrics(prompts, hf_tokens) -> None:
    metrics = ServingMetrics()
    engine = Engine(activepath.optimize(standin_model()),
                    EngineConfig(scheduler=SchedulerConfig(max_batch_size=3, max_len=96)), metrics=metrics).start()
    try:
        results: list[list[int] | None] = [None] * len(prompts)

        def worker(i: int) -> None:
            results[i] = engine.generate(prompts[i], N_NEW)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == hf_tokens
    finally:
        engine.stop()
    text = metrics.render().decode()
    assert f"activepath_generated_tokens_total {float(N_NEW * len(prompts))}" in text
    assert 'activepath_requests_total{outcome="finished"} 5.0' in text
    assert "activepath_time_to_first_token_seconds_count 5.0" in text
    assert 'activepath_expert_tokens_total{expert="' in text
    assert "activepath_routing_overhead_ratio{layer=" in text


def test_engine_capacity_counts_overflow(prompts) -> None:
    metrics = ServingMetrics()
    cfg = EngineConfig(scheduler=SchedulerConfig(max_batch_size=4, max_len=96),
                       capacity=CapacityConfig(capacity_factor=0.5, policy="drop"))
    engine = Engine(activepath.optimize(standin_model()), cfg, metrics=metrics).start()
    try:
        tokens = engine.generate(prompts[2], 4)
    finally:
        engine.stop()
    assert len(tokens) == 4
    dropped = sum(int(layer.overflow_dropped) for _, layer in engine.layers)
    assert dropped > 0  # a 40-token prefill at factor 0.5 overflows
    assert all(layer.capacity == cfg.capacity for _, layer in engine.layers)
    assert 'activepath_capacity_overflow_total{layer="model.layers.0.mlp",policy="drop"}' in metrics.render().decode()


def test_engine_abort_frees_slot(prompts) -> None:
    engine = Engine(activepath.optimize(standin_model()),
                    EngineConfig(scheduler=SchedulerConfig(max_batch_size=1, max_len=96))).start()
    try:
        first = threading.Event()
        rid = engine.submit(prompts[0], 80, lambda event: first.set())
        assert first.wait(30)
        engine.abort(rid)
        assert engine.generate(prompts[1], 3) is not None  # the one slot is free again
    finally:
        engine.stop()


def test_embedded_tiny_model_through_engine() -> None:
    """The shipped trained model (bf16): engine tokens equal transformers generate."""
    from transformers import AutoTokenizer

    from activepath.models import embedded_path

    directory = embedded_path("tiny")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"]
               for t in ("The json module provides functions to", "def main():\n")]
    reference = activepath.load("tiny")
    with torch.no_grad():
        expected = [reference.generate(torch.tensor([p]), max_new_tokens=8, min_new_tokens=8,
                                       do_sample=False)[0, len(p):].tolist() for p in prompts]
    engine = Engine(activepath.load("tiny"), EngineConfig(scheduler=SchedulerConfig(max_batch_size=2, max_len=64))).start()
    try:
        results: list[list[int]] = [[], []]
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, engine.generate(prompts[i], 8)))
                   for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        engine.stop()
    assert results == expected
