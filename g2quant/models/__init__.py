"""Reference models: word-level LSTM language model (``WordLM``)."""
from .lm import LMConfig, WordLM

__all__ = ["LMConfig", "WordLM"]
from .seq2seq import Seq2Seq, Seq2SeqConfig, beam_search, greedy_decode  # noqa: E402

__all__ += ["Seq2Seq", "Seq2SeqConfig", "beam_search", "greedy_decode"]
