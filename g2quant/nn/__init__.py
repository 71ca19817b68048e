"""G2-LSTM layers: Gumbel-sigmoid gates, the G2LSTM module, gate statistics."""
from .g2lstm import G2LSTM
from .gumbel import gumbel_sigmoid, logistic_noise
from .stats import GateRecorder, GateStats

__all__ = ["G2LSTM", "gumbel_sigmoid", "logistic_noise", "GateRecorder", "GateStats"]
