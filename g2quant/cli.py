"""The ``g2quant`` command (also ``python -m g2quant``).

Each subcommand is a small function; torch is imported only by the commands that need it.
"""
from __future__ import annotations

import argparse
import sys

from . import __version__


class CLIError(Exception):
    """A user-facing error: printed as ``g2quant: error: ...`` with exit status 2."""


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
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return v


def _load_lm_corpus(data: str, data_dir: str | None):
    from .data.download import DataError
    if data == "synthetic":
        from .data.synthetic import synthetic_corpus
        return synthetic_corpus()
    from .data.ptb import load_ptb
    try:
        return load_ptb(data_dir)
    except DataError as exc:
        raise CLIError(str(exc)) from exc


# ---------------------------------------------------------------- train-lm / eval-lm
def cmd_train_lm(args) -> int:
    import torch

    from .models import LMConfig, WordLM
    from .train import TrainConfig, train_lm

    torch.set_num_threads(args.threads)
    corpus = _load_lm_corpus(args.data, args.data_dir)
    try:
        cfg = LMConfig.preset(args.preset, vocab_size=len(corpus.vocab), gates=args.gates, tau=args.tau,
                              noise_p=args.noise_p, tied=args.tied,
                              **({"dropout": args.dropout} if args.dropout is not None else {}))
        tcfg = TrainConfig(epochs=args.epochs, lr=args.lr, lr_decay=args.lr_decay, decay_after=args.decay_after,
                           batch_size=args.batch_size, bptt=args.bptt, clip=args.clip, seed=args.seed,
                           max_batches=args.max_batches)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    torch.manual_seed(args.seed)
    model = WordLM(cfg)
    print(f"training {args.preset} LM ({model.num_parameters() / 1e6:.2f}M parameters, gates={cfg.gates}) "
          f"on {args.data}: {len(corpus.train):,} tokens, {tcfg.epochs} epochs -> {args.out}")
    try:
        result = train_lm(model, corpus.train, corpus.valid, tcfg, args.out, resume=args.resume,
                          progress=not args.quiet, record_extra={"data": args.data})
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from exc
    print(f"best valid ppl {result.best_valid_ppl:.2f}; checkpoints in {args.out}")
    return 0


def cmd_eval_lm(args) -> int:
    import torch

    from .evaluate import lm_perplexity
    from .nn.g2lstm import G2LSTM

    torch.set_num_threads(args.threads)
    model, record = _load_model(args.checkpoint)
    corpus = _load_lm_corpus(args.data, args.data_dir)
    lstm = next(m for m in model.modules() if isinstance(m, G2LSTM))
    if args.hard_gates:
        lstm.hard_gates = frozenset(args.hard_gates)
    data = getattr(corpus, args.split)
    r = lm_perplexity(model, data, batch_size=args.batch_size, bptt=args.bptt, progress=not args.quiet)
    hard = "".join(g for g in "ifo" if g in lstm.hard_gates) or "none"
    print(f"{args.data} {args.split} perplexity {r['ppl']:.2f} ({r['tokens']:,} tokens, batch size "
          f"{r['batch_size']}, bptt {r['bptt']}, hidden state carried across batches, hard gates: {hard})")
    return 0


# ---------------------------------------------------------------- quantization
def _load_model(path):
    from .checkpoint import CheckpointError, load_model
    try:
        model, record = load_model(path)
    except CheckpointError as exc:
        raise CLIError(str(exc)) from exc
    return model, record


def _bits_arg(text: str):
    from .api import _check_bits
    try:
        return _check_bits(text, "--bits")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_finetune(args) -> int:
    """Quantization-aware fine-tuning from a float checkpoint."""
    import torch

    from .api import quantize
    from .train import TrainConfig, train_lm

    torch.set_num_threads(args.threads)
    model, record = _load_model(args.checkpoint)
    if record.get("kind") != "word_lm":
        raise CLIError(f"{args.checkpoint} is not a float word-LM checkpoint (kind {record.get('kind')!r})")
    corpus = _load_lm_corpus(args.data, args.data_dir)
    try:
        q = quantize(model, bits=args.bits, method="qat", hard_gates=args.hard_gates)
        tcfg = TrainConfig(epochs=args.epochs, lr=args.lr, lr_decay=args.lr_decay, decay_after=1,
                           max_batches=args.max_batches, seed=args.seed)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    print(f"QAT: {args.bits}-bit weights, int8 activations, hard gates: {args.hard_gates or 'none'} -> {args.out}")
    res = train_lm(q, corpus.train, corpus.valid, tcfg, args.out, resume=args.resume, progress=not args.quiet,
                   kind="quantized_word_lm", record_extra={"config": model.config.to_dict(),
                                                           "quant_config": q.config.to_dict(), "data": args.data})
    print(f"best valid ppl {res.best_valid_ppl:.2f}; size {q.size_bytes() / 1e6:.2f} MB "
          f"(float {q.float_size_bytes() / 1e6:.2f} MB)")
    return 0


