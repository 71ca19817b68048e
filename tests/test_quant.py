"""Weight quantizers, quantized layers, quantize(), calibration and their errors."""
import copy

import pytest
import torch
from torch import nn

import g2quant
from g2quant.api import QuantConfig
from g2quant.calibration.calibrate import calibrate
from g2quant.calibration.observers import MinMaxObserver, MSEObserver, PercentileObserver
from g2quant.nn import G2LSTM
from g2quant.nn.qmodules import QuantG2LSTM
from g2quant.nn.quant import BinaryWeightQuant, IntWeightQuant, TernaryWeightQuant


# ---------------------------------------------------------------- quantizers
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_int_levels_and_max_scale(bits):
    torch.manual_seed(bits)
    w = torch.randn(6, 33) * torch.tensor([0.01, 0.1, 1, 3, 10, 100])[:, None]
    q = IntWeightQuant(bits)
    q.init_scale(w, "max")
    ints, s = q.quantize(w)
    qmax = 2 ** (bits - 1) - 1
    assert ints.dtype == torch.int8 and int(ints.abs().max()) == qmax
    assert (ints.abs().amax(dim=1) == qmax).all()                      # every row reaches its extreme level
    torch.testing.assert_close(s, w.abs().amax(dim=1) / qmax)          # per-row max scaling
    torch.testing.assert_close(q(w), s[:, None] * ints.float())        # forward = dequantized integers
    assert ((q(w) - w).abs() <= s[:, None] / 2 + 1e-6).all()           # round to nearest level


def test_per_tensor_vs_per_row():
    w = torch.tensor([[1.0, -0.5, 0.25], [100.0, 50.0, -25.0]])
    row, tensor = IntWeightQuant(4, per_channel=True), IntWeightQuant(4, per_channel=False)
    row.init_scale(w, "max")
    tensor.init_scale(w, "max")
    _, s_row = row.quantize(w)
    _, s_t = tensor.quantize(w)
    torch.testing.assert_close(s_row, torch.tensor([1 / 7, 100 / 7]))
    torch.testing.assert_close(s_t, torch.tensor([100 / 7, 100 / 7]))
    assert (tensor(w)[0] == 0).sum() >= 2           # the small row collapses under one shared scale


def test_mse_scaling_never_worse_than_max():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    w[:, 0] *= 8                                     # outliers favour clipping at low bits
    for bits in (2, 3, 4):
        a, b = IntWeightQuant(bits), IntWeightQuant(bits)
        a.init_scale(w, "max")
        b.init_scale(w, "mse")
        err = lambda q: (q(w) - w).pow(2).sum(dim=1)  # noqa: E731
        assert (err(b) <= err(a) + 1e-6).all()
        assert err(b).sum() < 0.9 * err(a).sum()


def test_ste_gradient():
    w = torch.tensor([[0.1, -0.4, 0.9, 2.0]], requires_grad=True)
    q = IntWeightQuant(3, learn_scale=True)
    with torch.no_grad():
        q.scale.fill_(0.3)                            # levels ±0.9 max: 2.0 is clipped
    q._initialised = True
    q(w).sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))  # identity inside, 0 when clipped
    assert q.scale.grad is not None and q.scale.grad.abs() > 0                # LSQ-style scale gradient


def test_binary_and_ternary_values_exact():
    w = torch.tensor([[0.5, -1.5, 0.0, 2.0], [-0.1, -0.2, 0.3, 0.4]])
    b = BinaryWeightQuant()
    ints, s = b.quantize(w)
    assert set(ints.unique().tolist()) == {-1, 1} and ints[0, 2] == 1      # sign(0) = +1
    torch.testing.assert_close(s, w.abs().mean(dim=1))
    torch.testing.assert_close(b(w), s[:, None] * ints.float())
    t = TernaryWeightQuant()
    ints, s = t.quantize(w)
    assert set(ints.unique().tolist()) <= {-1, 0, 1}
    # row 0: mean|w| = 1.0, entries above 0.7: 1.5 and 2.0 -> alpha 1.75; threshold alpha/2
    assert s[0].item() == pytest.approx(1.75)
    assert ints[0].tolist() == [0, -1, 0, 1]
    torch.testing.assert_close(t(w), s[:, None] * ints.float())
    w.requires_grad_(True)
    t(w).sum().backward()
    assert torch.isfinite(w.grad).all()


