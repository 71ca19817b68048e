"""Translation subcommands of ``g2quant``: ``train-mt``, ``translate``, ``eval-mt``.

``build_parser`` in ``g2quant.cli`` wires them in with ``cli_mt.add_commands(add)``. Checkpoints
carry their vocabularies and BPE codes, so ``translate`` needs no data set and ``eval-mt`` can
score a model on any corpus (its source text is re-segmented with the model's own BPE).
"""
from __future__ import annotations

import json
import sys

from .cli_common import CLIError, say, show_progress

EPILOGS = {
    "train-mt": "examples:\n"
                "  g2quant train-mt --data multi30k --gates gumbel --out runs/mt-g2\n"
                "  g2quant train-mt --data multi30k --gates gumbel --out runs/mt-g2 --resume   # after Ctrl-C\n"
                "  g2quant train-mt --data iwslt14 --allow-sample --max-batches 50 --epochs 1 --out runs/smoke",
    "translate": "examples:\n"
                 "  echo 'ein mann fährt fahrrad .' | g2quant translate runs/mt-g2/best.safetensors --beam 5\n"
                 "  g2quant translate runs/mt-g2/best.safetensors --tokenize < raw.de > out.en",
    "eval-mt": "examples:\n"
               "  g2quant eval-mt runs/mt-g2/best.safetensors --data multi30k --split test --beam 5\n"
               "  g2quant eval-mt runs/mt-g2/best.safetensors --data iwslt14 --split test --json",
}


def _cli():
    from . import cli
    return cli


def _is_artifact(path) -> bool:
    from .cli_deploy import is_artifact
    return is_artifact(path)


def _data_flags(p, default):
    p.add_argument("--data", choices=["multi30k", "iwslt14"], default=default,
                   help="corpus: multi30k (Multi30k De-En task 1) or iwslt14 (fairseq form, joint 10k BPE); from "
                        "--data-dir, $G2QUANT_DATA or the download cache" +
                        ("" if default else "; default: the corpus the checkpoint was trained on"))
    p.add_argument("--data-dir", default=None, help="folder holding the corpus files")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading missing data")
    p.add_argument("--allow-sample", action="store_true",
                   help="iwslt14: accept the 8,800-pair train-sample (smoke tests only, never for results)")


def _gates_flag(p):
    p.add_argument("--hard-gates", type=_cli()._gates_arg, default="", help="evaluate these gates as 1[a>0], e.g. 'if'")


