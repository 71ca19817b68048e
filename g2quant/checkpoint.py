"""Checkpoints: one ``.safetensors`` file holding the weights and, in its metadata, a JSON
record (model kind and config, training state). Written atomically; no pickle."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

META_KEY = "g2quant_checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or not a g2quant checkpoint."""


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, record: dict) -> Path:
    """Write ``model.state_dict()`` and ``record`` (JSON-serializable) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    seen = {}
    for k, v in model.state_dict().items():
        # tied parameters share storage; safetensors refuses shared tensors, store once
        key = (v.data_ptr(), tuple(v.shape))
        if key in seen:
            record.setdefault("aliases", {})[k] = seen[key]
            continue
        seen[key] = k
        state[k] = v.detach().contiguous().cpu()
    meta = {META_KEY: json.dumps({"format_version": FORMAT_VERSION, **record})}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """Return ``(state_dict, record)``; raise CheckpointError with the reason otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not safetensors): {exc}") from exc
    if META_KEY not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not a g2quant checkpoint (no {META_KEY} metadata)")
    record = json.loads(meta[META_KEY])
    if record.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {record['format_version']}, newer than this "
                              f"g2quant supports ({FORMAT_VERSION}); upgrade g2quant")
    for alias, target in record.get("aliases", {}).items():
        state[alias] = state[target]
    return state, record


def load_model(path: str | os.PathLike):
    """Rebuild the model stored in a checkpoint (currently: ``word_lm``); returns ``(model, record)``."""
    state, record = load_checkpoint(path)
    kind = record.get("kind")
    if kind == "word_lm":
        from .models.lm import LMConfig, WordLM
        model = WordLM(LMConfig.from_dict(record["config"]))
    elif kind == "quantized_word_lm":
        from .api import QuantConfig, quantize
        from .models.lm import LMConfig, WordLM
        model = quantize(WordLM(LMConfig.from_dict(record["config"])),
                         config=QuantConfig.from_dict(record["quant_config"]))
    else:
        raise CheckpointError(f"{path}: unknown model kind {kind!r}")
    model.load_state_dict(state)
    model.eval()
    return model, record
