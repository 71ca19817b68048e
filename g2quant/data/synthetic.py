"""A small synthetic corpus the package generates itself (for the demo and tests when no data
set is available). Sentences come from a toy grammar with number agreement across a relative
clause, so an LSTM has something beyond bigrams to learn."""
from __future__ import annotations

import numpy as np

from .ptb import Corpus, build_corpus

_DET = ["the", "a", "every", "some"]
_ADJ = ["old", "new", "big", "small", "red", "quiet", "happy", "strange"]
_NOUN_SG = ["dog", "cat", "bank", "trader", "company", "market", "child", "teacher", "city", "river"]
_NOUN_PL = [n + "s" for n in _NOUN_SG]
_VERB_SG = ["sees", "likes", "buys", "sells", "finds", "knows"]
_VERB_PL = ["see", "like", "buy", "sell", "find", "know"]
_INTRANS_SG = ["sleeps", "runs", "falls", "grows"]
_INTRANS_PL = ["sleep", "run", "fall", "grow"]
_ADV = ["today", "quickly", "again", "slowly", "N"]


def _noun_phrase(rng, plural: bool) -> list[str]:
    words = [rng.choice(_DET[:1] + _DET[3:]) if plural else rng.choice(_DET)]
    if rng.random() < 0.5:
        words.append(rng.choice(_ADJ))
    words.append(rng.choice(_NOUN_PL if plural else _NOUN_SG))
    return words


def _sentence(rng) -> list[str]:
    plural = rng.random() < 0.5
    words = _noun_phrase(rng, plural)
    if rng.random() < 0.4:  # relative clause delays the agreeing verb
        words += ["that"] + _noun_phrase(rng, rng.random() < 0.5)[:-1] + [rng.choice(_NOUN_SG)] + [rng.choice(_VERB_SG)]
    if rng.random() < 0.6:
        words.append(rng.choice(_VERB_PL if plural else _VERB_SG))
        words += _noun_phrase(rng, rng.random() < 0.5)
    else:
        words.append(rng.choice(_INTRANS_PL if plural else _INTRANS_SG))
    if rng.random() < 0.3:
        words.append(rng.choice(_ADV))
    return words


def synthetic_corpus(n_train: int = 20_000, n_valid: int = 1_000, n_test: int = 1_000, seed: int = 0) -> Corpus:
    """Sentences (lists of words) -> a Corpus with ``<eos>`` after each, like PTB."""
    rng = np.random.default_rng(seed)

    def lines(n):
        return [_sentence(rng) + ["<eos>"] for _ in range(n)]

    train = lines(n_train)
    # make sure every word type occurs in train
    vocab_line = _DET + _ADJ + _NOUN_SG + _NOUN_PL + _VERB_SG + _VERB_PL + _INTRANS_SG + _INTRANS_PL + _ADV + ["that", "<eos>"]
    train.insert(0, vocab_line)
    return build_corpus(train, lines(n_valid), lines(n_test), source="synthetic")
