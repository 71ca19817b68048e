"""The ``g2quant`` command (also ``python -m g2quant``).

Each subcommand is a small function; torch is imported only by the commands that need it (the
artifact commands in ``cli_deploy`` run with the runtime-only install). Every user mistake ends
as one ``g2quant: error: ...`` line and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .cli_common import CLIError, corpus_ids, load_corpus, say, show_progress, text_ids
from .defaults import RECOMMENDED_DROPOUT, RECOMMENDED_NOISE_P

__all__ = ["main", "build_parser", "CLIError"]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every flag's help, epilogs printed as written."""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {v}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {v}")
    return v


def _probability(text: str) -> float:
    v = _nonneg_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {v}")
    return v


def _bits_arg(text: str):
    from .api import _check_bits
    try:
        return _check_bits(text, "--bits")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _gates_arg(text: str) -> str:
    if set(text) - set("iforz"):
        raise argparse.ArgumentTypeError(f"may contain only the gate letters i, f, o (LSTM) or r, z (GRU); got {text!r}")
    return text


# ---------------------------------------------------------------- checkpoints
def _load_model(path):
    from .checkpoint import CheckpointError, load_model
    try:
        return load_model(path)
    except CheckpointError as exc:
        raise CLIError(str(exc)) from None


def _set_torch_threads(args):
    import torch
    torch.set_num_threads(args.threads or 2)


