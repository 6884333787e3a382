"""Scheduler unit tests: no model, no tensors."""

from __future__ import annotations

import pytest

from activepath.serving.scheduler import QueueFull, Scheduler, SchedulerConfig, StepCostModel, StepPlan


def run_step(sched: Scheduler, now: float = 0.0, token: int = 7, step_s: float = 0.01) -> tuple[StepPlan, list]:
    plan = sched.schedule(now)
    tokens = {item.request_id: token for item in (*plan.decodes, *plan.prefills)}
    return plan, sched.update(plan, tokens, step_s)


def test_prefill_then_decode_until_length() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=2, max_len=32))
    sched.add("a", [1, 2, 3], 3)
    plan, events = run_step(sched)
    assert [p.request_id for p in plan.prefills] == ["a"] and not plan.decodes
    assert plan.prefills[0].token_ids == (1, 2, 3)
    assert [(e.token_id, e.index, e.finish_reason) for e in events] == [(7, 0, None)]
    plan, events = run_step(sched)
    assert plan.decodes[0].position == 3 and plan.decodes[0].token_id == 7
    plan, events = run_step(sched)
    assert plan.decodes[0].position == 4
    assert events[0].finish_reason == "length" and events[0].index == 2
    assert not sched.has_work


def test_stop_token_finishes() -> None:
    sched = Scheduler(SchedulerConfig())
    sched.add("a", [1], 10, stop_ids=[0])
    _, events = run_step(sched, token=0)
    assert events[0].finish_reason == "stop" and not sched.has_work


def test_continuous_batching_joins_and_leaves_between_steps() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=2))
    sched.add("a", [1, 2], 2)
    sched.add("b", [1], 5)
    sched.add("c", [4, 5, 6], 2)
    plan, _ = run_step(sched)
    assert {p.request_id for p in plan.prefills} == {"a", "b"} and sched.num_waiting == 1
    plan, events = run_step(sched)  # a finishes here
    assert {e.request_id for e in events if e.finish_reason} == {"a"}
    plan, _ = run_step(sched)
    assert [d.request_id for d in plan.decodes] == ["b"]
    assert [p.request_id for p in plan.prefills] == ["c"]


def test_slots_stay_compact_with_moves() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=3))
    for rid, n in (("a", 1), ("b", 5), ("c", 5)):
        sched.add(rid, [1], n)
    run_step(sched)  # a, b, c prefilled into slots 0, 1, 2; a finishes at once (1 token)
    plan = sched.schedule(0.0)
    assert plan.moves == ((2, 0),)
    assert [(d.request_id, d.slot) for d in plan.decodes] == [("c", 0), ("b", 1)]


def test_token_budget_limits_prefill_and_keeps_fifo() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=8, max_tokens_per_step=10))
    sched.add("long", list(range(8)), 2)
    sched.add("short", [1, 2, 3], 2)
    sched.add("tiny", [1], 2)
    plan, _ = run_step(sched)
    assert [p.request_id for p in plan.prefills] == ["long"]  # short (3) would exceed 10; tiny may not overtake
    plan, _ = run_step(sched)
    assert [p.request_id for p in plan.prefills] == ["short", "tiny"]


def test_prompt_over_budget_still_admitted_when_alone() -> None:
    sched = Scheduler(SchedulerConfig(max_tokens_per_step=4))
    sched.add("a", list(range(9)), 1)
    plan, _ = run_step(sched)
    assert [p.request_id for p in plan.prefills] == ["a"]


def test_queue_full_and_context_checks() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=1, max_queue=2, max_len=8))
    sched.add("a", [1], 2)
    sched.add("b", [1], 2)
    with pytest.raises(QueueFull) as info:
        sched.add("c", [1], 2)
    assert info.value.retry_after_s >= 1
    with pytest.raises(ValueError, match="exceeds the context"):
        sched.add("d", list(range(6)), 3)
    with pytest.raises(ValueError, match="empty"):
        sched.add("e", [], 3)
    with pytest.raises(ValueError, match="already"):
        sched.add("a", [1], 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sched.add("f", [1], 0)


def test_abort_waiting_and_running() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=1))
    sched.add("a", [1], 5)
    sched.add("b", [1], 5)
    run_step(sched)
    assert sched.abort("b") and sched.num_waiting == 0
    plan = sched.schedule(0.0)
    assert sched.abort("a")
    assert sched.update(plan, {"a": 3}, 0.01) == []  # the aborted request's token is dropped
    assert not sched.has_work and not sched.abort("a")
    sched.add("c", [1], 1)
    plan, _ = run_step(sched)
    assert plan.prefills[0].slot == 0


def test_target_itl_defers_prefill_until_max_wait() -> None:
    sched = Scheduler(SchedulerConfig(max_batch_size=4, target_itl_s=0.02, max_wait_s=1.0))
    for n in (1, 2, 3, 4, 5, 6):  # teach the cost model: 10 ms + 1 ms per token
        sched.cost.observe(n * 10, 0.01 + 0.001 * n * 10)
    sched.add("a", [1], 50)
    run_step(sched, now=0.0)
    sched.add("b", list(range(30)), 5)  # 1 decode + 30 prefill tokens ≈ 41 ms > 20 ms
    plan, _ = run_step(sched, now=0.1)
    assert not plan.prefills and len(plan.decodes) == 1
    plan, _ = run_step(sched, now=1.5)  # waited past max_wait_s
    assert [p.request_id for p in plan.prefills] == ["b"]


def test_cost_model_fit() -> None:
    model = StepCostModel()
    assert model.max_tokens_within(1.0) is None
    for n in range(1, 10):
        model.observe(n, 0.005 + 0.002 * n)
    a, b = model.fit()
    assert a == pytest.approx(0.005) and b == pytest.approx(0.002)
    assert model.max_tokens_within(0.025) == 10


@pytest.mark.parametrize("bad", [{"max_batch_size": 0}, {"max_queue": -1}, {"target_itl_s": 0.0},
                                 {"max_len": 1.5}, {"max_wait_s": -1.0}])
def test_config_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(**bad)


def test_loadtest_accounting_finds_lost_and_duplicated() -> None:
    from activepath.serving.loadtest import LoadTestConfig, RequestRecord, render_markdown, summarize

    def rec(i: int, ids: set[str], finishes: int = 1, done: int = 1, status: int = 200) -> RequestRecord:
        return RequestRecord(i, 0.0, status=status, token_s=[0.1, 0.2, 0.3], finish_reasons=["length"] * finishes,
                             done_markers=done, response_ids=ids)

    cfg = LoadTestConfig(concurrency=2, duration_s=1.0)
    good = summarize(cfg, [rec(0, {"a"}), rec(1, {"b"})], 1.0)
    assert good["ok"] and good["requests"]["complete"] == 2 and good["itl_s"]["p50"] == pytest.approx(0.1)
    bad = summarize(cfg, [rec(0, {"a"}), rec(1, {"a"}), rec(2, {"c"}, done=0), rec(3, {"d"}, finishes=2),
                          rec(4, set(), status=503)], 1.0)
    assert not bad["ok"]
    assert bad["requests"]["rejected_503"] == 1 and bad["requests"]["lost"] == 2  # no [DONE]; two finishes
    assert bad["requests"]["duplicated"] == 2  # id "a" twice; request 3 finished twice
    assert "| 5 | 2 | 1 | 2 | 2 |" in render_markdown(bad)
