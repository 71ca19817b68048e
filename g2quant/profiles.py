"""Kernel latency profiles of a target: measured per storage width, used by the bit allocator's
latency budgets (``g2quant.allocate``).

A profile models one batch-1 matrix-vector product of a ``rows × cols`` weight matrix at storage
width ``bw`` as ``a[bw] + b[bw] · rows · cols`` seconds, fitted (least squares) to timings of the
target's own engine on a few LSTM-like shapes, and a word-LM token as the sum of its products
plus ``overhead`` seconds (signed: embedding row, cell update, calls; measured on a tiny 2-layer
LM as its token time minus the sum the fit predicts for its products). Profiles are TOML files: ``g2quant/profiles/*.toml``
are shipped (measured on named machines), ``g2quant profile`` measures this machine and caches the
result in ``$G2QUANT_CACHE/profiles/<cpu>-<loop>.toml``; ``--target host`` means that one.
"""
from __future__ import annotations

import os
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SHIPPED = Path(__file__).parent / "profiles"
SHAPES = ((256, 256), (800, 200), (1600, 400), (2600, 650), (10000, 200))
WIDTH_BITS = {1: "binary", 2: 2, 4: 4, 8: 8}          # storage width -> a width that stores at it


@dataclass
class Profile:
    name: str
    target: str
    loop: str
    cpu: str
    threads: int
    fit: dict = field(default_factory=dict)           # bw -> (a seconds, b seconds per MAC)
    measured: list = field(default_factory=list)      # [(rows, cols, bw, seconds)]
    overhead: float = 0.0                             # seconds per LM token beyond its products

    def seconds(self, shape, width) -> float:
        """Predicted seconds of one batch-1 product of a ``shape`` matrix stored at ``width``."""
        from .targets.cpu.target import storage_width
        if str(width) in ("binary", "ternary"):
            bits, scheme = (1, "binary") if str(width) == "binary" else (2, "ternary")
        else:
            bits, scheme = int(width), "int" if int(width) <= 8 else "float"
        bw = storage_width(bits, scheme)
        if bw not in self.fit:
            raise ValueError(f"profile {self.name!r} has no timings for {bw}-bit storage")
        a, b = self.fit[bw]
        return a + b * shape[0] * shape[1]

    def to_toml(self) -> str:
        lines = [f'name = "{self.name}"', f'target = "{self.target}"', f'loop = "{self.loop}"', f'cpu = "{self.cpu}"',
                 f"threads = {self.threads}", f"overhead_seconds = {self.overhead:.9g}", ""]
        for bw, (a, b) in sorted(self.fit.items()):
            lines += [f"[width.{bw}]", f"a_seconds = {a:.9g}", f"b_seconds_per_mac = {b:.9g}", ""]
        lines.append("# measured: rows, cols, storage bits, seconds")
        lines.append("measured = [" + ", ".join(f"[{r}, {c}, {bw}, {s:.9g}]" for r, c, bw, s in self.measured) + "]")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str, name: str = "") -> "Profile":
        try:
            d = tomllib.loads(text)
            fit = {int(k): (float(v["a_seconds"]), float(v["b_seconds_per_mac"])) for k, v in d["width"].items()}
            return cls(d.get("name", name), d["target"], d["loop"], d.get("cpu", "?"), int(d.get("threads", 1)), fit,
                       [tuple(x) for x in d.get("measured", [])], float(d.get("overhead_seconds", 0.0)))
        except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"profile {name or '?'}: not a g2quant kernel profile ({exc})") from None


def _cache_dir() -> Path:
    from .data.download import cache_dir
    return cache_dir() / "profiles"


def shipped() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SHIPPED.glob("*.toml"))}


def host_name() -> str:
    from .targets.cpu import isa
    d = isa.describe()
    return f"{d.get('cpu', 'cpu')}-{d.get('loop')}".replace("/", "_")


