"""Evaluation: language-model perplexity (hidden state carried across batches)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def batchify(data, batch_size: int) -> torch.Tensor:
    """Cut a token stream into ``batch_size`` parallel streams: returns ``[N, batch_size]``."""
    data = torch.as_tensor(np.asarray(data), dtype=torch.long)
    n = data.numel() // batch_size
    if n < 2:
        raise ValueError(f"a stream of {data.numel()} tokens is too short for batch size {batch_size}")
    return data[: n * batch_size].view(batch_size, n).t().contiguous()


def detach_hidden(hidden):
    """The recurrent state cut from the graph: a tensor (GRU) or a tuple of tensors (LSTM)."""
    if hidden is None:
        return None
    if isinstance(hidden, torch.Tensor):
        return hidden.detach()
    return tuple(h.detach() for h in hidden)


@torch.no_grad()
def lm_perplexity(model: nn.Module, data, *, batch_size: int = 10, bptt: int = 35,
                  progress: bool = False) -> dict:
    """Perplexity of ``model`` on a token stream, carrying the hidden state across batches.

    Returns ``{"ppl", "loss", "tokens", "batch_size", "bptt"}``.
    """
    was_training = model.training
    model.eval()
    streams = batchify(data, batch_size)
    hidden = None
    total, count = 0.0, 0
    starts = range(0, streams.size(0) - 1, bptt)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="eval", leave=False)
    for i in starts:
        seq = min(bptt, streams.size(0) - 1 - i)
        x, y = streams[i:i + seq], streams[i + 1:i + 1 + seq]
        logits, hidden = model(x, hidden)
        total += nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                             reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    loss = total / count
    return {"ppl": math.exp(loss), "loss": loss, "tokens": count, "batch_size": batch_size, "bptt": bptt}
