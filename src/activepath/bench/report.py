# (layer | generate) bench → [report]
"""Bench reports: one JSON document (machine-readable: every figure, the environment,
versions and the exact command) and a Markdown summary rendered from that same document,
so the two can never disagree."""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA = "activepath.bench/1"


def to_jsonable(obj: Any) -> Any:
    """Dataclasses → dicts (fields and public properties, recursively), dict keys → str."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        props = [n for n, v in vars(type(obj)).items() if isinstance(v, property) and not n.startswith("_")]
        return out | {n: to_jsonable(getattr(obj, n)) for n in props}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def bench_document(
    *, kind: str, command: str, environment: dict[str, object], roofline: object | None,
    layer: object | None = None, generate: object | None = None, notes: list[str] | None = None,
) -> dict[str, Any]:
    """The JSON document of one bench run."""
    return {
        "schema": SCHEMA,
        "kind": kind,
        "command": command,
        "environment": environment,
        "roofline": to_jsonable(roofline),
        "layer": to_jsonable(layer),
        "generate": to_jsonable(generate),
        "notes": list(notes or []),
    }


def write_reports(doc: dict[str, Any], prefix: Path) -> list[Path]:
    """Write ``prefix.json`` and ``prefix.md``; return their paths."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md")
    json_path.write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n")
    md_path.write_text(render_markdown(doc))
    log.info("wrote %s and %s", json_path, md_path)
    return [json_path, md_path]


def render_markdown(doc: dict[str, Any]) -> str:
    lines = [f"# activepath bench {doc['kind']}", "", "Produced by:", "", "```", doc["command"], "```", ""]
    lines += _environment_md(doc["environment"])
    lines += _roofline_md(doc.get("roofline"), doc["environment"].get("bandwidth_GBps_at_end"))
    if doc.get("layer"):
        lines += _layer_md(doc["layer"])
    if doc.get("generate"):
        lines += _generate_md(doc["generate"])
    if doc.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    return "\n".join(lines)


def _environment_md(env: dict[str, Any]) -> list[str]:
    v = env.get("versions", {})
    llc = env.get("llc_bytes")
    return [
        "## Machine", "",
        f"- {env.get('timestamp')} · {env.get('cpu')} · {env.get('cpu_count')} CPUs · torch threads "
        f"{env.get('torch_threads')} · device {env.get('device')}" + (f" ({env['gpu']})" if env.get("gpu") else ""),
        f"- last-level cache: {_mib(llc)} ({env.get('llc_source')}) · load average (1 min) at start: "
        f"{_num(env.get('load_avg_1m_at_start'), 2)}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
    ] + ([f"- allocator: {env['allocator']}"] if env.get("allocator") else []) + [""]


def _roofline_md(r: dict[str, Any] | None, end_GBps: float | None = None) -> list[str]:
    if not r:
        return ["## Roofline", "", "Not measured (--no-roofline): S-MBU, S-MFU and % of roofline are absent.", ""]
    warn = "" if r.get("copy_exceeds_llc") is not False else " **(copy fits in the LLC: cache, not memory, bandwidth)**"
    again = "" if end_GBps is None else f" (re-measured at the end of the run: {end_GBps:.1f} GB/s)"
    return [
        "## Roofline (measured in this run)", "",
        f"- memory bandwidth: **{r['bandwidth_GBps']:.1f} GB/s**{warn}{again}",
        f"- GEMM peak ({r['dtype']}): **{r['gemm_GFLOPs']:.1f} GFLOP/s**",
        f"- method: {r['method']}", "",
    ]


