"""What every ``g2quant`` subcommand shares: the one error type, messages, progress bars, data.
Torch-free."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


class CLIError(Exception):
    """A user-facing error: printed as ``g2quant: error: ...`` with exit status 2."""


def say(args, message: str) -> None:
    """A status line on stderr (silenced by ``-q``)."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def show_progress(args) -> bool:
    """tqdm bars only when stderr is a terminal and not ``-q``."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def load_corpus(args, name: str | None = None):
    """The ``--data`` corpus (``ptb``: from ``--data-dir``, ``$G2QUANT_DATA/ptb`` or the download cache)."""
    from .data.download import DataError

    name = name or args.data
    if name == "synthetic":
        from .data.synthetic import synthetic_corpus
        return synthetic_corpus()
    from .data.ptb import load_ptb
    say(args, "loading PTB" + (f" from {args.data_dir}" if getattr(args, "data_dir", None) else ""))
    try:
        return load_ptb(getattr(args, "data_dir", None), download=not getattr(args, "no_download", False))
    except DataError as exc:
        raise CLIError(str(exc)) from None


def text_ids(path, vocab: list[str]) -> np.ndarray:
    """Token ids of a text file: whitespace-separated words, ``<eos>`` after each line (the PTB
    convention); words outside ``vocab`` become ``<unk>`` (an error when there is none)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"--text {path}: cannot read it as UTF-8 text ({exc})") from None
    w2i = {w: i for i, w in enumerate(vocab)}
    unk, eos = w2i.get("<unk>"), w2i.get("<eos>")
    ids, missing = [], set()
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        for w in words:
            i = w2i.get(w, unk)
            if i is None:
                missing.add(w)
            else:
                ids.append(i)
        if eos is not None:
            ids.append(eos)
    if missing:
        raise CLIError(f"--text {path}: {len(missing)} word types are not in the vocabulary and it has no <unk> "
                       f"(e.g. {sorted(missing)[:5]})")
    if len(ids) < 2:
        raise CLIError(f"--text {path}: has fewer than two tokens")
    return np.asarray(ids, np.int64)


def corpus_ids(args, corpus, vocab: list[str] | None) -> tuple[np.ndarray, str]:
    """``--split`` of ``corpus`` as ids of ``vocab`` (mapping through words when they differ)."""
    ids = getattr(corpus, args.split)
    what = f"{args.data} {args.split}"
    if vocab is None or list(corpus.vocab) == list(vocab):
        return ids, what
    w2i = {w: i for i, w in enumerate(vocab)}
    unk = w2i.get("<unk>")
    table = np.array([w2i.get(w, -1 if unk is None else unk) for w in corpus.vocab], np.int64)
    mapped = table[ids]
    if (mapped < 0).any():
        missing = [corpus.vocab[i] for i in np.flatnonzero(table < 0)]
        raise CLIError(f"{int((mapped < 0).sum())} {args.split} tokens are not in the model's vocabulary "
                       f"(e.g. {missing[:5]}) and it has no <unk>")
    n_unk = sum(1 for w in corpus.vocab if w not in w2i)
    if n_unk:
        print(f"note: {n_unk} {args.data} word types are not in the model's vocabulary; they are scored as <unk>",
              file=sys.stderr)
    return mapped, what
