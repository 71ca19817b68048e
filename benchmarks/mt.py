"""Multi30k De-En: baseline LSTM vs G2-LSTM vs sharpened sigmoid in the attention seq2seq.

Train one model (resumable: run the same command again after an interruption; checkpoints under
--out, which is git-ignored):
    G2QUANT_DATA=../shared/data python benchmarks/mt.py train --model g2 --threads 1
Collect every trained model into benchmarks/results/mt_multi30k.json and print the Markdown table:
    G2QUANT_DATA=../shared/data python benchmarks/mt.py collect

Same seed, data order and schedule for all three (the paper's MT setting, Li et al. 2018: 2-layer
encoder and decoder, embedding/hidden 256; Luong attention with input feeding): Adam lr 1e-3,
batch 64 sentences (equal source lengths), clip 5, label smoothing 0.1, dropout 0.2, lr x0.5 when
validation BLEU (greedy) stops improving, best epoch by validation BLEU. G2: tau 0.9, noise_p 0.2
(the authors' code); sharpened: tau 0.2. Test BLEU: beam 5, length-normalized, tokenized and
lowercased after BPE removal, sacrebleu tokenize=none (signature recorded). Gate saturation:
fractions of gate values < 0.1 / > 0.9 on the validation set (teacher forcing), encoder and
decoder separately. A run capped with --max-batches is marked "smoke" and is written under --out,
never into benchmarks/results.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from g2quant.checkpoint import load_model
from g2quant.data.translation import load_multi30k
from g2quant.evaluate_mt import evaluate_bleu, valid_loss
from g2quant.models.seq2seq import Seq2Seq, Seq2SeqConfig
from g2quant.nn import GateRecorder
from g2quant.train_mt import MTTrainConfig, train_mt

ROOT = Path(__file__).resolve().parent.parent
MODELS = {  # name -> Seq2SeqConfig overrides
    "baseline": dict(gates="sigmoid"),
    "g2": dict(gates="gumbel", tau=0.9, noise_p=0.2),
    "sharpened": dict(gates="sharpened", tau=0.2),
}
RESULTS = ROOT / "benchmarks" / "results" / "mt_multi30k.json"


def gate_saturation(model, split) -> dict:
    with GateRecorder(model.encoder) as enc, GateRecorder(model.decoder) as dec:
        valid_loss(model, split)
    return {"encoder": enc.stats.summary(), "decoder": dec.stats.summary()}


def evaluate_model(name: str, ckpt: Path, data, beam: int) -> dict:
    model, record = load_model(ckpt)
    res = {"model": name, "config": record["config"], "best_epoch": record["epoch"] + 1,
           "history": record["history"], "parameters": sum(p.numel() for p in model.parameters())}
    t0 = time.time()
    test = evaluate_bleu(model, data.test, data.tgt_vocab, beam=beam)
    res["test_decode_seconds"] = time.time() - t0
    res.update(test_bleu=test["bleu"], bleu_signature=test["signature"], bleu_details=test["details"], beam=beam)
    res["test_bleu_greedy"] = evaluate_bleu(model, data.test, data.tgt_vocab, beam=1)["bleu"]
    res["valid_bleu"] = evaluate_bleu(model, data.valid, data.tgt_vocab, beam=beam)["bleu"]
    res["test_ppl"] = valid_loss(model, data.test)["ppl"]
    for lstm in (model.encoder, model.decoder):
        lstm.hard_gates = frozenset("if")
    res["test_bleu_hard_if"] = evaluate_bleu(model, data.test, data.tgt_vocab, beam=beam)["bleu"]
    for lstm in (model.encoder, model.decoder):
        lstm.hard_gates = frozenset()
    res["gate_saturation_valid"] = gate_saturation(model, data.valid)
    res["test_examples"] = [{"src": data.test.src_text[i].replace("@@ ", ""), "ref": data.test.refs[i],
                             "hyp": test["hypotheses"][i]} for i in range(3)]
    return res


def cmd_train(args) -> int:
    torch.set_num_threads(args.threads)
    data = load_multi30k(args.data_dir)
    tcfg = MTTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         max_batches=args.max_batches, valid_limit=args.valid_limit)
    out = Path(args.out) / args.model
    torch.manual_seed(args.seed)
    model = Seq2Seq(Seq2SeqConfig(len(data.src_vocab), len(data.tgt_vocab), **MODELS[args.model]))
    resume = (out / "last.safetensors").exists()
    t0 = time.time()
    r = train_mt(model, data, tcfg, out, resume=resume, progress=not args.quiet and sys.stderr.isatty())
    wall = time.time() - t0
    t1 = time.time()
    res = evaluate_model(args.model, out / "best.safetensors", data, args.beam)
    res["eval_wall_seconds"] = time.time() - t1
    res["smoke"] = args.max_batches is not None or args.valid_limit is not None
    res["train_wall_seconds_this_run"] = wall
    res["train_seconds_total"] = sum(h["seconds"] for h in r.history)
    res["seconds_per_epoch"] = res["train_seconds_total"] / max(len(r.history), 1)
    res["threads"] = args.threads
    res["train_config"] = asdict(tcfg)
    res["data"] = data.describe()
    (out / "result.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("model", "best_epoch", "test_bleu", "test_bleu_hard_if",
                                          "seconds_per_epoch", "smoke")}, indent=1))
    return 0


def cmd_collect(args) -> int:
    rows = [json.loads((Path(args.out) / n / "result.json").read_text()) for n in MODELS
            if (Path(args.out) / n / "result.json").exists()]
    if not rows:
        print(f"no results under {args.out}; run `train` first", file=sys.stderr)
        return 1
    smoke = any(r.get("smoke") for r in rows)
    dest = Path(args.results) if args.results else (Path(args.out) / "mt_multi30k.json" if smoke else RESULTS)
    results = {"benchmark": "mt_multi30k", "smoke": smoke,
               "command": "python benchmarks/mt.py train --model M; python benchmarks/mt.py collect",
               "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "bleu_convention": "tokenized, lowercased, BPE removed; sacrebleu tokenize=none; beam 5, "
                                  "length-normalized", "models": rows}
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(results, indent=1))
    print("| model | best epoch | test BLEU (beam 5) | greedy | hard i,f | valid BLEU | enc l0 i <0.1/>0.9 | "
          "enc l0 f <0.1/>0.9 | dec l0 i <0.1/>0.9 | dec l0 f <0.1/>0.9 | s/epoch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["gate_saturation_valid"]
        cell = lambda g: f"{g['below_0.1']:.0%} / {g['above_0.9']:.0%}"   # noqa: E731
        print(f"| {r['model']} | {r['best_epoch']} | {r['test_bleu']:.2f} | {r['test_bleu_greedy']:.2f} | "
              f"{r['test_bleu_hard_if']:.2f} | {r['valid_bleu']:.2f} | {cell(s['encoder']['l0.i'])} | "
              f"{cell(s['encoder']['l0.f'])} | {cell(s['decoder']['l0.i'])} | {cell(s['decoder']['l0.f'])} | "
              f"{r['seconds_per_epoch']:.0f} ({r['threads']} thread) |")
    print(f"\nsignature: {rows[0]['bleu_signature']}" + ("\nSMOKE RUN: not a result" if smoke else ""))
    print(f"wrote {dest}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train (or resume) one model, then evaluate its best checkpoint")
    t.add_argument("--model", choices=sorted(MODELS), required=True, help="gate variant")
    t.add_argument("--epochs", type=int, default=12, help="epochs")
    t.add_argument("--batch-size", type=int, default=64, help="sentences per batch")
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    t.add_argument("--beam", type=int, default=5, help="beam for test BLEU")
    t.add_argument("--seed", type=int, default=0, help="seed (model init and data order)")
    t.add_argument("--threads", type=int, default=1, help="torch threads")
    t.add_argument("--max-batches", type=int, default=None, help="smoke test: batches per epoch")
    t.add_argument("--valid-limit", type=int, default=None, help="smoke test: validate on the first N sentences")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    c = sub.add_parser("collect", help="gather result.json files into the results JSON and print the table")
    c.add_argument("--results", default=None, help=f"output JSON (default {RESULTS.relative_to(ROOT)}, or "
                                                    "OUT/mt_multi30k.json for smoke runs)")
    for p in (t, c):
        p.add_argument("--out", default=str(ROOT / "runs" / "mt_multi30k"), help="run folders")
        p.add_argument("--data-dir", default=None, help="folder holding the Multi30k tok files")
    args = ap.parse_args(argv)
    return cmd_train(args) if args.cmd == "train" else cmd_collect(args)


if __name__ == "__main__":
    sys.exit(main())
