"""The paper's compression analysis (Li et al., ICML 2018, Sec. 5 "Sensitivity analysis"):
perturb the gate parameters of a trained LSTM and measure how much the model degrades.

* round:          ``W ← round(W / r) · r``            (LM setting: r = 0.2)
* round & clip:   ``W ← clip(round(W / r) · r, −c, c)`` (LM setting: c = 0.4)
* SVD low-rank:   ``W ← U_k S_k V_kᵀ`` (top-k singular values)

Applied to the rows of ``W_ih`` and ``W_hh`` that compute the chosen gates (default: input and
forget gates, the ones G2-LSTM pushes towards 0/1). Models are copied, never modified.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .nn.g2lstm import G2LSTM

GATE_ROWS = {"i": 0, "f": 1, "g": 2, "o": 3}   # block index in torch's (i, f, g, o) layout
METHODS = ("round", "round_clip", "svd")


def _round(w, r):
    return torch.round(w / r) * r


def _svd(w, rank):
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    k = min(rank, s.numel())
    return (u[:, :k] * s[:k]) @ vh[:k]


def compress_tensor(w: torch.Tensor, method: str, *, r: float = 0.2, c: float = 0.4, rank: int = 64) -> torch.Tensor:
    if method == "round":
        return _round(w, r)
    if method == "round_clip":
        return _round(w, r).clamp(-c, c)
    if method == "svd":
        return _svd(w, rank)
    raise ValueError(f"unknown compression {method!r}; choose from {METHODS}")


@torch.no_grad()
def compress_gates(model: nn.Module, method: str, *, gates: str = "if", r: float = 0.2, c: float = 0.4,
                   rank: int | None = None) -> nn.Module:
    """A copy of ``model`` whose LSTM gate weights (rows of ``gates``) are compressed.

    ``rank`` defaults to ``hidden_size // 4`` for SVD; SVD is applied to each gate's
    ``[H, in]`` block of ``W_ih`` and ``W_hh`` separately.
    """
    if method not in METHODS:
        raise ValueError(f"unknown compression {method!r}; choose from {METHODS}")
    if set(gates) - set(GATE_ROWS):
        raise ValueError(f"gates may contain only i, f, g, o; got {gates!r}")
    if r <= 0 or c <= 0:
        raise ValueError(f"r and c must be > 0, got r={r}, c={c}")
    out = copy.deepcopy(model)
    lstms = [m for m in out.modules() if isinstance(m, (nn.LSTM, G2LSTM))]
    if not lstms:
        raise ValueError("compress_gates: the model has no nn.LSTM or G2LSTM")
    for lstm in lstms:
        H = lstm.hidden_size
        k = rank if rank is not None else max(1, H // 4)
        for name, p in lstm.named_parameters():
            if not name.startswith("weight_"):
                continue
            for g in gates:
                blk = slice(GATE_ROWS[g] * H, (GATE_ROWS[g] + 1) * H)
                p[blk] = compress_tensor(p[blk], method, r=r, c=c, rank=k)
    return out
