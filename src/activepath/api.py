"""Drop-in integration with transformers: ``optimize`` patches a model in place,
``load`` builds one from a checkpoint directory and patches it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from activepath import checkpoint
from activepath.adapters import OptimizeOptions, adapter_for, supported_model_types
from activepath.moe.layer import SparseMoE
from activepath.dense.linears import patch_linears, quantize_linears
from activepath.models import embedded_path
from activepath.runtime.workspace import Workspace

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
    if not model.__dict__.get("_activepath_checks_input_ids"):
        model.register_forward_pre_hook(InputIdsCheck(model), with_kwargs=True)
        model.__dict__["_activepath_checks_input_ids"] = True  # a flag, not the handle: deep copies stay plain
    return model


class InputIdsCheck:
    """Forward pre-hook of an optimized model: ``input_ids`` must be a non-empty 2-D
    integer tensor [batch, sequence] of ids inside the vocabulary (torch would raise an
    IndexError or a reshape error deep inside, or on a GPU corrupt the context). Costs one
    min/max over the ids per call (~2 us at decode; the vocabulary size is cached, and read
    again from the model only when an id is past it, as after ``resize_token_embeddings``)."""

    def __init__(self, model: nn.Module) -> None:
        self.vocab = model.get_input_embeddings().num_embeddings

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return  # inputs_embeds instead
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"input_ids must be 2-D [batch, sequence] with at least one token, "
                             f"got shape {tuple(ids.shape)}")  # fmt: skip
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got {ids.dtype}")
        lo, hi = (t.item() for t in torch.aminmax(ids))
        if hi >= self.vocab:
            self.vocab = model.get_input_embeddings().num_embeddings
        if lo < 0 or hi >= self.vocab:
            raise ValueError(f"input_ids must lie in [0, {self.vocab - 1}] (the vocabulary), got ids from {lo} to {hi}")


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
    adapter_for(str(checkpoint.read_config(directory).get("model_type")))  # fail before reading any weights
    OptimizeOptions(backend=backend, collect_stats=collect_stats, top_k=top_k, expert_dtype=expert_dtype)
    _check_dense_options(native_linears, dense_dtype)
    torch_dtype, target = _resolve_dtype(dtype), _resolve_device(device)
    files = checkpoint.weight_files(directory)
    tensors = checkpoint.read_headers(files)
    checkpoint.check_expert_keys(tensors)
    try:
        # Mismatched shapes are reported, not raised, so that check_loading_info names them.
        model, info = AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch_dtype, use_safetensors=True, experts_implementation="eager",
            output_loading_info=True, ignore_mismatched_sizes=True,
        )  # fmt: skip
    except RuntimeError as e:  # transformers' weight conversion failed (its report is logged)
        raise ValueError(f"transformers could not load {[f.name for f in files]} from {directory}: {e}") from e
    checkpoint.check_loading_info(info, tensors, directory)
    model.to(target).eval()
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
    if not isinstance(dtype, (torch.dtype, str)):
        raise TypeError(f"dtype must be a torch dtype or one of {sorted(_DTYPES)}, got {type(dtype).__name__}")
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    hint = " (int8 weights: expert_dtype='int8', dense_dtype='int8')" if "int8" in str(dtype) else ""
    raise ValueError(f"dtype={dtype!r} is not supported; expected a float dtype, one of {sorted(_DTYPES)}{hint}")


def _resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, refused (ValueError) when this machine has no such device."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    try:
        target = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device={device!r} is not a device name (e.g. 'cpu', 'cuda', 'cuda:1'): {e}") from e
    if target.type == "cpu":
        return target
    backend = getattr(torch, target.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ValueError(f"device={str(device)!r} is not available here; available: {_available_devices()}")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if target.index is not None and not 0 <= target.index < count:
        raise ValueError(f"device={str(device)!r}: this machine has {count} {target.type} device(s), "
                         f"indices 0..{count - 1}")  # fmt: skip
    return target


def _available_devices() -> list[str]:
    found = ["cpu"]
    for kind in ("cuda", "xpu", "mps"):
        backend = getattr(torch, kind, None)
        if backend is not None and hasattr(backend, "is_available") and backend.is_available():
            found.append(kind)
    return found
