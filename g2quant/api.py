"""``g2quant.quantize(model, bits=4, ...)``: float model in, ``QuantizedModel`` out.

Accepts any ``torch.nn.Module`` containing layers with a quantize handler (``nn.LSTM`` /
``G2LSTM`` / ``nn.Linear`` / ``nn.Embedding`` built in; also models g2quant did not define); the
caller's model is never modified. Handlers are registered by module type
(``@register_quantize_handler``, torchao's ``register_quantize_module_handler`` is the model); a
layer with parameters but no handler stays float, with a warning naming it.
"""
from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Iterable, Mapping

from torch import nn

from .nn.g2lstm import G2LSTM
from .nn.qmodules import QuantEmbedding, QuantG2LSTM, QuantLinear
from .nn.quant import IntWeightQuant, WeightQuantizer, make_weight_quantizer
from .targets.ops import LSTM_GATES

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
    """How to quantize a model. Bits: 2..8, "binary" (1), "ternary", or >= 16 (keep float).

    Widths, most specific first: ``layer_bits`` (a map from parameter names such as
    ``"rnn.weight_hh_l1"`` or module names such as ``"decoder"`` — exact names or globs like
    ``"rnn.*_l1"`` — to widths; an exact name beats a glob, a parameter beats its module, among
    globs the last match wins), then ``embedding_bits`` / ``linear_bits`` by layer kind, then
    ``bits``. ``skip`` keeps whole modules float, activations included (a shorthand)."""

    bits: Bits = 4                       # default width (LSTM weights W_ih, W_hh, and every other layer)
    embedding_bits: Bits = None          # None: same as ``bits``
    linear_bits: Bits = None             # nn.Linear layers (decoder); None: same as ``bits``
    layer_bits: Mapping[str, Bits] = field(default_factory=dict)   # per module / parameter, names or globs
    per_channel: bool = True             # one scale per output row (else per tensor)
    weight_scaling: str = "mse"          # initial scales: "max" or "mse" (per-row clip search)
    act_bits: int | None = 8             # int8 inputs to every matrix product, or None (float)
    act_mode: str = "dynamic"            # "dynamic" (per vector, the CPU engine) or "static" (calibrated)
    observer: str = "percentile"         # static ranges: "minmax", "percentile", "mse"
    hard_gates: str = ""                 # gates evaluated as 1[a > 0], e.g. "if"
    skip: tuple[str, ...] = ()           # module names (model.named_modules()) kept in float
    method: str = "ptq"                  # "ptq" (frozen scales) or "qat" (learnable scales, train mode)

    def __post_init__(self):
        bits = self.bits
        if isinstance(bits, Mapping):                       # quantize(model, bits={...}) shorthand
            object.__setattr__(self, "layer_bits", {**dict(bits), **dict(self.layer_bits)})
            bits = 4
        object.__setattr__(self, "bits", _check_bits(bits, "bits"))
        if self.bits is None:
            raise ValueError("bits=None is invalid: give 1..8, 'binary', 'ternary' or >= 16")
        object.__setattr__(self, "embedding_bits", _check_bits(self.embedding_bits, "embedding_bits"))
        object.__setattr__(self, "linear_bits", _check_bits(self.linear_bits, "linear_bits"))
        if not isinstance(self.layer_bits, Mapping):
            raise ValueError(f"layer_bits must be a mapping of layer/parameter names to widths, got "
                             f"{type(self.layer_bits).__name__}")
        lb = {}
        for k, v in self.layer_bits.items():
            if not isinstance(k, str) or not k:
                raise ValueError(f"layer_bits keys must be non-empty names or globs, got {k!r}")
            lb[k] = _check_bits(v, f"layer_bits[{k!r}]")
            if lb[k] is None:
                raise ValueError(f"layer_bits[{k!r}]=None is invalid: give a width")
        object.__setattr__(self, "layer_bits", lb)
        if self.weight_scaling not in ("max", "mse"):
            raise ValueError(f"weight_scaling must be 'max' or 'mse', got {self.weight_scaling!r}")
        if self.act_bits not in (None, 8):
            raise ValueError(f"act_bits must be 8 or None, got {self.act_bits!r}")
        if self.act_mode not in ("dynamic", "static"):
            raise ValueError(f"act_mode must be 'dynamic' or 'static', got {self.act_mode!r}")
        from .calibration.observers import OBSERVERS
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {sorted(OBSERVERS)}, got {self.observer!r}")
        letters = _gate_letters()
        if not isinstance(self.hard_gates, str) or set(self.hard_gates) - set(letters):
            raise ValueError(f"hard_gates may contain only the gate letters of the layer families "
                             f"({', '.join(letters)}), got {self.hard_gates!r}")
        object.__setattr__(self, "hard_gates", "".join(g for g in letters if g in self.hard_gates))
        if isinstance(self.skip, str):
            object.__setattr__(self, "skip", (self.skip,))
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.method not in ("ptq", "qat"):
            raise ValueError(f"method must be 'ptq' or 'qat', got {self.method!r}")

    def bits_for(self, kind: str) -> Bits:
        """The width of a layer kind ("lstm", "embedding", "linear") without per-layer overrides."""
        override = {"embedding": self.embedding_bits, "linear": self.linear_bits}.get(kind)
        return self.bits if override is None else override

    def bits_for_param(self, module: str, param: str, kind: str) -> Bits:
        """The width of parameter ``param`` (full name, e.g. ``"rnn.weight_hh_l1"``) of ``module``."""
        lb = self.layer_bits
        for name in (param, module):
            if name in lb:
                return lb[name]
            hits = [k for k in lb if _is_glob(k) and fnmatch.fnmatchcase(name, k)]
            if hits:
                return lb[hits[-1]]
        return self.bits_for(kind)

    def act(self) -> dict | None:
        return None if self.act_bits is None else {"mode": self.act_mode, "observer": self.observer}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skip"] = list(self.skip)
        d["layer_bits"] = dict(self.layer_bits)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown QuantConfig fields {sorted(set(d) - known)}")
        return cls(**{**d, "skip": tuple(d.get("skip", ()))})


