"""Lowered graph -> ONNX models that onnxruntime runs (``onnx`` is needed to build, not to run).

Two models per artifact, both time-major like every g2quant runtime:

- ``model.onnx``: whole sequences, ``x [T, B]`` ids or ``[T, B, F]`` features plus the initial
  state of every recurrent node -> the output and the final states. Each LSTM layer-direction is
  one ``Scan`` over time (``scan_input_directions`` = 1 for the reverse direction) after one
  ``MatMul`` for the input projections of all steps.
- ``step.onnx`` (unidirectional graphs): one time step, no ``Scan``: ``x [1, B, ...]`` and states
  -> output and new states.

Numerics are the graph's (``docs/cpu-engine.md``): weights are stored as INT4 (storage width
<= 4) or INT8 initializers with one float scale per row and dequantized by
``DequantizeLinear(axis=0)``; every input of a matrix product with ``act_bits = 8`` is fake
quantized per vector (``Round(x / s)`` clipped to ±127, ``s = max|x| / 127``, 1 for a zero row:
the same rounding, half to even, as the reference); hard gates are ``Cast(Greater(a, 0))``.
"""
from __future__ import annotations

import numpy as np

from ..graph import INPUT, Graph
from ..ops import lstm_dims, lstm_param_names
from ..qweights import QMatrix

OPSET = 21
NBITS_BLOCK = 32                    # MatMulNBits block size along K (a scale per block; ours repeat per row)
WEIGHT_MODES = ("dq", "nbits")


