"""Multi30k De-En: baseline LSTM vs G2-LSTM vs sharpened sigmoid in the attention seq2seq.

Train one model (resumable: run the same command again after an interruption; checkpoints under
--out, which is git-ignored):
    G2QUANT_DATA=../shared/data python benchmarks/mt.py train --model g2 --threads 1
Turn Gumbel gates on in a trained float baseline (the authors' MT recipe starts G2 from a
pretrained model) and compare with the baseline continued for as long (same data order):
    python benchmarks/mt.py train --model baseline --epochs 6 && cp -r runs/mt_multi30k/baseline runs/mt_multi30k/baseline-e6
    python benchmarks/mt.py train --model baseline --epochs 10
    python benchmarks/mt.py train --model g2 --name g2-from-baseline --init-from runs/mt_multi30k/baseline-e6/last.safetensors --epochs 10
Collect every trained model into benchmarks/results/mt_multi30k.json and print the Markdown table:
    G2QUANT_DATA=../shared/data python benchmarks/mt.py collect
Translation speed (sentences/s, beam 5, batch 1 and 32: engine 4-bit artifact vs torch fp32 vs torch int8
dynamic, side by side; benchmarks/results/mt_speed.json):
    G2QUANT_DATA=../shared/data python benchmarks/mt.py speed --model g2 --threads 1
Quantization and compression of the trained models (resumable per row; benchmarks/results/mt_quant.json):
    G2QUANT_DATA=../shared/data python benchmarks/mt.py quant --models g2 baseline

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
from g2quant.targets.cpu.isa import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_merge import with_earlier_rows  # noqa: E402

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
    name = args.name or args.model
    out = Path(args.out) / name
    torch.manual_seed(args.seed)
    model = Seq2Seq(Seq2SeqConfig(len(data.src_vocab), len(data.tgt_vocab), **MODELS[args.model]))
    resume = (out / "last.safetensors").exists()
    t0 = time.time()
    r = train_mt(model, data, tcfg, out, resume=resume, init_from=args.init_from,
                 progress=not args.quiet and sys.stderr.isatty())
    wall = time.time() - t0
    t1 = time.time()
    res = evaluate_model(name, out / "best.safetensors", data, args.beam)
    res["gates_model"] = args.model
    if args.init_from:
        res["init_from"] = str(args.init_from)
        res["init_epochs"] = sum(1 for h in r.history if h.get("init"))
    res["eval_wall_seconds"] = time.time() - t1
    res["smoke"] = args.max_batches is not None or args.valid_limit is not None
    res["train_wall_seconds_this_run"] = wall
    own = [h for h in r.history if not h.get("init")]
    res["train_seconds_total"] = sum(h["seconds"] for h in own)
    res["seconds_per_epoch"] = res["train_seconds_total"] / max(len(own), 1)
    res["threads"] = args.threads
    res["train_config"] = asdict(tcfg)
    res["data"] = data.describe()
    (out / "result.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("model", "best_epoch", "test_bleu", "test_bleu_hard_if",
                                          "seconds_per_epoch", "smoke")}, indent=1))
    return 0


def cmd_collect(args) -> int:
    found = sorted(p.parent.name for p in Path(args.out).glob("*/result.json"))
    names = [n for n in MODELS if n in found] + [n for n in found if n not in MODELS]
    rows = [{**json.loads((Path(args.out) / n / "result.json").read_text()), "model": n} for n in names]
    if not rows:
        print(f"no results under {args.out}; run `train` first", file=sys.stderr)
        return 1
    smoke = any(r.get("smoke") for r in rows)
    dest = Path(args.results) if args.results else (Path(args.out) / "mt_multi30k.json" if smoke else RESULTS)
    if not smoke:                       # rows of runs trained on an earlier machine (their folders are gone)
        rows = with_earlier_rows(rows, dest, keep=lambda r: not r.get("smoke"))
    results = {"benchmark": "mt_multi30k", "smoke": smoke,
               "command": "python benchmarks/mt.py train --model M; python benchmarks/mt.py collect",
               "machine": cpu_model(), "torch": torch.__version__,
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


QUANT_RESULTS = ROOT / "benchmarks" / "results" / "mt_quant.json"
COMPRESSIONS = {  # the paper's MT compression table (Li et al. 2018, Table 3), on the i and f gate weights
    "round r=0.5": dict(method="round", r=0.5),
    "round r=0.5 & clip c=1.0": dict(method="round_clip", r=0.5, c=1.0),
    "SVD rank 32": dict(method="svd", rank=32),
    "SVD rank 16": dict(method="svd", rank=16),
}


def _width(w: str):
    return w if w in ("binary", "ternary") else int(w)


def cmd_quant(args) -> int:
    """Rows per model: float (soft / hard i,f gates), PTQ per width x gates, QAT per requested
    width (hard i,f gates), and the paper's compression of the i/f gate weights. Each row is
    written to OUT/quant_rows.json as soon as it is measured; a rerun skips what is there."""
    from g2quant.api import quantize
    from g2quant.compress import compress_gates

    torch.set_num_threads(args.threads)
    data = load_multi30k(args.data_dir)
    store = Path(args.out) / "quant_rows.json"
    rows = json.loads(store.read_text()) if store.exists() else {}

    def record(key: str, model_name: str, fn) -> None:
        if key in rows:
            return
        t0 = time.time()
        row = fn()
        row.update(model=model_name, seconds=time.time() - t0)
        rows[key] = row
        tmp = store.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(store)
        print(f"{key:45s} BLEU {row['test_bleu']:6.2f}  {row['size_mb']:.2f} MB  ({row['seconds']:.0f}s)", flush=True)

    def bleu(m) -> float:
        return evaluate_bleu(m, data.test, data.tgt_vocab, beam=args.beam)["bleu"]

    def set_hard(m, gates):
        for lstm in (m.encoder, m.decoder):
            lstm.hard_gates = frozenset(gates)

    for name in args.models:
        ckpt = Path(args.out) / name / "best.safetensors"
        if not ckpt.exists():
            print(f"{name}: no {ckpt}; train it first", file=sys.stderr)
            continue
        model, rec = load_model(ckpt)
        fsize = sum(p.numel() for p in model.parameters()) * 4 / 1e6
        for gates in ("", "if"):
            def float_row(g=gates):
                set_hard(model, g)
                r = {"method": "float", "bits": 32, "gates": g or "soft", "size_mb": fsize, "test_bleu": bleu(model)}
                set_hard(model, "")
                return r
            record(f"{name}/float/{gates or 'soft'}", name, float_row)
        for w in args.widths:
            for gates in ("", "if"):
                def ptq_row(w=w, g=gates):
                    q = quantize(model, bits=_width(w), hard_gates=g)
                    return {"method": "ptq", "bits": w, "gates": g or "soft", "size_mb": q.size_bytes() / 1e6,
                            "test_bleu": bleu(q)}
                record(f"{name}/ptq/{w}/{gates or 'soft'}", name, ptq_row)
        for w in args.qat:
            def qat_row(w=w):
                q = quantize(model, bits=_width(w), method="qat", hard_gates="if")
                tcfg = MTTrainConfig(epochs=args.qat_epochs, optimizer="adam", lr=args.qat_lr, schedule="constant",
                                     batch_size=64, seed=0)
                run = Path(args.out) / "qat" / f"{name}-w{w}-if"
                r = train_mt(q, data, tcfg, run, resume=(run / "last.safetensors").exists(), progress=False,
                             kind="quantized_seq2seq", log=lambda s: None,
                             record_extra={"config": rec["config"], "quant_config": q.config.to_dict()})
                best, _ = load_model(run / "best.safetensors")
                return {"method": "qat", "bits": w, "gates": "if", "size_mb": best.size_bytes() / 1e6,
                        "test_bleu": bleu(best), "qat_epochs": args.qat_epochs, "qat_lr": args.qat_lr,
                        "valid_bleu_history": [h["valid_bleu"] for h in r.history]}
            record(f"{name}/qat/{w}/if", name, qat_row)
        for label, kw in COMPRESSIONS.items():
            def comp_row(kw=kw, label=label):
                m = compress_gates(model, gates="if", **kw)
                return {"method": "compress", "bits": 32, "gates": "soft", "compression": label,
                        "size_mb": fsize, "test_bleu": bleu(m)}
            record(f"{name}/compress/{label}", name, comp_row)

    by_model: dict = {}
    for key, r in rows.items():
        by_model.setdefault(r["model"], []).append((key, r))
    for name, items in by_model.items():
        ref = {g: rows.get(f"{name}/float/{g}", {}).get("test_bleu") for g in ("soft", "if")}
        for _, r in items:
            base = ref["if" if r["gates"] == "if" else "soft"]
            r["delta_bleu_vs_float_same_gates"] = None if base is None else r["test_bleu"] - base
    result = {"benchmark": "mt_quant", "command": "python benchmarks/mt.py quant --models " + " ".join(args.models),
              "machine": cpu_model(), "torch": torch.__version__,
              "bleu": f"Multi30k test, beam {args.beam}, tokenized lowercased, sacrebleu tokenize=none",
              "activations": "int8 dynamic (per row) for every quantized row", "rows": rows}
    dest = Path(args.results) if args.results else QUANT_RESULTS
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=1))
    print("\n| model | method | weights | gates | size MB | test BLEU | Δ vs float (same gates) |\n|---|---|---|---|---|---|---|")
    for key, r in rows.items():
        d = r.get("delta_bleu_vs_float_same_gates")
        what = r.get("compression", r["bits"])
        print(f"| {r['model']} | {r['method']} | {what} | {r['gates']} | {r['size_mb']:.2f} | {r['test_bleu']:.2f} | "
              f"{'' if d is None else f'{d:+.2f}'} |")
    print(f"wrote {dest}")
    return 0


SPEED_RESULTS = ROOT / "benchmarks" / "results" / "mt_speed.json"


def torch_lstm_copy(model):
    """A copy of a seq2seq model whose G2LSTMs (eval mode: plain sigmoid gates) are ``nn.LSTM``s with the
    same weights, so that ``torch.ao.quantization.quantize_dynamic`` applies to them."""
    import copy

    from torch import nn

    from g2quant.nn import G2LSTM
    m = copy.deepcopy(model).eval()
    for name in ("encoder", "decoder"):
        g = getattr(m, name)
        if not isinstance(g, G2LSTM) or g.gates == "sharpened" or g.hard_gates:
            raise ValueError(f"{name}: only sigmoid/gumbel gates without hard gates act as nn.LSTM in eval")
        lstm = nn.LSTM(g.input_size, g.hidden_size, g.num_layers, bias=g.bias, dropout=g.dropout,
                       bidirectional=g.bidirectional)
        lstm.load_state_dict(g.state_dict())
        setattr(m, name, lstm.eval())
    return m


def cmd_speed(args) -> int:
    import tempfile

    import numpy as np

    import g2quant
    from g2quant.api import quantize
    from g2quant.evaluate_mt import corpus_bleu, translate_ids
    from g2quant.data.translation import remove_bpe
    from g2quant.export_seq2seq import export_seq2seq
    from g2quant.targets.cpu import isa

    torch.set_num_threads(args.threads)
    data = load_multi30k(args.data_dir)
    ckpt = Path(args.out) / args.model / "best.safetensors"
    model, rec = load_model(ckpt)
    peers = {"torch fp32": model}
    ref_model = torch_lstm_copy(model)
    peers["torch int8 dynamic"] = torch.ao.quantization.quantize_dynamic(ref_model, {torch.nn.LSTM, torch.nn.Linear},
                                                                        dtype=torch.qint8)
    q = quantize(model, bits=args.bits, hard_gates=args.hard_gates)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_seq2seq(q, Path(tmp) / "mt.g2q", src_vocab=rec["vocab"]["src"], tgt_vocab=rec["vocab"]["tgt"],
                              bpe_codes=rec["bpe_codes"], validation={})
        t0 = time.time()
        engine = g2quant.load(path)
        engine.translate_ids([[3, 2]], beam=args.beam, batch_size=1)       # compile / warm
        first_call = time.time() - t0
    peers[f"g2quant engine {args.bits}-bit" + (f" hard {args.hard_gates}" if args.hard_gates else "")] = engine
    rows = []
    for batch, n in ((1, args.sentences_batch1), (32, args.sentences_batch32 or len(data.test.src))):
        src = data.test.src[:n]
        refs = data.test.refs[:n]
        for name, m in peers.items():
            translate_ids(m, src[:4], beam=args.beam, batch_size=batch)     # warm
            t0 = time.perf_counter()
            hyps = translate_ids(m, src, beam=args.beam, batch_size=batch)
            dt = time.perf_counter() - t0
            bleu = corpus_bleu([remove_bpe(data.tgt_vocab.decode(h)) for h in hyps], refs).score
            rows.append({"runner": name, "batch": batch, "sentences": n, "seconds": dt, "sentences_per_s": n / dt,
                         "bleu_on_these": bleu})
            print(f"batch {batch:2d} {name:34s} {n / dt:8.1f} sent/s  BLEU {bleu:.2f}", flush=True)
    for r in rows:
        base = next(x for x in rows if x["batch"] == r["batch"] and x["runner"] == "torch fp32")
        r["speedup_vs_torch_fp32"] = r["sentences_per_s"] / base["sentences_per_s"]
    result = {"benchmark": "mt_speed", "command": f"python benchmarks/mt.py speed --model {args.model} --threads "
              f"{args.threads} --bits {args.bits}" + (f" --hard-gates {args.hard_gates}" if args.hard_gates else "")
              + f" --sentences-batch1 {args.sentences_batch1}"
              + (f" --sentences-batch32 {args.sentences_batch32}" if args.sentences_batch32 else ""),
              "machine": platform.processor() or platform.machine(), "cpu": cpu_model(), "threads": args.threads,
              "kernels": isa.describe(), "beam": args.beam, "torch": torch.__version__,
              "engine_load_and_first_call_seconds": first_call, "note": "batches group sentences of equal source "
              "length (at most the batch size)", "rows": rows}
    dest = Path(args.results) if args.results else SPEED_RESULTS
    dest.write_text(json.dumps(result, indent=1))
    print("\n| batch | runner | sentences/s | × torch fp32 | BLEU |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['runner']} | {r['sentences_per_s']:.1f} | {r['speedup_vs_torch_fp32']:.2f} | "
              f"{r['bleu_on_these']:.2f} |")
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
    t.add_argument("--name", default=None, help="run folder under --out (default: the model name)")
    t.add_argument("--init-from", default=None, metavar="LAST",
                   help="continue this run (its last.safetensors) with --model's gates; --epochs counts both")
    c = sub.add_parser("collect", help="gather result.json files into the results JSON and print the table")
    c.add_argument("--results", default=None, help=f"output JSON (default {RESULTS.relative_to(ROOT)}, or "
                                                    "OUT/mt_multi30k.json for smoke runs)")
    q = sub.add_parser("quant", help="PTQ / QAT / compression rows of the trained models")
    q.add_argument("--models", nargs="+", default=["g2", "baseline"], help="trained run folders under --out")
    q.add_argument("--widths", type=lambda s: s.split(","), default="8,4,3,2,ternary,binary".split(","),
                   help="PTQ weight widths (comma-separated)")
    q.add_argument("--qat", type=lambda s: [w for w in s.split(",") if w], default=["4", "2", "ternary"],
                   help="QAT widths with hard i,f gates (comma-separated; '' for none)")
    q.add_argument("--qat-epochs", type=int, default=1, help="QAT epochs")
    q.add_argument("--qat-lr", type=float, default=1e-4, help="QAT Adam learning rate")
    q.add_argument("--beam", type=int, default=5, help="beam for test BLEU")
    q.add_argument("--threads", type=int, default=1, help="torch threads")
    q.add_argument("--results", default=None, help=f"output JSON (default {QUANT_RESULTS.relative_to(ROOT)})")
    sp = sub.add_parser("speed", help="translation speed: engine vs torch fp32 vs torch int8 dynamic")
    sp.add_argument("--model", default="g2", help="trained run folder under --out")
    sp.add_argument("--bits", type=int, default=4, help="engine weight width")
    sp.add_argument("--hard-gates", default="if", help="engine hard gates ('' for none)")
    sp.add_argument("--beam", type=int, default=5, help="beam")
    sp.add_argument("--threads", type=int, default=1, help="threads (torch and engine)")
    sp.add_argument("--sentences-batch1", type=int, default=200, help="test sentences timed at batch 1")
    sp.add_argument("--sentences-batch32", type=int, default=None, help="test sentences timed at batch 32 (default all)")
    sp.add_argument("--results", default=None, help=f"output JSON (default {SPEED_RESULTS.relative_to(ROOT)})")
    for p in (t, c, q, sp):
        p.add_argument("--out", default=str(ROOT / "runs" / "mt_multi30k"), help="run folders")
        p.add_argument("--data-dir", default=None, help="folder holding the Multi30k tok files")
    args = ap.parse_args(argv)
    return {"train": cmd_train, "collect": cmd_collect, "quant": cmd_quant, "speed": cmd_speed}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
