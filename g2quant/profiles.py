"""Kernel latency profiles of a target: measured per storage width, used by the bit allocator's
latency budgets (``g2quant.allocate``).

A profile models one batch-1 matrix-vector product of a ``rows × cols`` weight matrix at storage
width ``bw`` as ``a[bw] + b[bw] · rows · cols`` seconds, fitted (least squares) to timings of the
target's own engine on a few LSTM-like shapes with the matrix in cache ("hot"), and a word-LM
token as the sum of its products plus ``overhead`` seconds (signed: embedding row, cell update,
calls; measured on a tiny 2-layer LM as its token time minus the sum the fit predicts for its
products).

A batch-1 token reads every weight once, so a model larger than the caches streams its weights
from L3 or memory at a rate set by its *working set* (all packed weight bytes of the token), not
by the matrix alone. The profile therefore also measures, per storage width, the product kernel
cycling through pools of 1 … 64 distinct matrices (up to 64 MB; ``stream[bw]``: working-set
bytes → seconds per packed byte, unpacking included), and a product in a model of working set
``ws`` costs ``a + max(b · rows · cols, bytes · stream[bw](ws))`` (in cache the compute fit,
beyond it the measured streaming rate of the smallest pool that holds ``ws``). Measured on the Sapphire Rapids-class VM: without the streaming term a hidden-650 LM was
predicted 45-57 % fast; see ``benchmarks/alloc_latency.py``. Profiles are TOML files: ``g2quant/profiles/*.toml``
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
    stream: dict = field(default_factory=dict)        # bw -> [(working-set bytes, seconds per packed byte)]

    @staticmethod
    def storage_bits(width) -> int:
        from .targets.cpu.target import storage_width
        if str(width) in ("binary", "ternary"):
            bits, scheme = (1, "binary") if str(width) == "binary" else (2, "ternary")
        else:
            bits, scheme = int(width), "int" if int(width) <= 8 else "float"
        return storage_width(bits, scheme)

    @classmethod
    def packed_bytes(cls, shape, width) -> float:
        """Weight bytes one product of a ``shape`` matrix at ``width`` reads (codes only)."""
        return shape[0] * shape[1] * cls.storage_bits(width) / 8.0

    def stream_seconds_per_byte(self, bw: int, working_set: float) -> float:
        """Seconds per packed ``bw``-bit weight byte at ``working_set`` bytes (0 where not measured)."""
        if not self.stream.get(bw) or working_set <= 0:
            return 0.0
        pts = sorted(self.stream[bw])
        ys = np.maximum.accumulate([s for _, s in pts])     # a larger working set never streams faster
        # the rate of the smallest measured pool that holds the working set: the drop past a cache
        # level is a cliff, not a slope (an LM's 3.2 MB streamed like the 4 MB pool, not halfway
        # between the 2 and 4 MB ones, on the Sapphire Rapids-class VM)
        k = int(np.searchsorted([w for w, _ in pts], working_set * (1 - 1e-9)))
        return float(ys[min(k, len(ys) - 1)])

    def seconds(self, shape, width, working_set: float | None = None) -> float:
        """Predicted seconds of one batch-1 product of a ``shape`` matrix stored at ``width``, in a
        model whose token reads ``working_set`` weight bytes in all (None: the matrix alone, in cache)."""
        bw = self.storage_bits(width)
        if bw not in self.fit:
            raise ValueError(f"profile {self.name!r} has no timings for {bw}-bit storage")
        a, b = self.fit[bw]
        hot = b * shape[0] * shape[1]
        if working_set is None:
            return a + hot
        return a + max(hot, self.packed_bytes(shape, width) * self.stream_seconds_per_byte(bw, working_set))

    def predict(self, products) -> float:
        """Seconds of one batch-1 token made of ``products`` ``[(shape, width)]`` (every matrix the
        token reads once), the token overhead included."""
        products = list(products)
        ws = sum(self.packed_bytes(s, w) for s, w in products)
        return self.overhead + sum(self.seconds(s, w, ws) for s, w in products)

    def to_toml(self) -> str:
        lines = [f'name = "{self.name}"', f'target = "{self.target}"', f'loop = "{self.loop}"', f'cpu = "{self.cpu}"',
                 f"threads = {self.threads}", f"overhead_seconds = {self.overhead:.9g}", ""]
        for bw, (a, b) in sorted(self.fit.items()):
            lines += [f"[width.{bw}]", f"a_seconds = {a:.9g}", f"b_seconds_per_mac = {b:.9g}", ""]
        for bw, pts in sorted(self.stream.items()):
            lines += [f"[stream.{bw}]", "# the product kernel cycling through distinct matrices: working set, s/byte",
                      "working_set_bytes = [" + ", ".join(f"{w:.0f}" for w, _ in pts) + "]",
                      "seconds_per_byte = [" + ", ".join(f"{v:.6g}" for _, v in pts) + "]", ""]
        lines.append("# measured: rows, cols, storage bits, seconds")
        lines.append("measured = [" + ", ".join(f"[{r}, {c}, {bw}, {s:.9g}]" for r, c, bw, s in self.measured) + "]")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str, name: str = "") -> "Profile":
        try:
            d = tomllib.loads(text)
            fit = {int(k): (float(v["a_seconds"]), float(v["b_seconds_per_mac"])) for k, v in d["width"].items()}
            stream = {}
            for k, st in d.get("stream", {}).items():
                ws, spb = st.get("working_set_bytes", []), st.get("seconds_per_byte", [])
                if len(ws) != len(spb) or any(float(w) <= 0 or float(v) < 0 for w, v in zip(ws, spb)):
                    raise ValueError(f"[stream.{k}] needs as many positive working sets as seconds per byte")
                stream[int(k)] = [(float(w), float(v)) for w, v in zip(ws, spb)]
            return cls(d.get("name", name), d["target"], d["loop"], d.get("cpu", "?"), int(d.get("threads", 1)), fit,
                       [tuple(x) for x in d.get("measured", [])], float(d.get("overhead_seconds", 0.0)), stream)
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


def measure(*, threads: int = 1, repeats: int = 5, shapes=SHAPES, widths=(1, 2, 4, 8), progress=None,
            stream_pools=None) -> Profile:
    """Time the cpu target's batch-1 products on this machine and fit the per-width model."""
    from .targets.cpu import isa, kernels
    from .targets.cpu.engine import Engine
    from .targets.cpu.testing import random_qmatrix

    rng = np.random.default_rng(0)
    rows_out = []
    for bw in widths:
        for R, K in shapes:
            m = kernels.prepare(random_qmatrix(R, K, _code_bits(bw), rng))
            # the kernel entry the engine's programs call (not a whole graph run: the engine's own
            # per-token cost is the LM overhead measured below)
            best = _time_pool([m], threads, repeats, rng)[0]
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
    prof.stream = {bw: measure_stream(bw, threads=threads, repeats=repeats, progress=progress,
                                      pools=stream_pools or STREAM_POOLS) for bw in widths}
    from .targets.cpu.testing import random_lm_weights
    V, H = OVERHEAD_LM
    bw = max(fit)
    bits = _code_bits(bw)
    w = random_lm_weights(V, H, 2, bits, seed=1)
    prof.overhead = lm_token_seconds(Engine(w.to_graph(), threads=threads), repeats) - \
        sum(prof.seconds(shape, bits if bits != 1 else "binary") for shape in lm_product_shapes(V, H, H, 2))
    if progress:
        progress(f"LM token overhead: {prof.overhead * 1e6:.1f} us")
    return prof


