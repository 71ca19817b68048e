"""Reference models: word-level LSTM language model (``WordLM``)."""
from .lm import LMConfig, WordLM

__all__ = ["LMConfig", "WordLM"]