class _Builder:
    """Collects nodes, initializers and value names of one ONNX graph."""

    def __init__(self, name: str, mode: str = "dq"):
        from onnx import helper
        self.h, self.name, self.mode = helper, name, mode
        self.nodes, self.inits, self.count = [], [], 0
        self._consts: dict = {}

    def fresh(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(self.h.make_node(op_type, inputs, outs, name=self.fresh("n"), **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            from onnx import numpy_helper
            name = self.fresh("c")
            self.inits.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def matrix(self, m: QMatrix, pname: str) -> str:
        """The dequantized float weight ``[R, K]`` of a QMatrix (INT4/INT8 initializer + DQ)."""
        from onnx import TensorProto, numpy_helper
        key = ("matrix", pname)
        if key in self._consts:
            return self._consts[key]
        if m.scheme == "float":
            name = "w." + pname
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(m.q, np.float32), name))
        else:
            wide = m.bits > 4 and m.scheme == "int"
            qn = "w." + pname + ".q"                     # stable names: step.onnx and model.onnx share them
            if wide:
                self.inits.append(numpy_helper.from_array(np.ascontiguousarray(m.q, np.int8), qn))
            else:
                u = (m.q.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)      # two's-complement nibbles
                if u.size % 2:
                    u = np.concatenate([u, np.zeros(1, np.uint8)])
                raw = (u[0::2] | (u[1::2] << 4)).tobytes()                        # low nibble first (ONNX INT4)
                self.inits.append(self.h.make_tensor(qn, TensorProto.INT4, m.q.shape, raw, raw=True))
            sn = "w." + pname + ".scale"
            self.inits.append(numpy_helper.from_array(np.asarray(m.scale, np.float32), sn))
            name = self.op("DequantizeLinear", [qn, sn], axis=0)
        self._consts[key] = name
        return name

    def fake_quant(self, x: str) -> str:
        """Per-vector symmetric int8 fake quantization of ``x`` along its last axis."""
        m = self.op("ReduceMax", [self.op("Abs", [x]), self.const([-1], np.int64)], keepdims=1)
        s = self.op("Where", [self.op("Greater", [m, self.const(0.0)]), self.op("Div", [m, self.const(127.0)]),
                              self.const(1.0)])
        q = self.op("Clip", [self.op("Round", [self.op("Div", [x, s])]), self.const(-127.0), self.const(127.0)])
        return self.op("Mul", [q, s])

    def transposed(self, m: QMatrix, pname: str) -> str:
        """``W^T [K, R]`` of a QMatrix, built once per parameter."""
        key = ("T", pname)
        if key not in self._consts:
            self._consts[key] = self.op("Transpose", [self.matrix(m, pname)], perm=[1, 0])
        return self._consts[key]

    def weight(self, m: QMatrix, pname: str) -> tuple:
        """How products with ``m`` are computed: ``("dq", W^T)`` (DequantizeLinear + MatMul) or, in
        ``nbits`` mode for widths <= 4, ``("nbits", blob, scales, K, N, bits)`` for
        ``com.microsoft.MatMulNBits`` (per-row scales repeated per block, zero point 2^(bits-1),
        ``accuracy_level=0``: float products of exactly dequantized weights)."""
        key = ("W", pname)
        if key in self._consts:
            return self._consts[key]
        if self.mode != "nbits" or m.scheme == "float" or (m.scheme == "int" and m.bits > 4):
            handle = ("dq", self.transposed(m, pname))
        else:
            from onnx import numpy_helper
            bits = 2 if (m.scheme != "binary" and m.bits <= 2) else 4
            R, K = m.shape
            bs = NBITS_BLOCK
            nb = -(-K // bs)
            zp = 1 << (bits - 1)
            u = np.full((R, nb * bs), zp, np.uint8)
            u[:, :K] = (m.q.astype(np.int16) + zp).astype(np.uint8)
            per = 8 // bits
            u = u.reshape(R, nb, bs // per, per).astype(np.uint16)
            blob = np.zeros(u.shape[:3], np.uint16)
            for j in range(per):
                blob |= u[..., j] << (j * bits)
            bn, sn = "w." + pname + ".nbits", "w." + pname + ".nbits_scale"
            self.inits.append(numpy_helper.from_array(blob.astype(np.uint8), bn))
            self.inits.append(numpy_helper.from_array(np.repeat(np.asarray(m.scale, np.float32), nb), sn))
            handle = ("nbits", bn, sn, K, R, bits)
        self._consts[key] = handle
        return handle

    def product(self, x: str, w, act_bits) -> str:
        """``A8(x) @ W^T`` (or float ``x @ W^T``) for ``x [..., K]`` and a ``weight()`` handle."""
        xin = self.fake_quant(x) if act_bits == 8 else x
        if w[0] == "dq":
            return self.op("MatMul", [xin, w[1]])
        _, bn, sn, K, N, bits = w
        out = self.fresh("matmulnbits")
        self.nodes.append(self.h.make_node("MatMulNBits", [xin, bn, sn], [out], name=self.fresh("n"),
                                           domain="com.microsoft", K=K, N=N, bits=bits, block_size=NBITS_BLOCK,
                                           accuracy_level=0))
        return out


def _gate(b: _Builder, z: str, hard: bool) -> str:
    if hard:
        return b.op("Cast", [b.op("Greater", [z, b.const(0.0)])], to=1)
    return b.op("Sigmoid", [z])


def _cell(b: _Builder, zx_t: str, h: str, c: str, w_hh_t: str, bias: str, H: int, hard: str, act_bits):
    """One LSTM step in builder ``b`` (``w_hh_t = W_hh^T``): returns (h_new, c_new)."""
    a = b.op("Add", [b.op("Add", [zx_t, b.product(h, w_hh_t, act_bits)]), bias])
    i, f, g, o = b.op("Split", [a, b.const([H] * 4, np.int64)], n_out=4, axis=-1)
    i, f, o = _gate(b, i, "i" in hard), _gate(b, f, "f" in hard), _gate(b, o, "o" in hard)
    c_new = b.op("Add", [b.op("Mul", [f, c]), b.op("Mul", [i, b.op("Tanh", [g])])])
    return b.op("Mul", [o, b.op("Tanh", [c_new])]), c_new


def _scan_layer(b: _Builder, zx: str, h0: str, c0: str, w_hh_t: str, bias: str, H: int, hard: str, act_bits,
                reverse: bool):
    """A Scan over time of one layer-direction: returns (out [T, B, H], h_T, c_T). The body reads
    the dequantized ``W_hh^T`` and the bias from the outer graph (computed once, not per step)."""
    from onnx import TensorProto
    body = _Builder(b.fresh("lstm_body"), b.mode)
    body.count = b.count + 100000                    # distinct names inside the body
    tag = b.fresh("s")
    h_in, c_in, zx_in = f"{tag}_h", f"{tag}_c", f"{tag}_zx"
    h_new, c_new = _cell(body, zx_in, h_in, c_in, w_hh_t, bias, H, hard, act_bits)
    outs = [body.op("Identity", [h_new]), body.op("Identity", [c_new]), body.op("Identity", [h_new])]
    vi = body.h.make_tensor_value_info
    g = body.h.make_graph(body.nodes, body.name,
                          [vi(h_in, TensorProto.FLOAT, ["B", H]), vi(c_in, TensorProto.FLOAT, ["B", H]),
                           vi(zx_in, TensorProto.FLOAT, ["B", 4 * H])],
                          [vi(outs[0], TensorProto.FLOAT, ["B", H]), vi(outs[1], TensorProto.FLOAT, ["B", H]),
                           vi(outs[2], TensorProto.FLOAT, ["B", H])], initializer=body.inits)
    b.count = body.count
    h_T, c_T, out = b.op("Scan", [h0, c0, zx], n_out=3, body=g, num_scan_inputs=1,
                         scan_input_directions=[1 if reverse else 0], scan_output_directions=[1 if reverse else 0])
    return out, h_T, c_T


def _lstm(b: _Builder, graph: Graph, node, x: str, state_in: tuple[str, str], streaming: bool):
    H, L, D = lstm_dims(node)
    hard, act = node.attrs.get("hard_gates", ""), node.attrs.get("act_bits")
    roles = lstm_param_names(L, D)
    h_all, c_all = state_in
    hs, cs = [], []
    for layer in range(L):
        outs = []
        xin = b.fake_quant(x) if act == 8 else x
        for d in range(D):
            k = layer * D + d
            ih, hh, br = roles[k]
            zx = b.product(xin, b.weight(graph.param(node, ih), node.params[ih]), None)
            w_hh_t = b.weight(graph.param(node, hh), node.params[hh])
            idx = b.const([k], np.int64)
            h0 = b.op("Squeeze", [b.op("Gather", [h_all, idx], axis=0), b.const([0], np.int64)])
            c0 = b.op("Squeeze", [b.op("Gather", [c_all, idx], axis=0), b.const([0], np.int64)])
            bias = b.const(np.asarray(graph.param(node, br), np.float32))
            if streaming:
                zx_t = b.op("Squeeze", [zx, b.const([0], np.int64)])
                h_T, c_T = _cell(b, zx_t, h0, c0, w_hh_t, bias, H, hard, act)
                out = b.op("Unsqueeze", [h_T, b.const([0], np.int64)])
            else:
                out, h_T, c_T = _scan_layer(b, zx, h0, c0, w_hh_t, bias, H, hard, act, reverse=d == 1)
            outs.append(out)
            hs.append(b.op("Unsqueeze", [h_T, b.const([0], np.int64)]))
            cs.append(b.op("Unsqueeze", [c_T, b.const([0], np.int64)]))
        x = outs[0] if D == 1 else b.op("Concat", outs, axis=-1)
    h_n = hs[0] if len(hs) == 1 else b.op("Concat", hs, axis=0)
    c_n = cs[0] if len(cs) == 1 else b.op("Concat", cs, axis=0)
    return x, (h_n, c_n)


def _gru_cell(b: _Builder, gx_t: str, h: str, w_hh, b_hh: str, H: int, hard: str, act_bits) -> str:
    """One GRU step (``gx_t`` = W_ih·x + b_ih): returns h_new."""
    gh = b.op("Add", [b.product(h, w_hh, act_bits), b_hh])
    xr, xz, xn = b.op("Split", [gx_t, b.const([H] * 3, np.int64)], n_out=3, axis=-1)
    hr, hz, hn = b.op("Split", [gh, b.const([H] * 3, np.int64)], n_out=3, axis=-1)
    r = _gate(b, b.op("Add", [xr, hr]), "r" in hard)
    z = _gate(b, b.op("Add", [xz, hz]), "z" in hard)
    n = b.op("Tanh", [b.op("Add", [xn, b.op("Mul", [r, hn])])])
    one_minus_z = b.op("Sub", [b.const(1.0), z])
    return b.op("Add", [b.op("Mul", [one_minus_z, n]), b.op("Mul", [z, h])])


def _gru(b: _Builder, graph: Graph, node, x: str, h_all: str, streaming: bool):
    from onnx import TensorProto
    from ..gru import gru_dims, gru_param_names
    H, L, D = gru_dims(node)
    hard, act = node.attrs.get("hard_gates", ""), node.attrs.get("act_bits")
    hs = []
    for layer in range(L):
        outs = []
        xin = b.fake_quant(x) if act == 8 else x
        for d in range(D):
            k = layer * D + d
            ih, hh, bi, bh = gru_param_names(L, D)[k]
            gx = b.op("Add", [b.product(xin, b.weight(graph.param(node, ih), node.params[ih]), None),
                              b.const(np.asarray(graph.param(node, bi), np.float32))])
            w_hh = b.weight(graph.param(node, hh), node.params[hh])
            b_hh = b.const(np.asarray(graph.param(node, bh), np.float32))
            h0 = b.op("Squeeze", [b.op("Gather", [h_all, b.const([k], np.int64)], axis=0), b.const([0], np.int64)])
            if streaming:
                h_T = _gru_cell(b, b.op("Squeeze", [gx, b.const([0], np.int64)]), h0, w_hh, b_hh, H, hard, act)
                out = b.op("Unsqueeze", [h_T, b.const([0], np.int64)])
            else:
                body = _Builder(b.fresh("gru_body"), b.mode)
                body.count = b.count + 100000
                tag = b.fresh("s")
                h_in, gx_in = f"{tag}_h", f"{tag}_gx"
                h_new = _gru_cell(body, gx_in, h_in, w_hh, b_hh, H, hard, act)
                o1, o2 = body.op("Identity", [h_new]), body.op("Identity", [h_new])
                vi = body.h.make_tensor_value_info
                g = body.h.make_graph(body.nodes, body.name, [vi(h_in, TensorProto.FLOAT, ["B", H]),
                                                              vi(gx_in, TensorProto.FLOAT, ["B", 3 * H])],
                                      [vi(o1, TensorProto.FLOAT, ["B", H]), vi(o2, TensorProto.FLOAT, ["B", H])],
                                      initializer=body.inits)
                b.count = body.count
                h_T, out = b.op("Scan", [h0, gx], n_out=2, body=g, num_scan_inputs=1,
                                scan_input_directions=[d], scan_output_directions=[d])
            outs.append(out)
            hs.append(b.op("Unsqueeze", [h_T, b.const([0], np.int64)]))
        x = outs[0] if D == 1 else b.op("Concat", outs, axis=-1)
    return x, (hs[0] if len(hs) == 1 else b.op("Concat", hs, axis=0),)


def build_model(graph: Graph, *, streaming: bool = False, weights: str = "dq"):
    """The ONNX ``ModelProto`` of ``graph`` (one step when ``streaming``); ``weights`` = "dq"
    (DequantizeLinear + MatMul) or "nbits" (``com.microsoft.MatMulNBits`` for widths <= 4)."""
    from onnx import TensorProto, checker, helper

    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
    b = _Builder("g2quant_step" if streaming else "g2quant_model", weights)
    tokens = graph.input["kind"] == "tokens"
    vi = helper.make_tensor_value_info
    T = 1 if streaming else "T"
    inputs = [vi("x", TensorProto.INT64 if tokens else TensorProto.FLOAT,
                 [T, "B"] if tokens else [T, "B", graph.input["size"]])]
    env = {INPUT: "x"}
    final: dict[str, tuple[str, str]] = {}
    state_outputs = []
    for node in graph.nodes:
        op, ins = node.op, [env[i] for i in node.inputs]
        if op == "embedding":
            table = b.matrix(graph.param(node, "weight"), node.params["weight"])
            env[node.name] = b.op("Gather", [table, ins[0]], axis=0)
        elif op == "linear":
            y = b.product(ins[0], b.weight(graph.param(node, "weight"), node.params["weight"]),
                          node.attrs.get("act_bits"))
            if "bias" in node.params:
                y = b.op("Add", [y, b.const(graph.param(node, "bias"))])
            env[node.name] = y
        elif op == "activation":
            fn = node.attrs["fn"]
            onnx_op = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "log_softmax": "LogSoftmax",
                       "softmax": "Softmax"}[fn]
            kw = {"axis": -1} if fn in ("log_softmax", "softmax") else {}
            env[node.name] = b.op(onnx_op, ins, **kw)
        elif op == "select_step":
            env[node.name] = b.op("Squeeze", [b.op("Gather", [ins[0], b.const([node.attrs["index"]], np.int64)],
                                                   axis=0), b.const([0], np.int64)])
        elif op == "state_select":
            k = 0 if node.attrs["state"] == "h" else 1
            src = final[node.inputs[0]][k]
            env[node.name] = b.op("Squeeze", [b.op("Gather", [src, b.const([node.attrs["index"]], np.int64)],
                                                   axis=0), b.const([0], np.int64)])
        elif op == "concat":
            env[node.name] = b.op("Concat", ins, axis=-1)
        elif op in ("lstm", "gru"):
            from ..gru import gru_dims
            H, L, D = lstm_dims(node) if op == "lstm" else gru_dims(node)
            names = ("h", "c") if op == "lstm" else ("h",)
            sin = [f"state.{node.name}.{n}" for n in names]
            inputs += [vi(n, TensorProto.FLOAT, [L * D, "B", H]) for n in sin]
            if op == "lstm":
                env[node.name], final[node.name] = _lstm(b, graph, node, ins[0], tuple(sin), streaming)
            else:
                env[node.name], final[node.name] = _gru(b, graph, node, ins[0], sin[0], streaming)
            for k, name in enumerate(names):
                out = f"state_out.{node.name}.{name}"
                b.nodes.append(helper.make_node("Identity", [final[node.name][k]], [out], name=b.fresh("n")))
                state_outputs.append(vi(out, TensorProto.FLOAT, [L * D, "B", H]))
        else:
            raise ValueError(f"the onnx target has no lowering for op {op!r}")
    y = env[graph.output["value"]]
    b.nodes.append(helper.make_node("Identity", [y], ["y"], name=b.fresh("n")))
    from ..graph import output_info
    info = output_info(graph)
    y_shape = [T, "B", info.features] if info.kind == "seq" else ["B", info.features]
    g = helper.make_graph(b.nodes, b.name, inputs, [vi("y", TensorProto.FLOAT, y_shape)] + state_outputs,
                          initializer=b.inits)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("com.microsoft", 1)] if weights == "nbits" else [])
    model = helper.make_model(g, opset_imports=opsets, producer_name="g2quant")
    model.ir_version = 10
    checker.check_model(model)
    return model


def externalize(models: list, location: str, min_bytes: int = 1024) -> bytes:
    """Move every initializer of at least ``min_bytes`` of the given models into one blob (returned)
    referenced as ONNX external data at ``location``; initializers with the same name share it."""
    from onnx import TensorProto
    blob, where = bytearray(), {}
    for model in models:
        for t in model.graph.initializer:
            if len(t.raw_data) < min_bytes:
                continue
            if t.name not in where:
                pad = (-len(blob)) % 64
                blob += b"\0" * pad
                where[t.name] = (len(blob), len(t.raw_data))
                blob += t.raw_data
            off, n = where[t.name]
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", location), ("offset", str(off)), ("length", str(n))):
                e = t.external_data.add()
                e.key, e.value = k, v
    return bytes(blob)


SUPPORTED_OPS = ("embedding", "linear", "activation", "select_step", "state_select", "concat", "lstm", "gru")
