"""The layer families beyond the built-in LSTM: each is one module that registers its quantize
handler (``g2quant.api.register_quantize_handler``) and its lowering
(``g2quant.lower.register_lowering``) when imported; its torch-free op, NumPy reference and target
programs register themselves in ``g2quant.targets`` (see docs/architecture.md). Adding a family
is adding its module to ``FAMILIES``."""
from __future__ import annotations

import importlib

FAMILIES = ("g2quant.nn.g2gru",)
_loaded = False


def load_families() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in FAMILIES:
            importlib.import_module(name)