def add_commands(add) -> None:
    """Register the translation commands with ``build_parser``'s ``add(name, func, help)``."""
    c = _cli()
    pos_int, pos_float, nonneg, prob = c._positive_int, c._positive_float, c._nonneg_float, c._probability

    t = add("train-mt", cmd_train_mt, "train a (G2-)LSTM attention encoder-decoder for translation")
    t.epilog = EPILOGS["train-mt"]
    _data_flags(t, "multi30k")
    t.add_argument("--merges", type=pos_int, default=None,
                   help="multi30k: joint BPE merges learned on train (default 8000); iwslt14 uses its 10k codes")
    t.add_argument("--gates", choices=["sigmoid", "gumbel", "sharpened"], default="gumbel", help="gate nonlinearity")
    t.add_argument("--tau", type=pos_float, default=None, help="temperature (default 0.9 gumbel, 0.2 sharpened)")
    t.add_argument("--noise-p", type=prob, default=0.2, help="probability of Gumbel noise per gate value "
                                                             "(the authors' code: 0.2; the paper: 1.0)")
    t.add_argument("--emb-size", type=pos_int, default=256, help="embedding size")
    t.add_argument("--hidden-size", type=pos_int, default=256, help="LSTM size (the decoder's; a bidirectional "
                                                                    "encoder has half per direction)")
    t.add_argument("--layers", type=pos_int, default=2, help="LSTM layers in the encoder and in the decoder")
    t.add_argument("--bidirectional", action="store_true", help="bidirectional encoder")
    t.add_argument("--dropout", type=nonneg, default=0.2, help="dropout")
    t.add_argument("--tied", action="store_true", help="tie the output layer to the target embedding")
    t.add_argument("--epochs", type=pos_int, default=15, help="epochs")
    t.add_argument("--batch-size", type=pos_int, default=64, help="sentences per batch")
    t.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="optimizer")
    t.add_argument("--lr", type=pos_float, default=1e-3, help="learning rate")
    t.add_argument("--momentum", type=nonneg, default=0.0, help="SGD momentum")
    t.add_argument("--weight-decay", type=nonneg, default=0.0, help="weight decay")
    t.add_argument("--schedule", choices=["plateau", "decay", "constant"], default="plateau",
                   help="plateau: x --lr-decay when the selection metric stops improving; decay: x --lr-decay "
                        "every epoch from --decay-after on")
    t.add_argument("--lr-decay", type=pos_float, default=0.5, help="learning-rate factor")
    t.add_argument("--decay-after", type=int, default=8, help="decay schedule: epochs at the full learning rate")
    t.add_argument("--patience", type=int, default=0, help="plateau schedule: epochs without improvement first")
    t.add_argument("--clip", type=pos_float, default=5.0, help="gradient norm clip")
    t.add_argument("--label-smoothing", type=nonneg, default=0.1, help="label smoothing (0: none)")
    t.add_argument("--select", choices=["bleu", "loss"], default="bleu",
                   help="keep best.safetensors by validation BLEU or validation loss")
    t.add_argument("--valid-beam", type=pos_int, default=1, help="beam of the per-epoch validation BLEU (1: greedy)")
    t.add_argument("--valid-limit", type=pos_int, default=None,
                   help="validate (loss and BLEU) on the first N sentences only")
    t.add_argument("--max-batches", type=pos_int, default=None, help="cap batches per epoch")
    t.add_argument("--time-budget", type=pos_float, default=None, help="seconds; stop after the epoch it runs out in")
    t.add_argument("--init-from", default=None, metavar="LAST",
                   help="continue another run (its last.safetensors: weights, optimizer, epochs) with this model's "
                        "gates, e.g. turn Gumbel gates on in a float baseline; --epochs counts both runs")
    c_run_folder(t)
    c_threads(t)

    r = add("translate", cmd_translate, "translate tokenized sentences (lowercased for the model) from stdin or "
                                        "--input with a checkpoint")
    r.epilog = EPILOGS["translate"]
    r.add_argument("checkpoint", help="a seq2seq .safetensors checkpoint or its run folder")
    r.add_argument("--beam", type=pos_int, default=5, help="beam size (1: greedy)")
    r.add_argument("--batch-size", type=pos_int, default=64, help="sentences per batch")
    r.add_argument("--max-len", type=pos_int, default=None, help="longest output in BPE tokens (default 2*source+10)")
    r.add_argument("--tokenize", action="store_true",
                   help="the input is raw text: Moses-tokenize (sacremoses) and lowercase it first")
    r.add_argument("--input", default=None, help="read sentences from this file instead of stdin")
    r.add_argument("--output", default=None, help="write translations to this file instead of stdout")
    _gates_flag(r)
    c_threads(r)

    e = add("eval-mt", cmd_eval_mt, "BLEU of a translation checkpoint (tokenized, lowercased, sacrebleu tok none)")
    e.epilog = EPILOGS["eval-mt"]
    e.add_argument("checkpoint", help="a seq2seq .safetensors checkpoint or its run folder")
    _data_flags(e, None)
    e.add_argument("--split", choices=["train", "valid", "test"], default="test", help="corpus split")
    e.add_argument("--beam", type=pos_int, default=5, help="beam size (1: greedy)")
    e.add_argument("--batch-size", type=pos_int, default=64, help="sentences per batch")
    e.add_argument("--limit", type=pos_int, default=None, help="score only the first N sentences")
    e.add_argument("--hypotheses", default=None, help="also write the translations to this file")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    _gates_flag(e)
    c_threads(e)


