# [schedule] → execute → update
"""The scheduler: pure Python over requests, no tensors. Each step it returns a
``StepPlan`` (which KV slots to move, which prompts to prefill, which sequences to
decode); after the runner executes it, ``update`` turns the sampled tokens into events.

Policy, in order: running sequences always decode (one token each); then waiting
requests are admitted first come, first served, while a KV slot is free and the step's
token budget holds. The latency knob ``target_itl_s`` caps the prefill tokens added to
a step that has decodes, using a fitted step-cost model, so running streams keep a
steady inter-token latency; ``max_wait_s`` bounds how long that can delay a waiting
request. Slots are kept compact (running sequences in slots 0..n-1) with explicit moves,
so the runner can take contiguous views of its cache.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """``max_batch_size``: sequences running at once (= KV slots). ``max_tokens_per_step``:
    token budget of one step (decodes + prefill). ``max_queue``: waiting requests before
    ``add`` refuses. ``max_len``: prompt + generated tokens per sequence.
    ``target_itl_s``: if set, admit prefills only while the predicted step time stays
    under it (trades time to first token for steady inter-token latency); a request that
    has waited ``max_wait_s`` is admitted regardless."""

    max_batch_size: int = 16
    max_tokens_per_step: int = 1024
    max_queue: int = 64
    max_len: int = 512
    target_itl_s: float | None = None
    max_wait_s: float = 0.5

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_tokens_per_step", "max_queue", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.target_itl_s is not None and not self.target_itl_s > 0:
            raise ValueError(f"target_itl_s must be > 0 or None, got {self.target_itl_s}")
        if not self.max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be >= 0, got {self.max_wait_s}")


class QueueFull(Exception):
    """The waiting queue is at ``max_queue``; retry after ``retry_after_s``."""

    def __init__(self, depth: int, retry_after_s: float) -> None:
        super().__init__(f"queue full ({depth} waiting)")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class PrefillItem:
    request_id: str
    slot: int
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class DecodeItem:
    """Feed ``token_id`` at ``position`` of the sequence in ``slot``."""

    request_id: str
    slot: int
    token_id: int
    position: int


@dataclass(frozen=True)
class StepPlan:
    """``moves`` (src slot, dst slot) run before the forward; decodes are in slot order."""

    moves: tuple[tuple[int, int], ...]
    prefills: tuple[PrefillItem, ...]
    decodes: tuple[DecodeItem, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(len(p.token_ids) for p in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes


@dataclass(frozen=True)
class TokenEvent:
    """One generated token; ``finish_reason`` is set on a sequence's last event."""

    request_id: str
    token_id: int
    index: int
    finish_reason: FinishReason | None


@dataclass
class _Sequence:
    request_id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    stop_ids: frozenset[int]
    arrival_s: float
    slot: int | None = None
    output_ids: list[int] = field(default_factory=list)


class StepCostModel:
    """Least-squares fit ``step_s ≈ a + b * tokens`` over the last ``window`` steps."""

    def __init__(self, window: int = 128) -> None:
        self._points: deque[tuple[int, float]] = deque(maxlen=window)

    def observe(self, num_tokens: int, step_s: float) -> None:
        self._points.append((num_tokens, step_s))

    def fit(self) -> tuple[float, float] | None:
        n = len(self._points)
        if n < 4:
            return None
        mean_x = sum(x for x, _ in self._points) / n
        mean_y = sum(y for _, y in self._points) / n
        var_x = sum((x - mean_x) ** 2 for x, _ in self._points)
        if var_x == 0:
            return None
        slope = sum((x - mean_x) * (y - mean_y) for x, y in self._points) / var_x
        slope = max(slope, 1e-9)
        return mean_y - slope * mean_x, slope

    def max_tokens_within(self, seconds: float) -> int | None:
        """Most tokens a step can hold and still take at most ``seconds``; None if unknown."""
        fitted = self.fit()
        if fitted is None:
            return None
        intercept, slope = fitted
        return max(0, int((seconds - intercept) / slope))


