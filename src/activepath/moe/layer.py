# [route] → [dispatch] → [experts] → [combine], composed
"""The sparse MoE layer: routing, dispatch, expert compute and combine, plus shared experts.

Shape legend: T tokens, H hidden, E experts, K experts per token, S = T*K slots.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import AbstractContextManager

import torch
from torch import nn

from activepath.backends.registry import DIFFERENTIABLE_FALLBACK, BackendSpec, get_backend, run_experts
from activepath.kernels.policy import grad_mode
from activepath.moe import decode_path as token_path
from activepath.moe.capacity import CapacityConfig, apply_capacity
from activepath.moe.dispatch import plan_dispatch
from activepath.moe.routing import Router
from activepath.moe.types import DispatchPlan, MoEStats, RoutingResult
from activepath.moe.weights import ExpertStore
from activepath.runtime.workspace import NO_LEASE, Workspace

__all__ = ["MoEStats", "SharedExperts", "SparseMoE"]


class SharedExperts(nn.Module):
    """Dense experts every token passes through (DeepSeek), optionally scaled by a
    per-token sigmoid gate (Qwen2-MoE). ``mlp`` is the source model's own module."""

    def __init__(self, mlp: nn.Module, gate: nn.Module | None = None) -> None:
        super().__init__()
        self.mlp = mlp
        self.gate = gate

    def forward(self, x_TH: torch.Tensor, *, row_wise: bool = False) -> torch.Tensor:
        """``row_wise``: one token per call, so each row's result is batch-invariant."""
        if row_wise and x_TH.shape[0] > 1:
            return torch.cat([self(x_TH[t : t + 1]) for t in range(x_TH.shape[0])])
        y_TH = self.mlp(x_TH)
        return y_TH if self.gate is None else torch.sigmoid(self.gate(x_TH)) * y_TH


