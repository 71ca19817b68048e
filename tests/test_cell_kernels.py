"""The compiled LSTM step kernels (``g2quant.nn.cell_kernels``) against the torch-operator
recurrence, and their hand-written backward against numerical and straight-through gradients."""
import pytest
import torch

from g2quant.nn.recurrence import FusedLSTMRecurrence, LSTMRecurrence, fake_quant_act, recurrence


def _inputs(T=6, B=3, H=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    zx = torch.randn(T, B, 4 * H, generator=g, dtype=dtype) * 1.5
    w = torch.randn(4 * H, H, generator=g, dtype=dtype) * 0.5
    h0 = torch.randn(B, H, generator=g, dtype=dtype) * 0.5
    c0 = torch.randn(B, H, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (zx, w, h0, c0)]


def _run(fn, inputs, hard, quant, noise, lo):
    out, h, c, gates = fn(*inputs, hard, quant, noise, lo)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + 0.7 * h.sum() + 0.3 * c.sum()
    grads = torch.autograd.grad(loss, inputs)
    return (out, h, c, gates), grads


def _torch_ref(zx, w, h0, c0, hard, quant, noise, lo):
    if noise is not None:
        K = noise.shape[-1]
        zx = torch.cat([zx[..., :lo], zx[..., lo:lo + K] + noise, zx[..., lo + K:]], dim=-1)
    return LSTMRecurrence.apply(zx, w, h0, c0, hard, quant)


def _fused(zx, w, h0, c0, hard, quant, noise, lo):
    return FusedLSTMRecurrence.apply(zx, w, h0, c0, hard, quant, noise, lo)


CASES = {
    "soft": dict(hard="", quant=None, noise=False),
    "noise": dict(hard="", quant=None, noise=True),
    "hard-if": dict(hard="if", quant=None, noise=True),
    "hard-ifo": dict(hard="ifo", quant=None, noise=False),
    "quant-dynamic": dict(hard="", quant="dynamic", noise=True),
    "quant-static+hard": dict(hard="if", quant=0.011, noise=True),
}


def _case(name, H, T, B, dtype):
    c = CASES[name]
    hard = None
    if c["hard"]:
        hard = torch.zeros(3 * H, dtype=torch.bool)
        for k, g in enumerate("ifo"):
            if g in c["hard"]:
                hard[k * H:(k + 1) * H] = True
    quant = c["quant"]
    if isinstance(quant, float):
        quant = torch.tensor(quant, dtype=dtype)
    noise = torch.randn(T, B, 2 * H, generator=torch.Generator().manual_seed(5), dtype=dtype) if c["noise"] else None
    return hard, quant, noise, 0


@pytest.mark.parametrize("name", list(CASES))
def test_fused_step_kernels_equal_the_torch_recurrence(name):
    """float32: the polynomial exp/tanh (relative error ~1e-7) against torch's; 1e-5 covers the
    propagation over 6 steps. Hard decisions and int8 codes must agree exactly where the inputs
    are not within rounding of a threshold (checked: the gate values used are equal)."""
    T, B, H = 6, 3, 5
    hard, quant, noise, lo = _case(name, H, T, B, torch.float32)
    ref, g_ref = _run(_torch_ref, _inputs(T, B, H), hard, quant, noise, lo)
    got, g_got = _run(_fused, _inputs(T, B, H), hard, quant, noise, lo)
    for a, b, what in zip(got, ref, ("out", "h_T", "c_T", "gates")):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=what)
    if hard is not None:
        torch.testing.assert_close(got[3][..., hard], ref[3][..., hard], atol=0, rtol=0)
    for a, b, what in zip(g_got, g_ref, ("zx", "w_z", "h0", "c0")):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"d {what}")


