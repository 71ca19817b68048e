"""Word-level LSTM / GRU language model: embedding → G2LSTM (or G2GRU) stack → dropout → decoder.

Presets follow Zaremba et al., "Recurrent Neural Network Regularization" (2014):
``small`` = 2 × 200, no dropout; ``medium`` = 2 × 650, dropout 0.5.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from ..nn.g2gru import G2GRU
from ..nn.g2lstm import DEFAULT_TAU, GATE_MODES, G2LSTM


@dataclass(frozen=True)
class LMConfig:
    vocab_size: int = 10_000
    emb_size: int = 200
    hidden_size: int = 200
    num_layers: int = 2
    dropout: float = 0.0
    tied: bool = False
    gates: str = "sigmoid"          # "sigmoid" | "gumbel" | "sharpened"
    tau: float | None = None        # default: 0.9 gumbel, 0.2 sharpened
    noise_p: float = 1.0
    gumbel_gates: str | None = None  # default: "if" for the LSTM, "rz" for the GRU
    init_range: float = 0.1
    cell: str = "lstm"              # "lstm" (G2LSTM) or "gru" (G2GRU)

    def __post_init__(self):
        for name in ("vocab_size", "emb_size", "hidden_size", "num_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"LMConfig.{name} must be a positive integer, got {v!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LMConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.gates not in GATE_MODES:
            raise ValueError(f"LMConfig.gates must be one of {GATE_MODES}, got {self.gates!r}")
        if self.tied and self.emb_size != self.hidden_size:
            raise ValueError(f"tied weights need emb_size == hidden_size, got {self.emb_size} and {self.hidden_size}")
        if self.init_range <= 0:
            raise ValueError(f"LMConfig.init_range must be > 0, got {self.init_range}")
        if self.cell not in ("lstm", "gru"):
            raise ValueError(f"LMConfig.cell must be 'lstm' or 'gru', got {self.cell!r}")
        if self.gumbel_gates is None:
            object.__setattr__(self, "gumbel_gates", "if" if self.cell == "lstm" else "rz")

    @property
    def effective_tau(self) -> float:
        return DEFAULT_TAU[self.gates] if self.tau is None else self.tau

    @classmethod
    def preset(cls, name: str, **overrides) -> "LMConfig":
        presets = {
            "tiny": dict(emb_size=32, hidden_size=32, num_layers=2),
            "small": dict(emb_size=200, hidden_size=200, num_layers=2, dropout=0.0, init_range=0.1),
            "medium": dict(emb_size=650, hidden_size=650, num_layers=2, dropout=0.5, init_range=0.05),
        }
        if name not in presets:
            raise ValueError(f"unknown LM preset {name!r}; choose from {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LMConfig fields {sorted(unknown)}")
        return cls(**d)


class WordLM(nn.Module):
    """``forward(tokens [T, B], hidden=None) -> (logits [T, B, V], hidden)``."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.emb_size)
        self.drop = nn.Dropout(c.dropout)
        rnn = G2LSTM if c.cell == "lstm" else G2GRU
        self.rnn = rnn(c.emb_size, c.hidden_size, c.num_layers, dropout=c.dropout, gates=c.gates,
                       tau=c.tau, noise_p=c.noise_p, gumbel_gates=c.gumbel_gates)
        self.decoder = nn.Linear(c.hidden_size, c.vocab_size)
        if c.tied:
            self.decoder.weight = self.embedding.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r = self.config.init_range
        for p in self.parameters():
            nn.init.uniform_(p, -r, r)

    def init_hidden(self, batch: int):
        c = self.config
        z = torch.zeros(c.num_layers, batch, c.hidden_size, device=self.decoder.weight.device)
        return (z, z.clone()) if c.cell == "lstm" else z

    def forward(self, tokens: torch.Tensor, hidden=None):
        if tokens.dim() != 2:
            raise ValueError(f"WordLM expects token ids of shape [T, B], got {tuple(tokens.shape)}")
        x = self.drop(self.embedding(tokens))
        out, hidden = self.rnn(x, hidden)
        return self.decoder(self.drop(out)), hidden

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _build(config: dict) -> WordLM:
    return WordLM(LMConfig.from_dict(config))


from ..checkpoint import register_model  # noqa: E402

register_model("word_lm", _build)
