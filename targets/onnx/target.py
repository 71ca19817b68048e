"""The ``onnx`` target: an artifact holding ``model.onnx`` (whole sequences) and, for
unidirectional graphs, ``step.onnx`` (one streaming step), run by onnxruntime.

The manifest keeps the lowered graph with parameter shapes (validated on load like every
artifact); the weights live in the ONNX files as INT4 / INT8 initializers with float row scales.
``onnx`` is needed to export, ``onnxruntime`` to run (``pip install g2quant[onnx]``).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..artifact import ArtifactError, load_artifact, read_manifest, write_artifact
from ..base import Target, UnsupportedGraph, register_target
from ..graph import Graph, GraphError, validate
from ..graphio import VOCAB_FILE, _graph_from_json, check_finite, check_vocab, parse_vocab
from ..qweights import QMatrix
from ..lm import LMMixin
from ..runtime import Runtime, State

NAME = "onnx"
MODEL, STEP, DATA = "model.onnx", "step.onnx", "weights.onnx.bin"


def _width(m: QMatrix) -> int:
    return 32 if m.scheme == "float" else (8 if m.scheme == "int" and m.bits > 4 else 4)


def size_bytes(params: dict) -> int:
    """INT4 initializers (two per byte) for widths <= 4, INT8 above, float32 for float matrices and
    arrays, plus a float32 scale per row."""
    total = 0
    for p in params.values():
        if isinstance(p, QMatrix):
            r, k = p.shape
            w = _width(p)
            total += 4 * r * k if w == 32 else math.ceil(r * k * w / 8) + 4 * r
        else:
            total += 4 * int(np.asarray(p).size)
    return total


def check(graph: Graph) -> None:
    from .build import SUPPORTED_OPS
    validate(graph)
    missing = sorted({n.op for n in graph.nodes if n.op not in SUPPORTED_OPS})
    if missing:
        raise UnsupportedGraph(f"target 'onnx' has no lowering for op(s) {missing}")


def write(graph: Graph, path, *, vocab=None, validation: dict | None = None, meta: dict | None = None,
          weights: str = "dq") -> Path:
    """``weights``: "dq" (standard DequantizeLinear + MatMul, any onnxruntime) or "nbits"
    (``com.microsoft.MatMulNBits`` for widths <= 4; onnxruntime only)."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UnsupportedGraph("the onnx target needs the onnx package to export: pip install g2quant[onnx]") from None
    from .build import OPSET, build_model, externalize
    check(graph)
    check_finite(graph)
    models = {MODEL: build_model(graph, weights=weights)}
    if graph.streamable:
        models[STEP] = build_model(graph, streaming=True, weights=weights)
    files = {DATA: externalize(list(models.values()), DATA)}        # one copy of the weights for both
    files.update({k: m.SerializeToString() for k, m in models.items()})
    if vocab is not None:
        vocab = check_vocab(vocab)
        if graph.input["kind"] != "tokens" or len(vocab) != graph.input["size"]:
            raise ValueError(f"a vocabulary of {len(vocab)} words does not fit this model's input")
        files[VOCAB_FILE] = ("\n".join(vocab) + "\n").encode("utf-8")
    params = {name: {"kind": "qmatrix" if isinstance(p, QMatrix) else "array", "shape": list(np.shape(p.q)
              if isinstance(p, QMatrix) else np.shape(p))} for name, p in graph.params.items()}
    manifest = {"target": NAME, "graph": graph.to_json(), "params": params,
                "onnx": {"model": MODEL, "step": STEP if STEP in files else None, "data": DATA, "opset": OPSET,
                         "weights": weights},
                "vocab": VOCAB_FILE if vocab is not None else None, "validation": dict(validation or {}),
                "meta": {**graph.meta, **(meta or {})}}
    return write_artifact(path, manifest, {}, files)


class _ShapeCodec:
    """Parameters of an onnx artifact are described by shape only (the weights are in the ONNX files)."""

    arrays_in_tensors = False

    def expect(self, name, entry):
        return tuple(entry["shape"]), {}


class OnnxRuntime(LMMixin, Runtime):
    """``run`` / ``step`` of an onnx artifact through onnxruntime (same API as the CPU engine)."""

    backend = "onnxruntime"

    def __init__(self, graph: Graph, manifest: dict, *, path, vocab=None, threads: int | None = None):
        super().__init__(graph)
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeError("running an onnx artifact needs onnxruntime: pip install g2quant[onnx]") from None
        so = ort.SessionOptions()
        if threads is not None:
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        prov = ["CPUExecutionProvider"]
        info = manifest.get("onnx") or {}
        root = Path(path)                             # the models read their weights from DATA beside them
        self.session = ort.InferenceSession(str(root / info.get("model", MODEL)), so, providers=prov)
        step = info.get("step")
        self.step_session = ort.InferenceSession(str(root / step), so, providers=prov) if step else None
        self.vocab, self.manifest, self.path = vocab, manifest, None if path is None else Path(path)
        self.loop = "onnxruntime"
        self._states = [(n.name, ("h", "c")[:len(s)]) for n, s in zip(self.recurrent, self.initial_state(1))]

    def _execute(self, xs, state):
        sess = self.step_session if (xs.shape[0] == 1 and self.step_session is not None) else self.session
        feed = {"x": xs}
        for (name, letters), arrays in zip(self._states, state):
            for letter, a in zip(letters, arrays):
                feed[f"state.{name}.{letter}"] = a
        outs = sess.run(None, feed)
        rest, new = outs[1:], []
        for _, letters in self._states:
            new.append(tuple(np.ascontiguousarray(rest.pop(0)) for _ in letters))
        return outs[0], State(new)

    def info(self) -> dict:
        return {"backend": self.backend, "loop": self.loop, "opset": (self.manifest.get("onnx") or {}).get("opset")}


def read(path):
    man = read_manifest(path)
    if man.get("target") != NAME:
        raise ArtifactError(f"manifest.json: target is {man.get('target')!r}; this runtime runs {NAME!r} artifacts")
    graph, _, _ = _graph_from_json(man, _ShapeCodec())
    try:
        validate(graph)
    except GraphError as exc:
        raise ArtifactError(f"manifest.json: {exc}") from None
    man, _, files = load_artifact(path)
    info = man.get("onnx")
    if not isinstance(info, dict) or info.get("model") not in files:
        raise ArtifactError("manifest.json: 'onnx.model' must name a file of the artifact")
    if info.get("step") is not None and info["step"] not in files:
        raise ArtifactError("manifest.json: 'onnx.step' must name a file of the artifact")
    vocab = parse_vocab(files[man["vocab"]]) if man.get("vocab") else None
    return graph, vocab, man, files


def load(path, *, threads: int | None = None, **_ignored) -> OnnxRuntime:
    graph, vocab, man, files = read(path)
    return OnnxRuntime(graph, man, vocab=vocab, path=path, threads=threads)


register_target(Target(name=NAME, description="ONNX models (INT4/INT8 weights, per-vector A8 fake quantization) "
                                              "for onnxruntime", check=check, write=write, load=load,
                       size_bytes=size_bytes))
