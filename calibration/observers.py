"""Range observers for symmetric int8 activation quantizers.

Each observer sees activation tensors during calibration and proposes a clipping threshold
``t`` (the quantizer's scale is then ``t / 127``):

* ``MinMaxObserver``: the largest ``|x|`` seen.
* ``PercentileObserver``: the ``q``-th percentile of ``|x|`` (default 99.99), from a histogram.
* ``MSEObserver``: the threshold minimising the mean squared quantization error over the
  histogram of ``|x|`` (clipping error + rounding error).

Histograms have a fixed number of bins over ``[0, running max]``; when the max grows the
histogram is re-binned, so memory stays constant however much data is observed.
"""
from __future__ import annotations

import torch

QMAX = 127


class Observer:
    name = "base"

    def __init__(self):
        self.count = 0

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def threshold(self) -> float:
        raise NotImplementedError

    def scale(self) -> float:
        if self.count == 0:
            raise ValueError(f"{self.name} observer has seen no data: run calibration batches first")
        t = self.threshold()
        return t / QMAX if t > 0 else 1.0


class MinMaxObserver(Observer):
    name = "minmax"

    def __init__(self):
        super().__init__()
        self.max = 0.0

    def observe(self, x):
        self.max = max(self.max, float(x.detach().abs().max()))
        self.count += x.numel()

    def threshold(self):
        return self.max


class _HistogramObserver(Observer):
    def __init__(self, bins: int = 2048):
        super().__init__()
        self.bins = bins
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self.max = 0.0

    def observe(self, x):
        a = x.detach().abs().reshape(-1).double()
        m = float(a.max()) if a.numel() else 0.0
        if m > self.max:
            if self.max > 0 and self.hist.sum() > 0:   # re-bin the old histogram onto the wider range
                centers = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * (self.max / self.bins)
                new = torch.zeros(self.bins, dtype=torch.float64)
                idx = (centers / m * self.bins).long().clamp_(max=self.bins - 1)
                new.index_add_(0, idx, self.hist)
                self.hist = new
            self.max = m
        if self.max > 0:
            self.hist += torch.histc(a, bins=self.bins, min=0.0, max=self.max)
        self.count += a.numel()

    def _edges(self):
        return torch.linspace(0, self.max, self.bins + 1, dtype=torch.float64)


class PercentileObserver(_HistogramObserver):
    name = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = 2048):
        super().__init__(bins)
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile

    def threshold(self):
        if self.max == 0:
            return 0.0
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        k = int(torch.searchsorted(cdf, torch.tensor(self.percentile / 100, dtype=torch.float64)))
        return float(self._edges()[min(k + 1, self.bins)])


class MSEObserver(_HistogramObserver):
    name = "mse"

    def threshold(self, candidates: int = 100):
        if self.max == 0:
            return 0.0
        edges = self._edges()
        centers = (edges[:-1] + edges[1:]) / 2
        best_t, best_err = self.max, float("inf")
        for ratio in torch.linspace(0.05, 1.0, candidates, dtype=torch.float64):
            t = float(ratio) * self.max
            s = t / QMAX
            q = torch.clamp(torch.round(centers / s), max=QMAX) * s
            err = float((self.hist * (centers - q) ** 2).sum())
            if err < best_err:
                best_t, best_err = t, err
        return best_t


OBSERVERS = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver}


def make_observer(name: str) -> Observer:
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; choose from {sorted(OBSERVERS)}")
    return OBSERVERS[name]()