class Scheduler:
    """Plans steps over the waiting and running requests. Not thread-safe: the engine
    calls it under its own lock."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.cost = StepCostModel()
        self._waiting: deque[_Sequence] = deque()
        self._running: dict[str, _Sequence] = {}
        self._slots: list[str | None] = [None] * config.max_batch_size

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def add(self, request_id: str, prompt_ids: Iterable[int], max_new_tokens: int,
            *, stop_ids: Iterable[int] = (), now: float = 0.0) -> None:
        """Queue a request. Raises ``ValueError`` if it cannot fit the context,
        ``QueueFull`` if the waiting queue is full."""
        prompt = tuple(prompt_ids)
        self._check_fits(request_id, prompt, max_new_tokens)
        if len(self._waiting) >= self.config.max_queue:
            raise QueueFull(len(self._waiting), self._retry_after_s())
        self._waiting.append(_Sequence(request_id, prompt, max_new_tokens, frozenset(stop_ids), now))

    def abort(self, request_id: str) -> bool:
        """Forget a request, waiting or running; its slot is free for the next step."""
        for seq in self._waiting:
            if seq.request_id == request_id:
                self._waiting.remove(seq)
                return True
        seq = self._running.pop(request_id, None)
        if seq is None:
            return False
        self._free(seq)
        return True

    def schedule(self, now: float) -> StepPlan:
        """The next step: compaction moves, every running decode, then admitted prefills."""
        moves = self._compact()
        decodes = tuple(self._decode_item(self._running[rid]) for rid in self._slots if rid is not None)
        prefills = self._admit(now, len(decodes))
        return StepPlan(moves, prefills, decodes)

    def update(self, plan: StepPlan, next_tokens: Mapping[str, int], step_s: float) -> list[TokenEvent]:
        """Record the runner's sampled tokens; finished sequences leave and free their slot."""
        self.cost.observe(plan.num_tokens, step_s)
        events = []
        for item in (*plan.decodes, *plan.prefills):
            seq = self._running.get(item.request_id)
            if seq is None or item.request_id not in next_tokens:
                continue  # aborted while the step ran
            token = next_tokens[item.request_id]
            seq.output_ids.append(token)
            reason = self._finish_reason(seq, token)
            events.append(TokenEvent(seq.request_id, token, len(seq.output_ids) - 1, reason))
            if reason is not None:
                del self._running[seq.request_id]
                self._free(seq)
        return events

    def _admit(self, now: float, num_decodes: int) -> tuple[PrefillItem, ...]:
        budget = self.config.max_tokens_per_step - num_decodes
        itl_budget = self._itl_token_budget(num_decodes)
        admitted: list[PrefillItem] = []
        while self._waiting and None in self._slots:
            seq = self._waiting[0]
            need = len(seq.prompt_ids)
            within = need <= budget and (itl_budget is None or need <= itl_budget)
            first = not admitted and (num_decodes == 0 or now - seq.arrival_s >= self.config.max_wait_s)
            if not (within or first):
                break  # first come, first served: nobody overtakes the head of the queue
            self._waiting.popleft()
            seq.slot = self._slots.index(None)
            self._slots[seq.slot] = seq.request_id
            self._running[seq.request_id] = seq
            admitted.append(PrefillItem(seq.request_id, seq.slot, seq.prompt_ids))
            budget -= need
            itl_budget = None if itl_budget is None else itl_budget - need
        return tuple(admitted)

    def _itl_token_budget(self, num_decodes: int) -> int | None:
        if self.config.target_itl_s is None or num_decodes == 0:
            return None
        limit = self.cost.max_tokens_within(self.config.target_itl_s)
        return None if limit is None else limit - num_decodes

    def _compact(self) -> tuple[tuple[int, int], ...]:
        """Move the highest occupied slots into the lowest holes."""
        moves = []
        while True:
            occupied = [s for s, rid in enumerate(self._slots) if rid is not None]
            holes = [s for s, rid in enumerate(self._slots) if rid is None]
            if not occupied or not holes or holes[0] > occupied[-1]:
                return tuple(moves)
            src, dst = occupied[-1], holes[0]
            rid = self._slots[src]
            assert rid is not None
            self._slots[dst], self._slots[src] = rid, None
            self._running[rid].slot = dst
            moves.append((src, dst))

    def _decode_item(self, seq: _Sequence) -> DecodeItem:
        assert seq.slot is not None and seq.output_ids
        position = len(seq.prompt_ids) + len(seq.output_ids) - 1
        return DecodeItem(seq.request_id, seq.slot, seq.output_ids[-1], position)

    def _finish_reason(self, seq: _Sequence, token: int) -> FinishReason | None:
        if token in seq.stop_ids:
            return "stop"
        if len(seq.output_ids) >= seq.max_new_tokens:
            return "length"
        if len(seq.prompt_ids) + len(seq.output_ids) >= self.config.max_len:
            return "length"
        return None

    def _free(self, seq: _Sequence) -> None:
        if seq.slot is not None and self._slots[seq.slot] == seq.request_id:
            self._slots[seq.slot] = None
        seq.slot = None

    def _check_fits(self, request_id: str, prompt: tuple[int, ...], max_new_tokens: int) -> None:
        if request_id in self._running or any(s.request_id == request_id for s in self._waiting):
            raise ValueError(f"request id {request_id!r} is already queued or running")
        if not prompt:
            raise ValueError("the prompt is empty")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if len(prompt) + max_new_tokens > self.config.max_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_new_tokens}) exceeds the context of "
                f"{self.config.max_len} tokens"
            )

    def _retry_after_s(self) -> float:
        """A guess at when a queue place frees: one running sequence's remaining time."""
        fitted = self.cost.fit()
        step_s = 0.05 if fitted is None else fitted[0] + fitted[1] * max(1, len(self._running))
        remaining = min((s.max_new_tokens - len(s.output_ids) for s in self._running.values()), default=1)
        return max(1.0, step_s * remaining)
