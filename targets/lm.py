"""Language-model conveniences on top of any runtime's ``run``/``step``: ``score``,
``perplexity``, ``generate``, ``encode``/``decode``. A runtime mixes in :class:`LMMixin` (it needs
``_execute``, ``_check_tokens``, ``check_state``, ``initial_state`` from ``runtime.Runtime`` and a
``vocab`` attribute, None when the artifact has none)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .runtime import State


@dataclass(frozen=True)
class PerplexityReport:
    """Perplexity over a token stream, state carried across the whole stream."""

    perplexity: float
    nll: float              # mean negative log-likelihood per predicted token (nats)
    tokens: int             # number of predicted tokens
    batch_size: int
    bptt: int
    seconds: float

    def __str__(self) -> str:
        return (f"perplexity {self.perplexity:.3f} over {self.tokens} tokens "
                f"(batch size {self.batch_size}, bptt {self.bptt}, state carried; {self.seconds:.2f} s)")


def _log_softmax_pick(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``log_softmax(logits)[n, targets[n]]`` for each row of ``[N, V]``, float64."""
    m = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=1, dtype=np.float64)) + m[:, 0]
    return logits[np.arange(len(targets)), targets].astype(np.float64) - lse


class LMMixin:
    @property
    def is_lm(self) -> bool:
        """Token ids in, per-step scores over the same vocabulary out (a word-level LM)."""
        return (self.input_kind == "tokens" and self.output_info.kind == "seq"
                and self.output_info.features == self.input_size and self.graph.output["layout"] in ("tb", "bt"))

    def _require_lm(self, what: str) -> None:
        if not self.is_lm:
            raise ValueError(f"{what} needs a language model (token ids in, per-step logits over the same "
                             f"vocabulary out); this model maps {self.input_kind} to {self.output_info.kind} "
                             f"features of size {self.output_info.features}")
        if not self.streamable:
            raise ValueError(f"{what} needs a unidirectional model")

    @property
    def vocab_size(self) -> int:
        return self.input_size if self.input_kind == "tokens" else 0

    def _tokens(self, tokens) -> np.ndarray:
        return self._check_tokens(np.asarray(tokens).reshape(-1) if np.ndim(tokens) else np.asarray([tokens]))

    def _lm_window(self, toks_tb: np.ndarray, st: State) -> tuple[np.ndarray, State]:
        """Logits ``[T, B, V]`` of a time-major window, state advanced."""
        return self._execute(np.ascontiguousarray(toks_tb), st)

    def score(self, tokens, state=None) -> np.ndarray:
        """Log-probabilities of each next token: ``[T-1]`` for ``[T]`` input, ``[B, T-1]`` for ``[B, T]``.

        Entry ``t`` is ``log p(tokens[t+1] | tokens[:t+1])`` starting from ``state`` (zero state
        by default; the given state is not modified)."""
        self._require_lm("score()")
        arr = np.asarray(tokens)
        if arr.ndim not in (1, 2):
            raise ValueError(f"score expects token ids of shape [T] or [B, T], got {arr.shape}")
        toks = self._check_tokens(np.atleast_2d(arr))
        B, T = toks.shape
        if T < 2:
            return np.empty((B, 0)) if arr.ndim == 2 else np.empty(0)
        st = self.check_state(state, B).copy()
        logits, _ = self._lm_window(toks[:, :-1].T, st)
        out = _log_softmax_pick(logits.reshape(-1, logits.shape[-1]), toks[:, 1:].T.reshape(-1))
        out = out.reshape(T - 1, B).T
        return out[0] if arr.ndim == 1 else out

    def perplexity(self, tokens, *, batch_size: int = 20, bptt: int = 35, progress=None) -> PerplexityReport:
        """Perplexity of a token stream, evaluated like the PTB convention.

        The stream is cut into ``batch_size`` contiguous rows (the tail that does not fill a
        row is dropped); each row is predicted token by token with the state carried across
        the whole row, processed in windows of ``bptt`` steps (with the state carried, the window
        only bounds the work per call; it does not change the result). ``progress(done, total)``
        is called after each window."""
        self._require_lm("perplexity()")
        ids = self._tokens(tokens)
        for name, v in (("batch_size", batch_size), ("bptt", bptt)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        n = ids.size // batch_size
        if n < 2:
            raise ValueError(f"{ids.size} tokens are too few for batch size {batch_size}")
        data = ids[: n * batch_size].reshape(batch_size, n).T            # [n, B] time-major
        st = self.initial_state(batch_size)
        total = 0.0
        t0 = time.perf_counter()
        for start in range(0, n - 1, bptt):
            end = min(start + bptt, n - 1)
            logits, st = self._lm_window(data[start:end], st)
            total += float(_log_softmax_pick(logits.reshape(-1, logits.shape[-1]),
                                             data[start + 1:end + 1].reshape(-1)).sum())
            if progress is not None:
                progress(end, n - 1)
        count = batch_size * (n - 1)
        nll = -total / count
        return PerplexityReport(perplexity=math.exp(nll), nll=nll, tokens=count, batch_size=batch_size,
                                bptt=bptt, seconds=time.perf_counter() - t0)

    def generate(self, prompt_ids, n: int, *, temperature: float = 0.0, seed: int | None = None,
                 top_k: int | None = None) -> np.ndarray:
        """Continue ``prompt_ids`` by ``n`` tokens; return the ``n`` new ids (int64).

        ``temperature=0`` is greedy (deterministic); otherwise sample from
        ``softmax(logits / temperature)`` (optionally restricted to the ``top_k`` most likely)
        with ``np.random.default_rng(seed)``. An empty prompt starts from ``<eos>``."""
        self._require_lm("generate()")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        prompt = self._tokens(prompt_ids)
        if prompt.size == 0:
            if "<eos>" not in self._word2id:
                raise ValueError("empty prompt and the vocabulary has no <eos> to start from")
            prompt = np.array([self._word2id["<eos>"]], np.int64)
        rng = np.random.default_rng(seed)
        st = self.initial_state(1)
        logits, st = self._lm_window(prompt[:, None], st)
        z = logits[-1, 0]
        out = np.empty(int(n), np.int64)
        for i in range(int(n)):
            z = z.astype(np.float64)
            if temperature == 0:
                nxt = int(np.argmax(z))
            else:
                z = z / temperature
                if top_k is not None and top_k < z.size:
                    kth = np.partition(z, -top_k)[-top_k]
                    z = np.where(z >= kth, z, -np.inf)
                p = np.exp(z - z.max())
                cdf = np.cumsum(p)
                nxt = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), z.size - 1)
            out[i] = nxt
            if i + 1 < n:
                logits, st = self._lm_window(np.array([[nxt]], np.int64), st)
                z = logits[0, 0]
        return out

    # ---- text ------------------------------------------------------------------------------------
    def _require_vocab(self):
        if self.vocab is None:
            raise ValueError("this artifact has no vocabulary (it was exported without vocab=); use token ids")

    def encode(self, text: str, *, unknown: str = "unk") -> np.ndarray:
        """Whitespace-split ``text`` into ids; unknown words map to ``<unk>`` (``unknown="unk"``)
        or raise ``ValueError`` (``unknown="error"``, or when there is no ``<unk>``)."""
        self._require_vocab()
        if unknown not in ("unk", "error"):
            raise ValueError(f"unknown must be 'unk' or 'error', got {unknown!r}")
        unk = self._word2id.get("<unk>") if unknown == "unk" else None
        ids = []
        for word in text.split():
            i = self._word2id.get(word, unk)
            if i is None:
                hint = "" if unknown == "error" else " and there is no <unk>"
                raise ValueError(f"word {word!r} is not in the vocabulary{hint}")
            ids.append(i)
        return np.asarray(ids, dtype=np.int64)

    @property
    def word2id(self) -> dict[str, int]:
        """Word -> id mapping of the artifact vocabulary (do not modify)."""
        return self._word2id

    @property
    def _word2id(self) -> dict[str, int]:
        cache = self.__dict__.get("_w2i")
        if cache is None:
            cache = self.__dict__["_w2i"] = {w: i for i, w in enumerate(self.vocab or [])}
        return cache

    def unknown_words(self, text: str) -> list[str]:
        """Words of ``text`` that are not in the vocabulary."""
        self._require_vocab()
        return [w for w in text.split() if w not in self._word2id]

    def decode(self, ids) -> str:
        self._require_vocab()
        ids = self._tokens(ids)
        return " ".join(self.vocab[int(i)] for i in ids)
