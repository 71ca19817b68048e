"""Translation quality: corpus BLEU with sacrebleu, teacher-forced validation loss, and batched
translation of sentences (id sequences, a data split, or plain tokenized text).

BLEU convention (DESIGN.md §3, the IWSLT14 one): tokenized, lowercased text after BPE removal,
``sacrebleu`` with ``tokenize="none"``; every score comes with sacrebleu's signature string.
Importing this module needs neither torch nor sacrebleu; the functions import what they use.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from .data.translation import ParallelSplit, Vocab, bucket_batches, pad_batch, remove_bpe, target_batch


class BleuScore(NamedTuple):
    score: float        # corpus BLEU, 0..100
    signature: str      # sacrebleu's, e.g. "nrefs:1|case:lc|eff:no|tok:none|smooth:exp|version:2.6.0"
    details: str        # sacrebleu's one-line summary (n-gram precisions, brevity penalty, lengths)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> BleuScore:
    """Corpus BLEU of tokenized hypotheses against one tokenized reference each (lowercased,
    ``tokenize="none"``). Both must already have BPE removed (:func:`remove_bpe`)."""
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"BLEU needs one hypothesis per reference: got {len(hypotheses)} hypotheses and "
                         f"{len(references)} references")
    if not references:
        raise ValueError("BLEU of an empty corpus is undefined")
    bleu = BLEU(tokenize="none", lowercase=True, force=True)   # force: the text is tokenized on purpose
    res = bleu.corpus_score(list(hypotheses), [list(references)])
    return BleuScore(float(res.score), str(bleu.get_signature()), str(res))


def translate_ids(model, sources: Sequence[np.ndarray], *, beam: int = 5, batch_size: int = 64,
                  max_len: int | None = None, progress: bool = False) -> list[list[int]]:
    """Translate id sequences (each ending with ``</s>``) in batches of equal source length;
    returns target ids without ``</s>``, in input order. ``beam=1`` is greedy decoding. ``model``
    may also be a torch-free seq2seq artifact runtime (``g2quant.load("mt.g2q")``)."""
    if hasattr(model, "translate_ids"):
        if len(sources) and min(len(s) for s in sources) < 1:
            raise ValueError("cannot translate an empty source sequence")
        return model.translate_ids([list(map(int, s)) for s in sources], beam=beam, batch_size=batch_size)
    import torch

    from .models.seq2seq import beam_search, greedy_decode

    lengths = np.fromiter((len(s) for s in sources), np.int64, len(sources))
    if len(sources) and lengths.min() < 1:
        raise ValueError("cannot translate an empty source sequence")
    batches = bucket_batches(lengths, None, batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc=f"translate (beam {beam})", leave=False)
    out: list[list[int] | None] = [None] * len(sources)
    for idx in batches:
        src = torch.as_tensor(pad_batch([sources[i] for i in idx]))
        if beam == 1:
            hyps = greedy_decode(model, src, max_len=max_len)
        else:
            hyps = beam_search(model, src, beam=beam, max_len=max_len)
        for i, h in zip(idx.tolist(), hyps):
            out[i] = h
    return out


def translate_split(model, split: ParallelSplit, tgt_vocab: Vocab, *, beam: int = 5, batch_size: int = 64,
                    progress: bool = False) -> list[str]:
    """Tokenized translations (BPE removed) of every sentence of ``split``."""
    ids = translate_ids(model, split.src, beam=beam, batch_size=batch_size, progress=progress)
    return [remove_bpe(tgt_vocab.decode(h)) for h in ids]


def evaluate_bleu(model, split: ParallelSplit, tgt_vocab: Vocab, *, beam: int = 5, batch_size: int = 64,
                  limit: int | None = None, progress: bool = False) -> dict:
    """``{"bleu", "signature", "details", "beam", "sentences", "hypotheses"}`` on ``split``
    (its first ``limit`` sentences when given)."""
    if limit is not None:
        split = split.subset(limit)
    hyps = translate_split(model, split, tgt_vocab, beam=beam, batch_size=batch_size, progress=progress)
    b = corpus_bleu(hyps, split.refs)
    return {"bleu": b.score, "signature": b.signature, "details": b.details, "beam": beam,
            "sentences": len(split), "hypotheses": hyps}


def valid_loss(model, split: ParallelSplit, *, batch_size: int = 64) -> dict:
    """Teacher-forced per-token cross-entropy (nats) and perplexity on ``split``."""
    import torch
    from torch import nn

    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for idx in bucket_batches(split.src_lengths, split.tgt_lengths, batch_size):
                src = torch.as_tensor(pad_batch([split.src[i] for i in idx]))
                tin, tout = (torch.as_tensor(a) for a in target_batch([split.tgt[i] for i in idx]))
                logits = model(src, tin)
                total += nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tout.reshape(-1),
                                                     ignore_index=0, reduction="sum").item()
                count += int((tout != 0).sum())
    finally:
        model.train(was)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


def translate_lines(model, lines: Sequence[str], src_vocab: Vocab, tgt_vocab: Vocab, bpe, *, beam: int = 5,
                    batch_size: int = 64, max_len: int | None = None) -> list[str]:
    """Tokenized text in, tokenized translations out: BPE is applied to the input with ``bpe``
    (a :class:`g2quant.data.translation.BPE`) and removed from the output. Empty lines stay empty."""
    keep = [i for i, line in enumerate(lines) if line.strip()]
    ids = [src_vocab.encode(bpe(lines[i])) for i in keep]
    hyps = translate_ids(model, ids, beam=beam, batch_size=batch_size, max_len=max_len)
    out = [""] * len(lines)
    for i, h in zip(keep, hyps):
        out[i] = remove_bpe(tgt_vocab.decode(h))
    return out
