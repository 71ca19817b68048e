"""Torch-free containers for quantized weights: the hand-off between the torch side
(``g2quant.api.QuantizedModel.export``) and the deployment targets.

The numeric meaning of every field is fixed in ``docs/cpu-engine.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

GATE_NAMES = ("i", "f", "o")
SCHEMES = ("int", "binary", "ternary", "float")


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

    def to_graph(self):
        """The lowered graph of this LM: embedding -> lstm -> linear (time-major, per-step logits)."""
        from .graph import Graph, Node

        params = {"embedding.weight": self.embedding, "decoder.bias": np.asarray(self.decoder_bias, np.float32)}
        params["decoder.weight"] = self.embedding if self.tied else self.decoder
        lstm_params = {}
        for k, layer in enumerate(self.layers):
            for role, value in ((f"l{k}.w_ih", layer.w_ih), (f"l{k}.w_hh", layer.w_hh),
                                (f"l{k}.bias", np.asarray(layer.bias, np.float32))):
                params[f"rnn.{role}"] = value
                lstm_params[role] = f"rnn.{role}"
        if self.tied:
            del params["decoder.weight"]
        act = self.act_bits
        nodes = [
            Node("embedding", "embedding", ["input"], {}, {"weight": "embedding.weight"}),
            Node("lstm", "rnn", ["embedding"], {"hidden_size": self.hidden_size, "num_layers": self.num_layers,
                                                "bidirectional": False, "act_bits": act,
                                                "hard_gates": "".join(g for g in "ifo" if g in self.hard_gates)},
                 lstm_params),
            Node("linear", "decoder", ["rnn"], {"act_bits": act},
                 {"weight": "embedding.weight" if self.tied else "decoder.weight", "bias": "decoder.bias"}),
        ]
        return Graph(input={"kind": "tokens", "size": self.vocab_size, "layout": "tb"}, nodes=nodes,
                     output={"value": "decoder", "layout": "tb"}, params=params, meta={"extra": dict(self.extra)})
