"""Micro-benchmarks of the CPU engine's inner loops (``g2quant.targets.cpu.kernels``), per loop.

Writes ``benchmarks/results/kernels.json``:
- ``machine``: ``isa.describe()`` of the host (CPU name, features, the loops it can run);
- ``read_bandwidth_gb_s``: measured read bandwidth of this machine by working-set size (a Numba
  ``prange`` sum, 1 and 2 threads, and a NumPy ``sum`` on 1 thread), the physical limit the
  weight streaming is compared against;
- ``compile``: per loop, the cold first call (empty Numba cache: every storage width of the
  product entry, plus the LM step entry) and the warm one (cache load), each in a fresh
  process; and for the host's best loop one entry per loop vs one ``numba.literally`` entry
  (cold/warm seconds, cache hits);
- ``peak``: per loop and width, one kernel call (16 rows × 1 vector, 4 rows × 4 vectors) repeated
  on L1-resident data without ``prange``: the loop's own compute throughput, 1 thread;
- ``matvec``: per loop, bits 8/4/2/1, the LSTM shapes of hidden 200/650/1500 (rows 4H, cols H),
  batch 1 (streaming) and batch 20, 1 and 2 threads: µs per product (``us``: the product
  kernel on already-quantized activations; ``us_qmatmul``: the whole ``qmatmul``, including the
  per-vector activation quantization), GMAC/s, weight-streaming GB/s (packed bytes per product
  / time) and its fraction of the read bandwidth at that working set, and GMAC/s as a fraction of
  the loop's peak.

Every loop runs in its own subprocess. Numba compiles for the host CPU, so a forced loop run on
a bigger machine would still let LLVM use the bigger registers around it: the ``avx2`` and
``portable`` loops run with ``NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=""`` (an AVX2-only
target) and ``avx-vnni`` with ``alderlake`` (AVX-VNNI without AVX-512), each with its own
``NUMBA_CACHE_DIR``; the JSON records the target of each run. (The avx2/avx-vnni kernels also
switch AVX-512 off themselves; see ``kernels_vnni``.)

Timings are the minimum over repeats of the mean over short windows (the machine is shared).
Not compared with NumPy matmul: ``OPENBLAS_CORETYPE`` is set on these machines, which halves
OpenBLAS GEMM. Run: ``python benchmarks/kernels.py [--quick] [--loops L ...] [--out PATH]``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
from numba import njit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from g2quant.targets.cpu import kernels_jit as J  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "kernels.json"
HIDDENS = (200, 650, 1500)
BITS = (8, 4, 2, 1)
BATCHES = (1, 20)
# the Numba target of each loop's run: (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES), None = the host
TARGETS = {"avx512-vnni": None, "avx-vnni": ("alderlake", ""), "avx2": ("haswell", ""),
           "portable": ("haswell", ""), "neon-dotprod": None, "neon": None}


def time_min(fn, repeats: int, window_s: float = 0.002) -> float:
    """Minimum over ``repeats`` windows (~``window_s`` each) of the mean seconds per call."""
    fn()
    t0 = time.perf_counter()
    fn()
    calls = max(1, int(window_s / max(time.perf_counter() - t0, 1e-7)))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


# ----------------------------------------------------------------------------- worker side

def _random_q(rng, rows, cols, bits):
    if bits == 1:
        return rng.choice(np.array([-1, 1], np.int8), (rows, cols)), "binary"
    qmax = 2 ** (bits - 1) - 1
    return rng.integers(-qmax, qmax + 1, (rows, cols), dtype=np.int8), "int"


def repeat_entries(loop_id: int):
    """Numba loops calling the kernels ``n`` times with the loop id as a constant (so neither
    Python dispatch nor a literal-dispatch lookup is timed): ``(product_n, qmatmul_n)``:
    ``product_n`` = the product on already-quantized activations (``kernels_jit._matmul``),
    ``qmatmul_n`` = the whole ``qmatmul`` (activation quantization included)."""
    def product_n(n, mats, wbuf, fbuf, width, out, xq, sx, sumx):
        zero, no_matrix = np.int64(0), np.int64(-1)        # as kernels_jit._qmatmul_kernel passes them
        for _ in range(n):
            J._matmul(loop_id, mats, wbuf, fbuf, width, out, zero, xq, sx, sumx, zero, zero, no_matrix, xq, sx,
                      sumx, zero, zero)

    def qmatmul_n(n, wbuf, fbuf, mats, x, out):
        for _ in range(n):
            J._qmatmul_kernel(loop_id, wbuf, fbuf, mats, x, out)

    return njit(cache=True)(product_n), njit(cache=True)(qmatmul_n)


PEAK_CHUNKS = 16          # L1-resident: a panel of 16 rows x 16 chunks x 64 bytes = 16 KB,
PEAK_TILE_CHUNKS = 64     # a tile of 4 rows x 64 chunks = 16 KB


def peak_entries(loop_id: int, bw: int):
    """Numba loops calling one kernel ``n`` times on the same L1-resident data, no ``prange``:
    the inner loop's own throughput (the practical compute peak of that loop, 1 thread).
    ``(panel_n, batch_n)``: 16 rows × 1 vector, and 4 rows × 4 vectors."""
    from g2quant.targets.cpu import kernels_vnni as V
    panel = {1: V.panel_u1, 2: V.panel_u2, 4: V.panel_u4, 8: V.panel_u8}[bw]
    batch = {1: V.batch_u1, 2: V.batch_u2, 4: V.batch_u4, 8: V.batch_u8}[bw]

    def panel_n(n, w, x, nchunks, scale, out):
        for _ in range(n):
            panel(w, 0, x, 0, nchunks, 0, np.float32(1.0), scale, 0, scale, 0, out, 0, 16, 0, loop_id)

    def batch_n(n, w, x, width, nchunks, sumx, sx, scale, out):
        for _ in range(n):
            batch(w, 0, x, 0, width, nchunks, sumx, 0, sx, 0, scale, 0, scale, 0, out, 0, 16, 4, 4, 0, loop_id)

    return njit(cache=True)(panel_n), njit(cache=True)(batch_n)


def worker_peak(loop: str, bits_list, repeats) -> list:
    from g2quant.targets.cpu import isa
    from g2quant.targets.cpu import kernels as K

    numba.set_num_threads(1)
    results = []
    for bits in bits_list:
        bw = K.storage_bits(bits, "binary" if bits == 1 else "int", 4096)
        panel_n, batch_n = peak_entries(isa.loop_id(loop), bw)
        per_chunk = K.CHUNK_BYTES * (8 // bw)                   # columns per chunk
        w = np.full(16 * PEAK_CHUNKS * K.CHUNK_BYTES, 0x5A, np.uint8)
        x = np.ones(4 * PEAK_TILE_CHUNKS * per_chunk, np.int8)
        scale, out = np.ones(16, np.float32), np.zeros(64, np.float32)
        sumx, sx = np.zeros(4, np.int64), np.ones(4, np.float32)
        n = 200
        sec_p = time_min(lambda: panel_n(n, w, x, PEAK_CHUNKS, scale, out), repeats) / n
        width = PEAK_TILE_CHUNKS * per_chunk
        sec_b = time_min(lambda: batch_n(n, w, x, width, PEAK_TILE_CHUNKS, sumx, sx, scale, out), repeats) / n
        results.append({"loop": loop, "bits": bits, "bw": bw,
                        "panel_gmac_s": round(16 * PEAK_CHUNKS * per_chunk / sec_p / 1e9, 1),
                        "batch_gmac_s": round(4 * 4 * width / sec_b / 1e9, 1)})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


@njit(cache=True, parallel=True)
def read_sum(a):
    """Sum of a uint64 array: a plain read stream over ``prange``."""
    s = np.uint64(0)
    for i in numba.prange(a.shape[0]):
        s += a[i]
    return s


@njit(cache=True)
def qmatmul_literal(loop, wbuf, fbuf, mats, x, out):
    """The product entry as one function taking the loop through ``numba.literally``."""
    numba.literally(loop)
    J._qmatmul_kernel(loop, wbuf, fbuf, mats, x, out)


def worker_matvec(loop: str, hiddens, bits_list, batches, threads_list, repeats) -> list:
    from g2quant.targets.cpu import isa
    from g2quant.targets.cpu import kernels as K
    from g2quant.targets.qweights import QMatrix

    K.set_path(loop)
    product_n, qmatmul_n = repeat_entries(isa.loop_id(loop))
    rng = np.random.default_rng(0)
    results = []
    for hidden in hiddens:
        rows, cols = 4 * hidden, hidden
        for bits in bits_list:
            q, scheme = _random_q(rng, rows, cols, bits)
            km = K.prepare(QMatrix(q, np.full(rows, 0.01, np.float32), bits, scheme))
            for batch in batches:
                x = rng.normal(size=(batch, cols)).astype(np.float32)
                out = np.empty((batch, rows), np.float32)
                nvec = 1 if batch == 1 else -(-batch // K.BATCH_VECS) * K.BATCH_VECS
                xq = np.zeros(nvec * km.kpad, np.int8)
                sx, sumx = np.ones(nvec, np.float32), np.zeros(nvec, np.int64)
                for b in range(batch):
                    sx[b], sumx[b] = J._quantize_into(x[b], xq, b * km.kpad, km.kpad)
                want = K.qmatmul(km, x)
                for threads in threads_list:
                    numba.set_num_threads(threads)
                    n = 8
                    sec = time_min(lambda: product_n(n, km.table, km.data, km.scale, km.kpad, out, xq, sx, sumx),
                                   repeats) / n
                    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
                    sec_q = time_min(lambda: qmatmul_n(n, km.data, km.scale, km.table, x, out), repeats) / n
                    macs = rows * cols * batch
                    streamed = km.data.size * (1 if batch == 1 else nvec // K.BATCH_VECS)   # once per group of 4
                    results.append({
                        "loop": loop, "hidden": hidden, "rows": rows, "cols": cols, "bits": bits, "bw": km.bw,
                        "batch": batch, "threads": threads, "weight_bytes": int(km.data.size),
                        "us": round(sec * 1e6, 2), "us_qmatmul": round(sec_q * 1e6, 2),
                        "gmac_s": round(macs / sec / 1e9, 1), "weight_gb_s": round(streamed / sec / 1e9, 1)})
                    print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


def worker_bandwidth(sizes_mb, threads_list, repeats) -> dict:
    out = {}
    for mb in sizes_mb:
        a = np.ones(int(mb * 2 ** 20) // 8, np.uint64)
        f = a.view(np.float32)
        row = {}
        for threads in threads_list:
            numba.set_num_threads(threads)
            row[f"numba_{threads}t"] = round(a.nbytes / time_min(lambda: read_sum(a), repeats) / 1e9, 1)
        row["numpy_sum_1t"] = round(f.nbytes / time_min(lambda: f.sum(), repeats) / 1e9, 1)
        out[str(mb)] = row
        print("bandwidth", mb, "MB", row, file=sys.stderr, flush=True)
    return out


def worker_compile(loop: str) -> dict:
    """Seconds to the first result of every storage width (batch 1 and 4) and of the LM step."""
    t0 = time.perf_counter()
    from g2quant.targets.cpu import kernels as K
    from g2quant.targets.cpu.reference import initial_state
    from g2quant.targets.qweights import QLSTMLayer, QMatrix, QuantLMWeights
    t_import = time.perf_counter() - t0
    K.set_path(loop)
    rng = np.random.default_rng(0)
    mats = {}
    for bits, cols in ((8, 40), (4, 40), (2, 40), (1, 1100)):
        q, scheme = _random_q(rng, 20, cols, bits)
        mats[bits] = QMatrix(q, np.ones(20, np.float32), bits, scheme)
    t1 = time.perf_counter()
    for bits, m in mats.items():
        km = K.prepare(m)
        for batch in (1, 4):
            K.qmatmul(km, np.ones((batch, m.shape[1]), np.float32))
    t_qmatmul = time.perf_counter() - t1
    hidden = 32
    def qm(rows, cols):
        return QMatrix(_random_q(rng, rows, cols, 4)[0], np.ones(rows, np.float32), 4)

    layers = [QLSTMLayer(qm(4 * hidden, hidden), qm(4 * hidden, hidden), np.zeros(4 * hidden, np.float32))
              for _ in range(2)]
    w = QuantLMWeights(qm(50, hidden), layers, None, np.zeros(50, np.float32), ())
    km = K.prepare_lm(w)
    h, c = initial_state(km, 1)
    t2 = time.perf_counter()
    K.lm_step(km, np.array([1]), h, c)
    t_lm = time.perf_counter() - t2
    return {"import_s": round(t_import, 2), "qmatmul_all_widths_s": round(t_qmatmul, 2), "lm_step_s": round(t_lm, 2),
            "total_s": round(time.perf_counter() - t0, 2)}


def worker_entry_style(loop: str, style: str) -> dict:
    """First-call seconds and cache statistics of the product entry, either the per-loop entry of
    ``kernels_jit`` (``style="per-loop"``) or one entry taking the loop through ``numba.literally``."""
    from g2quant.targets.cpu import isa
    from g2quant.targets.cpu import kernels as K
    from g2quant.targets.qweights import QMatrix

    numba.set_num_threads(1)                # the per-call figure is dispatch cost, not threading
    q, _ = _random_q(np.random.default_rng(0), 20, 40, 4)
    km = K.prepare(QMatrix(q, np.ones(20, np.float32), 4))
    x, out = np.ones((1, 40), np.float32), np.empty((1, 20), np.float32)
    if style == "per-loop":
        entry, args = J.QMATMUL[loop], (km.data, km.scale, km.table, x, out)
    else:
        entry, args = qmatmul_literal, (isa.loop_id(loop), km.data, km.scale, km.table, x, out)
    t0 = time.perf_counter()
    entry(*args)
    sec = time.perf_counter() - t0
    stats = entry.stats
    return {"first_call_s": round(sec, 2), "cache_hits": int(sum(stats.cache_hits.values())),
            "cache_misses": int(sum(stats.cache_misses.values())),
            "us_per_call_20x40": round(time_min(lambda: entry(*args), 20) * 1e6, 1),
            "signatures": [str(s).split(",")[0] + ", ...)" for s in entry.signatures]}


# ----------------------------------------------------------------------------- driver side

def _env(loop: str, cache: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["G2QUANT_KERNEL"] = loop
    target = TARGETS.get(loop)
    if target:
        env["NUMBA_CPU_NAME"], env["NUMBA_CPU_FEATURES"] = target
    if cache:
        env["NUMBA_CACHE_DIR"] = cache
    return env


def run_worker(loop: str, task: dict, cache: str | None) -> dict:
    """Run one worker task in a fresh process for ``loop`` (with that loop's Numba target)."""
    code = ("import json, sys; from benchmarks.kernels import run_task; "
            "print('@@' + json.dumps(run_task(json.loads(sys.argv[1]))))")
    res = subprocess.run([sys.executable, "-c", code, json.dumps(task)], env=_env(loop, cache), cwd=ROOT,
                         stdout=subprocess.PIPE, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"worker {task} for {loop} failed (exit {res.returncode})")
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("@@"))
    return json.loads(line[2:])


