"""Gate statistics: record gate values of every G2LSTM over a data set, summarize how many are
saturated (< 0.1 or > 0.9) and draw the paper's histograms (Li et al. 2018, Fig. 2)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .g2lstm import G2LSTM

GATE_INDEX = {"i": 0, "f": 1, "o": 2}  # column blocks of the recurrence's gate output


@dataclass
class GateStats:
    """Histogram counts of gate values in [0, 1] per (layer, gate)."""

    bins: int = 100
    counts: dict = field(default_factory=dict)  # (layer, gate) -> torch.LongTensor [bins]
    low: dict = field(default_factory=dict)     # (layer, gate) -> count of values < 0.1
    high: dict = field(default_factory=dict)    # (layer, gate) -> count of values > 0.9
    total: dict = field(default_factory=dict)

    def add(self, layer: int, gate: str, values: torch.Tensor) -> None:
        key = (layer, gate)
        v = values.detach().float().reshape(-1)
        hist = torch.histc(v, bins=self.bins, min=0.0, max=1.0).long()
        self.counts[key] = self.counts.get(key, 0) + hist
        self.low[key] = self.low.get(key, 0) + int((v < 0.1).sum())
        self.high[key] = self.high.get(key, 0) + int((v > 0.9).sum())
        self.total[key] = self.total.get(key, 0) + v.numel()

    def summary(self) -> dict:
        """``{"l0.i": {"below_0.1": frac, "above_0.9": frac, "saturated": frac, "n": count}, ...}``"""
        out = {}
        for (layer, gate) in sorted(self.total):
            n = self.total[(layer, gate)]
            lo, hi = self.low[(layer, gate)] / n, self.high[(layer, gate)] / n
            out[f"l{layer}.{gate}"] = {"below_0.1": lo, "above_0.9": hi, "saturated": lo + hi, "n": n}
        return out

    def plot(self, path, title: str = "") -> None:
        """Write a PNG with one histogram per (layer, gate): x = gate value, y = fraction."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = sorted(self.counts)
        layers = sorted({k[0] for k in keys})
        gates = [g for g in ("i", "f", "o", "r", "z") if any(k[1] == g for k in keys)]
        fig, axes = plt.subplots(len(layers), len(gates), figsize=(3.2 * len(gates), 2.4 * len(layers)),
                                 squeeze=False, sharex=True)
        edges = torch.linspace(0, 1, self.bins + 1)
        names = {"i": "input gate", "f": "forget gate", "o": "output gate", "r": "reset gate", "z": "update gate"}
        for r, layer in enumerate(layers):
            for col, gate in enumerate(gates):
                ax = axes[r][col]
                cnt = self.counts.get((layer, gate))
                if cnt is None:
                    ax.axis("off")
                    continue
                frac = (cnt.float() / cnt.sum()).numpy()
                ax.bar(edges[:-1].numpy(), frac, width=1.0 / self.bins, align="edge", color="#3b6ea5")
                s = self.summary()[f"l{layer}.{gate}"]
                ax.set_title(f"layer {layer} {names[gate]}\n<0.1: {s['below_0.1']:.0%}  >0.9: {s['above_0.9']:.0%}",
                             fontsize=9)
                ax.set_xlim(0, 1)
                if col == 0:
                    ax.set_ylabel("fraction")
                if r == len(layers) - 1:
                    ax.set_xlabel("gate value")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


class GateRecorder:
    """Context manager recording the gate values of every G2LSTM in ``model``.

    >>> with GateRecorder(model) as rec:
    ...     model(batch)
    >>> rec.stats.summary()

    Gate values are the deterministic gates the model computes (in eval mode: sigmoid, or
    ``1[a>0]`` for hard gates); forward noise is not included.
    """

    def __init__(self, model: nn.Module, gates=("i", "f", "o"), bins: int = 100):
        from .g2gru import G2GRU
        self.modules = [m for m in model.modules() if isinstance(m, (G2LSTM, G2GRU))]
        if not self.modules:
            raise ValueError("GateRecorder: the model contains no G2LSTM or G2GRU layer "
                             "(convert nn.LSTM / nn.GRU layers with G2LSTM.from_lstm / G2GRU.from_gru first)")
        self.gates = tuple(gates)
        self.stats = GateStats(bins=bins)

    def __enter__(self):
        for m in self.modules:
            m.gate_recorder = self
        return self

    def __exit__(self, *exc):
        for m in self.modules:
            m.gate_recorder = None
        return False

    def observe_gates(self, module, layer: int, gates: dict) -> None:
        """``gates``: gate letter -> values as the layer used them (the GRU's r and z)."""
        for g, v in gates.items():
            self.stats.add(layer, g, v)

    def observe(self, module: G2LSTM, layer: int, gates: torch.Tensor) -> None:
        """``gates``: [T, B, 3H] i, f, o values in that order, as the recurrence used them."""
        H = module.hidden_size
        for g in self.gates:
            k = GATE_INDEX[g]
            self.stats.add(layer, g, gates[..., k * H:(k + 1) * H])