# ---------------------------------------------------------------- layers
def test_quantized_lstm_without_quantization_equals_float():
    torch.manual_seed(1)
    ref = nn.LSTM(5, 7, 2)
    m = QuantG2LSTM.convert(ref, lambda: None, act=None)
    x = torch.randn(4, 3, 5)
    torch.testing.assert_close(m(x)[0], ref(x)[0])
    g = G2LSTM.from_lstm(ref, gates="gumbel").eval()
    mg = QuantG2LSTM.convert(g, lambda: None, act=None).eval()
    torch.testing.assert_close(mg(x)[0], ref(x)[0], atol=1e-6, rtol=1e-5)


class Foreign(nn.Module):
    """A model g2quant did not define."""

    def __init__(self, vocab=40, emb=12, hidden=20):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, num_layers=2)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x, hidden=None):
        out, hidden = self.lstm(self.emb(x), hidden)
        return self.head(out), hidden


@pytest.fixture
def foreign():
    torch.manual_seed(2)
    return Foreign().eval()


def test_16_bits_without_activation_quant_equals_float(foreign):
    x = torch.randint(0, 40, (9, 2))
    q = g2quant.quantize(foreign, bits=16, act_bits=None)
    torch.testing.assert_close(q(x)[0], foreign(x)[0])


def test_quantize_foreign_model(foreign):
    before = copy.deepcopy(foreign.state_dict())
    x = torch.randint(0, 40, (20, 4))
    ref = foreign(x)[0]
    errors = []
    for bits in (8, 6, 4, 3, 2):
        q = g2quant.quantize(foreign, bits=bits)
        assert isinstance(q, nn.Module) and isinstance(q.model.lstm, QuantG2LSTM)
        errors.append((q(x)[0] - ref).pow(2).mean().sqrt().item())
    # the caller's model is untouched
    assert type(foreign.lstm) is nn.LSTM and type(foreign.head) is nn.Linear
    for k, v in foreign.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    assert errors[0] < 0.01 * ref.abs().mean().item() * 10      # 8 bits: close to float
    assert errors == sorted(errors), errors                      # degrades monotonically


