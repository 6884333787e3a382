# schedule → [execute] → update
"""The runner: owns the model and a KV cache reserved up front, and executes a
``StepPlan`` as ONE packed forward (every decode token and every prefill token of the
step in a single row of T tokens), so each expert's weights are read once per step for
all the requests routed to it.

transformers' own attention module projects q/k/v and applies RoPE (with per-token
positions); our cache's ``update`` writes each token's k/v into its slot, and a
registered attention function attends each sequence to its own slot only.

``exact=True`` makes a sequence's tokens independent of what else is in the batch: dense
projections, the router and the experts run in the native kernels (a fixed summation order
per output) where they apply, else one row at a time (1-row kernels), and attention runs
one sequence at a time over its own length (rounded up to ``attention_bucket`` and masked, so
the number of attention shapes stays bounded).

Shape legend: T packed tokens in the step, B decode rows, S slots, L layers,
Hq query heads, Hkv key/value heads, D head dim, W attended width, V vocab.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from activepath.kernels import cpu as native
from activepath.api import moe_layers
from activepath.moe.layer import SparseMoE
from activepath.moe.routing import RoutingResult, router_logits_batch_invariant
from activepath.serving.scheduler import StepPlan

ATTENTION_NAME = "activepath_packed"
# Attended widths (and prefill lengths) round up to a multiple of this. torch's CPU attention
# compiles a oneDNN kernel per (query length, key length) it meets and keeps every one for
# the process's life (bf16/fp16 on AVX-512/AMX: at::native::cpublas' kernel cache has no
# eviction), so a server fed prompts of every length grew its RSS without bound; rounded,
# at most max_len / 64 shapes ever exist (benchmarks/rss_shapes.py).
ATTENTION_BUCKET = 64


@dataclass(frozen=True, kw_only=True)
class RunnerConfig:
    """``max_slots`` sequences of up to ``max_len`` tokens each share the KV cache."""

    max_slots: int = 16
    max_len: int = 512
    exact: bool = False
    attention_bucket: int = ATTENTION_BUCKET

    def __post_init__(self) -> None:
        for name in ("max_slots", "max_len", "attention_bucket"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class StepOutput:
    """Greedy next token per request; ``logits_RV`` holds one row per request, decodes
    first then prefills, in plan order (None for an empty step)."""

    next_tokens: dict[str, int]
    num_tokens: int
    step_s: float
    logits_RV: torch.Tensor | None = None


@dataclass(frozen=True)
class PackedBatch:
    """Where each packed token lives: ``slot_T``/``pos_T`` index the cache. Decodes come
    first (one token each, slots ``decode_slots``); then prefills as (slot, first token, length).
    Attention runs over widths rounded up to a multiple of ``bucket``."""

    slot_T: torch.Tensor
    pos_T: torch.Tensor
    decode_slots: tuple[int, ...]
    decode_pos: tuple[int, ...]
    prefills: tuple[tuple[int, int, int], ...]
    exact: bool
    bucket: int = ATTENTION_BUCKET


class SlotKVCache:
    """Keys and values for ``max_slots`` sequences, [L, S, Hkv, max_len, D], allocated once."""

    def __init__(self, num_layers: int, config: RunnerConfig, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, config.max_slots, kv_heads, config.max_len, head_dim)
        self.k_LSHND = torch.zeros(shape, dtype=dtype, device=device)
        self.v_LSHND = torch.zeros(shape, dtype=dtype, device=device)
        self.batch: PackedBatch | None = None

    @property
    def nbytes(self) -> int:
        return 2 * self.k_LSHND.numel() * self.k_LSHND.element_size()

    def move(self, src: int, dst: int) -> None:
        self.k_LSHND[:, dst] = self.k_LSHND[:, src]
        self.v_LSHND[:, dst] = self.v_LSHND[:, src]

    def update(self, k_1HTD: torch.Tensor, v_1HTD: torch.Tensor, layer_idx: int,
               **_: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's new keys/values into their slots (called by transformers)."""
        assert self.batch is not None
        self.k_LSHND[layer_idx, self.batch.slot_T, :, self.batch.pos_T] = k_1HTD[0].transpose(0, 1)
        self.v_LSHND[layer_idx, self.batch.slot_T, :, self.batch.pos_T] = v_1HTD[0].transpose(0, 1)
        return k_1HTD, v_1HTD

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def packed_attention(module: nn.Module, q_1HTD: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     attention_mask: torch.Tensor | None, *, scaling: float | None = None,
                     activepath_cache: SlotKVCache, **_: object) -> tuple[torch.Tensor, None]:
    """Each sequence attends to its own slot: decodes together (masked to their lengths),
    or one at a time when exact; each prefill causally over its own prompt."""
    batch = activepath_cache.batch
    assert batch is not None
    k_SHND = activepath_cache.k_LSHND[module.layer_idx]
    v_SHND = activepath_cache.v_LSHND[module.layer_idx]
    out_1THD = q_1HTD.new_empty(1, q_1HTD.shape[2], q_1HTD.shape[1], q_1HTD.shape[3])
    n = len(batch.decode_slots)
    if n:
        q_BH1D = q_1HTD[0, :, :n].transpose(0, 1).unsqueeze(2)
        attend = _decode_rowwise if batch.exact else _decode_batched
        out_1THD[0, :n] = attend(q_BH1D, k_SHND, v_SHND, batch, scaling)
    for slot, start, length in batch.prefills:
        out_1THD[0, start : start + length] = _prefill(q_1HTD[:, :, start : start + length], k_SHND, v_SHND,
                                                       slot, batch.bucket, scaling)
    return out_1THD, None