@pytest.mark.parametrize("name", ["hard-if", "quant-dynamic", "quant-static+hard"])
def test_fused_float64_equals_the_torch_recurrence_tightly(name):
    """float64 uses libm in the kernels: the two implementations agree to rounding."""
    T, B, H = 5, 2, 4
    hard, quant, noise, lo = _case(name, H, T, B, torch.float64)
    ref, g_ref = _run(_torch_ref, _inputs(T, B, H, torch.float64), hard, quant, noise, lo)
    got, g_got = _run(_fused, _inputs(T, B, H, torch.float64), hard, quant, noise, lo)
    for a, b in zip(list(got) + list(g_got), list(ref) + list(g_ref)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_gradcheck_fused_backward_float64():
    """Numerical gradient check of the hand-written backward (soft gates, with Gumbel noise as
    a constant input), with respect to every differentiable input."""
    T, B, H = 4, 2, 3
    noise = torch.randn(T, B, 2 * H, dtype=torch.float64)

    def f(zx, w, h0, c0):
        out, h, c, _ = FusedLSTMRecurrence.apply(zx, w, h0, c0, None, None, noise, 0)
        return out, h, c

    assert torch.autograd.gradcheck(f, tuple(_inputs(T, B, H, torch.float64)), eps=1e-6, atol=1e-7, rtol=1e-5)


def _straight_through_reference(zx, w, h0, c0, hard, quant):
    """The definition the backward implements, step by step with autograd: a hard gate is
    ``1[z > 0] + (σ − sg(σ))`` and the quantized ``h`` is ``h + sg(q(h) − h)``."""
    H = w.shape[1]
    h, c, outs = h0, c0, []
    for t in range(zx.shape[0]):
        hin = h if quant is None else h + (fake_quant_act(h.detach(), None if quant == "dynamic" else quant)
                                           - h).detach()
        z = zx[t] + hin @ w.t()
        s = torch.sigmoid(z[:, :3 * H])
        if hard is not None:
            s = torch.where(hard, (z[:, :3 * H] > 0).to(s.dtype) + (s - s.detach()), s)
        i, f, o, g = s[:, :H], s[:, H:2 * H], s[:, 2 * H:], torch.tanh(z[:, 3 * H:])
        c = f * c + i * g
        h = o * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), h, c


@pytest.mark.parametrize("quant", ["dynamic", 0.013])
def test_backward_with_hard_gates_and_quantized_h_is_the_straight_through_gradient(quant):
    """With hard gates and int8 ``h`` the gradient is straight-through by design (a numerical
    gradient of the step function would be 0): it must equal autograd through the STE definition."""
    T, B, H = 5, 3, 4
    hard = torch.zeros(3 * H, dtype=torch.bool)
    hard[:2 * H] = True
    q = quant if quant == "dynamic" else torch.tensor(quant, dtype=torch.float64)
    x1, x2 = _inputs(T, B, H, torch.float64), _inputs(T, B, H, torch.float64)
    out1, h1, c1, _ = FusedLSTMRecurrence.apply(*x1, hard, q, None, 0)
    out2, h2, c2 = _straight_through_reference(*x2, hard, q)
    w = torch.linspace(-1, 1, out1.numel(), dtype=torch.float64).view_as(out1)
    g1 = torch.autograd.grad((out1 * w).sum() + h1.sum() + c1.sum(), x1)
    g2 = torch.autograd.grad((out2 * w).sum() + h2.sum() + c2.sum(), x2)
    torch.testing.assert_close(out1, out2, atol=1e-12, rtol=1e-10)
    for a, b, what in zip(g1, g2, ("zx", "w_z", "h0", "c0")):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=f"d {what}")


def test_dispatch_uses_the_kernels_unless_switched_off(monkeypatch):
    zx, w, h0, c0 = _inputs()
    out, *_ = recurrence(zx, w, h0, c0)
    assert type(out.grad_fn).__name__.startswith("FusedLSTMRecurrence")
    monkeypatch.setenv("G2QUANT_CELL", "torch")
    out, *_ = recurrence(zx, w, h0, c0)
    assert type(out.grad_fn).__name__.startswith("LSTMRecurrence")
    out16, *_ = recurrence(*(t.detach().bfloat16() for t in (zx, w, h0, c0)))   # no bfloat16 kernel
    assert out16.dtype == torch.bfloat16
