"""Micro-benchmarks of the CPU engine's inner loops (``g2quant.targets.cpu``), per loop.

Writes ``benchmarks/results/kernels-<cpu>-<loop>.json`` (one file per machine and host loop):
- ``machine``: ``isa.describe()`` of the host (CPU name, features, the loops it can run);
- ``load_avg``: the 1-minute load average before and after (the machine is shared: a busy
  machine makes 2-thread figures meaningless), and ``quiet`` (both below 0.5 per core);
- ``read_bandwidth_gb_s``: measured read bandwidth of this machine by working-set size (a Numba
  ``prange`` sum, 1 and 2 threads, and a NumPy ``sum`` on 1 thread), the physical limit the
  weight streaming is compared against;
- ``compile``: per loop, the cold first use (empty Numba cache) and the warm one (cache load),
  each in a fresh process: ``linear_fwd`` at every storage width, ``lstm_layer_fwd`` at 4-bit,
  and a whole 4-bit LM engine (``Engine(graph)``, what ``g2quant run`` compiles);
- ``entry_style``: one call of ``linear_fwd`` through its ``program_kernels.specialize`` entry vs
  through Numba's literal dispatch (why the programs specialize);
- ``peak``: per loop and width, one kernel call repeated on L1-resident data without ``prange``
  (``gemv``: its blocks × 1 vector; ``gemm``: its blocks × vectors; ``amx``: 2 blocks × 32
  vectors): the loop's own compute throughput, 1 thread;
- ``matvec``: per loop, bits 8/4/2/1, the LSTM shapes of hidden 200/650/1500 (rows 4H, cols H),
  batch 1 (streaming), 20 (a scoring batch's recurrent step) and, at hidden 650, 700 (its input
  projections and decoder), 1 and 2 threads: µs per product (``us``: the product on
  already-quantized activations; ``us_linear``: the whole ``linear_fwd``, activation
  quantization included), GMAC/s, weight-streaming GB/s (packed bytes per product / time) and
  its fraction of the read bandwidth at that working set, GMAC/s as a fraction of the loop's
  peak (the gemv peak for batch 1, else the gemm peak, or the AMX peak where the amx-int8 loop
  runs AMX).

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

RESULTS = ROOT / "benchmarks" / "results" / "kernels.json"
HIDDENS = (200, 650, 1500)
BITS = (8, 4, 2, 1)
BATCHES = (1, 20)
BIG_BATCH = (650, 700)     # (hidden, batch): the input projections / decoder of a 20 x 35 scoring batch
# the Numba target of each loop's run: (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES), None = the host
TARGETS = {"amx-int8": None, "avx512-vnni": None, "avx-vnni": ("alderlake", ""), "avx2": ("haswell", ""),
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


def repeat_entries(loop_id: int, bw: int):
    """Numba loops calling the kernels ``n`` times with the loop id and width as constants (so
    neither Python dispatch nor a literal-dispatch lookup is timed): ``(product_n, linear_n)``:
    ``product_n`` = the product on already-quantized activations (``program_kernels._matmul1``),
    ``linear_n`` = the whole ``linear_fwd`` (activation quantization included)."""
    from g2quant.targets.cpu import program_kernels as pk

    def product_n(n, w, nlines, scale, xq, width, sx, sumx, out, nb, rows):
        for _ in range(n):
            pk._matmul1(loop_id, bw, w, nlines, scale, scale, np.int64(0), xq, width, sx, sumx, out, np.int64(0), rows,
                        nb, rows)

    def linear_n(n, w, nlines, scale, x, out):
        for _ in range(n):
            pk.linear_fwd(loop_id, bw, w, nlines, scale, scale, False, x, out)

    return njit(cache=True)(product_n), njit(cache=True)(linear_n)


PEAK_LINES = 64           # L1-resident: 64 lines per block (16 rows x 256 k at 4-bit)


def peak_entries(loop_id: int, bw: int):
    """Numba loops calling one kernel ``n`` times on the same L1-resident data, no ``prange``:
    the inner loop's own throughput (the practical compute peak of that loop, 1 thread).
    ``(gemv_n, gemm_n, amx_n)``: the batch-1 kernel's blocks × 1 vector, the micro-kernel's
    blocks × vectors, 2 blocks × 32 vectors on AMX."""
    from g2quant.targets.cpu import kernels_vnni as V
    gemv, gemm, amx = V.KERNELS["gemv", bw], V.KERNELS["gemm", bw], V.KERNELS["amx", bw]
    G = V.gemv_group(loop_id, bw)
    RB, NV = V.gemm_group(loop_id, bw)

    def gemv_n(n, w, x, sumx, sx, scale, out):
        for _ in range(n):
            gemv(w, 0, PEAK_LINES, G, x, 0, sumx[0], sx[0], scale, 0, scale, 0, out, 0, 16 * G, 0, loop_id)

    def gemm_n(n, w, x, width, sumx, sx, scale, out):
        for _ in range(n):
            gemm(w, 0, PEAK_LINES, RB, x, 0, width, NV, sumx, 0, sx, 0, scale, 0, scale, 0, out, 0, 16 * RB,
                 16 * RB, 0, loop_id)

    def amx_n(n, w, x, width, sumx, sx, scale, out, scratch):
        for _ in range(n):
            amx(w, 0, PEAK_LINES, 2, x, 0, width, 32, sumx, 0, sx, 0, scale, 0, scale, 0, out, 0, 32, 32, 0, scratch,
                0, loop_id)

    return njit(cache=True)(gemv_n), njit(cache=True)(gemm_n), njit(cache=True)(amx_n), G, RB, NV


def worker_peak(loop: str, bits_list, repeats) -> list:
    from g2quant.targets.cpu import isa
    from g2quant.targets.cpu import kernels as K
    from g2quant.targets.cpu import kernels_vnni as V

    numba.set_num_threads(1)
    lid = isa.loop_id(loop)
    results = []
    for bits in bits_list:
        bw = K.storage_bits(bits, "binary" if bits == 1 else "int", 4096)
        gemv_n, gemm_n, amx_n, G, RB, NV = peak_entries(lid, bw)
        k = PEAK_LINES * 4 * (8 // bw)                          # columns
        w = K._aligned_empty(4 * PEAK_LINES * 64)
        w[:] = 0x5A
        x = np.ones(40 * k + 64, np.int8)
        scale, out = np.ones(64, np.float32), np.zeros(64 * 64, np.float32)
        sumx, sx = np.zeros(40, np.int64), np.ones(40, np.float32)
        n = 200
        row = {"loop": loop, "bits": bits, "bw": bw, "gemv_blocks": G, "gemm_shape": [RB, NV]}
        sec = time_min(lambda: gemv_n(n, w, x, sumx, sx, scale, out), repeats) / n
        row["gemv_gmac_s"] = round(16 * G * k / sec / 1e9, 1)
        sec = time_min(lambda: gemm_n(n, w, x, k, sumx, sx, scale, out), repeats) / n
        row["gemm_gmac_s"] = round(16 * RB * NV * k / sec / 1e9, 1)
        if V.uses_amx(lid):
            scratch = K._aligned_empty(V.amx_scratch_bytes(PEAK_LINES, bw))
            sec = time_min(lambda: amx_n(n, w, x, k, sumx, sx, scale, out, scratch), repeats) / n
            row["amx_gmac_s"] = round(32 * 32 * k / sec / 1e9, 1)
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return results


@njit(cache=True, parallel=True)
def read_sum(a):
    """Sum of a uint64 array: a plain read stream over ``prange``."""
    s = np.uint64(0)
    for i in numba.prange(a.shape[0]):
        s += a[i]
    return s


def worker_matvec(loop: str, hiddens, bits_list, batches, threads_list, repeats) -> list:
    from g2quant.targets.cpu import isa
    from g2quant.targets.cpu import kernels as K
    from g2quant.targets.cpu import kernels_vnni as V
    from g2quant.targets.cpu import program_kernels as pk
    from g2quant.targets.qweights import QMatrix

    K.set_path(loop)
    lid = isa.loop_id(loop)
    rng = np.random.default_rng(0)
    results = []
    for hidden in hiddens:
        rows, cols = 4 * hidden, hidden
        for bits in bits_list:
            q, scheme = _random_q(rng, rows, cols, bits)
            km = K.prepare(QMatrix(q, np.full(rows, 0.01, np.float32), bits, scheme))
            product_n, linear_n = repeat_entries(lid, km.bw)
            for batch in list(batches) + ([BIG_BATCH[1]] if hidden == BIG_BATCH[0] else []):
                x = rng.normal(size=(batch, cols)).astype(np.float32)
                out = np.empty((batch, rows), np.float32)
                xq, sx, sumx = pk._quantize_rows(x, km.kpad)
                want = K.qmatmul(km, x)
                flat = out.reshape(-1)
                for threads in threads_list:
                    numba.set_num_threads(threads)
                    n = 8 if batch < 100 else 1
                    sec = time_min(lambda: product_n(n, km.data, km.nlines, km.scale, xq, km.kpad, sx, sumx, flat,
                                                     batch, rows), repeats) / n
                    np.testing.assert_array_equal(out, want)
                    sec_l = time_min(lambda: linear_n(n, km.data, km.nlines, km.scale, x, out), repeats) / n
                    macs = rows * cols * batch
                    amx = V.uses_amx(lid) and batch >= pk.AMX_MIN_VECS
                    results.append({
                        "loop": loop, "hidden": hidden, "rows": rows, "cols": cols, "bits": bits, "bw": km.bw,
                        "batch": batch, "threads": threads, "kernel": "gemv" if batch == 1 else "amx" if amx else "gemm",
                        "weight_bytes": int(km.data.size), "us": round(sec * 1e6, 2), "us_linear": round(sec_l * 1e6, 2),
                        "gmac_s": round(macs / sec / 1e9, 1), "weight_gb_s": round(km.data.size / sec / 1e9, 1)})
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
    """Seconds to the first result: ``linear_fwd`` at every storage width (batch 1 and 4), the
    4-bit ``lstm_layer_fwd`` (one step and a sequence), and a whole 4-bit LM engine."""
    t0 = time.perf_counter()
    from g2quant.targets.cpu import isa
    from g2quant.targets.cpu import kernels as K
    from g2quant.targets.cpu import program_kernels as pk
    from g2quant.targets.cpu.engine import Engine
    from g2quant.targets.cpu.testing import random_lm_weights
    from g2quant.targets.qweights import QMatrix
    t_import = time.perf_counter() - t0
    K.set_path(loop)
    lid = isa.loop_id(loop)
    rng = np.random.default_rng(0)
    t1 = time.perf_counter()
    for bits, cols in ((8, 40), (4, 40), (2, 40), (1, 40)):
        q, scheme = _random_q(rng, 20, cols, bits)
        km = K.prepare(QMatrix(q, np.ones(20, np.float32), bits, scheme))
        for batch in (1, 4):
            K.qmatmul(km, np.ones((batch, cols), np.float32))
    t_linear = time.perf_counter() - t1
    H = 32
    q, _ = _random_q(rng, 4 * H, H, 4)
    km = K.prepare(QMatrix(q, np.ones(4 * H, np.float32), 4))
    t2 = time.perf_counter()
    for T in (1, 3):
        x, h, c = np.ones((T, 2, H), np.float32), np.zeros((2, H), np.float32), np.zeros((2, H), np.float32)
        args = (km.data, km.nlines, km.scale, km.data, km.nlines, km.scale, km.scale, False, False, False, False,
                x, h, c, np.zeros((T, 2, H), np.float32), 0)
        pk.specialize(pk.lstm_layer_fwd, (lid, km.bw, km.bw), args)(lid, km.bw, km.bw, *args)
    t_lstm = time.perf_counter() - t2
    graph = random_lm_weights(100, 64, 2, 4, seed=0).to_graph()
    t3 = time.perf_counter()
    Engine(graph)
    t_engine = time.perf_counter() - t3
    return {"import_s": round(t_import, 2), "linear_all_widths_s": round(t_linear, 2), "lstm_4bit_s": round(t_lstm, 2),
            "engine_4bit_lm_s": round(t_engine, 2), "total_s": round(time.perf_counter() - t0, 2)}


def worker_engine_compile(loop: str) -> dict:
    """A whole 4-bit LM engine alone (fresh process): what a user's first ``g2quant run`` waits."""
    t0 = time.perf_counter()
    from g2quant.targets.cpu import kernels as K
    from g2quant.targets.cpu.engine import Engine
    from g2quant.targets.cpu.testing import random_lm_weights
    K.set_path(loop)
    graph = random_lm_weights(100, 64, 2, 4, seed=0).to_graph()
    t1 = time.perf_counter()
    Engine(graph)
    return {"engine_4bit_lm_s": round(time.perf_counter() - t1, 2), "process_s": round(time.perf_counter() - t0, 2)}


