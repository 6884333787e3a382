# [generate bench] → breakdown → report
"""Where a forward's time goes: attention, the MoE layers' stages, dense MLPs, the LM head
and the rest (embedding, norms, residual adds, the decoder loop's Python), for prefill
and for a decode step.

Measured in instrumented generations of their own, apart from the timed ones: every component
is timed by forward hooks (two clock reads per module call), which the headline figures
must not carry. Inside an activepath MoE layer the stages come from the layer's own stage
clock (``collect_stats``): routing, dispatch, experts, combine, shared experts, and
``moe_glue`` for the rest of the layer's wall time (input checks, the workspace, Python).
A transformers MoE block is split into its router module, its experts module (which
dispatches, computes and combines in one call), its shared experts if any, and
``moe_glue``. ``rest`` is the forward's wall time minus every timed component, so the
components always add up to the total.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from activepath.moe.layer import SparseMoE
from activepath.bench.timing import Clock

# In report order. Not every component applies to every impl or model (0.0 where not).
COMPONENTS = ("attention", "router", "dispatch", "experts", "combine", "shared_experts", "moe_glue", "dense_mlp",
              "lm_head", "rest")  # fmt: skip
_ROUTER_NAMES = ("gate", "router")
_SHARED_NAMES = ("shared_experts", "shared_expert")


@dataclass(frozen=True, kw_only=True)
class PhaseBreakdown:
    """Milliseconds per forward (prefill) or per decode step, by component; ``total_ms`` is
    the forward's wall time and equals the sum of ``ms``."""

    total_ms: float
    ms: dict[str, float]

    def share(self, component: str) -> float:
        """Fraction of the total spent in ``component``."""
        return self.ms[component] / self.total_ms if self.total_ms > 0 else 0.0


@dataclass(frozen=True, kw_only=True)
class TimeBreakdown:
    prefill: PhaseBreakdown
    decode: PhaseBreakdown
    decode_steps: int


class ComponentClock:
    """Forward hooks that add each component's wall time into ``totals`` (seconds).
    ``moe_blocks``: the model's MoE modules (``SparseMoE`` after ``optimize``, else the
    transformers blocks). Use as a context manager: the hooks are removed on exit."""

    def __init__(self, model: nn.Module, moe_blocks: list[nn.Module], clock: Clock) -> None:
        # Checked before any hook is placed: stage times from an earlier call would be stale.
        if any(isinstance(b, SparseMoE) and not b.collect_stats for b in moe_blocks):
            raise RuntimeError("the time breakdown needs the activepath layers' stage clocks: optimize(collect_stats=True)")
        self._clock = clock
        self.totals = dict.fromkeys(COMPONENTS, 0.0)
        self.timed: dict[str, list[str]] = {}  # component -> names of the modules timed for it
        self._names = {id(m): name for name, m in model.named_modules()}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._inner = 0.0  # seconds the current transformers MoE block spent in its timed children
        moe_ids = {id(b) for b in moe_blocks}
        moe_names = [name for name, module in model.named_modules() if id(module) in moe_ids]
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if id(module) in moe_ids or any(name.startswith(f"{moe}.") for moe in moe_names):
                continue  # timed as part of its MoE block (a shared expert's own `mlp`, say)
            if leaf == "self_attn":
                self._time(module, "attention")
            elif leaf == "mlp":
                self._time(module, "dense_mlp")
        for block in moe_blocks:
            self._time_moe(block)
        head = model.get_output_embeddings()
        if head is not None:
            self._time(head, "lm_head")

    def __enter__(self) -> ComponentClock:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        self.totals = dict.fromkeys(COMPONENTS, 0.0)

    def _time(self, module: nn.Module, component: str, after: Callable[[nn.Module, float], None] | None = None) -> None:
        starts: list[float] = []
        self.timed.setdefault(component, []).append(self._names.get(id(module), "?"))

        def pre(_m: nn.Module, _args: object) -> None:
            starts.append(self._clock.now())

        def post(m: nn.Module, _args: object, _out: object) -> None:
            wall = self._clock.now() - starts.pop()
            if after is None:
                self.totals[component] += wall
            else:
                after(m, wall)

        self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def _time_moe(self, block: nn.Module) -> None:
        if isinstance(block, SparseMoE):
            self._time(block, "moe_glue", self._split_sparse_moe)
            return
        # A transformers block: its router, experts and shared experts are child modules,
        # timed by their own hooks (which run inside the block's); the block's remainder is glue.
        for name, child in block.named_children():
            component = "router" if name in _ROUTER_NAMES else "shared_experts" if name in _SHARED_NAMES \
                else "experts" if name == "experts" else None  # fmt: skip
            if component is not None:
                self._time(child, component, lambda _m, wall, c=component: self._add_inner(c, wall))
        self._time(block, "moe_glue", self._glue_after_children)

    def _add_inner(self, component: str, wall: float) -> None:
        self.totals[component] += wall
        self._inner += wall

    def _glue_after_children(self, _block: nn.Module, wall: float) -> None:
        self.totals["moe_glue"] += max(wall - self._inner, 0.0)
        self._inner = 0.0

    def _split_sparse_moe(self, layer: nn.Module, wall: float) -> None:
        stats = layer.last_stats  # type: ignore[union-attr]  (set by this call: collect_stats is on)
        stages = {"router": stats.routing_s, "dispatch": stats.dispatch_s, "experts": stats.experts_s,
                  "combine": stats.combine_s}  # fmt: skip
        if layer.shared is not None:  # without shared experts that lap is only the clock read: glue
            stages["shared_experts"] = stats.shared_s
        for component, seconds in stages.items():
            self.totals[component] += seconds
        self.totals["moe_glue"] += max(wall - sum(stages.values()), 0.0)


