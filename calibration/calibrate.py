"""Run calibration batches through a QuantizedModel so that its activation quantizers'
observers see representative data, then freeze their ranges."""
from __future__ import annotations

from typing import Iterable

import torch


def _as_args(batch):
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    if isinstance(batch, dict):
        raise ValueError("calibration batches must be tensors or tuples of positional arguments, not dicts")
    return (batch,)


@torch.no_grad()
def calibrate(qmodel, batches: Iterable, *, progress: bool = False) -> dict:
    """Feed ``batches`` (each a tensor, or a tuple of forward arguments) through ``qmodel`` in
    eval mode with observers enabled; afterwards static activation quantizers use the observed
    ranges. Returns ``{quantizer name: threshold}``. Raises ValueError for empty data.
    """
    from g2quant.nn.qmodules import ActQuant

    acts = {n: m for n, m in qmodel.named_modules() if isinstance(m, ActQuant)}
    if batches is None:
        raise ValueError("calibration data is None; pass an iterable of input batches")
    was_training = qmodel.training
    qmodel.eval()
    for a in acts.values():
        a.start_observing()
    n = 0
    it = batches
    if progress:
        from tqdm import tqdm
        it = tqdm(batches, desc="calibrate", leave=False)
    try:
        for batch in it:
            args = _as_args(batch)
            if any(isinstance(x, torch.Tensor) and x.numel() == 0 for x in args):
                raise ValueError(f"calibration batch {n} is empty")
            qmodel(*args)
            n += 1
    finally:
        for a in acts.values():
            a.stop_observing()
        qmodel.train(was_training)
    if n == 0:
        raise ValueError("calibration data is empty: pass at least one batch")
    return {name: a.threshold for name, a in acts.items()}