def test_size_bytes_hand_computation(foreign):
    q = g2quant.quantize(foreign, bits=4)
    # 4-bit weights packed two per byte per row (rows padded to whole bytes) + float32 row scales
    packed = lambda r, k, b: r * -(-k * b // 8)  # noqa: E731
    mats = [(40, 12), (80, 12), (80, 20), (80, 20), (80, 20), (40, 20)]  # emb, ih0, hh0, ih1, hh1, head
    expected = sum(packed(r, k, 4) + 4 * r for r, k in mats)
    expected += 4 * (2 * 80 + 40)              # one summed bias vector (b_ih + b_hh) per LSTM layer + head bias
    assert q.size_bytes() == expected
    assert q.float_size_bytes() == 4 * sum(p.numel() for p in foreign.parameters())
    q3 = g2quant.quantize(foreign, bits=3, skip=("head",))
    dense = sum(-(-r * k * 3 // 8) + 4 * r for r, k in mats[:-1]) + 4 * (40 * 20 + 40) + 4 * (2 * 80)
    assert q3.size_bytes(dense=True) == dense


def test_tied_weights_share_quantizer_and_count_once():
    from g2quant.models import LMConfig, WordLM
    torch.manual_seed(3)
    m = WordLM(LMConfig(vocab_size=30, emb_size=16, hidden_size=16, tied=True))
    q = g2quant.quantize(m, bits=4)
    assert q.model.decoder.wq is q.model.embedding.wq
    assert q.model.decoder.weight is q.model.embedding.weight
    assert len([n for n, _, _ in q.weight_quantizers() if "decoder" in n]) == 0


def test_hard_gates_and_skip(foreign):
    q = g2quant.quantize(foreign, bits=4, hard_gates="fi", skip=("head",))
    assert q.model.lstm.hard_gates == frozenset("if")
    assert type(q.model.head) is nn.Linear
    assert q.config.hard_gates == "if"


def test_qat_trains_weights_and_scales(foreign):
    q = g2quant.quantize(foreign, bits=3, method="qat", hard_gates="if")
    assert q.training
    x, y = torch.randint(0, 40, (10, 4)), torch.randint(0, 40, (10, 4))
    opt = torch.optim.SGD(q.parameters(), lr=0.5)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(q(x)[0].reshape(-1, 40), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    scale = q.model.lstm.wq["weight_hh_l0"].scale
    assert scale.requires_grad and scale.grad is not None


# ---------------------------------------------------------------- calibration
def test_observers():
    torch.manual_seed(4)
    x = torch.randn(100_000)
    mm, pc, mse = MinMaxObserver(), PercentileObserver(99.0), MSEObserver()
    for chunk in x.split(10_000):   # the growing range forces histogram re-binning
        for o in (mm, pc, mse):
            o.observe(chunk)
    assert mm.threshold() == pytest.approx(x.abs().max().item())
    assert pc.threshold() == pytest.approx(torch.quantile(x.abs(), 0.99).item(), rel=0.02)
    assert 0 < mse.threshold() < mm.threshold()
    with pytest.raises(ValueError, match="seen no data"):
        MinMaxObserver().scale()


def test_static_activations_use_calibrated_ranges(foreign):
    batches = [torch.randint(0, 40, (8, 2)) for _ in range(3)]
    q = g2quant.quantize(foreign, bits=8, act_mode="static", observer="minmax", calib=batches)
    thr = q.model.head.act_in.threshold
    with torch.no_grad():
        hmax = max(foreign.lstm(foreign.emb(b))[0].abs().max().item() for b in batches)
    assert thr == pytest.approx(hmax, rel=0.02)   # calibrated on the quantized LSTM's h, not the float one
    out = q(batches[0])[0]
    assert (out - foreign(batches[0])[0]).abs().max() < 0.05
    again = calibrate(q, batches)
    assert set(again) >= {"model.head.act_in", "model.lstm.act_in.0", "model.lstm.act_h.1"}


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=0), "bits=0 is invalid"),
    (dict(bits=9), "bits=9 is invalid"),
    (dict(bits="quaternary"), "bits='quaternary' is invalid"),
    (dict(bits=4, embedding_bits=12), "embedding_bits=12 is invalid"),
    (dict(bits=4, skip=("decoder",)), "skip names unknown layers \\['decoder'\\]"),
    (dict(bits=4, act_bits=4), "act_bits must be 8 or None"),
    (dict(bits=4, method="magic"), "method must be"),
    (dict(bits=4, observer="median"), "observer must be one of"),
    (dict(bits=4, hard_gates="ig"), "hard_gates may contain only"),
    (dict(bits=4, act_mode="static"), "needs calibration data"),
    (dict(bits=4, calib=[]), "calibration data is empty"),
    (dict(bits=4, calib=[torch.zeros(0, 2, dtype=torch.long)]), "calibration batch 0 is empty"),
])
def test_bad_input_errors(foreign, kwargs, match):
    with pytest.raises(ValueError, match=match):
        g2quant.quantize(foreign, **kwargs)


def test_nothing_to_quantize():
    with pytest.raises(ValueError, match="nothing to quantize"):
        g2quant.quantize(nn.Sequential(nn.ReLU(), nn.Tanh()))
    with pytest.raises(ValueError, match="nothing to quantize"):
        g2quant.quantize(Foreign(), skip=("emb", "lstm", "head"))
    with pytest.raises(ValueError, match="needs a torch.nn.Module"):
        g2quant.quantize("model.pt")


def test_config_is_frozen_and_round_trips():
    c = QuantConfig(bits="2", hard_gates="fi", skip=["a"])
    assert c.bits == 2 and c.hard_gates == "if" and c.skip == ("a",)
    assert QuantConfig.from_dict(c.to_dict()) == c
    with pytest.raises(Exception):
        c.bits = 3
