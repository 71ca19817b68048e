"""Mixed precision from the bit allocator against uniform widths, on trained PTB word LMs.

    G2QUANT_DATA=../shared/data python benchmarks/alloc_ptb.py runs/ptb_small/g2-drop-z13/best.safetensors \
        runs/ptb_small/baseline-drop-z13/best.safetensors --gate --qat-batches 1000

For each checkpoint (a row named by its run folder; rows of other runs already in the results file
are kept): the direct sensitivity of every weight matrix at every width (8, 4, 3, 2, ternary,
binary; loss increase on 10k validation tokens with only that matrix quantized, measured with the
hard gates the model is deployed with), then the exact knapsack allocation at sizes between the
uniform 2-bit and uniform 4-bit artifacts of the ``cpu`` target (its own size rule: 3-bit weights
are stored in 4-bit nibbles, so "3 bits on average" is the size halfway between uniform 2 and 4
bits), PTQ with the same hard gates as the uniform rows, and the test perplexity of every point
beside uniform 8/4/2-bit. Also records which width each block got and the time of the sensitivity
pass and of the solver.

``--gate``: the same at the granularity of the LSTM gate blocks (rows i, f, g, o of every ``W_ih``,
``W_hh``; an analysis, since the artifact carries one width per matrix): which gate blocks get
which width at each budget — the hypothesis that saturated i/f blocks need fewer bits than g/o.

``--qat-batches N``: the same QAT budget (N batches of 20 x 20 tokens, SGD lr 2, the same hard
gates and seed) for the mixed allocation at the 3-bit-average size and for uniform 4-bit and
2-bit, then their test perplexity (the issue's goal: mixed at 3 bits <= uniform 4-bit + 1 %).
QAT runs go under ``runs/alloc_qat/`` (git-ignored).

Writes ``benchmarks/results/alloc_ptb.json``.
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


def _ppl(q, tokens) -> float:
    from g2quant.evaluate import lm_perplexity
    return lm_perplexity(q, tokens)["ppl"]


def _qat(model, bits, hard, corpus, batches: int, run_dir: Path, lr: float) -> dict:
    """QAT from the float ``model`` at ``bits`` (a width or a per-matrix map) for ``batches``."""
    import shutil

    from g2quant.api import quantize
    from g2quant.train import TrainConfig, train_lm
    if run_dir.exists():                     # a QAT row that did not finish: start it again
        shutil.rmtree(run_dir)
    q = quantize(model, bits=bits, method="qat", hard_gates=hard)
    tcfg = TrainConfig(epochs=1, lr=lr, decay_after=1, max_batches=batches, seed=0)
    t0 = time.perf_counter()
    train_lm(q, corpus.train, corpus.valid, tcfg, run_dir, progress=False, kind="quantized_word_lm",
             record_extra={"config": model.config.to_dict(), "quant_config": q.config.to_dict()}, log=lambda s: None)
    q.eval()
    return {"size_bytes": q.size_bytes(target="cpu"), "test_ppl": _ppl(q, corpus.test),
            "valid_ppl": _ppl(q, corpus.valid), "seconds": time.perf_counter() - t0}


def _bits_per_gate(widths: dict, blocks: list[dict]) -> dict:
    """Parameter-weighted mean stored bits per gate letter (and for the other matrices)."""
    acc: dict = {}
    for b in blocks:
        key = b["name"][-2] if b["name"].endswith("]") else b["kind"]
        n = (b["rows"][1] - b["rows"][0]) * b["cols"]
        w = widths[b["name"]]
        bits = {"ternary": 2, "binary": 1}.get(str(w), None) or int(w)
        s, c = acc.get(key, (0.0, 0))
        acc[key] = (s + bits * n, c + n)
    return {k: s / c for k, (s, c) in acc.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--calib-tokens", type=int, default=10_000)
    ap.add_argument("--hard-gates", default=None, help="default: if for LSTMs, rz for GRUs")
    ap.add_argument("--gate", action="store_true", help="also allocate at LSTM gate-block granularity (analysis)")
    ap.add_argument("--qat-batches", type=int, default=0, help="QAT comparison at the 3-bit size (0: skip)")
    ap.add_argument("--qat-lr", type=float, default=2.0)
    ap.add_argument("--reuse", action="store_true", help="reuse the sensitivity tables (and the QAT rows, where the "
                    "allocations are unchanged) of this checkpoint's row in --out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/alloc_ptb.json"))
    args = ap.parse_args(argv)
    if args.qat_batches < 0 or args.calib_tokens < 1:
        ap.error("--qat-batches must be >= 0 and --calib-tokens >= 1")
    torch.set_num_threads(args.threads)
    from g2quant.allocate import allocate, sensitivity
    from g2quant.api import quantize
    from g2quant.checkpoint import load_model
    from g2quant.data.ptb import load_ptb
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results_merge import with_earlier_rows

    corpus = load_ptb(None)
    command = "python benchmarks/alloc_ptb.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    earlier = json.loads(Path(args.out).read_text()).get("models", []) if Path(args.out).exists() else []

    def save():
        out = {"benchmark": "alloc_ptb", "command": command, "when": time.strftime("%Y-%m-%d %H:%M"),
               "target": "cpu", "models": with_earlier_rows([dict(r) for r in rows], Path(args.out))}
        tmp = Path(args.out).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(args.out)

    for ck in args.checkpoints:
        model, rec = load_model(ck)
        name = Path(ck).parent.name
        cell = getattr(model.config, "cell", "lstm")
        hard = args.hard_gates if args.hard_gates is not None else ("if" if cell == "lstm" else "rz")
        model.eval()
        prev = next((r for r in earlier if r.get("model") == name and r["sensitivity"].get("hard_gates") == hard
                     and r["sensitivity"].get("calib_tokens") == args.calib_tokens), None) if args.reuse else None
        t0 = time.perf_counter()
        if prev is not None:                 # the measured tables of an earlier run of this checkpoint
            sens, sens_s = prev["sensitivity"], prev["sensitivity_seconds"]
        else:
            sens = sensitivity(model, corpus.valid[:args.calib_tokens], hard_gates=hard)
            sens_s = time.perf_counter() - t0
        print(f"{name}: sensitivity of {len(sens['blocks'])} matrices x {len(sens['widths'])} widths in {sens_s:.0f} s",
              flush=True)
        uniform = {}
        for w in (8, 4, 2):
            q = quantize(model, bits=w, hard_gates=hard)
            uniform[str(w)] = {"size_bytes": q.size_bytes(target="cpu"), "test_ppl": _ppl(q, corpus.test)}
            print(f"{name}: uniform {w}-bit {uniform[str(w)]['size_bytes']:,} B, test ppl {uniform[str(w)]['test_ppl']:.2f}",
                  flush=True)
        lo, hi = uniform["2"]["size_bytes"], uniform["4"]["size_bytes"]
        budgets = {f: int(lo + f * (hi - lo)) for f in FRACTIONS}
        points, allocs = [], {}
        for f, budget in budgets.items():
            t1 = time.perf_counter()
            a = allocate(model, sens=sens, budget=budget, target="cpu")
            solve_s = time.perf_counter() - t1
            allocs[f] = a
            q = quantize(model, bits=a.bits_map(), hard_gates=hard)
            p = {"avg_bits_equivalent": 2 + 2 * f, "budget_bytes": budget, "size_bytes": q.size_bytes(target="cpu"),
                 "widths": a.widths, "predicted_sensitivity": a.predicted["sensitivity"], "solve_seconds": solve_s,
                 "test_ppl": _ppl(q, corpus.test)}
            points.append(p)
            print(f"  budget {budget:,} B (~{p['avg_bits_equivalent']:.1f} bits): {p['size_bytes']:,} B, test ppl "
                  f"{p['test_ppl']:.2f}; {', '.join(f'{k}={v}' for k, v in a.widths.items())}", flush=True)
        row = {"model": name, "checkpoint": ck, "cell": cell, "gates": model.config.gates,
               "noise_p": model.config.noise_p, "dropout": model.config.dropout, "hard_gates": hard,
               "sensitivity": sens, "sensitivity_seconds": sens_s, "uniform": uniform, "mixed": points}
        rows.append(row)
        save()
        if args.gate and cell == "lstm":
            t0 = time.perf_counter()
            if prev is not None and "gate" in prev:
                gsens, g_s = prev["gate"]["sensitivity"], prev["gate"]["sensitivity_seconds"]
            else:
                gsens = sensitivity(model, corpus.valid[:args.calib_tokens], hard_gates=hard, granularity="gate")
                g_s = time.perf_counter() - t0
            gpoints = []
            for f, budget in budgets.items():
                t1 = time.perf_counter()
                a = allocate(model, sens=gsens, budget=budget, target="cpu")
                gpoints.append({"avg_bits_equivalent": 2 + 2 * f, "budget_bytes": budget, "widths": a.widths,
                                "predicted_bytes": a.predicted["bytes"], "predicted_sensitivity": a.predicted["sensitivity"],
                                "mean_bits_by_gate": _bits_per_gate(a.widths, gsens["blocks"]),
                                "solve_seconds": time.perf_counter() - t1})
                print(f"  gate blocks, ~{2 + 2 * f:.1f} bits: mean bits " +
                      ", ".join(f"{k} {v:.2f}" for k, v in gpoints[-1]["mean_bits_by_gate"].items()), flush=True)
            row["gate"] = {"sensitivity": gsens, "sensitivity_seconds": g_s, "points": gpoints}
            save()
        old_qat = (prev or {}).get("qat")
        if old_qat and not args.qat_batches and next((p for p in prev["mixed"] if p["avg_bits_equivalent"] == 3.0),
                                                     {}).get("widths") == allocs[0.5].widths \
                and next((p for p in prev["mixed"] if p["avg_bits_equivalent"] == 2.0), {}).get("widths") == allocs[0.0].widths:
            row["qat"] = old_qat             # the same allocations: the earlier QAT rows still describe them
            save()
        if args.qat_batches:
            qat = {"batches": args.qat_batches, "lr": args.qat_lr, "rows": {}}
            runs = Path(ROOT / "runs" / "alloc_qat" / name)
            for label, bits in (("mixed-3bit", allocs[0.5].bits_map()), ("uniform-4", 4), ("uniform-2", 2),
                                ("mixed-2bit", allocs[0.0].bits_map())):
                qat["rows"][label] = _qat(model, bits, hard, corpus, args.qat_batches, runs / label, args.qat_lr)
                r = qat["rows"][label]
                print(f"  QAT {label}: {r['size_bytes']:,} B, test ppl {r['test_ppl']:.2f} ({r['seconds']:.0f} s)",
                      flush=True)
                row["qat"] = qat
                save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
