"""Torch-free containers for quantized weights: the hand-off between the torch side
(``g2quant.api.QuantizedModel.export``) and the deployment targets.

The numeric meaning of every field is fixed in ``docs/cpu-engine.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

GATE_NAMES = ("i", "f", "o")
SCHEMES = ("int", "binary", "ternary", "float")


def storage_width(bits: int, scheme: str = "int") -> int:
    """Bits per weight as artifacts store them: 1, 2, 4, 8 (packed) or 32 (float).
    3-bit weights are stored in 4-bit nibbles, 5–7-bit weights in bytes."""
    if scheme == "float":
        return 32
    if scheme in ("binary", "ternary") or bits <= 2:
        return bits
    return 4 if bits <= 4 else 8


@dataclass
class QMatrix:
    """One weight matrix ``[R, K]`` with a per-row scale.

    ``scheme="int"``: ``q`` int8 in ``[-(2^(bits-1)-1), 2^(bits-1)-1]``, bits 2..8.
    ``scheme="binary"``: ``q`` int8 in {-1, +1}, bits 1.
    ``scheme="ternary"``: ``q`` int8 in {-1, 0, +1}, bits 2.
    ``scheme="float"``: ``q`` is the float32 weight itself, ``scale`` all ones, bits 32.
    The dequantized weight is ``scale[:, None] * q``.
    """

    q: np.ndarray
    scale: np.ndarray
    bits: int
    scheme: str = "int"

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"QMatrix.scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.q.ndim != 2:
            raise ValueError(f"QMatrix.q must be 2-D, got shape {self.q.shape}")
        if self.scale.shape != (self.q.shape[0],):
            raise ValueError(f"QMatrix.scale must have shape ({self.q.shape[0]},), got {self.scale.shape}")
        if self.scheme == "float":
            if self.bits != 32 or self.q.dtype != np.float32:
                raise ValueError("a float QMatrix has bits=32 and float32 values")
            return
        if self.q.dtype != np.int8:
            raise ValueError(f"QMatrix.q must be int8 for scheme {self.scheme!r}, got {self.q.dtype}")
        expected = {"binary": (1, 1), "ternary": (2, 2), "int": (2, 8)}[self.scheme]
        if not expected[0] <= self.bits <= expected[1]:
            raise ValueError(f"bits={self.bits} is invalid for scheme {self.scheme!r}")
        qmax = 1 if self.scheme != "int" else 2 ** (self.bits - 1) - 1
        if self.q.size and int(np.abs(self.q.astype(np.int16)).max()) > qmax:
            raise ValueError(f"QMatrix values exceed ±{qmax} for {self.bits}-bit {self.scheme}")
        if self.scheme == "binary" and np.any(self.q == 0):
            raise ValueError("binary QMatrix values must be ±1 (no zeros)")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> np.ndarray:
        return (self.scale[:, None].astype(np.float32) * self.q.astype(np.float32)).astype(np.float32)


@dataclass
class QLSTMLayer:
    w_ih: QMatrix          # [4H, in]
    w_hh: QMatrix          # [4H, H]
    bias: np.ndarray       # float32 [4H] = b_ih + b_hh


@dataclass
class QuantLMWeights:
    """A word-level LSTM language model: embedding -> LSTM layers -> decoder."""

    embedding: QMatrix                 # [V, E]
    layers: list[QLSTMLayer]
    decoder: QMatrix | None            # [V, H]; None when tied to the embedding
    decoder_bias: np.ndarray           # float32 [V]
    hard_gates: tuple[str, ...] = ()   # subset of ("i", "f", "o")
    act_bits: int | None = 8           # 8: dynamic per-vector int8 activations; None: float
    extra: dict = field(default_factory=dict)  # free-form metadata recorded in the manifest

    def __post_init__(self):
        bad = set(self.hard_gates) - set(GATE_NAMES)
        if bad:
            raise ValueError(f"hard_gates may only contain {GATE_NAMES}, got {sorted(bad)}")
        if self.act_bits not in (None, 8):
            raise ValueError(f"act_bits must be 8 or None, got {self.act_bits}")
        if not self.layers:
            raise ValueError("a language model needs at least one LSTM layer")

    @property
    def vocab_size(self) -> int:
        return self.embedding.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.layers[0].w_hh.shape[1]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def tied(self) -> bool:
        return self.decoder is None
