"""Shared pieces of the property-based fuzz suite: Hypothesis profiles, strategies and
tensor builders.

Profiles: ``ACTIVEPATH_FUZZ=ci`` (the default) runs few examples, derandomized (the same
examples every run, so CI is reproducible) and with no example database;
``ACTIVEPATH_FUZZ=long`` runs many random examples and keeps failures in ``.hypothesis/``
for replay. The profiles are applied per test (``@fuzz(n)``), not loaded globally, so other
Hypothesis users in the session (the HTTP fuzzing) keep their own settings.

Tensors are built by torch from a drawn seed, not drawn element by element (a [300, 64]
tensor of drawn floats is far too slow): Hypothesis draws the structure that matters —
shapes, dtypes, how many distinct values a row holds, all-equal rows, hot and idle
experts, extreme scales — and shrinks it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from activepath import RouterConfig
from activepath.kernels import cpu as native

PROFILE = os.environ.get("ACTIVEPATH_FUZZ", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"ACTIVEPATH_FUZZ={PROFILE!r}: expected 'ci' or 'long'")
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("activepath-fuzz-ci", derandomize=True, database=None, print_blob=True, **_COMMON)
settings.register_profile("activepath-fuzz-long", derandomize=False, print_blob=True, **_COMMON)
LONG_EXAMPLES = int(os.environ.get("ACTIVEPATH_FUZZ_EXAMPLES", "1000"))


def fuzz(ci_examples: int) -> settings:
    """Settings for one property: ``ci_examples`` in CI, ``LONG_EXAMPLES`` (at least) when long."""
    parent = settings.get_profile(f"activepath-fuzz-{PROFILE}")
    examples = ci_examples if PROFILE == "ci" else max(LONG_EXAMPLES, ci_examples)
    return settings(parent, max_examples=examples)


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SEEDS = st.integers(0, 2**31 - 1)
# Token counts: small ones, primes, and the edges of kernel thresholds (16 panel rows,
# 12 bf16 native rows, 128 where the grad-mode gather changes, 512 native rows).
TOKEN_COUNTS = st.one_of(
    st.integers(1, 40),
    st.sampled_from([1, 2, 3, 11, 12, 13, 15, 16, 17, 31, 97, 127, 128, 129, 211, 257, 293]),
)


@contextmanager
def native_kernels(enabled: bool) -> Iterator[None]:
    """Run with the native kernels off (``enabled=False``) or as they are; restored after."""
    native.available()  # settles the initial (environment) state before it is read
    before = native.is_enabled()
    native.set_enabled(before and enabled)
    try:
        yield
    finally:
        native.set_enabled(before)


@st.composite
def router_configs(draw: st.DrawFn, max_top_k: int = 8) -> RouterConfig:
    """Any valid router: softmax or sigmoid, either order, DeepSeek's expert groups, scaling."""
    order = draw(st.sampled_from(["score_then_topk", "score_then_topk", "topk_then_softmax"]))
    grouped = order == "score_then_topk" and draw(st.booleans())
    n_group = draw(st.sampled_from([2, 3, 4, 8])) if grouped else 1
    per_group = draw(st.integers(1, 8)) if grouped else draw(st.one_of(st.integers(1, 40), st.just(64), st.just(128)))
    topk_group = draw(st.integers(1, n_group))
    top_k = draw(st.integers(1, min(max_top_k, topk_group * per_group)))
    return RouterConfig(
        num_experts=n_group * per_group,
        top_k=top_k,
        scoring="softmax" if order == "topk_then_softmax" else draw(st.sampled_from(["softmax", "sigmoid"])),
        order=order,
        normalize_topk=draw(st.booleans()),
        n_group=n_group,
        topk_group=topk_group,
        group_score=draw(st.sampled_from(["top2_sum", "max"])),
        # topk_then_softmax (GPT-OSS) ignores the scaling factor: drawn only where it applies
        routed_scaling_factor=1.0 if order == "topk_then_softmax" else draw(st.sampled_from([1.0, 1.0, 2.5, 0.125])),
        logits_precision=draw(st.sampled_from(["input", "fp32"])),
    )


@st.composite
def tie_patterns(draw: st.DrawFn) -> dict:
    """How a block of logits is built: few levels → many duplicated values; all-equal rows."""
    return {
        "seed": draw(SEEDS),
        "levels": draw(st.sampled_from([0, 1, 2, 3, 8, 40, 127])),
        "equal_rows": draw(st.sampled_from([0.0, 0.0, 0.3, 1.0])),
    }


def grid_logits(num_tokens: int, num_experts: int, *, seed: int, levels: int, equal_rows: float,
                step: float = 1 / 16) -> torch.Tensor:  # fmt: skip
    """float64 [T, E]: integers in [-levels, levels] times ``step``, exact in bf16, fp16 and
    fp32 (so every precision sees the same ties); a share ``equal_rows`` of rows all equal."""
    gen = torch.Generator().manual_seed(seed)
    ints_TE = torch.randint(-levels, levels + 1, (num_tokens, num_experts), generator=gen)
    equal_T = torch.rand(num_tokens, generator=gen) < equal_rows
    ints_TE[equal_T] = ints_TE[equal_T, :1]
    return ints_TE.double() * step


def grid_bias(num_experts: int, seed: int) -> torch.Tensor:
    """A selection bias on a coarse grid (multiples of 1/8 in [-1, 1]), float32-exact."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (num_experts,), generator=gen).float() / 8


def randn(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