def measure(*, threads: int = 1, repeats: int = 5, shapes=SHAPES, widths=(1, 2, 4, 8), progress=None) -> Profile:
    """Time the cpu target's batch-1 products on this machine and fit the per-width model."""
    from .targets.cpu import isa
    from .targets.cpu.engine import Engine
    from .targets.cpu.testing import random_qmatrix
    from .targets.graph import Graph, Node

    rng = np.random.default_rng(0)
    rows_out = []
    for bw in widths:
        bits = WIDTH_BITS[bw]
        for R, K in shapes:
            m = random_qmatrix(R, K, 1 if bits == "binary" else bits, rng)
            g = Graph({"kind": "features", "size": K, "layout": "tb"},
                      [Node("linear", "m", ["input"], {"act_bits": 8}, {"weight": "w"})],
                      {"value": "m", "layout": "tb"}, {"w": m})
            eng = Engine(g, threads=threads)
            x = rng.standard_normal((1, 1, K)).astype(np.float32)
            st = eng.initial_state(1)
            for _ in range(20):
                eng._execute(x, st)
            best = float("inf")
            for _ in range(repeats):
                n = 50
                t0 = time.perf_counter()
                for _ in range(n):
                    eng._execute(x, st)
                best = min(best, (time.perf_counter() - t0) / n)
            rows_out.append((R, K, bw, best))
            if progress:
                progress(f"{bw}-bit {R}x{K}: {best * 1e6:.1f} us")
    fit = {}
    for bw in widths:
        pts = [(r * c, s) for r, c, w, s in rows_out if w == bw]
        A = np.array([[1.0, macs] for macs, _ in pts])
        y = np.array([s for _, s in pts])
        a, b = np.linalg.lstsq(A, y, rcond=None)[0]
        fit[bw] = (float(max(a, 0.0)), float(max(b, 0.0)))
    d = isa.describe()
    prof = Profile(host_name(), "cpu", str(d.get("loop")), str(d.get("cpu")), threads, fit, rows_out)
    from .targets.cpu.testing import random_lm_weights
    V, H = OVERHEAD_LM
    bw = max(fit)
    bits = 1 if WIDTH_BITS[bw] == "binary" else WIDTH_BITS[bw]
    w = random_lm_weights(V, H, 2, bits, seed=1)
    prof.overhead = lm_token_seconds(Engine(w.to_graph(), threads=threads), repeats) - \
        sum(prof.seconds(shape, bits if bits != 1 else "binary") for shape in lm_product_shapes(V, H, H, 2))
    if progress:
        progress(f"LM token overhead: {prof.overhead * 1e6:.1f} us")
    return prof


OVERHEAD_LM = (64, 32)       # vocab, hidden of the LM the token overhead is measured on


def lm_product_shapes(vocab: int, emb: int, hidden: int, layers: int) -> list[tuple[int, int]]:
    """The batch-1 products of one word-LM token: per layer W_ih and W_hh, then the decoder."""
    out = []
    for k in range(layers):
        out += [(4 * hidden, emb if k == 0 else hidden), (4 * hidden, hidden)]
    return out + [(vocab, hidden)]


def lm_token_seconds(engine, repeats: int = 5, n: int = 200) -> float:
    """Min over ``repeats`` of the mean batch-1 ``step_`` time of a token-LM engine."""
    st = engine.initial_state(1)
    toks = np.arange(64, dtype=np.int64) % engine.input_size
    for i in range(20):
        engine.step_(toks[i:i + 1], st)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            engine.step_(toks[(i & 63):(i & 63) + 1], st)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def load_profile(name: str = "host", *, measure_if_missing: bool = True, progress=None) -> Profile:
    """A shipped profile by name, a TOML file path, or ``"host"`` (this machine: cached, else measured)."""
    if name != "host":
        path = shipped().get(name) or Path(name)
        if not path.is_file():
            raise ValueError(f"unknown profile {name!r}; shipped: {', '.join(shipped()) or 'none'}, or 'host'")
        return Profile.from_toml(path.read_text(), path.stem)
    path = _cache_dir() / f"{host_name()}.toml"
    if path.is_file():
        return Profile.from_toml(path.read_text(), path.stem)
    if not measure_if_missing:
        raise ValueError(f"no profile of this machine yet ({path}); run `g2quant profile`")
    prof = measure(progress=progress)
    save_profile(prof, path)
    return prof


def save_profile(prof: Profile, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(prof.to_toml())
    os.replace(tmp, path)
    return path
