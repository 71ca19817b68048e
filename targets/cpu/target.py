"""The ``cpu`` target: artifacts for the torch-free Numba CPU engine.

Storage: each weight matrix is bit-packed at its *storage width* (:func:`storage_width`: 1-bit
binary, 2-bit ternary / 2-bit, 4-bit for 3–4 bits, 8-bit for 5–8 bits; ``g2quant.targets.pack``
layout ``lsb-first-u8-rowpad``) with one float32 scale per row; float matrices and biases are
float32. The engine repacks matrices into its kernel layout at load.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import pack
from ..artifact import ArtifactError
from ..base import Target, UnsupportedGraph, register_target
from ..graph import Graph, validate
from ..graphio import read_graph_artifact, write_graph_artifact
from ..qweights import QMatrix

PACKING = "lsb-first-u8-rowpad"     # see g2quant.targets.pack
NAME = "cpu"


def storage_width(bits: int, scheme: str = "int") -> int:
    """Bits per weight as this target stores them: 1, 2, 4, 8 (packed) or 32 (float).
    3-bit weights are stored in 4-bit nibbles, 5–7-bit weights in bytes."""
    if scheme == "float":
        return 32
    if scheme in ("binary", "ternary") or bits <= 2:
        return bits
    return 4 if bits <= 4 else 8


def _pack_pair(bits: int, scheme: str):
    if scheme == "ternary":
        return pack.pack_ternary, pack.unpack_ternary
    sb = storage_width(bits, scheme)
    return (lambda q: pack.pack_bits(q, sb)), (lambda data, shape: pack.unpack_bits(data, shape, sb))


class CpuCodec:
    """How the cpu target stores a ``QMatrix``: ``NAME.q`` (packed uint8, or float32) + ``NAME.scale``."""

    def encode(self, name: str, m: QMatrix):
        if m.scheme == "float":
            q, packing = np.ascontiguousarray(m.q, dtype=np.float32), "none"
        else:
            q, packing = _pack_pair(m.bits, m.scheme)[0](m.q), PACKING
        entry = {"bits": m.bits, "scheme": m.scheme, "storage_bits": storage_width(m.bits, m.scheme),
                 "packing": packing, "q": f"{name}.q", "scale": f"{name}.scale"}
        return {f"{name}.q": q, f"{name}.scale": np.asarray(m.scale, dtype=np.float32)}, entry

    def expect(self, name: str, entry: dict):
        scheme, bits, shape = entry["scheme"], entry["bits"], entry["shape"]
        if scheme not in ("int", "binary", "ternary", "float"):
            raise ValueError(f"unknown scheme {scheme!r}")
        limits = {"binary": (1, 1), "ternary": (2, 2), "int": (2, 8), "float": (32, 32)}[scheme]
        if not (isinstance(bits, int) and not isinstance(bits, bool) and limits[0] <= bits <= limits[1]):
            raise ValueError(f"bits={bits!r} is invalid for scheme {scheme!r}")
        if entry.get("storage_bits") != storage_width(bits, scheme):
            raise ValueError(f"storage_bits {entry.get('storage_bits')!r} does not match {bits}-bit {scheme}")
        want_packing = "none" if scheme == "float" else PACKING
        if entry.get("packing") != want_packing:
            raise ValueError(f"unknown packing {entry.get('packing')!r} (expected {want_packing!r})")
        if len(shape) != 2:
            raise ValueError(f"a weight matrix is 2-D, got shape {shape}")
        qn, sn = entry.get("q"), entry.get("scale")
        if not isinstance(qn, str) or not isinstance(sn, str) or qn == sn:
            raise ValueError("'q' and 'scale' must name two tensors")
        R, K = shape
        qspec = ("float32", (R, K)) if scheme == "float" else \
            ("uint8", pack.packed_shape((R, K), storage_width(bits, scheme)))
        return (R, K), {qn: qspec, sn: ("float32", (R,))}

    def decode(self, name: str, entry: dict, tensors):
        scheme, bits, shape = entry["scheme"], entry["bits"], tuple(entry["shape"])
        data, scale = tensors[entry["q"]], np.array(tensors[entry["scale"]], dtype=np.float32)
        if scheme == "float":
            q = np.array(data, dtype=np.float32)
        else:
            q = _pack_pair(bits, scheme)[1](data, shape)
        return QMatrix(q, scale, bits, scheme)


CODEC = CpuCodec()


def check(graph: Graph) -> None:
    """Every op must have a CPU program or a NumPy reference; raises UnsupportedGraph otherwise."""
    from ..reference import REFERENCE
    from .programs import PROGRAMS

    validate(graph)
    missing = sorted({n.op for n in graph.nodes if n.op not in PROGRAMS and n.op not in REFERENCE})
    if missing:
        raise UnsupportedGraph(f"target 'cpu' cannot run op(s) {missing}")


def write(graph: Graph, path, *, vocab=None, validation: dict | None = None, meta: dict | None = None) -> Path:
    check(graph)
    return write_graph_artifact(path, graph, target=NAME, codec=CODEC, vocab=vocab, validation=validation,
                                meta=meta)


def read(path):
    """``(graph, vocab or None, manifest)`` of a cpu artifact, verified."""
    return read_graph_artifact(path, CODEC, target=NAME)


def write_model(graphs: dict, path, *, model: dict, files: dict | None = None, validation: dict | None = None,
                meta: dict | None = None) -> Path:
    """A model of several graphs (a seq2seq model's parts) as one cpu artifact."""
    from ..graphio import write_model_artifact
    for g in graphs.values():
        check(g)
    return write_model_artifact(path, graphs, target=NAME, codec=CODEC, model=model, files=files,
                                validation=validation, meta=meta)


def load(path, **options):
    from ..artifact import read_manifest
    from .engine import Engine
    if "graphs" in read_manifest(path):
        return load_model(path, **options)
    return Engine.load(path, **options)


def load_model(path, *, backend: str = "auto", threads: int | None = None, on_compile=None, **_ignored):
    """A several-graph artifact: its model kind's runtime over one Engine per graph."""
    from ..graphio import parse_vocab, read_model_artifact
    from ..seq2seq import Seq2SeqRuntime
    from .engine import Engine
    graphs, files, man = read_model_artifact(path, CODEC, target=NAME)
    model = man.get("model") or {}
    if model.get("kind") != "seq2seq":
        raise ArtifactError(f"manifest.json: unknown model kind {model.get('kind')!r} (known: 'seq2seq')")
    parts = {k: Engine(g, backend=backend, threads=threads, on_compile=on_compile) for k, g in graphs.items()}
    vocab = {k: parse_vocab(files[k + ".txt"], k + ".txt") if k + ".txt" in files else None
             for k in ("src_vocab", "tgt_vocab")}
    codes = files["bpe.codes"].decode("utf-8") if "bpe.codes" in files else None
    try:
        return Seq2SeqRuntime(parts, model, src_vocab=vocab["src_vocab"], tgt_vocab=vocab["tgt_vocab"],
                              bpe_codes=codes, manifest=man, path=path)
    except ValueError as exc:
        raise ArtifactError(f"manifest.json: {exc}") from None


def size_bytes(params: dict) -> int:
    """Stored bytes of a parameter table: packed rows (padded to whole bytes) + float32 row
    scales for matrices; 4 bytes per value for float matrices and arrays."""
    total = 0
    for p in params.values():
        if isinstance(p, QMatrix):
            r, k = p.shape
            if p.scheme == "float":
                total += 4 * r * k
            else:
                rr, w = pack.packed_shape((r, k), storage_width(p.bits, p.scheme))
                total += rr * w + 4 * r
        else:
            total += 4 * int(np.asarray(p).size)
    return total


def write_lm_artifact(path, w, vocab, *, validation: dict | None = None, meta: dict | None = None) -> Path:
    """Convenience: a ``QuantLMWeights`` word LM as a cpu artifact."""
    return write(w.to_graph(), path, vocab=vocab, validation=validation, meta=meta)


register_target(Target(name=NAME, description="torch-free Numba engine, bit-packed low-bit weights x int8 "
                                              "activations, one inner loop per instruction set",
                       check=check, write=write, load=load, size_bytes=size_bytes))

__all__ = ["ArtifactError", "CODEC", "check", "load", "read", "size_bytes", "storage_width", "write",
           "write_lm_artifact"]
