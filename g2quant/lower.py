"""Lowering: a (quantized) torch model -> the torch-free graph of ``g2quant.targets.graph``.

Two parts:

1. **Per module** (``LOWERINGS``, keyed by module type, most specific class first): a layer with
   parameters (``QuantG2LSTM`` / ``G2LSTM`` / ``nn.LSTM``, ``QuantLinear`` / ``nn.Linear``,
   ``QuantEmbedding`` / ``nn.Embedding``) becomes one node with its integer weights and scales.
   A new layer family registers ``@register_lowering(MyQuantModule)``.
2. **The wiring** is captured by running the model once on an example input: forward hooks
   record each call of a registered layer, and a ``TorchFunctionMode`` records every tensor
   operation between those calls. Recognised operations become nodes (activations, selecting the
   last time step, ``h_n[k]``, concatenation); layout operations (``transpose(0, 1)``,
   ``view(-1, F)``, ``contiguous``, dropout at inference) only change how values are read.
   Anything else on the path to the output raises :class:`ExportError` naming the operation.

Why a run and not ``torch.fx`` or ``torch.export``: fx cannot trace the Python control flow
common in ``forward`` (shape checks, ``if hidden is None``), and ``torch.export`` decomposes the
LSTMs we need to keep whole. A run on real tensors follows the path the model takes (like
``torch.jit.trace``) and sees actual shapes, so time, batch and feature axes are told apart by
size (the example uses T = 7, B = 3). The lowered graph is then checked against the model on that
input (``g2quant.export``), which catches wiring that depends on data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .nn.g2lstm import G2LSTM
from .nn.qmodules import QuantEmbedding, QuantG2LSTM, QuantLinear
from .targets.graph import Graph, GraphError, Node, get_op, validate
from .targets.ops import LSTM_GATES
from .targets.qweights import QMatrix

EXAMPLE_T, EXAMPLE_B = 7, 3


class ExportError(ValueError):
    """The model cannot be lowered or exported to the requested target."""


# ----------------------------------------------------------------------------- per-module lowering

@dataclass
class Lowered:
    """What a module lowers to: one node (without its inputs) and its parameters by role."""

    op: str
    attrs: dict
    params: dict[str, object]            # role -> QMatrix | float32 array


LOWERINGS: dict[type, Callable] = {}


def register_lowering(*module_types: type):
    """``@register_lowering(QuantFoo, Foo)`` on ``fn(module, ctx: LowerContext) -> Lowered``."""
    def deco(fn):
        for t in module_types:
            LOWERINGS[t] = fn
        return fn
    return deco


def lowering_for(module: nn.Module) -> Callable | None:
    for cls in type(module).__mro__:
        if cls in LOWERINGS:
            return LOWERINGS[cls]
    return None


class LowerContext:
    """Shared by the lowerings of one model: turns (weight, quantizer) pairs into ``QMatrix``
    (once per pair, so tied weights stay one parameter) and checks values are finite."""

    def __init__(self):
        self._mats: dict[tuple, QMatrix] = {}
        self._keep: list = []

    def qmatrix(self, weight: torch.Tensor, quantizer, name: str, *, row_scale: np.ndarray | None = None) -> QMatrix:
        key = (id(weight), id(quantizer), None if row_scale is None else row_scale.tobytes())
        hit = self._mats.get(key)
        if hit is not None:
            return hit
        w = weight.detach().float()
        if w.dim() != 2:
            raise ExportError(f"{name}: weight must be 2-D, got shape {tuple(w.shape)}")
        if not torch.isfinite(w).all():
            raise ExportError(f"{name}: the weight contains NaN or infinite values")
        if quantizer is None:
            q = w.numpy().astype(np.float32).copy()
            if row_scale is not None:
                q *= row_scale[:, None]
            m = QMatrix(q, np.ones(q.shape[0], np.float32), 32, "float")
        else:
            qi, s = quantizer.quantize(w)
            s = s.numpy().astype(np.float32).copy()
            if row_scale is not None:
                s *= row_scale
            if not np.isfinite(s).all():
                raise ExportError(f"{name}: the quantization scales contain NaN or infinite values")
            m = QMatrix(qi.numpy().copy(), s, quantizer.bits, quantizer.scheme)
        self._mats[key] = m
        self._keep.append(weight)              # keeps id(weight) unique while lowering
        return m

    @staticmethod
    def array(t: torch.Tensor | None, n: int, name: str) -> np.ndarray:
        a = np.zeros(n, np.float32) if t is None else t.detach().float().numpy().astype(np.float32).copy()
        if not np.isfinite(a).all():
            raise ExportError(f"{name}: contains NaN or infinite values")
        return a


def _act_bits(act_quant, name: str) -> int | None:
    """8 for dynamic int8 activation quantization, None for float activations."""
    if act_quant is None:
        return None
    if act_quant.mode != "dynamic":
        raise ExportError(f"{name}: static (calibrated) activation ranges cannot be exported; the deployed "
                          "engines quantize activations per vector at run time (quantize with act_mode='dynamic')")
    return 8


@register_lowering(QuantEmbedding, nn.Embedding)
def _lower_embedding(m, ctx: LowerContext, name: str) -> Lowered:
    if getattr(m, "max_norm", None) is not None:
        raise ExportError(f"{name}: nn.Embedding with max_norm cannot be exported")
    return Lowered("embedding", {}, {"weight": ctx.qmatrix(m.weight, getattr(m, "wq", None), f"{name}.weight")})


@register_lowering(QuantLinear, nn.Linear)
def _lower_linear(m, ctx: LowerContext, name: str) -> Lowered:
    params = {"weight": ctx.qmatrix(m.weight, getattr(m, "wq", None), f"{name}.weight")}
    if m.bias is not None:
        params["bias"] = ctx.array(m.bias, m.out_features, f"{name}.bias")
    return Lowered("linear", {"act_bits": _act_bits(getattr(m, "act_in", None), name)}, params)


def _gate_row_scale(m, hidden: int) -> np.ndarray | None:
    """Per-row factor of the pre-activations in eval mode (torch order i, f, g, o): ``1/tau`` on the
    sharpened gates, folded into the row scales and biases at export."""
    if not isinstance(m, G2LSTM) or m.gates != "sharpened":
        return None
    inv = 1.0 / m.tau
    blocks = [inv if g in m.gumbel_gates else 1.0 for g in ("i", "f")] + [1.0] + \
        [inv if "o" in m.gumbel_gates else 1.0]
    return np.repeat(np.asarray(blocks, np.float32), hidden)


@register_lowering(QuantG2LSTM, G2LSTM, nn.LSTM)
def _lower_lstm(m, ctx: LowerContext, name: str) -> Lowered:
    if getattr(m, "proj_size", 0):
        raise ExportError(f"{name}: LSTMs with proj_size cannot be exported")
    H, L, D = m.hidden_size, m.num_layers, 2 if m.bidirectional else 1
    rs = _gate_row_scale(m, H)
    quantized = isinstance(m, QuantG2LSTM)
    params = {}
    for k in range(L * D):
        sfx = f"_l{k // D}" + ("_reverse" if k % D else "")
        w_ih, w_hh = getattr(m, f"weight_ih{sfx}"), getattr(m, f"weight_hh{sfx}")
        wq = m.wq if quantized else {}
        params[f"l{k}.w_ih"] = ctx.qmatrix(w_ih, wq[f"weight_ih{sfx}"] if f"weight_ih{sfx}" in wq else None,
                                           f"{name}.weight_ih{sfx}", row_scale=rs)
        params[f"l{k}.w_hh"] = ctx.qmatrix(w_hh, wq[f"weight_hh{sfx}"] if f"weight_hh{sfx}" in wq else None,
                                           f"{name}.weight_hh{sfx}", row_scale=rs)
        if m.bias:
            b = ctx.array(getattr(m, f"bias_ih{sfx}"), 4 * H, f"{name}.bias_ih{sfx}") + \
                ctx.array(getattr(m, f"bias_hh{sfx}"), 4 * H, f"{name}.bias_hh{sfx}")
        else:
            b = np.zeros(4 * H, np.float32)
        params[f"l{k}.bias"] = (b if rs is None else b * rs).astype(np.float32)
    act = None
    if quantized and len(m.act_in):
        act = _act_bits(m.act_in[0], name)
        if m.h_quant(0) != "dynamic":
            raise ExportError(f"{name}: the recurrent state uses a static activation range, which cannot be exported")
    hard = "".join(g for g in LSTM_GATES if g in getattr(m, "hard_gates", ()))
    attrs = {"hidden_size": H, "num_layers": L, "bidirectional": bool(m.bidirectional), "hard_gates": hard,
             "act_bits": act}
    if isinstance(m, G2LSTM):
        attrs["trained_gates"] = m.gates
    return Lowered("lstm", attrs, params)


def lower_params(model: nn.Module) -> tuple[dict[str, object], set[int]]:
    """Every registered layer of ``model`` lowered on its own (no wiring): ``(params by name,
    ids of the torch parameters they cover)``. What ``size_bytes`` counts."""
    from .families import load_families
    load_families()
    ctx, out, covered = LowerContext(), {}, set()
    for name, m in _leaf_layers(model):
        low = lowering_for(m)(m, ctx, name or type(m).__name__)
        for role, p in low.params.items():
            out.setdefault(_pname(name, m, role), p)
        covered.update(id(p) for p in m.parameters())
    return _dedup(out), covered


def _dedup(params: dict) -> dict:
    seen, out = set(), {}
    for k, p in params.items():
        if isinstance(p, QMatrix):
            if id(p) in seen:
                continue
            seen.add(id(p))
        out[k] = p
    return out


def _leaf_layers(model: nn.Module):
    """(name, module) of the outermost modules that have a lowering."""
    taken: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(t + ".") for t in taken) or lowering_for(m) is None:
            continue
        taken.append(name)
        yield name, m


def _pname(module_name: str, m: nn.Module, role: str) -> str:
    base = module_name or type(m).__name__.lower()
    return f"{base}.{role}"


# ----------------------------------------------------------------------------- wiring capture

@dataclass
class _Val:
    """A tensor the capture knows: which graph value it is and how torch lays it out."""

    kind: str                    # "tokens" | "seq" | "flat" | "vec" | "state" | "bad"
    ref: str = ""                # graph value name (for state: the recurrent node)
    layout: str = "tb"           # seq/tokens/flat: "tb" or "bt"
    lead: tuple = ()             # flat: the (T, B) or (B, T) it was flattened from
    index: int = 0               # state: 0 = h, 1 = c
    why: str = ""                # bad: what could not be lowered


_IDENTITY = {torch.nn.functional.dropout, torch.Tensor.contiguous, torch.Tensor.clone, torch.clone,
             torch.Tensor.detach, torch.detach, torch.nn.functional.alpha_dropout}
_ACTS = {torch.relu: "relu", torch.Tensor.relu: "relu", torch.nn.functional.relu: "relu",
         torch.tanh: "tanh", torch.Tensor.tanh: "tanh", torch.nn.functional.tanh: "tanh",
         torch.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid", torch.nn.functional.sigmoid: "sigmoid",
         torch.log_softmax: "log_softmax", torch.Tensor.log_softmax: "log_softmax",
         torch.nn.functional.log_softmax: "log_softmax", torch.softmax: "softmax",
         torch.Tensor.softmax: "softmax", torch.nn.functional.softmax: "softmax"}
_TRANSPOSE = {torch.Tensor.transpose, torch.transpose, torch.Tensor.swapaxes, torch.swapaxes,
              torch.Tensor.permute, torch.permute, torch.Tensor.t, torch.t}
_RESHAPE = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.flatten, torch.flatten}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_SUPPORTED = ("nn.LSTM/G2LSTM, nn.Linear, nn.Embedding layers; relu, tanh, sigmoid, (log_)softmax over the last "
              "axis; dropout; out[:, -1] / out[-1] (last step), h_n[k]; torch.cat on the feature axis; "
              "transpose(0, 1); view/reshape/flatten that merge or split the time and batch axes")


def _fname(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


class _Capture(TorchFunctionMode):
    def __init__(self, model: nn.Module, ctx: LowerContext):
        super().__init__()
        self.ctx = ctx
        self.vals: dict[int, _Val] = {}
        self.keep: list = []
        self.nodes: list[Node] = []
        self.params: dict[str, object] = {}
        self.depth = 0
        self.calls: dict[str, int] = {}
        self.handles = []
        leaves = list(_leaf_layers(model))
        self.unlowered = [(n, m) for n, m in model.named_modules()
                          if list(m.parameters(recurse=False)) and lowering_for(m) is None
                          and not any(n.startswith(ln + ".") for ln, _ in leaves if ln)]
        for name, m in leaves:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._make_post(name, m), with_kwargs=True))

    # ---- bookkeeping --------------------------------------------------------------------
    def remove(self):
        for h in self.handles:
            h.remove()

    def _set(self, t, v: _Val):
        if isinstance(t, torch.Tensor):
            self.vals[id(t)] = v
            self.keep.append(t)

    def val(self, t) -> _Val | None:
        return self.vals.get(id(t)) if isinstance(t, torch.Tensor) else None

    def _node(self, op: str, base: str, inputs: list[str], attrs: dict, params: dict | None = None) -> str:
        n = self.calls.get(base, 0)
        self.calls[base] = n + 1
        name = base if n == 0 else f"{base}:{n}"
        roles = {}
        for role, p in (params or {}).items():
            pname = next((k for k, v in self.params.items() if v is p), None) if isinstance(p, QMatrix) else None
            if pname is None:
                pname = f"{name}.{role}"
                self.params[pname] = p
            roles[role] = pname
        self.nodes.append(Node(op, name, inputs, attrs, roles))
        return name

    def _unlowered_hint(self) -> str:
        if not self.unlowered:
            return ""
        return ("; these layers have no lowering: " +
                ", ".join(f"{n!r} ({type(m).__name__})" for n, m in self.unlowered[:5]))

    # ---- layer calls ----------------------------------------------------------------------
    def _pre(self, module, args):
        self.depth += 1

    def _make_post(self, name, module):
        def post(mod, args, kwargs, output):
            try:
                if self.depth == 1:
                    self._layer(name, mod, args, kwargs, output)
            finally:
                self.depth -= 1
        return post

    def _layer(self, name, m, args, kwargs, output):
        label = name or type(m).__name__.lower()
        x = args[0] if args else kwargs.get("input")
        v = self.val(x)
        low = lowering_for(m)(m, self.ctx, label)
        if v is None or v.kind == "bad":
            why = v.why if v is not None else "a tensor that does not come from the model's input"
            raise ExportError(f"layer {label!r} ({type(m).__name__}) reads {why}{self._unlowered_hint()}")
        if low.op == "embedding":
            if v.kind != "tokens":
                raise ExportError(f"embedding {label!r} must read the token ids, it reads a {v.kind} value")
            ref = self._node("embedding", label, [v.ref], low.attrs, low.params)
            self._set(output, _Val("seq", ref, v.layout))
        elif low.op == "linear":
            if v.kind not in ("seq", "flat", "vec"):
                raise ExportError(f"linear {label!r} reads a {v.kind} value")
            ref = self._node("linear", label, [v.ref], low.attrs, low.params)
            self._set(output, _Val(v.kind, ref, v.layout, v.lead))
        elif get_op(low.op).recurrent:                     # lstm, gru, ...: (output, state(s))
            self._recurrent(label, m, low, v, args, kwargs, output)
        else:                                             # a registered family with its own op
            ref = self._node(low.op, label, [v.ref], low.attrs, low.params)
            out = output[0] if isinstance(output, tuple) else output
            self._set(out, _Val(v.kind, ref, v.layout, v.lead))

    def _recurrent(self, label, m, low, v, args, kwargs, output):
        layout = "bt" if m.batch_first else "tb"
        kind = type(m).__name__
        if v.kind != "seq":
            raise ExportError(f"{kind} {label!r} reads a {v.kind} value; it needs a sequence [T, B, F]")
        if v.layout != layout:
            raise ExportError(f"{kind} {label!r} has batch_first={m.batch_first} but reads a sequence laid out "
                              f"{'[B, T, F]' if v.layout == 'bt' else '[T, B, F]'}")
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        if hx is not None:
            for t in (hx if isinstance(hx, (tuple, list)) else (hx,)):
                if isinstance(t, torch.Tensor) and self.val(t) is None and bool(torch.count_nonzero(t)):
                    raise ExportError(f"{kind} {label!r} starts from a non-zero state computed inside the model; "
                                      "only a zero state or the caller's state (run(x, state)) can be exported")
                if self.val(t) is not None:
                    raise ExportError(f"{kind} {label!r} starts from a state computed by other layers, which "
                                      "cannot be exported")
        ref = self._node(low.op, label, [v.ref], low.attrs, low.params)
        out, states = output
        self._set(out, _Val("seq", ref, layout))
        for k, t in enumerate(states if isinstance(states, (tuple, list)) else (states,)):
            self._set(t, _Val("state", ref, index=k))

    # ---- tensor operations between layers ----------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            try:
                self._op(func, args, kwargs, out)
            except ExportError:
                raise
            except Exception as exc:       # an op we could not interpret: mark its output unusable
                self._mark_bad(out, f"{_fname(func)} ({exc})")
        return out

    def _mark_bad(self, out, why):
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            self._set(t, _Val("bad", why=f"the result of {why}, which cannot be lowered"))

    def _op(self, func, args, kwargs, out):
        flat = [a for a in args if isinstance(a, torch.Tensor)]
        if func in _CAT:
            seq = args[0] if args else kwargs.get("tensors")
            flat = list(seq)
        known = [self.val(a) for a in flat if self.val(a) is not None]
        if not known or not isinstance(out, (torch.Tensor, tuple, list)):
            return                                            # not about model values
        if not isinstance(out, torch.Tensor):
            self._mark_bad(out, _fname(func))
            return
        first = self.val(flat[0]) if flat else None
        bad = next((k for k in known if k.kind == "bad"), None)
        if bad is not None:
            self._set(out, bad)
            return
        if func in _IDENTITY:
            self._set(out, first)
        elif func in _ACTS:
            self._activation(func, args, kwargs, first, out)
        elif func is torch.Tensor.__getitem__:
            self._getitem(first, args[0], args[1], out)
        elif func in _TRANSPOSE:
            self._transpose(first, args[0], out)
        elif func in _RESHAPE:
            self._reshape(first, args[0], out)
        elif func in _CAT:
            self._cat(flat, args[1] if len(args) > 1 else kwargs.get("dim", 0), out)
        elif func in (torch.Tensor.float, torch.Tensor.to) and out.dtype == flat[0].dtype:
            self._set(out, first)
        else:
            self._mark_bad(out, f"torch operation {_fname(func)}")

    def _activation(self, func, args, kwargs, v, out):
        fn = _ACTS[func]
        if fn in ("softmax", "log_softmax"):
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if dim is None or dim not in (-1, out.dim() - 1):
                self._mark_bad(out, f"{fn} over axis {dim} (only the last axis is supported)")
                return
        if v.kind not in ("seq", "flat", "vec"):
            self._mark_bad(out, f"{fn} of a {v.kind} value")
            return
        ref = self._node("activation", fn, [v.ref], {"fn": fn})
        self._set(out, _Val(v.kind, ref, v.layout, v.lead))

    def _getitem(self, v, x, idx, out):
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is Ellipsis for i in idx):
            k = idx.index(Ellipsis)
            idx = idx[:k] + (slice(None),) * (x.dim() - len(idx) + 1) + idx[k + 1:]
        idx = idx + (slice(None),) * (x.dim() - len(idx))
        full = [isinstance(i, slice) and i == slice(None) for i in idx]
        ints = [k for k, i in enumerate(idx) if isinstance(i, int) and not isinstance(i, bool)]
        if all(full):
            self._set(out, v)
            return
        if len(ints) == 1 and sum(full) == len(idx) - 1:
            axis, i = ints[0], idx[ints[0]]
            if v.kind == "seq":
                t_axis = 0 if v.layout == "tb" else 1
                T = x.shape[t_axis]
                if axis == t_axis and i in (-1, T - 1, 0, -T):
                    ref = self._node("select_step", "select_last" if i in (-1, T - 1) else "select_first",
                                     [v.ref], {"index": -1 if i in (-1, T - 1) else 0})
                    self._set(out, _Val("vec", ref))
                    return
            if v.kind == "state" and axis == 0:
                rows = x.shape[0]
                ref = self._node("state_select", f"{v.ref}.{'hc'[v.index]}_n", [v.ref],
                                 {"state": "hc"[v.index], "index": i % rows})      # state names: h, c
                self._set(out, _Val("vec", ref))
                return
        self._mark_bad(out, f"indexing a {v.kind} value with {idx!r}")

    def _transpose(self, v, x, out):
        if v.kind in ("seq", "tokens") and out.dim() == x.dim() and out.shape[0] == x.shape[1] \
                and out.shape[1] == x.shape[0] and (x.dim() == 2 or out.shape[2] == x.shape[2]):
            self._set(out, _Val(v.kind, v.ref, "bt" if v.layout == "tb" else "tb"))
        else:
            self._mark_bad(out, f"a transpose of a {v.kind} value other than swapping the time and batch axes")

    def _reshape(self, v, x, out):
        if tuple(out.shape) == tuple(x.shape):
            self._set(out, v)
        elif v.kind == "seq" and out.dim() == 2 and out.shape[-1] == x.shape[-1]:
            self._set(out, _Val("flat", v.ref, v.layout, tuple(x.shape[:2])))
        elif v.kind == "flat" and out.dim() == 3 and tuple(out.shape[:2]) == v.lead and out.shape[-1] == x.shape[-1]:
            self._set(out, _Val("seq", v.ref, v.layout))
        else:
            self._mark_bad(out, f"a reshape of a {v.kind} value from {tuple(x.shape)} to {tuple(out.shape)}")

    def _cat(self, tensors, dim, out):
        vs = [self.val(t) for t in tensors]
        if any(v is None for v in vs):
            self._mark_bad(out, "torch.cat of model values with other tensors")
            return
        kinds = {(v.kind, v.layout if v.kind != "vec" else "") for v in vs}
        if len(kinds) != 1 or dim not in (-1, out.dim() - 1) or vs[0].kind not in ("seq", "vec", "flat"):
            self._mark_bad(out, f"torch.cat along axis {dim} of {[v.kind for v in vs]} values "
                                "(only the feature axis of equal kinds)")
            return
        ref = self._node("concat", "concat", [v.ref for v in vs], {})
        self._set(out, _Val(vs[0].kind, ref, vs[0].layout, vs[0].lead))


def example_input(model: nn.Module) -> torch.Tensor:
    """A small example input (T = 7, B = 3) guessed from the model's first layer: token ids when it
    is an embedding, else features of its input size, laid out as the first recurrent layer's
    ``batch_first`` says."""
    first = next((m for _, m in model.named_modules() if isinstance(m, (nn.Embedding, QuantEmbedding))
                  or getattr(m, "input_size", None) or getattr(m, "in_features", None)), None)
    if first is None:
        raise ExportError("the model has no layer that can be lowered (" + _SUPPORTED + ")")
    rnn = next((m for m in model.modules() if hasattr(m, "batch_first") and hasattr(m, "hidden_size")), None)
    bf = bool(rnn.batch_first) if rnn is not None else False
    shape = (EXAMPLE_B, EXAMPLE_T) if bf else (EXAMPLE_T, EXAMPLE_B)
    gen = torch.Generator().manual_seed(0)
    if isinstance(first, (nn.Embedding, QuantEmbedding)):
        return torch.randint(0, first.num_embeddings, shape, generator=gen)
    size = getattr(first, "input_size", None) or getattr(first, "in_features", None)
    return torch.randn(*shape, size, generator=gen)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    if isinstance(out, dict) and out:
        return _first_tensor(next(iter(out.values())))
    raise ExportError(f"the model's forward returns {type(out).__name__}, not a tensor")


@torch.no_grad()
def lower(model: nn.Module, example=None) -> tuple[Graph, torch.Tensor, torch.Tensor]:
    """Lower ``model`` (a ``QuantizedModel`` or any float model made of the supported layers):
    ``(graph, example input, the model's output on it)``. Raises :class:`ExportError`."""
    from .families import load_families
    load_families()
    inner = getattr(model, "model", model)
    x = example_input(inner) if example is None else example
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        raise ExportError("the example input must be a tensor: [T, B] / [B, T] token ids or [T, B, F] / [B, T, F] "
                          "features")
    tokens = not torch.is_floating_point(x)
    if x.dim() != (2 if tokens else 3):
        raise ExportError(f"the example input has shape {tuple(x.shape)}: token ids are 2-D, features 3-D")
    was = model.training
    model.eval()
    ctx = LowerContext()
    cap = _Capture(inner, ctx)
    layers = [m for _, m in _leaf_layers(inner)]
    rnn = next((m for m in layers if hasattr(m, "batch_first") and hasattr(m, "hidden_size")), None)
    layout = "bt" if (rnn is not None and rnn.batch_first) else "tb"
    cap._set(x, _Val("tokens" if tokens else "seq", "input", layout))
    from .nn.recurrence import exact_recurrence
    try:
        with cap, exact_recurrence():
            out = model(x)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"the model failed on the {'given' if example is not None else 'guessed'} example input "
                          f"of shape {tuple(x.shape)} ({type(exc).__name__}: {exc}); pass example_input= "
                          "with an input its forward accepts") from None
    finally:
        cap.remove()
        model.train(was)
    y = _first_tensor(out)
    v = cap.val(y)
    if v is None:
        raise ExportError("the model's output does not come from its layers" + cap._unlowered_hint() +
                          "; supported: " + _SUPPORTED)
    if v.kind == "bad":
        raise ExportError(f"the model's output is {v.why}; supported: {_SUPPORTED}")
    if v.kind in ("tokens", "state") or v.ref == "input":
        raise ExportError(f"the model's output is a {v.kind} value, which is not supported as an output")
    out_layout = {"seq": v.layout, "flat": f"flat_{v.layout}", "vec": "b"}[v.kind]
    if tokens:
        emb = next((n for n in cap.nodes if n.op == "embedding" and n.inputs == ["input"]), None)
        if emb is None:
            raise ExportError("token ids must go through an nn.Embedding first")
        size = cap.params[emb.params["weight"]].shape[0]
    else:
        size = int(x.shape[-1])
    used = _reachable(cap.nodes, v.ref)
    nodes = [n for n in cap.nodes if n.name in used]
    pnames = {p for n in nodes for p in n.params.values()}
    graph = Graph(input={"kind": "tokens" if tokens else "features", "size": size, "layout": layout},
                  nodes=nodes, output={"value": v.ref, "layout": out_layout},
                  params={k: p for k, p in cap.params.items() if k in pnames})
    try:
        validate(graph)
    except GraphError as exc:
        raise ExportError(f"the lowered graph is inconsistent: {exc}") from None
    return graph, x, y.detach().float()


def _reachable(nodes: list[Node], output: str) -> set[str]:
    by = {n.name: n for n in nodes}
    todo, seen = [output], set()
    while todo:
        k = todo.pop()
        if k in seen or k not in by:
            continue
        seen.add(k)
        todo.extend(by[k].inputs)
    return seen


def agreement(y_ref: np.ndarray, y_torch: np.ndarray) -> float:
    """``max|y_ref − y_torch| / max(1, max|y_torch|)``; ``inf`` when either has NaN/inf or the
    shapes differ (a check that can never pass on NaN)."""
    y_ref, y_torch = np.asarray(y_ref, np.float64), np.asarray(y_torch, np.float64)
    if y_ref.shape != y_torch.shape or not np.isfinite(y_ref).all() or not np.isfinite(y_torch).all():
        return math.inf
    return float(np.abs(y_ref - y_torch).max(initial=0.0)) / max(1.0, float(np.abs(y_torch).max(initial=0.0)))
