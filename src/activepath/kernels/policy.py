"""The kernel policy: which kernel path runs for given inputs, and why.

Every stage asks one ``select_*()`` here and branches on the returned ``Choice.path``; every
size threshold that decides a path lives in this module, with the measurement it came from.
Inputs are plain values and tensors (dtype, device, row counts, a store's format string), never
pipeline objects: ``kernels/`` imports nothing from ``moe/``, ``backends/`` or ``dense/``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class Choice:
    """A selected kernel path (e.g. ``"native_panel"``, ``"torch_grouped_mm"``) and the reason for it."""

    path: str
    reason: str

    def __post_init__(self) -> None:
        if not self.path or not isinstance(self.path, str):
            raise ValueError(f"Choice.path must be a non-empty string, got {self.path!r}")


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """True when autograd records these tensors' ops: the native kernels and in-place / ``out=``
    torch paths have no backward, so a path that needs the graph must use plain torch ops.
    The package's one ``torch.is_grad_enabled()`` check."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def grad_mode() -> bool:
    """True outside ``no_grad``/``inference_mode``: paths that reuse buffers across calls (a leased
    workspace, in-place accumulation) must not, since autograd may still hold those buffers."""
    return torch.is_grad_enabled()
