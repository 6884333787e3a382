# shapes → build → [layer bench: the dense baseline] → report
"""The no-sparsity baseline of ``activepath bench layer``: every expert on every token.

Shape legend: T tokens, H hidden, E experts.
"""

from __future__ import annotations

import torch

from activepath.backends.registry import get_backend, run_experts
from activepath.bench.timing import Clock
from activepath.moe.dispatch import plan_dispatch
from activepath.moe.layer import SparseMoE


def dense_forward(layer: SparseMoE, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float], str]:
    """The no-sparsity baseline: every expert on every token, non-chosen experts weighted 0,
    through the same stages and backend as activepath (so the output matches it). Returns the
    output, the stage seconds and the experts' kernel path."""
    clock = Clock(x.device)
    x_TH = x.reshape(-1, x.shape[-1])
    num_tokens, num_experts = x_TH.shape[0], layer.experts.num_experts
    t0 = clock.now()
    routing = layer.router(x_TH)
    weights_TE = torch.zeros(num_tokens, num_experts, dtype=torch.float32, device=x.device)
    weights_TE.scatter_(1, routing.topk_ids_TK, routing.topk_weights_TK.float())
    t1 = clock.now()
    all_ids_TE = torch.arange(num_experts, device=x.device).expand(num_tokens, num_experts)
    plan = plan_dispatch(all_ids_TE, num_experts)
    t2 = clock.now()
    laps = [t2]

    def lap() -> float:
        laps.append(clock.now())
        return laps[-1] - laps[-2]

    out = run_experts(get_backend(layer.backend), layer.experts, x_TH, plan, weights_TE, record_path=True, lap=lap)
    y_TH = out.y_TH if layer.shared is None else out.y_TH + layer.shared(x_TH)
    t5 = clock.now()
    stages = {"routing_s": t1 - t0, "dispatch_s": t2 - t1, "experts_s": out.experts_s, "combine_s": out.combine_s,
              "shared_s": t5 - laps[-1]}
    return y_TH.view(x.shape), stages, out.path
