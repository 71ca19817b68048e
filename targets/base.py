"""Deployment targets: one :class:`Target` per backend, registered in ``TARGETS``.

A target owns its packing layout and its size rule. ``export(target=...)``, ``size_bytes()`` and
``g2quant.load(path)`` dispatch through this registry only, so a new target is a folder with a
``Target`` registered here (built-in ones are listed in ``BUILTIN`` and imported on first use):

    register_target(Target(name="mytarget", description=..., check=..., write=..., load=...,
                           size_bytes=...))
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from .artifact import ArtifactError, read_manifest

# built-in targets: name -> module that registers it when imported
BUILTIN = {"cpu": "g2quant.targets.cpu.target", "onnx": "g2quant.targets.onnx.target",
           "gpu-fp16": "g2quant.targets.gpu_fp16.target"}


@dataclass(frozen=True)
class Target:
    """``check(graph)`` raises ``UnsupportedGraph`` naming what the target cannot run;
    ``write(graph, path, *, vocab, validation, meta) -> Path`` writes an artifact atomically;
    ``load(path, **options)`` returns a runtime with ``run``/``step``;
    ``size_bytes(params) -> int`` is the stored size of a parameter table (name -> QMatrix/array)."""

    name: str
    description: str
    check: Callable
    write: Callable
    load: Callable
    size_bytes: Callable


class UnsupportedGraph(ValueError):
    """The graph uses something the target cannot run."""


TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


def get_target(name: str) -> Target:
    if name not in TARGETS and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    try:
        return TARGETS[name]
    except KeyError:
        known = sorted(set(TARGETS) | set(BUILTIN))
        raise ValueError(f"unknown target {name!r}; available: {', '.join(known)}") from None


def available_targets() -> list[str]:
    return sorted(set(TARGETS) | set(BUILTIN))


def load(path, **options):
    """Open any artifact with the runtime of the target recorded in its manifest."""
    man = read_manifest(path)
    target = man.get("target")
    if not isinstance(target, str):
        raise ArtifactError(f"manifest.json: 'target' must be a string, got {target!r}")
    try:
        t = get_target(target)
    except ValueError as exc:
        raise ArtifactError(f"manifest.json: {exc}") from None
    return t.load(path, **options)