def _code_bits(bw: int) -> int:
    """The ``bits`` argument of ``random_qmatrix`` for a storage width (1 = binary)."""
    return 1 if WIDTH_BITS[bw] == "binary" else WIDTH_BITS[bw]


def _time_pool(mats, threads: int, repeats: int, rng, sizes=(1,), calls: int = 64) -> list[float]:
    """Seconds per batch-1 ``linear_fwd`` call cycling through the first ``n`` of ``mats`` (same
    shape and width), for each ``n`` in ``sizes``: min over ``repeats`` of the mean of at least
    ``calls`` calls, after a warm-up pass through the pool."""
    import numba

    from .targets.cpu import isa, kernels
    from .targets.cpu import program_kernels as pk
    x = rng.standard_normal((1, mats[0].cols)).astype(np.float32)
    out = np.empty((1, mats[0].rows), np.float32)
    lits = (isa.loop_id(kernels.get_path()), mats[0].bw)
    pool_args = [(m.data, m.nlines, m.scale, m.scale, False, x, out) for m in mats]
    prev = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        fn = pk.specialize(pk.linear_fwd, lits, pool_args[0])
        res = []
        for n in sizes:
            pool = pool_args[:n]
            cycles = max(2, -(-calls // n))
            for args in pool * max(2, -(-20 // n)):                  # warm-up
                fn(*lits, *args)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(cycles):
                    for args in pool:
                        fn(*lits, *args)
                best = min(best, (time.perf_counter() - t0) / (cycles * n))
            res.append(best)
    finally:
        numba.set_num_threads(prev)
    return res


OVERHEAD_LM = (64, 32)       # vocab, hidden of the LM the token overhead is measured on
STREAM_POOLS = (1, 2, 4, 8, 16, 32, 64)     # matrices per pool
STREAM_SHAPE = (2048, 1024)                 # one pool matrix (4-bit: 1 MB of codes)
STREAM_MAX_BYTES = 64 * 2 ** 20


def measure_stream(bw: int, *, threads: int = 1, repeats: int = 5, pools=STREAM_POOLS, shape=STREAM_SHAPE,
                   progress=None) -> list[tuple[float, float]]:
    """Seconds per packed byte of the ``bw``-bit batch-1 product kernel cycling through pools of
    ``pools`` distinct matrices (at most 64 MB: the weights a token streams from L2, L3 or memory)."""
    from .targets.cpu import kernels
    from .targets.cpu.testing import random_qmatrix

    rng = np.random.default_rng(1)
    R, K = shape
    per = R * K * bw / 8.0
    counts = sorted({n for n in pools if n * per <= STREAM_MAX_BYTES} or {1})
    mats = [kernels.prepare(random_qmatrix(R, K, _code_bits(bw), rng)) for _ in range(max(counts))]
    res = []
    for n, best in zip(counts, _time_pool(mats, threads, repeats, rng, sizes=counts)):
        res.append((n * per, best / per))
        if progress:
            progress(f"{bw}-bit streaming, {n * per / 2 ** 20:.2f} MB working set: {per / best / 1e9:.1f} GB/s")
    return res


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
