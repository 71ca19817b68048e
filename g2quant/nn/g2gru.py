"""G2GRU: a drop-in ``torch.nn.GRU`` whose reset and update gates can be trained as Gumbel-sigmoid
gates that converge to 0/1 (the G2 idea of Li et al., ICML 2018, applied to the GRU), and its
quantized form. The GRU layer family in one place: the module, the quantized module, its quantize
handler and its lowering (the torch-free op ``gru`` is in ``g2quant.targets.gru``).

Same constructor, forward signature, returned ``(output, h_n)``, ``state_dict`` keys and gate
order (r, z, n) as ``torch.nn.GRU``. Per step (torch's equations; ``r`` multiplies
``W_hn h + b_hn``, so the n-gate biases are not summable)::

    r = σ(W_ir x + b_ir + W_hr h + b_hr)        z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))     h' = (1 − z) ⊙ n + z ⊙ h

``gates="gumbel"``: in training the gates in ``gumbel_gates`` (default r and z) are
``σ((a + log U − log(1 − U)) / τ)``; eval is the plain sigmoid. ``"sharpened"``: ``σ(a / τ)``.
``hard_gates``: evaluated as ``1[a > 0]`` (straight-through in training). A closed reset gate
drops the recurrent term of the candidate; a saturated update gate makes the step copy-or-replace.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from .gumbel import logistic_noise

GATE_MODES = ("sigmoid", "gumbel", "sharpened")
GATES = ("r", "z")
DEFAULT_TAU = {"sigmoid": 1.0, "gumbel": 0.9, "sharpened": 0.2}


def _gate_set(value, what: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    out = frozenset(tuple(value) if isinstance(value, str) else value)
    if out - set(GATES):
        raise ValueError(f"{what} may contain only the GRU gates {GATES}, got {sorted(out - set(GATES))}")
    return out


class G2GRU(nn.Module):
    """Multi-layer GRU with selectable gate nonlinearity (see the module docstring)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, *,
                 gates: str = "sigmoid", tau: float | None = None, noise_p: float = 1.0,
                 gumbel_gates: Iterable[str] | str = ("r", "z"), hard_gates: Iterable[str] | str | None = None,
                 device=None, dtype=None):
        super().__init__()
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if gates not in GATE_MODES:
            raise ValueError(f"gates must be one of {GATE_MODES}, got {gates!r}")
        tau = DEFAULT_TAU[gates] if tau is None else float(tau)
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if not 0.0 <= noise_p <= 1.0:
            raise ValueError(f"noise_p must be in [0, 1], got {noise_p}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout, self.bidirectional = bias, batch_first, float(dropout), bidirectional
        self.gates, self.tau, self.noise_p = gates, tau, float(noise_p)
        self.gumbel_gates = _gate_set(gumbel_gates, "gumbel_gates")
        self.hard_gates = _gate_set(hard_gates, "hard_gates")
        self.gate_recorder = None
        D = 2 if bidirectional else 1
        kw = {"device": device, "dtype": dtype}
        self._flat_names = []
        for layer in range(num_layers):
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                in_size = input_size if layer == 0 else hidden_size * D
                names = [f"weight_ih{sfx}", f"weight_hh{sfx}"]
                setattr(self, names[0], nn.Parameter(torch.empty(3 * hidden_size, in_size, **kw)))
                setattr(self, names[1], nn.Parameter(torch.empty(3 * hidden_size, hidden_size, **kw)))
                if bias:
                    names += [f"bias_ih{sfx}", f"bias_hh{sfx}"]
                    setattr(self, names[2], nn.Parameter(torch.empty(3 * hidden_size, **kw)))
                    setattr(self, names[3], nn.Parameter(torch.empty(3 * hidden_size, **kw)))
                self._flat_names.append(names)
        bound = 1.0 / math.sqrt(hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    @classmethod
    def from_gru(cls, gru: nn.GRU, **kwargs) -> "G2GRU":
        p = next(gru.parameters())
        m = cls(gru.input_size, gru.hidden_size, gru.num_layers, gru.bias, gru.batch_first, gru.dropout,
                gru.bidirectional, device=p.device, dtype=p.dtype, **kwargs)
        m.load_state_dict(gru.state_dict())
        return m

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, gates={self.gates!r}"
        if self.hard_gates:
            s += f", hard_gates={''.join(g for g in GATES if g in self.hard_gates)}"
        return s + (", batch_first=True" if self.batch_first else "") + (", bidirectional=True" if self.bidirectional else "")

    # -- hooks of the quantized layer ------------------------------------------------------------
    def layer_weights(self, layer: int, direction: int):
        names = self._flat_names[layer * (2 if self.bidirectional else 1) + direction]
        ws = [getattr(self, n) for n in names]
        return (ws[0], ws[1], ws[2], ws[3]) if self.bias else (ws[0], ws[1], None, None)

    def input_transform(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        return x

    def quant_h(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return h

    def _plain(self) -> bool:
        mode_plain = self.gates == "sigmoid" or (self.gates == "gumbel" and not self.training)
        return (mode_plain and not self.hard_gates and self.gate_recorder is None
                and type(self).input_transform is G2GRU.input_transform)

    def _gate(self, a: torch.Tensor, g: str) -> torch.Tensor:
        active = g in self.gumbel_gates and (self.gates == "sharpened" or (self.gates == "gumbel" and self.training))
        if active:
            if self.gates == "gumbel":
                a = a + logistic_noise(a.shape, p=self.noise_p, dtype=a.dtype, device=a.device)
            a = a / self.tau
        soft = torch.sigmoid(a)
        if g in self.hard_gates:
            return (a > 0).to(a.dtype) + (soft - soft.detach())
        return soft

    def forward(self, input: torch.Tensor, hx: torch.Tensor | None = None):
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise NotImplementedError("G2GRU does not accept PackedSequence; pad the batch instead")
        if input.dim() not in (2, 3) or input.shape[-1] != self.input_size:
            raise ValueError(f"G2GRU expects [T, B, {self.input_size}] (or unbatched [T, {self.input_size}]) input, "
                             f"got {tuple(input.shape)}")
        unbatched = input.dim() == 2
        x = input.unsqueeze(1 if not self.batch_first else 0) if unbatched else input
        if self.batch_first:
            x = x.transpose(0, 1)
        T, B, _ = x.shape
        D, H = 2 if self.bidirectional else 1, self.hidden_size
        if hx is None:
            hx = x.new_zeros(self.num_layers * D, B, H)
        elif unbatched:
            hx = hx.unsqueeze(1)
        if tuple(hx.shape) != (self.num_layers * D, B, H):
            raise ValueError(f"hidden state must have shape {(self.num_layers * D, B, H)}, got {tuple(hx.shape)}")
        if self._plain():
            params = [w for layer in range(self.num_layers) for d in range(D) for w in self.layer_weights(layer, d)
                      if w is not None]
            out, h_n = torch._VF.gru(x, hx, params, self.bias, self.num_layers, self.dropout, self.training,
                                     self.bidirectional, False)
        else:
            out, h_n = self._loop(x, hx)
        if self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out, h_n = out.squeeze(1 if not self.batch_first else 0), h_n.squeeze(1)
        return out, h_n

    def _loop(self, x, hx):
        D, H = 2 if self.bidirectional else 1, self.hidden_size
        layer_in, h_n = x, []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout and self.training:
                layer_in = nn.functional.dropout(layer_in, self.dropout, True)
            inp = self.input_transform(layer_in, layer)
            outs = []
            for d in range(D):
                w_ih, w_hh, b_ih, b_hh = self.layer_weights(layer, d)
                gx = nn.functional.linear(inp, w_ih, b_ih)                  # all steps at once
                h = hx[layer * D + d]
                steps = range(x.shape[0] - 1, -1, -1) if d else range(x.shape[0])
                seq = [None] * x.shape[0]
                for t in steps:
                    gh = nn.functional.linear(self.quant_h(h, layer), w_hh, b_hh)
                    r = self._gate(gx[t, :, :H] + gh[:, :H], "r")
                    z = self._gate(gx[t, :, H:2 * H] + gh[:, H:2 * H], "z")
                    n = torch.tanh(gx[t, :, 2 * H:] + r * gh[:, 2 * H:])
                    h = (1 - z) * n + z * h
                    seq[t] = h
                    if self.gate_recorder is not None:
                        self.gate_recorder.observe_gates(self, layer, {"r": r.detach(), "z": z.detach()})
                outs.append(torch.stack(seq))
                h_n.append(h)
            layer_in = outs[0] if D == 1 else torch.cat(outs, dim=-1)
        return layer_in, torch.stack(h_n)


class QuantG2GRU(G2GRU):
    """A G2GRU whose W_ih / W_hh are fake-quantized once per forward and whose layer inputs and
    recurrent state are int8 (dynamic per vector) when ``act`` is given; biases stay float."""

    def __init__(self, *args, act: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        from .qmodules import ActQuant
        self.wq = nn.ModuleDict()
        self.act_in = nn.ModuleList([ActQuant(**act) for _ in range(self.num_layers)]) if act else nn.ModuleList()
        self.act_h = nn.ModuleList([ActQuant(**act) for _ in range(self.num_layers)]) if act else nn.ModuleList()

    @classmethod
    def convert(cls, gru: nn.GRU | G2GRU, act: dict | None) -> "QuantG2GRU":
        kw = {}
        if isinstance(gru, G2GRU):
            kw = dict(gates=gru.gates, tau=gru.tau, noise_p=gru.noise_p, gumbel_gates=gru.gumbel_gates,
                      hard_gates=gru.hard_gates)
        p = next(gru.parameters())
        m = cls(gru.input_size, gru.hidden_size, gru.num_layers, gru.bias, gru.batch_first, gru.dropout,
                gru.bidirectional, act=act, device=p.device, dtype=p.dtype, **kw)
        m.load_state_dict(gru.state_dict(), strict=False)
        return m

    def _plain(self) -> bool:
        return False

    def layer_weights(self, layer: int, direction: int):
        names = self._flat_names[layer * (2 if self.bidirectional else 1) + direction]
        from .qmodules import cached_quant
        q = lambda n: cached_quant(self, n, getattr(self, n), self.wq[n]) if n in self.wq else getattr(self, n)  # noqa: E731
        if not self.bias:
            return q(names[0]), q(names[1]), None, None
        return q(names[0]), q(names[1]), getattr(self, names[2]), getattr(self, names[3])

    def input_transform(self, x, layer):
        return self.act_in[layer](x) if len(self.act_in) else x

    def quant_h(self, h, layer):
        return self.act_h[layer](h) if len(self.act_h) else h


# ----------------------------------------------------------------------------- family registration
# (imported through g2quant.families by quantize() and the lowering)

def _register():
    import numpy as np

    from ..api import QuantizeContext, register_quantize_handler
    from ..lower import ExportError, Lowered, LowerContext, _act_bits, register_lowering

    @register_quantize_handler(nn.GRU, G2GRU)
    def _quantize_gru(m, ctx: QuantizeContext) -> nn.Module:
        gates = set(ctx.config.hard_gates) & set(GATES)          # the letters of this family
        ctx.used_gates.update(GATES)
        new = QuantG2GRU.convert(m, ctx.config.act())
        for names in new._flat_names:
            for n in names[:2]:
                q = ctx.wquant(n, getattr(new, n), "gru")
                if q is not None:
                    new.wq[n] = q
        if gates:
            new.hard_gates = frozenset(gates) | new.hard_gates
        return new

    @register_lowering(QuantG2GRU, G2GRU, nn.GRU)
    def _lower_gru(m, ctx: LowerContext, name: str) -> Lowered:
        H, L, D = m.hidden_size, m.num_layers, 2 if m.bidirectional else 1
        rs = None
        if isinstance(m, G2GRU) and m.gates == "sharpened":            # σ(a/τ): fold 1/τ into the r, z rows
            inv = 1.0 / m.tau
            rs = np.repeat(np.asarray([inv if g in m.gumbel_gates else 1.0 for g in GATES] + [1.0], np.float32), H)
        quantized = isinstance(m, QuantG2GRU)
        params = {}
        for k in range(L * D):
            sfx = f"_l{k // D}" + ("_reverse" if k % D else "")
            wq = m.wq if quantized else {}
            for kind in ("ih", "hh"):
                n = f"weight_{kind}{sfx}"
                params[f"l{k}.w_{kind}"] = ctx.qmatrix(getattr(m, n), wq[n] if n in wq else None, f"{name}.{n}",
                                                       row_scale=rs)
                b = ctx.array(getattr(m, f"bias_{kind}{sfx}") if m.bias else None, 3 * H, f"{name}.bias_{kind}{sfx}")
                params[f"l{k}.b_{kind}"] = (b if rs is None else b * rs).astype(np.float32)
        act = _act_bits(m.act_in[0], name) if quantized and len(m.act_in) else None
        if quantized and len(m.act_h) and m.act_h[0].mode != "dynamic":
            raise ExportError(f"{name}: the recurrent state uses a static activation range, which cannot be exported")
        hard = "".join(g for g in GATES if g in getattr(m, "hard_gates", ()))
        attrs = {"hidden_size": H, "num_layers": L, "bidirectional": bool(m.bidirectional), "hard_gates": hard,
                 "act_bits": act}
        return Lowered("gru", attrs, params)


_register()
