"""The scratch workspace: buffers reused across calls (no new memory in a steady state),
the size floor and cap, leases under contention, and SparseMoE giving the same bits with
and without one."""

from __future__ import annotations

import threading

import pytest
import torch

from activepath import optimize
from activepath.moe.experts import backend_names, uses_workspace
from activepath.api import moe_layers
from activepath.runtime.workspace import MIN_REUSE_BYTES, Workspace

from families import FAMILIES, tiny_model

BIG = MIN_REUSE_BYTES // 4  # float32 elements in MIN_REUSE_BYTES
CPU = torch.device("cpu")


def test_buffers_are_reused_and_grow_only_when_needed() -> None:
    ws = Workspace()
    a = ws.empty("x", (2, BIG), torch.float32, CPU)
    b = ws.empty("x", (BIG,), torch.float32, CPU)  # smaller: a view of the same storage
    assert a.data_ptr() == b.data_ptr() and b.shape == (BIG,)
    held = ws.nbytes
    c = ws.empty("x", (3, BIG), torch.float32, CPU)  # larger: grows
    assert ws.nbytes == 3 * BIG * 4 > held
    assert ws.empty("x", (3, BIG), torch.float32, CPU).data_ptr() == c.data_ptr()
    other = ws.empty("y", (BIG,), torch.float32, CPU)  # another name: its own buffer
    assert other.data_ptr() != c.data_ptr()
    assert ws.empty("x", (BIG,), torch.int64, CPU).dtype == torch.int64  # dtype is part of the key
    ws.clear()
    assert ws.nbytes == 0


def test_small_requests_and_requests_past_the_cap_are_fresh() -> None:
    ws = Workspace(max_bytes=4 * BIG * 4)
    small = ws.empty("s", (8, 8), torch.float32, CPU)
    assert ws.nbytes == 0 and small.shape == (8, 8)
    ws.empty("a", (3, BIG), torch.float32, CPU)
    fresh = ws.empty("b", (2, BIG), torch.float32, CPU)  # 3 + 2 > 4: not kept
    assert ws.nbytes == 3 * BIG * 4 and fresh.shape == (2, BIG)
    with pytest.raises(ValueError, match="max_bytes"):
        Workspace(max_bytes=0)


def test_a_held_workspace_lends_fresh_buffers_to_a_second_caller() -> None:
    ws = Workspace()
    with ws.lease() as first:
        assert first is ws
        seen = []
        thread = threading.Thread(target=lambda: seen.append(ws.lease().__enter__()))
        thread.start()
        thread.join()
        assert seen[0] is not ws
        seen[0].empty("x", (2, BIG), torch.float32, CPU)
        assert seen[0].nbytes == 0  # the stand-in keeps nothing
    with ws.lease() as again:  # released: the next call gets it back
        assert again is ws
    with ws.lease(MIN_REUSE_BYTES - 1) as small:  # nothing that size is ever reused: no lease
        assert small is None


def test_backends_that_take_a_workspace() -> None:
    assert {"grouped", "native"} <= {name for name in backend_names() if uses_workspace(name)}
    assert not uses_workspace("reference")
    with pytest.raises(ValueError, match="unknown experts backend"):
        uses_workspace("nope")


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("backend", ["grouped", "native"])
def test_layers_give_the_same_bits_with_and_without_a_workspace(family: str, backend: str) -> None:
    # optimize gives every layer one shared workspace; with MIN_REUSE_BYTES at its floor
    # even these tiny layers use it. Two calls in a row: the second reuses the buffers.
    model = optimize(tiny_model(family), backend=backend)
    layers = [layer for _, layer in moe_layers(model)]
    assert len({id(layer.workspace) for layer in layers}) == 1 and layers[0].workspace is not None
    x = torch.randn(37, layers[0].experts.hidden_size, dtype=layers[0].experts.dtype)

    def run() -> torch.Tensor:
        out = layers[0](x)
        return out[0] if isinstance(out, tuple) else out  # GPT-OSS also returns router scores

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr("activepath.runtime.workspace.MIN_REUSE_BYTES", 0)
        with_ws = [run(), run()]
        held = layers[0].workspace.nbytes
        run()
        assert layers[0].workspace.nbytes == held > 0  # steady state: nothing new
        layers[0].workspace = None
        without = run()
    assert torch.equal(with_ws[0], without) and torch.equal(with_ws[1], without)
