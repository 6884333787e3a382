"""Process-wide settings: ``tune_allocator`` (freed activations are reused instead of faulting
in fresh pages) and ``frozen_gc`` (full collections skip the loaded objects).

The effect is checked in child processes, so that the thresholds under test are the only
allocator settings in play (the test process itself may be tuned already by CLI tests)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from activepath.runtime.process import MAX_MMAP_THRESHOLD_BYTES, AllocatorConfig, AllocatorState, frozen_gc, tune_allocator

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's"
)

# What attention does at every layer of a 128-token prefill: a projection's output and the
# product made from it (2 MiB each), then both freed, for 64 rounds; the faults after the
# first 8 are printed. The tuned heap does not settle at once: small allocations made between
# rounds fragment it, so it grows a few more times (seen here at rounds 8 and 18, 1,536 pages;
# 2,048 on CI) before it reaches its high-water mark and stops faulting for good.
_CHILD = """
import json, resource, sys, torch
from activepath.runtime.process import AllocatorConfig, tune_allocator
threshold, rounds, settle = map(int, sys.argv[1:])
state = tune_allocator(AllocatorConfig(mmap_threshold_bytes=threshold))
faults = []
for _ in range(rounds):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.ones(128, 4096)
    z = y * 2.0
    del y, z
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": state.tuned, "faults": sum(faults[settle:])}))
"""
_ROUNDS, _SETTLE = 64, 8
_COUNTED = _ROUNDS - _SETTLE
_PAGES_PER_ROUND = 2 * (2 << 20) // 4096


def _child(mmap_threshold: int) -> dict:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    argv = [sys.executable, "-c", _CHILD, str(mmap_threshold), str(_ROUNDS), str(_SETTLE)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc_only
def test_tuned_heap_reuses_freed_activations():
    tuned = _child(MAX_MMAP_THRESHOLD_BYTES)
    assert tuned["tuned"] is True
    # Without reuse, every counted round would fault 1024 pages (56 rounds' worth); the tuned
    # heap may still grow a few times while fragmentation settles, so 8 rounds' worth is allowed.
    assert tuned["faults"] < 8 * _PAGES_PER_ROUND, tuned


@glibc_only
def test_a_threshold_below_the_activations_maps_them_afresh_every_time():
    """The same rounds with a 1 MiB threshold: every 2 MiB activation is a new mapping whose
    pages fault in again. That is the cost tune_allocator removes, and it shows that the
    check above can fail."""
    low = _child(1 << 20)
    assert low["tuned"] is True
    assert low["faults"] > 0.9 * _COUNTED * _PAGES_PER_ROUND, low


def test_another_preloaded_allocator_is_left_alone(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    state = tune_allocator()
    assert state == AllocatorState(False, "jemalloc is preloaded")
    assert state.describe() == "default (jemalloc is preloaded)"


@glibc_only
def test_tuned_state_describes_its_thresholds():
    state = tune_allocator()  # the CLI's defaults; harmless in the test process
    assert state.tuned and state.config == AllocatorConfig()
    assert state.describe() == "glibc malloc tuned: mmap threshold 32 MiB, trim threshold 256 MiB"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mmap_threshold_bytes": 0}, "mmap_threshold_bytes must be a positive int, got 0"),
        ({"mmap_threshold_bytes": MAX_MMAP_THRESHOLD_BYTES + 1}, "at most 33554432"),
        ({"trim_threshold_bytes": -5}, "trim_threshold_bytes must be a positive int, got -5"),
        ({"trim_threshold_bytes": 1 << 31}, "must fit a C int"),
        ({"mmap_threshold_bytes": True}, "got True"),
        ({"trim_threshold_bytes": 1.5}, "got 1.5"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AllocatorConfig(**kwargs)


def test_config_is_keyword_only_and_tune_checks_its_argument():
    with pytest.raises(TypeError):
        AllocatorConfig(1 << 20)  # type: ignore[misc]
    with pytest.raises(TypeError, match="config must be an AllocatorConfig, got dict"):
        tune_allocator({"mmap_threshold_bytes": 1 << 20})  # type: ignore[arg-type]


class _Node:
    """A reference cycle (only the cyclic collector frees it), observable through a weakref."""

    def __init__(self) -> None:
        self.me = self


def test_frozen_gc_freezes_for_the_block_and_gives_everything_back():
    import gc
    import weakref

    assert gc.get_freeze_count() == 0
    node = _Node()
    alive = weakref.ref(node)
    with frozen_gc() as frozen:
        assert frozen > 0 and gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert alive() is not None  # frozen: no collection looks at it
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert alive() is None  # unfrozen: collected again


def test_a_frozen_process_exits_cleanly():
    """Frozen objects are unfrozen at exit, so nothing reports them as leaked (triton's
    bindings do, for every object still alive at shutdown)."""
    child = "import activepath, torch\nm = activepath.load('tiny')\nactivepath.freeze_loaded_objects()\n"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, check=False,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert "leaked" not in done.stderr, done.stderr[-2000:]


def test_frozen_gc_leaves_an_existing_freeze_alone():
    import gc

    with frozen_gc() as outer:
        with frozen_gc() as inner:
            assert inner == gc.get_freeze_count()
        assert gc.get_freeze_count() > 0 and outer > 0  # the inner block did not unfreeze the outer one
    assert gc.get_freeze_count() == 0


def test_a_full_collection_skips_frozen_objects():
    """What frozen_gc buys: a full pass over 200,000 live objects vs over none of them."""
    import gc
    import time

    objects = [[i] for i in range(200_000)]  # tracked containers, like a loaded model's

    def full_pass() -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            gc.collect()
            best = min(best, time.perf_counter() - start)
        return best

    walked = full_pass()
    with frozen_gc():
        skipped = full_pass()
    assert len(objects) == 200_000
    assert skipped < walked / 5, (skipped, walked)


def test_the_malloc_option_of_the_commands():
    from activepath.runtime.process import apply_malloc_option

    assert apply_malloc_option("default") == AllocatorState(False, "--malloc default")
    with pytest.raises(ValueError, match="--malloc must be one of \\('tuned', 'default'\\), got 'fast'"):
        apply_malloc_option("fast")
