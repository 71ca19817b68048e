"""Quantized layers: our own G2-LSTM cell with Brevitas weight quantizers (fake-quantized once
per forward, not once per time step), quantized Linear and Embedding, and the int8
activation quantizer they share.

Numerics match the deployment contract in ``docs/cpu-engine.md``: W-low-bit weights with
per-row scales, int8 activations (dynamic per vector by default) on every input of a
matrix product, float biases and nonlinearities.
"""
from __future__ import annotations

import torch
from torch import nn

from .g2lstm import G2LSTM
from .quant import WeightQuantizer
from .recurrence import ACT_QMAX, act_quant_ste


def cached_quant(module: nn.Module, key: str, weight: torch.Tensor, quantizer) -> torch.Tensor:
    """``quantizer(weight)``, remembered while nothing could have changed it: in eval mode and when no
    gradient is being recorded, keyed by the weight's and the quantizer's parameter versions (an
    in-place update, e.g. ``load_state_dict``, recomputes). Decoding step by step then does not
    re-quantize every matrix at every step."""
    if module.training or (torch.is_grad_enabled() and (weight.requires_grad or any(
            p.requires_grad for p in quantizer.parameters()))):
        return quantizer(weight)
    cache = module.__dict__.setdefault("_qcache", {})
    stamp = (weight._version, weight.data_ptr(), tuple((p._version, p.data_ptr()) for p in quantizer.parameters()))
    hit = cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    q = quantizer(weight).detach()
    cache[key] = (stamp, q)
    return q


class ActQuant(nn.Module):
    """Symmetric int8 activation quantizer for the input of a matrix product.

    ``mode="dynamic"``: one scale per vector (``max|x| / 127``), computed at run time; nothing
    to calibrate (the CPU engine's scheme). ``mode="static"``: one per-tensor scale from an
    observer (minmax / percentile / mse) filled by :func:`g2quant.calibration.calibrate`.
    Gradient: straight-through (zero where a static range clips).
    """

    def __init__(self, mode: str = "dynamic", observer: str = "minmax"):
        super().__init__()
        if mode not in ("dynamic", "static"):
            raise ValueError(f"activation mode must be 'dynamic' or 'static', got {mode!r}")
        self.mode, self.observer_name = mode, observer
        self.register_buffer("scale", torch.tensor(0.0))   # static scale; 0 = not calibrated
        self._observer = None

    @property
    def threshold(self) -> float:
        return float(self.scale) * ACT_QMAX

    def start_observing(self) -> None:
        from g2quant.calibration.observers import make_observer
        self._observer = make_observer(self.observer_name)

    def stop_observing(self) -> None:
        obs, self._observer = self._observer, None
        if obs is not None and obs.count and self.mode == "static":
            self.scale.fill_(obs.scale())

    def observe(self, x: torch.Tensor) -> None:
        if self._observer is not None:
            self._observer.observe(x)

    def static_scale(self):
        """The fixed scale, or None for dynamic quantization (also used while calibrating)."""
        if self.mode == "dynamic" or self._observer is not None:
            return None
        if float(self.scale) <= 0:
            raise RuntimeError("static activation quantizer used before calibration: "
                               "run g2quant.calibration.calibrate(qmodel, batches) first")
        return self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observe(x)
        return act_quant_ste(x, self.static_scale())

    def extra_repr(self) -> str:
        return f"int8, {self.mode}" + (f", observer={self.observer_name}" if self.mode == "static" else "")


