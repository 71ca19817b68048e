"""Hardware-aware bit allocation: a width per weight matrix, chosen under a size or latency budget.

    alloc = allocate(model, calib_tokens, budget_bytes=2_500_000, target="cpu")
    q = g2quant.quantize(model, bits=alloc.bits_map())

1. **Blocks**: every weight matrix a quantize handler covers (``weight_ih_l0``, ``decoder.weight``,
   ...); with ``granularity="gate"`` the LSTM matrices are split into their i, f, g, o row blocks
   (sensitivity analysis only: the artifact and the CPU kernels carry one width per matrix).
2. **Sensitivity**: for each block and candidate width, the increase of the mean loss on calibration
   tokens when only that block is quantized (all other weights float, activations int8 as deployed)
   — measured directly, one evaluation per (block, width).
3. **Cost**: bytes exactly as the target stores the block (its ``size_bytes`` rule, scales
   included), or latency from the target's measured per-width kernel profile
   (``g2quant.profiles``).
4. **Solver**: an exact multiple-choice knapsack by Pareto-front merging: the fronts of all
   blocks are combined pairwise keeping only non-dominated (cost, sensitivity) points, so the whole
   front of the model is known and any budget is answered exactly.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

WIDTHS = (8, 4, 3, 2, "ternary", "binary")
GATE_ORDER = "ifgo"


@dataclass(frozen=True)
class Block:
    name: str                   # e.g. "rnn.weight_hh_l1" or "rnn.weight_hh_l1[f]"
    param: str                  # the parameter's full name
    rows: tuple[int, int]       # row range inside the parameter
    cols: int
    kind: str                   # "lstm", "linear", "embedding", ...

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows[1] - self.rows[0], self.cols)


def weight_blocks(model: nn.Module, granularity: str = "matrix") -> list[Block]:
    """The weight blocks of every layer a quantize handler covers (tied weights once)."""
    from .api import _quantizable
    from .families import load_families
    if granularity not in ("matrix", "gate"):
        raise ValueError(f"granularity must be 'matrix' or 'gate', got {granularity!r}")
    load_families()
    out, seen = [], set()
    for mname, m in model.named_modules():
        if not _quantizable(m) or any(b.param.startswith(mname + ".") for b in out if mname):
            continue
        kind = {"Embedding": "embedding", "Linear": "linear"}.get(type(m).__name__,
                                                                  "gru" if "GRU" in type(m).__name__ else "lstm")
        for pname, p in m.named_parameters(recurse=False):
            if p.dim() != 2 or id(p) in seen or not pname.startswith(("weight", "weight_")):
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            R, K = p.shape
            if granularity == "gate" and kind == "lstm" and R % 4 == 0:
                H = R // 4
                out += [Block(f"{full}[{g}]", full, (k * H, (k + 1) * H), K, kind) for k, g in enumerate(GATE_ORDER)]
            else:
                out.append(Block(full, full, (0, R), K, kind))
    if not out:
        raise ValueError("the model has no weight matrix that quantize() handles")
    return out


# ----------------------------------------------------------------------------- sensitivity

def _mean_loss(model, tokens: torch.Tensor, batch_size: int, bptt: int) -> float:
    from .evaluate import lm_perplexity
    return lm_perplexity(model, tokens, batch_size=batch_size, bptt=bptt)["loss"]


def _width_label(w) -> str:
    return str(w)


def sensitivity(model: nn.Module, calib_tokens, *, widths=WIDTHS, granularity: str = "matrix",
                batch_size: int = 10, bptt: int = 35, loss_fn=None, progress=None, hard_gates: str = "") -> dict:
    """``{"blocks": [...], "base_loss": L0, "delta": {block: {width: ΔL}}, "seconds": s}``.

    The reference is the model with float weights and the deployed int8 activations
    (``quantize(model, bits=16)``); each entry quantizes only that block's rows to that width
    with the same quantizer ``quantize()`` would use. ``loss_fn(qmodel) -> float`` replaces the
    default LM loss (mean cross-entropy on ``calib_tokens``). ``hard_gates`` (e.g. ``"if"``) measures
    with the gates deployed as ``1[a > 0]``, as the model will run."""
    from .api import quantize
    from .nn.quant import IntWeightQuant, make_weight_quantizer

    t0 = time.perf_counter()
    blocks = weight_blocks(model, granularity)
    q = quantize(model, bits=16, hard_gates=hard_gates)   # float weights, A8 activations
    q.eval()
    tokens = torch.as_tensor(np.asarray(calib_tokens))
    evaluate = loss_fn or (lambda m: _mean_loss(m, tokens, batch_size, bptt))
    params = dict(q.model.named_parameters())
    base = evaluate(q)
    delta: dict = {}
    for i, b in enumerate(blocks):
        p = params[b.param]
        orig = p.detach().clone()
        r0, r1 = b.rows
        delta[b.name] = {}
        for w in widths:
            quantizer = make_weight_quantizer(w)
            rows = orig[r0:r1]
            if isinstance(quantizer, IntWeightQuant):
                quantizer.init_scale(rows, "mse")
            with torch.no_grad():
                p[r0:r1] = quantizer(rows)
            delta[b.name][_width_label(w)] = evaluate(q) - base
            with torch.no_grad():
                p.copy_(orig)
        if progress is not None:
            progress(i + 1, len(blocks))
    return {"blocks": [asdict(b) for b in blocks], "base_loss": base, "delta": delta, "widths": [str(w) for w in widths],
            "granularity": granularity, "hard_gates": hard_gates, "seconds": time.perf_counter() - t0,
            "calib_tokens": int(tokens.numel())}


# ----------------------------------------------------------------------------- cost

def _qmatrix(shape, w):
    from .targets.qweights import QMatrix
    R, K = shape
    if w == "binary":
        return QMatrix(np.ones((R, K), np.int8), np.ones(R, np.float32), 1, "binary")
    if w == "ternary":
        return QMatrix(np.zeros((R, K), np.int8), np.ones(R, np.float32), 2, "ternary")
    if int(w) >= 16:
        return QMatrix(np.zeros((R, K), np.float32), np.ones(R, np.float32), 32, "float")
    return QMatrix(np.zeros((R, K), np.int8), np.ones(R, np.float32), int(w), "int")


def block_bytes(block: Block | dict, width, target: str = "cpu") -> int:
    """Bytes of ``block`` at ``width`` exactly as ``target`` stores it (row scales included)."""
    from .targets.base import get_target
    shape = block.shape if isinstance(block, Block) else (block["rows"][1] - block["rows"][0], block["cols"])
    return get_target(target).size_bytes({"b": _qmatrix(shape, width)})


# ----------------------------------------------------------------------------- solver

@dataclass
class Front:
    """The Pareto front of (cost, sensitivity) over whole allocations; ``choices[i]`` maps blocks
    to widths for point ``i``."""

    cost: list[float]
    sens: list[float]
    choices: list[dict]

    def best_within(self, budget: float) -> int:
        ok = [i for i, c in enumerate(self.cost) if c <= budget]
        if not ok:
            raise ValueError(f"no allocation fits the budget {budget:g}; the smallest costs {min(self.cost):g}")
        return min(ok, key=lambda i: (self.sens[i], self.cost[i]))


def _prune(points):
    """Keep the non-dominated points (lower cost and lower sensitivity are better)."""
    points.sort(key=lambda p: (p[0], p[1]))
    out, best = [], math.inf
    for p in points:
        if p[1] < best:
            out.append(p)
            best = p[1]
    return out


def pareto_front(options: dict[str, dict[str, tuple[float, float]]]) -> Front:
    """Exact multiple-choice knapsack: ``options[block][width] = (cost, sensitivity)``; returns the
    front over all combinations with one width per block."""
    front = [(0.0, 0.0, {})]
    for block, opts in options.items():
        merged = [(c + oc, s + os_, {**ch, block: w}) for c, s, ch in front for w, (oc, os_) in opts.items()]
        front = _prune(merged)
    return Front([p[0] for p in front], [p[1] for p in front], [p[2] for p in front])


# ----------------------------------------------------------------------------- allocation

_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024 ** 2, "us": 1e-6, "µs": 1e-6,
          "ms": 1e-3, "s": 1.0}


def parse_budget(text) -> tuple[str, float]:
    """``"2.5MB"`` -> ("bytes", 2.5e6); ``"150us"`` -> ("latency", 1.5e-4); numbers are bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), "b"
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Zµ]*)\s*", str(text))
        if not m:
            raise ValueError(f"budget {text!r} is not a number with a unit (e.g. 2.5MB, 800KiB, 150us)")
        value, unit = float(m.group(1)), (m.group(2) or "b").lower()
    if unit not in _UNITS:
        raise ValueError(f"budget {text!r}: unknown unit {unit!r}; use B, KB, MB, GB, KiB, MiB (size) or us, ms, s "
                         "(latency)")
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"budget {text!r} must be positive")
    kind = "latency" if unit in ("us", "µs", "ms", "s") else "bytes"
    return kind, value * _UNITS[unit]