def _gate_letters() -> str:
    """Every gate letter some layer family can evaluate hard, in family order ("ifo" for the LSTM)."""
    from .targets.graph import OPS, get_op
    get_op("lstm")                                   # loads every op module
    out = ""
    for spec in OPS.values():
        out += "".join(g for g in spec.gates if g not in out)
    return out


def _is_glob(name: str) -> bool:
    return any(ch in name for ch in "*?[")


# ----------------------------------------------------------------------------- handler registry

@dataclass
class QuantizeContext:
    """What a quantize handler gets: the config, the module's name, and ``wquant(param_name,
    param, kind)`` which returns the (shared, for tied weights) quantizer of a weight or None."""

    config: QuantConfig
    name: str
    wquant: Callable
    used_gates: set = field(default_factory=set)      # a handler adds its family's gate letters


HANDLERS: dict[type, Callable] = {}


def register_quantize_handler(*module_types: type):
    """``@register_quantize_handler(nn.Foo, G2Foo)`` on ``fn(module, ctx: QuantizeContext) -> nn.Module``
    (the quantized replacement). The most specific registered class of a module wins."""
    def deco(fn):
        for t in module_types:
            HANDLERS[t] = fn
        return fn
    return deco


def handler_for(m: nn.Module) -> Callable | None:
    for cls in type(m).__mro__:
        if cls in HANDLERS:
            return HANDLERS[cls]
    return None


@register_quantize_handler(nn.LSTM, G2LSTM)
def _quantize_lstm(m, ctx: QuantizeContext) -> nn.Module:
    new = QuantG2LSTM.convert(m, lambda: None, ctx.config.act())
    for names in new._flat_names:
        for n in names[:2]:
            q = ctx.wquant(n, getattr(new, n), "lstm")
            if q is not None:
                new.wq[n] = q
    gates = set(ctx.config.hard_gates) & set(LSTM_GATES)       # the letters of this family
    ctx.used_gates.update(LSTM_GATES)
    if gates:
        new.hard_gates = frozenset(gates) | new.hard_gates
    return new


@register_quantize_handler(nn.Linear)
def _quantize_linear(m, ctx: QuantizeContext) -> nn.Module:
    return QuantLinear(m, ctx.wquant("weight", m.weight, "linear"), ctx.config.act())


@register_quantize_handler(nn.Embedding)
def _quantize_embedding(m, ctx: QuantizeContext) -> nn.Module:
    return QuantEmbedding(m, ctx.wquant("weight", m.weight, "embedding"))


def _quantizable(m: nn.Module) -> bool:
    return handler_for(m) is not None


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

    def size_bytes(self, *, target: str = "cpu", dense: bool = False) -> int:
        """Deployable size in bytes, as ``target`` stores the lowered parameters (its own size rule:
        for ``cpu``, 1/2/4/8-bit rows padded to whole bytes + float32 row scales, float32 biases —
        an LSTM layer's two bias vectors are stored summed), plus 4 bytes per value of any
        parameter no layer lowers. ``dense=True``: exactly the declared bits per weight instead."""
        from .lower import lower_params
        from .targets.base import get_target
        from .targets.qweights import QMatrix

        params, covered = lower_params(self.model)
        if dense:
            total = 0
            for p in params.values():
                if isinstance(p, QMatrix) and p.scheme != "float":
                    total += math.ceil(p.q.size * p.bits / 8) + 4 * p.shape[0]
                else:
                    total += 4 * int(p.q.size if isinstance(p, QMatrix) else p.size)
        else:
            total = get_target(target).size_bytes(params)
        for p in self._model_parameters():
            if id(p) not in covered:
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
        """Evaluate these gates as ``1[a > 0]`` in every recurrent layer (each takes its family's letters)."""
        from .nn.g2gru import G2GRU
        for m in self.model.modules():
            if isinstance(m, G2LSTM):
                m.hard_gates = frozenset(set(gates) & set("ifo"))
            elif isinstance(m, G2GRU):
                m.hard_gates = frozenset(set(gates) & set("rz"))

    def evaluate(self, data, *, batch_size: int = 10, bptt: int = 35, progress: bool = False) -> dict:
        """Perplexity on a token stream (for language models), hidden state carried across batches."""
        from .evaluate import lm_perplexity
        return lm_perplexity(self, data, batch_size=batch_size, bptt=bptt, progress=progress)

    def export(self, path, target: str = "cpu", *, vocab: Iterable[str] | None = None,
               validation: dict | None = None, check: bool = True, example_input=None, **target_options):
        """Write a deployable artifact directory (``NAME.g2q``) for ``target``; see ``g2quant.export``.
        ``example_input``: an input of ``forward`` used to capture the wiring (default: guessed);
        other keywords go to the target's writer (e.g. ``weights="nbits"`` for onnx)."""
        from .export import export_model
        return export_model(self, path, target=target, vocab=vocab, validation=validation, check=check,
                            example_input=example_input, target_options=target_options)


