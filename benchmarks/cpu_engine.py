"""CPU engine vs torch / onnxruntime peers on 2-layer word LSTM LMs (random weights).

    python benchmarks/cpu_engine.py                    # hidden 200/650/1500, vocab 10k
    python benchmarks/cpu_engine.py --hidden 650 --bits 4 --quick

For each hidden size the engine runs 8/4/2/1-bit artifacts (``random_lm_weights``) with the
host's best inner loop **and** with ``avx2`` and ``portable`` forced (``G2QUANT_KERNEL``, each in
a subprocess compiled for an AVX2-only Numba target, see ``benchmarks/kernels.py``), a 4-bit
``onnx`` artifact of the same model runs in onnxruntime (DequantizeLinear + MatMul, and
MatMulNBits), and the peers run same-shaped fp32 models: torch ``nn.LSTM`` called one step at a
time, stacked ``nn.LSTMCell``s, torch int8 dynamic (``quantize_dynamic`` on LSTM + Linear), and
onnxruntime fp32 (graph exported with ``torch.onnx.export(dynamo=False)``) and onnxruntime int8
dynamic (``onnxruntime.quantization.quantize_dynamic`` on that graph). Measured, with 1 and 2
threads (fixed counts; the engine's automatic choice is ``benchmarks/threads.py``):

- batch-1 streaming latency per token (embedding -> 2 layers -> 10k logits, state carried),
- batched scoring throughput, batch 20 x 35 steps, every runtime with its sequence API (the
  engine's ``run``: input projections of all steps as one product), LSTMCell stepping,
- the engine's weight-streaming GB/s and GMAC/s at batch 1 against the machine's read bandwidth
  and the loop's peak from ``benchmarks/results/kernels-<cpu>-<loop>.json``,
- artifact / model size, peak RSS of the measuring process, first-call time.

Each configuration runs in its own subprocess (clean RSS, no cross-talk); timings are the
minimum over repeats because the machine is shared with other jobs. Writes
``benchmarks/results/cpu_engine-<cpu>-<loop>.json`` (one per machine and host loop) and
``docs/cpu-engine-results-<cpu>-<loop>.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("torch-lstm", "torch-lstmcell", "torch-int8-dynamic", "onnxruntime-fp32", "onnxruntime-int8-dynamic",
         "g2quant-onnx-dq", "g2quant-onnx-nbits")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time_min(fn, n: int, repeats: int) -> float:
    """Min over ``repeats`` of the time of ``n`` calls; returns seconds per call."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / n


def _calibrated(fn, repeats: int, budget_s: float) -> float:
    """Pick the call count so one repeat takes about ``budget_s``; min over repeats."""
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    n = int(min(2000, max(3, budget_s / once)))
    return _time_min(fn, n, repeats)


# ---------------------------------------------------------------- worker: one config per process
def _engine_runner(spec):
    from g2quant.targets.base import load

    t0 = time.perf_counter()
    eng = load(spec["artifact"])
    setup = time.perf_counter() - t0
    st1 = eng.initial_state(1)
    toks = np.random.default_rng(0).integers(0, eng.vocab_size, size=(64, 20)).astype(np.int64)
    t0 = time.perf_counter()
    eng.step_(toks[0, :1], st1)
    first = time.perf_counter() - t0
    stb = eng.initial_state(20)
    state = {"i": 0, "b": stb}

    def stream():
        state["i"] = (state["i"] + 1) & 63
        eng.step_(toks[state["i"], :1], st1)

    def scoring():
        _, state["b"] = eng.run(toks[:35], state["b"])

    def set_threads(n):
        if hasattr(eng, "threads"):
            eng.threads = n
        else:                                   # an onnx artifact: a session per thread count
            from g2quant.targets.onnx.target import OnnxRuntime
            state["eng"] = OnnxRuntime(eng.graph, eng.manifest, path=spec["artifact"], threads=n)

    info = eng.info() if hasattr(eng, "info") else {}
    extra = {"backend": info.get("backend"), "loop": info.get("loop"), "size_bytes": _dir_size(spec["artifact"])}
    if hasattr(eng, "_ctx"):                      # what one batch-1 token streams and multiplies
        g = eng.graph
        used = {n.params[r] for n in g.nodes if n.op in ("linear", "lstm") for r in n.params
                if hasattr(g.params[n.params[r]], "q")}
        by_id = {id(p): k for k, p in g.params.items()}
        extra["weight_bytes_per_token"] = sum(km.data.nbytes + km.scale.nbytes for src, km in eng._ctx._packed.values()
                                              if by_id.get(id(src)) in used)
        extra["macs_per_token"] = sum(g.params[k].shape[0] * g.params[k].shape[1] for k in used)

    if not hasattr(eng, "threads"):               # onnx: the session of the current thread count
        def stream():  # noqa: F811
            state["i"] = (state["i"] + 1) & 63
            state.get("eng", eng).step_(toks[state["i"], :1], st1)

        def scoring():  # noqa: F811
            _, state["b"] = state.get("eng", eng).run(toks[:35], state["b"])
    return (setup, first), set_threads, stream, scoring, extra


