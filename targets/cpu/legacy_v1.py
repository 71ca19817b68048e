"""Format version 1 of the CPU artifact: word-level LSTM LMs only (g2quant 0.1). Still read.

``read_v1(path)`` turns a v1 artifact into the lowered graph of the model; ``write_v1_lm_artifact``
exists so that the compatibility test can make one. The v1 description:

``write_v1_lm_artifact(path, w, vocab)`` stores a ``QuantLMWeights`` as ``NAME.g2q/``
(see ``g2quant.targets.artifact``) with quantized matrices **bit-packed** at their storage
width (1 -> 1-bit, ternary and 2 -> 2-bit, 3..4 -> 4-bit, 5..8 -> 8-bit; ``uint8`` words,
layout in ``g2quant.targets.pack``), scales and biases float32 and float matrices float32.
``read_lm_artifact(path)`` verifies, unpacks and returns exactly the same weights.

Tensor names: ``embedding.q/.scale``, ``layers.{l}.w_ih.q/.scale``, ``layers.{l}.w_hh.q/.scale``,
``layers.{l}.bias``, ``decoder.q/.scale`` (absent when tied), ``decoder_bias``. Each ``*.q``
manifest entry records ``bits``, ``storage_bits``, ``scheme``, ``packing``, ``logical_shape``
and the name of its ``scale`` tensor.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import pack
from ..artifact import ArtifactError, load_artifact, write_artifact
from ..qweights import GATE_NAMES, QLSTMLayer, QMatrix, QuantLMWeights
from ..graphio import check_vocab as _check_vocab
from .target import storage_width

VOCAB_FILE = "vocab.txt"
MODEL_KIND = "word_lm"
PACKING = "lsb-first-u8-rowpad"     # see g2quant.targets.pack


def storage_bits(m: QMatrix) -> int:
    """Bits per stored value: 1, 2, 4, 8 (packed) or 32 (float)."""
    return storage_width(m.bits, m.scheme)


def _pack_fn(m: QMatrix):
    if m.scheme == "ternary":
        return pack.pack_ternary, pack.unpack_ternary
    sb = storage_bits(m)
    return {1: (pack.pack_1bit, pack.unpack_1bit), 2: (pack.pack_2bit, pack.unpack_2bit),
            4: (pack.pack_4bit, pack.unpack_4bit), 8: (pack.pack_8bit, pack.unpack_8bit)}[sb]


def check_lm_shapes(w: QuantLMWeights, vocab_len: int | None = None, *, err=ValueError) -> None:
    """Raise ``err`` unless every shape in ``w`` is consistent (and ``len(vocab)`` matches)."""
    V, E = w.embedding.shape
    H = w.hidden_size
    if vocab_len is not None and vocab_len != V:
        raise err(f"vocabulary has {vocab_len} words but the embedding has {V} rows (vocab_size)")
    for l, layer in enumerate(w.layers):
        d_in = E if l == 0 else H
        for name, m, want in (("w_ih", layer.w_ih, (4 * H, d_in)), ("w_hh", layer.w_hh, (4 * H, H))):
            if tuple(m.shape) != want:
                raise err(f"layers.{l}.{name} has shape {tuple(m.shape)}, expected {want} "
                          f"(hidden {H}, input {d_in})")
        if np.shape(layer.bias) != (4 * H,):
            raise err(f"layers.{l}.bias has shape {np.shape(layer.bias)}, expected ({4 * H},)")
    if w.decoder is None:
        if E != H:
            raise err(f"a tied decoder needs emb_size == hidden_size, got {E} != {H}")
    elif tuple(w.decoder.shape) != (V, H):
        raise err(f"decoder has shape {tuple(w.decoder.shape)}, expected {(V, H)}")
    if np.shape(w.decoder_bias) != (V,):
        raise err(f"decoder_bias has shape {np.shape(w.decoder_bias)}, expected ({V},)")




def _matrices(w: QuantLMWeights):
    yield "embedding", w.embedding
    for l, layer in enumerate(w.layers):
        yield f"layers.{l}.w_ih", layer.w_ih
        yield f"layers.{l}.w_hh", layer.w_hh
    if w.decoder is not None:
        yield "decoder", w.decoder


def write_v1_lm_artifact(path, w: QuantLMWeights, vocab: list[str], *, target: str = "cpu",
                         validation: dict | None = None, meta: dict | None = None) -> Path:
    """Write ``w`` and ``vocab`` as an artifact directory at ``path``; return its Path."""
    if not isinstance(w, QuantLMWeights):
        raise ValueError(f"expected QuantLMWeights, got {type(w).__name__}")
    vocab = _check_vocab(vocab)
    check_lm_shapes(w, len(vocab))
    tensors: dict[str, np.ndarray] = {}
    entries: dict[str, dict] = {}
    for name, m in _matrices(w):
        sb = storage_bits(m)
        if m.scheme == "float":
            tensors[f"{name}.q"] = np.ascontiguousarray(m.q, dtype=np.float32)
            packing = "none"
        else:
            tensors[f"{name}.q"] = _pack_fn(m)[0](m.q)
            packing = PACKING
        tensors[f"{name}.scale"] = np.asarray(m.scale, dtype=np.float32)
        entries[f"{name}.q"] = {"bits": m.bits, "storage_bits": sb, "scheme": m.scheme, "packing": packing,
                                "logical_shape": list(m.shape), "scale": f"{name}.scale"}
    for l, layer in enumerate(w.layers):
        tensors[f"layers.{l}.bias"] = np.asarray(layer.bias, dtype=np.float32)
    tensors["decoder_bias"] = np.asarray(w.decoder_bias, dtype=np.float32)
    manifest = {
        "target": target,
        "model": {"kind": MODEL_KIND, "vocab_size": w.vocab_size, "emb_size": w.embedding.shape[1],
                  "hidden_size": w.hidden_size, "num_layers": w.num_layers, "tied": w.tied,
                  "gate_order": "ifgo"},
        "gates": {"hard": list(w.hard_gates)},
        "activation_quant": None if w.act_bits is None else {
            "bits": w.act_bits, "scheme": "dynamic-per-vector-symmetric", "qmax": 127},
        "vocab": VOCAB_FILE,
        "validation": dict(validation or {}),
        "meta": dict(meta or {}),
        "extra": dict(w.extra),
        "tensors": entries,
    }
    files = {VOCAB_FILE: ("\n".join(vocab) + "\n").encode("utf-8")}
    return write_artifact(path, manifest, tensors, files, format_version=1)


def _need(cond, msg):
    if not cond:
        raise ArtifactError(msg)


def _read_matrix(man: dict, tensors: dict, name: str) -> QMatrix:
    key = f"{name}.q"
    _need(key in man["tensors"], f"manifest.json: tensor {key!r} is missing")
    entry = man["tensors"][key]
    try:
        scheme, bits = entry["scheme"], int(entry["bits"])
        shape = tuple(int(s) for s in entry["logical_shape"])
        scale = tensors[entry["scale"]]
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ArtifactError(f"manifest.json: tensor entry {key!r} is incomplete ({exc!r})") from exc
    data = tensors[key]
    try:
        if scheme == "float":
            _need(entry.get("packing") == "none", f"manifest.json: {key}: float matrix must have packing 'none'")
            q = np.array(data, dtype=np.float32)
            _need(q.shape == shape, f"{key}: shape {q.shape} differs from logical_shape {list(shape)}")
        else:
            _need(entry.get("packing") == PACKING,
                  f"manifest.json: {key}: unknown packing {entry.get('packing')!r} (expected {PACKING!r})")
            probe = QMatrix(np.zeros((1, 1), np.int8) + (1 if scheme == "binary" else 0),
                            np.ones(1, np.float32), bits, scheme)
            _need(storage_bits(probe) == entry.get("storage_bits"),
                  f"manifest.json: {key}: storage_bits {entry.get('storage_bits')} does not match "
                  f"{bits}-bit {scheme}")
            q = _pack_fn(probe)[1](data, shape)
        return QMatrix(q, np.array(scale, dtype=np.float32), bits, scheme)
    except ArtifactError:
        raise
    except ValueError as exc:
        raise ArtifactError(f"{key}: {exc}") from exc


def read_v1(path):
    """``(graph, vocab, manifest)`` of a format-1 artifact."""
    from ..graph import GraphError
    from ..graphio import check_finite

    w, vocab, man = read_lm_artifact(path)
    graph = w.to_graph()
    try:
        check_finite(graph)
    except GraphError as exc:
        raise ArtifactError(f"weights.safetensors: {exc}") from None
    return graph, vocab, man


def read_lm_artifact(path) -> tuple[QuantLMWeights, list[str], dict]:
    """Load, verify and unpack an LM artifact: ``(QuantLMWeights, vocab, manifest)``."""
    man, tensors, files = load_artifact(path)
    model = man.get("model")
    _need(isinstance(model, dict) and model.get("kind") == MODEL_KIND,
          f"manifest.json: model kind is {model.get('kind') if isinstance(model, dict) else None!r}, "
          f"expected {MODEL_KIND!r}")
    vfile = man.get("vocab", VOCAB_FILE)
    _need(vfile in files, f"{vfile}: vocabulary file is not listed in the manifest")
    try:
        vocab = files[vfile].decode("utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{vfile}: not UTF-8 ({exc})") from exc
    if vocab and vocab[-1] == "":
        vocab.pop()
    try:
        L = int(model["num_layers"])
        hard = tuple(man.get("gates", {}).get("hard", ()))
        aq = man.get("activation_quant")
        act_bits = None if aq is None else int(aq["bits"])
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:
        raise ArtifactError(f"manifest.json: incomplete model description ({exc!r})") from exc
    _need(0 < L <= 64, f"manifest.json: model.num_layers {L} is out of range")
    _need(set(hard) <= set(GATE_NAMES), f"manifest.json: unknown hard gates {sorted(set(hard) - set(GATE_NAMES))}")
    layers = []
    for l in range(L):
        _need(f"layers.{l}.bias" in tensors, f"weights.safetensors: tensor 'layers.{l}.bias' is missing")
        layers.append(QLSTMLayer(_read_matrix(man, tensors, f"layers.{l}.w_ih"),
                                 _read_matrix(man, tensors, f"layers.{l}.w_hh"),
                                 np.array(tensors[f"layers.{l}.bias"], dtype=np.float32)))
    tied = bool(model.get("tied"))
    _need("decoder_bias" in tensors, "weights.safetensors: tensor 'decoder_bias' is missing")
    try:
        w = QuantLMWeights(
            embedding=_read_matrix(man, tensors, "embedding"), layers=layers,
            decoder=None if tied else _read_matrix(man, tensors, "decoder"),
            decoder_bias=np.array(tensors["decoder_bias"], dtype=np.float32),
            hard_gates=hard, act_bits=act_bits, extra=dict(man.get("extra") or {}))
    except ArtifactError:
        raise
    except ValueError as exc:
        raise ArtifactError(f"manifest.json: {exc}") from exc
    check_lm_shapes(w, len(vocab), err=ArtifactError)
    for key, want in (("vocab_size", w.vocab_size), ("emb_size", w.embedding.shape[1]),
                      ("hidden_size", w.hidden_size)):
        _need(model.get(key) == want, f"manifest.json: model.{key} is {model.get(key)}, the weights say {want}")
    return w, vocab, man