def cmd_report(args) -> int:
    import torch

    from .report import QATSettings, tradeoff

    torch.set_num_threads(args.threads)
    model, record = _load_model(args.checkpoint)
    corpus = _load_lm_corpus(args.data, args.data_dir)
    try:
        widths = [_bits_arg(w) for w in args.widths.split(",")]
    except argparse.ArgumentTypeError as exc:
        raise CLIError(f"--widths: {exc}") from exc
    try:
        rows = tradeoff(model, eval_data=getattr(corpus, args.split), train_data=corpus.train,
                        valid_data=corpus.valid[:20_000], out_dir=args.out, name=args.name or str(args.checkpoint),
                        widths=widths, methods=args.methods.split(","), gate_modes=args.gates.split(","),
                        qat=QATSettings(lr=args.qat_lr, max_batches=args.qat_batches))
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    print(f"{len(rows)} rows -> {args.out}/results.json, table.md, tradeoff.png")
    return 0


def cmd_export(args) -> int:
    import torch

    from .api import QuantizedModel, quantize
    from .export import ExportError

    torch.set_num_threads(args.threads)
    model, record = _load_model(args.checkpoint)
    try:
        if isinstance(model, QuantizedModel):
            q = model
            if args.hard_gates:
                q.set_hard_gates(args.hard_gates)
        else:
            q = quantize(model, bits=args.bits, hard_gates=args.hard_gates)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    corpus = _load_lm_corpus(args.data or record.get("data", "ptb"), args.data_dir)
    if len(corpus.vocab) != q.model.config.vocab_size:
        raise CLIError(f"the checkpoint has a {q.model.config.vocab_size}-word vocabulary but --data "
                       f"{args.data} has {len(corpus.vocab)} words")
    validation = {}
    if not args.no_validate:
        from .evaluate import lm_perplexity
        r = q.evaluate(corpus.test)
        validation["test_eval"] = {"batch_size": r["batch_size"], "bptt": r["bptt"], "tokens": r["tokens"]}
        validation["test_ppl_quantized_torch"] = r["ppl"]
        if not isinstance(model, QuantizedModel):
            validation["test_ppl_float"] = lm_perplexity(model, corpus.test)["ppl"]
    try:
        path = q.export(args.out, target=args.target, vocab=corpus.vocab, validation=validation)
    except ExportError as exc:
        raise CLIError(str(exc)) from exc
    print(f"wrote {path}: {q.size_bytes() / 1e6:.2f} MB deployable (float {q.float_size_bytes() / 1e6:.2f} MB)")
    for k, v in validation.items():
        print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    return 0