def run_task(task: dict):
    kind = task.pop("kind")
    if kind == "describe":
        from g2quant.targets.cpu import isa
        return isa.describe()
    return {"matvec": worker_matvec, "bandwidth": worker_bandwidth, "compile": worker_compile,
            "entry_style": worker_entry_style, "peak": worker_peak}[kind](**task)


def main():
    from g2quant.targets.cpu import isa

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="hidden 650, bits 4, fewer repeats")
    ap.add_argument("--loops", nargs="*", help="loops to run (default: every loop this CPU can execute)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    loops = args.loops or list(isa.host_loops())
    repeats = 10 if args.quick else 40
    hiddens, bits_list = ((650,), (4,)) if args.quick else (HIDDENS, BITS)
    report = {"machine": isa.describe(), "numba": numba.__version__,
              "when": time.strftime("%Y-%m-%d %H:%M"), "loadavg_1min_start": os.getloadavg()[0],
              "command": "python benchmarks/kernels.py" + (" --quick" if args.quick else ""),
              "targets": {loop: ({"NUMBA_CPU_NAME": TARGETS[loop][0], "NUMBA_CPU_FEATURES": TARGETS[loop][1]}
                                 if TARGETS.get(loop) else "host") for loop in loops},
              "note": ("each loop runs in its own process with the Numba target in 'targets' (an AVX2-only "
                       "haswell for avx2/portable, alderlake for avx-vnni), so forced loops are honest; "
                       "us = product kernel on quantized activations, us_qmatmul = whole qmatmul incl. "
                       "activation quantization; GMAC/s = rows*cols*batch/us; weight_gb_s = packed weight "
                       "bytes streamed/us (weights are read once per group of 4 vectors when batch > 1); "
                       "read_bw_frac = weight_gb_s / read bandwidth at the next larger working set, same "
                       "thread count; peak = one kernel call repeated on L1-resident data, 1 thread (the "
                       "loop's own throughput), peak_frac = gmac_s / (peak x threads). Min over repeats on a shared 2-core VM. Not compared with numpy "
                       "matmul: OPENBLAS_CORETYPE is set here and halves OpenBLAS GEMM.")}
    with tempfile.TemporaryDirectory() as tmp:
        print("bandwidth ...", flush=True)
        sizes = (1, 4, 16, 64, 1024) if not args.quick else (1, 16, 1024)
        bw = run_worker(loops[0], {"kind": "bandwidth", "sizes_mb": list(sizes), "threads_list": [1, 2],
                                   "repeats": repeats}, str(Path(tmp) / "bw"))
        report["read_bandwidth_gb_s"] = bw
        report["compile"] = {}
        for loop in loops:
            cache = str(Path(tmp) / f"compile-{loop}")
            cold = run_worker(loop, {"kind": "compile", "loop": loop}, cache)
            warm = run_worker(loop, {"kind": "compile", "loop": loop}, cache)
            report["compile"][loop] = {"cold": cold, "warm": warm}
            print("compile", loop, report["compile"][loop], flush=True)
        best = loops[0]
        styles = {}
        for style in ("per-loop", "literally"):
            cache = str(Path(tmp) / f"style-{style}")
            styles[style] = {"cold": run_worker(best, {"kind": "entry_style", "loop": best, "style": style}, cache),
                             "warm": run_worker(best, {"kind": "entry_style", "loop": best, "style": style}, cache)}
        report["entry_style"] = {"loop": best, **styles}
        print("entry style", report["entry_style"], flush=True)
        report["peak"] = []
        for loop in loops:
            report["peak"] += run_worker(loop, {"kind": "peak", "loop": loop, "bits_list": list(bits_list),
                                                "repeats": repeats}, str(Path(tmp) / f"matvec-{loop}"))
        report["matvec"] = []
        for loop in loops:
            print("matvec", loop, "...", flush=True)
            report["matvec"] += run_worker(loop, {"kind": "matvec", "loop": loop, "hiddens": list(hiddens),
                                                  "bits_list": list(bits_list), "batches": list(BATCHES),
                                                  "threads_list": [1, 2], "repeats": repeats},
                                           str(Path(tmp) / f"matvec-{loop}"))
    sizes_bytes = sorted((float(k) * 2 ** 20, v) for k, v in report["read_bandwidth_gb_s"].items())
    peak = {(p["loop"], p["bits"]): p for p in report["peak"]}
    for r in report["matvec"]:
        ref_bw = next((v for s, v in sizes_bytes if s >= r["weight_bytes"]), sizes_bytes[-1][1])
        r["read_bw_frac"] = round(r["weight_gb_s"] / ref_bw[f"numba_{r['threads']}t"], 2)
        p = peak[r["loop"], r["bits"]]["panel_gmac_s" if r["batch"] == 1 else "batch_gmac_s"]
        r["peak_frac"] = round(r["gmac_s"] / (p * r["threads"]), 2)
    report["summary_h650_4bit"] = [
        {k: r[k] for k in ("loop", "batch", "threads", "us", "us_qmatmul", "gmac_s", "weight_gb_s", "read_bw_frac",
                           "peak_frac")}
        for r in report["matvec"] if r["hidden"] == 650 and r["bits"] == 4]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_dump(report) + "\n")
    print("wrote", args.out)


def _dump(report: dict) -> str:
    """JSON with one line per matvec/summary row (readable, diffable)."""
    rows = {k: report.pop(k) for k in ("peak", "matvec", "summary_h650_4bit")}
    text = json.dumps(report, indent=1)[:-2]
    for key, items in rows.items():
        text += f',\n "{key}": [\n' + ",\n".join("  " + json.dumps(r) for r in items) + "\n ]"
    return text + "\n}"


if __name__ == "__main__":
    main()
