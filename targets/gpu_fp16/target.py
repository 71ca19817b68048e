"""The ``gpu-fp16`` target: artifacts whose weights stay low-bit packed on the GPU.

Storage: every weight matrix as int32 words of ``32 // bw`` unsigned codes (``kernels.pack_words``,
storage width ``bw`` as the cpu target's rule: 1, 2, 4, 8) and one float32 scale per row; biases
float32. Numerics: weights dequantized exactly inside the kernels; activations enter the dot
products as fp16 and are *not* int8-quantized (``act_bits`` of the graph is not applied: the
GPU path computes the quantized weights with fp16 activations), fp32 accumulation and state.

Runtime: ``g2quant.load(path, device="cuda")`` -> ``GpuRuntime`` (``runtime.py``; needs torch and
triton). ``device="cpu"`` runs the same kernels in Triton's interpreter (set
``TRITON_INTERPRET=1`` before the first import of triton), which is how they are tested here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifact import ArtifactError
from ..base import Target, UnsupportedGraph, register_target
from ..graph import Graph, validate
from ..graphio import read_graph_artifact, write_graph_artifact
from ..qweights import QMatrix

NAME = "gpu-fp16"
PACKING = "u32-words-lsb"


def storage_width(bits: int, scheme: str) -> int:
    if scheme == "float":
        return 32
    if scheme in ("binary", "ternary") or bits <= 2:
        return 1 if scheme == "binary" else 2
    return 4 if bits <= 4 else 8


def _words(k: int, bw: int) -> int:
    return -(-k // (32 // bw))


def size_bytes(params: dict) -> int:
    total = 0
    for p in params.values():
        if isinstance(p, QMatrix):
            r, k = p.shape
            bw = storage_width(p.bits, p.scheme)
            total += 4 * r * k if bw == 32 else 4 * r * _words(k, bw) + 4 * r
        else:
            total += 4 * int(np.asarray(p).size)
    return total


class GpuCodec:
    """``NAME.words`` (int32 ``[R, ceil(K / (32 // bw))]``, or float32 ``[R, K]``) + ``NAME.scale``."""

    def encode(self, name: str, m: QMatrix):
        from .kernels import pack_words
        bw = storage_width(m.bits, m.scheme)
        data = np.ascontiguousarray(m.q, np.float32) if bw == 32 else pack_words(m.q, bw)
        entry = {"bits": m.bits, "scheme": m.scheme, "storage_bits": bw, "packing": "none" if bw == 32 else PACKING,
                 "q": f"{name}.words", "scale": f"{name}.scale"}
        return {f"{name}.words": data, f"{name}.scale": np.asarray(m.scale, np.float32)}, entry

    def expect(self, name: str, entry: dict):
        scheme, bits, shape = entry["scheme"], entry["bits"], entry["shape"]
        if scheme not in ("int", "binary", "ternary", "float"):
            raise ValueError(f"unknown scheme {scheme!r}")
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 32:
            raise ValueError(f"bits={bits!r} is invalid")
        bw = storage_width(bits, scheme)
        if entry.get("storage_bits") != bw or entry.get("packing") != ("none" if bw == 32 else PACKING):
            raise ValueError(f"storage_bits/packing do not match {bits}-bit {scheme}")
        if len(shape) != 2:
            raise ValueError(f"a weight matrix is 2-D, got shape {shape}")
        R, K = shape
        spec = ("float32", (R, K)) if bw == 32 else ("int32", (R, _words(K, bw)))
        return (R, K), {entry["q"]: spec, entry["scale"]: ("float32", (R,))}

    def decode(self, name: str, entry: dict, tensors):
        from .kernels import unpack_words
        bw = storage_width(entry["bits"], entry["scheme"])
        data = tensors[entry["q"]]
        q = np.array(data, np.float32) if bw == 32 else unpack_words(np.ascontiguousarray(data), entry["shape"][1], bw)
        return QMatrix(q, np.array(tensors[entry["scale"]], np.float32), entry["bits"], entry["scheme"])


CODEC = GpuCodec()
SUPPORTED_OPS = ("embedding", "linear", "activation", "select_step", "state_select", "concat", "lstm", "gru")


def check(graph: Graph) -> None:
    validate(graph)
    missing = sorted({n.op for n in graph.nodes if n.op not in SUPPORTED_OPS})
    if missing:
        raise UnsupportedGraph(f"target 'gpu-fp16' has no kernels for op(s) {missing}")
    for n in graph.nodes:
        if n.op in ("lstm", "gru") and any(graph.params[p].scheme == "float" for r, p in n.params.items()
                                  if isinstance(graph.params[p], QMatrix)):
            raise UnsupportedGraph(f"target 'gpu-fp16' runs quantized recurrent weights only; {n.name!r} has a float "
                                   "matrix (quantize it to 8 bits or fewer)")


def write(graph: Graph, path, *, vocab=None, validation: dict | None = None, meta: dict | None = None) -> Path:
    check(graph)
    return write_graph_artifact(path, graph, target=NAME, codec=CODEC, vocab=vocab, validation=validation, meta=meta)


def read(path):
    return read_graph_artifact(path, CODEC, target=NAME)


def load(path, *, device: str = "cuda", cuda_graphs: bool = True, **_ignored):
    from .runtime import GpuRuntime
    graph, vocab, man = read(path)
    try:
        return GpuRuntime(graph, vocab, man, path=path, device=device, cuda_graphs=cuda_graphs)
    except ImportError as exc:
        raise ArtifactError(f"the gpu-fp16 runtime needs torch and triton ({exc})") from None


register_target(Target(name=NAME, description="Triton kernels on packed low-bit weights, fp16 activations, "
                                              "CUDA graphs for streaming", check=check, write=write, load=load,
                       size_bytes=size_bytes))
