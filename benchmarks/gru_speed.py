"""CPU engine GRU vs torch / onnxruntime peers on 2-layer GRU word LMs (random weights).

    python benchmarks/gru_speed.py                        # hidden 200 and 650, vocab 10k, 4-bit
    python benchmarks/gru_speed.py --hidden 650 --bits 4 2 --quick

The engine runs g2quant artifacts of a ``WordLM(cell="gru")`` (embedding -> 2 GRU layers ->
10k logits, emb = hidden), quantized by ``g2quant.quantize`` (soft gates and hard r, z gates)
and exported to the ``cpu`` target; the inner loop is the host's (``G2QUANT_KERNEL`` forces
another). The peers run the same fp32 model: torch ``nn.GRU``, torch int8 dynamic
(``quantize_dynamic`` on GRU + Linear), onnxruntime fp32 (``torch.onnx.export(dynamo=False)``:
an ONNX ``GRU`` op) and onnxruntime int8 dynamic (``quantize_dynamic``; onnxruntime quantizes the
MatMul of the decoder but has no quantized GRU, so the GRU stays fp32). Measured with 1 and 2
threads: batch-1 streaming latency per token (state carried) and scoring throughput at batch 20 x
35 steps (every runtime with its sequence API). Each runner runs in its own subprocess; times
are the minimum over repeats. Writes ``benchmarks/results/gru_speed.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("torch-gru", "torch-int8-dynamic", "onnxruntime-fp32", "onnxruntime-int8-dynamic")
EXTERNAL = PEERS


sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_engine import _calibrated  # noqa: E402  (the same timing rule as the LSTM engine benchmark)


def _model(V, H):
    import torch

    from g2quant.models import LMConfig, WordLM
    torch.manual_seed(0)
    return WordLM(LMConfig(vocab_size=V, emb_size=H, hidden_size=H, cell="gru")).eval()


def _engine(spec):
    import warnings

    import g2quant
    q = g2quant.quantize(_model(spec["vocab"], spec["hidden"]), bits=spec["bits"], hard_gates=spec["hard"])
    path = Path(spec["tmp"]) / f"gru{spec['hidden']}-{spec['bits']}-{spec['hard'] or 'soft'}.g2q"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # random weights: hard gates change the output
        q.export(path, target="cpu")
    t0 = time.perf_counter()
    eng = g2quant.load(path)
    setup = time.perf_counter() - t0
    info = eng.info()
    st1, stb = eng.initial_state(1), {"b": eng.initial_state(20)}
    toks = np.random.default_rng(0).integers(0, spec["vocab"], size=(64, 20)).astype(np.int64)
    i = {"i": 0}

    def stream():
        i["i"] = (i["i"] + 1) & 63
        eng.step_(toks[i["i"], :1], st1)

    def scoring():
        _, stb["b"] = eng.run(toks[:35], stb["b"])

    def set_threads(n):
        eng.threads = n
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return setup, set_threads, stream, scoring, {"loop": info["loop"], "reference_nodes": info["reference_nodes"],
                                                 "size_bytes": size}


def _torch(spec):
    import torch
    torch.set_grad_enabled(False)
    V, H, kind = spec["vocab"], spec["hidden"], spec["kind"]
    t0 = time.perf_counter()
    nn = torch.nn

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.rnn, self.dec = nn.Embedding(V, H), nn.GRU(H, H, 2), nn.Linear(H, V)

        def forward(self, tok, h):
            o, h = self.rnn(self.emb(tok), h)
            return self.dec(o), h
    torch.manual_seed(0)
    m = LM().eval()
    fp32 = sum(p.numel() * 4 for p in m.parameters())
    toks = torch.randint(0, V, (64, 20))
    z1, zb = torch.zeros(2, 1, H), torch.zeros(2, 20, H)
    st = {"h": z1, "i": 0}
    extra = {"size_bytes": fp32}
    if kind == "torch-int8-dynamic":
        m = torch.ao.quantization.quantize_dynamic(m, {nn.GRU, nn.Linear}, dtype=torch.qint8)
        extra["size_bytes"] = None
    if kind.startswith("onnxruntime"):
        import onnxruntime as ort
        path = os.path.join(spec["tmp"], f"gru{H}.onnx")
        torch.onnx.export(m, (toks[:1, :1], z1), path, dynamo=False, input_names=["tok", "h0"],
                          output_names=["logits", "h"],
                          dynamic_axes={"tok": {0: "T", 1: "B"}, "h0": {1: "B"}, "logits": {0: "T", 1: "B"},
                                        "h": {1: "B"}})
        if kind == "onnxruntime-int8-dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic
            qpath = path.replace(".onnx", "-int8.onnx")
            quantize_dynamic(path, qpath, weight_type=QuantType.QInt8)
            path = qpath
        extra["size_bytes"] = os.path.getsize(path)
        sessions, cur = {}, {"n": 1}

        def session(n):
            if n not in sessions:
                so = ort.SessionOptions()
                so.intra_op_num_threads, so.inter_op_num_threads = n, 1
                sessions[n] = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            return sessions[n]
        tok_np, o1, zb_np = toks.numpy(), {"h0": z1.numpy()}, zb.numpy()

        def stream():
            st["i"] = (st["i"] + 1) & 63
            _, o1["h0"] = session(cur["n"]).run(None, {"tok": tok_np[st["i"]:st["i"] + 1, :1], **o1})

        def scoring():
            session(cur["n"]).run(None, {"tok": tok_np[:35], "h0": zb_np})

        def set_threads(n):
            cur["n"] = n
        return time.perf_counter() - t0, set_threads, stream, scoring, extra

    def stream():  # noqa: F811
        st["i"] = (st["i"] + 1) & 63
        _, st["h"] = m(toks[st["i"]:st["i"] + 1, :1], st["h"])

    def scoring():  # noqa: F811
        m(toks[:35], zb)
    return time.perf_counter() - t0, torch.set_num_threads, stream, scoring, extra


def worker(spec: dict) -> dict:
    setup, set_threads, stream, scoring, extra = (_engine if spec["kind"] == "engine" else _torch)(spec)
    res = {**{k: spec[k] for k in ("kind", "hidden", "vocab", "bits", "hard")}, **extra, "setup_s": setup,
           "threads": {}}
    for n in spec["threads"]:
        set_threads(n)
        stream()
        lat = _calibrated(stream, spec["repeats"], spec["budget_s"])
        scoring()
        sc = _calibrated(scoring, spec["repeats"], spec["budget_s"])
        res["threads"][str(n)] = {"ms_per_token_b1": lat * 1e3, "score_tokens_per_s_b20x35": 700 / sc}
    res["loadavg_1min"] = os.getloadavg()[0]
    return res


def _run_worker(spec):
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                       timeout=1800)
    if r.returncode != 0:
        return {**spec, "error": (r.stderr.strip().splitlines() or [f"rc {r.returncode}"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _label(r):
    if r["kind"] == "engine":
        return f"engine {r['bits']}-bit {'hard ' + r['hard'] if r['hard'] else 'soft'} ({r.get('loop')})"
    return r["kind"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, nargs="+", default=[200, 650])
    ap.add_argument("--vocab", type=int, default=10_000)
    ap.add_argument("--bits", type=int, nargs="+", default=[4])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.4, help="seconds per timed repeat")
    ap.add_argument("--quick", action="store_true", help="2 repeats, short budget")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/gru_speed.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.quick:
        args.repeats, args.budget = 2, 0.15
    from g2quant.targets.cpu import isa
    load0 = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base = {"vocab": args.vocab, "threads": args.threads, "repeats": args.repeats, "budget_s": args.budget,
                "tmp": tmp}
        for H in args.hidden:
            specs = [{**base, "kind": "engine", "hidden": H, "bits": b, "hard": hard}
                     for b in args.bits for hard in ("", "rz")]
            specs += [{**base, "kind": k, "hidden": H, "bits": 32, "hard": ""} for k in PEERS]
            for spec in specs:
                r = _run_worker(spec)
                results.append(r)
                print(f"hidden {H} {_label(r)}: {r['error'] if 'error' in r else json.dumps(r['threads'])}", flush=True)
    ratios = {}
    for H in args.hidden:
        ok = [r for r in results if r["hidden"] == H and "error" not in r]
        peers = [r for r in ok if r["kind"] in EXTERNAL]
        for e in (r for r in ok if r["kind"] == "engine"):
            row = {}
            for n in map(str, args.threads):
                bp = min(peers, key=lambda p: p["threads"][n]["ms_per_token_b1"])
                bs = max(peers, key=lambda p: p["threads"][n]["score_tokens_per_s_b20x35"])
                row[f"b1 t{n} vs best peer ({bp['kind']})"] = (bp["threads"][n]["ms_per_token_b1"]
                                                              / e["threads"][n]["ms_per_token_b1"])
                row[f"b20 t{n} vs best peer ({bs['kind']})"] = (e["threads"][n]["score_tokens_per_s_b20x35"]
                                                               / bs["threads"][n]["score_tokens_per_s_b20x35"])
            ratios[f"hidden {H} {_label(e)}"] = row
    meta = {"command": "python benchmarks/gru_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "when": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(), "kernels": isa.describe(),
            "cpus": os.cpu_count(), "loadavg_1min_start_end": [load0, os.getloadavg()[0]],
            "note": "min over repeats; ratios > 1 mean the engine is faster (b1: peer ms / engine ms; b20: engine "
                    "tok/s / peer tok/s)"}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "ratios": ratios}, indent=1))
    print(json.dumps(ratios, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
