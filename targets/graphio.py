"""A lowered graph as an artifact (format version 2), for any target.

The manifest holds the graph (``graph``: input, nodes, output), the parameter table (``params``:
name -> entry) and the usual artifact fields; ``weights.safetensors`` holds the tensors. A target
supplies a *codec* for weight matrices (how a ``QMatrix`` is stored: its packing and its size
rule); float arrays (biases) are stored as float32 by every target.

Loading validates everything the manifest says before any weight is read: the graph's structure
and every shape (``graph.validate`` on shapes alone), that each stored tensor belongs to exactly
one parameter with the dtype and shape its entry implies, and that the weights file matches
(``artifact.load_artifact``); only then are tensors read and decoded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from .artifact import ArtifactError, load_artifact, read_manifest, write_artifact
from .graph import Graph, GraphError, Node, ParamInfo, validate
from .qweights import QMatrix

VOCAB_FILE = "vocab.txt"


class MatrixCodec(Protocol):
    def encode(self, name: str, m: QMatrix) -> tuple[dict[str, np.ndarray], dict]: ...
    def expect(self, name: str, entry: dict) -> tuple[tuple[int, int], dict[str, tuple[str, tuple]]]: ...
    def decode(self, name: str, entry: dict, tensors: dict[str, np.ndarray]) -> QMatrix: ...


def check_vocab(vocab) -> list[str]:
    vocab = list(vocab)
    seen = set()
    for i, word in enumerate(vocab):
        if not isinstance(word, str) or not word or any(ch in word for ch in "\n\r"):
            raise ValueError(f"vocab[{i}] = {word!r}: words must be non-empty strings without line breaks")
        if word in seen:
            raise ValueError(f"vocab[{i}] = {word!r} is a duplicate")
        seen.add(word)
    return vocab


def check_finite(graph: Graph) -> None:
    """Refuse NaN / inf anywhere in the parameters (a NaN model must never look deployable)."""
    for name, p in graph.params.items():
        arrays = (p.q, p.scale) if isinstance(p, QMatrix) else (np.asarray(p),)
        for a in arrays:
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise GraphError(f"parameter {name!r} contains NaN or infinite values")


def write_graph_artifact(path, graph: Graph, *, target: str, codec: MatrixCodec, vocab=None,
                         validation: dict | None = None, meta: dict | None = None) -> Path:
    """Write ``graph`` (+ optional ``vocab``) as an artifact directory at ``path`` (atomic)."""
    validate(graph)
    check_finite(graph)
    tensors: dict[str, np.ndarray] = {}
    entries: dict[str, dict] = {}
    params: dict[str, dict] = {}
    for name, p in graph.params.items():
        if isinstance(p, QMatrix):
            ts, entry = codec.encode(name, p)
            params[name] = {"kind": "qmatrix", "shape": list(p.shape), **entry}
            for tname, arr in ts.items():
                tensors[tname] = arr
        else:
            arr = np.ascontiguousarray(p, dtype=np.float32)
            tensors[name] = arr
            params[name] = {"kind": "array", "shape": list(arr.shape), "tensor": name}
    files = {}
    if vocab is not None:
        vocab = check_vocab(vocab)
        if graph.input["kind"] != "tokens" or len(vocab) != graph.input["size"]:
            raise ValueError(f"a vocabulary of {len(vocab)} words does not fit this model's input "
                             f"({graph.input['kind']}, size {graph.input['size']})")
        files[VOCAB_FILE] = ("\n".join(vocab) + "\n").encode("utf-8")
    manifest = {
        "target": target,
        "graph": graph.to_json(),
        "params": params,
        "vocab": VOCAB_FILE if vocab is not None else None,
        "validation": dict(validation or {}),
        "meta": {**graph.meta, **(meta or {})},
        "tensors": entries,
    }
    return write_artifact(path, manifest, tensors, files)


def _need(cond, msg):
    if not cond:
        raise ArtifactError(f"manifest.json: {msg}")


def _graph_from_json(man: dict, codec: MatrixCodec) -> tuple[Graph, dict[str, tuple[str, tuple]], dict]:
    g, params = man.get("graph"), man.get("params")
    _need(isinstance(g, dict), "'graph' must be an object")
    _need(isinstance(params, dict), "'params' must be an object")
    nodes_json = g.get("nodes")
    _need(isinstance(nodes_json, list), "graph.nodes must be a list")
    nodes = []
    for i, nj in enumerate(nodes_json):
        _need(isinstance(nj, dict), f"graph.nodes[{i}] must be an object")
        try:
            node = Node(op=nj["op"], name=nj["name"], inputs=nj.get("inputs", []), attrs=nj.get("attrs", {}),
                        params=nj.get("params", {}))
        except KeyError as exc:
            raise ArtifactError(f"manifest.json: graph.nodes[{i}] lacks {exc}") from None
        _need(isinstance(node.op, str) and isinstance(node.name, str), f"graph.nodes[{i}]: op and name must be strings")
        nodes.append(node)
    expected: dict[str, tuple[str, tuple]] = {}
    infos = {}
    for name, entry in params.items():
        _need(isinstance(entry, dict), f"params.{name} must be an object")
        kind = entry.get("kind")
        shape = entry.get("shape")
        _need(isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                              for s in shape), f"params.{name}.shape must be a list of positive ints")
        if kind == "qmatrix":
            try:
                shp, tens = codec.expect(name, entry)
            except ArtifactError:
                raise
            except (KeyError, TypeError, ValueError) as exc:
                raise ArtifactError(f"manifest.json: params.{name}: {exc}") from None
            _need(list(shp) == shape, f"params.{name}: shape {shape} does not match its encoding {list(shp)}")
        elif kind == "array":
            if getattr(codec, "arrays_in_tensors", True):
                tname = entry.get("tensor")
                _need(isinstance(tname, str), f"params.{name}.tensor must name a tensor")
                tens = {tname: ("float32", tuple(shape))}
            else:
                tens = {}
        else:
            raise ArtifactError(f"manifest.json: params.{name}.kind must be 'qmatrix' or 'array', got {kind!r}")
        for tname, spec in tens.items():
            _need(tname not in expected, f"tensor {tname!r} is claimed by two parameters")
            expected[tname] = spec
        infos[name] = ParamInfo(tuple(shape), kind)
    graph = Graph(input=g.get("input"), nodes=nodes, output=g.get("output"), params=infos,
                  meta=dict(man.get("meta") or {}))
    return graph, expected, params


def read_graph_artifact(path, codec: MatrixCodec, *, target: str | None = None):
    """Verify and load an artifact: ``(graph, vocab or None, manifest)``."""
    head = read_manifest(path)
    if target is not None and head.get("target") != target:
        raise ArtifactError(f"manifest.json: target is {head.get('target')!r}; this runtime runs {target!r} artifacts")
    if head.get("format_version") == 1:
        from .cpu.legacy_v1 import read_v1
        return read_v1(path)
    graph, expected, entries = _graph_from_json(head, codec)
    try:
        validate(graph)
    except GraphError as exc:
        raise ArtifactError(f"manifest.json: {exc}") from None
    listed = head.get("tensors", {})
    for tname, (dtype, shape) in expected.items():
        e = listed.get(tname)
        _need(isinstance(e, dict) and e.get("dtype") == dtype and tuple(e.get("shape", ())) == tuple(shape),
              f"tensor {tname!r} must be {dtype} {list(shape)}, the manifest lists {e}")
    unused = sorted(set(listed) - set(expected))
    _need(not unused, f"tensors not used by any parameter: {unused}")
    man, tensors, files = load_artifact(path)
    params = {}
    for name, entry in entries.items():
        try:
            if entry["kind"] == "qmatrix":
                params[name] = codec.decode(name, entry, tensors)
            else:
                params[name] = np.array(tensors[entry["tensor"]], dtype=np.float32)
        except ArtifactError:
            raise
        except ValueError as exc:
            raise ArtifactError(f"{name}: {exc}") from None
    graph.params = params
    try:
        validate(graph)
        check_finite(graph)
    except GraphError as exc:
        raise ArtifactError(f"weights.safetensors: {exc}") from None
    vocab = None
    vfile = man.get("vocab")
    if vfile is not None:
        _need(isinstance(vfile, str) and vfile in files, f"vocabulary file {vfile!r} is not listed")
        vocab = parse_vocab(files[vfile], vfile)
        _need(graph.input["kind"] == "tokens" and len(vocab) == graph.input["size"],
              f"{vfile} has {len(vocab)} words, the model's input has {graph.input['size']} ids")
    return graph, vocab, man


def parse_vocab(data: bytes, name: str = VOCAB_FILE) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{name}: not UTF-8 ({exc})") from None
    if "\r" in text:
        raise ArtifactError(f"{name}: contains carriage returns (CRLF line endings); words are one per line, \\n")
    words = text.split("\n")
    if words and words[-1] == "":
        words.pop()
    try:
        return check_vocab(words)
    except ValueError as exc:
        raise ArtifactError(f"{name}: {exc}") from None


# ----------------------------------------------------------------------------- several graphs

def write_model_artifact(path, graphs: dict[str, Graph], *, target: str, codec: MatrixCodec, model: dict,
                         files: dict[str, bytes] | None = None, validation: dict | None = None,
                         meta: dict | None = None) -> Path:
    """A model made of several graphs that share one parameter table (e.g. a seq2seq model's
    encoder and decoder-step parts); ``model`` describes how a runtime composes them."""
    params: dict = {}
    for gname, g in graphs.items():
        validate(g)
        check_finite(g)
        for pname, p in g.params.items():
            if pname in params and params[pname] is not p:
                raise ValueError(f"graph {gname!r}: parameter {pname!r} differs from another graph's of that name")
            params[pname] = p
    tensors, table = {}, {}
    for name, p in params.items():
        if isinstance(p, QMatrix):
            ts, entry = codec.encode(name, p)
            table[name] = {"kind": "qmatrix", "shape": list(p.shape), **entry}
            tensors.update(ts)
        else:
            arr = np.ascontiguousarray(p, dtype=np.float32)
            tensors[name] = arr
            table[name] = {"kind": "array", "shape": list(arr.shape), "tensor": name}
    manifest = {"target": target, "model": dict(model), "graphs": {k: g.to_json() for k, g in graphs.items()},
                "params": table, "validation": dict(validation or {}), "meta": dict(meta or {}), "tensors": {}}
    return write_artifact(path, manifest, tensors, dict(files or {}))


def read_model_artifact(path, codec: MatrixCodec, *, target: str | None = None):
    """``(graphs, files, manifest)`` of an artifact written by :func:`write_model_artifact`, every
    graph validated from shapes before the weights are read."""
    head = read_manifest(path)
    if target is not None and head.get("target") != target:
        raise ArtifactError(f"manifest.json: target is {head.get('target')!r}; this runtime runs {target!r} artifacts")
    gjs = head.get("graphs")
    _need(isinstance(gjs, dict) and gjs, "'graphs' must be a non-empty object")
    graphs, expected, entries = {}, {}, None
    used: set = set()
    for name, gj in gjs.items():
        _need(isinstance(gj, dict), f"graphs.{name} must be an object")
        g, exp, entries = _graph_from_json({"graph": gj, "params": head.get("params"), "meta": {}}, codec)
        g.params = {k: v for k, v in g.params.items() if k in {p for n in g.nodes for p in n.params.values()}}
        try:
            validate(g)
        except GraphError as exc:
            raise ArtifactError(f"manifest.json: graphs.{name}: {exc}") from None
        used |= set(g.params)
        expected.update(exp)
        graphs[name] = g
    unused = sorted(set(entries) - used)
    _need(not unused, f"parameters not used by any graph: {unused}")
    listed = head.get("tensors", {})
    for tname, (dtype, shape) in expected.items():
        e = listed.get(tname)
        _need(isinstance(e, dict) and e.get("dtype") == dtype and tuple(e.get("shape", ())) == tuple(shape),
              f"tensor {tname!r} must be {dtype} {list(shape)}, the manifest lists {e}")
    _need(not sorted(set(listed) - set(expected)), f"tensors not used by any parameter: {sorted(set(listed) - set(expected))}")
    man, tensors, files = load_artifact(path)
    values = {}
    for name, entry in entries.items():
        try:
            values[name] = codec.decode(name, entry, tensors) if entry["kind"] == "qmatrix" else \
                np.array(tensors[entry["tensor"]], dtype=np.float32)
        except ValueError as exc:
            raise ArtifactError(f"{name}: {exc}") from None
    for name, g in graphs.items():
        g.params = {k: values[k] for k in g.params}
        try:
            validate(g)
            check_finite(g)
        except GraphError as exc:
            raise ArtifactError(f"weights.safetensors: graphs.{name}: {exc}") from None
    return graphs, files, man
