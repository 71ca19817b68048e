"""The LSTM recurrence as one autograd function with a hand-written backward pass (BPTT).

Recording every per-step op on the autograd tape costs more than the arithmetic at the sizes
LSTMs are trained at on CPU; here the forward loop records nothing and the backward loop is
explicit, so a Python-level G2-LSTM trains within a small factor of the fused
``torch.nn.LSTM`` kernel.

Internally the gate columns are ordered (i, f, o, g) so that the three sigmoid gates are one
contiguous block. Inputs arrive already scaled (temperature, Gumbel noise folded in by the
caller, once per sequence), so one step is

* ``z = zx[t] + h_{t-1} W_zᵀ``  (``zx`` = scaled input projection incl. biases and noise)
* ``i, f, o = sigmoid(z[:, :3H])`` (``1[z > 0]`` for hard gates, straight-through), ``g = tanh(z[:, 3H:])``
* ``c_t = f c_{t-1} + i g``, ``h_t = o tanh(c_t)``

``quant_h`` ("dynamic" or a fixed scale) fake-quantizes ``h_{t-1}`` to int8 before the recurrent
product, with an identity straight-through gradient (|h| < 1, so neither mode clips it in
practice).
"""
from __future__ import annotations

import contextlib
import os
import threading

import numpy as np
import torch

ACT_QMAX = 127.0

def to_ifog(w: torch.Tensor, hidden: int) -> torch.Tensor:
    """Reorder gate blocks along dim 0 from torch.nn.LSTM's (i, f, g, o) to (i, f, o, g).

    Built from slices and ``cat`` so that the backward pass is cheap slicing too."""
    H = hidden
    return torch.cat([w[:2 * H], w[3 * H:], w[2 * H:3 * H]])


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric int8 fake quantization. Dynamic (``scale=None``): one scale per row (last dim),
    ``s = max|x| / 127`` (1 for an all-zero row). Static: the given per-tensor ``scale``."""
    if scale is None:
        s = x.detach().abs().amax(dim=-1, keepdim=True) / ACT_QMAX
        s = torch.where(s > 0, s, torch.ones_like(s))
    else:
        s = scale
    return torch.round(x / s).clamp_(-ACT_QMAX, ACT_QMAX) * s


class _STEActQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        y = fake_quant_act(x, scale)
        if scale is not None:   # static range: no gradient where the input was clipped
            ctx.save_for_backward((x.abs() <= scale * ACT_QMAX))
        return y

    @staticmethod
    def backward(ctx, grad):
        if ctx.saved_tensors:
            grad = grad * ctx.saved_tensors[0]
        return grad, None


def act_quant_ste(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``fake_quant_act`` with a straight-through gradient (identity; zero where a static
    range clipped the input)."""
    return _STEActQuant.apply(x, scale)


