"""Torch-free CPU inference engine for word-level LSTM LM artifacts (``NAME.g2q``).

    eng = Engine.load("model.g2q")
    logits, state = eng.step([tok], eng.initial_state())
    lp = eng.score(ids)                      # log p(ids[t+1] | ids[:t+1])
    rep = eng.perplexity(test_ids, batch_size=20, bptt=35)
    out = eng.generate(eng.encode("the stock"), 20)

The hot path is ``g2quant.targets.cpu.kernels`` (Numba): ``prepare_lm(w)`` once, then
``lm_step(km, tokens, h, c)`` per time step, which updates ``h``/``c`` in place and may reuse
its logits buffer. When that module is absent (or ``backend="reference"``) a shim over the
NumPy reference (``reference.lm_step_ref``) with the same API is used instead;
``$G2QUANT_CPU_BACKEND=reference`` forces the shim for ``backend="auto"``.

State: ``LMState(h, c)``, float32 arrays ``[num_layers, batch, hidden]``. ``step`` never
modifies the state it is given and returns fresh logits and a fresh state; ``step_`` is the
in-place variant for hot loops (it overwrites the given state and returns the kernel's
logits buffer, valid only until the next call).
"""
from __future__ import annotations

import importlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..artifact import ArtifactError, artifact_size
from ..qweights import QuantLMWeights
from . import reference
from .export import check_lm_shapes, read_lm_artifact, storage_bits

__all__ = ["Engine", "LMState", "PerplexityReport", "load_kernels"]


class LMState(NamedTuple):
    """Recurrent state: ``h`` and ``c`` float32 ``[num_layers, batch, hidden]``."""

    h: np.ndarray
    c: np.ndarray

    def copy(self) -> "LMState":
        return LMState(self.h.copy(), self.c.copy())


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


class _ReferenceKernels:
    """The kernels API on top of the NumPy reference (slow, always available)."""

    @staticmethod
    def prepare_lm(w: QuantLMWeights):
        return w

    @staticmethod
    def lm_step(km, tokens, h, c):
        logits, h_new, c_new = reference.lm_step_ref(km, tokens, h, c)
        h[...] = h_new
        c[...] = c_new
        return logits

    @staticmethod
    def cpu_features() -> dict:
        return {"backend": "numpy-reference"}


def load_kernels(backend: str = "auto"):
    """Return the kernels module (``"kernels"``), the NumPy shim (``"reference"``), or the
    kernels if present else the shim (``"auto"``, overridable with ``$G2QUANT_CPU_BACKEND``)."""
    if backend == "auto":
        backend = os.environ.get("G2QUANT_CPU_BACKEND", "auto") or "auto"
    if backend == "reference":
        return _ReferenceKernels
    if backend not in ("auto", "kernels"):
        raise ValueError(f"backend must be 'auto', 'kernels' or 'reference', got {backend!r}")
    name = __package__ + ".kernels"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if backend == "auto" and exc.name == name:
            return _ReferenceKernels
        raise