# ---------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(out_dir=args.out, seconds=args.seconds, data=args.data, data_dir=args.data_dir,
                    threads=args.threads)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="g2quant", description="Quantize and deploy gated recurrent networks "
                                 "(G2-LSTM: binary-valued gates, low-bit weights).")
    ap.add_argument("--version", action="version", version=f"g2quant {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    def data_args(p, default="ptb"):
        p.add_argument("--data", choices=["ptb", "synthetic"], default=default,
                       help="corpus (ptb: from --data-dir, $G2QUANT_DATA/ptb or the download cache)")
        p.add_argument("--data-dir", default=None, help="folder holding ptb.{train,valid,test}.txt")
        p.add_argument("--threads", type=_positive_int, default=2)

    t = sub.add_parser("train-lm", help="train a word-level (G2-)LSTM language model")
    t.add_argument("--preset", choices=["tiny", "small", "medium"], default="small")
    t.add_argument("--gates", choices=["sigmoid", "gumbel", "sharpened"], default="gumbel")
    t.add_argument("--tau", type=_positive_float, default=None, help="temperature (default 0.9 gumbel, 0.2 sharpened)")
    t.add_argument("--noise-p", type=float, default=1.0)
    t.add_argument("--tied", action="store_true")
    t.add_argument("--dropout", type=float, default=None)
    t.add_argument("--epochs", type=_positive_int, default=13)
    t.add_argument("--lr", type=_positive_float, default=20.0)
    t.add_argument("--lr-decay", type=_positive_float, default=0.5)
    t.add_argument("--decay-after", type=int, default=4)
    t.add_argument("--batch-size", type=_positive_int, default=20)
    t.add_argument("--bptt", type=_positive_int, default=20)
    t.add_argument("--clip", type=_positive_float, default=0.25)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-batches", type=_positive_int, default=None, help="cap batches per epoch")
    t.add_argument("--out", required=True, help="checkpoint folder (last.safetensors, best.safetensors)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    t.add_argument("--quiet", action="store_true")
    data_args(t)
    t.set_defaults(func=cmd_train_lm)

    e = sub.add_parser("eval-lm", help="perplexity of a checkpoint")
    e.add_argument("checkpoint", help="a .safetensors checkpoint or a folder holding last.safetensors")
    e.add_argument("--split", choices=["train", "valid", "test"], default="test")
    e.add_argument("--batch-size", type=_positive_int, default=10)
    e.add_argument("--bptt", type=_positive_int, default=35)
    e.add_argument("--hard-gates", default="", help="evaluate these gates as 1[a>0], e.g. 'if'")
    e.add_argument("--quiet", action="store_true")
    data_args(e)
    e.set_defaults(func=cmd_eval_lm)

    d = sub.add_parser("demo", help="the one-minute tour: train a small G2-LSTM, report, quantize, export")
    d.add_argument("--out", default="g2quant-demo", help="output folder")
    d.add_argument("--seconds", type=_positive_float, default=60.0, help="training time budget")
    d.add_argument("--data", choices=["auto", "ptb", "synthetic"], default="auto",
                   help="auto: PTB when available locally, else a generated corpus")
    d.add_argument("--data-dir", default=None)
    d.add_argument("--threads", type=_positive_int, default=2)
    d.set_defaults(func=cmd_demo)

    f = sub.add_parser("finetune", help="quantization-aware fine-tuning (QAT) from a float checkpoint")
    f.add_argument("checkpoint")
    f.add_argument("--bits", type=_bits_arg, default=4, help="2..8, binary or ternary")
    f.add_argument("--hard-gates", default="if", help="gates trained and deployed as 1[a>0] ('' for none)")
    f.add_argument("--epochs", type=_positive_int, default=1)
    f.add_argument("--max-batches", type=_positive_int, default=None)
    f.add_argument("--lr", type=_positive_float, default=2.0)
    f.add_argument("--lr-decay", type=_positive_float, default=0.5)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", required=True)
    f.add_argument("--resume", action="store_true")
    f.add_argument("--quiet", action="store_true")
    data_args(f)
    f.set_defaults(func=cmd_finetune)

    r = sub.add_parser("report", help="accuracy-vs-size sweep: bits x {PTQ, QAT} x gate mode")
    r.add_argument("checkpoint", help="float checkpoint")
    r.add_argument("--widths", default="8,6,4,3,2,ternary,binary")
    r.add_argument("--methods", default="ptq,qat")
    r.add_argument("--gates", default="soft,hard", help="soft and/or hard (hard input and forget gates)")
    r.add_argument("--split", choices=["valid", "test"], default="test")
    r.add_argument("--qat-lr", type=_positive_float, default=2.0)
    r.add_argument("--qat-batches", type=_positive_int, default=400)
    r.add_argument("--name", default=None)
    r.add_argument("--out", required=True)
    data_args(r)
    r.set_defaults(func=cmd_report)

    x = sub.add_parser("export", help="quantize (or take a QAT checkpoint) and write a deployable artifact")
    x.add_argument("checkpoint", help="float or QAT checkpoint")
    x.add_argument("--bits", type=_bits_arg, default=4)
    x.add_argument("--hard-gates", default="")
    x.add_argument("--target", choices=["cpu"], default="cpu")
    x.add_argument("--out", required=True, help="artifact directory, e.g. model.g2q")
    x.add_argument("--no-validate", action="store_true", help="skip the test-set perplexity figures")
    data_args(x, default=None)
    x.set_defaults(func=cmd_export)

    _add_optional_commands(sub)
    return ap


def _add_optional_commands(sub) -> None:
    """Commands contributed by other modules (quantization, deployment targets)."""
    try:
        from .targets.cpu.commands import add_subcommands
    except ImportError:
        return
    add_subcommands(sub)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "hard_gates", None):
        bad = set(args.hard_gates) - set("ifo")
        if bad:
            parser.error(f"--hard-gates may contain only the letters i, f, o; got {''.join(sorted(bad))!r}")
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"g2quant: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("g2quant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
