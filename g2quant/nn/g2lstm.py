"""G2LSTM: a drop-in ``torch.nn.LSTM`` whose input and forget gates can be trained as
Gumbel-sigmoid gates that converge to 0/1 (Li et al., ICML 2018).

Same constructor arguments, forward signature, returned ``(output, (h_n, c_n))``,
``state_dict`` keys and gate order (i, f, g, o) as ``torch.nn.LSTM``: an ``nn.LSTM``
state_dict loads as is.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from .gumbel import logistic_noise
from .recurrence import recurrence, to_ifog

GATE_MODES = ("sigmoid", "gumbel", "sharpened")
GATES = ("i", "f", "o")
DEFAULT_TAU = {"sigmoid": 1.0, "gumbel": 0.9, "sharpened": 0.2}


def _gate_set(value: Iterable[str] | str | None, what: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        value = tuple(value)  # "if" -> ("i", "f")
    out = frozenset(value)
    bad = out - set(GATES)
    if bad:
        raise ValueError(f"{what} may contain only {GATES}, got {sorted(bad)}")
    return out


class G2LSTM(nn.Module):
    """Multi-layer LSTM with selectable gate nonlinearity.

    Args (as ``torch.nn.LSTM``): ``input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False``.

    G2-LSTM args:
        gates: ``"sigmoid"`` (plain LSTM, equals ``nn.LSTM``), ``"gumbel"`` (training samples
            ``sigmoid((a + log U − log(1−U)) / tau)`` per element and step for the gates in
            ``gumbel_gates``; eval is the deterministic sigmoid) or ``"sharpened"``
            (``sigmoid(a / tau)`` for those gates in training and eval: the paper's baseline).
        tau: temperature; default 0.9 for gumbel, 0.2 for sharpened (the paper's settings).
        noise_p: probability that an element receives noise (authors' code: 0.2; paper: 1.0).
        gumbel_gates: which gates are Gumbel/sharpened; default input and forget (``"if"``).
        hard_gates: gates evaluated as ``1[a > 0]`` (deployment-time evaluation); in training
            they are straight-through (forward hard, gradient of the soft gate).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, *, gates: str = "sigmoid", tau: float | None = None,
                 noise_p: float = 1.0, gumbel_gates: Iterable[str] | str = ("i", "f"),
                 hard_gates: Iterable[str] | str | None = None, device=None, dtype=None):
        super().__init__()
        if proj_size:
            raise NotImplementedError("G2LSTM does not support proj_size")
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if gates not in GATE_MODES:
            raise ValueError(f"gates must be one of {GATE_MODES}, got {gates!r}")
        tau = DEFAULT_TAU[gates] if tau is None else float(tau)
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if not 0.0 <= noise_p <= 1.0:
            raise ValueError(f"noise_p must be in [0, 1], got {noise_p}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, 0
        self.gates, self.tau, self.noise_p = gates, tau, float(noise_p)
        self.gumbel_gates = _gate_set(gumbel_gates, "gumbel_gates")
        self.hard_gates = _gate_set(hard_gates, "hard_gates")
        self.gate_recorder = None  # set by g2quant.nn.stats.GateRecorder
        num_dir = 2 if bidirectional else 1
        kw = {"device": device, "dtype": dtype}
        self._flat_names = []
        for layer in range(num_layers):
            for d in range(num_dir):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                in_size = input_size if layer == 0 else hidden_size * num_dir
                names = [f"weight_ih{sfx}", f"weight_hh{sfx}"]
                setattr(self, names[0], nn.Parameter(torch.empty(4 * hidden_size, in_size, **kw)))
                setattr(self, names[1], nn.Parameter(torch.empty(4 * hidden_size, hidden_size, **kw)))
                if bias:
                    names += [f"bias_ih{sfx}", f"bias_hh{sfx}"]
                    setattr(self, names[2], nn.Parameter(torch.empty(4 * hidden_size, **kw)))
                    setattr(self, names[3], nn.Parameter(torch.empty(4 * hidden_size, **kw)))
                self._flat_names.append(names)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, **kwargs) -> "G2LSTM":
        """A G2LSTM with the same shape and weights as ``lstm`` (extra kwargs: gates, tau, …)."""
        if lstm.proj_size:
            raise NotImplementedError("G2LSTM does not support proj_size")
        p = next(lstm.parameters())
        m = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias, lstm.batch_first,
                lstm.dropout, lstm.bidirectional, device=p.device, dtype=p.dtype, **kwargs)
        m.load_state_dict(lstm.state_dict())
        return m

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, gates={self.gates!r}"
        if self.gates != "sigmoid":
            s += f", tau={self.tau}, gumbel_gates={''.join(sorted(self.gumbel_gates))}"
        if self.gates == "gumbel":
            s += f", noise_p={self.noise_p}"
        if self.hard_gates:
            s += f", hard_gates={''.join(g for g in GATES if g in self.hard_gates)}"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s

    # -- hooks the quantized layer (g2quant.nn.qmodules.QuantG2LSTM) overrides -----------------
    def layer_weights(self, layer: int, direction: int):
        """``(w_ih, w_hh, b_ih, b_hh)`` used by one forward pass (biases None without bias)."""
        names = self._flat_names[layer * (2 if self.bidirectional else 1) + direction]
        ws = [getattr(self, n) for n in names]
        return (ws[0], ws[1], ws[2], ws[3]) if self.bias else (ws[0], ws[1], None, None)

    def input_transform(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Applied to each layer's input before its projection (identity here)."""
        return x

    def observe_output(self, out: torch.Tensor, layer: int) -> None:
        """Called with each layer's output sequence (the h values) when ``h_quant`` is set."""

    def h_quant(self, layer: int):
        """None, "dynamic" or a fixed scale tensor: how h is quantized before W_hh."""
        return None

    def _can_use_fused(self) -> bool:
        mode_is_plain = self.gates == "sigmoid" or (self.gates == "gumbel" and not self.training)
        return (mode_is_plain and not self.hard_gates and self.gate_recorder is None
                and self.h_quant(0) is None and type(self).input_transform is G2LSTM.input_transform)

    def _column_setup(self, dtype, device):
        """Per-column scale and hard mask in the internal (i, f, o, g) order, and the gates
        (indices into i, f, o) that receive Gumbel noise in this pass."""
        H = self.hidden_size
        active = self.gates == "sharpened" or (self.gates == "gumbel" and self.training)
        inv = [1.0 / self.tau if active and g in self.gumbel_gates else 1.0 for g in GATES]
        col = lambda vals, dt: torch.cat([torch.full((H,), v, dtype=dt, device=device) for v in vals])  # noqa: E731
        scale = col(inv + [1.0], dtype)
        hard = col([g in self.hard_gates for g in GATES], torch.bool) if self.hard_gates else None
        noisy = self.gates == "gumbel" and self.training
        noise_gates = [k for k, g in enumerate(GATES) if noisy and g in self.gumbel_gates]
        return scale, hard, noise_gates

    def _noise(self, zx, noise_gates, scale):
        """Scaled logistic noise for the pre-activations of the Gumbel gates: ``(noise [T, B, K],
        lo)`` over the gate columns ``lo … lo + K`` spanning the noisy gates (one draw; a gate
        inside the span that is not noisy gets zeros)."""
        H = self.hidden_size
        first, last = min(noise_gates), max(noise_gates)
        lo, hi = first * H, (last + 1) * H
        noise = logistic_noise((*zx.shape[:-1], hi - lo), p=self.noise_p, dtype=zx.dtype, device=zx.device)
        col = scale[lo:hi].clone()
        for k in range(first, last + 1):
            if k not in noise_gates:
                col[(k - first) * H:(k - first + 1) * H] = 0
        return noise.mul_(col), lo

    def forward(self, input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None):
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise NotImplementedError("G2LSTM does not accept PackedSequence; pad the batch instead")
        if input.dim() not in (2, 3):
            raise ValueError(f"G2LSTM expects a 2-D (unbatched) or 3-D input, got shape {tuple(input.shape)}")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"input has {input.shape[-1]} features, G2LSTM expects input_size={self.input_size}")
        unbatched = input.dim() == 2
        x = input.unsqueeze(1 if not self.batch_first else 0) if unbatched else input
        if self.batch_first:
            x = x.transpose(0, 1)
        T, B, _ = x.shape
        num_dir = 2 if self.bidirectional else 1
        H = self.hidden_size
        if hx is None:
            z = x.new_zeros(self.num_layers * num_dir, B, H)
            hx = (z, z)
        else:
            h0, c0 = hx
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            expected = (self.num_layers * num_dir, B, H)
            if tuple(h0.shape) != expected or tuple(c0.shape) != expected:
                raise ValueError(f"hidden state must have shape {expected}, got {tuple(h0.shape)} and {tuple(c0.shape)}")
            hx = (h0, c0)

        if self._can_use_fused():
            num_dir = 2 if self.bidirectional else 1
            params = [w for layer in range(self.num_layers) for d in range(num_dir)
                      for w in self.layer_weights(layer, d) if w is not None]
            out, h_n, c_n = torch._VF.lstm(x, hx, params, self.bias, self.num_layers, self.dropout,
                                           self.training, self.bidirectional, False)
        else:
            out, h_n, c_n = self._forward_loop(x, hx)

        if self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1 if not self.batch_first else 0)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return out, (h_n, c_n)

    def _forward_loop(self, x, hx):
        T, B, _ = x.shape
        num_dir = 2 if self.bidirectional else 1
        scale, hard, noise_gates = self._column_setup(x.dtype, x.device)
        scaled = bool((scale != 1).any())
        H = self.hidden_size
        h_n, c_n = [], []
        layer_in = x
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout and self.training:
                layer_in = nn.functional.dropout(layer_in, self.dropout, True)
            inp = self.input_transform(layer_in, layer)
            outs = []
            for d in range(num_dir):
                w_ih, w_hh, b_ih, b_hh = self.layer_weights(layer, d)
                b = None if b_ih is None else b_ih + b_hh
                seq = inp if d == 0 else inp.flip(0)
                # fold gate order, temperature and noise into the per-sequence inputs, once
                w_zx, w_z = to_ifog(w_ih, H), to_ifog(w_hh, H)
                if scaled:
                    w_zx, w_z = w_zx * scale[:, None], w_z * scale[:, None]
                zx = torch.matmul(seq, w_zx.t())
                if b is not None:
                    zx = zx + (to_ifog(b, H) * scale if scaled else to_ifog(b, H))
                noise, lo = self._noise(zx, noise_gates, scale) if noise_gates else (None, 0)
                k = layer * num_dir + d
                hq = self.h_quant(layer)
                out, h, c, gates = recurrence(zx, w_z, hx[0][k], hx[1][k], hard_cols=hard, quant_h=hq,
                                              noise=noise, noise_lo=lo)
                if hq is not None:
                    self.observe_output(out.detach(), layer)
                if self.gate_recorder is not None:
                    self.gate_recorder.observe(self, layer, gates)
                outs.append(out if d == 0 else out.flip(0))
                h_n.append(h)
                c_n.append(c)
            layer_in = outs[0] if num_dir == 1 else torch.cat(outs, dim=-1)
        return layer_in, torch.stack(h_n), torch.stack(c_n)
