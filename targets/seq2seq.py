"""A translation model (attention encoder-decoder, ``g2quant.models.seq2seq``) in any runtime:
encoder, Luong attention with input feeding, beam search — NumPy on top of the runtimes of its
graphs (no torch).

The artifact holds six small graphs (``graphio.write_model_artifact``) that a target's runtime runs
as usual: ``encoder`` (source ids -> encoder outputs, and its final state), ``attn_key``
(``W_a`` on the encoder outputs, once per sentence), ``tgt_embedding``, ``decoder`` (one step of
the decoder stack on ``[embedding; attentional vector]``), ``attn_out`` (``tanh(W_c [context; h])``)
and ``generator``. Per step: ``scores = keys · h``, masked softmax over the source, ``context =
weights · values``. ``greedy`` / ``beam_search`` follow ``g2quant.models.seq2seq`` step for step
(length-normalized scores, ``</s>`` among the first k candidates finishes a hypothesis, a sentence is
done with k finished hypotheses, ``</s>`` forced at the length limit ``2·S + 10``).
"""
from __future__ import annotations

import numpy as np

from .runtime import State

PARTS = ("encoder", "attn_key", "tgt_embedding", "decoder", "attn_out", "generator")


def default_max_len(src_len: int) -> int:
    return 2 * int(src_len) + 10


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


