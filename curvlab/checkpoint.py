"""Checkpoint files: one ``.pt`` holding a model and everything needed to analyze it.

curvlab format (a plain dict, loadable with ``torch.load(weights_only=True)``)::

    format            "curvlab-checkpoint"
    format_version    1
    curvlab_version   str
    model             {"family": str, "config": ModelConfig as dict}
    state_dict        parameter tensors (tied weights stored once, under their first name)
    step              int, training step
    optimizer         {"name": str, "hparams": dict}
    data              DataSpec as dict (source, seq_len, batch_size, seed, windows, ...) or {}
    metrics           dict of floats (e.g. train_loss, val_loss)
    extra             dict (trainer state for resuming, ...), optional

:func:`load_checkpoint` also reads nanoGPT ``ckpt.pt`` files (``model_args`` + ``model``,
keys possibly prefixed ``_orig_mod.`` by ``torch.compile``) into the GPT-style model.
Files are written to a temporary name and renamed, so a reader never sees a half-written one.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvlab._version import __version__
from curvlab.errors import CheckpointError, CurvlabError
from curvlab.fileutil import temp_beside
from curvlab.models import ModelConfig, build_model

FORMAT = "curvlab-checkpoint"
FORMAT_VERSION = 1


@dataclass
class CheckpointInfo:
    """Metadata of a loaded checkpoint."""

    path: str
    kind: str  # "curvlab", "nanogpt" or "huggingface"
    config: ModelConfig | None
    step: int = 0
    optimizer: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    curvlab_version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    hf: dict[str, Any] | None = None  # model_type, vocab_size, seq_len, config (Hugging Face)
    notes: list[str] = field(default_factory=list)  # precision caveats

    @property
    def family(self) -> str:
        return self.config.family if self.config is not None else f"hf:{self.hf['model_type']}"

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size if self.config is not None else self.hf["vocab_size"]

    @property
    def seq_len(self) -> int:
        return self.config.seq_len if self.config is not None else self.hf["seq_len"]

    @property
    def learned_positions(self) -> bool:
        """True if the model cannot take sequences longer than :attr:`seq_len`."""
        return self.config is None or self.config.family == "gpt"

    def model_dict(self) -> dict[str, Any]:
        """The model description stored in provenance (config as a dict)."""
        if self.config is not None:
            return self.config.to_dict()
        return {"family": self.family, **self.hf["config"]}


def _version() -> str:
    return __version__


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers, each shared tensor once (first name wins)."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    return {**params, **buffers}


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    step: int = 0,
    optimizer: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a curvlab checkpoint atomically (temporary file + rename)."""
    config: ModelConfig = model.config
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "curvlab_version": _version(),
        "model": {"family": config.family, "config": config.to_dict()},
        "state_dict": {k: v.cpu() for k, v in unique_state_dict(model).items()},
        "step": int(step),
        "optimizer": optimizer or {},
        "data": data or {},
        "metrics": metrics or {},
        "extra": extra or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a checkpoint (not a file written by torch.save)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).splitlines()
        found = re.search(r"GLOBAL (\S+)", " ".join(lines))
        why = f" (needs {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: holds Python objects that only arbitrary code could load; "
            f"refused under weights_only=True{why}"
        ) from None
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError):
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint") from None
    except Exception as e:  # torch.load raises many types for garbage input
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(obj).__name__})")
    return obj


def _load_state(model: nn.Module, state: dict[str, Any], path: Path) -> None:
    expected = unique_state_dict(model)
    # a tied parameter may be stored under each of its names: keep the canonical one
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - set(expected)
    state = {k: v for k, v in state.items() if k not in aliases}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(
                f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}"
            )
        raise CheckpointError(
            f"{path}: stored tensors do not match the model config ({'; '.join(parts)})"
        )
    for name, ref in expected.items():
        value = state[name]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name} is not a tensor")
        if tuple(value.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(value.shape)} but the model config "
                f"needs {tuple(ref.shape)}"
            )
    with torch.no_grad():
        for name, ref in expected.items():
            ref.copy_(state[name].to(ref.dtype))


