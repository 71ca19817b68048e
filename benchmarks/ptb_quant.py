"""PTB small: quantization trade-offs and the paper's compression analysis, from the float
checkpoints that benchmarks/ptb_lm.py trains (runs/ptb_small/<model>/best.safetensors).

    G2QUANT_DATA=../shared/data python benchmarks/ptb_quant.py sweep --model g2 --threads 1
    G2QUANT_DATA=../shared/data python benchmarks/ptb_quant.py sweep --model baseline --threads 1
    G2QUANT_DATA=../shared/data python benchmarks/ptb_quant.py compress
    G2QUANT_DATA=../shared/data python benchmarks/ptb_quant.py collect

`sweep` runs g2quant.report.tradeoff (bits {8,6,4,3,2,ternary,binary} x {PTQ, QAT} x
{soft, hard i/f gates}; QAT = short fine-tuning, see --qat-batches) and is resumable.
`compress` evaluates round (r=0.2), round&clip (c=0.4) and SVD (rank H/4) of the input/forget
gate weights. `collect` writes benchmarks/results/ptb_quant.json and prints Markdown tables.
Test perplexity: batch 10, bptt 35, state carried across batches.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from g2quant.checkpoint import load_model
from g2quant.compress import compress_gates
from g2quant.data.ptb import load_ptb
from g2quant.evaluate import lm_perplexity
from g2quant.report import QATSettings, plot, tradeoff
from g2quant.targets.cpu.isa import cpu_model

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("baseline", "g2", "sharpened")


def _ckpt(args, name):
    p = Path(args.ckpts) / name / "best.safetensors"
    if not p.exists():
        sys.exit(f"{p} is missing: train it with benchmarks/ptb_lm.py train --model {name}")
    return p


def cmd_sweep(args) -> int:
    torch.set_num_threads(args.threads)
    corpus = load_ptb(args.data_dir)
    model, _ = load_model(_ckpt(args, args.model))
    t0 = time.time()
    tradeoff(model, eval_data=corpus.test, train_data=corpus.train, valid_data=corpus.valid[:20_000],
             out_dir=Path(args.out) / args.model, name=f"PTB small {args.model}",
             gate_modes=tuple(args.gates.split(",")), methods=tuple(args.methods.split(",")),
             qat=QATSettings(max_batches=args.qat_batches, lr=args.qat_lr), progress=False,
             hard_gates=args.hard_gates)
    print(f"{args.model}: sweep done in {time.time() - t0:.0f}s")
    return 0


def cmd_compress(args) -> int:
    torch.set_num_threads(args.threads)
    corpus = load_ptb(args.data_dir)
    rows = []
    for name in MODELS:
        model, _ = load_model(_ckpt(args, name))
        row = {"model": name, "original": lm_perplexity(model, corpus.test)["ppl"]}
        for method in ("round", "round_clip", "svd"):
            row[method] = lm_perplexity(compress_gates(model, method, gates="if", r=0.2, c=0.4), corpus.test)["ppl"]
        row["svd_rank"] = model.config.hidden_size // 4
        rows.append(row)
        print(row, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compress.json").write_text(json.dumps(rows, indent=1))
    return 0


def cmd_collect(args) -> int:
    out = Path(args.out)
    result = {"benchmark": "ptb_quant", "command": __doc__.strip().splitlines()[3:7],
              "machine": cpu_model(), "torch": torch.__version__, "models": {}}
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    found = sorted(p.parent.name for p in out.glob("*/results.json"))
    for name in [n for n in MODELS if n in found] + [n for n in found if n not in MODELS]:
        p = out / name / "results.json"
        if p.exists():
            result["models"][name] = json.loads(p.read_text())
            if (out / name / "tradeoff.png").exists():
                shutil.copy(out / name / "tradeoff.png", img / f"tradeoff_ptb_small_{name}.png")
    if (out / "compress.json").exists():
        result["compress"] = json.loads((out / "compress.json").read_text())
    dest = ROOT / "benchmarks" / "results" / "ptb_quant.json"
    if dest.exists():          # models swept in an earlier session (their run folders are gone) stay
        old = json.loads(dest.read_text())
        for name, res in old.get("models", {}).items():
            result["models"].setdefault(name, res)
        if "compress" not in result and "compress" in old:
            result["compress"] = old["compress"]
    dest.write_text(json.dumps(result, indent=1))
    # one combined plot: hard-gate QAT of every model
    rows = []
    for name, res in result["models"].items():
        for r in res["rows"]:
            if r["method"] in ("qat", "float") and r["gates"] == "hard" and r.get("hard_gates", "if") == "if":
                rows.append(r)
    if rows:
        plot(rows, img / "tradeoff_ptb_small_all.png", title="PTB small: QAT with hard i/f gates (all models)")
    # table: ppl (Δ vs float with soft gates) per width, for each model and method/gate mode
    names = list(result["models"])
    cols = [("ptq", "soft"), ("ptq", "hard"), ("qat", "soft"), ("qat", "hard")]
    for n in names:
        rows_n = result["models"][n]["rows"]
        by = {(r["bits"], r["method"], r["gates"]): r for r in rows_n}
        fl = {g: by[("float", "float", g)]["ppl"] for g in ("soft", "hard") if ("float", "float", g) in by}
        print(f"\n**{n}** (float: {fl.get('soft', float('nan')):.1f} soft gates, "
              f"{fl.get('hard', float('nan')):.1f} hard i/f gates)\n")
        print("| weights | MB | PTQ soft | PTQ hard | QAT soft | QAT hard | QAT hard vs float hard |")
        print("|---|---|---|---|---|---|---|")
        widths = [r["bits"] for r in rows_n if r["method"] == "ptq" and r["gates"] == "soft"]
        for w in widths:
            cells = []
            for m, g in cols:
                r = by.get((w, m, g))
                cells.append("–" if r is None else f"{r['ppl']:.1f} ({r['delta_ppl_pct']:+.1f} %)")
            qh = by.get((w, "qat", "hard"))
            rel = "–" if qh is None or "hard" not in fl else f"{100 * (qh['ppl'] / fl['hard'] - 1):+.1f} %"
            print(f"| {w} | {by[(w, 'ptq', 'soft')]['size_bytes'] / 1e6:.2f} | " + " | ".join(cells) + f" | {rel} |")
    if "compress" in result:
        print("\n| model | original | round (r=0.2) | round & clip (c=0.4) | SVD (rank H/4) |\n|---|---|---|---|---|")
        for r in result["compress"]:
            print(f"| {r['model']} | {r['original']:.1f} | {r['round']:.1f} | {r['round_clip']:.1f} | {r['svd']:.1f} |")
    print(f"\nwrote {dest}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--model", required=True, help="a run folder under --ckpts (baseline, g2, sharpened, gru-g2-r, ...)")
    s.add_argument("--hard-gates", default=None, help="gates of the hard rows (default: those the model trained as "
                                                      "Gumbel gates)")
    s.add_argument("--gates", default="soft,hard")
    s.add_argument("--methods", default="ptq,qat")
    s.add_argument("--qat-batches", type=int, default=300)
    s.add_argument("--qat-lr", type=float, default=2.0)
    c = sub.add_parser("compress")
    co = sub.add_parser("collect")
    for p in (s, c, co):
        p.add_argument("--ckpts", default=str(ROOT / "runs" / "ptb_small"))
        p.add_argument("--out", default=str(ROOT / "runs" / "ptb_quant"))
        p.add_argument("--data-dir", default=None)
        p.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    return {"sweep": cmd_sweep, "compress": cmd_compress, "collect": cmd_collect}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
