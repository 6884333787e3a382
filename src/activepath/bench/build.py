# shapes → [build] → (layer | generate) bench → report
"""Build transformers models of a shape with seeded random weights, fast.

transformers' default init runs per-module initialisers (seconds per *hundred* MB on a
CPU); here parameters are allocated uninitialised and filled in place with a seeded
uniform generator (about a second per GB). Routers get std 1/sqrt(H) so that routing is
decisive rather than near-uniform noise.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from activepath.adapters import adapter_for

log = logging.getLogger(__name__)


def build_model(
    config: PretrainedConfig,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    experts_implementation: str | None = None,
    device: str = "cpu",
) -> nn.Module:
    """An eval-mode ``AutoModelForCausalLM`` of ``config`` with seeded random weights."""
    from transformers.initialization import no_init_weights

    start = time.perf_counter()
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation=experts_implementation)
    randomize_(model, seed)
    model.to(torch.device(device)).eval()
    gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    log.info("built %s (%.2f GiB) in %.1f s", type(model).__name__, gib, time.perf_counter() - start)
    return model


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> None:
    """Fill every floating parameter and buffer in place: norms near 1, matrices with std
    1/sqrt(fan_in), vectors (biases) small. Rotary frequency buffers are left alone."""
    gen = torch.Generator().manual_seed(seed)
    transposed_experts = model.config.model_type == "gpt_oss"
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if not p.is_floating_point() or "inv_freq" in name:
            continue
        if "norm" in name:
            _uniform_(p, gen, center=1.0, std=0.1)
        elif p.dim() >= 2:
            fan_in = p.shape[-2] if transposed_experts and p.dim() == 3 else p.shape[-1]
            _uniform_(p, gen, center=0.0, std=fan_in**-0.5)
        else:
            _uniform_(p, gen, center=0.0, std=0.1)


def _uniform_(p: torch.Tensor, gen: torch.Generator, *, center: float, std: float) -> None:
    # uniform on [c - a, c + a] has standard deviation a / sqrt(3)
    bound = std * 3**0.5
    p.uniform_(center - bound, center + bound, generator=gen)


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformers MoE blocks of ``model`` (before ``optimize``), in module order."""
    block_class = adapter_for(model.config.get_text_config().model_type).block_class
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ == block_class]


def expert_parameters(block: nn.Module) -> list[nn.Parameter]:
    """The stacked routed-expert parameters of one transformers MoE block."""
    return list(block.experts.parameters())