def c_run_folder(p) -> None:
    p.add_argument("--out", required=True, help="checkpoint folder (last.safetensors, best.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    p.add_argument("--force", action="store_true", help="start a new run in an OUT that already holds one")
    p.add_argument("--seed", type=int, default=0, help="random seed")


def c_threads(p) -> None:
    p.add_argument("--threads", type=_cli()._positive_int, default=None, help="torch CPU threads (default 2)")


# ---------------------------------------------------------------- data
def load_data(args, name: str):
    """The ``--data`` corpus as :class:`~g2quant.data.translation.TranslationData`."""
    import warnings

    from .data.download import DataError
    from .data.translation import MULTI30K_MERGES, load_iwslt14, load_multi30k
    say(args, f"loading {name}" + (f" from {args.data_dir}" if args.data_dir else ""))
    try:
        if name == "multi30k":
            return load_multi30k(args.data_dir, download=not args.no_download,
                                 merges=getattr(args, "merges", None) or MULTI30K_MERGES)
        if getattr(args, "merges", None):
            raise CLIError("--merges applies to multi30k; iwslt14 comes with its joint 10k BPE codes")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = load_iwslt14(args.data_dir, allow_sample=args.allow_sample, download=not args.no_download)
        for w in caught:
            print(f"g2quant: warning: {w.message}", file=sys.stderr)
        return data
    except DataError as exc:
        raise CLIError(str(exc)) from None


def _load_mt_model(path):
    """``(model, record, src_vocab, tgt_vocab, bpe)`` of a checkpoint (torch) or an artifact (its
    torch-free runtime; ``record`` then holds the artifact's recorded figures)."""
    from .data.translation import BPE, Vocab
    from .cli_deploy import is_artifact
    if is_artifact(path):
        from .targets.artifact import ArtifactError
        from .targets.base import load
        try:
            rt = load(path)
        except ArtifactError as exc:
            raise CLIError(f"cannot load {path}: {exc}") from None
        if not hasattr(rt, "translate_ids") or rt.src_vocab is None or rt.tgt_vocab is None or rt.bpe_codes is None:
            raise CLIError(f"{path} is not a translation artifact with vocabularies and BPE codes")
        record = {"kind": "seq2seq-artifact", **(rt.manifest.get("validation") or {})}
        return rt, record, Vocab(rt.src_vocab), Vocab(rt.tgt_vocab), BPE(rt.bpe_codes)
    from .models import seq2seq  # noqa: F401  (registers the seq2seq checkpoint kind)
    model, record = _cli()._load_model(path)
    if "vocab" not in record or "bpe_codes" not in record:
        raise CLIError(f"{path} is not a translation checkpoint (kind {record.get('kind')!r}; it has no vocabularies "
                       "and BPE codes)")
    try:
        src_vocab, tgt_vocab = Vocab(record["vocab"]["src"]), Vocab(record["vocab"]["tgt"])
        bpe = BPE(record["bpe_codes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CLIError(f"{path}: the checkpoint's vocabularies or BPE codes are damaged ({exc})") from None
    return model, record, src_vocab, tgt_vocab, bpe


def _set_hard_gates(model, gates: str) -> str:
    if not hasattr(model, "modules"):                     # an artifact: its gates were fixed at export
        if gates:
            raise CLIError("--hard-gates applies to checkpoints; an artifact's gates are fixed at export")
        node = next((n for n in model.parts["decoder"].graph.nodes if n.op == "lstm"), None)
        return (node.attrs.get("hard_gates") if node is not None else "") or "none"
    from .nn.g2lstm import G2LSTM
    lstms = [m for m in model.modules() if isinstance(m, G2LSTM)]
    if gates:
        for m in lstms:
            m.hard_gates = frozenset(gates)
    return "".join(g for g in "ifo" if lstms and g in lstms[0].hard_gates) or "none"


# ---------------------------------------------------------------- commands
def cmd_train_mt(args) -> int:
    import torch

    from .models.seq2seq import Seq2Seq, Seq2SeqConfig
    from .train_mt import MTTrainConfig, train_mt

    c = _cli()
    c._set_torch_threads(args)
    c._check_run_folder(args)
    data = load_data(args, args.data)
    try:
        cfg = Seq2SeqConfig(len(data.src_vocab), len(data.tgt_vocab), emb_size=args.emb_size,
                            hidden_size=args.hidden_size, num_layers=args.layers, bidirectional=args.bidirectional,
                            dropout=args.dropout, tied=args.tied, gates=args.gates, tau=args.tau, noise_p=args.noise_p)
        tcfg = MTTrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                             momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                             lr_decay=args.lr_decay, decay_after=args.decay_after, patience=args.patience,
                             clip=args.clip, label_smoothing=args.label_smoothing, select=args.select,
                             valid_beam=args.valid_beam, valid_limit=args.valid_limit, seed=args.seed,
                             max_batches=args.max_batches, time_budget=args.time_budget)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    torch.manual_seed(args.seed)
    model = Seq2Seq(cfg)
    say(args, f"training seq2seq ({model.num_parameters() / 1e6:.2f}M parameters, gates={cfg.gates}) on "
              f"{data.name}: {len(data.train):,} pairs, vocab {len(data.src_vocab):,}/{len(data.tgt_vocab):,}, "
              f"{tcfg.epochs} epochs -> {args.out}")
    from .checkpoint import CheckpointError
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="IWSLT14 train-sample")    # said once, by load_data
            result = train_mt(model, data, tcfg, args.out, resume=args.resume, init_from=args.init_from,
                              progress=show_progress(args),
                              log=lambda s: say(args, s))
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    except CheckpointError as exc:
        raise CLIError(str(exc)) from None
    what = "valid BLEU" if tcfg.select == "bleu" else "valid loss"
    print(f"best {what} {abs(result.best):.2f}; checkpoints in {args.out}")
    return 0


def cmd_finetune_mt(args, model, record) -> int:
    """``g2quant finetune`` of a seq2seq checkpoint: QAT of the whole model (embeddings, encoder,
    attention, decoder, output layer) on the corpus it was trained on, selected by validation BLEU."""
    from .api import quantize
    from .checkpoint import CheckpointError
    from .train_mt import MTTrainConfig, train_mt

    if args.distill:
        raise CLIError("--distill applies to word LMs; seq2seq QAT trains on the references")
    name = record.get("data", "multi30k")
    if args.data not in (None, name):
        raise CLIError(f"{args.checkpoint} was trained on {name}; finetune it on the same corpus (drop --data)")
    args.allow_sample = bool(record.get("sample"))
    data = load_data(args, name)
    if list(data.src_vocab.tokens) != record.get("vocab", {}).get("src") or \
            list(data.tgt_vocab.tokens) != record.get("vocab", {}).get("tgt"):
        raise CLIError(f"the {name} corpus found here gives other vocabularies than {args.checkpoint} was trained "
                       "with (other BPE merges or files); point --data-dir at the same corpus")
    bits = args.bits
    if args.allocation:
        from .allocate import Allocation
        try:
            bits = Allocation.load(args.allocation).bits_map()
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    trained = record.get("train_config") or {}
    try:
        q = quantize(model, bits=bits, method="qat", hard_gates=args.hard_gates)
        tcfg = MTTrainConfig(epochs=args.epochs, optimizer=args.optimizer or "adam",
                             lr=args.lr if args.lr is not None else 1e-4, momentum=args.momentum,
                             batch_size=args.batch_size or trained.get("batch_size", 64),
                             label_smoothing=trained.get("label_smoothing", 0.1), clip=trained.get("clip", 5.0),
                             schedule="constant", seed=args.seed, max_batches=args.max_batches,
                             valid_limit=trained.get("valid_limit"))
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    say(args, f"QAT of the seq2seq model: {args.allocation or str(args.bits) + '-bit'} weights, int8 activations, "
              f"hard gates: {args.hard_gates or 'none'}, {tcfg.optimizer} lr {tcfg.lr:g}, {tcfg.epochs} epoch(s) on "
              f"{data.name} -> {args.out}")
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="IWSLT14 train-sample")    # said once, by load_data
            res = train_mt(q, data, tcfg, args.out, resume=args.resume, progress=show_progress(args),
                           kind="quantized_seq2seq", log=lambda s: say(args, s),
                           record_extra={"config": record["config"], "quant_config": q.config.to_dict()})
    except (FileNotFoundError, CheckpointError) as exc:
        raise CLIError(str(exc)) from None
    print(f"best valid BLEU {res.best:.2f}; size {q.size_bytes() / 1e6:.2f} MB (float {q.float_size_bytes() / 1e6:.2f} MB)")
    return 0


