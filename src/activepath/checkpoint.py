"""Strict reading of a checkpoint directory for ``load``: config.json, the safetensors
headers, and what transformers' loader reports.

Why: transformers loads a checkpoint that lacks a tensor (or holds one of the wrong shape,
or one the model has no place for) and only logs a report; the model it returns computes
with randomly initialised weights. Here each of those is a ``ValueError`` naming the keys
and the file. Only headers are read before transformers loads the weights.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open

INDEX_NAME = "model.safetensors.index.json"
# A per-expert key as saved on disk (transformers stacks them into [E, ...] at load).
_EXPERT_KEY = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<index>\d+)\.(?P<suffix>.+)$")
_LISTED = 8  # keys named in one message at most


def read_config(directory: Path) -> dict:
    """config.json as a dict; a ``ValueError`` naming the file when it is not a JSON object."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got a JSON {type(config).__name__}")
    return config


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files transformers reads: those the index names, else
    ``model.safetensors``, else every ``*.safetensors`` (so its own error names them)."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a 'weight_map'): {e}") from e
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise ValueError(f"{index} names weight files that are not in {directory}: {missing}")
        return [directory / n for n in names]
    single = directory / "model.safetensors"
    return [single] if single.is_file() else sorted(directory.glob("*.safetensors"))


def read_headers(files: list[Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key → (file name, shape) from each file's header (no tensor data is read). A file
    that is truncated, empty or not safetensors at all is a ``ValueError`` naming it."""
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key in tensors:
                        raise ValueError(f"tensor {key!r} is in both {tensors[key][0]} and {path.name}")
                    tensors[key] = (path.name, tuple(f.get_slice(key).get_shape()))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    return tensors


def check_expert_keys(tensors: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
    """Per-expert keys must be complete and alike: every ``….experts.<e>.<name>`` for every
    expert index seen, with the shape most experts have. (transformers stacks them, and a
    gap or an odd shape fails its stacking with an error that names neither key nor file.)"""
    shapes: dict[str, Counter[tuple[int, ...]]] = {}
    found: dict[tuple[str, int, str], str] = {}
    prefixes, indices = set(), set()
    for key, (_, shape) in tensors.items():
        m = _EXPERT_KEY.match(key)
        if m is None:
            continue
        prefix, index, suffix = m["prefix"], int(m["index"]), m["suffix"]
        found[(prefix, index, suffix)] = key
        shapes.setdefault(suffix, Counter())[shape] += 1
        prefixes.add(prefix)
        indices.add(index)
    if not found:
        return
    wanted = [(p, i, s) for p in sorted(prefixes) for i in sorted(indices) for s in sorted(shapes)]
    missing = [f"{p}.{i}.{s}" for p, i, s in wanted if (p, i, s) not in found]
    if missing:
        raise ValueError(f"checkpoint lacks expert tensors {_listed(missing)} (other experts have them)")
    odd = []
    for (_, _, suffix), key in found.items():
        usual = shapes[suffix].most_common(1)[0][0]
        if tensors[key][1] != usual:
            odd.append(f"{key} in {tensors[key][0]}: shape {tensors[key][1]}, other experts {usual}")
    if odd:
        raise ValueError(f"expert tensors of the wrong shape: {_listed(odd)}")


def check_loading_info(info: Mapping[str, object], tensors: Mapping[str, tuple[str, tuple[int, ...]]],
                       directory: Path) -> None:  # fmt: skip
    """transformers' ``output_loading_info``: a ``ValueError`` for any missing, unexpected or
    mismatched key (transformers would have initialised those weights at random)."""
    files = sorted({name for name, _ in tensors.values()})
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ValueError(f"checkpoint {directory} lacks tensors {_listed(missing)} (looked in {files})")
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        named = [f"{k} (in {tensors[k][0]})" if k in tensors else k for k in unexpected]
        raise ValueError(f"checkpoint {directory} has tensors the model has no place for: {_listed(named)}")
    mismatched = sorted(info.get("mismatched_keys") or (), key=str)
    if mismatched:
        named = [_mismatch(m, tensors) for m in mismatched]
        raise ValueError(f"checkpoint {directory} has tensors of the wrong shape: {_listed(named)}")


def _mismatch(entry: object, tensors: Mapping[str, tuple[str, tuple[int, ...]]]) -> str:
    if isinstance(entry, tuple) and len(entry) == 3:
        key, on_disk, in_model = entry
        where = f" in {tensors[key][0]}" if key in tensors else ""
        return f"{key}{where}: {tuple(on_disk)}, the model expects {tuple(in_model)}"
    return str(entry)


def _listed(items: list[str]) -> str:
    more = len(items) - _LISTED
    return ", ".join(items[:_LISTED]) + (f" and {more} more" if more > 0 else "")
