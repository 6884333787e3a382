# route → dispatch → [experts] → combine: which backend runs the experts, and what it can do
"""The experts backends, behind one registry of ``BackendSpec`` records.

A backend is ``fn(store, x_TH, plan)`` → expert outputs in dispatch order [S, H] (dtype of
``x_TH``), plus keywords its spec declares: ``workspace=`` (``uses_workspace``: scratch for its
intermediates and output, valid until the workspace's next use) or ``topk_weights_TK=``
(``fuses_combine``: it returns the combined y_TH [T, H] itself). ``run_experts`` hides those
differences from the layer. Everything a caller needs to know about a backend comes from its
spec, never from its name. The slow, obviously correct ``reference`` is always registered.

Shape legend: T tokens, K experts per token, S slots (sorted by expert), H hidden.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from activepath.kernels.policy import Choice
from activepath.moe.combine import combine
from activepath.moe.types import DispatchPlan, ExpertsOutput
from activepath.moe.weights import ExpertStore
from activepath.runtime.workspace import Workspace

ExpertsBackend = Callable[..., torch.Tensor]
"""(store, x_TH, plan, [workspace= | topk_weights_TK=]) → out_SH [S, H] (or y_TH [T, H])."""

ANY_DEVICE = frozenset({"cpu", "cuda", "meta"})
FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
ANY_FORMAT = frozenset({"float", "int8"})

# What a layer whose backend has no backward computes with when autograd is on: torch ops
# only there (the native kernels, the workspace and torch's CPU grouped GEMM step aside).
DIFFERENTIABLE_FALLBACK = "grouped"


@dataclass(frozen=True, kw_only=True)
class BackendSpec:
    """A registered backend and its declared capabilities.

    ``batch_invariant``: each slot's output is bitwise independent of the other slots in the
    call (a sequence gives the same result alone or batched). ``uses_workspace``: ``fn`` takes
    ``workspace=``. ``fuses_combine``: ``fn`` takes ``topk_weights_TK=`` and returns y_TH.
    ``differentiable``: with autograd on, gradients flow through ``fn`` (a layer whose backend
    is not takes ``DIFFERENTIABLE_FALLBACK`` for such calls). ``one_token_path``: the layer's
    two-call decode path (``moe.decode_path``) computes the same bits as ``fn`` at one token.
    ``devices``/``dtypes``/``formats``: where, on what and on which stores it runs.
    ``select``: ``select(store, x_TH, plan)`` → the ``Choice`` of kernel path ``fn`` takes.
    """

    name: str
    fn: ExpertsBackend
    batch_invariant: bool = False
    uses_workspace: bool = False
    fuses_combine: bool = False
    differentiable: bool = False
    one_token_path: bool = False
    devices: frozenset[str] = ANY_DEVICE
    dtypes: frozenset[torch.dtype] = FLOAT_DTYPES
    formats: frozenset[str] = ANY_FORMAT
    select: Callable[[ExpertStore, torch.Tensor, DispatchPlan], Choice] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"backend name must be a non-empty string, got {self.name!r}")
        if not callable(self.fn):
            raise TypeError(f"backend {self.name!r}: fn must be callable, got {type(self.fn).__name__}")
        if self.fuses_combine and self.uses_workspace:
            raise ValueError("a backend that fuses the combine returns y_TH itself; it cannot also use a workspace")

    def __call__(self, store: ExpertStore, x_TH: torch.Tensor, plan: DispatchPlan, **kw: object) -> torch.Tensor:
        return self.fn(store, x_TH, plan, **kw)

    def path(self, store: ExpertStore, x_TH: torch.Tensor, plan: DispatchPlan) -> str:
        """The kernel path ``fn`` takes for these inputs (the name when it declares no ``select``)."""
        return self.name if self.select is None else self.select(store, x_TH, plan).path


_BACKENDS: dict[str, BackendSpec] = {}


def register_backend(
    name: str,
    fn: ExpertsBackend,
    *,
    batch_invariant: bool = False,
    uses_workspace: bool = False,
    fuses_combine: bool = False,
    differentiable: bool = False,
    one_token_path: bool = False,
    devices: frozenset[str] = ANY_DEVICE,
    dtypes: frozenset[torch.dtype] = FLOAT_DTYPES,
    formats: frozenset[str] = ANY_FORMAT,
    select: Callable[[ExpertStore, torch.Tensor, DispatchPlan], Choice] | None = None,
) -> BackendSpec:
    """Make ``fn`` selectable as ``backend=name`` with the capabilities ``BackendSpec``
    describes; returns the spec. ``reference`` cannot be replaced."""
    if name == "reference" and "reference" in _BACKENDS:
        raise ValueError("the 'reference' backend is fixed; register yours under another name")
    spec = BackendSpec(
        name=name, fn=fn, batch_invariant=batch_invariant, uses_workspace=uses_workspace, fuses_combine=fuses_combine,
        differentiable=differentiable, one_token_path=one_token_path, devices=devices, dtypes=dtypes, formats=formats,
        select=select,
    )  # fmt: skip
    _BACKENDS[name] = spec
    return spec


def get_backend(name: str) -> BackendSpec:
    if name not in _BACKENDS:
        raise ValueError(f"unknown experts backend {name!r}; registered: {sorted(_BACKENDS)}")
    return _BACKENDS[name]


def backend_names() -> tuple[str, ...]:
    return tuple(sorted(_BACKENDS))


def is_batch_invariant(name: str) -> bool:
    return get_backend(name).batch_invariant


def uses_workspace(name: str) -> bool:
    return get_backend(name).uses_workspace


def fuses_combine(name: str) -> bool:
    return get_backend(name).fuses_combine


def is_differentiable(name: str) -> bool:
    return get_backend(name).differentiable


def _no_lap() -> float:
    return 0.0


def run_experts(
    spec: BackendSpec,
    store: ExpertStore,
    x_TH: torch.Tensor,
    plan: DispatchPlan,
    topk_weights_TK: torch.Tensor,
    *,
    workspace: Workspace | None = None,
    record_path: bool = False,
    lap: Callable[[], float] = _no_lap,
) -> ExpertsOutput:
    """The experts and the combine: y_TH [T, H] in the dtype of ``x_TH``, whatever the backend
    fuses or needs. ``workspace``: scratch for a backend that uses one (its output lives there,
    so it is combined before this returns). ``record_path``: ask the spec's ``select`` which
    kernel path ran (off by default: a few checks per call). ``lap``: a stage clock, called after
    the experts and after the combine (their seconds come back in the output)."""
    path = spec.path(store, x_TH, plan) if record_path else ""
    if spec.fuses_combine:
        y_TH = spec.fn(store, x_TH, plan, topk_weights_TK=topk_weights_TK)
        return ExpertsOutput(y_TH=y_TH, path=path, experts_s=lap(), combine_s=lap())
    if workspace is not None and spec.uses_workspace:
        out_SH = spec.fn(store, x_TH, plan, workspace=workspace)
    else:
        out_SH = spec.fn(store, x_TH, plan)
    experts_s = lap()
    y_TH = combine(out_SH, plan, topk_weights_TK)
    return ExpertsOutput(y_TH=y_TH, path=path, experts_s=experts_s, combine_s=lap())