class LSTMRecurrence(torch.autograd.Function):
    """out [T,B,H], h_T, c_T, gates [T,B,3H] = f(zx [T,B,4H], w_z [4H,H], h0, c0, hard_cols, quant_h)."""

    @staticmethod
    def forward(ctx, zx, w_z, h0, c0, hard_cols, quant_h):
        h_scale = quant_h if isinstance(quant_h, torch.Tensor) else None
        T, B, G = zx.shape
        H = G // 4
        H3 = 3 * H
        w_t = w_z.t()
        act = zx.new_empty(T, B, G)          # sigmoid/tanh outputs (soft, for the backward)
        gates = act if hard_cols is None else zx.new_empty(T, B, H3)
        c_all = zx.new_empty(T + 1, B, H)
        tc_all = zx.new_empty(T, B, H)
        # h_{t-1} as used in the product: kept only when quantized; otherwise it is (h0, out[:-1])
        hin_all = zx.new_empty(T, B, H) if quant_h is not None else None
        out = zx.new_empty(T, B, H)
        c_all[0] = c0
        h = h0
        # per-step views, made once (unbind is far cheaper than Python indexing inside the loop)
        zx_t, c_t, tc_t, out_t = (v.unbind(0) for v in (zx, c_all, tc_all, out))
        hin_t = hin_all.unbind(0) if hin_all is not None else None
        sig_t, tanh_t = act[..., :H3].unbind(0), act[..., H3:].unbind(0)
        gate_t = sig_t if hard_cols is None else gates.unbind(0)
        for t in range(T):
            if hin_t is None:
                hin = h
            else:
                hin = hin_t[t]
                hin.copy_(fake_quant_act(h, h_scale))
            z = torch.addmm(zx_t[t], hin, w_t)
            s, g = sig_t[t], tanh_t[t]
            torch.sigmoid(z[:, :H3], out=s)
            torch.tanh(z[:, H3:], out=g)
            gv = gate_t[t]
            if hard_cols is not None:
                torch.where(hard_cols, (s > 0.5).to(s.dtype), s, out=gv)
            c = c_t[t + 1]
            torch.mul(gv[:, H:2 * H], c_t[t], out=c)
            c.addcmul_(gv[:, :H], g)
            torch.tanh(c, out=tc_t[t])
            h = torch.mul(gv[:, 2 * H:], tc_t[t], out=out_t[t])
        if hin_all is None:
            hin_all = torch.cat((h0.unsqueeze(0), out[:-1]))
        ctx.save_for_backward(w_z, act, gates, c_all, tc_all, hin_all)
        ctx.mark_non_differentiable(gates)
        return out, h.clone(), c_all[T].clone(), gates if hard_cols is not None else act[..., :H3]

    @staticmethod
    def backward(ctx, d_out, d_hT, d_cT, _d_gates):
        w_z, act, gates, c_all, tc_all, hin_all = ctx.saved_tensors
        T, B, G = act.shape
        H = G // 4
        H3 = 3 * H
        dh = d_hT.clone() if d_hT is not None else act.new_zeros(B, H)
        dc = d_cT.clone() if d_cT is not None else act.new_zeros(B, H)
        if d_out is not None:
            dh = dh + d_out[T - 1]
        gv = act[..., :H3] if gates is act else gates
        i, f, o, g = gv[..., :H], gv[..., H:2 * H], gv[..., 2 * H:H3], act[..., H3:]
        s = act[..., :H3]
        # everything that does not depend on the backward recursion, vectorized over all steps:
        # dz_i = dc·g·σ'_i, dz_f = dc·c_{t-1}·σ'_f, dz_o = dh·tanh(c_t)·σ'_o, dz_g = dc·i·(1 − g²),
        # dc += dh·o·(1 − tanh²(c_t)), dc_{t-1} = dc·f
        dsig = s * (1.0 - s)
        a_if = torch.stack((g * dsig[..., :H], c_all[:-1] * dsig[..., H:2 * H]), dim=2)   # [T, B, 2, H]
        a_o = tc_all * dsig[..., 2 * H:]
        a_g = i * (1.0 - g * g)
        o_dtanh = o * (1.0 - tc_all * tc_all)
        dz_all = torch.empty_like(act)
        dz_if = dz_all[..., :2 * H].unflatten(-1, (2, H)).unbind(0)
        dz_o, dz_g = dz_all[..., 2 * H:H3].unbind(0), dz_all[..., H3:].unbind(0)
        a_if_t, a_o_t, a_g_t, od_t, f_t = (v.unbind(0) for v in (a_if, a_o, a_g, o_dtanh, f))
        d_out_t = d_out.unbind(0) if d_out is not None else None
        dz_t = dz_all.unbind(0)
        for t in range(T - 1, -1, -1):
            dc = dc.addcmul(dh, od_t[t])
            torch.mul(dc.unsqueeze(1), a_if_t[t], out=dz_if[t])
            torch.mul(dh, a_o_t[t], out=dz_o[t])
            torch.mul(dc, a_g_t[t], out=dz_g[t])
            dc = dc * f_t[t]
            if t > 0 and d_out_t is not None:
                dh = torch.addmm(d_out_t[t - 1], dz_t[t], w_z)
            else:
                dh = dz_t[t] @ w_z
        d_w = dz_all.reshape(T * B, G).t() @ hin_all.reshape(T * B, H)
        return dz_all, d_w, dh, dc, None, None


