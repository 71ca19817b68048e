"""``g2quant.quantize(model, bits=4, ...)``: float model in, ``QuantizedModel`` out.

Accepts any ``torch.nn.Module`` containing ``nn.LSTM`` / ``G2LSTM`` / ``nn.Linear`` /
``nn.Embedding`` (also models g2quant did not define); the caller's model is never modified.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields
from typing import Iterable

from torch import nn

from .nn.g2lstm import G2LSTM
from .nn.qmodules import QuantEmbedding, QuantG2LSTM, QuantLinear
from .nn.quant import IntWeightQuant, WeightQuantizer, make_weight_quantizer

Bits = int | str | None
_SCHEME_BITS = {"binary": 1, "ternary": 2}


def _check_bits(value, name: str) -> Bits:
    if value is None:
        return None
    if isinstance(value, str):
        if value in _SCHEME_BITS:
            return value
        if value.isdigit():
            value = int(value)
        else:
            raise ValueError(f"{name}={value!r} is invalid: use 1..8, 'binary', 'ternary' or >= 16 (keep float)")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} is invalid: use 1..8, 'binary', 'ternary' or >= 16 (keep float)")
    if value == 1:
        return "binary"
    if 2 <= value <= 8 or value >= 16:
        return value
    raise ValueError(f"{name}={value} is invalid: weights can have 1..8 bits ('binary'/'ternary' too), "
                     f"or >= 16 to keep a layer in float")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model. Bits: 2..8, "binary" (1), "ternary", or >= 16 (float)."""

    bits: Bits = 4                       # LSTM weights (W_ih, W_hh)
    embedding_bits: Bits = None          # None: same as ``bits``
    linear_bits: Bits = None             # nn.Linear layers (decoder); None: same as ``bits``
    per_channel: bool = True             # one scale per output row (else per tensor)
    weight_scaling: str = "mse"          # initial scales: "max" or "mse" (per-row clip search)
    act_bits: int | None = 8             # int8 inputs to every matrix product, or None (float)
    act_mode: str = "dynamic"            # "dynamic" (per vector, the CPU engine) or "static" (calibrated)
    observer: str = "percentile"         # static ranges: "minmax", "percentile", "mse"
    hard_gates: str = ""                 # gates evaluated as 1[a > 0], e.g. "if"
    skip: tuple[str, ...] = ()           # module names (model.named_modules()) kept in float
    method: str = "ptq"                  # "ptq" (frozen scales) or "qat" (learnable scales, train mode)

    def __post_init__(self):
        object.__setattr__(self, "bits", _check_bits(self.bits, "bits"))
        if self.bits is None:
            raise ValueError("bits=None is invalid: give 1..8, 'binary', 'ternary' or >= 16")
        object.__setattr__(self, "embedding_bits", _check_bits(self.embedding_bits, "embedding_bits"))
        object.__setattr__(self, "linear_bits", _check_bits(self.linear_bits, "linear_bits"))
        if self.weight_scaling not in ("max", "mse"):
            raise ValueError(f"weight_scaling must be 'max' or 'mse', got {self.weight_scaling!r}")
        if self.act_bits not in (None, 8):
            raise ValueError(f"act_bits must be 8 or None, got {self.act_bits!r}")
        if self.act_mode not in ("dynamic", "static"):
            raise ValueError(f"act_mode must be 'dynamic' or 'static', got {self.act_mode!r}")
        from .calibration.observers import OBSERVERS
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {sorted(OBSERVERS)}, got {self.observer!r}")
        hard = "".join(g for g in "ifo" if g in self.hard_gates)
        if set(self.hard_gates) - set("ifo"):
            raise ValueError(f"hard_gates may contain only the letters i, f, o; got {self.hard_gates!r}")
        object.__setattr__(self, "hard_gates", hard)
        if isinstance(self.skip, str):
            object.__setattr__(self, "skip", (self.skip,))
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.method not in ("ptq", "qat"):
            raise ValueError(f"method must be 'ptq' or 'qat', got {self.method!r}")

    def bits_for(self, kind: str) -> Bits:
        override = {"lstm": None, "embedding": self.embedding_bits, "linear": self.linear_bits}[kind]
        return self.bits if override is None else override

    def act(self) -> dict | None:
        return None if self.act_bits is None else {"mode": self.act_mode, "observer": self.observer}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown QuantConfig fields {sorted(set(d) - known)}")
        return cls(**{**d, "skip": tuple(d.get("skip", ()))})


