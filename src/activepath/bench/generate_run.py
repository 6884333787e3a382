# shapes → build → [generate bench: one impl's generation] → report
"""One implementation's greedy generation for ``activepath bench generate``: the model put in
that impl's state (activepath's patch, undone afterwards, or a transformers experts
implementation), the routing read back through a tap, one timed generation, and the bytes
each decode step reads. ``generate_bench`` runs these round-robin and reports them.

Shape legend: B batch, P prompt tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from activepath.api import moe_layers, optimize
from activepath.bench.arith import distinct_experts
from activepath.bench.build import moe_blocks
from activepath.bench.energy import EnergyMeter
from activepath.bench.timing import Clock
from activepath.dense.linears import Int8Linear, unpatch_linears


@dataclass(frozen=True, kw_only=True)
class ModelBytes:
    """Weights a decode step reads besides the routed experts, and one routed expert's
    bytes in each MoE layer (in module order)."""

    static_bytes: int
    expert_bytes_by_layer: list[int]
    total_param_bytes: int


@dataclass
class Trace:
    """What the generations of one impl recorded (mutable while collecting)."""

    ttft_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    step_bytes: list[int] = field(default_factory=list)
    prefill_j: list[float] = field(default_factory=list)
    decode_j: list[float] = field(default_factory=list)
    counts: list[torch.Tensor] | None = None
    kv_measured: bool = True
    ids: list[torch.Tensor] = field(default_factory=list)
    energy_method: str = ""
    energy_estimated: bool = False


def model_bytes(model: nn.Module, batch: int) -> ModelBytes:
    """Split ``model``'s weights into routed experts and the rest (call before optimize)."""
    blocks = [b for _, b in moe_blocks(model)]
    expert_ids = {id(p) for b in blocks for p in b.experts.parameters()}
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    experts_total = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) in expert_ids)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.data_ptr()
    emb_saved = 0 if tied else emb.numel() * emb.element_size() - batch * emb.shape[1] * emb.element_size()
    per_layer = [sum(p.numel() * p.element_size() for p in b.experts.parameters()) // b.experts.num_experts
                 for b in blocks]
    return ModelBytes(static_bytes=total - experts_total - emb_saved, expert_bytes_by_layer=per_layer,
                      total_param_bytes=total)


def moe_modules(model: nn.Module, impl: str) -> list[nn.Module]:
    """The MoE modules ``model`` runs in ``impl``'s state (inside ``prepared``)."""
    if impl.startswith("activepath"):
        return [layer for _, layer in moe_layers(model)]
    return [block for _, block in moe_blocks(model)]


def seeded_prompt(vocab: int, batch: int, length: int, seed: int, device: str) -> torch.Tensor:
    """A [batch, length] prompt of random token ids, the same for every impl given ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).to(device)


class _HFTap:
    """Reads the routing transformers' experts modules receive, via forward pre-hooks
    (the expert indices are their second argument); costs one reference per call."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        self._last: list[torch.Tensor | None] = [None] * len(blocks)
        self._sizes = [b.experts.num_experts for b in blocks]
        self._handles = [b.experts.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                         for i, b in enumerate(blocks)]

    def _hook(self, i: int) -> Callable[[nn.Module, tuple, dict], None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            candidates = list(args[1:2]) + list(kwargs.values())
            self._last[i] = next(t for t in candidates if isinstance(t, torch.Tensor) and not t.is_floating_point())
        return hook

    def counts(self) -> list[torch.Tensor]:
        return [torch.bincount(ids.reshape(-1).cpu(), minlength=n) for ids, n in zip(self._last, self._sizes)]

    def close(self) -> None:
        for h in self._handles:
            h.remove()


class _ActivepathTap:
    def __init__(self, model: nn.Module) -> None:
        self._layers = [layer for _, layer in moe_layers(model)]

    def counts(self) -> list[torch.Tensor]:
        return [layer.last_stats.tokens_per_expert_E.cpu() for layer in self._layers]  # type: ignore[union-attr]

    def close(self) -> None:
        pass


@contextmanager
def prepared(
    model: nn.Module, impl: str, default_impl: str, backend: str, mbytes: ModelBytes
) -> Iterator[tuple[object, str, ModelBytes]]:
    """Put ``model`` in the state ``impl`` needs (and say what a step reads in that state);
    undo activepath's patch on exit."""
    blocks = moe_blocks(model)
    if not impl.startswith("activepath"):
        model.set_experts_implementation(default_impl if impl == "hf" else impl.removeprefix("hf-"))
        tap = _HFTap([b for _, b in blocks])
        try:
            yield tap, f"transformers experts_implementation={model.config._experts_implementation}", mbytes
        finally:
            tap.close()
        return
    expert_dtype = "int8" if impl.startswith("activepath-int8") else "native"
    dense_dtype = "int8" if impl == "activepath-int8-all" else "native"
    linears = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear]  # fmt: skip
    optimize(model, backend=backend, collect_stats=True, expert_dtype=expert_dtype, dense_dtype=dense_dtype)
    if expert_dtype == "int8":
        packed = [layer.experts.weight_bytes_per_expert for _, layer in moe_layers(model)]
        mbytes = replace(mbytes, expert_bytes_by_layer=packed)
    if dense_dtype == "int8":
        mbytes = replace(mbytes, static_bytes=_static_bytes_after_int8_dense(model, mbytes))
    try:
        yield (_ActivepathTap(model),
               f"activepath backend={backend} expert_dtype={expert_dtype} dense_dtype={dense_dtype} (collect_stats on)",
               mbytes)  # fmt: skip
    finally:
        # Undo everything optimize did, so the next impl runs the untouched model.
        for name, block in blocks:
            model.set_submodule(name, block)
        for parent, name, child in linears:
            setattr(parent, name, child)
        unpatch_linears(model)


