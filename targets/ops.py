"""The built-in ops of the lowered graph (see ``g2quant.targets.graph``).

=============  ===========================  ==========================================================
op             inputs -> output             meaning
=============  ===========================  ==========================================================
embedding      tokens -> seq                dequantized row ``scale[t] * q[t, :]`` of ``weight [V, E]``
linear         seq|vec -> same kind         ``Q(weight) · A8(x) + bias`` per position (``act_bits``)
activation     seq|vec -> same kind         ``fn`` in relu, tanh, sigmoid, log_softmax, softmax (last dim)
select_step    seq -> vec                   the time step ``index`` (-1 = last, 0 = first)
state_select   recurrent node -> vec        final state ``state`` (h or c) row ``index`` (torch's h_n[k])
concat         several seq | vec -> same    concatenation along the feature axis
lstm           seq -> seq                   LSTM stack (family ``lstm``, gates i, f, g, o; hard ``ifo``)
=============  ===========================  ==========================================================

Numerics: every matrix product is W-low-bit × A8 (``docs/cpu-engine.md``); biases, nonlinearities
and cell updates are float32.
"""
from __future__ import annotations

from .graph import (GraphError, OpSpec, ValueInfo, act_bits_attr, bool_attr, choice_attr, gate_attr, int_attr,
                    need, register_op, shape_of)

ACTIVATIONS = ("relu", "tanh", "sigmoid", "log_softmax", "softmax")
LSTM_GATES = "ifo"                     # the LSTM family's gate alphabet (g is always tanh)


def _one_input(node, inputs, kinds) -> ValueInfo:
    need(len(inputs) == 1, f"node {node.name!r} ({node.op}) takes one input, got {len(inputs)}")
    need(inputs[0].kind in kinds, f"node {node.name!r} ({node.op}) takes a {' or '.join(kinds)} value, "
                                  f"got {inputs[0].kind}")
    return inputs[0]


def _embedding(node, inputs, params):
    x = _one_input(node, inputs, ("tokens",))
    V, E = shape_of(node, params, "weight", 2, "qmatrix")
    need(V == x.features, f"node {node.name!r}: embedding has {V} rows but the input vocabulary has "
                          f"{x.features} ids")
    return ValueInfo("seq", E)


def _linear(node, inputs, params):
    x = _one_input(node, inputs, ("seq", "vec"))
    O, I = shape_of(node, params, "weight", 2, "qmatrix")
    need(I == x.features, f"node {node.name!r}: linear takes {I} features, its input has {x.features}")
    if "bias" in params:
        need(shape_of(node, params, "bias", 1, "array") == (O,), f"node {node.name!r}: bias must have shape [{O}]")
    act_bits_attr(node)
    return ValueInfo(x.kind, O)


def _activation(node, inputs, params):
    x = _one_input(node, inputs, ("seq", "vec"))
    choice_attr(node, "fn", ACTIVATIONS)
    return x


def _select_step(node, inputs, params):
    _one_input(node, inputs, ("seq",))
    v = node.attrs.get("index")
    need(v in (0, -1) and not isinstance(v, bool), f"node {node.name!r}: select_step index must be 0 or -1, got {v!r}")
    return ValueInfo("vec", inputs[0].features)


def _state_select(node, inputs, params):
    need(len(inputs) == 1 and inputs[0].states, f"node {node.name!r}: state_select reads a recurrent node")
    names = [s[0] for s in inputs[0].states]
    which = choice_attr(node, "state", names)
    rows, feats = next((r, f) for n, r, f in inputs[0].states if n == which)
    int_attr(node, "index", 0, rows - 1)
    return ValueInfo("vec", feats)


def _concat(node, inputs, params):
    need(len(inputs) >= 2, f"node {node.name!r}: concat takes at least two inputs")
    kinds = {x.kind for x in inputs}
    need(len(kinds) == 1 and kinds <= {"seq", "vec"}, f"node {node.name!r}: concat inputs must all be seq or all vec")
    return ValueInfo(kinds.pop(), sum(x.features for x in inputs))


def lstm_dims(node) -> tuple[int, int, int]:
    """``(hidden, layers, directions)`` of an lstm node (validated)."""
    H = int_attr(node, "hidden_size")
    L = int_attr(node, "num_layers", 1, 64)
    D = 2 if bool_attr(node, "bidirectional", False) else 1
    return H, L, D


def lstm_param_names(num_layers: int, directions: int) -> list[tuple[str, str, str]]:
    """Per (layer, direction) in torch's order: the roles of W_ih, W_hh and the summed bias."""
    return [(f"l{k}.w_ih", f"l{k}.w_hh", f"l{k}.bias") for k in range(num_layers * directions)]


def _lstm(node, inputs, params):
    x = _one_input(node, inputs, ("seq",))
    H, L, D = lstm_dims(node)
    gate_attr(node, "hard_gates", LSTM_GATES)
    act_bits_attr(node)
    roles = lstm_param_names(L, D)
    want = {r for trio in roles for r in trio}
    need(set(params) == want, f"node {node.name!r}: lstm parameters must be {sorted(want)}, got {sorted(params)}")
    for k, (ih, hh, b) in enumerate(roles):
        d_in = x.features if k < D else D * H
        need(shape_of(node, params, ih, 2, "qmatrix") == (4 * H, d_in),
             f"node {node.name!r}: {ih} must have shape [{4 * H}, {d_in}], got {list(shape_of(node, params, ih, 2))}")
        need(shape_of(node, params, hh, 2, "qmatrix") == (4 * H, H),
             f"node {node.name!r}: {hh} must have shape [{4 * H}, {H}]")
        need(shape_of(node, params, b, 1, "array") == (4 * H,), f"node {node.name!r}: {b} must have shape [{4 * H}]")
    return ValueInfo("seq", D * H, (("h", L * D, H), ("c", L * D, H)))


def _lstm_state_shapes(node, batch: int):
    H, L, D = lstm_dims(node)
    return ((L * D, batch, H), (L * D, batch, H))


register_op(OpSpec("embedding", _embedding, params=("weight",)))
register_op(OpSpec("linear", _linear, params=("weight", "?bias")))
register_op(OpSpec("activation", _activation))
register_op(OpSpec("select_step", _select_step))
register_op(OpSpec("state_select", _state_select))
register_op(OpSpec("concat", _concat))
register_op(OpSpec("lstm", _lstm, params=("*",), recurrent=True, state_shapes=_lstm_state_shapes,
                   streamable=lambda node: not node.attrs.get("bidirectional", False), gates=LSTM_GATES))

__all__ = ["ACTIVATIONS", "LSTM_GATES", "GraphError", "lstm_dims", "lstm_param_names"]
