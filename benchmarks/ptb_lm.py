"""PTB "small" (2 x 200, Zaremba et al. 2014): baseline LSTM vs G2-LSTM vs sharpened sigmoid.

Train one model (resumable; checkpoints under --out, which is git-ignored):
    G2QUANT_DATA=../shared/data python benchmarks/ptb_lm.py train --model g2 --threads 1
Collect every trained model into benchmarks/results/ptb_small.json and print the Markdown table:
    G2QUANT_DATA=../shared/data python benchmarks/ptb_lm.py collect

Same seed, schedule and epochs for all three: SGD lr 20 on the per-token mean loss (= lr 1 on
the loss summed over 20 steps), clip 0.25, batch 20, bptt 20. Zaremba et al. train 13 epochs
(x0.5 per epoch after epoch 4); on this 2-core machine the default is a compressed schedule of
6 epochs, x0.5 per epoch after epoch 2 (--epochs 13 --decay-after 4 gives the original). Test perplexity: batch 10, bptt 35, hidden state carried across batches.

The full Zaremba schedule with dropout 0.25 and the authors' noise probability (the accuracy issue):
    G2QUANT_DATA=../shared/data python benchmarks/ptb_lm.py train --model g2-drop --name g2-drop-z13 \
        --epochs 13 --decay-after 4
(--name: the run folder, so runs of one preset on several schedules sit side by side; rerunning
the same command resumes it.) G2 started from the baseline, as the authors do for translation:
    ... train --model baseline-drop --name baseline-drop-e4 --epochs 4 --decay-after 4
    ... train --model g2-drop-p1 --name g2-from-baseline-e4 --epochs 13 --decay-after 4 \
        --init-from runs/ptb_small/baseline-drop-e4/last.safetensors `collect` gathers every run folder under --out and plots the
validation curves of each schedule (docs/img/ptb_curves.png).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from g2quant.checkpoint import load_model
from g2quant.data.ptb import load_ptb
from g2quant.evaluate import lm_perplexity
from g2quant.models import LMConfig, WordLM
from g2quant.nn import GateRecorder
from g2quant.train import TrainConfig, train_lm
from g2quant.targets.cpu.isa import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_merge import with_earlier_rows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS = {  # name -> LMConfig overrides (tau from the paper)
    "baseline": dict(gates="sigmoid"),
    "g2": dict(gates="gumbel", tau=0.9, noise_p=1.0),
    "sharpened": dict(gates="sharpened", tau=0.2),
    # the GRU family (G2-GRU issue): Gumbel r and z gates, the same tau and noise as the LSTM's
    "gru-baseline": dict(cell="gru", gates="sigmoid"),
    "gru-g2": dict(cell="gru", gates="gumbel", tau=0.9, noise_p=1.0),
    "gru-sharpened": dict(cell="gru", gates="sharpened", tau=0.2),
    # which GRU gate to make Gumbel (the issue asks to measure each): only r, only z
    "gru-g2-r": dict(cell="gru", gates="gumbel", tau=0.9, noise_p=1.0, gumbel_gates="r"),
    "gru-g2-z": dict(cell="gru", gates="gumbel", tau=0.9, noise_p=1.0, gumbel_gates="z"),
    # the accuracy issue's grid: dropout 0.25 (embeddings, between layers, before the decoder) and
    # the authors' noise probability p = 0.2 (their code applies the Gumbel noise to 20 % of elements)
    "baseline-drop": dict(gates="sigmoid", dropout=0.25),
    "g2-drop": dict(gates="gumbel", tau=0.9, noise_p=0.2, dropout=0.25),
    "g2-drop-p1": dict(gates="gumbel", tau=0.9, noise_p=1.0, dropout=0.25),
    "g2-p02": dict(gates="gumbel", tau=0.9, noise_p=0.2),
    "sharpened-drop": dict(gates="sharpened", tau=0.2, dropout=0.25),
}
HARD_SETS = {"lstm": ("if", "ifo"), "gru": ("r", "z", "rz")}


def evaluate_model(name: str, ckpt: Path, corpus, img_dir: Path) -> dict:
    model, record = load_model(ckpt)
    res = {"model": name, "config": record["config"], "epochs": record["epoch"] + 1,
           "history": record["history"]}
    res["valid_ppl"] = lm_perplexity(model, corpus.valid)["ppl"]
    test = lm_perplexity(model, corpus.test)
    res["test_ppl"] = test["ppl"]
    res["eval"] = {"batch_size": test["batch_size"], "bptt": test["bptt"]}
    with GateRecorder(model) as rec:
        lm_perplexity(model, corpus.valid)
    res["gate_saturation_valid"] = rec.stats.summary()
    img_dir.mkdir(parents=True, exist_ok=True)
    rec.stats.plot(img_dir / f"gates_ptb_small_{name}.png", title=f"PTB small, {name}: gate values on valid")
    for hard in HARD_SETS[model.config.cell]:
        model.rnn.hard_gates = frozenset(hard)
        res[f"test_ppl_hard_{hard}"] = lm_perplexity(model, corpus.test)["ppl"]
    model.rnn.hard_gates = frozenset()
    return res


def cmd_train(args) -> int:
    torch.set_num_threads(args.threads)
    corpus = load_ptb(args.data_dir)
    tcfg = TrainConfig(epochs=args.epochs, decay_after=args.decay_after, seed=args.seed)
    name = args.name or args.model
    out = Path(args.out) / name
    torch.manual_seed(args.seed)
    model = WordLM(LMConfig.preset("small", vocab_size=len(corpus.vocab), **MODELS[args.model]))
    t0 = time.time()
    resume = (out / "last.safetensors").exists()
    r = train_lm(model, corpus.train, corpus.valid, tcfg, out, resume=resume, progress=not args.quiet,
                 init_from=args.init_from)
    wall = time.time() - t0
    res = evaluate_model(name, out / "best.safetensors", corpus, ROOT / "docs" / "img")
    res["preset"] = args.model
    init = [h for h in r.history if h.get("init")]
    if init:
        res["init_from"] = {"path": str(args.init_from) if args.init_from else "(resumed)", "epochs": len(init)}
    res["train_wall_seconds_this_run"] = wall
    res["train_seconds_total"] = sum(h["seconds"] for h in r.history)
    res["threads"] = args.threads
    res["train_config"] = {k: getattr(tcfg, k) for k in tcfg.__dataclass_fields__}
    (out / "result.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k in ("model", "valid_ppl", "test_ppl") or k.startswith("test_ppl_hard")}, indent=1))
    return 0


def plot_curves(rows: list[dict], dest: Path) -> None:
    """Validation perplexity by epoch of every run, one panel per schedule length: the evidence
    behind the float comparison."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter
    lengths = sorted({r["epochs"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.2), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        for r in (r for r in rows if r["epochs"] == n):
            h = r["history"]
            own = [e for e in h if not e.get("init")]
            start = f", from epoch {len(h) - len(own)} of another run" if len(own) < len(h) else ""
            line, = ax.plot([e["epoch"] for e in own], [e["valid_ppl"] for e in own], marker="o", ms=3,
                            label=f"{r['model']} (test {r['test_ppl']:.1f}{start})")
            if start:      # the inherited epochs, thin and dashed, joined to the run's own
                joined = [e for e in h if e.get("init")] + own[:1]
                ax.plot([e["epoch"] for e in joined], [e["valid_ppl"] for e in joined], ls="--", lw=0.8,
                        color=line.get_color())
        ax.set(title=f"PTB small, {n} epochs", xlabel="epoch", ylabel="valid perplexity", yscale="log")
        ax.yaxis.set_major_formatter(ScalarFormatter())      # 120, 140, … rather than 1.2 x 10^2
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def cmd_collect(args) -> int:
    found = False
    for cell, dest_name in (("lstm", "ptb_small.json"), ("gru", "ptb_small_gru.json")):
        rows = []
        for p in sorted(Path(args.out).glob("*/result.json")):
            r = json.loads(p.read_text())
            if r["config"].get("cell", "lstm") == cell:
                rows.append(r)
        if not rows:
            continue
        found = True
        dest = ROOT / "benchmarks" / "results" / dest_name
        # rows of models trained in an earlier session (their run folders gone with that machine's
        # runs/) are kept, in MODELS order, each with the machine it recorded
        rows = with_earlier_rows(rows, dest)
        order = {n: k for k, n in enumerate(MODELS)}
        rows.sort(key=lambda r: (r["epochs"], order.get(r.get("preset", r.get("model")), len(order)), r["model"]))
        results = {"benchmark": "ptb_small" + ("" if cell == "lstm" else "_gru"),
                   "command": "python benchmarks/ptb_lm.py train --model M; python benchmarks/ptb_lm.py collect",
                   "machine": cpu_model(), "torch": torch.__version__, "models": rows}
        dest.write_text(json.dumps(results, indent=1))
        hard = HARD_SETS[cell]
        g1, g2 = ("i", "f") if cell == "lstm" else ("r", "z")
        print("| model | epochs | dropout | noise p | valid ppl | test ppl | " + " | ".join(f"test ppl, hard {h}" for h in hard) +
              f" | {g1} <0.1/>0.9 (l0) | {g2} <0.1/>0.9 (l0) | train time |")
        print("|---" * (8 + len(hard)) + "|")
        for r in rows:
            s = r["gate_saturation_valid"]
            a, b = s[f"l0.{g1}"], s[f"l0.{g2}"]
            c = r["config"]
            noise = f"{c['noise_p']:g}" if c["gates"] == "gumbel" else "–"
            print(f"| {r['model']} | {r['epochs']} | {c['dropout']:g} | {noise} | {r['valid_ppl']:.1f} | {r['test_ppl']:.1f} | " +
                  " | ".join(f"{r[f'test_ppl_hard_{h}']:.1f}" for h in hard) +
                  f" | {a['below_0.1']:.0%} / {a['above_0.9']:.0%} | {b['below_0.1']:.0%} / {b['above_0.9']:.0%} | "
                  f"{r['train_seconds_total'] / 60:.0f} min ({r['threads']} thread) |")
        plot_curves(rows, ROOT / "docs" / "img" / f"ptb_curves{'' if cell == 'lstm' else '_gru'}.png")
        print(f"\nwrote {dest}\n")
    if not found:
        print(f"no results under {args.out}; run `train` first", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--model", choices=sorted(MODELS), required=True)
    t.add_argument("--name", default=None, help="run folder under --out (default: the model name)")
    t.add_argument("--epochs", type=int, default=6)
    t.add_argument("--decay-after", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--init-from", default=None, metavar="LAST",
                   help="start from another run's last.safetensors (e.g. the baseline after 4 epochs) and go on "
                        "with this model's gates on the same schedule")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--quiet", action="store_true")
    c = sub.add_parser("collect")
    for p in (t, c):
        p.add_argument("--out", default=str(ROOT / "runs" / "ptb_small"))
        p.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    return cmd_train(args) if args.cmd == "train" else cmd_collect(args)


if __name__ == "__main__":
    sys.exit(main())
