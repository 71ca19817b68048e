"""Mixed precision from the bit allocator against uniform widths, on trained PTB word LMs.

    G2QUANT_DATA=../shared/data python benchmarks/alloc_ptb.py runs/ptb_small/gru-g2/best.safetensors \\
        runs/ptb_small/gru-baseline/best.safetensors

For each checkpoint: the direct sensitivity of every weight matrix at every width (8, 4, 3, 2,
ternary, binary; loss increase on 10k validation tokens with only that matrix quantized), then the
exact knapsack allocation at sizes between the uniform 2-bit and uniform 4-bit artifacts of the
``cpu`` target (its own size rule: 3-bit weights are stored in 4-bit nibbles, so "3 bits on
average" is the size halfway between uniform 2 and 4 bits), PTQ with the same hard gates as the
uniform rows, and the test perplexity of every point beside uniform 8/4/2-bit. Also records which
width each block got and the time of the sensitivity pass and of the solver. Writes
``benchmarks/results/alloc_ptb.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)      # of the way from the uniform 2-bit size to the 4-bit size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--calib-tokens", type=int, default=10_000)
    ap.add_argument("--hard-gates", default=None, help="default: if for LSTMs, rz for GRUs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/alloc_ptb.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from g2quant.allocate import allocate, sensitivity
    from g2quant.api import quantize
    from g2quant.checkpoint import load_model
    from g2quant.data.ptb import load_ptb
    from g2quant.evaluate import lm_perplexity

    corpus = load_ptb(None)
    out = {"command": "python benchmarks/alloc_ptb.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "when": time.strftime("%Y-%m-%d %H:%M"), "target": "cpu", "models": []}
    for ck in args.checkpoints:
        model, rec = load_model(ck)
        cell = getattr(model.config, "cell", "lstm")
        hard = args.hard_gates if args.hard_gates is not None else ("if" if cell == "lstm" else "rz")
        model.eval()
        t0 = time.perf_counter()
        sens = sensitivity(model, corpus.valid[:args.calib_tokens])
        sens_s = time.perf_counter() - t0
        uniform = {}
        for w in (8, 4, 2):
            q = quantize(model, bits=w, hard_gates=hard)
            uniform[str(w)] = {"size_bytes": q.size_bytes(target="cpu"), "test_ppl": lm_perplexity(q, corpus.test)["ppl"]}
            print(f"{ck}: uniform {w}-bit {uniform[str(w)]['size_bytes']:,} B, test ppl {uniform[str(w)]['test_ppl']:.2f}",
                  flush=True)
        lo, hi = uniform["2"]["size_bytes"], uniform["4"]["size_bytes"]
        points = []
        for f in FRACTIONS:
            budget = int(lo + f * (hi - lo))
            t1 = time.perf_counter()
            a = allocate(model, sens=sens, budget=budget, target="cpu")
            solve_s = time.perf_counter() - t1
            q = quantize(model, bits=a.bits_map(), hard_gates=hard)
            p = {"avg_bits_equivalent": 2 + 2 * f, "budget_bytes": budget, "size_bytes": q.size_bytes(target="cpu"),
                 "widths": a.widths, "predicted_sensitivity": a.predicted["sensitivity"], "solve_seconds": solve_s,
                 "test_ppl": lm_perplexity(q, corpus.test)["ppl"]}
            points.append(p)
            print(f"  budget {budget:,} B (~{p['avg_bits_equivalent']:.1f} bits): {p['size_bytes']:,} B, test ppl "
                  f"{p['test_ppl']:.2f}; {', '.join(f'{k}={v}' for k, v in a.widths.items())}", flush=True)
        out["models"].append({"checkpoint": ck, "cell": cell, "gates": model.config.gates, "hard_gates": hard,
                              "sensitivity": sens, "sensitivity_seconds": sens_s, "uniform": uniform, "mixed": points})
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