def quantize(model: nn.Module, bits: Bits | Mapping = 4, *, calib=None, method: str = "ptq",
             config: QuantConfig | None = None, progress: bool = False, **options) -> QuantizedModel:
    """Quantize a float model; the caller's model is left untouched.

    Args:
        model: any ``nn.Module`` containing layers with a quantize handler (``nn.LSTM`` /
            ``G2LSTM`` / ``nn.Linear`` / ``nn.Embedding``).
        bits: the default width (2..8, "binary", "ternary", >= 16 = float), or a per-layer map
            ``{"rnn": 4, "decoder": 8, "rnn.weight_hh_l1": 2}`` (names or globs; see
            :class:`QuantConfig`); other options (``layer_bits``, ``embedding_bits``,
            ``linear_bits``, ``per_channel``, ``act_bits``, ``act_mode``, ``observer``,
            ``hard_gates``, ``skip``, ``weight_scaling``) as in :class:`QuantConfig`.
        calib: iterable of input batches (tensors or tuples of forward arguments). PTQ =
            quantize + calibrate; required for ``act_mode="static"``.
        method: "ptq" (frozen scales, eval mode) or "qat" (learnable scales, train mode: fine-tune it).
    """
    from .families import load_families
    load_families()
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

    def inside_handled(n: str) -> bool:
        return any(n.startswith(p + ".") for p, pm in named.items() if p and _quantizable(pm)) or \
            (n != "" and _quantizable(model))

    targets = [n for n, m in named.items() if _quantizable(m) and not skipped(n) and not inside_handled(n)]
    for n, m in named.items():
        own = list(m.parameters(recurse=False))
        if own and not _quantizable(m) and not inside_handled(n) and not skipped(n):
            warnings.warn(f"quantize(): layer {n or '<model>'!r} ({type(m).__name__}) has no quantize handler and "
                          f"stays float; handled layer types: {sorted(t.__name__ for t in HANDLERS)}", stacklevel=2)
    if not targets:
        raise ValueError("model has nothing to quantize: it contains no " +
                         ", ".join(sorted(t.__name__ for t in HANDLERS)) +
                         (f" outside skip={list(config.skip)}" if config.skip else ""))
    if config.act_mode == "static" and config.act_bits and calib is None and config.method == "ptq":
        raise ValueError("act_mode='static' needs calibration data: pass calib=<iterable of batches>")
    names = set(targets) | {f"{t}.{pn}" if t else pn for t in targets for pn, _ in named[t].named_parameters()}
    for key in config.layer_bits:
        if not (key in names or (_is_glob(key) and any(fnmatch.fnmatchcase(n, key) for n in names))):
            raise ValueError(f"layer_bits names {key!r}, which matches no quantized layer or parameter; "
                             f"layers: {sorted(targets)}")
    for t in targets:
        for pn, p in named[t].named_parameters():
            if not p.detach().isfinite().all():
                raise ValueError(f"parameter {(t + '.' if t else '') + pn!r} contains NaN or infinite values; "
                                 "a model with non-finite weights cannot be quantized")

    inner = copy.deepcopy(model)
    qat = config.method == "qat"
    shared: dict[int, WeightQuantizer | None] = {}   # tied parameters share one quantizer

    def make_wquant(module_name: str):
        def wquant(param_name: str, param: nn.Parameter, kind: str):
            if id(param) in shared:
                return shared[id(param)]
            full = f"{module_name}.{param_name}" if module_name else param_name
            q = make_weight_quantizer(config.bits_for_param(module_name, full, kind), per_channel=config.per_channel,
                                      learn_scale=qat)
            if isinstance(q, IntWeightQuant):
                q.init_scale(param, config.weight_scaling)
            shared[id(param)] = q
            return q
        return wquant

    inner_named = dict(inner.named_modules())
    families: set = set()
    for name in targets:
        m = inner_named[name]
        new = handler_for(m)(m, QuantizeContext(config, name, make_wquant(name), families))
        if name == "":          # the model itself is a single handled layer
            inner = new
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(inner_named[parent_name], attr, new)

    stray = set(config.hard_gates) - families
    if stray:
        raise ValueError(f"hard_gates={config.hard_gates!r}: {''.join(sorted(stray))!r} match no gate of this model's "
                         f"recurrent layers ({', '.join(sorted(families)) or 'none'})")
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
