"""Measure the shipped ``tiny`` checkpoint and write its model card.

    python training/model_card.py

Reads ``src/activepath/models/tiny/`` (weights, tokenizer, held-out texts, training_log.json,
unigram_counts.json), measures perplexity per held-out domain, the unigram baseline, expert
load per layer and the Jensen-Shannon divergence between domains — for the trained model
and, as a contrast, a randomly initialised one of the same config — and writes
``eval_metrics.json`` and ``README.md`` there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import activepath
from activepath.analysis import routing_stats

MODEL_DIR = Path(__file__).resolve().parent.parent / "src" / "activepath" / "models" / "tiny"
DOMAINS = ("prose", "code", "shifted")
WINDOW = 128  # the training sequence length


def measure(directory: Path, window: int = WINDOW, seed: int = 0) -> dict[str, object]:
    """All figures of the card, as plain data."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = activepath.load(directory, dtype="float32")
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(directory)
    random_model = activepath.optimize(AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval())
    counts = json.loads((directory / "unigram_counts.json").read_text())
    texts = {d: (directory / f"eval_{d}.txt").read_text(encoding="utf-8") for d in DOMAINS}
    ids = {d: routing_stats.windows(tokenizer(t, verbose=False)["input_ids"], window) for d, t in texts.items()}
    per_domain = {
        d: {"tokens": ids[d].numel(), "perplexity": routing_stats.perplexity(model, ids[d]),
            "unigram_perplexity": routing_stats.unigram_perplexity(counts, ids[d]),
            "random_init_perplexity": routing_stats.perplexity(random_model, ids[d])}
        for d in DOMAINS
    }
    load = {d: routing_stats.expert_load(model, ids[d]) for d in DOMAINS}
    return {"parameters": sum(p.numel() for p in model.parameters()), "window": window,
            "dtype": "float32 (upcast from the bf16 checkpoint)", "domains": per_domain,
            "layers": _layer_figures(model, random_model, ids), "expert_load": {d: load[d].tolist() for d in DOMAINS}}


