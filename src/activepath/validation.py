"""Helpers shared by the stages: argument checks (user mistakes raise, naming value and
range) and parameter wrapping."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")


def check_choice(name: str, value: object, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {allowed}")


def as_parameter(t: torch.Tensor) -> nn.Parameter:
    """Wrap without copying: re-wrapping an existing Parameter keeps its storage shared."""
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