class FusedLSTMRecurrence(torch.autograd.Function):
    """:class:`LSTMRecurrence` with the element-wise work of each step in one compiled call per
    direction (``cell_kernels``): per step the forward is ``addmm`` + 1 call, the backward 1 call
    + ``addmm``. Same inputs and outputs, plus ``noise [T, B, K]`` added to gate columns
    ``noise_lo …`` (constant: no gradient)."""

    @staticmethod
    def forward(ctx, zx, w_z, h0, c0, hard_cols, quant_h, noise, noise_lo):
        from .cell_kernels import lstm_forward_step
        T, B, G = zx.shape
        H = G // 4
        H3 = 3 * H
        dt = zx.dtype
        w_t = w_z.detach().t()
        act = zx.new_empty(T, B, G)
        gates = zx.new_empty(T, B, H3) if hard_cols is not None else zx.new_empty(0, 0, 0)
        c_all = zx.new_empty(T + 1, B, H)
        tc_all = zx.new_empty(T, B, H)
        out = zx.new_empty(T, B, H)
        c_all[0] = c0
        if quant_h is None:
            qmode, qscale, hin_all = 0, 0.0, None
        else:
            qmode = 2 if isinstance(quant_h, torch.Tensor) else 1
            qscale = float(quant_h) if qmode == 2 else 0.0
            hin_all = zx.new_empty(T, B, H)
            hin_all[0] = fake_quant_act(h0.detach(), quant_h if qmode == 2 else None)
        np_ = lambda v: v.detach().numpy()   # noqa: E731  (shared memory, no copy)
        hard_np = (hard_cols.to(torch.uint8).numpy() if hard_cols is not None
                   else torch.zeros(0, dtype=torch.uint8).numpy())
        noise_np = np_(noise.contiguous()) if noise is not None else np.zeros((0, 0, 0), dtype=np_(zx).dtype)
        a_np, g_np, c_np, tc_np, o_np = (np_(v) for v in (act, gates, c_all, tc_all, out))
        hin_np = np_(hin_all) if hin_all is not None else o_np
        zx_t, act_t, out_t = zx.detach().unbind(0), act.unbind(0), out.unbind(0)
        hin_t = hin_all.unbind(0) if hin_all is not None else None
        h = h0.detach()
        for t in range(T):
            hin = hin_t[t] if hin_t is not None else h
            torch.addmm(zx_t[t], hin, w_t, out=act_t[t])
            lstm_forward_step(t, a_np, noise_np, noise_lo, hard_np, g_np, c_np, tc_np, o_np, hin_np, qmode, qscale)
            h = out_t[t]
        ctx.save_for_backward(w_z, act, gates, c_all, tc_all, h0, out, hin_all)
        ctx.quantized = hin_all is not None
        used = gates if hard_cols is not None else act[..., :H3]
        ctx.mark_non_differentiable(used)
        return out, h.clone(), c_all[T].clone(), used

    @staticmethod
    def backward(ctx, d_out, d_hT, d_cT, _d_gates):
        from .cell_kernels import lstm_backward_step
        w_z, act, gates, c_all, tc_all, h0, out, hin_all = ctx.saved_tensors
        T, B, G = act.shape
        H = G // 4
        dh = d_hT.clone() if d_hT is not None else act.new_zeros(B, H)
        dc = d_cT.contiguous().clone() if d_cT is not None else act.new_zeros(B, H)
        if d_out is not None:
            dh = dh + d_out[T - 1]
        dh = dh.contiguous()
        dz_all = torch.empty_like(act)
        np_ = lambda v: v.detach().numpy()   # noqa: E731
        a_np, g_np, c_np, tc_np, dz_np = (np_(v) for v in (act, gates, c_all, tc_all, dz_all))
        dh_np, dc_np = np_(dh), np_(dc)
        dz_t = dz_all.unbind(0)
        d_out_t = d_out.unbind(0) if d_out is not None else None
        w = w_z.detach()
        for t in range(T - 1, -1, -1):
            lstm_backward_step(t, dh_np, dc_np, a_np, g_np, c_np, tc_np, dz_np)
            if t > 0 and d_out_t is not None:
                torch.addmm(d_out_t[t - 1], dz_t[t], w, out=dh)
            else:
                torch.mm(dz_t[t], w, out=dh)
        # dW = Σ_t dz_tᵀ h_{t-1}: the inputs of the product are hin (quantized) or (h0, out[:-1])
        if hin_all is not None:
            d_w = dz_all.reshape(T * B, G).t() @ hin_all.reshape(T * B, H)
        else:
            d_w = dz_all[0].t() @ h0.detach()
            if T > 1:
                d_w.addmm_(dz_all[1:].reshape((T - 1) * B, G).t(), out[:-1].reshape((T - 1) * B, H))
        return dz_all, d_w, dh, dc, None, None, None, None


_EXACT = threading.local()


@contextlib.contextmanager
def exact_recurrence():
    """Run the torch-operator recurrence (torch's own sigmoid/tanh) instead of the compiled step
    kernels (float32 polynomial sigmoid/tanh, within ~2e-7 of them) in this thread. What export
    checks use: with 8-bit activations a few-ulp difference moves the odd value across a code
    boundary, and the flip propagates (measured: a 2x650 4-bit LM, 4e-4 of the output range after
    one step, 3e-3 after seven, against 5e-8 with the exact recurrence)."""
    depth = getattr(_EXACT, "depth", 0)
    _EXACT.depth = depth + 1
    try:
        yield
    finally:
        _EXACT.depth = depth


def fused_available(zx: torch.Tensor) -> bool:
    """The compiled step kernels apply: CPU float32/float64 tensors, not switched off with
    ``G2QUANT_CELL=torch`` or :func:`exact_recurrence`."""
    return (zx.device.type == "cpu" and zx.dtype in (torch.float32, torch.float64)
            and os.environ.get("G2QUANT_CELL", "fused") != "torch" and not getattr(_EXACT, "depth", 0))


def recurrence(zx, w_z, h0, c0, *, hard_cols=None, quant_h=None, noise=None, noise_lo: int = 0):
    """Run the recurrence (see module docstring) over inputs in internal (i, f, o, g) order.

    Returns ``(out [T,B,H], h_T, c_T, gates [T,B,3H])`` where ``gates`` holds the i, f, o values
    used in the forward pass (non-differentiable; for statistics). ``hard_cols`` is a bool
    ``[3H]`` mask of the i/f/o columns evaluated as ``1[z > 0]``. ``noise [T, B, K]`` is added
    (without gradient) to the pre-activation columns ``noise_lo … noise_lo + K``.
    """
    if fused_available(zx):
        args = [t.contiguous() if isinstance(t, torch.Tensor) else t for t in (zx, w_z, h0, c0)]
        return FusedLSTMRecurrence.apply(*args, hard_cols, quant_h, noise, noise_lo)
    if noise is not None:
        K = noise.shape[-1]
        zx = torch.cat([zx[..., :noise_lo], zx[..., noise_lo:noise_lo + K] + noise, zx[..., noise_lo + K:]], dim=-1)
    return LSTMRecurrence.apply(zx, w_z, h0, c0, hard_cols, quant_h)
