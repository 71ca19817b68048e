"""Training-step speed of the LSTM layers, side by side in one run (forward + backward).

    python benchmarks/lstm_speed.py [--threads 2] [--repeats 30]

Shape: seq 35, batch 20, 2 layers x 200 (PTB "small"), CPU. Writes
benchmarks/results/lstm_speed.json with ms per step (min and median over repeats) and the
ratio to torch.nn.LSTM for: G2LSTM (sigmoid / gumbel / sharpened / gumbel with hard i,f),
the QAT layer (QuantG2LSTM, 4-bit weights, int8 activations, gumbel gates) and Brevitas
QuantLSTM (4-bit weights, its defaults otherwise: int8 inputs/outputs and gate activations).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from g2quant.api import quantize
from g2quant.nn import G2LSTM
from g2quant.targets.cpu.isa import cpu_model

ROOT = Path(__file__).resolve().parent.parent
T, B, H, L = 35, 20, 200, 2


def time_step(module, x, repeats: int) -> tuple[float, float]:
    module.train()
    for _ in range(3):
        out = module(x)[0]
        out.float().sum().backward()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = module(x)[0]
        out.float().sum().backward()
        ts.append(time.perf_counter() - t0)
    return min(ts) * 1e3, statistics.median(ts) * 1e3


def brevitas_lstm():
    from brevitas.nn import QuantLSTM
    return QuantLSTM(H, H, num_layers=L, weight_bit_width=4)   # Brevitas defaults otherwise (int8 I/O, gates)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--skip-brevitas", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lstm_speed.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(T, B, H)
    base = nn.LSTM(H, H, L)
    # QAT of a G2-LSTM layer: Gumbel gates + 4-bit weights (fake-quantized once per forward) + int8 acts
    qat = quantize(G2LSTM.from_lstm(base, gates="gumbel", tau=0.9), bits=4, method="qat")
    candidates = {
        "torch nn.LSTM": base,
        "G2LSTM sigmoid": G2LSTM.from_lstm(base, gates="sigmoid"),
        "G2LSTM gumbel": G2LSTM.from_lstm(base, gates="gumbel", tau=0.9),
        "G2LSTM sharpened": G2LSTM.from_lstm(base, gates="sharpened", tau=0.2),
        "G2LSTM gumbel, hard i,f (STE)": G2LSTM.from_lstm(base, gates="gumbel", hard_gates="if"),
        "QAT QuantG2LSTM gumbel, W4 A8": qat,
    }
    if not args.skip_brevitas:
        candidates["Brevitas QuantLSTM W4"] = brevitas_lstm()
    rows = []
    for name, mod in candidates.items():
        tmin, tmed = time_step(mod, x, args.repeats if "Brevitas" not in name else max(3, args.repeats // 6))
        rows.append({"layer": name, "ms_min": tmin, "ms_median": tmed})
        print(f"{name:34s} {tmin:8.2f} ms (median {tmed:.2f})", flush=True)
    ref = rows[0]["ms_min"]
    for r in rows:
        r["ratio_vs_nn_lstm"] = r["ms_min"] / ref
    result = {"benchmark": "lstm_speed", "command": "python benchmarks/lstm_speed.py --threads "
              f"{args.threads}", "shape": {"seq": T, "batch": B, "hidden": H, "layers": L},
              "threads": args.threads, "torch": torch.__version__, "machine": cpu_model(),
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("\n| layer | ms / step (fwd+bwd) | × nn.LSTM |\n|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['ms_min']:.2f} | {r['ratio_vs_nn_lstm']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
