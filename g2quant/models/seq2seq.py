"""Attention encoder-decoder for translation: G2LSTM encoder → G2LSTM decoder with Luong attention.

Luong, Pham & Manning, "Effective Approaches to Attention-based Neural Machine Translation"
(EMNLP 2015): global attention with the "general" score ``score(h_t, h_s) = h_tᵀ W_a h_s``,
attentional vector ``h̃_t = tanh(W_c [c_t; h_t])``, and input feeding (``h̃_{t-1}`` is concatenated
to the next decoder input). The paper's MT setting (Li et al. 2018) is 2 layers, embedding and
hidden size 256 (the defaults).

The pieces a runtime needs are public and are what ``forward`` is built from:

- ``encode(src [S, B], src_lengths=None) -> (memory, state)``: ``memory = Memory(keys, values,
  mask)`` with ``values`` the encoder outputs ``[B, S, H]``, ``keys = values W_aᵀ`` (``attn_key``,
  computed once per sentence) and ``mask [B, S]`` (None when every sentence has length S);
  ``state = (h, c)``, each ``[num_layers, B, H]``, the decoder's initial state.
- ``decode_step(prev [B], state, feed [B, H], memory) -> (logits [B, V], state, feed)``: one
  target step; ``feed`` is the previous attentional vector (zeros at the first step, ``init_feed``).

Only ``nn.Embedding``, ``G2LSTM`` and ``nn.Linear`` hold weights, so ``g2quant.quantize`` covers
the whole model; attention is bmm / masked_fill / softmax / cat / tanh. Greedy decoding and beam
search (:func:`greedy_decode`, :func:`beam_search`) work on the float model, a quantized one, or
anything else with ``encode`` / ``decode_step`` and these state layouts.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
from torch import nn

from ..data.translation import BOS, EOS, PAD
from ..nn.g2lstm import DEFAULT_TAU, GATE_MODES, G2LSTM


@dataclass(frozen=True)
class Seq2SeqConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    emb_size: int = 256
    hidden_size: int = 256           # decoder size; a bidirectional encoder has hidden_size // 2 per direction
    num_layers: int = 2              # encoder and decoder alike (the encoder's final state starts the decoder)
    bidirectional: bool = False      # encoder
    dropout: float = 0.2             # embeddings, between LSTM layers, attentional vector
    tied: bool = False               # output layer shares the target embedding (needs emb_size == hidden_size)
    gates: str = "sigmoid"           # "sigmoid" | "gumbel" | "sharpened" (encoder and decoder)
    tau: float | None = None         # default: 0.9 gumbel, 0.2 sharpened
    noise_p: float = 0.2             # the authors' code (paper: 1.0)
    gumbel_gates: str = "if"
    init_range: float = 0.1
    pad_id: int = PAD
    bos_id: int = BOS
    eos_id: int = EOS

    def __post_init__(self):
        for name in ("src_vocab_size", "tgt_vocab_size", "emb_size", "hidden_size", "num_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"Seq2SeqConfig.{name} must be a positive integer, got {v!r}")
        if min(self.src_vocab_size, self.tgt_vocab_size) <= max(self.pad_id, self.bos_id, self.eos_id):
            raise ValueError("Seq2SeqConfig: vocabularies must contain the special ids "
                             f"(pad {self.pad_id}, bos {self.bos_id}, eos {self.eos_id})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Seq2SeqConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.gates not in GATE_MODES:
            raise ValueError(f"Seq2SeqConfig.gates must be one of {GATE_MODES}, got {self.gates!r}")
        if self.tau is not None and not self.tau > 0:
            raise ValueError(f"Seq2SeqConfig.tau must be > 0, got {self.tau}")
        if not 0.0 <= self.noise_p <= 1.0:
            raise ValueError(f"Seq2SeqConfig.noise_p must be in [0, 1], got {self.noise_p}")
        if not self.gumbel_gates or set(self.gumbel_gates) - set("ifo"):
            raise ValueError(f"Seq2SeqConfig.gumbel_gates may contain only i, f, o; got {self.gumbel_gates!r}")
        if self.bidirectional and self.hidden_size % 2:
            raise ValueError(f"a bidirectional encoder needs an even hidden_size, got {self.hidden_size}")
        if self.tied and self.emb_size != self.hidden_size:
            raise ValueError(f"tied weights need emb_size == hidden_size, got {self.emb_size} and {self.hidden_size}")
        if not self.init_range > 0:
            raise ValueError(f"Seq2SeqConfig.init_range must be > 0, got {self.init_range}")

    @property
    def effective_tau(self) -> float:
        return DEFAULT_TAU[self.gates] if self.tau is None else self.tau

    @property
    def encoder_hidden(self) -> int:
        return self.hidden_size // 2 if self.bidirectional else self.hidden_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Seq2SeqConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown Seq2SeqConfig fields {sorted(unknown)}")
        return cls(**d)


class Memory(NamedTuple):
    """What the decoder attends to; batch first."""
    keys: torch.Tensor               # [B, S, H]  values @ W_a^T
    values: torch.Tensor             # [B, S, H]  encoder outputs
    mask: torch.Tensor | None        # [B, S] bool, True on real tokens; None: no padding


class Seq2Seq(nn.Module):
    """``forward(src [S, B], tgt_in [T, B], src_lengths=None) -> logits [T, B, V]`` (teacher forcing)."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = c = config
        g = dict(gates=c.gates, tau=c.tau, noise_p=c.noise_p, gumbel_gates=c.gumbel_gates)
        H = c.hidden_size
        self.src_embedding = nn.Embedding(c.src_vocab_size, c.emb_size)
        self.encoder = G2LSTM(c.emb_size, c.encoder_hidden, c.num_layers, dropout=c.dropout,
                              bidirectional=c.bidirectional, **g)
        self.tgt_embedding = nn.Embedding(c.tgt_vocab_size, c.emb_size)
        self.decoder = G2LSTM(c.emb_size + H, H, c.num_layers, dropout=c.dropout, **g)
        self.attn_key = nn.Linear(H, H, bias=False)        # W_a, applied to the encoder outputs once
        self.attn_out = nn.Linear(2 * H, H, bias=False)    # W_c
        self.generator = nn.Linear(H, c.tgt_vocab_size)
        if c.tied:
            self.generator.weight = self.tgt_embedding.weight
        self.drop = nn.Dropout(c.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r = self.config.init_range
        for p in self.parameters():
            nn.init.uniform_(p, -r, r)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ encoder
    def encode(self, src: torch.Tensor, src_lengths=None) -> tuple[Memory, tuple[torch.Tensor, torch.Tensor]]:
        """Encoder outputs as attention memory and the decoder's initial state.

        ``src`` is ``[S, B]`` token ids, right-padded; ``src_lengths`` the true lengths (None: all S).
        Sentences of different lengths are encoded in groups of equal length, so padding never
        enters a recurrence (G2LSTM takes no packed sequences); batches from
        ``bucket_batches(..., bucket_width=1)`` are a single group.
        """
        if src.dim() != 2:
            raise ValueError(f"Seq2Seq.encode expects source ids of shape [S, B], got {tuple(src.shape)}")
        S, B = src.shape
        lengths = None if src_lengths is None else torch.as_tensor(src_lengths, dtype=torch.long).cpu()
        if lengths is not None and (lengths.shape != (B,) or int(lengths.min()) < 1 or int(lengths.max()) > S):
            raise ValueError(f"src_lengths must be {B} lengths in 1..{S}, got {lengths.tolist()}")
        if lengths is None or bool((lengths == S).all()):
            out, (h, c) = self.encoder(self.drop(self.src_embedding(src)))
            mask = None
        else:
            out = src.new_zeros((S, B, self.config.hidden_size), dtype=self._float_dtype())
            h = out.new_zeros((self.encoder.num_layers * (2 if self.config.bidirectional else 1), B,
                               self.config.encoder_hidden))
            c = h.clone()
            for n in lengths.unique().tolist():
                idx = (lengths == n).nonzero().squeeze(1).to(src.device)
                o, (hg, cg) = self.encoder(self.drop(self.src_embedding(src[:n, idx])))
                out[:n, idx], h[:, idx], c[:, idx] = o, hg, cg
            mask = (torch.arange(S)[None, :] < lengths[:, None]).to(src.device)
        values = out.transpose(0, 1)                                     # [B, S, H]
        return Memory(self.attn_key(values), values, mask), (self._bridge(h), self._bridge(c))

    def _bridge(self, s: torch.Tensor) -> torch.Tensor:
        """Encoder final state ``[L*dirs, B, He]`` -> decoder initial state ``[L, B, H]``
        (a bidirectional layer's two directions are concatenated)."""
        if not self.config.bidirectional:
            return s
        return torch.cat([s[0::2], s[1::2]], dim=-1)

    # ------------------------------------------------------------------ decoder
    def init_feed(self, batch: int) -> torch.Tensor:
        """The attentional vector before the first step: zeros ``[B, H]``."""
        return self.tgt_embedding.weight.new_zeros((batch, self.config.hidden_size), dtype=self._float_dtype())

    def _float_dtype(self) -> torch.dtype:
        """The activations' dtype: the target embedding's (a dynamically quantized copy of the model,
        ``torch.ao.quantization.quantize_dynamic``, has no float ``generator.weight``)."""
        return self.tgt_embedding.weight.dtype

    def attend(self, h: torch.Tensor, memory: Memory) -> torch.Tensor:
        """Attentional vector ``tanh(W_c [c; h])`` for decoder outputs ``h [B, H]``."""
        scores = torch.bmm(memory.keys, h.unsqueeze(2)).squeeze(2)       # [B, S]
        if memory.mask is not None:
            scores = scores.masked_fill(~memory.mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        context = torch.bmm(weights.unsqueeze(1), memory.values).squeeze(1)   # [B, H]
        return torch.tanh(self.attn_out(torch.cat([context, h], dim=-1)))

    def decode_step(self, prev: torch.Tensor, state, feed: torch.Tensor, memory: Memory, *,
                    logits: bool = True):
        """One target step: ``prev [B]`` token ids (``<s>`` first), ``state = (h, c)`` each
        ``[L, B, H]``, ``feed [B, H]`` the previous attentional vector. Returns
        ``(logits [B, V] or None, state, feed)``."""
        x = torch.cat([self.drop(self.tgt_embedding(prev)), feed], dim=-1)
        out, state = self.decoder(x.unsqueeze(0), state)
        feed = self.attend(out[0], memory)
        return (self.generator(self.drop(feed)) if logits else None), state, feed

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, src_lengths=None) -> torch.Tensor:
        if tgt_in.dim() != 2 or tgt_in.shape[1] != src.shape[-1]:
            raise ValueError(f"Seq2Seq expects target ids [T, B] with the source's batch size, got "
                             f"{tuple(tgt_in.shape)} for source {tuple(src.shape)}")
        memory, state = self.encode(src, src_lengths)
        feed = self.init_feed(src.shape[1])
        feeds = []
        for t in range(tgt_in.shape[0]):
            _, state, feed = self.decode_step(tgt_in[t], state, feed, memory, logits=False)
            feeds.append(feed)
        return self.generator(self.drop(torch.stack(feeds)))


# ---------------------------------------------------------------------- decoding
def _core(model):
    """The model with ``encode`` / ``decode_step`` (a QuantizedModel wraps it in ``.model``)."""
    return model if hasattr(model, "decode_step") else model.model


@contextmanager
def _eval_mode(model):
    """Decoding is deterministic: no dropout, no Gumbel noise (the mode is restored after)."""
    was = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    try:
        yield
    finally:
        if isinstance(model, nn.Module):
            model.train(was)


def _select(memory: Memory, state, feed, idx: torch.Tensor):
    """Rows ``idx`` of everything that has a batch axis (memory/feed: dim 0, LSTM state: dim 1)."""
    mem = Memory(*(None if t is None else t.index_select(0, idx) for t in memory))
    return mem, tuple(s.index_select(1, idx) for s in state), feed.index_select(0, idx)


def default_max_len(src_len: int) -> int:
    """Longest translation searched for a source of ``src_len`` tokens: ``2 * src_len + 10``."""
    return 2 * int(src_len) + 10


@torch.no_grad()
def greedy_decode(model, src: torch.Tensor, src_lengths=None, *, max_len: int | None = None) -> list[list[int]]:
    """Arg-max decoding, batched; returns each sentence's token ids without ``</s>`` (at most
    ``max_len`` of them; default ``2 * source length + 10``)."""
    with _eval_mode(model):
        return _greedy(_core(model), src, src_lengths, max_len)


def _greedy(m, src, src_lengths, max_len):
    eos, bos = m.config.eos_id, m.config.bos_id
    S, B = src.shape
    lengths = torch.full((B,), S) if src_lengths is None else torch.as_tensor(src_lengths).cpu()
    limits = [max_len or default_max_len(int(n)) for n in lengths.tolist()]
    memory, state = m.encode(src, src_lengths)
    feed = m.init_feed(B)
    prev = torch.full((B,), bos, dtype=torch.long, device=src.device)
    out = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(max(limits)):
        logits, state, feed = m.decode_step(prev, state, feed, memory)
        prev = logits.argmax(-1)
        for b, t in enumerate(prev.tolist()):
            if done[b]:
                continue
            if t == eos:
                done[b] = True
            else:
                out[b].append(t)
                done[b] = len(out[b]) >= limits[b]
        if all(done):
            break
    return out


@torch.no_grad()
def beam_search(model, src: torch.Tensor, src_lengths=None, *, beam: int = 5, max_len: int | None = None,
                len_penalty: float = 1.0, return_scores: bool = False):
    """Beam search with length normalization, batched over sentences.

    Each hypothesis ends at ``</s>`` and is scored ``sum(log p) / len ** len_penalty`` (len counts
    ``</s>``; ``len_penalty=0``: raw log-probability). Per step, every live beam's top candidates
    are ranked; ``</s>`` candidates among the first ``beam`` finish a hypothesis, the best ``beam``
    others continue. A sentence is done when it has ``beam`` finished hypotheses; at ``max_len``
    output tokens (default ``2 * source length + 10``) the live beams are closed with ``</s>``. Beam 1 equals
    :func:`greedy_decode`. Returns the best hypothesis per sentence (token ids without ``</s>``),
    and with ``return_scores`` also the normalized scores.
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    with _eval_mode(model):
        return _beam(_core(model), src, src_lengths, beam, max_len, len_penalty, return_scores)


def _beam(m, src, src_lengths, beam, max_len, len_penalty, return_scores):
    eos, bos = m.config.eos_id, m.config.bos_id
    S, B = src.shape
    dev = src.device
    lengths = torch.full((B,), S) if src_lengths is None else torch.as_tensor(src_lengths).cpu()
    limits = [max_len or default_max_len(int(n)) for n in lengths.tolist()]
    memory, state = m.encode(src, src_lengths)
    k = beam
    rep = torch.arange(B, device=dev).repeat_interleave(k)                   # [B*k]
    memory, state, feed = _select(memory, state, m.init_feed(B), rep)
    scores = torch.full((B, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0                                                        # only beam 0 is live at first
    hist = torch.full((B * k, 0), bos, dtype=torch.long, device=dev)
    prev = torch.full((B * k,), bos, dtype=torch.long, device=dev)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    alive = list(range(B))                                                    # sentence of each batch row
    step = 0
    while alive:
        step += 1
        logits, state, feed = m.decode_step(prev, state, feed, memory)
        logp = torch.log_softmax(logits.float(), dim=-1)
        V = logp.shape[-1]
        n = len(alive)
        total = (scores.view(n * k, 1) + logp).view(n, k * V)
        last = torch.tensor([step > limits[s] for s in alive], device=dev)
        if bool(last.any()):                     # force </s> for sentences at their length limit
            forced = torch.full_like(total, float("-inf")).view(n, k, V)
            forced[:, :, eos] = total.view(n, k, V)[:, :, eos]
            total = torch.where(last[:, None], forced.view(n, k * V), total)
        cand, idx = total.topk(min(2 * k, k * V), dim=1)
        beam_of, tok = idx // V, idx % V
        is_eos = tok == eos
        # finish the </s> candidates among the first k (skipping -inf: dead beams)
        fin = (is_eos[:, :k] & torch.isfinite(cand[:, :k])).nonzero().tolist()
        for r, j in fin:
            s = alive[r]
            if len(finished[s]) < k:
                row = r * k + int(beam_of[r, j])
                toks = hist[row].tolist()
                norm = float(cand[r, j]) / float(len(toks) + 1) ** len_penalty
                finished[s].append((norm, toks))
        # continue with the best k non-</s> candidates
        rank = torch.cumsum((~is_eos).long(), dim=1) - 1
        keep = (~is_eos) & (rank < k)
        sel_beam = beam_of[keep].view(n, k)
        sel_tok = tok[keep].view(n, k)
        sel_score = cand[keep].view(n, k)
        done_rows = [r for r, s in enumerate(alive) if len(finished[s]) >= k or step > limits[s]]
        src_rows = (torch.arange(n, device=dev)[:, None] * k + sel_beam).view(-1)
        hist = torch.cat([hist.index_select(0, src_rows), sel_tok.view(-1, 1)], dim=1)
        prev = sel_tok.view(-1)
        scores = sel_score
        memory, state, feed = _select(memory, state, feed, src_rows)
        if done_rows:
            keep_rows = [r for r in range(n) if r not in set(done_rows)]
            alive = [alive[r] for r in keep_rows]
            if not alive:
                break
            kr = torch.tensor(keep_rows, device=dev)
            flat = (kr[:, None] * k + torch.arange(k, device=dev)).view(-1)
            scores = scores.index_select(0, kr)
            hist, prev = hist.index_select(0, flat), prev.index_select(0, flat)
            memory, state, feed = _select(memory, state, feed, flat)
    best = [max(f, key=lambda x: x[0]) if f else (float("-inf"), []) for f in finished]
    out = [b[1] for b in best]
    return (out, [b[0] for b in best]) if return_scores else out


def _build(config: dict) -> Seq2Seq:
    return Seq2Seq(Seq2SeqConfig.from_dict(config))


from ..checkpoint import register_model  # noqa: E402

register_model("seq2seq", _build)
