# (layer | generate) bench → report → [plots]
"""PNG charts of a bench document: latency distributions, expert load heatmap
(layer × expert, or token count × expert for the layer bench), and the roofline with
every measured point. matplotlib is imported only here, only for ``--plot``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_plots(doc: dict[str, Any], prefix: Path) -> list[Path]:
    """Write the charts that ``doc`` has data for; return their paths."""
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    written = [_latency(doc, _path(prefix, "latency")), _heatmap(doc, _path(prefix, "expert_load")),
               _roofline(doc, _path(prefix, "roofline"))]
    return [p for p in written if p is not None]


def _path(prefix: Path, what: str) -> Path:
    return prefix.with_name(f"{prefix.name}_{what}.png")


def _latency(doc: dict[str, Any], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    panels = []
    if doc.get("layer"):
        rows = doc["layer"]["rows"]
        panels.append(("layer call (ms)", [f"{r['impl']}\nT={r['tokens']}" for r in rows],
                       [[s * 1e3 for s in r["samples_s"]] for r in rows]))
    if doc.get("generate"):
        rows = doc["generate"]["rows"]
        panels.append(("decode step (ms)", [r["impl"] for r in rows],
                       [[s * 1e3 for s in r["decode_samples_s"]] for r in rows]))
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, len(panels[0][1]) * 0.7), 4 * len(panels)), squeeze=False)
    for ax, (title, labels, data) in zip(axes[:, 0], panels):
        ax.boxplot(data, whis=(5, 95), showfliers=True)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(title)
        ax.set_title("latency distribution (whiskers: p5–p95)")
    return _save(fig, path)


def _heatmap(doc: dict[str, Any], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    if doc.get("generate"):
        row = doc["generate"]["rows"][0]
        grid, ylabel = row["tokens_per_expert_by_layer"], f"MoE layer ({row['impl']} run)"
        yticks = list(range(len(grid)))
    elif doc.get("layer"):
        by_tokens = doc["layer"]["tokens_per_expert_by_tokens"]
        grid, ylabel, yticks = list(by_tokens.values()), "tokens per call", list(by_tokens)
    else:
        return None
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.35 * len(grid)))
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(grid)), yticks)
    ax.set_xlabel("expert")
    ax.set_ylabel(ylabel)
    ax.set_title("expert load (tokens routed)")
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def _roofline(doc: dict[str, Any], path: Path) -> Path | None:
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    r = doc.get("roofline")
    if not r or not doc.get("layer"):
        return None
    points = [(row["flops"] / row["weight_bytes_mean"], row["achieved_GFLOPs"], f"{row['impl']} T={row['tokens']}")
              for row in doc["layer"]["rows"]]
    lo = min(p[0] for p in points) / 2
    hi = max(max(p[0] for p in points) * 2, 2 * r["gemm_GFLOPs"] / r["bandwidth_GBps"])
    xs = [lo * (hi / lo) ** (i / 100) for i in range(101)]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(xs, [min(r["gemm_GFLOPs"], x * r["bandwidth_GBps"]) for x in xs], "k-", label="measured roofline")
    for impl in dict.fromkeys(row["impl"] for row in doc["layer"]["rows"]):
        mine = [p for p in points if p[2].startswith(impl + " ")]
        ax.scatter([p[0] for p in mine], [p[1] for p in mine], label=impl)
        for x, y, label in mine:
            ax.annotate(label.split(" ")[1], (x, y), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("arithmetic intensity (FLOP / weight byte)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"roofline: {r['bandwidth_GBps']:.0f} GB/s, {r['gemm_GFLOPs']:.0f} GFLOP/s ({r['dtype']})")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