def bucketed_width(length: int, bucket: int, limit: int) -> int:
    """``length`` rounded up to a multiple of ``bucket``, at most ``limit`` (the cache length)."""
    return min(limit, -(-length // bucket) * bucket)


def _prefill(q_1HPD: torch.Tensor, k_SHND: torch.Tensor, v_SHND: torch.Tensor, slot: int, bucket: int,
             scaling: float | None) -> torch.Tensor:
    """Causal attention of one prompt over its own slot, returned as [P, Hq, D]. Run at the
    bucketed width W: the padded queries are zeros and their rows are dropped; a real query
    at position p < P sees keys 0..p only (causal), so the slot's stale keys past P never
    reach it."""
    length = q_1HPD.shape[2]
    width = bucketed_width(length, bucket, k_SHND.shape[2])
    if width != length:
        q_pad_1HWD = q_1HPD.new_zeros(1, q_1HPD.shape[1], width, q_1HPD.shape[3])
        q_pad_1HWD[:, :, :length] = q_1HPD
        q_1HPD = q_pad_1HWD
    keys, values = k_SHND[slot : slot + 1, :, :width], v_SHND[slot : slot + 1, :, :width]
    o_1HWD = F.scaled_dot_product_attention(q_1HPD, keys, values, is_causal=True, scale=scaling, enable_gqa=True)
    return o_1HWD[0, :, :length].transpose(0, 1)


def _decode_batched(q_BH1D: torch.Tensor, k_SHND: torch.Tensor, v_SHND: torch.Tensor,
                    batch: PackedBatch, scaling: float | None) -> torch.Tensor:
    slots = batch.decode_slots
    width = bucketed_width(max(batch.decode_pos) + 1, batch.bucket, k_SHND.shape[2])
    if slots == tuple(range(slots[0], slots[0] + len(slots))):  # compact: views, no copy
        keys, values = k_SHND[slots[0] : slots[0] + len(slots), :, :width], v_SHND[slots[0] : slots[0] + len(slots), :, :width]
    else:
        index = torch.tensor(slots, device=k_SHND.device)
        keys, values = k_SHND[index, :, :width], v_SHND[index, :, :width]
    pos_B = torch.tensor(batch.decode_pos, device=k_SHND.device)
    mask_B11W = (torch.arange(width, device=k_SHND.device) <= pos_B[:, None]).view(len(slots), 1, 1, width)
    o_BH1D = F.scaled_dot_product_attention(q_BH1D, keys, values, attn_mask=mask_B11W, scale=scaling,
                                            enable_gqa=True)
    return o_BH1D[:, :, 0]


def _decode_rowwise(q_BH1D: torch.Tensor, k_SHND: torch.Tensor, v_SHND: torch.Tensor,
                    batch: PackedBatch, scaling: float | None) -> torch.Tensor:
    rows = []
    for b, (slot, pos) in enumerate(zip(batch.decode_slots, batch.decode_pos)):
        width = bucketed_width(pos + 1, batch.bucket, k_SHND.shape[2])
        keys, values = k_SHND[slot : slot + 1, :, :width], v_SHND[slot : slot + 1, :, :width]
        mask_111W = (torch.arange(width, device=k_SHND.device) <= pos).view(1, 1, 1, width)
        rows.append(F.scaled_dot_product_attention(q_BH1D[b : b + 1], keys, values, attn_mask=mask_111W,
                                                   scale=scaling, enable_gqa=True))
    return torch.cat(rows)[:, :, 0]


AttentionInterface.register(ATTENTION_NAME, packed_attention)


class RowwiseLinear(nn.Module):
    """``nn.Linear`` with batch-invariant bits: the native kernel (fixed summation order
    per output) where it applies, else BLAS one row at a time (1-row kernels).
    Shares the wrapped layer's parameters."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_MK = x.reshape(-1, x.shape[-1])
        if x_MK.shape[0] and native.supports(x_MK, self.linear.weight):
            y_MN = native.linear(x_MK.contiguous(), self.linear.weight, self.linear.bias)
            return y_MN.view(*x.shape[:-1], y_MN.shape[-1])
        rows = [F.linear(x_MK[m : m + 1], self.linear.weight, self.linear.bias) for m in range(x_MK.shape[0])]
        y_MN = torch.cat(rows) if rows else F.linear(x_MK, self.linear.weight, self.linear.bias)
        return y_MN.view(*x.shape[:-1], y_MN.shape[-1])


class RowwiseRouter(nn.Module):
    """Routes one token at a time, so router logits never depend on the batch."""

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.inner = router
        self.config = router.config

    @property
    def hidden_size(self) -> int:
        return self.inner.hidden_size

    def forward(self, x_TH: torch.Tensor) -> RoutingResult:
        if router_logits_batch_invariant(self.inner.config, x_TH, self.inner.weight):
            return self.inner(x_TH)
        parts = [self.inner(x_TH[t : t + 1]) for t in range(x_TH.shape[0])] or [self.inner(x_TH)]
        return RoutingResult(*(torch.cat(tensors) for tensors in zip(*(
            (p.topk_ids_TK, p.topk_weights_TK, p.logits_TE) for p in parts))))


def make_exact(model: nn.Module) -> None:
    """Transform ``model`` in place so every row's result is independent of the others."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, RowwiseLinear(child))
    for _, layer in moe_layers(model):
        if not isinstance(layer.router, RowwiseRouter):
            layer.router = RowwiseRouter(layer.router)  # type: ignore[assignment]
        layer.backend = "native"  # batch-invariant; falls back to ``rowwise`` off fp32


class ModelRunner:
    """Executes step plans on a transformers decoder-only model (loaded by ``activepath.load``).

    The KV cache for ``config.max_slots`` × ``config.max_len`` tokens is allocated here,
    once; a step only writes into it. The model is changed in place (attention
    implementation; with ``exact``, row-wise dense layers): the runner owns it.
    """

    def __init__(self, model: nn.Module, config: RunnerConfig) -> None:
        text_config = model.config.get_text_config()
        self.config = config
        self.model = model.eval()
        if config.exact:
            make_exact(model)
        model.set_attn_implementation(ATTENTION_NAME)
        param = next(model.parameters())
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        self.cache = SlotKVCache(text_config.num_hidden_layers, config, text_config.num_key_value_heads, head_dim,
                                 param.dtype, param.device)
        self.device = param.device
        # A ready-made 4-D mask makes transformers skip building one; attention ignores it.
        self._no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=param.device)

    def execute(self, plan: StepPlan) -> StepOutput:
        """Apply the plan's slot moves, run its tokens in one forward, return greedy next tokens."""
        start = time.perf_counter()
        for src, dst in plan.moves:
            self.cache.move(src, dst)
        if plan.is_empty:
            return StepOutput({}, 0, time.perf_counter() - start)
        ids_1T, pos_1T, last_R, batch = self._pack(plan)
        self.cache.batch = batch
        try:
            with torch.inference_mode():
                out = self.model(input_ids=ids_1T, position_ids=pos_1T, attention_mask=self._no_mask,
                                 cache=self.cache, use_cache=True, logits_to_keep=last_R,
                                 activepath_cache=self.cache)
        finally:
            self.cache.batch = None
        logits_RV = out.logits[0]
        next_R = logits_RV.argmax(dim=-1).tolist()
        request_ids = [d.request_id for d in plan.decodes] + [p.request_id for p in plan.prefills]
        return StepOutput(dict(zip(request_ids, next_R)), plan.num_tokens, time.perf_counter() - start, logits_RV)

    def _pack(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PackedBatch]:
        ids = [d.token_id for d in plan.decodes]
        pos = [d.position for d in plan.decodes]
        slots = [d.slot for d in plan.decodes]
        last = list(range(len(ids)))
        prefills = []
        for p in plan.prefills:
            prefills.append((p.slot, len(ids), len(p.token_ids)))
            ids.extend(p.token_ids)
            pos.extend(range(len(p.token_ids)))
            slots.extend([p.slot] * len(p.token_ids))
            last.append(len(ids) - 1)
        if max(pos) >= self.config.max_len:
            raise ValueError(f"position {max(pos)} is past the cache length {self.config.max_len}")
        as_long = {"dtype": torch.long, "device": self.device}
        pos_T = torch.tensor(pos, **as_long)
        batch = PackedBatch(torch.tensor(slots, **as_long), pos_T, tuple(d.slot for d in plan.decodes),
                            tuple(d.position for d in plan.decodes), tuple(prefills), self.config.exact,
                            self.config.attention_bucket)
        return torch.tensor([ids], **as_long), pos_T.unsqueeze(0), torch.tensor(last, **as_long), batch
