"""g2quant: hardware-aware quantization and deployment of gated recurrent networks.

``import g2quant`` is cheap and does not import torch: torch-backed names (``G2LSTM``,
``WordLM``, ``quantize``, …) are resolved lazily on first use, so that the CPU engine
(``g2quant.targets.cpu``) runs on machines without torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it (imported on first attribute access)
_LAZY = {
    "G2LSTM": "g2quant.nn.g2lstm",
    "gumbel_sigmoid": "g2quant.nn.gumbel",
    "WordLM": "g2quant.models.lm",
    "LMConfig": "g2quant.models.lm",
    "quantize": "g2quant.api",
    "QuantConfig": "g2quant.api",
    "QuantizedModel": "g2quant.api",
    "load": "g2quant.targets.base",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'g2quant' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
