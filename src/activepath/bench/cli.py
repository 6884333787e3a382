"""``activepath bench layer | generate | all``: wiring from the command line to the benches.

Every run measures the roofline first (same process, same threads), runs the bench, writes
``PREFIX.json`` and ``PREFIX.md`` (and PNGs with ``--plot``) and prints the summary."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shlex
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BUSY_LOAD = 0.5


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="measure sparse MoE inference against the measured roofline")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    layer = kinds.add_parser("layer", help="one MoE layer, implementations side by side")
    _common_options(layer)
    _layer_options(layer, impl_flag="--impl")
    layer.set_defaults(handler=lambda args: _run(args, "layer", layer))
    generate = kinds.add_parser("generate", help="end-to-end greedy generation, implementations side by side")
    _common_options(generate)
    generate.add_argument("--model", help="checkpoint directory or embedded model name (instead of --shape)")
    _generate_options(generate, impl_flag="--impl")
    generate.set_defaults(handler=lambda args: _run(args, "generate", generate))
    both = kinds.add_parser("all", help="layer bench, then generate bench, one report")
    _common_options(both)
    _layer_options(both, impl_flag="--layer-impl")
    _generate_options(both, impl_flag="--generate-impl")
    both.set_defaults(handler=lambda args: _run(args, "all", both))


def _common_options(p: argparse.ArgumentParser) -> None:
    from activepath.bench.shapes import SHAPES

    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="model shape preset (default: tiny)")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="grouped", help="activepath experts backend")
    p.add_argument("--out", help="output prefix for PREFIX.json / PREFIX.md (default bench_results/KIND_SHAPE_DTYPE)")
    p.add_argument("--plot", action="store_true", help="also write PNG charts (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--llc-mib", type=float, help="last-level cache size, if sysfs does not tell it")
    p.add_argument("--no-roofline", action="store_true", help="skip the roofline measurement (figures say n/m)")
    p.add_argument("--copy-mib", type=int, default=1024, help="roofline copy size (default 1024 MiB)")
    p.add_argument("--gemm-n", type=int, default=4096, help="roofline GEMM size n (n×n @ n×n, default 4096)")
    p.add_argument("--roofline-repeats", type=int, default=3)


def _layer_options(p: argparse.ArgumentParser, impl_flag: str) -> None:
    p.add_argument("--tokens", default="1,8,64,512", help="comma-separated tokens per call")
    p.add_argument(impl_flag, dest="layer_impl", default="activepath,hf-eager,hf-grouped_mm,dense",
                   help="comma-separated: activepath (--backend), activepath:BACKEND (any experts backend, e.g. "
                        "activepath:triton), hf-eager, hf-grouped_mm, hf-batched_mm, dense")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls per row, excluded")
    p.add_argument("--iters", type=int, default=20, help="most timed calls per row")
    p.add_argument("--min-iters", type=int, default=3, help="fewest timed calls per row")
    p.add_argument("--row-budget-s", type=float, default=15.0, help="stop timing a row after this many seconds")
    p.add_argument("--inputs", type=int, default=16, help="distinct rotating inputs per token count")
    p.add_argument("--copies", type=int, help="layer copies to cycle through (default: enough to exceed 2×LLC)")
    p.add_argument("--max-weights-gib", type=float, default=8.0, help="cap on the copies' expert weights")


def _generate_options(p: argparse.ArgumentParser, impl_flag: str) -> None:
    p.add_argument("--layers", type=int, default=4, help="decoder layers to build from --shape (default 4)")
    p.add_argument("--vocab", type=int, help="vocabulary size (default: the shape's published one)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new", type=int, default=32, help="new tokens (1 from prefill + decode steps)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="timed generations per impl (distinct prompts)")
    p.add_argument(impl_flag, dest="generate_impl", default="activepath,hf",
                   help="comma-separated: activepath, hf (transformers default), hf-eager, hf-grouped_mm")
    p.add_argument("--watts-per-core", type=float, default=10.0,
                   help="CPU energy estimate: watts per busy core (assumption, default 10)")
    p.add_argument("--no-breakdown", action="store_true",
                   help="skip the per-component time breakdown (an instrumented generation after each timed one)")


def _run(args: argparse.Namespace, kind: str, parser: argparse.ArgumentParser) -> int:
    from activepath.bench.machine import environment
    from activepath.bench.report import bench_document, render_markdown, write_reports

    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    dtype = _DTYPES[args.dtype]
    env = environment(args.device, None if args.llc_mib is None else int(args.llc_mib * 2**20))
    allocator = getattr(args, "allocator", None)  # set by the activepath command, absent when called otherwise
    env["allocator"] = "unknown (not run by the activepath command)" if allocator is None else allocator.describe()
    roofline = _roofline(args, dtype, env)
    layer = _layer(args, dtype, env, roofline) if kind in ("layer", "all") else None
    gc.collect()
    generate = _generate(args, dtype, roofline) if kind in ("generate", "all") else None
    env["load_avg_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    env["bandwidth_GBps_at_end"] = _bandwidth_at_end(roofline, args.device)
    doc = bench_document(kind=kind, command=canonical_command(args, parser, kind), environment=env,
                         roofline=roofline, layer=layer, generate=generate)
    doc["notes"] = notes(doc)
    prefix = Path(args.out) if args.out else Path("bench_results") / f"{kind}_{_label(args)}_{args.dtype}"
    paths = write_reports(doc, prefix)
    if args.plot:
        from activepath.bench.plots import write_plots

        paths += write_plots(doc, prefix)
    print(render_markdown(doc))
    print("wrote: " + ", ".join(str(p) for p in paths))
    return 0


def _roofline(args: argparse.Namespace, dtype: torch.dtype, env: dict[str, Any]) -> object | None:
    from activepath.bench.roofline import RooflineConfig, measure_roofline

    if args.no_roofline:
        return None
    config = RooflineConfig(copy_bytes=args.copy_mib << 20, gemm_n=args.gemm_n, repeats=args.roofline_repeats)
    return measure_roofline(config, dtype, args.device, env["llc_bytes"])  # type: ignore[arg-type]


def _bandwidth_at_end(roofline: Any, device: str) -> float | None:
    from activepath.bench.roofline import remeasure_bandwidth

    return None if roofline is None else remeasure_bandwidth(roofline, device)


def _layer(args: argparse.Namespace, dtype: torch.dtype, env: dict[str, Any], roofline: Any) -> object:
    from activepath.bench.layer_bench import LayerBenchConfig, run_layer_bench
    from activepath.bench.shapes import get_shape
    from activepath.bench.timing import TimingPlan

    config = LayerBenchConfig(
        tokens=_ints(args.tokens, "--tokens"), impls=_names(args.layer_impl),
        timing=TimingPlan(warmup=args.warmup, iters=args.iters, min_iters=min(args.min_iters, args.iters),
                          budget_s=args.row_budget_s),
        inputs=args.inputs, copies=args.copies, max_weights_bytes=int(args.max_weights_gib * 2**30),
        backend=args.backend, seed=args.seed,
    )
    return run_layer_bench(get_shape(args.shape), dtype, config, roofline, llc=env["llc_bytes"],  # type: ignore[arg-type]
                           device=args.device, progress=not args.no_progress)


def _generate(args: argparse.Namespace, dtype: torch.dtype, roofline: Any) -> object:
    from activepath.bench.generate_bench import GenerateConfig, run_generate_bench

    config = GenerateConfig(prompt=args.prompt, new=args.new, batch=args.batch, impls=_names(args.generate_impl),
                            repeats=args.repeats, watts_per_core=args.watts_per_core, backend=args.backend,
                            seed=args.seed, breakdown=not args.no_breakdown)
    model, label = _load_model(args, dtype)
    try:
        return run_generate_bench(model, label, config, roofline, device=args.device, progress=not args.no_progress)
    finally:
        del model
        gc.collect()


def _load_model(args: argparse.Namespace, dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    from activepath.bench.build import build_model
    from activepath.bench.shapes import get_shape, hf_config

    if getattr(args, "model", None):
        from transformers import AutoModelForCausalLM

        from activepath.models import embedded_path

        directory = embedded_path(args.model) or Path(args.model)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, use_safetensors=True)
        return model.to(torch.device(args.device)).eval(), str(args.model)
    shape = get_shape(args.shape)
    config = hf_config(shape, layers=args.layers, vocab=args.vocab)
    model = build_model(config, dtype=dtype, seed=args.seed, device=args.device)
    return model, f"{shape.name} × {args.layers} layers, vocab {config.vocab_size} (random weights)"


def _label(args: argparse.Namespace) -> str:
    if getattr(args, "model", None):
        return Path(args.model).name
    return f"{args.shape}_{args.layers}layers" if hasattr(args, "layers") else args.shape


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise SystemExit(f"{flag} must be comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def canonical_command(args: argparse.Namespace, parser: argparse.ArgumentParser, kind: str) -> str:
    """The exact command, every option spelled out (defaults included), to rerun this."""
    words = ["activepath"] + (["--malloc", args.malloc] if getattr(args, "malloc", "tuned") != "tuned" else [])
    words += ["bench", kind]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, None)
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            words += [flag] if value else []
        elif value is not None:
            words += [flag, str(value)]
    return shlex.join(words)


# Re-measured bandwidth further than this from the start value gets a note.
_BANDWIDTH_DRIFT = 0.10


def notes(doc: dict[str, Any]) -> list[str]:
    """Plain-language caveats a reader must see next to the figures."""
    out: list[str] = []
    env = doc["environment"]
    for when in ("start", "end"):
        load = env.get(f"load_avg_1m_at_{when}")
        # By the end, the 1-minute average includes the bench's own busy threads.
        own = env.get("torch_threads", 0) if when == "end" else 0
        if load is not None and load - own > _BUSY_LOAD:
            out.append(f"machine not idle: 1-min load average {load:.2f} at {when}, beyond the bench's own {own} "
                       "threads (other processes were running); figures may be pessimistic")
    if env.get("llc_bytes") is None:
        out.append("last-level cache size unknown: whether weights were cold is not known (pass --llc-mib)")
    if doc.get("roofline") is None:
        out.append("roofline not measured: S-MBU, S-MFU and % of roofline are n/m")
    elif doc["roofline"].get("copy_exceeds_llc") is False:
        out.append("roofline copy fits in the last-level cache: bandwidth is cache bandwidth; raise --copy-mib")
    start, end = (doc.get("roofline") or {}).get("bandwidth_GBps"), env.get("bandwidth_GBps_at_end")
    if start and end and abs(end - start) > _BANDWIDTH_DRIFT * start:
        out.append(f"memory bandwidth drifted during the run: {start:.1f} GB/s at the start, {end:.1f} GB/s at the end "
                   "(shared host?); the % of roofline figures use the start value")
    out += _layer_notes(doc.get("layer")) + _generate_notes(doc.get("generate"))
    return out


def _layer_notes(layer: dict[str, Any] | None) -> list[str]:
    if not layer:
        return []
    out = []
    if layer["cold_weights"] is False:
        out.append("layer: the working set fits in the last-level cache: these are cache-resident figures, not "
                   "headline numbers")
    if any(r["routing_overhead_ratio"] is None for r in layer["rows"]):
        out.append("layer: routing overhead is not measured for hf-* (transformers' blocks have no stage timers)")
    small = min(r["timing"]["n"] for r in layer["rows"])
    if small < 20:
        out.append(f"layer: some rows have only {small} timed calls: their p95 is close to their max")
    return out


def _generate_notes(gen: dict[str, Any] | None) -> list[str]:
    if not gen:
        return []
    out = []
    rows = gen["rows"]
    if any(r["energy_estimated"] for r in rows):
        out.append(f"generate: energy is ESTIMATED, not measured: {rows[0]['energy_method']}")
    if any(r["energy_decode_J_per_token"] is None for r in rows):
        out.append("generate: energy not measured for some impls")
    if any(r["same_tokens_as_first_impl"] is False for r in rows):
        out.append("generate: some impls generated different tokens than the first (numerics differ)")
    if any(not r["kv_bytes_measured"] for r in rows):
        out.append("generate: KV cache bytes could not be read; decode bytes exclude them")
    bw = gen.get("prompt_bandwidth_GBps") or []
    if bw and max(bw) > (1 + _BANDWIDTH_DRIFT) * min(bw):
        out.append(f"generate: copy bandwidth differed between prompts ({min(bw):.1f}-{max(bw):.1f} GB/s): overall "
                   "p95/p50 and % of roofline mix those states; see the per-prompt table")  # fmt: skip
    n = min(r["decode"]["n"] for r in rows)
    if n < 100:
        out.append(f"generate: {n} decode samples per impl: p99 is close to the max")
    return out