def _quantizable(m: nn.Module) -> bool:
    return isinstance(m, (nn.LSTM, G2LSTM, nn.Linear, nn.Embedding))


class QuantizedModel(nn.Module):
    """A fake-quantized copy of a float model; runs like the original (``forward`` delegates)."""

    def __init__(self, model: nn.Module, config: QuantConfig):
        super().__init__()
        self.model = model
        self.config = config

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # -- introspection ---------------------------------------------------------------------
    def weight_quantizers(self) -> list[tuple[str, nn.Parameter, WeightQuantizer | None]]:
        """Every weight matrix of the quantized layers (tied weights once) and its quantizer."""
        out, seen = [], set()
        for name, m in self.model.named_modules():
            items = []
            if isinstance(m, QuantG2LSTM):
                for names in m._flat_names:
                    for n in names[:2]:
                        items.append((f"{name}.{n}", getattr(m, n), m.wq[n] if n in m.wq else None))
            elif isinstance(m, (QuantLinear, QuantEmbedding)):
                items.append((f"{name}.weight", m.weight, m.wq))
            for full, p, q in items:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((full, p, q))
        return out

    def size_bytes(self, *, dense: bool = False) -> int:
        """Deployable size in bytes: packed integers + float32 per-row scales + every other
        parameter kept in float32 (biases, unquantized layers). Packed as the CPU artifact
        stores them (1/2/4/8-bit rows padded to whole bytes), or at exactly the declared bits
        per weight with ``dense=True``."""
        from .targets.pack import packed_shape
        from .targets.qweights import storage_width

        total, counted = 0, set()
        for _, p, q in self.weight_quantizers():
            counted.add(id(p))
            if q is None:
                total += 4 * p.numel()
                continue
            rows, cols = p.shape[0], p[0].numel()
            if dense:
                total += math.ceil(rows * cols * q.bits / 8)
            else:
                r, w = packed_shape((rows, cols), storage_width(q.bits, q.scheme))
                total += r * w
            total += 4 * rows     # one float32 scale per row (per-tensor scales are stored per row too)
        for p in self._model_parameters():
            if id(p) not in counted:
                total += 4 * p.numel()
        return total

    def _model_parameters(self):
        """Parameters of the wrapped model, excluding the quantizers' own (scales), tied once."""
        own = {id(p) for m in self.model.modules() if isinstance(m, WeightQuantizer) for p in m.parameters()}
        seen = set()
        for p in self.model.parameters():
            if id(p) not in own and id(p) not in seen:
                seen.add(id(p))
                yield p

    def float_size_bytes(self) -> int:
        """Size of the float32 model this was made from."""
        return sum(4 * p.numel() for p in self._model_parameters())

    def set_hard_gates(self, gates: str) -> None:
        for m in self.model.modules():
            if isinstance(m, G2LSTM):
                m.hard_gates = frozenset(gates)

    def evaluate(self, data, *, batch_size: int = 10, bptt: int = 35, progress: bool = False) -> dict:
        """Perplexity on a token stream (for language models), hidden state carried across batches."""
        from .evaluate import lm_perplexity
        return lm_perplexity(self, data, batch_size=batch_size, bptt=bptt, progress=progress)

    def export(self, path, target: str = "cpu", *, vocab: Iterable[str] | None = None,
               validation: dict | None = None, check: bool = True):
        """Write a deployable artifact directory (``NAME.g2q``). See ``g2quant.export``."""
        from .export import export_model
        return export_model(self, path, target=target, vocab=vocab, validation=validation, check=check)


