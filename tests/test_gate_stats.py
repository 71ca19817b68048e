"""Gate statistics: saturation fractions and histograms from GateRecorder."""
import pytest
import torch
from torch import nn

from g2quant.nn import G2LSTM, GateRecorder


def test_saturation_fractions_and_plot(tmp_path):
    torch.manual_seed(0)
    m = G2LSTM(3, 4, 2, gates="gumbel").eval()
    with torch.no_grad():
        for layer in range(2):
            b = getattr(m, f"bias_ih_l{layer}")
            b[:4] = 50.0      # input gate always open  -> > 0.9
            b[4:8] = -50.0    # forget gate always shut -> < 0.1
    x = torch.randn(6, 5, 3)
    with GateRecorder(m) as rec:
        m(x)
        m(x)
    s = rec.stats.summary()
    assert set(s) == {f"l{l}.{g}" for l in (0, 1) for g in "ifo"}
    assert s["l0.i"]["above_0.9"] == 1.0 and s["l1.i"]["above_0.9"] == 1.0
    assert s["l0.f"]["below_0.1"] == 1.0 and s["l1.f"]["saturated"] == 1.0
    assert s["l0.i"]["n"] == 2 * 6 * 5 * 4                       # two passes, T x B x H values
    assert 0.0 <= s["l0.o"]["saturated"] < 1.0
    assert int(rec.stats.counts[(0, "i")].sum()) == s["l0.i"]["n"]
    assert m.gate_recorder is None                               # detached after the block
    rec.stats.plot(tmp_path / "g.png", title="test")
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recorded_values_are_the_gates_used():
    """With hard gates the recorder sees exact 0/1 values."""
    m = G2LSTM(3, 4, 1, gates="gumbel", hard_gates="if").eval()
    with GateRecorder(m, gates=("i", "f")) as rec:
        m(torch.randn(4, 2, 3))
    for g in "if":
        counts = rec.stats.counts[(0, g)]
        assert int(counts[1:-1].sum()) == 0                       # only the first and last bins


def test_recorder_needs_a_g2lstm():
    with pytest.raises(ValueError, match="no G2LSTM"):
        GateRecorder(nn.Sequential(nn.LSTM(3, 4)))
