"""The lowered graph: the only hand-off between the torch side and every deployment target.

A :class:`Graph` is torch-free: an input description, a list of :class:`Node` in execution
order, the output, and a table of named parameters (``QMatrix`` for weight matrices, float32
arrays for biases). A node consumes *values* by name (``"input"`` or an earlier node's name)
and produces one value. Values are

- ``tokens``: int64 ids, one per (time step, batch element) — only the graph input;
- ``seq``: float32 features per (time step, batch element), held time-major ``[T, B, F]``
  by every runtime (the torch model's own layout is recorded in ``input.layout`` and
  ``output.layout`` and applied at the boundary);
- ``vec``: float32 features per batch element ``[B, F]`` (after ``select_step`` or
  ``state_select``).

What each op means, which attributes and parameters it takes and how shapes propagate is its
:class:`OpSpec`, registered once with :func:`register_op` (built-in ops: ``g2quant.targets.ops``).
:func:`validate` checks a whole graph from parameter *shapes* alone, so an artifact is checked
before any weight is read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from .qweights import QMatrix

INPUT = "input"
INPUT_KINDS = ("tokens", "features")
SEQ_LAYOUTS = ("tb", "bt")                       # torch layout of a sequence: [T, B, ...] or [B, T, ...]
OUTPUT_LAYOUTS = ("tb", "bt", "flat_tb", "flat_bt", "b")
MAX_DIM = 1 << 24                                # any feature / vocabulary size above this is corrupt


class GraphError(ValueError):
    """A graph (or the graph part of an artifact manifest) is malformed or inconsistent."""


@dataclass(frozen=True)
class ParamInfo:
    """Shape-only stand-in for a parameter (what a manifest declares before weights are read)."""

    shape: tuple[int, ...]
    kind: str = "array"          # "qmatrix" or "array"


def param_shape(p) -> tuple[int, ...]:
    if isinstance(p, QMatrix):
        return tuple(p.shape)
    return tuple(np.shape(p) if not isinstance(p, ParamInfo) else p.shape)


def param_kind(p) -> str:
    if isinstance(p, ParamInfo):
        return p.kind
    return "qmatrix" if isinstance(p, QMatrix) else "array"


@dataclass
class Node:
    """One operation. ``params`` maps the op's parameter roles (e.g. ``"weight"``) to names in
    ``Graph.params``; two nodes may name the same parameter (tied weights)."""

    op: str
    name: str
    inputs: list[str]
    attrs: dict = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "op": self.op, "inputs": list(self.inputs), "attrs": dict(self.attrs),
                "params": dict(self.params)}


@dataclass(frozen=True)
class ValueInfo:
    kind: str                    # "tokens" | "seq" | "vec"
    features: int                # vocabulary size for tokens
    states: tuple = ()           # recurrent nodes: ((state name, rows, features), ...) per batch element


@dataclass
class Graph:
    input: dict                  # {"kind": "tokens"|"features", "size": V or F, "layout": "tb"|"bt"}
    nodes: list[Node]
    output: dict                 # {"value": name, "layout": one of OUTPUT_LAYOUTS}
    params: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def param(self, node: Node, role: str):
        return self.params[node.params[role]]

    def recurrent_nodes(self) -> list[Node]:
        return [n for n in self.nodes if get_op(n.op).recurrent]

    @property
    def streamable(self) -> bool:
        """True when every recurrent node runs forward in time only (``step`` is possible)."""
        return all(get_op(n.op).streamable(n) for n in self.nodes)

    def to_json(self) -> dict:
        return {"input": dict(self.input), "nodes": [n.to_json() for n in self.nodes],
                "output": dict(self.output)}


@dataclass(frozen=True)
class OpSpec:
    """What an op is. ``infer(node, inputs, params) -> ValueInfo`` validates the node's attributes,
    parameter shapes (``params``: role -> shape-bearing object) and input values and returns its
    output; it raises :class:`GraphError` naming the problem.

    Recurrent ops also give ``state_shapes(node, batch)`` (one shape per state array) and
    ``streamable(node)`` (False for e.g. bidirectional layers). ``gates`` is the alphabet of gates
    that may be evaluated hard, ``1[a > 0]`` (a layer family's own letters)."""

    name: str
    infer: Callable
    params: tuple[str, ...] = ()                 # required parameter roles ("?role" = optional)
    recurrent: bool = False
    state_shapes: Callable | None = None
    streamable: Callable = lambda node: True
    gates: str = ""


OPS: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    """Register an op (a layer family or a pointwise operation) for every target."""
    if spec.name in OPS and OPS[spec.name] is not spec:
        raise ValueError(f"op {spec.name!r} is already registered")
    OPS[spec.name] = spec
    return spec


# modules that register ops (the built-ins, then one per further layer family)
OP_MODULES = ("ops", "gru")


_loaded = []


def get_op(name: str) -> OpSpec:
    if not _loaded:
        import importlib
        _loaded.append(True)
        for m in OP_MODULES:
            importlib.import_module(f"{__package__}.{m}")
    try:
        return OPS[name]
    except KeyError:
        raise GraphError(f"unknown op {name!r}; known ops: {', '.join(sorted(OPS))}") from None


# ----------------------------------------------------------------------------- validation helpers

def need(cond, msg: str) -> None:
    if not cond:
        raise GraphError(msg)


def int_attr(node: Node, key: str, lo: int = 1, hi: int = MAX_DIM) -> int:
    v = node.attrs.get(key)
    need(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi,
         f"node {node.name!r}: attribute {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def bool_attr(node: Node, key: str, default: bool | None = None) -> bool:
    v = node.attrs.get(key, default)
    need(isinstance(v, bool), f"node {node.name!r}: attribute {key!r} must be true or false, got {v!r}")
    return v


def choice_attr(node: Node, key: str, choices, default=None):
    v = node.attrs.get(key, default)
    need(isinstance(v, str) and v in choices,
         f"node {node.name!r}: attribute {key!r} must be one of {sorted(choices)}, got {v!r}")
    return v


def gate_attr(node: Node, key: str, alphabet: str) -> str:
    v = node.attrs.get(key, "")
    need(isinstance(v, str) and set(v) <= set(alphabet) and len(set(v)) == len(v),
         f"node {node.name!r}: attribute {key!r} must be a string of distinct gate letters from "
         f"{alphabet!r}, got {v!r}")
    return v


def act_bits_attr(node: Node) -> int | None:
    v = node.attrs.get("act_bits")
    need(v is None or (v == 8 and not isinstance(v, bool)),
         f"node {node.name!r}: act_bits must be 8 or null, got {v!r}")
    return v


def shape_of(node: Node, params: Mapping, role: str, ndim: int, kind: str | None = None) -> tuple[int, ...]:
    need(role in params, f"node {node.name!r}: parameter {role!r} is missing")
    p = params[role]
    shp = param_shape(p)
    need(len(shp) == ndim, f"node {node.name!r}: parameter {role!r} must be {ndim}-D, got shape {list(shp)}")
    need(all(isinstance(s, (int, np.integer)) and 0 < s <= MAX_DIM for s in shp),
         f"node {node.name!r}: parameter {role!r} has an invalid shape {list(shp)}")
    if kind is not None:
        need(param_kind(p) == kind, f"node {node.name!r}: parameter {role!r} must be a {kind}")
    return tuple(int(s) for s in shp)


def validate(graph: Graph) -> dict[str, ValueInfo]:
    """Check the whole graph; return the ValueInfo of every value. Raises GraphError."""
    inp = graph.input
    need(isinstance(inp, dict), "graph input must be an object")
    kind = inp.get("kind")
    need(kind in INPUT_KINDS, f"graph input kind must be one of {INPUT_KINDS}, got {kind!r}")
    size = inp.get("size")
    need(isinstance(size, int) and not isinstance(size, bool) and 0 < size <= MAX_DIM,
         f"graph input size must be a positive integer, got {size!r}")
    need(inp.get("layout") in SEQ_LAYOUTS, f"graph input layout must be one of {SEQ_LAYOUTS}, got "
                                           f"{inp.get('layout')!r}")
    values = {INPUT: ValueInfo("tokens" if kind == "tokens" else "seq", size)}
    need(isinstance(graph.nodes, list) and graph.nodes, "graph has no nodes")
    used_params: set[str] = set()
    for node in graph.nodes:
        need(isinstance(node, Node), f"graph nodes must be Node objects, got {type(node).__name__}")
        need(isinstance(node.name, str) and node.name and node.name not in values,
             f"node name {node.name!r} is empty or not unique")
        need(isinstance(node.attrs, dict) and isinstance(node.params, dict) and isinstance(node.inputs, list),
             f"node {node.name!r}: attrs/params must be objects and inputs a list")
        spec = get_op(node.op)
        for i in node.inputs:
            need(isinstance(i, str) and i in values,
                 f"node {node.name!r} reads {i!r}, which is not the input or an earlier node")
        for role in spec.params:
            if not role.startswith("?") and role != "*":
                need(role in node.params, f"node {node.name!r} ({node.op}): parameter {role!r} is missing")
        allowed = {r.lstrip("?") for r in spec.params}
        extra = set(node.params) - allowed if "*" not in allowed else set()
        need(not extra, f"node {node.name!r} ({node.op}): unexpected parameters {sorted(extra)}")
        params = {}
        for role, pname in node.params.items():
            need(isinstance(pname, str) and pname in graph.params,
                 f"node {node.name!r}: parameter {role!r} names {pname!r}, which is not in the parameter table")
            params[role] = graph.params[pname]
            used_params.add(pname)
        values[node.name] = spec.infer(node, [values[i] for i in node.inputs], params)
    unused = sorted(set(graph.params) - used_params)
    need(not unused, f"parameters not used by any node: {unused}")
    out = graph.output
    need(isinstance(out, dict) and out.get("value") in values and out["value"] != INPUT,
         f"graph output must name a node, got {out!r}")
    info = values[out["value"]]
    need(out.get("layout") in OUTPUT_LAYOUTS, f"graph output layout must be one of {OUTPUT_LAYOUTS}, "
                                              f"got {out.get('layout')!r}")
    need((info.kind == "vec") == (out["layout"] == "b"),
         f"graph output layout {out['layout']!r} does not fit a {info.kind} value")
    return values


def output_info(graph: Graph) -> ValueInfo:
    return validate(graph)[graph.output["value"]]
