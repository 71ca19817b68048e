"""G2GRU: drop-in ``nn.GRU`` (property-based), Gumbel / sharpened / hard gates, quantization of
foreign GRU models, export and the torch-free runtime (tolerance as export's agreement check)."""
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import g2quant
from g2quant.export import AGREEMENT_RTOL
from g2quant.lower import example_input
from g2quant.nn.g2gru import G2GRU, QuantG2GRU


def _loop(m):
    """The module with its own step loop (not torch's fused kernel)."""
    m._plain = lambda: False
    return m


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 5), B=st.integers(1, 3), I=st.integers(1, 6), H=st.integers(1, 6),
       L=st.integers(1, 2), bi=st.booleans(), bf=st.booleans(), bias=st.booleans())
def test_sigmoid_g2gru_equals_nn_gru_in_outputs_and_gradients(T, B, I, H, L, bi, bf, bias):
    torch.manual_seed(T * 100 + H)
    ref = nn.GRU(I, H, L, bias=bias, batch_first=bf, bidirectional=bi)
    m = _loop(G2GRU.from_gru(ref))
    x = torch.randn((B, T, I) if bf else (T, B, I), requires_grad=True)
    h0 = torch.randn(L * (2 if bi else 1), B, H)
    y1, h1 = ref(x, h0)
    y2, h2 = m(x, h0)
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h2, h1, atol=1e-5, rtol=1e-5)
    g1 = torch.autograd.grad((y1.sum() + h1.sum()), [x] + list(ref.parameters()))
    g2 = torch.autograd.grad((y2.sum() + h2.sum()), [x] + list(m.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_state_dict_loads_both_ways_and_unbatched_input():
    ref = nn.GRU(4, 5, 2)
    m = G2GRU(4, 5, 2)
    m.load_state_dict(ref.state_dict())
    ref.load_state_dict(m.state_dict())
    x = torch.randn(6, 4)
    torch.testing.assert_close(m(x)[0], ref(x)[0])


def test_gumbel_gates_are_noisy_in_training_and_deterministic_in_eval():
    torch.manual_seed(0)
    m = _loop(G2GRU(3, 8, gates="gumbel", tau=0.5))
    x = torch.randn(5, 2, 3)
    m.train()
    assert not torch.equal(m(x)[0], m(x)[0])
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0], atol=0, rtol=0)
    plain = _loop(G2GRU(3, 8))
    plain.load_state_dict(m.state_dict())
    torch.testing.assert_close(m.eval()(x)[0], plain.eval()(x)[0])        # eval = plain sigmoid


def test_hard_gates_are_exactly_binary_and_straight_through():
    torch.manual_seed(1)
    m = _loop(G2GRU(3, 4, hard_gates="rz"))
    from g2quant.nn import GateRecorder
    with GateRecorder(m) as rec:
        x = torch.randn(7, 2, 3, requires_grad=True)
        y, _ = m(x)
    for key in ("l0.r", "l0.z"):
        s = rec.stats.summary()[key]
        assert s["below_0.1"] + s["above_0.9"] == 1.0                   # every value is 0 or 1
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0                 # straight-through gradient


@pytest.mark.parametrize("bad,message", [
    (dict(gates="tanh"), "gates must be one of"), (dict(hard_gates="if"), "only the GRU gates"),
    (dict(tau=0), "tau must be > 0"), (dict(noise_p=2), "noise_p"),
])
def test_bad_arguments(bad, message):
    with pytest.raises(ValueError, match=message):
        G2GRU(3, 4, **bad)


class GRUTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 8)
        self.rnn = nn.GRU(8, 12, num_layers=2)
        self.out = nn.Linear(12, 5)

    def forward(self, x, h=None):
        o, h = self.rnn(self.emb(x), h)
        return self.out(o), h


class GRUClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = G2GRU(4, 10, batch_first=True, bidirectional=True, gates="sharpened")
        self.fc = nn.Linear(20, 3)

    def forward(self, x):
        _, h = self.rnn(x)
        return self.fc(torch.cat([h[-2], h[-1]], dim=1))


@pytest.mark.parametrize("cls,hard", [(GRUTagger, "rz"), (GRUTagger, ""), (GRUClassifier, "")])
def test_foreign_gru_models_quantize_export_and_run_like_torch(cls, hard, tmp_path):
    torch.manual_seed(0)
    q = g2quant.quantize(cls().eval(), bits=4, hard_gates=hard)
    assert any(isinstance(m, QuantG2GRU) for m in q.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = q.export(tmp_path / "g.g2q")
    rt = g2quant.load(p)
    assert "gru" in [n.op for n in rt.graph.nodes]
    gru_nodes = [n.name for n in rt.graph.nodes if n.op == "gru"]
    assert not set(gru_nodes) & set(rt.info()["reference_nodes"]), "the gru node must run on the CPU kernels"
    x = example_input(q.model)
    y = q(x)
    y = (y[0] if isinstance(y, tuple) else y).detach().numpy()
    got, state = rt.run(x.numpy())
    assert float(np.abs(got - y).max()) <= AGREEMENT_RTOL * max(1.0, float(np.abs(y).max()))
    if rt.streamable:
        st_ = rt.initial_state(x.shape[1])
        for t in range(x.shape[0]):
            yt, st_ = rt.step(x.numpy()[t], st_)
        np.testing.assert_allclose(st_.h, state.h, atol=1e-5)
        h0 = torch.randn(2, x.shape[1], 12) * 0.5                      # a given initial state
        y0, h_t = q(x, h0)
        got0, st0 = rt.run(x.numpy(), h0.numpy())
        assert float(np.abs(got0 - y0.detach().numpy()).max()) <= AGREEMENT_RTOL * max(1.0, float(y0.abs().max()))
        np.testing.assert_allclose(st0.h, h_t.detach().numpy(), atol=2e-3)


def test_gru_hard_gate_letters_are_checked_per_family():
    with pytest.raises(ValueError, match="match no gate of this model"):
        g2quant.quantize(GRUTagger(), bits=4, hard_gates="if")


@pytest.mark.parametrize("cls", [GRUTagger, GRUClassifier], ids=lambda c: c.__name__)
def test_gru_models_on_the_onnx_target(cls, tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    q = g2quant.quantize(cls().eval(), bits=4, hard_gates="rz" if cls is GRUTagger else "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = q.export(tmp_path / "g.g2q", target="onnx")
    rt = g2quant.load(p)
    x = example_input(q.model)
    y = q(x)
    y = (y[0] if isinstance(y, tuple) else y).detach().numpy()
    got, state = rt.run(x.numpy())
    assert float(np.abs(got - y).max()) <= AGREEMENT_RTOL * max(1.0, float(np.abs(y).max()))
    if rt.streamable:
        st_ = rt.initial_state(x.shape[1])
        for t in range(x.shape[0]):
            _, st_ = rt.step(x.numpy()[t], st_)
        np.testing.assert_allclose(st_.h, state.h, atol=1e-5)