class Seq2SeqRuntime:
    """``translate_ids`` / ``greedy`` / ``beam_search`` / ``translate`` of a seq2seq artifact."""

    def __init__(self, parts: dict, model: dict, *, src_vocab=None, tgt_vocab=None, bpe_codes: str | None = None,
                 manifest: dict | None = None, path=None):
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise ValueError(f"a seq2seq artifact needs the graphs {PARTS}; missing {missing}")
        self.parts, self.model, self.manifest, self.path = parts, dict(model), dict(manifest or {}), path
        cfg = self.model.get("config", {})
        try:
            self.bos, self.eos, self.pad = int(cfg["bos_id"]), int(cfg["eos_id"]), int(cfg["pad_id"])
            self.bidirectional = bool(cfg["bidirectional"])
            self.hidden = int(cfg["hidden_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the seq2seq model description is incomplete ({exc!r})") from None
        self.src_vocab, self.tgt_vocab, self.bpe_codes = src_vocab, tgt_vocab, bpe_codes
        self.backend = getattr(parts["decoder"], "backend", "?")

    # ---- the model's two halves ------------------------------------------------------------
    def encode(self, src: np.ndarray, lengths=None):
        """``src [S, B]`` ids (right-padded) -> ``(memory, state)``; memory = (keys [B, S, H],
        values [B, S, H], mask [B, S] or None); state = (h, c) ``[L, B, H]``."""
        src = np.asarray(src, np.int64)
        S, B = src.shape
        lengths = np.full(B, S) if lengths is None else np.asarray(lengths, np.int64)
        enc, key = self.parts["encoder"], self.parts["attn_key"]
        values = np.zeros((S, B, self.hidden), np.float32)
        h = c = None
        for n in np.unique(lengths):
            idx = np.flatnonzero(lengths == n)
            out, st = enc._execute(np.ascontiguousarray(src[:n, idx]), enc.initial_state(len(idx)))
            hg, cg = st[0]
            if h is None:
                h = np.zeros((hg.shape[0], B, hg.shape[2]), np.float32)
                c = np.zeros_like(h)
            values[:n, idx], h[:, idx], c[:, idx] = out, hg, cg
        keys, _ = key._execute(values, State())
        mask = None if bool((lengths == S).all()) else (np.arange(S)[None, :] < lengths[:, None])
        if self.bidirectional:                      # a layer's two directions side by side
            h = np.concatenate([h[0::2], h[1::2]], axis=-1)
            c = np.concatenate([c[0::2], c[1::2]], axis=-1)
        return (np.ascontiguousarray(keys.swapaxes(0, 1)), np.ascontiguousarray(values.swapaxes(0, 1)), mask), (h, c)

    def init_feed(self, batch: int) -> np.ndarray:
        return np.zeros((batch, self.hidden), np.float32)

    def decode_step(self, prev: np.ndarray, state, feed: np.ndarray, memory):
        """One target step -> ``(logits [B, V], state, feed)``."""
        keys, values, mask = memory
        emb, _ = self.parts["tgt_embedding"]._execute(np.asarray(prev, np.int64)[None], State())
        x = np.concatenate([emb, feed[None]], axis=-1)
        out, st = self.parts["decoder"]._execute(np.ascontiguousarray(x, np.float32),
                                                 State([(np.ascontiguousarray(state[0]),
                                                         np.ascontiguousarray(state[1]))]))
        h = out[0]
        scores = np.einsum("bsh,bh->bs", keys, h)
        if mask is not None:
            scores = np.where(mask, scores, -np.inf)
        w = np.exp(scores - scores.max(axis=1, keepdims=True))
        w = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
        ctx = np.einsum("bs,bsh->bh", w, values).astype(np.float32)
        feed, _ = self.parts["attn_out"]._execute(np.concatenate([ctx, h], axis=-1)[None], State())
        logits, _ = self.parts["generator"]._execute(feed, State())
        return logits[0], st[0], feed[0]

    # ---- decoding -------------------------------------------------------------------------
    @staticmethod
    def _select(memory, state, feed, idx):
        keys, values, mask = memory
        return ((keys[idx], values[idx], None if mask is None else mask[idx]),
                (state[0][:, idx], state[1][:, idx]), feed[idx])

    def greedy(self, src, lengths=None, *, max_len: int | None = None) -> list[list[int]]:
        src = np.asarray(src, np.int64)
        S, B = src.shape
        lengths = np.full(B, S) if lengths is None else np.asarray(lengths)
        limits = [max_len or default_max_len(n) for n in lengths]
        memory, state = self.encode(src, lengths)
        feed, prev = self.init_feed(B), np.full(B, self.bos, np.int64)
        out, done = [[] for _ in range(B)], [False] * B
        for _ in range(max(limits)):
            logits, state, feed = self.decode_step(prev, state, feed, memory)
            prev = logits.argmax(-1)
            for b, t in enumerate(prev.tolist()):
                if done[b]:
                    continue
                if t == self.eos:
                    done[b] = True
                else:
                    out[b].append(t)
                    done[b] = len(out[b]) >= limits[b]
            if all(done):
                break
        return out

    def beam_search(self, src, lengths=None, *, beam: int = 5, max_len: int | None = None,
                    len_penalty: float = 1.0, return_scores: bool = False):
        if isinstance(beam, bool) or not isinstance(beam, (int, np.integer)) or beam < 1:
            raise ValueError(f"beam must be a positive integer, got {beam!r}")
        src = np.asarray(src, np.int64)
        S, B = src.shape
        lengths = np.full(B, S) if lengths is None else np.asarray(lengths)
        limits = [max_len or default_max_len(n) for n in lengths]
        k, eos = int(beam), self.eos
        memory, state = self.encode(src, lengths)
        rep = np.repeat(np.arange(B), k)
        memory, state, feed = self._select(memory, state, self.init_feed(B), rep)
        scores = np.full((B, k), -np.inf)
        scores[:, 0] = 0.0
        hist = np.zeros((B * k, 0), np.int64)
        prev = np.full(B * k, self.bos, np.int64)
        finished: list[list] = [[] for _ in range(B)]
        alive, step = list(range(B)), 0
        while alive:
            step += 1
            logits, state, feed = self.decode_step(prev, state, feed, memory)
            logp = _log_softmax(logits.astype(np.float32))
            V, n = logp.shape[-1], len(alive)
            total = (scores.reshape(n * k, 1) + logp).reshape(n, k * V)
            last = np.array([step > limits[s] for s in alive])
            if last.any():                               # force </s> at the length limit
                forced = np.full((n, k, V), -np.inf)
                forced[:, :, eos] = total.reshape(n, k, V)[:, :, eos]
                total = np.where(last[:, None], forced.reshape(n, k * V), total)
            m = min(2 * k, k * V)
            idx = np.argsort(-total, axis=1, kind="stable")[:, :m]
            cand = np.take_along_axis(total, idx, axis=1)
            beam_of, tok = idx // V, idx % V
            is_eos = tok == eos
            for r, j in zip(*np.nonzero(is_eos[:, :k] & np.isfinite(cand[:, :k]))):
                s = alive[r]
                if len(finished[s]) < k:
                    toks = hist[r * k + beam_of[r, j]].tolist()
                    finished[s].append((float(cand[r, j]) / float(len(toks) + 1) ** len_penalty, toks))
            rank = np.cumsum(~is_eos, axis=1) - 1
            keep = (~is_eos) & (rank < k)
            sel_beam, sel_tok = beam_of[keep].reshape(n, k), tok[keep].reshape(n, k)
            sel_score = cand[keep].reshape(n, k)
            done_rows = [r for r, s in enumerate(alive) if len(finished[s]) >= k or step > limits[s]]
            rows = (np.arange(n)[:, None] * k + sel_beam).reshape(-1)
            hist = np.concatenate([hist[rows], sel_tok.reshape(-1, 1)], axis=1)
            prev, scores = sel_tok.reshape(-1), sel_score
            memory, state, feed = self._select(memory, state, feed, rows)
            if done_rows:
                keep_rows = [r for r in range(n) if r not in set(done_rows)]
                alive = [alive[r] for r in keep_rows]
                if not alive:
                    break
                flat = (np.asarray(keep_rows)[:, None] * k + np.arange(k)).reshape(-1)
                scores = scores[keep_rows]
                hist, prev = hist[flat], prev[flat]
                memory, state, feed = self._select(memory, state, feed, flat)
        best = [max(f, key=lambda x: x[0]) if f else (float("-inf"), []) for f in finished]
        out = [b[1] for b in best]
        return (out, [b[0] for b in best]) if return_scores else out

    def translate_ids(self, sentences: list[list[int]], *, beam: int = 5, batch_size: int = 32) -> list[list[int]]:
        """Source id lists (ending with ``</s>``, as the training data) -> target id lists."""
        out: list = [None] * len(sentences)
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            L = max(len(sentences[i]) for i in chunk)
            src = np.full((L, len(chunk)), self.pad, np.int64)
            for j, i in enumerate(chunk):
                src[:len(sentences[i]), j] = sentences[i]
            lens = [len(sentences[i]) for i in chunk]
            res = self.greedy(src, lens) if beam == 1 else self.beam_search(src, lens, beam=beam)
            for j, i in enumerate(chunk):
                out[i] = res[j]
        return out