def _dir_size(path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


class _TorchLM:
    def __init__(self, torch, V, H, kind):
        nn = torch.nn
        torch.manual_seed(0)
        self.torch, self.kind = torch, kind
        self.emb = nn.Embedding(V, H)
        if kind == "torch-lstmcell":
            self.cells = nn.ModuleList([nn.LSTMCell(H, H), nn.LSTMCell(H, H)])
        else:
            self.lstm = nn.LSTM(H, H, num_layers=2)
        self.dec = nn.Linear(H, V)
        mods = [self.emb, self.dec] + ([self.cells] if kind == "torch-lstmcell" else [self.lstm])
        self.fp32_bytes = sum(p.numel() * 4 for m in mods for p in m.parameters())
        if kind == "torch-int8-dynamic":
            self.lstm_fp32_params = list(self.lstm.named_parameters())
            holder = nn.Module()
            holder.lstm, holder.dec = self.lstm, self.dec
            q = torch.ao.quantization.quantize_dynamic(holder, {nn.LSTM, nn.Linear}, dtype=torch.qint8)
            self.lstm, self.dec = q.lstm, q.dec
            # int8 weights (1 byte each) + fp32 embedding, biases and per-tensor scales (no pickle)
            n_lstm_w = sum(p.numel() for n, p in self.lstm_fp32_params if "weight" in n)
            n_bias = sum(p.numel() for n, p in self.lstm_fp32_params if "bias" in n) + V
            self.int8_bytes = V * H * 4 + n_lstm_w + V * H + 4 * n_bias + 4 * 5

    def seq(self, tok, h, c):
        """tok [T, B] -> logits [T, B, V]; h, c [2, B, H]."""
        x = self.emb(tok)
        if self.kind != "torch-lstmcell":
            out, (h, c) = self.lstm(x, (h, c))
            return self.dec(out), h, c
        hs, cs, outs = [h[0], h[1]], [c[0], c[1]], []
        for t in range(x.shape[0]):
            inp = x[t]
            for l, cell in enumerate(self.cells):
                hs[l], cs[l] = cell(inp, (hs[l], cs[l]))
                inp = hs[l]
            outs.append(self.dec(inp))
        return self.torch.stack(outs), self.torch.stack(hs), self.torch.stack(cs)


def _torch_runner(spec):
    import torch

    V, H, kind = spec["vocab"], spec["hidden"], spec["kind"]
    t0 = time.perf_counter()
    torch.set_grad_enabled(False)
    m = _TorchLM(torch, V, H, kind)
    toks = torch.randint(0, V, (64, 20))
    z1, zb = torch.zeros(2, 1, H), torch.zeros(2, 20, H)
    st = {"h": z1, "c": z1, "i": 0}
    extra = {"size_bytes": getattr(m, "int8_bytes", m.fp32_bytes),
             "fp32_bytes": m.fp32_bytes}

    if kind.startswith("onnxruntime"):
        import onnxruntime as ort

        class Wrap(torch.nn.Module):
            def __init__(self, lm):
                super().__init__()
                self.lm, self.emb, self.lstm, self.dec = lm, lm.emb, lm.lstm, lm.dec

            def forward(self, tok, h, c):
                return self.lm.seq(tok, h, c)

        path = os.path.join(spec["tmp"], f"lm{H}.onnx")
        torch.onnx.export(Wrap(m), (toks[:1, :1], z1, z1), path, dynamo=False,
                          input_names=["tok", "h0", "c0"], output_names=["logits", "h", "c"],
                          dynamic_axes={"tok": {0: "T", 1: "B"}, "h0": {1: "B"}, "c0": {1: "B"},
                                        "logits": {0: "T", 1: "B"}, "h": {1: "B"}, "c": {1: "B"}})
        if kind == "onnxruntime-int8-dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            qpath = path.replace(".onnx", "-int8.onnx")
            quantize_dynamic(path, qpath, weight_type=QuantType.QInt8)
            path = qpath
        extra["size_bytes"] = os.path.getsize(path)
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        sessions = {}

        def session(n):
            if n not in sessions:
                so = ort.SessionOptions()
                so.intra_op_num_threads, so.inter_op_num_threads = n, 1
                sessions[n] = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            return sessions[n]

        tok_np = toks.numpy()
        cur = {"n": 1}
        o1 = {"h0": z1.numpy(), "c0": z1.numpy()}
        session(1).run(None, {"tok": tok_np[:1, :1], **o1})
        first = time.perf_counter() - t0          # session creation + first run

        def stream():
            st["i"] = (st["i"] + 1) & 63
            _, o1["h0"], o1["c0"] = session(cur["n"]).run(None, {"tok": tok_np[st["i"]:st["i"] + 1, :1], **o1})

        zb_np = zb.numpy()

        def scoring():
            session(cur["n"]).run(None, {"tok": tok_np[:35], "h0": zb_np, "c0": zb_np})

        def set_threads(n):
            cur["n"] = n
            session(n).run(None, {"tok": tok_np[:1, :1], **o1})
        return (setup, first), set_threads, stream, scoring, extra

    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    m.seq(toks[:1, :1], z1, z1)
    first = time.perf_counter() - t0

    def stream():
        st["i"] = (st["i"] + 1) & 63
        _, st["h"], st["c"] = m.seq(toks[st["i"]:st["i"] + 1, :1], st["h"], st["c"])

    def scoring():
        m.seq(toks[:35], zb, zb)

    return (setup, first), torch.set_num_threads, stream, scoring, extra


def worker(spec: dict) -> dict:
    rss0 = _rss_mb()
    runner = _engine_runner if spec["kind"] == "engine" or spec["kind"].startswith("g2quant-") else _torch_runner
    (setup, first), set_threads, stream, scoring, extra = runner(spec)
    res = {**{k: spec[k] for k in ("kind", "hidden", "vocab", "bits")}, **extra,
           "setup_s": setup, "first_call_s": first, "threads": {}}
    for n in spec["threads"]:
        set_threads(n)
        stream()
        lat = _calibrated(stream, spec["repeats"], spec["budget_s"])
        scoring()
        sc = _calibrated(scoring, spec["repeats"], spec["budget_s"])
        res["threads"][str(n)] = {"ms_per_token_b1": lat * 1e3, "score_tokens_per_s_b20x35": 700 / sc}
    res["peak_rss_mb"], res["rss_before_mb"] = _rss_mb(), rss0
    if spec["kind"] == "engine":
        import numba

        res["threading_layer"] = numba.threading_layer()
        if "weight_bytes_per_token" in res:
            for n, t in res["threads"].items():
                sec = t["ms_per_token_b1"] / 1e3
                t["weight_gb_s_b1"] = res["weight_bytes_per_token"] / sec / 1e9
                t["gmac_s_b1"] = res["macs_per_token"] / sec / 1e9
    res["loadavg_1min"] = os.getloadavg()[0]
    return res


# ---------------------------------------------------------------- parent: orchestrate and report
def _run_worker(spec: dict, env: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                       text=True, env=env, timeout=1800)
    if r.returncode != 0:
        return {**spec, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


EXTERNAL = PEERS[:5]          # the peers the goals are measured against (the g2quant-onnx rows are ours)


def _label(r):
    if r["kind"] == "engine":
        return f"engine {r['bits']}-bit {r.get('loop_forced') or r.get('loop') or ''}".rstrip()
    return r["kind"] + (f" {r['bits']}-bit" if r["kind"].startswith("g2quant-") else "")


def ratios(eng: dict, peer: dict, threads) -> dict:
    """Peer time / engine time for batch-1 latency and batch-20 scoring at each thread count."""
    out = {}
    for n in threads:
        e, p = eng["threads"][str(n)], peer["threads"][str(n)]
        out[f"b1 t{n}"] = p["ms_per_token_b1"] / e["ms_per_token_b1"]
    for n in threads:
        e, p = eng["threads"][str(n)], peer["threads"][str(n)]
        out[f"b20 t{n}"] = e["score_tokens_per_s_b20x35"] / p["score_tokens_per_s_b20x35"]
    return out


def markdown(results: list[dict], meta: dict) -> str:
    threads = meta["threads"]
    cold = meta.get("engine_cold_compile") or {}
    cold_txt = ", ".join(f"{k} {v.get('process_s', float('nan')):.1f} s" for k, v in cold.items()) or "not measured"
    feats = meta.get("cpu_features") or {}
    lines = ["# CPU engine benchmark\n",
             f"{meta['cpu']} ({feats.get('cpu', '?')}), {os.cpu_count()} CPUs; {meta['when']}; inner loops "
             f"{', '.join(meta.get('loops') or [])} (forced loops compiled for an AVX2-only Numba target, see "
             f"benchmarks/kernels.py); Numba threading layer {meta.get('threading_layer')}; 1-min load average "
             f"{meta['loadavg_1min_start_end'][0]:.1f} at start, {meta['loadavg_1min_start_end'][1]:.1f} at end. "
             f"2-layer LSTM LM, emb = hidden, vocab {meta['vocab']}, random weights. Times are the "
             "minimum over repeats. Batch-1 = one token per call with the state carried (ms/token); scoring = "
             "batch 20 x 35 steps per call with the state carried (tokens/s; every runtime uses its sequence "
             "API, LSTMCell steps). GB/s and GMAC/s: the engine's packed weight bytes and multiply-accumulates "
             "per batch-1 token over its latency. Peak RSS includes the runtime (torch import ~ hundreds of MB). "
             "Load = artifact load + kernel packing + compile/cache load (engine) or model build/export (peers); "
             f"first call = the first step. Cold compile (empty Numba cache, whole process): {cold_txt}. "
             "int8-dynamic size is computed (int8 weights + fp32 embedding/biases), not measured on disk; "
             f"command: `{meta.get('command')}`.\n"]
    for H in meta["hidden"]:
        rows = [r for r in results if r["hidden"] == H]
        ok = [r for r in rows if "error" not in r]
        peers = [r for r in ok if r["kind"] in EXTERNAL]
        best = {n: min((p["threads"][str(n)]["ms_per_token_b1"] for p in peers), default=None) for n in threads}
        lines.append(f"\n## hidden {H}\n")
        hdr = ["engine"] + [f"ms/token b1 t{n}" for n in threads] + [f"vs best peer t{n}" for n in threads] + \
              [f"tok/s b20 t{n}" for n in threads] + ["size MB", "size / fp32", "peak RSS MB", "load s", "first call s"]
        lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        for r in rows:
            if "error" in r:
                lines.append(f"| {_label(r)} | error: {r['error'][:80]} |")
                continue
            t = r["threads"]
            size = r.get("size_bytes")
            cells = [_label(r)] + [f"{t[str(n)]['ms_per_token_b1']:.3f}" for n in threads] + \
                [f"{best[n] / t[str(n)]['ms_per_token_b1']:.2f}x" if best[n] else "" for n in threads] + \
                [f"{t[str(n)]['score_tokens_per_s_b20x35']:,.0f}" for n in threads] + \
                [f"{size / 1e6:.2f}" if size else "n/a",
                 f"{size / r['fp32_bytes']:.3f}" if size and r.get("fp32_bytes") else "n/a",
                 f"{r['peak_rss_mb']:.0f}", f"{r['setup_s']:.2f}", f"{r['first_call_s']:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
        engines = [r for r in ok if r["kind"] not in EXTERNAL]
        if engines and peers:
            lines += [f"\nSpeed-up of the engine over each peer at hidden {H} (peer time / engine time; "
                      "b1 = batch-1 latency, b20 = batch 20 x 35 scoring throughput; t = threads):\n",
                      "| engine | " + " | ".join(p["kind"] for p in peers) + " |", "|" + "---|" * (len(peers) + 1)]
            for r in engines:
                cells = []
                for p in peers:
                    rt = ratios(r, p, threads)
                    cells.append(", ".join(f"{k} {v:.2f}x" for k, v in rt.items()))
                lines.append(f"| {_label(r)} | " + " | ".join(cells) + " |")
    lines.append("\n\"vs best peer\" = (fastest peer's batch-1 ms/token at that thread count) / (this row's); "
                 "> 1 means faster than every peer.\n")
    return "\n".join(lines)


def _host() -> str:
    """Results are kept per machine and inner loop: ``<numba cpu name>-<host loop>``."""
    from g2quant.profiles import host_name
    return host_name()


def _kernels_reference() -> dict:
    """Read bandwidth and per-loop peaks measured by benchmarks/kernels.py (for the fractions)."""
    p = ROOT / f"benchmarks/results/kernels-{_host()}.json"
    if not p.exists():
        return {}
    d = json.loads(p.read_text())
    return {"read_bandwidth_gb_s": d.get("read_bandwidth_gb_s"), "peak": d.get("peak"), "when": d.get("when")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[200, 650, 1500])
    ap.add_argument("--vocab", type=int, default=10_000)
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2, 1])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS)
    ap.add_argument("--loops", nargs="+", default=["best", "avx2", "portable"],
                    help="inner loops to run the engine with ('best' = the host's best; others are forced)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.4, help="seconds per timed repeat")
    ap.add_argument("--quick", action="store_true", help="2 repeats, short budget")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/cpu_engine-<cpu>-<loop>.json)")
    ap.add_argument("--md", default=None, help="Markdown tables (default docs/cpu-engine-results-<cpu>-<loop>.md)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.quick:
        args.repeats, args.budget = 2, 0.1

    from g2quant.targets.cpu import isa
    from g2quant.targets.cpu.target import write_lm_artifact
    from g2quant.targets.cpu.testing import random_lm_weights
    from g2quant.targets.onnx.target import write as write_onnx

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from kernels import TARGETS                                 # the Numba target of each forced loop

    host = isa.host_loops()
    loops = list(dict.fromkeys(host[0] if lp == "best" else lp for lp in args.loops if lp == "best" or lp in host))
    env = dict(os.environ, NUMBA_NUM_THREADS=str(max(args.threads)))
    load_start = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="g2q-bench-") as tmp:

        def loop_env(loop):
            e = dict(env, G2QUANT_KERNEL=loop)
            target = TARGETS.get(loop)
            if target is not None:
                e["NUMBA_CPU_NAME"], e["NUMBA_CPU_FEATURES"] = target
                e["NUMBA_CACHE_DIR"] = str(Path(tmp) / f"numba-{loop}")
            return e

        vocab = [f"w{i}" for i in range(args.vocab)]
        base = {"vocab": args.vocab, "threads": args.threads, "repeats": args.repeats,
                "budget_s": args.budget, "tmp": tmp}
        for H in args.hidden:
            fp32 = 4 * (2 * args.vocab * H + args.vocab + 2 * (8 * H * H + 8 * H))
            for b in args.bits:
                w = random_lm_weights(args.vocab, H, 2, b, seed=b)
                path = write_lm_artifact(Path(tmp) / f"lm{H}-{b}.g2q", w, vocab)
                onnx_paths = {}
                if b == 4:
                    for mode in ("dq", "nbits"):
                        if f"g2quant-onnx-{mode}" in args.peers:
                            onnx_paths[mode] = write_onnx(w.to_graph(), Path(tmp) / f"lm{H}-{b}-{mode}.g2q", weights=mode)
                del w
                for loop in loops:
                    r = _run_worker({**base, "kind": "engine", "hidden": H, "bits": b, "artifact": str(path)},
                                    loop_env(loop))
                    r.update(fp32_bytes=fp32, loop_forced=loop, numba_target=TARGETS.get(loop) or "host")
                    results.append(r)
                    print(f"hidden {H} engine {b}-bit {loop}: {json.dumps(r.get('threads', r.get('error')))}", flush=True)
                for mode, op in onnx_paths.items():
                    r = _run_worker({**base, "kind": f"g2quant-onnx-{mode}", "hidden": H, "bits": b,
                                     "artifact": str(op)}, env)
                    r["fp32_bytes"] = fp32
                    results.append(r)
                    print(f"hidden {H} g2quant-onnx-{mode} {b}-bit: {json.dumps(r.get('threads', r.get('error')))}",
                          flush=True)
            for kind in args.peers:
                if kind.startswith("g2quant-"):
                    continue
                r = _run_worker({**base, "kind": kind, "hidden": H, "bits": 32}, env)
                results.append(r)
                print(f"hidden {H} {kind}: {json.dumps(r.get('threads', r.get('error')))}", flush=True)
        cold = {}
        for loop in loops:                                # Numba compile with an empty cache, per loop
            H, b = args.hidden[0], args.bits[0]
            spec = {**base, "kind": "engine", "hidden": H, "bits": b, "threads": [1], "repeats": 1,
                    "budget_s": 0.01, "artifact": str(Path(tmp) / f"lm{H}-{b}.g2q")}
            e = dict(loop_env(loop), NUMBA_CACHE_DIR=str(Path(tmp) / f"numba-cold-{loop}"))
            t0 = time.perf_counter()
            r = _run_worker(spec, e)
            cold[loop] = {"hidden": H, "bits": b, "load_and_compile_s": r.get("setup_s"),
                          "process_s": time.perf_counter() - t0, "error": r.get("error")}
            print(f"cold-cache load+compile (hidden {H}, {b}-bit, {loop}): {cold[loop]}", flush=True)
    backend = next((r.get("backend") for r in results if r.get("backend")), None)
    try:
        from g2quant.targets.cpu import kernels
        feats = kernels.cpu_features()
    except Exception as exc:  # noqa: BLE001 - report whatever is there
        feats = {"error": repr(exc)}
    meta = {"cpu": platform.processor() or platform.machine(), "when": time.strftime("%Y-%m-%d %H:%M"),
            "hidden": args.hidden, "vocab": args.vocab, "threads": args.threads, "repeats": args.repeats,
            "backend": backend, "cpu_features": feats, "python": platform.python_version(),
            "note": "min over repeats", "loops": loops, "command": "python benchmarks/cpu_engine.py " +
            " ".join(a for a in (argv if argv is not None else sys.argv[1:])),
            "kernels_json": _kernels_reference(),
            "loadavg_1min_start_end": [load_start, os.getloadavg()[0]], "engine_cold_compile": cold,
            "threading_layer": next((r.get("threading_layer") for r in results if r.get("threading_layer")), None)}
    if args.out is None:
        args.out = str(ROOT / f"benchmarks/results/cpu_engine-{_host()}.json")
    if args.md is None:
        args.md = str(ROOT / f"docs/cpu-engine-results-{_host()}.md")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table = {}
    for r in results:
        if r["kind"] not in EXTERNAL and "error" not in r:
            for p in results:
                if p["kind"] in EXTERNAL and "error" not in p and p["hidden"] == r["hidden"]:
                    table[f"hidden {r['hidden']} {_label(r)} vs {p['kind']}"] = ratios(r, p, args.threads)
    goals = {}
    for r in results:
        if r["kind"] == "engine" and r["hidden"] == 650 and r["bits"] == 4 and "error" not in r:
            ort = next((p for p in results if p["kind"] == "onnxruntime-int8-dynamic" and p["hidden"] == 650
                        and "error" not in p), None)
            if ort is not None:
                rt = ratios(r, ort, args.threads)
                goals[r.get("loop_forced")] = {**rt, "goal b1 t1 >= 3x": rt.get("b1 t1", 0) >= 3,
                                               "goal b1 t2 >= 2x": rt.get("b1 t2", 0) >= 2,
                                               "goal b20 >= 1x": min(rt.get(f"b20 t{n}", 0) for n in args.threads) >= 1}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "ratios": table,
                                          "goals_h650_4bit_vs_onnxruntime_int8": goals}, indent=2) + "\n")
    md = markdown(results, meta)
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