def _static_bytes_after_int8_dense(model: nn.Module, mbytes: ModelBytes) -> int:
    """``static_bytes`` once the dense projections are int8: each one reads its int8 values
    plus fp32 scales and bias instead of its float weight and bias."""
    before = after = 0
    for module in model.modules():
        if isinstance(module, Int8Linear):
            n, k = module.out_features, module.in_features
            bias = 0 if module.bias is None else 4 * n
            before += n * k * torch.finfo(module._dtype).bits // 8 + bias
            after += n * k + 4 * n + bias
    return mbytes.static_bytes - before + after


@torch.inference_mode()
def generate_once(
    model: nn.Module, prompt_BP: torch.Tensor, new: int, tap: object, clock: Clock, meter: EnergyMeter,
    mbytes: ModelBytes, trace: Trace, bar: object | None = None,
) -> None:
    """Greedy-generate ``new`` tokens from ``prompt_BP`` (prefill, then ``new - 1`` timed decode
    steps), appending times, bytes per step, energy, routing counts and the ids to ``trace``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    meter.start()
    start = clock.now()
    logits = model(input_ids=prompt_BP, cache=cache, use_cache=True, logits_to_keep=1).logits
    next_B1 = logits[:, -1].argmax(-1, keepdim=True)
    trace.ttft_s.append(clock.now() - start)
    prefill = meter.stop()
    _accumulate(trace, tap.counts())  # type: ignore[attr-defined]
    ids = [next_B1]
    meter.start()
    for _ in range(new - 1):
        start = clock.now()
        logits = model(input_ids=next_B1, cache=cache, use_cache=True).logits
        next_B1 = logits[:, -1].argmax(-1, keepdim=True)
        trace.step_s.append(clock.now() - start)
        counts = tap.counts()  # type: ignore[attr-defined]
        _accumulate(trace, counts)
        trace.step_bytes.append(_step_bytes(mbytes, counts, cache, trace))
        ids.append(next_B1)
        if bar is not None:
            bar.update()  # type: ignore[attr-defined]
    decode = meter.stop()
    if bar is not None:
        bar.update()  # type: ignore[attr-defined]
    trace.ids.append(torch.cat(ids, dim=1).cpu())
    trace.prefill_j.append(prefill.joules if prefill.joules is not None else float("nan"))
    trace.decode_j.append(decode.joules if decode.joules is not None else float("nan"))
    trace.energy_method, trace.energy_estimated = decode.method, decode.estimated


def _accumulate(trace: Trace, counts: list[torch.Tensor]) -> None:
    if trace.counts is None:
        trace.counts = [c.clone() for c in counts]
    else:
        for total, c in zip(trace.counts, counts):
            total += c


def _step_bytes(mbytes: ModelBytes, counts: list[torch.Tensor], cache: object, trace: Trace) -> int:
    experts = sum(distinct_experts(c) * b for c, b in zip(counts, mbytes.expert_bytes_by_layer))
    kv = _kv_bytes(cache)
    if kv is None:
        trace.kv_measured = False
    return mbytes.static_bytes + experts + (kv or 0)


def _kv_bytes(cache: object) -> int | None:
    """Bytes held in the KV cache (a decode step reads all of it), None if unreadable."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    total = 0
    for layer in layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