@dataclass
class Allocation:
    widths: dict                          # block name -> width (str)
    budget: dict
    predicted: dict                       # bytes / latency / sensitivity of the chosen point
    front: dict = field(default_factory=dict)
    sensitivity: dict = field(default_factory=dict)

    def bits_map(self) -> dict:
        """The per-parameter map ``quantize(model, bits=...)`` takes (matrix granularity)."""
        out = {}
        for name, w in self.widths.items():
            if "[" in name:
                raise ValueError("a gate-granular allocation cannot be deployed (one width per matrix in the "
                                 "artifact); allocate with granularity='matrix'")
            out[name] = int(w) if str(w).isdigit() else w
        return out

    def to_json(self) -> dict:
        return asdict(self)

    def save(self, path) -> None:
        from pathlib import Path
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> "Allocation":
        from pathlib import Path
        try:
            d = json.loads(Path(path).read_text())
            return cls(**d)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not an allocation written by g2quant allocate ({exc})") from None


TIE = 1e-9     # per step of precision: among allocations equal within measurement, the wider wins


def effective_sensitivity(delta: dict) -> dict:
    """A block's measured loss increases as the solver uses them: a negative increase is measurement
    noise (0); a wider width is never taken as worse than a narrower one (running minimum from the
    narrowest); and ties go to the wider width by a margin far below any measured difference — else
    a budget with room to spare would stop at the narrowest allocation that measures as lossless."""
    from .report import _declared_bits
    order = sorted(delta, key=_declared_bits)                  # narrowest first
    out, running = {}, math.inf
    for rank, w in enumerate(order):
        running = min(running, max(0.0, float(delta[w])))
        out[w] = running + TIE * (len(order) - 1 - rank)
    return out