def quantize(model: nn.Module, bits: Bits = 4, *, calib=None, method: str = "ptq",
             config: QuantConfig | None = None, progress: bool = False, **options) -> QuantizedModel:
    """Quantize a float model; the caller's model is left untouched.

    Args:
        model: any ``nn.Module`` containing ``nn.LSTM`` / ``G2LSTM`` / ``nn.Linear`` / ``nn.Embedding``.
        bits: LSTM weight bits (2..8, "binary", "ternary"); other options (``embedding_bits``,
            ``linear_bits``, ``per_channel``, ``act_bits``, ``act_mode``, ``observer``,
            ``hard_gates``, ``skip``, ``weight_scaling``) as in :class:`QuantConfig`.
        calib: iterable of input batches (tensors or tuples of forward arguments). PTQ =
            quantize + calibrate; required for ``act_mode="static"``.
        method: "ptq" (frozen scales, eval mode) or "qat" (learnable scales, train mode: fine-tune it).
    """
    if config is None:
        config = QuantConfig(bits=bits, method=method, **options)
    elif options:
        raise ValueError(f"pass either config= or keyword options, not both (got {sorted(options)})")
    if not isinstance(model, nn.Module):
        raise ValueError(f"quantize() needs a torch.nn.Module, got {type(model).__name__}")
    named = dict(model.named_modules())
    unknown = [s for s in config.skip if s not in named or s == ""]
    if unknown:
        avail = [n for n, m in named.items() if _quantizable(m)]
        raise ValueError(f"skip names unknown layers {unknown}; quantizable layers are {avail}")

    def skipped(name: str) -> bool:
        return any(name == s or name.startswith(s + ".") for s in config.skip)

    targets = [n for n, m in named.items() if _quantizable(m) and not skipped(n)
               and not any(n.startswith(p + ".") for p, pm in named.items() if p and _quantizable(pm))]
    if not targets:
        raise ValueError("model has nothing to quantize: it contains no nn.LSTM, G2LSTM, nn.Linear or "
                         "nn.Embedding" + (f" outside skip={list(config.skip)}" if config.skip else ""))
    if config.act_mode == "static" and config.act_bits and calib is None and config.method == "ptq":
        raise ValueError("act_mode='static' needs calibration data: pass calib=<iterable of batches>")

    inner = copy.deepcopy(model)
    qat = config.method == "qat"
    shared: dict[int, WeightQuantizer | None] = {}   # tied parameters share one quantizer

    def wquant(param: nn.Parameter, kind: str):
        if id(param) in shared:
            return shared[id(param)]
        q = make_weight_quantizer(config.bits_for(kind), per_channel=config.per_channel, learn_scale=qat)
        if isinstance(q, IntWeightQuant):
            q.init_scale(param, config.weight_scaling)
        shared[id(param)] = q
        return q

    inner_named = dict(inner.named_modules())
    for name in targets:
        m = inner_named[name]
        if isinstance(m, (nn.LSTM, G2LSTM)):
            new = QuantG2LSTM.convert(m, lambda: None, config.act())
            for names in new._flat_names:
                for n in names[:2]:
                    q = wquant(getattr(new, n), "lstm")
                    if q is not None:
                        new.wq[n] = q
            if config.hard_gates:
                new.hard_gates = frozenset(config.hard_gates) | new.hard_gates
        elif isinstance(m, nn.Linear):
            new = QuantLinear(m, wquant(m.weight, "linear"), config.act())
        else:
            new = QuantEmbedding(m, wquant(m.weight, "embedding"))
        if name == "":          # the model itself is an LSTM / Linear / Embedding
            inner = new
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(inner_named[parent_name], attr, new)

    qmodel = QuantizedModel(inner, config)
    qmodel.train(qat)
    if not qat:
        for p in qmodel.parameters():
            p.requires_grad_(False)
    if calib is not None:
        from .calibration.calibrate import calibrate
        calibrate(qmodel, calib, progress=progress)
        qmodel.train(qat)
    return qmodel

