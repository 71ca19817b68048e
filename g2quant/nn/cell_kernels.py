"""Fused element-wise work of one LSTM training step (forward and backward), compiled with Numba.

The recurrence in :mod:`g2quant.nn.recurrence` needs, per time step, one matrix product
(``h_{t-1} W_zᵀ``, left to torch/MKL) and a dozen element-wise operations: gate activations,
Gumbel noise, hard gates, the cell update, int8 fake quantization of ``h``; and in the
backward pass the gate derivatives and the cell-gradient recursion. At the sizes LSTMs are
trained at on CPU (batch 20 × 200 units = 4000 elements) each torch operator costs more in
dispatch than in arithmetic, so here each direction of a step is one compiled call over
NumPy views of the torch buffers (no copies). ``float32`` uses vectorizable polynomial
``exp``/``tanh`` (relative error ~1e-7); ``float64`` uses libm, so that
``torch.autograd.gradcheck`` can check these very loops.

Layouts (internal gate order i, f, o, g; see ``recurrence.py``):

* ``act  [T, B, 4H]``: on entry to ``lstm_forward_step`` row ``t`` holds ``z = zx[t] + h W_zᵀ``;
  it leaves with ``σ(z)`` in the first 3H columns (soft values, for the backward) and ``tanh(z)``
  in the last H.
* ``gates [T, B, 3H]``: the i, f, o values used (hard columns ``1[z > 0]``); size 0 when no
  gate is hard (the soft values in ``act`` are used).
* ``noise [T, B, K]``: pre-activation noise added to columns ``lo … lo+K`` (size 0: none).
* ``c_all [T+1, B, H]``, ``tc_all [T, B, H]`` (``tanh c_t``), ``out [T, B, H]``.
* ``hin [T, B, H]``: ``h_{t-1}`` as the next product reads it; written for ``t + 1`` when
  ``qmode`` is 1 (dynamic per-row int8) or 2 (static scale ``qscale``).

The loops are split so that each writes one array and reads few: LLVM vectorizes a loop only
while its runtime alias checks (one per written/other array pair) stay under its threshold.

Plain reference: :class:`g2quant.nn.recurrence.LSTMRecurrence` (torch operators) computes the
same steps; ``tests/test_cell_kernels.py`` checks the agreement and the gradients.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from ..targets.cpu.kernels_jit import _sigmoid as _sigmoid32
from ..targets.cpu.kernels_jit import _tanh as _tanh32
from ..targets.cpu.kernels_vnni import bits_to_f32

ACT_QMAX = 127.0


def _sigm(z):  # pragma: no cover - replaced by the overload below inside compiled code
    return 1.0 / (1.0 + math.exp(-z))


def _th(z):  # pragma: no cover
    return math.tanh(z)


def _max_abs(x):  # pragma: no cover
    return np.abs(x).max()


@overload(_sigm)
def _sigm_impl(z):
    if isinstance(z, types.Float) and z.bitwidth == 64:
        return lambda z: 1.0 / (1.0 + math.exp(-z))
    return lambda z: _sigmoid32(z)


@overload(_th)
def _th_impl(z):
    if isinstance(z, types.Float) and z.bitwidth == 64:
        return lambda z: math.tanh(z)
    return lambda z: _tanh32(z)


@overload(_max_abs)
def _max_abs_impl(x):
    """``max |x|``; float32 on the bit patterns (|x| as int32 orders like the floats, the integer
    reduction vectorizes where a float one does not, and a NaN wins as in torch)."""
    if x.dtype == types.float32:
        def impl(x):
            bits = x.view(np.int32)
            m = np.int32(0)
            for j in range(bits.shape[0]):
                m = max(m, bits[j] & np.int32(0x7FFFFFFF))
            return bits_to_f32(m)
        return impl

    def generic(x):
        m = x.dtype.type(0.0)
        for j in range(x.shape[0]):
            m = max(m, abs(x[j]))
        return m
    return generic


@njit(cache=True, error_model="numpy")
def lstm_forward_step(t, act, noise, lo, hard, gates, c_all, tc_all, out, hin, qmode, qscale):
    """One forward step over the batch (see the module docstring for the arrays)."""
    B, G = act.shape[1], act.shape[2]
    H = G // 4
    H3 = 3 * H
    K = noise.shape[2]
    has_hard = gates.shape[0] > 0
    one = act.dtype.type(1.0)
    zero = act.dtype.type(0.0)
    for b in range(B):
        a = act[t, b]
        if K > 0:
            _add_into(a[lo:lo + K], noise[t, b])
        if has_hard:
            gv = gates[t, b]
            for j in range(H3):
                z = a[j]
                s = _sigm(z)
                a[j] = s
                gv[j] = (one if z > zero else zero) if hard[j] else s
            _cell(a, gv, c_all[t, b], c_all[t + 1, b], tc_all[t, b], out[t, b], H)
        else:
            for j in range(H3):
                a[j] = _sigm(a[j])
            _cell(a, a, c_all[t, b], c_all[t + 1, b], tc_all[t, b], out[t, b], H)
        if qmode != 0 and t + 1 < act.shape[0]:
            _fake_quant_row(out[t, b], hin[t + 1, b], qmode, qscale)


@njit(cache=True, error_model="numpy")
def _add_into(dst, src):
    for j in range(dst.shape[0]):
        dst[j] += src[j]


@njit(cache=True, inline="always", error_model="numpy")
def _cell(a, gv, c_prev, c_new, tc, h, H):
    """g = tanh(z_g) in place; c_t = f c_{t-1} + i g; h_t = o tanh(c_t) (i, f, o read from ``gv``)."""
    H3 = 3 * H
    for j in range(H):              # (not range(H3, 4H): that loop does not vectorize)
        a[H3 + j] = _th(a[H3 + j])
    for j in range(H):
        c_new[j] = gv[H + j] * c_prev[j] + gv[j] * a[H3 + j]
    for j in range(H):
        tc[j] = _th(c_new[j])
    for j in range(H):
        h[j] = gv[2 * H + j] * tc[j]


@njit(cache=True, inline="always", error_model="numpy")
def _fake_quant_row(x, dst, qmode, qscale):
    """``dst = round(x / s).clamp(±127) · s`` with ``s = max|x| / 127`` (1 for a zero row) in mode 1,
    ``s = qscale`` in mode 2 (the torch reference: ``recurrence.fake_quant_act``)."""
    qmax = x.dtype.type(ACT_QMAX)
    if qmode == 1:
        s = _max_abs(x) / qmax
        if not s > 0:
            s = x.dtype.type(1.0)
    else:
        s = x.dtype.type(qscale)
    for j in range(x.shape[0]):
        q = np.rint(x[j] / s)
        dst[j] = min(max(q, -qmax), qmax) * s


@njit(cache=True, error_model="numpy")
def lstm_backward_step(t, dh, dc, act, gates, c_all, tc_all, dz):
    """From ``dh = ∂L/∂h_t`` and ``dc = ∂L/∂c_t`` (the part through c_{t+1}): writes
    ``dz[t] = ∂L/∂z_t`` and replaces ``dc`` by ``∂L/∂c_{t-1}``. Hard gates pass the soft
    derivative (straight-through)."""
    B, G = act.shape[1], act.shape[2]
    H = G // 4
    H2, H3 = 2 * H, 3 * H
    has_hard = gates.shape[0] > 0
    one = act.dtype.type(1.0)
    for b in range(B):
        a, d, c_prev, tcr, dhr, dcr = act[t, b], dz[t, b], c_all[t, b], tc_all[t, b], dh[b], dc[b]
        gv = gates[t, b] if has_hard else act[t, b]
        for j in range(H):              # ∂L/∂c_t in full
            th = tcr[j]
            dcr[j] += dhr[j] * gv[H2 + j] * (one - th * th)
        for j in range(H):
            si = a[j]
            d[j] = dcr[j] * a[H3 + j] * (si * (one - si))
        for j in range(H):
            sf = a[H + j]
            d[H + j] = dcr[j] * c_prev[j] * (sf * (one - sf))
        for j in range(H):
            so = a[H2 + j]
            d[H2 + j] = dhr[j] * tcr[j] * (so * (one - so))
        for j in range(H):
            g = a[H3 + j]
            d[H3 + j] = dcr[j] * gv[j] * (one - g * g)
        for j in range(H):
            dcr[j] *= gv[H + j]