def worker_entry_style(loop: str, style: str) -> dict:
    """First-call seconds and per-call µs of ``linear_fwd`` on a 20×40 matrix, either through its
    ``specialize`` entry (``style="specialized"``, what the programs use) or through the
    dispatcher with literal arguments (``"dispatch"``)."""
    from g2quant.targets.cpu import isa
    from g2quant.targets.cpu import kernels as K
    from g2quant.targets.cpu import program_kernels as pk
    from g2quant.targets.qweights import QMatrix

    numba.set_num_threads(1)                # the per-call figure is dispatch cost, not threading
    q, _ = _random_q(np.random.default_rng(0), 20, 40, 4)
    km = K.prepare(QMatrix(q, np.ones(20, np.float32), 4))
    x, out = np.ones((1, 40), np.float32), np.empty((1, 20), np.float32)
    lits = (isa.loop_id(loop), km.bw)
    args = (km.data, km.nlines, km.scale, km.scale, False, x, out)
    t0 = time.perf_counter()
    if style == "specialized":
        entry = pk.specialize(pk.linear_fwd, lits, args)
    else:
        entry = pk.linear_fwd
    entry(*lits, *args)
    sec = time.perf_counter() - t0
    return {"first_call_s": round(sec, 2), "us_per_call_20x40": round(time_min(lambda: entry(*lits, *args), 20) * 1e6, 1)}


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
            "engine_compile": worker_engine_compile, "entry_style": worker_entry_style,
            "peak": worker_peak}[kind](**task)