class QuantG2LSTM(G2LSTM):
    """A G2LSTM whose W_ih / W_hh are fake-quantized once per forward and whose layer inputs
    and recurrent state are int8 (when ``act`` is given). Biases stay float."""

    def __init__(self, *args, weight_quant: dict[str, WeightQuantizer | None] | None = None,
                 act: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.wq = nn.ModuleDict({k: v for k, v in (weight_quant or {}).items() if v is not None})
        self.act_in = nn.ModuleList()
        self.act_h = nn.ModuleList()
        if act is not None:
            for _ in range(self.num_layers):
                self.act_in.append(ActQuant(**act))
                self.act_h.append(ActQuant(**act))

    @classmethod
    def convert(cls, lstm: nn.LSTM | G2LSTM, weight_quant_factory, act: dict | None) -> "QuantG2LSTM":
        """Build from an ``nn.LSTM`` or ``G2LSTM`` (copying weights and gate settings)."""
        if getattr(lstm, "proj_size", 0):
            raise ValueError("LSTMs with proj_size are not supported by quantize()")
        gate_kw = {}
        if isinstance(lstm, G2LSTM):
            gate_kw = dict(gates=lstm.gates, tau=lstm.tau, noise_p=lstm.noise_p,
                           gumbel_gates=lstm.gumbel_gates, hard_gates=lstm.hard_gates)
        p = next(lstm.parameters())
        wq = {}
        num_dir = 2 if lstm.bidirectional else 1
        for layer in range(lstm.num_layers):
            for d in range(num_dir):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                for kind in ("ih", "hh"):
                    wq[f"weight_{kind}{sfx}"] = weight_quant_factory()
        m = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias, lstm.batch_first,
                lstm.dropout, lstm.bidirectional, weight_quant=wq, act=act, device=p.device, dtype=p.dtype,
                **gate_kw)
        m.load_state_dict(lstm.state_dict(), strict=False)
        return m

    def h_quant(self, layer: int):
        if not len(self.act_h):
            return None
        s = self.act_h[layer].static_scale()
        return "dynamic" if s is None else s

    def _q(self, name: str) -> torch.Tensor:
        w = getattr(self, name)
        return cached_quant(self, name, w, self.wq[name]) if name in self.wq else w

    def layer_weights(self, layer: int, direction: int):
        names = self._flat_names[layer * (2 if self.bidirectional else 1) + direction]
        w_ih, w_hh = self._q(names[0]), self._q(names[1])
        if not self.bias:
            return w_ih, w_hh, None, None
        return w_ih, w_hh, getattr(self, names[2]), getattr(self, names[3])

    def input_transform(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        if len(self.act_in):
            return self.act_in[layer](x)
        return x

    def observe_output(self, out: torch.Tensor, layer: int) -> None:
        if len(self.act_h):
            self.act_h[layer].observe(out)

    def quantized_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, WeightQuantizer]]:
        """``{param name: (q int8, scale, quantizer)}`` for export."""
        return {n: (*self.wq[n].quantize(getattr(self, n)), self.wq[n]) for n in self.wq}


class QuantLinear(nn.Module):
    """``y = Q(W) · A8(x) + b``; ``weight`` is the float master weight (shared when tied)."""

    def __init__(self, linear: nn.Linear, weight_quant: WeightQuantizer | None, act: dict | None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.wq = weight_quant
        self.act_in = ActQuant(**act) if act is not None else None

    def qweight(self) -> torch.Tensor:
        return cached_quant(self, "weight", self.weight, self.wq) if self.wq is not None else self.weight

    def forward(self, x):
        if self.act_in is not None:
            x = self.act_in(x)
        return nn.functional.linear(x, self.qweight(), self.bias)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class QuantEmbedding(nn.Module):
    """Embedding lookup from the per-row quantized table (rows are looked up already dequantized)."""

    def __init__(self, emb: nn.Embedding, weight_quant: WeightQuantizer | None):
        super().__init__()
        if emb.max_norm is not None or emb.sparse:
            raise ValueError("quantize(): nn.Embedding with max_norm or sparse=True is not supported")
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx = emb.padding_idx
        self.weight = emb.weight
        self.wq = weight_quant

    def qweight(self) -> torch.Tensor:
        return cached_quant(self, "weight", self.weight, self.wq) if self.wq is not None else self.weight

    def forward(self, idx):
        return nn.functional.embedding(idx, self.qweight(), self.padding_idx)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"