@torch.inference_mode()
def measure_breakdown(
    model: nn.Module, moe_blocks: list[nn.Module], prompt_BP: torch.Tensor, new: int, clock: Clock
) -> TimeBreakdown:
    """One instrumented greedy generation of ``new`` tokens from ``prompt_BP``: the prefill
    forward's breakdown and the mean decode step's."""
    from transformers import DynamicCache

    if new < 2:
        raise ValueError(f"new must be >= 2 (a prefill and at least one decode step), got {new}")
    cache = DynamicCache(config=model.config)
    with ComponentClock(model, moe_blocks, clock) as timer:
        start = clock.now()
        logits = model(input_ids=prompt_BP, cache=cache, use_cache=True, logits_to_keep=1).logits
        next_B1 = logits[:, -1].argmax(-1, keepdim=True)
        prefill = _phase(timer.totals, clock.now() - start, 1)
        timer.reset()
        decode_s = 0.0
        for _ in range(new - 1):
            start = clock.now()
            logits = model(input_ids=next_B1, cache=cache, use_cache=True).logits
            next_B1 = logits[:, -1].argmax(-1, keepdim=True)
            decode_s += clock.now() - start
        decode = _phase(timer.totals, decode_s, new - 1)
    return TimeBreakdown(prefill=prefill, decode=decode, decode_steps=new - 1)


def mean_breakdown(runs: list[TimeBreakdown]) -> TimeBreakdown:
    """The mean of several instrumented generations (each component, and the total, averaged
    per forward; means add up like the parts do)."""
    if not runs:
        raise ValueError("mean_breakdown needs at least one TimeBreakdown")

    def mean(phases: list[PhaseBreakdown]) -> PhaseBreakdown:
        return PhaseBreakdown(total_ms=sum(p.total_ms for p in phases) / len(phases),
                              ms={c: sum(p.ms[c] for p in phases) / len(phases) for c in COMPONENTS})  # fmt: skip

    return TimeBreakdown(prefill=mean([r.prefill for r in runs]), decode=mean([r.decode for r in runs]),
                         decode_steps=sum(r.decode_steps for r in runs))


def _phase(totals: dict[str, float], wall_s: float, forwards: int) -> PhaseBreakdown:
    ms = {c: totals[c] * 1e3 / forwards for c in COMPONENTS if c != "rest"}
    total_ms = wall_s * 1e3 / forwards
    # The hooks' own clock reads fall in "rest"; it cannot go below zero unless a component
    # was counted twice, which would be a bug worth seeing, so it is not clamped.
    ms["rest"] = total_ms - sum(ms.values())
    return PhaseBreakdown(total_ms=total_ms, ms={c: ms[c] for c in COMPONENTS})