def allocate(model: nn.Module, calib_tokens=None, *, budget=None, target: str = "cpu", widths=WIDTHS,
             sens: dict | None = None, latency_profile=None, keep_float: tuple = (), **sens_kw) -> Allocation:
    """Choose a width per block minimizing the summed sensitivity under ``budget`` (bytes, or a
    latency like ``"150us"`` with ``latency_profile``: a ``profiles.Profile``). ``sens`` reuses a
    ``sensitivity()`` table."""
    kind, limit = parse_budget(budget)
    if sens is None:
        if calib_tokens is None:
            raise ValueError("allocate() needs calibration tokens (calib_tokens=) or a sensitivity table (sens=)")
        sens = sensitivity(model, calib_tokens, widths=widths, **sens_kw)
    if kind == "latency" and latency_profile is None:
        raise ValueError("a latency budget needs the target's kernel profile (latency_profile=; see g2quant profile)")
    blocks = [b for b in sens["blocks"] if b["name"] not in keep_float]
    shape_of = lambda b: (b["rows"][1] - b["rows"][0], b["cols"])          # noqa: E731
    streamed = [b for b in blocks if b["kind"] != "embedding"]      # an embedding reads one row per token

    def options_at(working_set):
        options: dict = {}
        for b in blocks:
            opts = {}
            for w, d in effective_sensitivity(sens["delta"][b["name"]]).items():
                if kind == "bytes":
                    cost = block_bytes(b, w, target)
                else:                   # an embedding's row read is in the profile's token overhead
                    cost = 0.0 if b["kind"] == "embedding" else latency_profile.seconds(shape_of(b), w, working_set)
                opts[w] = (float(cost), d)
            options[b["name"]] = opts
        return options

    fixed_bytes = 0.0
    if kind == "bytes":
        fixed = fixed_bytes = _other_bytes(model, sens, target)
        front = pareto_front(options_at(None))
        i = front.best_within(limit - fixed)
        choice, cost, sens_i = front.choices[i], front.cost[i], front.sens[i]
    else:
        # A product's latency depends on the working set of the whole token (the weights it streams),
        # which depends on the widths chosen: solve with the working set of the widest allocation
        # (an upper bound on every product's cost, so its choice fits), then again with the working
        # set of each choice; keep the best choice whose latency, at its own working set, fits.
        fixed = float(getattr(latency_profile, "overhead", 0.0))
        ws_of = lambda ch: sum(latency_profile.packed_bytes(shape_of(b), ch[b["name"]]) for b in streamed)  # noqa: E731
        # (Started from the narrowest allocation's working set as well: where the widest one's
        # makes every choice too slow, a narrow one may still fit at its own.)
        extreme = lambda pick: {b["name"]: pick(sens["delta"][b["name"]], key=latency_profile.storage_bits)  # noqa: E731
                                for b in blocks}
        best, smallest = None, math.inf
        for ws in (ws_of(extreme(max)), ws_of(extreme(min))):
            for _ in range(4):
                front = pareto_front(options_at(ws))
                smallest = min(smallest, min(front.cost) + fixed)
                ok = [i for i, c in enumerate(front.cost) if c <= limit - fixed]
                if not ok:
                    break
                i = min(ok, key=lambda k: (front.sens[k], front.cost[k]))
                ch = front.choices[i]
                true_cost = sum(latency_profile.seconds(shape_of(b), ch[b["name"]], ws_of(ch)) for b in streamed)
                if true_cost <= limit - fixed and (best is None or front.sens[i] < best[2]):
                    best = (ch, true_cost, front.sens[i])
                if ws_of(ch) == ws:
                    break
                ws = ws_of(ch)
            if best is not None:
                break
        if best is None:
            raise ValueError(f"no allocation fits the latency budget {limit * 1e6:g} us on profile "
                             f"{latency_profile.name!r}; the smallest is about {smallest * 1e6:g} us")
        choice, cost, sens_i = best
        front = pareto_front(options_at(ws_of(choice)))
    pred = {kind: cost + fixed, "sensitivity": sens_i, "fixed_bytes": fixed_bytes}
    if kind == "latency":
        pred["fixed_seconds"] = fixed
        pred["working_set_bytes"] = ws_of(choice)
    return Allocation(widths=choice, budget={"kind": kind, "limit": limit, "target": target},
                      predicted=pred, front={"cost": [c + fixed for c in front.cost], "sensitivity": front.sens},
                      sensitivity=sens)


def _other_bytes(model, sens, target) -> float:
    """What the target stores besides the allocated blocks (biases, float layers): measured from a
    quantized copy so the budget is about the whole artifact."""
    from .api import quantize
    q = quantize(model, bits=8)
    total = q.size_bytes(target=target)
    for b in sens["blocks"]:
        total -= block_bytes(b, 8, target)
    return float(max(total, 0))