class SparseMoE(nn.Module):
    """Routes each token to its top-k experts and runs only those.

    Structural parts (router, expert weights, shared experts) are fixed at construction;
    ``backend``, ``collect_stats``, ``capacity`` (None: dropless), ``workspace`` (None:
    fresh buffers every call; ``optimize`` gives all layers of a model one shared
    ``Workspace``) and ``token_fast_path`` (True: a one-token call takes ``token_path``'s two
    native calls where they apply, same results) are per-call settings that may change
    at any time. After a call with
    ``collect_stats=True``, ``last_stats`` holds its ``MoEStats``;
    ``overflow_dropped``/``overflow_rerouted`` count capacity overflows since construction.
    """

    def __init__(
        self,
        router: Router,
        experts: ExpertStore,
        shared: SharedExperts | None = None,
        *,
        backend: str = "grouped",
        collect_stats: bool = False,
    ) -> None:
        super().__init__()
        if router.config.num_experts != experts.num_experts:
            raise ValueError(
                f"router has {router.config.num_experts} experts but expert weights hold {experts.num_experts}"
            )
        if router.hidden_size != experts.hidden_size:
            raise ValueError(
                f"hidden size mismatch: router expects {router.hidden_size}, experts {experts.hidden_size}"
            )
        self.router = router
        self.experts = experts
        self.shared = shared
        self.backend = backend
        self.collect_stats = collect_stats
        self.last_stats: MoEStats | None = None
        self.capacity: CapacityConfig | None = None
        self.workspace: Workspace | None = None
        # One token (decode at batch 1) through token_path's two native calls where it applies.
        self.token_fast_path = True
        self.register_buffer("overflow_dropped", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("overflow_rerouted", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        get_backend(name)  # raises on an unknown name, before any call
        self._backend = name

    @property
    def backend_spec(self) -> BackendSpec:
        """The registered ``BackendSpec`` of ``backend``: what the backend can do."""
        return get_backend(self._backend)

    @property
    def top_k(self) -> int:
        """Experts per token (the router's); settable, 1 <= top_k <= the layer's experts."""
        return self.router.config.top_k

    @top_k.setter
    def top_k(self, k: int) -> None:
        num_experts = self.experts.num_experts
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"top_k must be an int, got {type(k).__name__} ({k!r})")
        if not 1 <= k <= num_experts:
            raise ValueError(f"top_k={k} is out of range: expected 1 <= top_k <= {num_experts} (the layer's experts)")
        config = dataclasses.replace(self.router.config, top_k=k)  # re-checks the expert-group limits
        router: nn.Module | None = self.router
        while router is not None:  # a wrapping router (the serving runner's row-wise one) and what it wraps
            router.config = config
            router = getattr(router, "inner", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [..., H] → [..., H], same dtype."""
        return self.forward_with_routing(x)[0]

    def forward_with_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingResult]:
        """Like ``forward``, also returning the routing decisions (flattened to [T, K])."""
        self._check_input(x)
        x_TH = x.reshape(-1, x.shape[-1])
        grad = self._needs_autograd(x)
        if not grad and self.token_fast_path and token_path.applies(self, x_TH):
            return self._one_token(x, x_TH)
        # Gradients need torch ops throughout: a backend without a backward steps aside.
        spec = get_backend(self._backend)
        if grad and not spec.differentiable:
            spec = get_backend(DIFFERENTIABLE_FALLBACK)
        clock = _StageClock(x_TH.device) if self.collect_stats else _NO_CLOCK
        routing = self.router(x_TH)
        kept_TK = None
        if self.capacity is not None:
            routing, kept_TK = self._apply_capacity(routing)
        routing_s = clock.lap()
        # The router's top-k ids are in range by construction: no range check (a sync off the CPU).
        plan = plan_dispatch(routing.topk_ids_TK, self.experts.num_experts, kept_TK, validate=False)
        dispatch_s = clock.lap()
        # No shared scratch under autograd: buffers saved for the backward must not be reused.
        # The experts' output may live in the workspace: run_experts combines it before release.
        with (NO_LEASE if grad or not spec.uses_workspace else self._scratch(plan)) as workspace:
            out = run_experts(spec, self.experts, x_TH, plan, routing.topk_weights_TK, workspace=workspace,
                              record_path=self.collect_stats, lap=clock.lap)  # fmt: skip
        y_TH = out.y_TH
        if self.shared is not None:
            y_TH = y_TH + self._shared(x_TH)
        shared_s = clock.lap()
        if self.collect_stats:
            self.last_stats = MoEStats(plan.counts_E, routing_s, dispatch_s, out.experts_s, out.combine_s, shared_s,
                                       out.path)  # fmt: skip
        return y_TH.view(x.shape), routing

    def _needs_autograd(self, x: torch.Tensor) -> bool:
        """Whether this call builds a graph through the routed experts (their output needs
        gradients w.r.t. the input, the router or the expert weights)."""
        if not grad_mode():
            return False  # no_grad / inference_mode: the decode case, one check
        return x.requires_grad or any(p.requires_grad for m in (self.router, self.experts) for p in m.parameters())

    def _one_token(self, x: torch.Tensor, x_1H: torch.Tensor) -> tuple[torch.Tensor, RoutingResult]:
        """Decode at batch 1 through ``token_path``: the general path's results, bit for bit."""
        result = token_path.run(self, x_1H)
        start = time.perf_counter()
        y_1H = result.y_1H if self.shared is None else result.y_1H + self._shared(x_1H)
        if self.collect_stats:
            self.last_stats = MoEStats(result.counts_E, result.routing_s, result.dispatch_s, result.experts_s,
                                       result.combine_s, time.perf_counter() - start, result.path)  # fmt: skip
        return y_1H.view(x.shape), result.routing

    def _scratch(self, plan: DispatchPlan) -> AbstractContextManager[Workspace | None]:
        if self.workspace is None:
            return NO_LEASE
        # The largest request: the fp32 expert outputs, [S, H]. At decode sizes the lease
        # (a lock and an object, once per layer per step) is skipped.
        return self.workspace.lease(plan.order_S.shape[0] * self.experts.hidden_size * 4)

    def _apply_capacity(self, routing: RoutingResult) -> tuple[RoutingResult, torch.Tensor]:
        assert self.capacity is not None
        result = apply_capacity(self.capacity, routing, self.experts.num_experts)
        self.overflow_dropped += result.dropped
        self.overflow_rerouted += result.rerouted
        return result.routing, result.kept_TK

    def _shared(self, x_TH: torch.Tensor) -> torch.Tensor:
        assert self.shared is not None
        return self.shared(x_TH, row_wise=self.backend_spec.batch_invariant)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SparseMoE expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.experts.hidden_size:
            raise ValueError(
                f"input hidden size {tuple(x.shape)[-1:]} does not match the layer's {self.experts.hidden_size}"
            )
        if x.dtype != self.experts.dtype:
            raise TypeError(f"input dtype {x.dtype} does not match the layer's {self.experts.dtype}")


class _NoClock:
    """Stands in for the clock when stats are off: no timer calls, no syncs."""

    def lap(self) -> float:
        return 0.0


_NO_CLOCK = _NoClock()


class _StageClock:
    """Wall-clock laps; on an accelerator, synchronised so a lap is the stage's own time."""

    def __init__(self, device: torch.device) -> None:
        self._sync = torch.cuda.synchronize if device.type == "cuda" else None
        self._last = self._now()

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        elapsed, self._last = now - self._last, now
        return elapsed
