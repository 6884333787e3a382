"""Drop-in integration with transformers: ``optimize`` patches a model in place,
``load`` builds one from a checkpoint directory and patches it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .adapters import OptimizeOptions, adapter_for, supported_model_types
from .layer import SparseMoE
from .linears import patch_linears, quantize_linears
from .models import embedded_path
from .workspace import Workspace

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def optimize(model: nn.Module, *, backend: str = "grouped", collect_stats: bool = False,
             top_k: int | None = None, expert_dtype: str = "native", native_linears: bool = True,
             dense_dtype: str = "native") -> nn.Module:
    """Replace every MoE block of a transformers model with a ``SparseMoE``, in place.

    The new layers share the original parameters (nothing is copied). Dense layers keep
    their modules; with ``native_linears`` their fp32 ``nn.Linear`` projections run through
    the native small-batch kernel at decode-sized inputs (see ``linears``).
    ``dense_dtype="int8"`` replaces those projections (attention, lm_head, shared experts)
    with weight-only int8 ones (``linears.Int8Linear``) — with ``expert_dtype="int8"``, a
    fully weight-only-int8 model. Returns ``model``. Raises ``ValueError`` for an
    unsupported architecture.
    """
    options = OptimizeOptions(backend=backend, collect_stats=collect_stats, top_k=top_k, expert_dtype=expert_dtype)
    _check_dense_options(native_linears, dense_dtype)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(f"optimize expects a transformers PreTrainedModel, got {type(model).__name__}")
    adapter = adapter_for(model_type)
    blocks = [(name, m) for name, m in model.named_modules() if type(m).__name__ == adapter.block_class]
    for name, block in blocks:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, adapter.convert(block, config.get_text_config(), options))
    workspace = Workspace()  # the layers run one after another: one set of scratch buffers
    for _, layer in moe_layers(model):
        layer.workspace = workspace
    if dense_dtype == "int8":
        quantize_linears(model)
    elif native_linears:
        patch_linears(model)
    return model


def _check_dense_options(native_linears: object, dense_dtype: object) -> None:
    if not isinstance(native_linears, bool):
        raise TypeError(f"native_linears must be a bool, got {native_linears!r}")
    if dense_dtype not in ("native", "int8"):
        raise ValueError(f"dense_dtype={dense_dtype!r} is not supported; expected 'native' or 'int8'")


def moe_layers(model: nn.Module) -> list[tuple[str, SparseMoE]]:
    """The ``SparseMoE`` layers of an optimized model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SparseMoE)]


def load(path: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         backend: str = "grouped", collect_stats: bool = False, top_k: int | None = None,
         expert_dtype: str = "native", native_linears: bool = True, dense_dtype: str = "native") -> nn.Module:
    """Load a checkpoint directory (config.json + *.safetensors), or an embedded model by
    name (``"tiny"``), and return it optimized.

    Per-expert keys as saved on disk are stacked by transformers' own loader; pickle
    checkpoints (*.bin) are refused. ``dtype`` is a torch dtype or one of
    ``float32``/``bfloat16``/``float16``; None keeps the checkpoint's (fp32 for embedded models).
    """
    from transformers import AutoModelForCausalLM

    directory = _checkpoint_dir(path)
    if dtype is None and isinstance(path, str) and embedded_path(path) is not None:
        # Embedded models were trained in fp32 and are stored in bf16 only to stay small.
        dtype = torch.float32
    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    adapter_for(str(model_type))  # fail before reading any weights
    OptimizeOptions(backend=backend, collect_stats=collect_stats, top_k=top_k, expert_dtype=expert_dtype)
    _check_dense_options(native_linears, dense_dtype)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=_resolve_dtype(dtype), use_safetensors=True, experts_implementation="eager"
    )
    model.to(torch.device(device)).eval()
    return optimize(model, backend=backend, collect_stats=collect_stats, top_k=top_k, expert_dtype=expert_dtype,
                    native_linears=native_linears, dense_dtype=dense_dtype)


def _checkpoint_dir(path: str | Path) -> Path:
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    directory = embedded_path(path) if isinstance(path, str) else None
    directory = directory or Path(path)
    if not (directory / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a checkpoint directory: no config.json there")
    if not any(directory.glob("*.safetensors")):
        found = sorted(p.name for p in directory.iterdir())
        raise ValueError(f"{str(path)!r} has no *.safetensors weights (only safetensors are loaded); found {found}")
    return directory


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise TypeError(f"dtype {dtype} is not supported; expected one of {sorted(set(_DTYPES))}")
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise TypeError(f"dtype must be a torch dtype or one of {sorted(_DTYPES)}, got {dtype!r}")