def _log_softmax_pick(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``log_softmax(logits)[b, targets[b]]`` for each row, float64."""
    m = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=1, dtype=np.float64)) + m[:, 0]
    return logits[np.arange(len(targets)), targets].astype(np.float64) - lse


class Engine:
    """Runs a quantized word-level LSTM LM on the CPU; see the module docstring."""

    def __init__(self, weights: QuantLMWeights, vocab: list[str], manifest: dict | None = None, *,
                 path=None, backend: str = "auto", keep_weights: bool = True):
        check_lm_shapes(weights, len(vocab))
        self.weights = weights
        self.vocab = list(vocab)
        self.manifest = dict(manifest or {})
        self.path = None if path is None else Path(path)
        self.kernels = load_kernels(backend)
        self.backend = "reference" if self.kernels is _ReferenceKernels else "kernels"
        t0 = time.perf_counter()
        self._km = self.kernels.prepare_lm(weights)
        self.prepare_seconds = time.perf_counter() - t0
        if not keep_weights and self.kernels is not _ReferenceKernels:
            self.weights = None          # the kernels hold their own packed copy
        self._word2id = {w: i for i, w in enumerate(self.vocab)}
        self.num_layers, self.hidden_size, self.vocab_size = (
            weights.num_layers, weights.hidden_size, weights.vocab_size)

    @classmethod
    def load(cls, path, *, backend: str = "auto", keep_weights: bool = False) -> "Engine":
        """Verify and load ``path`` (``NAME.g2q``) and prepare the kernels.

        ``keep_weights=False`` drops the unpacked ``QuantLMWeights`` once the kernels have
        packed their own copy (``engine.weights`` is then ``None``), saving memory."""
        w, vocab, man = read_lm_artifact(path)
        if man.get("target") != "cpu":
            raise ArtifactError(f"manifest.json: target is {man.get('target')!r}; this engine runs 'cpu' artifacts")
        return cls(w, vocab, man, path=path, backend=backend, keep_weights=keep_weights)

    @property
    def size_bytes(self) -> int:
        """Artifact size on disk (or the packed matrix bytes plus scales when not loaded from disk)."""
        if self.path is not None:
            return artifact_size(self.path)
        w = self.weights
        mats = [w.embedding] + [m for l in w.layers for m in (l.w_ih, l.w_hh)] + \
            ([] if w.decoder is None else [w.decoder])
        return sum(-(-m.q.shape[1] * storage_bits(m) // 8) * m.q.shape[0] + m.scale.nbytes for m in mats)

    # ---- state and single steps -------------------------------------------------------------
    def initial_state(self, batch: int = 1) -> LMState:
        shape = (self.num_layers, int(batch), self.hidden_size)
        return LMState(np.zeros(shape, np.float32), np.zeros(shape, np.float32))

    def _tokens(self, tokens) -> np.ndarray:
        t = np.ascontiguousarray(np.asarray(tokens).reshape(-1), dtype=np.int64)
        if t.size == 1:                                      # the streaming case: keep it cheap
            lo = hi = int(t[0])
        elif t.size:
            lo, hi = int(t.min()), int(t.max())
        else:
            return t
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is out of range [0, {self.vocab_size})")
        return t

    def _check_state(self, state, batch: int) -> LMState:
        try:
            h, c = state
        except (TypeError, ValueError) as exc:
            raise ValueError("state must be an LMState (h, c) as returned by initial_state()") from exc
        want = (self.num_layers, batch, self.hidden_size)
        if (type(h) is np.ndarray and type(c) is np.ndarray and h.shape == want and c.shape == want
                and h.dtype == np.float32 and c.dtype == np.float32 and h.flags.c_contiguous
                and c.flags.c_contiguous and h.flags.writeable and c.flags.writeable):
            return state if isinstance(state, LMState) else LMState(h, c)        # fast path
        for name, a in (("h", h), ("c", c)):
            if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != want:
                raise ValueError(f"state.{name} must be float32 {want}, got "
                                 f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
            if not a.flags.c_contiguous or not a.flags.writeable:
                raise ValueError(f"state.{name} must be C-contiguous and writeable")
        return LMState(h, c)

    def step_(self, tokens, state: LMState) -> np.ndarray:
        """In place: advance ``state`` by one step and return the logits ``[B, V]``.

        The returned array may be the kernel's reused buffer: copy it to keep it."""
        t = self._tokens(tokens)
        h, c = self._check_state(state, t.size)
        return self.kernels.lm_step(self._km, t, h, c)

    def step(self, tokens, state: LMState | None = None) -> tuple[np.ndarray, LMState]:
        """One step for token ids ``[B]``; returns fresh ``(logits [B, V], new_state)``.

        The given ``state`` is not modified (``None`` means the zero state)."""
        t = self._tokens(tokens)
        st = self.initial_state(t.size) if state is None else self._check_state(state, t.size).copy()
        logits = self.kernels.lm_step(self._km, t, st.h, st.c)
        return np.array(logits, dtype=np.float32, copy=True), st

    # ---- sequences ------------------------------------------------------------------------
    def score(self, tokens, state: LMState | None = None) -> np.ndarray:
        """Log-probabilities of each next token: ``[T-1]`` for ``[T]`` input, ``[B, T-1]`` for ``[B, T]``.

        Entry ``t`` is ``log p(tokens[t+1] | tokens[:t+1])`` starting from ``state`` (zero state
        by default; the given state is not modified)."""
        arr = np.asarray(tokens)
        if arr.ndim not in (1, 2):
            raise ValueError(f"score expects token ids of shape [T] or [B, T], got {arr.shape}")
        toks = np.atleast_2d(arr).astype(np.int64)
        self._tokens(toks)
        B, T = toks.shape
        st = self.initial_state(B) if state is None else self._check_state(state, B).copy()
        out = np.empty((B, max(T - 1, 0)), np.float64)
        for t in range(T - 1):
            logits = self.kernels.lm_step(self._km, np.ascontiguousarray(toks[:, t]), st.h, st.c)
            out[:, t] = _log_softmax_pick(logits, toks[:, t + 1])
        return out[0] if arr.ndim == 1 else out

    def perplexity(self, tokens, *, batch_size: int = 20, bptt: int = 35) -> PerplexityReport:
        """Perplexity of a token stream, evaluated like the PTB convention.

        The stream is cut into ``batch_size`` contiguous rows (the tail that does not fill a
        row is dropped); each row is predicted token by token with the state carried across
        the whole row, processed in windows of ``bptt`` steps (the window only bounds the
        work per chunk; with the state carried it does not change the result)."""
        ids = self._tokens(tokens)
        if batch_size < 1 or bptt < 1:
            raise ValueError("batch_size and bptt must be positive")
        n = ids.size // batch_size
        if n < 2:
            raise ValueError(f"{ids.size} tokens are too few for batch size {batch_size}")
        data = ids[: n * batch_size].reshape(batch_size, n)
        st = self.initial_state(batch_size)
        total = 0.0
        t0 = time.perf_counter()
        for start in range(0, n - 1, bptt):
            for t in range(start, min(start + bptt, n - 1)):
                logits = self.kernels.lm_step(self._km, np.ascontiguousarray(data[:, t]), st.h, st.c)
                total += float(_log_softmax_pick(logits, data[:, t + 1]).sum())
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
        prompt = self._tokens(prompt_ids)
        if prompt.size == 0:
            if "<eos>" not in self._word2id:
                raise ValueError("empty prompt and the vocabulary has no <eos> to start from")
            prompt = np.array([self._word2id["<eos>"]], np.int64)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        rng = np.random.default_rng(seed)
        st = self.initial_state(1)
        logits = None
        for tok in prompt:
            logits = self.kernels.lm_step(self._km, np.array([tok], np.int64), st.h, st.c)
        out = np.empty(int(n), np.int64)
        for i in range(int(n)):
            z = logits[0].astype(np.float64)
            if temperature == 0:
                nxt = int(np.argmax(z))
            else:
                z = z / temperature
                if top_k is not None and 0 < top_k < z.size:
                    kth = np.partition(z, -top_k)[-top_k]
                    z = np.where(z >= kth, z, -np.inf)
                p = np.exp(z - z.max())
                cdf = np.cumsum(p)
                nxt = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), z.size - 1)
            out[i] = nxt
            if i + 1 < n:
                logits = self.kernels.lm_step(self._km, np.array([nxt], np.int64), st.h, st.c)
        return out

    # ---- text ---------------------------------------------------------------------------
    def encode(self, text: str, *, unknown: str = "unk") -> np.ndarray:
        """Whitespace-split ``text`` into ids; unknown words map to ``<unk>`` (``unknown="unk"``)
        or raise ``ValueError`` (``unknown="error"``, or when there is no ``<unk>``)."""
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

    def unknown_words(self, text: str) -> list[str]:
        """Words of ``text`` that are not in the vocabulary."""
        return [w for w in text.split() if w not in self._word2id]

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in np.asarray(ids).reshape(-1))

    def __repr__(self) -> str:
        return (f"Engine(vocab={self.vocab_size}, hidden={self.hidden_size}, layers={self.num_layers}, "
                f"backend={self.backend!r}, path={str(self.path) if self.path else None!r})")
