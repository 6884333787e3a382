"""``activepath demo``: the embedded model, generated with activepath and with plain
transformers side by side — same tokens, how fast, and what the router did."""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from activepath.analysis import routing_stats
from activepath.bench.timing import percentile
from activepath.api import load, moe_layers
from activepath.moe.layer import MoEStats
from activepath.models import embedded_path
from activepath.runtime.process import frozen_gc

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "The json module provides functions to"
_BARS = " ▁▂▃▄▅▆▇█"
_DRIFT_TOKENS = 256  # of each held-out text, for the prose-vs-code routing comparison
# A 1-minute load average above this before the demo starts means other processes share the
# CPUs: the timings are then pessimistic and noisy (the same threshold as `activepath bench`).
BUSY_LOAD = 0.5


@dataclass(frozen=True, kw_only=True)
class Run:
    """One greedy generation: the new token ids and each decode step's wall seconds."""

    ids: list[int]
    prefill_s: float
    step_s: list[float]

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode alone (prefill is reported apart: mixing them made the headline swing with prompt length)."""
        return len(self.step_s) / sum(self.step_s) if self.step_s else float("nan")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the embedded MoE model with and without activepath")
    p.add_argument("--model", default="tiny", help="embedded model name or checkpoint directory (default: tiny)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per implementation (default 3)")
    p.add_argument("--backend", default="grouped", help="activepath experts backend (default grouped)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--plot", nargs="?", const=".", metavar="DIR", help="also write PNGs into DIR (default .)")
    p.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    if args.new_tokens < 1 or args.repeats < 1:
        raise SystemExit("--new-tokens and --repeats must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    directory = _model_dir(args.model)
    load_at_start = os.getloadavg()[0]
    tokenizer, reference, model = _load_quietly(directory, args.backend)
    prompt_1P = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    args.prompt_ids = prompt_1P[0].tolist()
    args.reference_experts = getattr(reference.config, "_experts_implementation", None)
    for m in (reference, model):  # warm-up: first calls allocate and pick kernels
        _greedy(m, prompt_1P, 4)
    stats: list[list[MoEStats]] = []
    runs = {"transformers": [], "activepath": []}
    with _StatsTap(model, stats), frozen_gc():
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            runs["transformers"].append(_greedy(reference, prompt_1P, args.new_tokens))
            runs["activepath"].append(_greedy(model, prompt_1P, args.new_tokens))
    prose_LE, code_LE = _drift_loads(model, tokenizer, directory)
    agree = all(r.ids == runs["transformers"][0].ids for rs in runs.values() for r in rs)
    _print_report(args, model, tokenizer, runs, stats, prose_LE, code_LE, agree)
    if load_at_start > BUSY_LOAD:
        print(f"note: machine not idle (1-min load average {load_at_start:.2f} before the demo started): other "
              "processes share the CPUs, so the timings above are pessimistic and noisy")
    if args.plot is not None:
        for path in _plots(Path(args.plot), runs, stats, prose_LE, code_LE):
            print(f"wrote {path}")
    return 0 if agree else 1


def _model_dir(name: str) -> Path:
    directory = embedded_path(name) or Path(name)
    if not (directory / "config.json").is_file():
        raise SystemExit(f"{name!r} is neither an embedded model nor a checkpoint directory")
    return directory


def _load_quietly(directory: Path, backend: str) -> tuple[object, nn.Module, nn.Module]:
    """Tokenizer, the unmodified transformers model (with transformers' default experts
    implementation, the one its users get: grouped_mm where available) and the activepath one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # loading takes a second; its bars would bury the report
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        model = load(directory, dtype="float32", backend=backend, collect_stats=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return tokenizer, reference, model


@torch.inference_mode()
def _greedy(model: nn.Module, prompt_1P: torch.Tensor, new: int) -> Run:
    start = time.perf_counter()
    out = model(input_ids=prompt_1P, use_cache=True, logits_to_keep=1)
    next_11 = out.logits[:, -1].argmax(-1, keepdim=True)
    prefill_s = time.perf_counter() - start
    ids, step_s = [int(next_11)], []
    for _ in range(new - 1):
        start = time.perf_counter()
        out = model(input_ids=next_11, cache=out.cache, use_cache=True)
        next_11 = out.logits[:, -1].argmax(-1, keepdim=True)
        step_s.append(time.perf_counter() - start)
        ids.append(int(next_11))
    return Run(ids=ids, prefill_s=prefill_s, step_s=step_s)


class _StatsTap:
    """Collects every MoE layer's ``last_stats`` after each call, per layer, while active."""

    def __init__(self, model: nn.Module, into: list[list[MoEStats]]) -> None:
        self._layers = [layer for _, layer in moe_layers(model)]
        self._into = into
        self._handles: list[object] = []

    def __enter__(self) -> _StatsTap:
        self._into[:] = [[] for _ in self._layers]
        for i, layer in enumerate(self._layers):
            hook = lambda mod, inp, out, i=i: self._into[i].append(mod.last_stats)  # noqa: E731
            self._handles.append(layer.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()  # type: ignore[attr-defined]


def _drift_loads(model: nn.Module, tokenizer: object, directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert load [L, E] on the model's held-out prose and code samples (a built-in pair of
    texts when the checkpoint ships none)."""
    loads = []
    for name, fallback in (("prose", _FALLBACK_PROSE), ("code", _FALLBACK_CODE)):
        path = directory / f"eval_{name}.txt"
        text = path.read_text(encoding="utf-8") if path.is_file() else fallback * 8
        ids = tokenizer(text[: 6 * _DRIFT_TOKENS])["input_ids"][:_DRIFT_TOKENS]  # type: ignore[operator]
        loads.append(routing_stats.expert_load(model, torch.tensor([ids])))
    return loads[0], loads[1]


def _print_report(args: argparse.Namespace, model: nn.Module, tokenizer: object, runs: dict[str, list[Run]],
                  stats: list[list[MoEStats]], prose_LE: torch.Tensor, code_LE: torch.Tensor, agree: bool) -> None:
    cfg = model.config
    n_layers, n_experts = len(stats), prose_LE.shape[1]
    print(f"activepath demo — {args.model}: {cfg.model_type}, {n_layers} MoE layers × {n_experts} experts, "
          f"top-{cfg.num_experts_per_tok}, float32, {torch.get_num_threads()} threads")
    text = tokenizer.decode(runs["activepath"][0].ids)  # type: ignore[attr-defined]
    print(f"prompt {args.prompt!r} → {args.new_tokens} greedy tokens: {_one_line(text)!r}")
    _print_speed(runs, args.reference_experts or "default", len(args.prompt_ids))
    verdict = "yes, identical token ids" if agree else "NO — token ids differ"
    print(f"outputs agree: {verdict}")
    print(f"expert utilisation during generation (share of top-k slots; uniform = {100 / n_experts:.1f} %):")
    for i, layer_stats in enumerate(stats):
        counts_E = torch.stack([s.tokens_per_expert_E for s in layer_stats]).sum(0).double()
        load_1E = (counts_E / counts_E.sum()).unsqueeze(0)
        print(f"  layer {i}  {_bars(load_1E[0])}  max/mean {float(routing_stats.max_over_mean(load_1E)):.2f}  "
              f"entropy {float(routing_stats.normalized_entropy(load_1E)):.2f}  used {int((counts_E > 0).sum())}/"
              f"{n_experts}")
    overhead = [s.routing_overhead_ratio for layer_stats in stats for s in layer_stats]
    print(f"routing overhead ratio: {sum(overhead) / len(overhead):.2f} mean, {percentile(overhead, 95):.2f} p95 "
          "((routing + dispatch + combine) / MoE layer time)")
    js = routing_stats.js_divergence(prose_LE, code_LE)
    print(f"drift prose → code: JS {float(js.mean()):.3f} bits mean over layers, max {float(js.max()):.3f} "
          f"(layer {int(js.argmax())}); per layer {' '.join(f'{v:.3f}' for v in js.tolist())}")


def _print_speed(runs: dict[str, list[Run]], reference_impl: str, prompt_tokens: int) -> None:
    """Prefill and decode apart, each with its own median and p95 and its own ratio."""
    names = {"transformers": f"transformers ({reference_impl} experts)", "activepath": "activepath"}
    print(f"{'':34}{'prefill p50 ms':>15}{'p95 ms':>8}{'decode p50 ms':>14}{'p95 ms':>8}{'decode tok/s':>13}")
    prefill_ms, decode_ms = {}, {}
    for name, rs in runs.items():
        prefills = [r.prefill_s for r in rs]
        steps = [s for r in rs for s in r.step_s] or [float("nan")]
        prefill_ms[name], decode_ms[name] = statistics.median(prefills) * 1e3, statistics.median(steps) * 1e3
        print(f"{names[name]:34}{prefill_ms[name]:15.2f}{percentile(prefills, 95) * 1e3:8.2f}{decode_ms[name]:14.2f}"
              f"{percentile(steps, 95) * 1e3:8.2f}{1e3 / decode_ms[name]:13.1f}")
    print(f"speed-up (transformers time / activepath time, medians): decode ×"
          f"{decode_ms['transformers'] / decode_ms['activepath']:.2f}, prefill of {prompt_tokens} tokens ×"
          f"{prefill_ms['transformers'] / prefill_ms['activepath']:.2f}")


def _bars(load_E: torch.Tensor) -> str:
    top = float(load_E.max()) or 1.0
    return "".join(_BARS[round(float(v) / top * (len(_BARS) - 1))] for v in load_E)


def _one_line(text: str, limit: int = 70) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _plots(directory: Path, runs: dict[str, list[Run]], stats: list[list[MoEStats]], prose_LE: torch.Tensor,
           code_LE: torch.Tensor) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from exc
    directory.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
    for ax, load_LE, title in ((axes[0], prose_LE, "prose"), (axes[1], code_LE, "code")):
        im = ax.imshow(load_LE.numpy(), aspect="auto", cmap="viridis", vmin=0)
        ax.set(title=f"expert load on {title}", xlabel="expert", ylabel="MoE layer",
               xticks=range(load_LE.shape[1]), yticks=range(load_LE.shape[0]))
        ax.tick_params(axis="x", labelsize=7)
    fig.colorbar(im, ax=axes, label="share of top-k slots")
    paths = [directory / "demo_expert_load.png"]
    fig.savefig(paths[0], dpi=120, bbox_inches="tight")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, rs in runs.items():
        ax.plot([s * 1e3 for s in rs[-1].step_s], label=name)
    ax.set(xlabel="decode step", ylabel="ms per token", title="per-token latency (last run)")
    ax.legend()
    paths.append(directory / "demo_latency.png")
    fig.savefig(paths[1], dpi=120, bbox_inches="tight")
    plt.close("all")
    return paths


_FALLBACK_PROSE = "The module provides a simple way to read and write files, and explains how errors are reported. "
_FALLBACK_CODE = "def read(path):\n    with open(path) as f:\n        return [line.rstrip() for line in f]\n"