def _layer_md(layer: dict[str, Any]) -> list[str]:
    g = layer["geometry"]
    cold = {True: "yes", False: "**no: figures are cache-resident, not headline numbers**", None: "unknown (LLC size unknown)"}
    lines = [
        f"## Layer: {layer['shape']}, {layer['dtype']}", "",
        f"H {g['hidden']}, I {g['inter']}, E {g['num_experts']}, top-{g['top_k']}; one expert {_mib(g['expert_bytes'])}, "
        f"all experts {_mib(g['all_experts_bytes'])}; {layer['copies']} copies "
        f"({_mib(layer['weights_bytes_all_copies'])} of expert weights). Weights cold on every call: "
        f"{cold[layer['cold_weights']]}.", "",
        f"Method: {layer['method']}", "",
        "| impl | T | median ms | p95 ms | n | experts touched | MB read | GB/s | S-MBU % | GFLOP/s | S-MFU % "
        "| routing overhead | load max/mean | idle experts | max abs diff vs first impl | experts path |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in layer["rows"]:
        load = layer["load_by_tokens"][str(row["tokens"])]
        t = row["timing"]
        lines.append(
            f"| {row['impl']} | {row['tokens']} | {t['median_s'] * 1e3:.3f} | {t['p95_s'] * 1e3:.3f} | {t['n']} "
            f"| {row['distinct_experts_mean']:.1f} | {row['weight_bytes_mean'] / 1e6:.1f} | {row['achieved_GBps']:.2f} "
            f"| {_num(row['smbu_pct'], 1)} | {row['achieved_GFLOPs']:.2f} | {_num(row['smfu_pct'], 1)} "
            f"| {_num(row['routing_overhead_ratio'], 3)} | {load['max_over_mean']:.2f} | {load['idle_experts']} "
            f"| {_sci(row['max_abs_diff_vs_first_impl'])} | {row.get('experts_path') or 'n/m'} |"
        )
    return lines + ["", "Routing overhead = (routing + dispatch + combine) / layer time; n/m = not measured.", ""]


def _generate_md(gen: dict[str, Any]) -> list[str]:
    mb = gen["model_bytes"]
    lines = [
        f"## Generate: {gen['model']}, {gen['dtype']}, {gen['num_layers']} layers ({gen['moe_layers']} MoE)", "",
        f"Parameters {_mib(mb['total_param_bytes'])}; read by every decode step besides routed experts: "
        f"{_mib(mb['static_bytes'])}.", "",
        f"Method: {gen['method']}", "",
        "| impl | experts | TTFT ms | prefill tok/s | decode p50 ms | p95 ms | p99 ms | n | decode tok/s "
        "| MB/step | GB/s | % roofline | J/token decode | J/token prefill | same tokens |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in gen["rows"]:
        d = row["decode"]
        est = " (est.)" if row["energy_estimated"] else ""
        lines.append(
            f"| {row['impl']} | {row['experts_implementation']} | {row['ttft']['median_s'] * 1e3:.1f} "
            f"| {row['prefill_tok_s']:.1f} | {d['median_s'] * 1e3:.2f} | {d['p95_s'] * 1e3:.2f} "
            f"| {d['p99_s'] * 1e3:.2f} | {d['n']} | {row['decode_tok_s']:.2f} "
            f"| {row['decode_bytes_per_step_mean'] / 1e6:.1f} | {row['decode_achieved_GBps']:.2f} "
            f"| {_num(row['decode_roofline_pct'], 1)} | {_num(row['energy_decode_J_per_token'], 3)}{est} "
            f"| {_num(row['energy_prefill_J_per_token'], 4)}{est} | {_same(row['same_tokens_as_first_impl'])} |"
        )
    lines += ["", f"Energy: {gen['rows'][0]['energy_method']}.", ""]
    return lines + _by_prompt_md(gen) + _breakdown_md(gen) + _utilisation_md(gen["rows"][0])


def _by_prompt_md(gen: dict[str, Any]) -> list[str]:
    """Decode per prompt: median, p95/p50 within the prompt, and % of the bandwidth measured
    just before that prompt's round (the host's bandwidth drifts between prompts)."""
    bw = gen.get("prompt_bandwidth_GBps")
    rows = [r for r in gen["rows"] if r.get("decode_median_ms_by_prompt")]
    if not rows:
        return []
    prompts = len(rows[0]["decode_median_ms_by_prompt"])
    head = " | ".join(f"prompt {i + 1}" for i in range(prompts))
    lines = ["### Decode per prompt", "",
             "Copy bandwidth measured before each prompt's round: "
             + (", ".join(f"{b:.1f}" for b in bw) + " GB/s." if bw else "not measured."), "",
             f"| impl | figure | {head} | median over prompts |", "|---|---|" + "---:|" * (prompts + 1)]  # fmt: skip
    for row in rows:
        figures = [("median ms", row["decode_median_ms_by_prompt"], 2),
                   ("p95 / p50", row["decode_p95_over_p50_by_prompt"], 2),
                   ("% of that prompt's roofline", row.get("decode_roofline_pct_by_prompt"), 1)]  # fmt: skip
        for name, values, digits in figures:
            if values:
                cells = " | ".join(f"{v:.{digits}f}" for v in values)
                lines.append(f"| {row['impl']} | {name} | {cells} | {statistics.median(values):.{digits}f} |")
    return lines + [""]


def _breakdown_md(gen: dict[str, Any]) -> list[str]:
    """Where the time goes, per impl: ms per prefill forward and per decode step by component,
    with its share of the total. Components no impl spent time in are left out."""
    rows = [r for r in gen["rows"] if r.get("breakdown")]
    if not rows:
        return []
    components = [c for c in rows[0]["breakdown"]["prefill"]["ms"]
                  if any(abs(r["breakdown"][phase]["ms"][c]) >= 0.005 for r in rows for phase in ("prefill", "decode"))]
    head = " | ".join(f"{r['impl']} prefill ms | {r['impl']} decode ms/step" for r in rows)
    # With several impls: the last one's time over the first's, per component (the first is
    # activepath and the last transformers in the usual runs): where the speed-up comes from.
    first, last = rows[0], rows[-1]
    ratio = len(rows) > 1
    if ratio:
        head += f" | {last['impl']} / {first['impl']} prefill | {last['impl']} / {first['impl']} decode"
    lines = ["### Where the time goes", "",
             "Instrumented generations, one per impl after each timed one on the same prompt (forward hooks; "
             "their totals are not the timed figures above), averaged per forward. activepath's MoE stages come from its layers' stage clocks; a transformers "
             "block's experts module dispatches, computes and combines in one call, so those fall under "
             "experts. rest = the forward's wall time minus the timed components (embedding, norms, residual "
             "adds, the decoder loop, the hooks themselves).", "",
             f"| component | {head} |", "|---|" + "---:|---:|" * (len(rows) + ratio)]  # fmt: skip

    def times(row: dict[str, Any], phase: str, component: str) -> float:
        """ms of ``component`` in ``phase`` ("": the total)."""
        figures = row["breakdown"][phase]
        return figures["ms"][component] if component else figures["total_ms"]

    def cell(row: dict[str, Any], phase: str, component: str) -> str:
        ms, total = times(row, phase, component), times(row, phase, "")
        return f"{ms:.2f} ({100 * ms / total:.0f} %)" if component and total > 0 else f"{ms:.2f}"

    def speedup(phase: str, component: str) -> str:
        ours, theirs = times(first, phase, component), times(last, phase, component)
        return f"{theirs / ours:.2f}×" if ours >= 0.005 and theirs >= 0.005 else "—"

    for component in [*components, ""]:
        cells = " | ".join(f"{cell(r, 'prefill', component)} | {cell(r, 'decode', component)}" for r in rows)
        if ratio:
            cells += f" | {speedup('prefill', component)} | {speedup('decode', component)}"
        lines.append(f"| {component or '**total**'} | {cells} |")
    return lines + [""]


def _utilisation_md(row: dict[str, Any]) -> list[str]:
    lines = [f"### Expert utilisation per layer ({row['impl']} run, prefill + decode)", "",
             "| MoE layer | active experts | idle experts | max tokens | mean tokens | max/mean |",
             "|---:|---:|---:|---:|---:|---:|"]
    for i, load in enumerate(row["load_by_layer"]):
        lines.append(f"| {i} | {load['active_experts']} | {load['idle_experts']} | {load['max_tokens']} "
                     f"| {load['mean_tokens']:.2f} | {load['max_over_mean']:.2f} |")
    return lines + [""]


def _mib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**20:.1f} MiB"


def _num(x: float | None, digits: int) -> str:
    return "n/m" if x is None else f"{x:.{digits}f}"


def _sci(x: float | None) -> str:
    return "—" if x is None else f"{x:.1e}"


def _same(x: bool | None) -> str:
    return "—" if x is None else ("yes" if x else "**no**")
