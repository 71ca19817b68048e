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

from .targets.artifact import apply_umask

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
    _clean_stale_tmp(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        apply_umask(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _clean_stale_tmp(path: Path) -> None:
    """Delete ``NAME.PID.*.tmp`` files that a killed writer of ``path`` left behind."""
    from .targets.artifact import _pid_alive
    for f in path.parent.glob(f"{path.name}.*.tmp"):
        pid = f.name[len(path.name) + 1:].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            try:
                f.unlink()
            except OSError:
                pass


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
    try:
        record = json.loads(meta[META_KEY])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: the checkpoint record is damaged ({exc})") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: the checkpoint record is not an object")
    fv = record.get("format_version", 0)
    if not isinstance(fv, int):
        raise CheckpointError(f"{path}: invalid checkpoint format_version {fv!r}")
    if fv > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {record['format_version']}, newer than this "
                              f"g2quant supports ({FORMAT_VERSION}); upgrade g2quant")
    aliases = record.get("aliases", {})
    if not isinstance(aliases, dict) or any(t not in state for t in aliases.values()):
        raise CheckpointError(f"{path}: the checkpoint's tied-weight table is damaged")
    for alias, target in aliases.items():
        state[alias] = state[target]
    return state, record


# model kinds stored in checkpoints: kind -> builder(config dict) -> nn.Module; the built-in
# kinds are registered by their model modules, imported on first use
MODELS: dict = {}
BUILTIN_MODELS = {"word_lm": "g2quant.models.lm", "seq2seq": "g2quant.models.seq2seq"}
QUANTIZED_PREFIX = "quantized_"


def register_model(kind: str, build) -> None:
    """Make checkpoints of ``kind`` loadable: ``build(record["config"]) -> nn.Module``."""
    MODELS[kind] = build


def _builder(kind: str, path):
    if kind not in MODELS and kind in BUILTIN_MODELS:
        import importlib
        importlib.import_module(BUILTIN_MODELS[kind])
    if kind not in MODELS:
        raise CheckpointError(f"{path}: unknown model kind {kind!r}; known: {sorted(set(MODELS) | set(BUILTIN_MODELS))}")
    return MODELS[kind]


def load_model(path: str | os.PathLike):
    """Rebuild the model stored in a checkpoint (float, or ``quantized_<kind>`` after QAT);
    returns ``(model, record)``."""
    state, record = load_checkpoint(path)
    kind = record.get("kind")
    if not isinstance(kind, str):
        raise CheckpointError(f"{path}: the checkpoint record has no model kind")
    try:
        if kind.startswith(QUANTIZED_PREFIX):
            from .api import QuantConfig, quantize
            model = quantize(_builder(kind[len(QUANTIZED_PREFIX):], path)(record["config"]),
                             config=QuantConfig.from_dict(record["quant_config"]))
        else:
            model = _builder(kind, path)(record["config"])
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: the checkpoint does not describe a loadable {kind!r} model ({exc})") from exc
    model.eval()
    return model, record
