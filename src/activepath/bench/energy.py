# generate bench → [energy] → report
"""Energy over a region of the run: measured through NVML on an NVIDIA GPU; on a CPU
(no RAPL access assumed) *estimated* as process CPU time × a stated watts-per-core
figure, and flagged as such."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class EnergyReading:
    """``joules`` is None when nothing could be measured (``method`` says why)."""

    joules: float | None
    estimated: bool
    method: str


class EnergyMeter:
    """``start()`` then ``stop()`` → ``EnergyReading`` for the region between them."""

    def __init__(self, device: torch.device | str, watts_per_core: float) -> None:
        if not watts_per_core > 0:
            raise ValueError(f"watts_per_core must be > 0, got {watts_per_core}")
        self._device = torch.device(device)
        self._watts_per_core = watts_per_core
        self._nvml_handle = _nvml_handle(self._device) if self._device.type == "cuda" else None
        self._start: float | None = None

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> EnergyReading:
        if self._start is None:
            raise RuntimeError("EnergyMeter.stop() called before start()")
        delta = self._read() - self._start
        if self._device.type == "cuda":
            if self._nvml_handle is None:
                return EnergyReading(joules=None, estimated=False, method="not measured: pynvml unavailable")
            return EnergyReading(joules=delta / 1000.0, estimated=False,
                                 method="NVML total energy counter of the GPU (whole board, mJ)")
        return EnergyReading(
            joules=delta * self._watts_per_core,
            estimated=True,
            method=f"estimated: process CPU time × {self._watts_per_core:g} W per busy core (assumption, not a measurement)",
        )

    def _read(self) -> float:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            if self._nvml_handle is None:
                return 0.0
            import pynvml

            return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._nvml_handle))
        return time.process_time()


def _nvml_handle(device: torch.device) -> object | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    except Exception:  # noqa: BLE001 - any NVML failure means "not measured", said in the report
        return None
