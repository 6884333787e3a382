# route → dispatch → [experts: scratch] → combine
"""Scratch memory the MoE layers reuse across calls for their intermediates.

Why: at prefill an MoE layer's intermediates are large (Qwen3-30B-A3B shapes, 128 tokens:
the gathered activations, the gate/up and down outputs and the panel kernel's packed
copy are ~35 MB per layer). Fresh buffers of that size come from ``mmap`` and are
page-faulted in on first touch — measured on this machine class at ~25 000 faults per
128-token prefill of 4 layers, 50-100 ms of a ~450 ms time to first token. Reusing one set
of buffers makes a steady stream of calls allocate nothing.

One ``Workspace`` is shared by all MoE layers of a model (they run one after another).
A call takes it with ``lease()``; a second thread arriving while it is held gets fresh
buffers instead of waiting, so sharing is never a correctness hazard.
"""

from __future__ import annotations

import math
import threading
from contextlib import AbstractContextManager, nullcontext

import torch

from activepath.validation import check_positive_int

# Below this a fresh tensor comes from malloc's heap (no page faults), and reusing a
# buffer would cost two tensor ops (a slice and a view) where ``torch.empty`` costs one:
# at decode, right after the experts streamed their weights through the caches, every
# op counts.
MIN_REUSE_BYTES = 256 << 10
# Held at most: a 512-token prefill of Qwen3-30B-A3B shapes needs ~130 MiB.
DEFAULT_MAX_BYTES = 256 << 20


class Workspace:
    """Named scratch buffers, each grown to the largest request seen and never shrunk.

    ``empty(name, shape, dtype)`` returns an uninitialised tensor that stays valid until
    the next request for the same name (on the same dtype and device). Requests under
    ``MIN_REUSE_BYTES``, and requests that would take the total past ``max_bytes``, get a
    fresh tensor, as ``torch.empty`` would.
    """

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        check_positive_int("max_bytes", max_bytes)
        self.max_bytes = max_bytes
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if nbytes < MIN_REUSE_BYTES:
            return torch.empty(shape, dtype=dtype, device=device)
        key = (name, dtype, torch.device(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            held = self.nbytes - (0 if buf is None else buf.numel() * buf.element_size())
            if held + nbytes > self.max_bytes:
                return torch.empty(shape, dtype=dtype, device=device)
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel].view(shape)

    def clear(self) -> None:
        """Drop every buffer (memory returns to the allocator)."""
        self._buffers.clear()

    def lease(self, largest_bytes: int | None = None) -> AbstractContextManager[Workspace | None]:
        """A context manager giving this workspace for the duration of one layer call, or —
        when another thread holds it — ``FRESH``, so concurrent calls never share buffers.
        ``largest_bytes``: the largest buffer the call will request; below
        ``MIN_REUSE_BYTES`` every request would be fresh anyway, so no lease is taken (it
        yields None). (Classes rather than a generator: this runs once per layer per decode
        step, on cold caches.)"""
        if largest_bytes is not None and largest_bytes < MIN_REUSE_BYTES:
            return NO_LEASE
        return _Lease(self)


# Every request fresh (max_bytes=1 keeps nothing): what callers without a workspace, and a
# lease that finds its workspace busy, use. Holds no state, so any thread may share it.
FRESH = Workspace(max_bytes=1)
NO_LEASE: AbstractContextManager[None] = nullcontext()  # yields None; reusable, holds no state


class _Lease:
    __slots__ = ("_workspace", "_held")

    def __init__(self, workspace: Workspace) -> None:
        self._workspace = workspace
        self._held = False

    def __enter__(self) -> Workspace:
        self._held = self._workspace._lock.acquire(blocking=False)
        return self._workspace if self._held else FRESH

    def __exit__(self, *exc: object) -> None:
        if self._held:
            self._workspace._lock.release()
            self._held = False