def cmd_translate(args) -> int:
    from .evaluate_mt import translate_lines

    if not _is_artifact(args.checkpoint):
        _cli()._set_torch_threads(args)
    model, record, src_vocab, tgt_vocab, bpe = _load_mt_model(args.checkpoint)
    _set_hard_gates(model, args.hard_gates)
    try:
        text = open(args.input, encoding="utf-8").read() if args.input else sys.stdin.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"cannot read the input as UTF-8 text ({exc})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if args.tokenize:
        from sacremoses import MosesTokenizer
        tok = MosesTokenizer(lang=record.get("src_lang", "de"))
        lines = [tok.tokenize(line, escape=True, return_str=True) if line.strip() else "" for line in lines]
    lines = [line.lower() for line in lines]
    outs = translate_lines(model, lines, src_vocab, tgt_vocab, bpe, beam=args.beam, batch_size=args.batch_size,
                           max_len=args.max_len)
    result = "".join(o + "\n" for o in outs)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(result)
        say(args, f"wrote {len(outs)} translations to {args.output}")
    else:
        sys.stdout.write(result)
    return 0


def cmd_eval_mt(args) -> int:
    from .data.download import DataError
    from .data.translation import tokenized_split
    from .evaluate_mt import corpus_bleu, translate_lines

    if not _is_artifact(args.checkpoint):
        _cli()._set_torch_threads(args)
    model, record, src_vocab, tgt_vocab, bpe = _load_mt_model(args.checkpoint)
    hard = _set_hard_gates(model, args.hard_gates)
    trained_on = str(record.get("data", "?"))
    name = args.data or ("iwslt14" if trained_on.startswith("iwslt14") else trained_on)
    if name not in ("multi30k", "iwslt14"):
        raise CLIError(f"{args.checkpoint} records no known training corpus ({trained_on!r}); pass --data")
    try:
        src, refs = tokenized_split(name, args.split, args.data_dir, download=not args.no_download,
                                    allow_sample=args.allow_sample)
    except DataError as exc:
        raise CLIError(str(exc)) from None
    if args.limit:
        src, refs = src[:args.limit], refs[:args.limit]
    backend = "torch" if not _is_artifact(args.checkpoint) else f"artifact, {model.backend}"
    say(args, f"translating {len(src):,} {name} {args.split} sentences (beam {args.beam}, {backend})")
    hyps = translate_lines(model, src, src_vocab, tgt_vocab, bpe, beam=args.beam, batch_size=args.batch_size)
    b = corpus_bleu(hyps, refs)
    notes = []
    if record.get("sample"):
        notes.append("trained on the IWSLT14 train-sample: a pipeline check, not a result")
    if not trained_on.startswith(name):
        notes.append(f"trained on {trained_on}, evaluated on {name}: a pipeline check, not a result")
    if args.hypotheses:
        with open(args.hypotheses, "w", encoding="utf-8") as f:
            f.write("".join(h + "\n" for h in hyps))
    if args.json:
        print(json.dumps({"model": str(args.checkpoint), "data": name, "split": args.split, "bleu": b.score,
                          "signature": b.signature, "details": b.details, "beam": args.beam,
                          "sentences": len(hyps), "hard_gates": hard, "trained_on": trained_on, "notes": notes,
                          "backend": backend}, indent=2))
    else:
        print(f"{name} {args.split}: BLEU {b.score:.2f} (beam {args.beam}, {len(hyps)} sentences, tokenized "
              f"lowercased after BPE removal; hard gates: {hard}; {backend})\n  signature: {b.signature}\n  {b.details}")
        for n in notes:
            print(f"  note: {n}")
    return 0


