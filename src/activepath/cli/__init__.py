"""The ``activepath`` command. Each subcommand lives in its own module and registers
itself here through a ``register(subparsers)`` function."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from activepath.runtime.process import MALLOC_CHOICES, apply_malloc_option, bound_onednn_caches

# subcommand name → module that defines ``register(subparsers)``
_SUBCOMMANDS = {
    "demo": "activepath.cli.demo",
    "bench": "activepath.bench.cli",
    "serve": "activepath.serving.serve_cmd",
    "loadtest": "activepath.serving.loadtest",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="activepath", description="Sparse MoE inference runtime")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--malloc", choices=MALLOC_CHOICES, default="tuned",
                        help="tuned (default): glibc malloc keeps freed activations for reuse instead of mapping "
                             "fresh pages at every layer (activepath.tune_allocator); default: leave it as it is")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in _SUBCOMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a subcommand not built yet
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    # The command owns its process, so it may set process-wide allocator state; the library does not.
    args.allocator = apply_malloc_option(args.malloc)
    # Before any subcommand runs a bf16 matmul: later, oneDNN has read its cache capacities.
    caches = bound_onednn_caches()
    logging.getLogger(__name__).info("oneDNN cache capacities: %s", caches)
    logging.getLogger(__name__).info("allocator: %s", args.allocator.describe())
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
