"""Bit-packed CPU engine (numpy + numba, no torch): ``from g2quant.targets.cpu import Engine``."""


def __getattr__(name):
    if name in ("Engine", "State", "PerplexityReport"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'g2quant.targets.cpu' has no attribute {name!r}")