def main():
    from g2quant.targets.cpu import isa

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="hidden 650, bits 4, fewer repeats")
    ap.add_argument("--loops", nargs="*", help="loops to run (default: every loop this CPU can execute)")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/kernels-<cpu>-<loop>.json")
    args = ap.parse_args()
    loops = args.loops or list(isa.host_loops())
    repeats = 10 if args.quick else 40
    hiddens, bits_list = ((650,), (4,)) if args.quick else (HIDDENS, BITS)
    load_start = os.getloadavg()[0]
    report = {"machine": isa.describe(), "numba": numba.__version__,
              "when": time.strftime("%Y-%m-%d %H:%M"),
              "command": "python benchmarks/kernels.py" + (" --quick" if args.quick else "") +
                         (f" --loops {' '.join(args.loops)}" if args.loops else ""),
              "targets": {loop: ({"NUMBA_CPU_NAME": TARGETS[loop][0], "NUMBA_CPU_FEATURES": TARGETS[loop][1]}
                                 if TARGETS.get(loop) else "host") for loop in loops},
              "note": ("each loop runs in its own process with the Numba target in 'targets' (an AVX2-only "
                       "haswell for avx2/portable, alderlake for avx-vnni), so forced loops are honest; "
                       "us = product on quantized activations, us_linear = whole linear_fwd incl. activation "
                       "quantization; kernel = gemv (batch 1), gemm (register-blocked micro-kernel) or amx; "
                       "GMAC/s = rows*cols*batch/us; weight_gb_s = packed weight bytes / us (each weight is read "
                       "once per product; for batches the figure only says how far from streaming-bound it is); "
                       "read_bw_frac = weight_gb_s / read bandwidth at the next larger working set, same thread "
                       "count; peak = one kernel call repeated on L1-resident data, 1 thread (the loop's own "
                       "throughput), peak_frac = gmac_s / (peak of that kernel x threads). Min over repeats on a "
                       "shared 2-core VM; 'load_avg' says how shared. Not compared with numpy matmul: "
                       "OPENBLAS_CORETYPE is set here and halves OpenBLAS GEMM.")}
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
            cache = str(Path(tmp) / f"engine-{loop}")
            engine = {"cold": run_worker(loop, {"kind": "engine_compile", "loop": loop}, cache),
                      "warm": run_worker(loop, {"kind": "engine_compile", "loop": loop}, cache)}
            report["compile"][loop] = {"cold": cold, "warm": warm, "engine_4bit_lm_alone": engine}
            print("compile", loop, report["compile"][loop], flush=True)
        best = loops[0]
        styles = {}
        for style in ("specialized", "dispatch"):
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
    load_end = os.getloadavg()[0]
    ncpu = os.cpu_count() or 1
    report["load_avg"] = {"start_1min": round(load_start, 2), "end_1min": round(load_end, 2), "cpus": ncpu}
    report["quiet"] = max(load_start, load_end) < 0.5 * ncpu
    sizes_bytes = sorted((float(k) * 2 ** 20, v) for k, v in report["read_bandwidth_gb_s"].items())
    peak = {(p["loop"], p["bits"]): p for p in report["peak"]}
    for r in report["matvec"]:
        ref_bw = next((v for s, v in sizes_bytes if s >= r["weight_bytes"]), sizes_bytes[-1][1])
        r["read_bw_frac"] = round(r["weight_gb_s"] / ref_bw[f"numba_{r['threads']}t"], 2)
        p = peak[r["loop"], r["bits"]][f"{r['kernel']}_gmac_s"]
        r["peak_frac"] = round(r["gmac_s"] / (p * r["threads"]), 2)
    report["summary_h650_4bit"] = [
        {k: r[k] for k in ("loop", "batch", "threads", "kernel", "us", "us_linear", "gmac_s", "weight_gb_s",
                           "read_bw_frac", "peak_frac")}
        for r in report["matvec"] if r["hidden"] == 650 and r["bits"] == 4]
    if args.out is None:
        from g2quant.profiles import host_name
        args.out = RESULTS.with_name(f"kernels-{host_name()}.json")
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