def _check_run_folder(args) -> None:
    """Refuse to start a new run over an existing one (it would replace its checkpoints)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder")
    held = [p.name for p in (out / "last.safetensors", out / "best.safetensors") if p.exists()]
    if held and not args.resume and not args.force:
        raise CLIError(f"{out} already holds a run ({', '.join(held)}); pass --resume to continue it, --force to "
                       "start over in it, or choose another --out")


# ---------------------------------------------------------------- train-lm / finetune / report / export
def cmd_train_lm(args) -> int:
    import torch

    from .models import LMConfig, WordLM
    from .train import TrainConfig, train_lm

    _set_torch_threads(args)
    _check_run_folder(args)
    corpus = load_corpus(args)
    try:
        dropout = args.dropout if args.dropout is not None else RECOMMENDED_DROPOUT.get(args.preset)
        cfg = LMConfig.preset(args.preset, vocab_size=len(corpus.vocab), gates=args.gates, tau=args.tau,
                              noise_p=args.noise_p, tied=args.tied, cell=args.cell,
                              **({"dropout": dropout} if dropout is not None else {}))
        tcfg = TrainConfig(epochs=args.epochs, lr=args.lr, lr_decay=args.lr_decay, decay_after=args.decay_after,
                           batch_size=args.batch_size, bptt=args.bptt, clip=args.clip, seed=args.seed,
                           max_batches=args.max_batches)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.batch_size * 2 > len(corpus.train):
        raise CLIError(f"--batch-size {args.batch_size} is too large for {len(corpus.train):,} training tokens")
    torch.manual_seed(args.seed)
    model = WordLM(cfg)
    say(args, f"training {args.preset} {cfg.cell.upper()} LM ({model.num_parameters() / 1e6:.2f}M parameters, "
              f"gates={cfg.gates}) "
              f"on {args.data}: {len(corpus.train):,} tokens, {tcfg.epochs} epochs -> {args.out}")
    try:
        result = train_lm(model, corpus.train, corpus.valid, tcfg, args.out, resume=args.resume,
                          progress=show_progress(args), record_extra={"data": args.data},
                          log=lambda s: say(args, s), init_from=args.init_from)
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    print(f"best valid ppl {result.best_valid_ppl:.2f}; checkpoints in {args.out}")
    return 0


def cmd_finetune(args) -> int:
    """Quantization-aware fine-tuning from a float checkpoint."""
    from .api import quantize
    from .train import TrainConfig, train_lm

    _set_torch_threads(args)
    _check_run_folder(args)
    model, record = _load_model(args.checkpoint)
    if record.get("kind") == "seq2seq":
        from .cli_mt import cmd_finetune_mt
        return cmd_finetune_mt(args, model, record)
    if record.get("kind") != "word_lm":
        raise CLIError(f"{args.checkpoint} is not a float word-LM or seq2seq checkpoint (kind {record.get('kind')!r})")
    if args.optimizer is None:
        args.optimizer = "sgd"
    if args.lr is None:
        args.lr = 2.0
    corpus = load_corpus(args, args.data or record.get("data", "ptb"))
    _check_vocab_size(model, corpus, args)
    bits = args.bits
    if args.allocation:
        from .allocate import Allocation
        try:
            bits = Allocation.load(args.allocation).bits_map()
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    try:
        q = quantize(model, bits=bits, method="qat", hard_gates=args.hard_gates)
        tcfg = TrainConfig(epochs=args.epochs, lr=args.lr, lr_decay=args.lr_decay, decay_after=1,
                           max_batches=args.max_batches, seed=args.seed, optimizer=args.optimizer,
                           momentum=args.momentum, distill_weight=args.distill,
                           distill_temperature=args.distill_temperature)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    teacher = None
    if args.distill > 0:
        teacher, _ = _load_model(args.checkpoint)     # the float model itself teaches its quantized copy
        for p in teacher.parameters():
            p.requires_grad_(False)
    say(args, f"QAT: {args.allocation or str(args.bits) + '-bit'} weights, int8 activations, hard gates: "
              f"{args.hard_gates or 'none'}, {args.optimizer}"
              + (f", distilled from the float model (weight {args.distill}, T={args.distill_temperature})"
                 if teacher is not None else "") + f" -> {args.out}")
    res = train_lm(q, corpus.train, corpus.valid, tcfg, args.out, resume=args.resume, progress=show_progress(args),
                   kind="quantized_word_lm", record_extra={"config": model.config.to_dict(),
                                                           "quant_config": q.config.to_dict(),
                                                           "data": args.data or record.get("data", "ptb")},
                   log=lambda s: say(args, s), teacher=teacher)
    print(f"best valid ppl {res.best_valid_ppl:.2f}; size {q.size_bytes() / 1e6:.2f} MB "
          f"(float {q.float_size_bytes() / 1e6:.2f} MB)")
    return 0


def _check_vocab_size(model, corpus, args) -> None:
    inner = getattr(model, "model", model)
    vs = getattr(getattr(inner, "config", None), "vocab_size", None)
    if vs is not None and vs != len(corpus.vocab):
        raise CLIError(f"the checkpoint has a {vs}-word vocabulary but the data ({getattr(args, 'data', None) or 'its corpus'}) "
                       f"has {len(corpus.vocab)} words: evaluate it on the corpus it was trained on")


def cmd_report(args) -> int:
    from .report import QATSettings, tradeoff

    _set_torch_threads(args)
    model, record = _load_model(args.checkpoint)
    corpus = load_corpus(args, args.data or record.get("data", "ptb"))
    _check_vocab_size(model, corpus, args)
    try:
        widths = [_bits_arg(w) for w in args.widths.split(",")]
    except argparse.ArgumentTypeError as exc:
        raise CLIError(f"--widths: {exc}") from None
    try:
        rows = tradeoff(model, eval_data=getattr(corpus, args.split), train_data=corpus.train,
                        valid_data=corpus.valid[:20_000], out_dir=args.out, name=args.name or str(args.checkpoint),
                        widths=widths, methods=args.methods.split(","), gate_modes=args.gates.split(","),
                        qat=QATSettings(lr=args.qat_lr, max_batches=args.qat_batches),
                        hard_gates=args.hard_gates or None)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    print(f"{len(rows)} rows -> {args.out}/results.json, table.md, tradeoff.png")
    return 0


def cmd_export(args) -> int:
    from .api import QuantizedModel, quantize
    from .export import ExportError

    _set_torch_threads(args)
    model, record = _load_model(args.checkpoint)
    if str(record.get("kind", "")).endswith("seq2seq"):
        from .cli_mt import export_seq2seq_cmd
        return export_seq2seq_cmd(args, model, record)
    try:
        if isinstance(model, QuantizedModel):
            q = model
            if args.hard_gates:
                q.set_hard_gates(args.hard_gates)
        else:
            q = quantize(model, bits=args.bits, hard_gates=args.hard_gates)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    data_name = args.data or record.get("data", "ptb")
    corpus = load_corpus(args, data_name)
    _check_vocab_size(q, corpus, args)
    validation = {"data": data_name}
    if not args.no_validate:
        from .evaluate import lm_perplexity
        say(args, "measuring test perplexity of the quantized model (torch)")
        r = q.evaluate(corpus.test)
        validation["test_eval"] = {"batch_size": r["batch_size"], "bptt": r["bptt"], "tokens": r["tokens"]}
        validation["test_ppl_quantized_torch"] = r["ppl"]
        if not isinstance(model, QuantizedModel):
            validation["test_ppl_float"] = lm_perplexity(model, corpus.test)["ppl"]
    try:
        opts = {"weights": args.onnx_weights} if args.target == "onnx" else {}
        path = q.export(args.out, target=args.target, vocab=corpus.vocab, validation=validation, **opts)
    except ExportError as exc:
        raise CLIError(str(exc)) from None
    print(f"wrote {path}: {q.size_bytes(target=args.target) / 1e6:.2f} MB deployable "
          f"(float {q.float_size_bytes() / 1e6:.2f} MB)")
    for k, v in validation.items():
        print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    return 0


# ---------------------------------------------------------------- eval (checkpoint or artifact)
def cmd_eval(args) -> int:
    """Perplexity of a checkpoint (torch) or an artifact (its runtime) on a corpus or a text file."""
    from . import cli_deploy

    if args.limit is not None and args.limit < 2:
        raise CLIError(f"--limit must be at least 2 tokens, got {args.limit}")

    def data_ids(vocab, input_size=None):
        if args.text:
            if vocab is None:
                raise CLIError("--text needs a vocabulary: this artifact has none (give token-id data instead)")
            return text_ids(args.text, vocab), f"{args.text}"
        args.data = args.data or "ptb"
        corpus = load_corpus(args)
        if vocab is None and input_size is not None and len(corpus.vocab) != input_size:
            raise CLIError(f"the model reads {input_size} token ids but {args.data} has {len(corpus.vocab)} "
                           "words, and the artifact has no vocabulary to map them")
        return corpus_ids(args, corpus, vocab)

    if cli_deploy.is_artifact(args.model):
        args.artifact = args.model
        if args.data is None and not args.text:              # the corpus recorded at export
            from .targets.artifact import ArtifactError, read_manifest
            try:
                recorded = (read_manifest(args.model).get("validation") or {}).get("data")
            except ArtifactError:
                recorded = None
            args.data = recorded if recorded in ("ptb", "synthetic") else None
        return cli_deploy.eval_artifact(args, data_ids)
    if args.backend != "auto":
        raise CLIError("--backend applies to artifacts; this is a checkpoint (evaluated with torch)")
    return _eval_checkpoint(args, data_ids)


def _eval_checkpoint(args, data_ids) -> int:
    import json

    from .evaluate import lm_perplexity
    from .nn.g2gru import G2GRU
    from .nn.g2lstm import G2LSTM

    _set_torch_threads(args)
    model, record = _load_model(args.model)
    if record.get("kind") not in ("word_lm", "quantized_word_lm"):
        raise CLIError(f"{args.model} is a {record.get('kind')!r} checkpoint; `eval` measures language-model "
                       "perplexity (for translation models use `g2quant eval-mt`)")
    lstms = [m for m in model.modules() if isinstance(m, (G2LSTM, G2GRU))]
    if args.hard_gates:
        for m in lstms:
            letters = set(args.hard_gates) & set("ifo" if isinstance(m, G2LSTM) else "rz")
            m.hard_gates = frozenset(letters)
    rec_data = record.get("data")
    if args.data and rec_data and args.data != rec_data and not args.text:
        raise CLIError(f"{args.model} was trained on {rec_data!r}; evaluating it on --data {args.data} would "
                       "compare ids of different vocabularies")
    if args.text:
        corpus = load_corpus(args, rec_data or "ptb")
        _check_vocab_size(model, corpus, args)
        ids, what = data_ids(corpus.vocab)
    else:
        args.data = args.data or rec_data or "ptb"
        corpus = load_corpus(args)
        _check_vocab_size(model, corpus, args)
        ids, what = getattr(corpus, args.split), f"{args.data} {args.split}"
    if args.limit is not None:
        ids = ids[: args.limit]
    say(args, f"evaluating {args.model} on {what} ({len(ids):,} tokens, torch)")
    try:
        r = lm_perplexity(model, ids, batch_size=args.batch_size, bptt=args.bptt, progress=show_progress(args))
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    hard = "".join(g for g in "iforz" if lstms and g in lstms[0].hard_gates) or "none"
    if args.json:
        print(json.dumps({"model": str(args.model), "data": what, "perplexity": r["ppl"], "nll": r["loss"],
                          "tokens": r["tokens"], "batch_size": r["batch_size"], "bptt": r["bptt"],
                          "hard_gates": hard, "backend": "torch"}, indent=2))
    else:
        print(f"{what}: perplexity {r['ppl']:.2f} over {r['tokens']} tokens (batch size {r['batch_size']}, "
              f"bptt {r['bptt']}, state carried across batches; hard gates: {hard}; torch)")
    return 0


# ---------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(out_dir=args.out, seconds=args.seconds, data=args.data, data_dir=args.data_dir,
                    threads=args.threads or 2)


# ---------------------------------------------------------------- parser
EPILOGS = {
    "train-lm": "example:\n  g2quant train-lm --preset small --gates gumbel --out runs/g2-small\n"
                "  g2quant train-lm --preset small --out runs/g2-small --resume      # continue after Ctrl-C",
    "eval": "examples:\n  g2quant eval runs/g2-small/best.safetensors --hard-gates if     # checkpoint, torch\n"
            "  g2quant eval model.g2q --data ptb --split test                   # artifact, its engine\n"
            "  g2quant eval model.g2q --text notes.txt --json",
    "finetune": "examples:\n  g2quant finetune runs/g2-small/best.safetensors --bits 4 --hard-gates if --out runs/g2-w4\n"
                "  g2quant finetune runs/g2-small/best.safetensors --bits 2 --distill 0.5 --optimizer adam --lr 1e-3 "
                "--epochs 4 --out runs/g2-w2\n"
                "  g2quant finetune runs/mt-g2/best.safetensors --bits 4 --hard-gates if --epochs 2 --out runs/mt-g2-w4",
    "report": "example:\n  g2quant report runs/g2-small/best.safetensors --widths 8,4,2 --out runs/report",
    "export": "example:\n  g2quant export runs/g2-w4/best.safetensors --out g2-w4.g2q",
    "run": "examples:\n  g2quant run g2-w4.g2q --prompt \"the company said\" --max-tokens 20\n"
           "  g2quant run forecaster.g2q --input x.npy --output y.npy",
    "bench": "example:\n  g2quant bench g2-w4.g2q --threads 1 --json",
    "info": "example:\n  g2quant info g2-w4.g2q",
    "demo": "example:\n  g2quant demo --seconds 60",
}


def build_parser() -> argparse.ArgumentParser:
    from .targets.base import available_targets

    def logging_flags(p, default):
        p.add_argument("-v", "--verbose", action="count", default=0 if default else argparse.SUPPRESS,
                       help="more log output (-vv: debug)")
        p.add_argument("-q", "--quiet", action="store_true", default=False if default else argparse.SUPPRESS,
                       help="only results and errors")

    common = argparse.ArgumentParser(add_help=False)
    logging_flags(common, default=False)              # on every subcommand, without overriding the global flags
    ap = argparse.ArgumentParser(prog="g2quant", formatter_class=_Formatter,
                                 description="Quantize and deploy gated recurrent networks "
                                             "(G2-LSTM: binary-valued gates, low-bit weights).")
    logging_flags(ap, default=True)
    ap.add_argument("--version", action="version", version=f"g2quant {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, func, help_, **kw):
        p = sub.add_parser(name, help=help_, description=help_, epilog=EPILOGS.get(name), formatter_class=_Formatter,
                           parents=[common], **kw)
        p.set_defaults(func=func)
        return p

    def threads(p):
        p.add_argument("--threads", type=_positive_int, default=None,
                       help="CPU threads (torch for training/evaluation, Numba for the engine; default: engine "
                            "default / 2 for torch)")

    def data(p, default="ptb"):
        p.add_argument("--data", choices=["ptb", "synthetic"], default=default,
                       help="corpus (ptb: from --data-dir, $G2QUANT_DATA/ptb or the download cache; default for "
                            "checkpoints: the corpus they were trained on)")
        p.add_argument("--data-dir", default=None, help="folder holding ptb.{train,valid,test}.txt")
        p.add_argument("--no-download", action="store_true", help="fail instead of downloading missing data")

    def run_folder(p):
        p.add_argument("--out", required=True, help="checkpoint folder (last.safetensors, best.safetensors)")
        p.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
        p.add_argument("--force", action="store_true", help="start a new run in an OUT that already holds one")
        p.add_argument("--seed", type=int, default=0, help="random seed")

    t = add("train-lm", cmd_train_lm, "train a word-level (G2-)LSTM language model")
    t.add_argument("--preset", choices=["tiny", "small", "medium"], default="small", help="model size (Zaremba et al.)")
    t.add_argument("--gates", choices=["sigmoid", "gumbel", "sharpened"], default="gumbel", help="gate nonlinearity")
    t.add_argument("--cell", choices=["lstm", "gru"], default="lstm", help="recurrent cell (G2LSTM or G2GRU)")
    t.add_argument("--tau", type=_positive_float, default=None, help="temperature (default 0.9 gumbel, 0.2 sharpened)")
    t.add_argument("--noise-p", type=_probability, default=RECOMMENDED_NOISE_P,
                   help=f"probability of Gumbel noise per gate value (default {RECOMMENDED_NOISE_P:g}, measured best on PTB)")
    t.add_argument("--tied", action="store_true", help="tie the decoder to the embedding")
    t.add_argument("--dropout", type=_nonneg_float, default=None,
                   help="dropout (default: 0.25 for small, measured best on PTB; the preset's otherwise)")
    t.add_argument("--epochs", type=_positive_int, default=13, help="epochs")
    t.add_argument("--lr", type=_positive_float, default=20.0, help="SGD learning rate (per-token mean loss)")
    t.add_argument("--lr-decay", type=_positive_float, default=0.5, help="lr factor per epoch after --decay-after")
    t.add_argument("--decay-after", type=int, default=4, help="epochs at the full learning rate")
    t.add_argument("--batch-size", type=_positive_int, default=20, help="training batch size")
    t.add_argument("--bptt", type=_positive_int, default=20, help="truncated BPTT length")
    t.add_argument("--clip", type=_positive_float, default=0.25, help="gradient norm clip")
    t.add_argument("--max-batches", type=_positive_int, default=None, help="cap batches per epoch")
    t.add_argument("--init-from", default=None, metavar="LAST",
                   help="start a new run from another run's last.safetensors on the same corpus (e.g. a baseline "
                        "after 4 epochs) and go on with this model's gates on the same schedule")
    run_folder(t)
    data(t)
    threads(t)

    e = add("eval", cmd_eval, "perplexity of a checkpoint (torch) or an artifact (its engine)", aliases=["eval-lm"])
    e.add_argument("model", help="a .safetensors checkpoint, a run folder holding last.safetensors, or a NAME.g2q "
                                 "artifact")
    data(e, default=None)
    e.add_argument("--text", default=None, help="evaluate on this text file instead (words, one sentence per line)")
    e.add_argument("--split", choices=["train", "valid", "test"], default="test", help="corpus split")
    e.add_argument("--batch-size", type=_positive_int, default=10, help="parallel streams")
    e.add_argument("--bptt", type=_positive_int, default=35, help="steps per window (state carried across)")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N tokens")
    e.add_argument("--hard-gates", type=_gates_arg, default="", help="checkpoints: evaluate these gates as 1[a>0]")
    e.add_argument("--backend", choices=["auto", "kernels", "reference"], default="auto",
                   help="artifacts: Numba kernels or the NumPy reference")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    threads(e)

    d = add("demo", cmd_demo, "the one-minute tour: train a small G2-LSTM, report, quantize, export")
    d.add_argument("--out", default="g2quant-demo", help="output folder")
    d.add_argument("--seconds", type=_positive_float, default=60.0, help="training time budget")
    d.add_argument("--data", choices=["auto", "ptb", "synthetic"], default="auto",
                   help="auto: PTB when available locally, else a generated corpus")
    d.add_argument("--data-dir", default=None, help="folder holding ptb.{train,valid,test}.txt")
    threads(d)

    f = add("finetune", cmd_finetune, "quantization-aware fine-tuning (QAT) from a float checkpoint")
    f.add_argument("checkpoint", help="float checkpoint (word LM or seq2seq)")
    f.add_argument("--bits", type=_bits_arg, default=4, help="2..8, binary or ternary")
    f.add_argument("--allocation", default=None, help="an allocation.json from `g2quant allocate` (per-matrix widths; "
                                                      "overrides --bits)")
    f.add_argument("--hard-gates", type=_gates_arg, default="if", help="gates trained and deployed as 1[a>0] ('' for none)")
    f.add_argument("--epochs", type=_positive_int, default=1, help="epochs")
    f.add_argument("--max-batches", type=_positive_int, default=None, help="cap batches per epoch")
    f.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default: 2.0 for SGD on a word LM, 1e-4 for Adam on a seq2seq model)")
    f.add_argument("--lr-decay", type=_positive_float, default=0.5, help="lr factor per epoch after the first")
    f.add_argument("--optimizer", choices=["sgd", "adam"], default=None,
                   help="optimizer, state saved for --resume (default: sgd for a word LM, adam for seq2seq)")
    f.add_argument("--batch-size", type=_positive_int, default=None, help="seq2seq: sentences per batch (default: "
                                                                          "as the float model was trained)")
    f.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    f.add_argument("--distill", type=float, default=0.0, metavar="W",
                   help="distillation weight in [0, 1]: loss = (1-W) CE + W T^2 KL to the float model's logits")
    f.add_argument("--distill-temperature", type=_positive_float, default=2.0, help="distillation temperature T")
    run_folder(f)
    data(f, default=None)
    threads(f)

    r = add("report", cmd_report, "accuracy-vs-size sweep: bits x {PTQ, QAT} x gate mode")
    r.add_argument("checkpoint", help="float checkpoint")
    r.add_argument("--widths", default="8,6,4,3,2,ternary,binary", help="comma-separated weight widths")
    r.add_argument("--methods", default="ptq,qat", help="ptq and/or qat")
    r.add_argument("--gates", default="soft,hard", help="soft and/or hard (by default the gates the model trained "
                   "as Gumbel gates: LSTM i,f; GRU r,z; see --hard-gates)")
    r.add_argument("--hard-gates", type=_gates_arg, default=None, help="the gates of the hard rows, e.g. 'r'")
    r.add_argument("--split", choices=["valid", "test"], default="test", help="evaluation split")
    r.add_argument("--qat-lr", type=_positive_float, default=2.0, help="QAT learning rate")
    r.add_argument("--qat-batches", type=_positive_int, default=400, help="QAT batches per row")
    r.add_argument("--name", default=None, help="model name in the table (default: the checkpoint path)")
    r.add_argument("--out", required=True, help="output folder (results.json, table.md, tradeoff.png)")
    data(r, default=None)
    threads(r)

    x = add("export", cmd_export, "quantize (or take a QAT checkpoint) and write a deployable artifact")
    x.add_argument("checkpoint", help="float or QAT checkpoint")
    x.add_argument("--bits", type=_bits_arg, default=4, help="weight width for a float checkpoint")
    x.add_argument("--hard-gates", type=_gates_arg, default="", help="gates deployed as 1[a>0], e.g. 'if'")
    x.add_argument("--target", choices=available_targets(), default="cpu", help="deployment target")
    x.add_argument("--onnx-weights", choices=["dq", "nbits"], default="dq",
                   help="onnx target: DequantizeLinear + MatMul, or com.microsoft.MatMulNBits (onnxruntime only)")
    x.add_argument("--out", required=True, help="artifact directory, e.g. model.g2q")
    x.add_argument("--no-validate", action="store_true", help="skip the test-set perplexity figures")
    data(x, default=None)
    threads(x)

    from . import cli_deploy
    p = add("run", cli_deploy.cmd_run, "generate with an LM artifact, or run any artifact on an input array")
    p.add_argument("artifact", help="a NAME.g2q artifact directory")
    p.add_argument("--prompt", default="", help="LMs: whitespace-separated words (unknown words become <unk>)")
    p.add_argument("--ids", default=None, help="LMs: the prompt as token ids, e.g. '3 17 42'")
    p.add_argument("--max-tokens", type=int, default=20, help="LMs: number of tokens to generate")
    p.add_argument("--temperature", type=_nonneg_float, default=0.0, help="LMs: 0 = greedy, > 0 = sample")
    p.add_argument("--top-k", type=_positive_int, default=None, help="LMs: sample only from the k most likely")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--input", default=None, help="any model: a .npy array shaped like the model's input")
    p.add_argument("--output", default=None, help="with --input: write the output array to this .npy file")
    p.add_argument("--backend", choices=["auto", "kernels", "reference"], default="auto", help="engine backend")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    threads(p)

    b = add("bench", cli_deploy.cmd_bench, "latency and throughput of an artifact on random inputs")
    b.add_argument("artifact", help="a NAME.g2q artifact directory")
    b.add_argument("--batch-size", type=_positive_int, default=1, help="sequences per call")
    b.add_argument("--steps", type=_positive_int, default=200, help="streaming steps to time")
    b.add_argument("--seq-len", type=_positive_int, default=35, help="length of the whole sequences run()")
    b.add_argument("--repeats", type=_positive_int, default=3, help="report the best of this many runs")
    b.add_argument("--backend", choices=["auto", "kernels", "reference"], default="auto", help="engine backend")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    threads(b)

    i = add("info", cli_deploy.cmd_info, "what an artifact holds: target, graph, sizes, validation")
    i.add_argument("artifact", help="a NAME.g2q artifact directory")
    i.add_argument("--json", action="store_true", help="print the manifest (without the file table) as JSON")

    from . import cli_alloc
    cli_alloc.add_commands(add, sys.modules[__name__])

    try:                                         # translation commands (need torch)
        from . import cli_mt
    except ImportError:
        cli_mt = None
    if cli_mt is not None:
        cli_mt.add_commands(add)
    return ap


def _user_errors():
    """Exception types that are the user's mistake (bad file, bad data, bad option): one line."""
    from .data.download import DataError
    from .targets.artifact import ArtifactError
    from .targets.graph import GraphError
    errs = [CLIError, ArtifactError, DataError, GraphError]
    try:
        from .checkpoint import CheckpointError
        from .lower import ExportError
        errs += [CheckpointError, ExportError]
    except ImportError:            # the runtime-only install has no torch
        pass
    return tuple(errs)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        print(f"g2quant: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"g2quant: error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("g2quant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