def _nanogpt_config(args: dict[str, Any], path: Path) -> ModelConfig:
    try:
        return ModelConfig(
            family="gpt",
            vocab_size=int(args["vocab_size"]),
            seq_len=int(args["block_size"]),
            d_model=int(args["n_embd"]),
            n_layers=int(args["n_layer"]),
            n_heads=int(args["n_head"]),
            d_ff=4 * int(args["n_embd"]),
            bias=bool(args.get("bias", True)),
            tie_embeddings=True,
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: nanoGPT model_args lacks {e.args[0]!r}") from None


def load_checkpoint(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[nn.Module, CheckpointInfo]:
    """Load and validate a curvlab or nanoGPT checkpoint.

    Returns the model in eval mode (on ``device``, cast to ``dtype`` if given) and its
    :class:`CheckpointInfo`. Loading uses ``weights_only=True``: no pickled code runs.
    """
    path = Path(path)
    obj = _read(path)
    if obj.get("format") == FORMAT:
        version = obj.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{path}: unsupported curvlab checkpoint version {version}")
        for key in ("model", "state_dict"):
            if key not in obj:
                raise CheckpointError(f"{path}: curvlab checkpoint lacks {key!r}")
        model_meta = obj["model"]
        try:
            config = ModelConfig.from_dict(dict(model_meta["config"]))
        except CurvlabError as e:
            raise CheckpointError(f"{path}: {e}") from None
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: malformed model entry ({e})") from None
        info = CheckpointInfo(
            str(path),
            "curvlab",
            config,
            step=int(obj.get("step", 0)),
            optimizer=dict(obj.get("optimizer", {})),
            data=dict(obj.get("data", {})),
            metrics=dict(obj.get("metrics", {})),
            curvlab_version=obj.get("curvlab_version"),
            extra=dict(obj.get("extra", {})),
        )
        state = obj["state_dict"]
    elif "model_args" in obj and "model" in obj:
        config = _nanogpt_config(dict(obj["model_args"]), path)
        prefix = "_orig_mod."
        state = {
            (k[len(prefix):] if k.startswith(prefix) else k): v
            for k, v in obj["model"].items()
            if not k.endswith(".attn.bias")  # nanoGPT's causal-mask buffer
        }
        metrics = {}
        if "best_val_loss" in obj:
            metrics["best_val_loss"] = float(obj["best_val_loss"])
        info = CheckpointInfo(
            str(path),
            "nanogpt",
            config,
            step=int(obj.get("iter_num", 0)),
            optimizer={"name": "nanogpt"},
            metrics=metrics,
        )
    else:
        keys = ", ".join(sorted(map(str, obj))[:6])
        raise CheckpointError(
            f"{path}: not a curvlab or nanoGPT checkpoint (top-level keys: {keys})"
        )
    model = build_model(config)
    if dtype is not None:  # before loading: a float64 checkpoint is not rounded via float32
        model.to(dtype)
    _load_state(model, state, path)
    model.eval()
    return model.to(device), info


def load_model(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[nn.Module, CheckpointInfo]:
    """Load any supported model: a curvlab or nanoGPT checkpoint file, or a Hugging Face
    ``save_pretrained`` folder (needs ``transformers``; prepared and checked against the stock
    model by :func:`curvlab.models.hf.prepare_hf_model`)."""
    p = Path(path)
    if p.is_dir():
        from curvlab.models.hf import load_hf_folder

        model, meta, notes = load_hf_folder(p, dtype=dtype, device=device)
        return model, CheckpointInfo(str(p), "huggingface", None, hf=meta, notes=notes,
                                     optimizer={"name": "huggingface"})
    return load_checkpoint(p, device=device, dtype=dtype)
