"""Weight quantizers built on Brevitas core quantizers: symmetric, per output row (or per
tensor), 2–8-bit integers in the narrow range, binary and ternary.

Every quantizer declares ``bits`` (what deployment stores per weight) and ``scheme``; sizes are
computed from those, never hard-coded. ``forward(w)`` returns the fake-quantized weight with
a straight-through gradient; ``quantize(w)`` returns the integers and scales an artifact stores.
"""
from __future__ import annotations

import torch
from brevitas.core.function_wrapper import Identity, RoundSte, TensorClamp
from brevitas.core.quant import BinaryQuant, IntQuant, TernaryQuant
from torch import nn

_EPS = 1e-12


def _row_view(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    return w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)


def _shape_scale(s: torch.Tensor, w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """[R] or [1] scale -> broadcastable to ``w``."""
    return s.reshape(-1, *([1] * (w.dim() - 1))) if per_channel else s.reshape(())


class WeightQuantizer(nn.Module):
    """Base class. Subclasses set ``bits`` and ``scheme`` and implement ``forward``/``_int_and_scale``."""

    bits: int
    scheme: str
    per_channel: bool = True

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q int8 [R, K], scale float32 [R])`` with ``forward(w) == scale[:, None] * q``."""
        with torch.no_grad():
            q, s = self._int_and_scale(w)
            q2 = q.reshape(w.shape[0], -1).to(torch.int8)
            s = s.reshape(-1).float()
            if s.numel() == 1:
                s = s.expand(w.shape[0]).contiguous()
            return q2, s

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scheme={self.scheme}, per_channel={self.per_channel}"


class IntWeightQuant(WeightQuantizer):
    """Symmetric narrow-range b-bit integer quantizer, ``b`` = 2…8.

    Forward map: ``Q(w) = s · clamp(round(w / s), −(2^(b−1)−1), 2^(b−1)−1)`` with one scale ``s``
    per output row (``per_channel=True``) or per tensor, computed by Brevitas ``IntQuant``.
    Scale: initialised by :meth:`init_scale` from the weight ("max": ``max|w| / qmax``;
    "mse": the clipping ratio on a grid minimising ``‖w − Q(w)‖²`` per row), then a learnable
    parameter in QAT (``learn_scale=True``) or frozen (PTQ).
    Gradient: straight-through for the rounding (Brevitas ``RoundSte``), identity inside the
    clamp range and zero outside (Brevitas ``TensorClamp``); the scale receives the LSQ-style
    gradient ``round(w/s) − w/s`` (Esser et al. 2020), scaled by ``1/sqrt(K·qmax)``, when learnable.
    """

    scheme = "int"

    def __init__(self, bits: int, per_channel: bool = True, learn_scale: bool = False):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"IntWeightQuant supports 2..8 bits, got {bits}")
        self.bits, self.per_channel = int(bits), per_channel
        self.qmax = 2 ** (self.bits - 1) - 1
        self.impl = IntQuant(narrow_range=True, signed=True, input_view_impl=Identity(), float_to_int_impl=RoundSte(),
                             tensor_clamp_impl=TensorClamp())
        self.register_buffer("bit_width", torch.tensor(float(self.bits)), persistent=False)
        self.register_buffer("zero_point", torch.tensor(0.0), persistent=False)
        self.scale = nn.Parameter(torch.ones(1), requires_grad=learn_scale)
        self._initialised = False

    @torch.no_grad()
    def init_scale(self, w: torch.Tensor, method: str = "max", grid: int = 50) -> None:
        rows = _row_view(w.detach().float(), self.per_channel)
        amax = rows.abs().amax(dim=1).clamp_min(_EPS)
        if method == "max":
            s = amax / self.qmax
        elif method == "mse":
            best_err = torch.full_like(amax, float("inf"))
            s = amax / self.qmax
            for ratio in torch.linspace(1.0, 0.2, grid):
                cand = amax * ratio / self.qmax
                q = torch.clamp(torch.round(rows / cand[:, None]), -self.qmax, self.qmax) * cand[:, None]
                err = (q - rows).pow(2).sum(dim=1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                s = torch.where(better, cand, s)
        else:
            raise ValueError(f"weight scaling must be 'max' or 'mse', got {method!r}")
        self.scale.data = s.to(self.scale.dtype)
        self._initialised = True

    def _scale(self, w):
        if not self._initialised:
            self.init_scale(w)
        s = self.scale.abs() + _EPS
        if self.scale.requires_grad:
            # LSQ gradient scaling 1/sqrt(K·qmax): same forward value, a gradient of the size
            # SGD can use at the weights' learning rate
            g = 1.0 / (w[0].numel() * self.qmax) ** 0.5
            s = s * g + (s - s * g).detach()
        return _shape_scale(s, w, self.per_channel)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.impl(self._scale(w), self.zero_point, self.bit_width, w)

    def _int_and_scale(self, w):
        s = self._scale(w)
        return self.impl.to_int(s, self.zero_point, self.bit_width, w), s


class _RowMeanAbs(nn.Module):
    """Scale = mean |w| per row (XNOR-Net's alpha), gradient flows through it."""

    def __init__(self, per_channel: bool):
        super().__init__()
        self.per_channel = per_channel

    def forward(self, w):
        return _shape_scale(_row_view(w, self.per_channel).abs().mean(dim=1), w, self.per_channel)


class _TernaryScale(nn.Module):
    """TWN-style scale: alpha = mean of |w| over |w| > 0.7·mean|w| (per row)."""

    def __init__(self, per_channel: bool, delta: float = 0.7):
        super().__init__()
        self.per_channel, self.delta = per_channel, delta

    def forward(self, w):
        rows = _row_view(w, self.per_channel).abs()
        thr = self.delta * rows.mean(dim=1, keepdim=True)
        mask = (rows > thr).to(rows.dtype)
        alpha = (rows * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return _shape_scale(alpha.clamp_min(_EPS), w, self.per_channel)


class BinaryWeightQuant(WeightQuantizer):
    """Binary ``{−α, +α}`` per row (Brevitas ``BinaryQuant``).

    Forward map: ``Q(w) = α · sign(w)`` (sign(0) = +1), ``α = mean|w|`` per row (XNOR-Net,
    Rastegari et al. 2016). Gradient: straight-through sign (Brevitas ``binary_sign_ste``),
    and α's own gradient as a function of w. Stored as 1 bit per weight + one scale per row.
    """

    scheme = "binary"
    bits = 1

    def __init__(self, per_channel: bool = True):
        super().__init__()
        self.per_channel = per_channel
        self.impl = BinaryQuant(_RowMeanAbs(per_channel))

    def forward(self, w):
        return self.impl(w)[0]

    def _int_and_scale(self, w):
        y, s, _, _ = self.impl(w)
        return torch.round(y / s), s


class TernaryWeightQuant(WeightQuantizer):
    """Ternary ``{−α, 0, +α}`` per row (Brevitas ``TernaryQuant``).

    Forward map: ``Q(w) = α · sign(w) · 1[|w| > α/2]`` with ``α`` = mean of ``|w|`` over the
    entries above ``0.7·mean|w|`` (Ternary Weight Networks, Li & Liu 2016; thresholding at
    ``α/2`` rounds each weight to the nearest level). Gradient: straight-through
    (Brevitas ``ternary_sign_ste``). Stored as 2 bits per weight + one scale per row.
    """

    scheme = "ternary"
    bits = 2

    def __init__(self, per_channel: bool = True):
        super().__init__()
        self.per_channel = per_channel
        self.impl = TernaryQuant(_TernaryScale(per_channel), threshold=0.5)

    def forward(self, w):
        return self.impl(w)[0]

    def _int_and_scale(self, w):
        y, s, _, _ = self.impl(w)
        return torch.round(y / s), s


def make_weight_quantizer(bits, *, per_channel: bool = True, learn_scale: bool = False) -> WeightQuantizer | None:
    """``bits``: 2…8, "binary", "ternary", or None / >= 16 (no quantization: returns None)."""
    if bits is None:
        return None
    if bits == "binary" or bits == 1:
        return BinaryWeightQuant(per_channel)
    if bits == "ternary":
        return TernaryWeightQuant(per_channel)
    if isinstance(bits, int) and bits >= 16:
        return None
    if isinstance(bits, int) and 2 <= bits <= 8:
        return IntWeightQuant(bits, per_channel, learn_scale)
    raise ValueError(f"weight bits must be 1..8, 'binary', 'ternary', or >= 16 (float), got {bits!r}")
