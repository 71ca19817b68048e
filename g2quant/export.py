"""Export a ``QuantizedModel`` to a deployment artifact (torch side of the hand-off).

The quantized weights become a torch-free :class:`~g2quant.targets.qweights.QuantLMWeights`
(integers + per-row scales exactly as the quantizers produced them); before anything is
written, the NumPy reference engine is run on random tokens and compared with the torch
model, so an artifact whose numerics do not match its model is never written.
"""
from __future__ import annotations

import time
from typing import Iterable

import numpy as np
import torch

from .nn.g2lstm import G2LSTM
from .nn.qmodules import QuantEmbedding, QuantG2LSTM, QuantLinear
from .targets.qweights import QLSTMLayer, QMatrix, QuantLMWeights

TARGETS = ("cpu",)
# float32 agreement between the torch model and the reference engine, relative to the logit
# range: integer sums are exact on both sides, only the float rounding of scales, products and
# nonlinearities differs (and, rarely, an activation rounding tie flips by one step).
AGREEMENT_RTOL = 2e-3


class ExportError(ValueError):
    """The model cannot be exported to the requested target."""


def _qmatrix(weight: torch.Tensor, quantizer) -> QMatrix:
    w = weight.detach().float()
    if quantizer is None:
        return QMatrix(w.numpy().astype(np.float32).copy(), np.ones(w.shape[0], np.float32), 32, "float")
    q, s = quantizer.quantize(w)
    return QMatrix(q.numpy().copy(), s.numpy().astype(np.float32).copy(), quantizer.bits, quantizer.scheme)


def _lm_parts(model: torch.nn.Module):
    embs = [m for m in model.modules() if isinstance(m, QuantEmbedding)]
    lstms = [m for m in model.modules() if isinstance(m, G2LSTM)]
    lins = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if len(embs) != 1 or len(lstms) != 1 or len(lins) != 1:
        raise ExportError("target 'cpu' exports word-level language models shaped Embedding -> LSTM -> Linear; "
                          f"this model has {len(embs)} quantized embedding(s), {len(lstms)} LSTM(s) and "
                          f"{len(lins)} quantized linear layer(s) (layers listed in skip= stay float and "
                          "cannot be exported)")
    emb, lstm, dec = embs[0], lstms[0], lins[0]
    if not isinstance(lstm, QuantG2LSTM):
        raise ExportError("the LSTM was not quantized (is it in skip=?)")
    if lstm.bidirectional:
        raise ExportError("a bidirectional LSTM cannot run as a streaming language model")
    if emb.embedding_dim != lstm.input_size or dec.in_features != lstm.hidden_size \
            or dec.out_features != emb.num_embeddings:
        raise ExportError(f"shapes do not chain: embedding {emb.num_embeddings}x{emb.embedding_dim}, LSTM "
                          f"{lstm.input_size}->{lstm.hidden_size}, linear {dec.in_features}->{dec.out_features}")
    return emb, lstm, dec


def to_lm_weights(qmodel) -> QuantLMWeights:
    """The integer weights, scales and gate settings of a quantized word-level LM."""
    emb, lstm, dec = _lm_parts(qmodel.model)
    cfg = qmodel.config
    if cfg.act_bits is not None and cfg.act_mode != "dynamic":
        raise ExportError("target 'cpu' runs dynamic per-vector int8 activations; this model was quantized "
                          "with act_mode='static' (quantize again with act_mode='dynamic')")
    layers = []
    for layer in range(lstm.num_layers):
        names = lstm._flat_names[layer]
        w_ih = _qmatrix(getattr(lstm, names[0]), lstm.wq[names[0]] if names[0] in lstm.wq else None)
        w_hh = _qmatrix(getattr(lstm, names[1]), lstm.wq[names[1]] if names[1] in lstm.wq else None)
        if lstm.bias:
            bias = (getattr(lstm, names[2]) + getattr(lstm, names[3])).detach().float().numpy()
        else:
            bias = np.zeros(4 * lstm.hidden_size, np.float32)
        layers.append(QLSTMLayer(w_ih, w_hh, bias.astype(np.float32)))
    tied = dec.weight is emb.weight
    dec_bias = dec.bias.detach().float().numpy() if dec.bias is not None else np.zeros(dec.out_features)
    return QuantLMWeights(
        embedding=_qmatrix(emb.weight, emb.wq), layers=layers,
        decoder=None if tied else _qmatrix(dec.weight, dec.wq), decoder_bias=dec_bias.astype(np.float32),
        hard_gates=tuple(g for g in "ifo" if g in lstm.hard_gates), act_bits=cfg.act_bits,
        extra={"gates": lstm.gates, "tau": lstm.tau, "quant_config": cfg.to_dict()})


@torch.no_grad()
def check_agreement(qmodel, w: QuantLMWeights, *, steps: int = 8, batch: int = 3, seed: int = 0) -> dict:
    """Run torch and the NumPy reference on the same random tokens; raise ExportError when the
    logits disagree by more than ``AGREEMENT_RTOL`` of their range."""
    from .targets.cpu import reference

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, w.vocab_size, size=(steps, batch))
    was = qmodel.training
    qmodel.eval()
    try:
        out = qmodel(torch.as_tensor(tokens))
    finally:
        qmodel.train(was)
    logits_t = (out[0] if isinstance(out, tuple) else out).float().numpy()
    if logits_t.shape != (steps, batch, w.vocab_size):
        raise ExportError(f"the model's output has shape {logits_t.shape}; a word-level LM called with tokens "
                          f"[T, B] must return logits [T, B, V] = {(steps, batch, w.vocab_size)}")
    h, c = reference.initial_state(w, batch)
    worst = 0.0
    for t in range(steps):
        logits_r, h, c = reference.lm_step_ref(w, tokens[t], h, c)
        worst = max(worst, float(np.abs(logits_r - logits_t[t]).max()))
    scale = max(1.0, float(np.abs(logits_t).max()))
    if worst > AGREEMENT_RTOL * scale:
        raise ExportError(f"the exported weights do not reproduce the model: max |logit difference| {worst:.3g} "
                          f"(allowed {AGREEMENT_RTOL * scale:.3g}). Does the model's forward do more than "
                          "Embedding -> LSTM -> Linear?")
    return {"max_abs_logit_diff_vs_torch": worst, "agreement_steps": steps * batch}


def export_model(qmodel, path, *, target: str = "cpu", vocab: Iterable[str] | None = None,
                 validation: dict | None = None, check: bool = True):
    """Write ``qmodel`` as an artifact directory at ``path`` (atomic); returns its Path."""
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}; available: {', '.join(TARGETS)}")
    from .targets.cpu.export import write_lm_artifact

    w = to_lm_weights(qmodel)
    if vocab is None:
        raise ExportError("export needs the vocabulary (vocab=corpus.vocab), which is stored in the artifact")
    vocab = list(vocab)
    val = dict(validation or {})
    if check:
        val.update(check_agreement(qmodel, w))
    val.setdefault("exported_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    meta = {"size_bytes": qmodel.size_bytes(), "float_size_bytes": qmodel.float_size_bytes()}
    return write_lm_artifact(path, w, vocab, target=target, validation=val, meta=meta)
