"""Top-1 agreement and logit error of weight-only int8 against fp32 on the embedded model's
held-out texts (128-token windows), per domain: experts int8, and experts + dense int8.

    python benchmarks/int8_agreement.py

The tests hold both to >= 99 % (``tests/test_native_int8.py``); this prints the figures.
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

import activepath
from activepath.models import embedded_path
from activepath.analysis.routing_stats import windows


def main() -> int:
    directory = embedded_path("tiny")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    fp32 = activepath.load("tiny")
    variants = {"experts int8": activepath.load("tiny", expert_dtype="int8"),
                "experts + dense int8": activepath.load("tiny", expert_dtype="int8", dense_dtype="int8")}  # fmt: skip
    print("| variant | domain | windows | top-1 agreement | mean abs logit error / mean abs logit |")
    print("|---|---|---:|---:|---:|")
    for name, model in variants.items():
        for domain in ("prose", "code", "shifted"):
            ids_BW = windows(tokenizer((directory / f"eval_{domain}.txt").read_text())["input_ids"], 128)
            with torch.no_grad():
                a, b = fp32(ids_BW).logits, model(ids_BW).logits
            agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
            rel = float((a - b).abs().mean() / a.abs().mean())
            print(f"| {name} | {domain} | {ids_BW.shape[0]} | {agree:.2%} | {rel:.2%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