def _layer_figures(model: torch.nn.Module, random_model: torch.nn.Module,
                   ids: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    load = {d: routing_stats.expert_load(model, ids[d]) for d in DOMAINS}
    random_load = {d: routing_stats.expert_load(random_model, ids[d]) for d in ("prose", "code")}
    null, random_null = (_js_null(m, ids) for m in (model, random_model))
    js = routing_stats.js_divergence(load["prose"], load["code"])
    random_js = routing_stats.js_divergence(random_load["prose"], random_load["code"])
    return {
        "prose_max_over_mean": routing_stats.max_over_mean(load["prose"]).tolist(),
        "prose_normalized_entropy": routing_stats.normalized_entropy(load["prose"]).tolist(),
        "prose_router_confidence": routing_stats.router_confidence(model, ids["prose"]).tolist(),
        "js_prose_code_bits": js.tolist(),
        # permutation null: prose and code windows pooled and re-split at random, 200 times
        "js_prose_code_null95_bits": null.quantile(0.95, dim=0).tolist(),
        "js_prose_code_p_value": ((null >= js).double().sum(0) + 1).div(null.shape[0] + 1).tolist(),
        "js_prose_shifted_bits": routing_stats.js_divergence(load["prose"], load["shifted"]).tolist(),
        "random_init_prose_max_over_mean": routing_stats.max_over_mean(random_load["prose"]).tolist(),
        "random_init_prose_router_confidence": routing_stats.router_confidence(random_model, ids["prose"]).tolist(),
        "random_init_js_prose_code_bits": random_js.tolist(),
        "random_init_js_prose_code_null95_bits": random_null.quantile(0.95, dim=0).tolist(),
    }


def _js_null(model: torch.nn.Module, ids: dict[str, torch.Tensor]) -> torch.Tensor:
    return routing_stats.js_permutation_null(routing_stats.window_loads(model, ids["prose"]),
                                             routing_stats.window_loads(model, ids["code"]))


def render(metrics: dict[str, object], log: dict[str, object], config: dict[str, object], size_mb: float,
           params_m: float) -> str:
    """The README.md model card."""
    history = log["history"]
    final = history[-1]
    early_stop = "" if log["steps_done"] == log["steps"] else f" (stopped by its time budget; {log['steps']} planned)"
    dom = metrics["domains"]
    lay = metrics["layers"]
    rows = "\n".join(
        f"| {d} | {dom[d]['tokens']} | **{dom[d]['perplexity']:.1f}** | {dom[d]['unigram_perplexity']:.1f} | "
        f"{dom[d]['random_init_perplexity']:.0f} |"
        for d in DOMAINS
    )
    layer_rows = "\n".join(
        f"| {i} | {lay['prose_max_over_mean'][i]:.2f} | {lay['prose_normalized_entropy'][i]:.3f} | "
        f"{lay['prose_router_confidence'][i]:.2f} | **{lay['js_prose_code_bits'][i]:.3f}** | "
        f"{lay['js_prose_code_null95_bits'][i]:.3f} | {lay['js_prose_code_p_value'][i]:.3f} | "
        f"{lay['js_prose_shifted_bits'][i]:.3f} | {lay['random_init_prose_max_over_mean'][i]:.2f} | "
        f"{lay['random_init_prose_router_confidence'][i]:.2f} | {lay['random_init_js_prose_code_bits'][i]:.3f} | "
        f"{lay['random_init_js_prose_code_null95_bits'][i]:.3f} |"
        for i in range(len(lay["js_prose_code_bits"]))
    )
    return _CARD.format(
        params_m=params_m, size_mb=size_mb,
        uniform_conf=1 / (config.get("num_experts") or config["num_local_experts"]),
        layers=config["num_hidden_layers"], hidden=config["hidden_size"],
        experts=config.get("num_experts") or config["num_local_experts"], top_k=config["num_experts_per_tok"],
        moe_i=config["moe_intermediate_size"],
        vocab=config["vocab_size"], prose_tokens=log["prose_tokens"], code_tokens=log["code_tokens"],
        code_files=log["code_files"], code_pct=100 * log["code_tokens"] / log["stream_tokens"],
        train_prose=log["train_files"]["prose"], train_code=log["train_files"]["code"],
        command=log["command"], threads=log["threads"], steps_done=log["steps_done"], early_stop=early_stop,
        batch=log["batch"], seq_len=log["seq_len"], lr=log["lr"], aux_coef=log["aux_coef"],
        tokens_seen=log["steps_done"] * log["batch"] * log["seq_len"], train_min=log["train_s"] / 60,
        total_min=log["total_wall_s"] / 60, final_step=final["step"], final_ce=final["ce"], final_aux=final["aux"],
        window=metrics["window"], rows=rows, layer_rows=layer_rows,
        js_mean=sum(lay["js_prose_code_bits"]) / len(lay["js_prose_code_bits"]),
        js_random_mean=sum(lay["random_init_js_prose_code_bits"]) / len(lay["random_init_js_prose_code_bits"]),
        packages=", ".join(f"`{p}`" for p in log.get("debs") or log["corpus_packages"]),
    )


_CARD = """\
# activepath embedded model `tiny`

A small Mixture-of-Experts language model trained from scratch for activepath's demo and
tests, so that they exercise *real* routing behaviour: skewed expert loads that shift with
the input domain, which random-weight models do not show. It is a standard transformers
**Qwen3-MoE** checkpoint: `activepath.load("tiny")`, or `AutoModelForCausalLM.from_pretrained`
on this directory, works offline.

| | |
|---|---|
| architecture | `qwen3_moe`: {layers} layers, hidden {hidden}, {experts} experts × intermediate {moe_i}, top-{top_k}, tied embeddings |
| parameters | {params_m:.2f} M, stored as bfloat16 (`model.safetensors`); {size_mb:.1f} MB directory |
| tokenizer | byte-level BPE, {vocab} tokens, trained with `tokenizers` on the training text |
| context | trained on {seq_len}-token windows |

## Training data

From the Debian archive ({packages}), fetched by `training/corpus.py`:

- **prose**: the reST sources of the Python 3.11 documentation, {train_prose} files, {prose_tokens:,} tokens
  (`license.rst`, `copyright.rst` left out);
- **code**: {code_files} of {train_code} Python 3.11 standard-library modules, {code_tokens:,} tokens
  ({code_pct:.1f} % of the training stream) — a small share, so code is a distribution shift.

About 5 % of the files of each domain (stable hash of the path) are held out and never
trained on. The third, *shifted* domain is the licence texts of `base-files`
(`/usr/share/common-licenses`): legal English, entirely unseen.
`eval_prose.txt`, `eval_code.txt`, `eval_shifted.txt` are ~10 KB excerpts of the held-out files.

## Training

    {command}

{threads} CPU thread(s), fp32, AdamW (β 0.9/0.95, weight decay 0.1), peak LR {lr:g} with warm-up
and cosine decay, {batch} × {seq_len} tokens per step, load-balancing loss coefficient {aux_coef}.
**{steps_done} steps**{early_stop}, {tokens_seen:,} tokens seen; {train_min:.1f} min of training,
{total_min:.1f} min wall in all (corpus, tokenizer, training, saving).
Final training cross entropy **{final_ce:.3f}** nats/token (mean of the last 50 steps up to step {final_step}),
load-balancing loss {final_aux:.3f}. `training_log.json` holds the loss curve.

## Evaluation (held-out texts, measured by `training/model_card.py`)

Perplexity over non-overlapping {window}-token windows, float32. The unigram baseline is the
training-token unigram distribution with add-one smoothing (`unigram_counts.json`).

| domain | tokens | perplexity | unigram baseline | random init |
|---|---|---|---|---|
{rows}

### Routing

Expert load = share of the top-k slots each expert receives, per layer. On held-out prose:
max/mean load (1 = uniform) and normalised entropy of the load (1 = uniform); router
confidence = mean top-1 softmax probability of the router (1/{experts} = {uniform_conf:.3f} when it cannot
tell experts apart). Drift: Jensen-Shannon divergence (bits; 0 = identical, 1 = disjoint) between
the load on prose and on code, against a permutation null — the prose and code windows pooled
and re-split at random 200 times; *null 95 %* is its 95th percentile, *p* the share of re-splits
at least as divergent (floor 1/201 ≈ 0.005). The `random` columns are a randomly initialised model of this config.

| layer | max/mean | entropy | confidence | JS prose↔code | null 95 % | p | JS prose↔shifted | random: max/mean | random: confidence | random: JS prose↔code | random: null 95 % |
|---|---|---|---|---|---|---|---|---|---|---|---|
{layer_rows}

Mean JS prose↔code: **{js_mean:.3f}** bits, above the permutation null in every layer. A random
model's loads are skewed too, and its JS is of similar size ({js_random_mean:.3f} bits), but it is
within its own null: random routing follows token identity and swings from window to window,
while the trained router is confident and shifts consistently with the domain.
`eval_metrics.json` holds every figure, including the full load matrices;
`tests/test_embedded_model.py` checks the shipped model still has them.

## Limitations

A toy: a few million parameters and a few million training tokens. It writes
documentation-flavoured text, not good text, and is meant for measuring routing, not for use.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="measure the shipped tiny model and write its card")
    p.add_argument("--dir", type=Path, default=MODEL_DIR)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    metrics = measure(args.dir)
    (args.dir / "eval_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    log = json.loads((args.dir / "training_log.json").read_text())
    config = json.loads((args.dir / "config.json").read_text())
    card = args.dir / "README.md"
    for _ in range(2):  # the second pass counts the card itself in the directory size
        size_mb = sum(f.stat().st_size for f in args.dir.iterdir() if f.is_file()) / 1e6
        card.write_text(render(metrics, log, config, size_mb, metrics["parameters"] / 1e6))
    print(json.dumps({d: metrics["domains"][d] for d in DOMAINS}, indent=1))
    print(json.dumps(metrics["layers"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
