"""G2LSTM against torch.nn.LSTM: outputs, states and gradients, plus G2-specific behaviour."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from g2quant.nn import G2LSTM, GateRecorder

TOL = dict(atol=1e-5, rtol=1e-5)   # float32, different summation order than the fused kernel


def _pair(input_size, hidden, layers, *, batch_first=False, bidirectional=False, bias=True, **kw):
    ref = nn.LSTM(input_size, hidden, layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional)
    return ref, G2LSTM.from_lstm(ref, **kw)


def _check_same(ref, m, x, hx=None, grads=True):
    x1 = x.clone().requires_grad_(grads)
    x2 = x.clone().requires_grad_(grads)
    o1, (h1, c1) = ref(x1, hx)
    o2, (h2, c2) = m(x2, hx)
    torch.testing.assert_close(o2, o1, **TOL)
    torch.testing.assert_close(h2, h1, **TOL)
    torch.testing.assert_close(c2, c1, **TOL)
    if grads:
        w = torch.randn_like(o1)
        l1 = (o1 * w).sum() + h1.pow(2).sum() + c1.sum()
        l2 = (o2 * w).sum() + h2.pow(2).sum() + c2.sum()
        g1 = torch.autograd.grad(l1, [x1, *ref.parameters()])
        g2 = torch.autograd.grad(l2, [x2, *m.parameters()])
        for a, b in zip(g1, g2):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


# "sigmoid" uses the fused kernel; "sharpened" with tau=1 runs our own recurrence and
# hand-written backward with identical math, so both must equal nn.LSTM.
@pytest.mark.parametrize("kw", [dict(gates="sigmoid"), dict(gates="sharpened", tau=1.0)])
@pytest.mark.parametrize("batch_first,bidirectional,bias", [(False, False, True), (True, False, True),
                                                            (False, True, True), (True, True, False)])
def test_equals_nn_lstm(kw, batch_first, bidirectional, bias):
    torch.manual_seed(0)
    ref, m = _pair(5, 7, 2, batch_first=batch_first, bidirectional=bidirectional, bias=bias, **kw)
    x = torch.randn(3, 6, 5) if batch_first else torch.randn(6, 3, 5)
    _check_same(ref, m, x)
    d = 2 if bidirectional else 1
    hx = (torch.randn(2 * d, 3, 7), torch.randn(2 * d, 3, 7))
    _check_same(ref, m, x, hx)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 6), B=st.integers(1, 4), I=st.integers(1, 9), H=st.integers(1, 9),
       L=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_equals_nn_lstm_property(T, B, I, H, L, seed):
    torch.manual_seed(seed)
    ref, m = _pair(I, H, L, gates="sharpened", tau=1.0)
    _check_same(ref, m, torch.randn(T, B, I))


def test_unbatched_input_and_state_dict_interop():
    torch.manual_seed(1)
    ref = nn.LSTM(4, 6, 2)
    m = G2LSTM(4, 6, 2, gates="gumbel")
    assert set(m.state_dict()) == set(ref.state_dict())
    m.load_state_dict(ref.state_dict())
    m.eval()  # eval-mode Gumbel gates are the deterministic sigmoid
    x = torch.randn(5, 4)
    o1, (h1, c1) = ref(x)
    o2, (h2, c2) = m(x)
    assert o2.shape == (5, 6) and h2.shape == (2, 6)
    torch.testing.assert_close(o2, o1, **TOL)
    torch.testing.assert_close(c2, c1, **TOL)


def test_gate_recorder_path_equals_nn_lstm():
    """Recording gates forces the Python recurrence even for plain sigmoid gates."""
    torch.manual_seed(2)
    ref, m = _pair(3, 5, 2, gates="sigmoid")
    x = torch.randn(4, 2, 3)
    with GateRecorder(m):
        _check_same(ref, m, x, grads=False)


def _manual_lstm(m: G2LSTM, x, hard=frozenset(), inv_tau=None):
    """Straightforward per-step reference (single layer, unidirectional)."""
    H = m.hidden_size
    h = torch.zeros(x.shape[1], H)
    c = torch.zeros(x.shape[1], H)
    outs = []
    inv_tau = inv_tau or {}
    for t in range(x.shape[0]):
        a = x[t] @ m.weight_ih_l0.T + m.bias_ih_l0 + h @ m.weight_hh_l0.T + m.bias_hh_l0
        ai, af, ag, ao = a.chunk(4, 1)
        gate = lambda z, name: (z > 0).float() if name in hard else torch.sigmoid(z * inv_tau.get(name, 1.0))  # noqa
        i, f, o = gate(ai, "i"), gate(af, "f"), gate(ao, "o")
        c = f * c + i * torch.tanh(ag)
        h = o * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs)


@pytest.mark.parametrize("hard", ["if", "ifo", "o"])
def test_hard_gates_are_step_functions(hard):
    torch.manual_seed(3)
    m = G2LSTM(4, 8, 1, gates="gumbel", hard_gates=hard).eval()
    x = torch.randn(6, 3, 4)
    with torch.no_grad():
        out, _ = m(x)
        torch.testing.assert_close(out, _manual_lstm(m, x, frozenset(hard)), **TOL)


def test_sharpened_uses_temperature_in_train_and_eval():
    torch.manual_seed(4)
    m = G2LSTM(4, 8, 1, gates="sharpened", tau=0.2)
    x = torch.randn(5, 2, 4)
    expected = _manual_lstm(m, x, inv_tau={"i": 5.0, "f": 5.0})
    for mode in (True, False):
        m.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(m(x)[0], expected, **TOL)


def test_gumbel_training_is_stochastic_and_eval_deterministic():
    torch.manual_seed(5)
    m = G2LSTM(4, 8, 2, gates="gumbel")
    x = torch.randn(5, 2, 4)
    m.train()
    assert not torch.allclose(m(x)[0], m(x)[0])
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0], atol=0, rtol=0)


def test_gumbel_noise_only_on_selected_gates():
    """noise_p=0 turns Gumbel training into the sharpened sigmoid on the chosen gates."""
    torch.manual_seed(6)
    m = G2LSTM(4, 8, 1, gates="gumbel", tau=0.5, noise_p=0.0, gumbel_gates="f").train()
    x = torch.randn(5, 2, 4)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], _manual_lstm(m, x, inv_tau={"f": 2.0}), **TOL)


def test_hard_gates_train_with_straight_through_gradients():
    torch.manual_seed(7)
    m = G2LSTM(4, 8, 2, gates="gumbel", hard_gates="if").train()
    out, _ = m(torch.randn(5, 2, 4))
    out.sum().backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(8)
    m = G2LSTM(4, 8, 2, dropout=0.5, gates="sharpened", tau=1.0)
    x = torch.randn(5, 2, 4)
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0], atol=0, rtol=0)
    m.train()
    assert not torch.allclose(m(x)[0], m(x)[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(gates="binary"), "gates must be one of"),
    (dict(tau=0.0, gates="gumbel"), "tau must be > 0"),
    (dict(noise_p=1.5, gates="gumbel"), "noise_p"),
    (dict(hard_gates="ix"), "hard_gates may contain only"),
    (dict(gumbel_gates=["g"]), "gumbel_gates may contain only"),
    (dict(dropout=1.0), "dropout"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        G2LSTM(4, 8, **kwargs)


def test_forward_errors():
    m = G2LSTM(4, 8, 2)
    with pytest.raises(ValueError, match="input_size=4"):
        m(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="hidden state must have shape"):
        m(torch.randn(3, 2, 4), (torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)))
    with pytest.raises(NotImplementedError, match="proj_size"):
        G2LSTM(4, 8, proj_size=2)