def export_seq2seq_cmd(args, model, record) -> int:
    """``g2quant export`` of a translation checkpoint: quantize, check the artifact's translations
    against torch's on the test split (unless ``--no-validate``), write, report."""
    from .api import QuantizedModel, quantize
    from .data.download import DataError
    from .data.translation import BPE, Vocab, tokenized_split
    from .evaluate_mt import corpus_bleu, translate_lines
    from .export_seq2seq import export_seq2seq, lower_seq2seq
    from .lower import ExportError
    from .targets.cpu.engine import Engine
    from .targets.seq2seq import Seq2SeqRuntime

    if args.target != "cpu":
        raise CLIError(f"translation models export to the cpu target, not {args.target!r}")
    try:
        src_vocab, tgt_vocab = Vocab(record["vocab"]["src"]), Vocab(record["vocab"]["tgt"])
        codes = record["bpe_codes"]
        bpe = BPE(codes)
    except (KeyError, TypeError, ValueError) as exc:
        raise CLIError(f"{args.checkpoint}: no usable vocabularies / BPE codes in the checkpoint ({exc})") from None
    try:
        q = model if isinstance(model, QuantizedModel) else quantize(model, bits=args.bits, hard_gates=args.hard_gates)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    data = str(record.get("data", "multi30k"))
    validation = {"data": data}
    if not args.no_validate:
        name = "iwslt14" if data.startswith("iwslt14") else data
        try:
            src, refs = tokenized_split(name, "test", getattr(args, "data_dir", None),
                                        download=not getattr(args, "no_download", False))
        except DataError as exc:
            raise CLIError(str(exc)) from None
        say(args, f"validating on {name} test ({len(src)} sentences, beam 5): torch quantized model, then the artifact")
        hyps_t = translate_lines(q, src, src_vocab, tgt_vocab, bpe, beam=5)
        graphs, mdesc = lower_seq2seq(q)
        rt = Seq2SeqRuntime({k: Engine(g) for k, g in graphs.items()}, mdesc)
        hyps_e = translate_lines(rt, src, src_vocab, tgt_vocab, bpe, beam=5)
        bt, be = corpus_bleu(hyps_t, refs), corpus_bleu(hyps_e, refs)
        same = sum(a == b for a, b in zip(hyps_t, hyps_e)) / max(1, len(src))
        validation.update({"test_bleu_quantized_torch": bt.score, "test_bleu_artifact": be.score,
                           "test_identical_translations": same, "bleu_signature": be.signature, "beam": 5})
    try:
        path = export_seq2seq(q, args.out, src_vocab=list(src_vocab.tokens), tgt_vocab=list(tgt_vocab.tokens),
                              bpe_codes=codes, validation=validation)
    except ExportError as exc:
        raise CLIError(str(exc)) from None
    print(f"wrote {path}: {q.size_bytes() / 1e6:.2f} MB deployable (float {q.float_size_bytes() / 1e6:.2f} MB)")
    for k, v in validation.items():
        print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    return 0
