"""Decode at batch 1 with the native kernels of an earlier revision vs this tree's, alternating
in one process.

    python benchmarks/native_ab.py --base REV [--rounds 8] [--new 32]
                                   [--expert-dtype native|int8] [--dense-dtype native|int8]
                                   [--out benchmarks/results/native_ab_...]

The host's memory bandwidth changes between processes and within minutes (decode medians of
31 vs 40 ms with the same code, benchmarks/results/issue6_performance.md), so a kernel change
is only measurable side by side in one process. This builds the C++ sources of ``--base``
(``git show REV:src/activepath/native/...``) with the same compiler and flags as
``activepath.kernels.cpu``, loads both libraries, and runs one greedy generation per library per
round on the round's prompt, the order alternating between rounds; the library in use is
swapped between generations. Before each round a 256 MiB copy labels the host's state. Only
for revisions whose C entry points have the signatures this tree declares.

Model and process settings as in token_path_ab.py (``ab_process``): the Qwen3-30B-A3B shape
with 4 layers, ``--expert-dtype``/``--dense-dtype``, the C allocator tuned and the loaded
objects frozen out of the GC, as the ``activepath`` command does.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import activepath
from activepath.kernels import cpu as native
from activepath.kernels.cpu import build as native_build
from activepath.bench.machine import cpu_model, versions

sys.path.insert(0, str(Path(__file__).parent))
from token_path_ab import ab_process, generate, parse_ab_args  # noqa: E402

NATIVE_DIR = "src/activepath/kernels/cpu"


def build_revision(rev: str, out_dir: Path) -> ctypes.CDLL:
    """The native library as ``rev`` had it, compiled like activepath.kernels.cpu compiles this tree's."""
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                               check=True).stdout.strip())
    names = subprocess.run(["git", "ls-tree", "--name-only", rev, f"{NATIVE_DIR}/"], cwd=root, capture_output=True,
                           text=True, check=True).stdout.split()
    sources = []
    for name in names:
        if name.endswith((".cpp", ".h")):
            dst = out_dir / Path(name).name
            dst.write_text(subprocess.run(["git", "show", f"{rev}:{name}"], cwd=root, capture_output=True, text=True,
                                          check=True).stdout)
            if name.endswith(".cpp"):
                sources.append(str(dst))
    if not sources:
        raise SystemExit(f"{rev} has no C++ sources under {NATIVE_DIR}")
    target = out_dir / "base.so"
    compiler = os.environ.get("CXX") or shutil.which("g++") or "c++"  # as activepath.kernels.cpu picks it
    subprocess.run([compiler, *native_build.DEFAULT_FLAGS, *sources, "-o", str(target)], check=True, timeout=300)
    lib = ctypes.CDLL(str(target))
    native_build.declare(lib)
    return lib


def copy_gbps(src: torch.Tensor, dst: torch.Tensor) -> float:
    start = time.perf_counter()
    dst.copy_(src)
    return 2 * src.numel() * src.element_size() / (time.perf_counter() - start) / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/native_ab.py")
    p.add_argument("--base", required=True, help="git revision whose native kernels are the baseline")
    args = parse_ab_args(p, argv, rounds=8)
    this_tree = native_build.library()
    if this_tree is None:
        raise SystemExit(f"native kernels unavailable: {native.unavailable_reason()}")
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"base": build_revision(args.base, Path(tmp)), "this tree": this_tree}
        allocator, model = ab_process(args)
        activepath.freeze_loaded_objects()
        src = torch.ones(64 << 20)
        dst = torch.empty_like(src)
        copy_gbps(src, dst)  # fault dst's pages in: the first copy measures the page faults
        gen = torch.Generator().manual_seed(0)
        by_round: dict[str, list[float]] = {k: [] for k in libs}
        copies, agree = [], []
        with torch.inference_mode():
            generate(model, torch.randint(0, 32000, (1, 128), generator=gen), 4)  # warm-up, this tree
            for r in range(args.rounds):
                prompt_1P = torch.randint(0, 32000, (1, 128), generator=gen)
                copies.append(copy_gbps(src, dst))
                tokens = {}
                for name in ("base", "this tree") if r % 2 == 0 else ("this tree", "base"):
                    native_build.install_library(libs[name])
                    tokens[name], steps = generate(model, prompt_1P, args.new)
                    by_round[name].append(statistics.median(steps))
                native_build.install_library(this_tree)
                agree.append(tokens["base"] == tokens["this tree"])
                print(f"round {r + 1}: copy {copies[-1]:.1f} GB/s, base {by_round['base'][-1] * 1e3:.2f} ms, "
                      f"this tree {by_round['this tree'][-1] * 1e3:.2f} ms", file=sys.stderr, flush=True)
    command = "python benchmarks/native_ab.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(command.strip(), args, allocator.describe(), by_round, copies, agree)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        doc = {"command": command.strip(), "cpu": cpu_model(), "versions": versions(), "base": args.base,
               "allocator": allocator.describe(), "round_medians_s": by_round, "copy_GBps": copies,
               "same_tokens": agree}
        Path(f"{args.out}.json").write_text(json.dumps(doc, indent=1) + "\n")
        Path(f"{args.out}.md").write_text(text)
    return 0


def report(command: str, args: argparse.Namespace, allocator: str, by_round: dict[str, list[float]],
           copies: list[float], agree: list[bool]) -> str:
    lines = [f"# Native kernels: {args.base} vs this tree (decode, batch 1, one process)", "", f"`{command}`", "",
             f"experts {args.expert_dtype}, dense projections {args.dense_dtype}; {cpu_model()}, torch threads 2, "
             f"{allocator}; versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()), "",
             "Median decode step per round (ms), with the copy bandwidth measured just before the round:", "",
             "| round | copy GB/s | base | this tree | this tree / base |", "|---:|---:|---:|---:|---:|"]
    ratios = []
    for r, copy in enumerate(copies):
        base, ours = by_round["base"][r], by_round["this tree"][r]
        ratios.append(ours / base)
        lines.append(f"| {r + 1} | {copy:.1f} | {base * 1e3:.2f} | {ours * 1e3:.2f} | {ours / base:.3f} |")
    wins = sum(x < 1 for x in ratios)
    lines += ["", f"This tree was faster in {wins} of {len(ratios)} rounds; median ratio "
              f"{statistics.median(ratios):.3f}. The host's state can change within a round (a round whose two "
              f"figures differ by ~10 ms straddles a change). Same tokens in every round: **{all(agree)}**."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
