"""Engine threads on an idle and on a busy machine: fixed 1 / all threads vs the automatic policy
(``targets/cpu/threads.py``), per Numba threading layer.

    python benchmarks/threads.py                     # hidden 200 and 650, 4-bit, vocab 10k
    python benchmarks/threads.py --hidden 200 --quick

"Busy" = ``--busy`` (default 2) other processes spinning on the CPU for the whole measurement,
as on a shared 2-core machine. Each configuration runs in its own subprocess; batch-1 streaming
latency per token (mean and median over ``--steps`` steps, after a warm-up that lets the automatic
policy settle) and the 20 x 35 ``run`` throughput. Writes ``benchmarks/results/threads.json``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _spin(stop):
    x = 0
    while not stop.is_set():
        for _ in range(100000):
            x += 1


def worker(spec: dict) -> dict:
    from g2quant.targets.cpu.engine import Engine

    threads = None if spec["threads"] == "auto" else int(spec["threads"])
    eng = Engine.load(spec["artifact"], threads=threads)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, eng.vocab_size, size=spec["steps"] + 200).astype(np.int64)
    st = eng.initial_state(1)
    for t in toks[:200]:                       # warm-up (and the policy's first probes)
        eng.step_(t.reshape(1), st)
    times = []
    for t in toks[200:]:
        t0 = time.perf_counter()
        eng.step_(t.reshape(1), st)
        times.append(time.perf_counter() - t0)
    x = rng.integers(0, eng.vocab_size, size=(35, 20))
    for _ in range(3):
        eng.run(x)
    runs = []
    for _ in range(spec["run_repeats"]):
        t0 = time.perf_counter()
        eng.run(x)
        runs.append(time.perf_counter() - t0)
    import numba
    return {"mean_ms_per_token": 1e3 * statistics.fmean(times), "median_ms_per_token": 1e3 * statistics.median(times),
            "p90_ms_per_token": 1e3 * float(np.percentile(times, 90)),
            "run_tokens_per_s_mean": 700 / statistics.fmean(runs), "threading_layer": numba.threading_layer(),
            "policy": eng.info()["thread_choices"], "loop": eng.loop}


def _run(spec: dict, env: dict, busy: int) -> dict:
    stop = mp.Event()
    procs = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(busy)]
    for p in procs:
        p.start()
    try:
        r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                           env=env, timeout=1800)
    finally:
        stop.set()
        for p in procs:
            p.join()
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or [f"rc {r.returncode}"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[200, 650])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=10_000)
    ap.add_argument("--layers", nargs="+", default=["omp", "workqueue"], help="Numba threading layers")
    ap.add_argument("--busy", type=int, default=2, help="competing busy processes in the busy runs")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/threads.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.quick:
        args.steps = 500
    from g2quant.targets.cpu import kernels
    from g2quant.targets.cpu.target import write_lm_artifact
    from g2quant.targets.cpu.testing import random_lm_weights

    results = []
    with tempfile.TemporaryDirectory(prefix="g2q-threads-") as tmp:
        for H in args.hidden:
            w = random_lm_weights(args.vocab, H, 2, args.bits, seed=0)
            art = write_lm_artifact(Path(tmp) / f"lm{H}.g2q", w, [f"w{i}" for i in range(args.vocab)])
            for layer in args.layers:
                env = dict(os.environ, NUMBA_THREADING_LAYER=layer, NUMBA_NUM_THREADS=str(os.cpu_count()))
                for busy in (0, args.busy):
                    for threads in ("1", str(os.cpu_count()), "auto"):
                        spec = {"artifact": str(art), "threads": threads, "steps": args.steps,
                                "run_repeats": 3 if args.quick else 10}
                        r = _run(spec, env, busy)
                        row = {"hidden": H, "bits": args.bits, "threading_layer": layer, "busy_processes": busy,
                               "threads": threads, **r}
                        results.append(row)
                        print(json.dumps({k: v for k, v in row.items() if k != "policy"}), flush=True)
    meta = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "when": time.strftime("%Y-%m-%d %H:%M"), "cpu_features": kernels.cpu_features(),
            "command": "python benchmarks/threads.py" + (" --quick" if args.quick else ""),
            "note": "batch-1 streaming ms/token (mean, median, p90 over the steps) and 20x35 run() tokens/s; "
                    "busy = competing spinning processes for the whole run"}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
