"""Training loop for translation: teacher forcing, label smoothing, Adam or SGD with a
``torch.optim`` scheduler, gradient clipping, length-bucketed batches, checkpoints every epoch
(best by validation BLEU or loss, written before last, never replacing a better best) and a
bit-exact ``resume`` (model, optimizer and scheduler state; each epoch reseeds from ``seed + epoch``).

Files in ``out_dir``: ``last.safetensors`` and ``best.safetensors`` (model + record: config,
history, vocabularies and BPE codes, so a checkpoint translates on its own), ``optim.eN.safetensors``
(the optimizer and scheduler after epoch N, named in last's record) and ``history.json``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data.translation import PAD, TranslationData, bucket_batches, pad_batch, target_batch
from .evaluate_mt import evaluate_bleu, valid_loss

OPTIM_META = "g2quant_optimizer"


@dataclass(frozen=True)
class MTTrainConfig:
    epochs: int = 15
    batch_size: int = 64               # sentences per batch
    optimizer: str = "adam"            # "adam" | "sgd"
    lr: float = 1e-3
    momentum: float = 0.0              # sgd
    weight_decay: float = 0.0
    schedule: str = "plateau"          # "plateau": x lr_decay when the selection metric stalls; "decay":
    lr_decay: float = 0.5              #   x lr_decay every epoch from decay_after on; "constant"
    decay_after: int = 8
    patience: int = 0                  # plateau: epochs without improvement before decaying
    min_lr: float = 1e-5
    clip: float = 5.0                  # gradient norm
    label_smoothing: float = 0.1
    select: str = "bleu"               # best checkpoint by validation "bleu" or "loss"
    valid_beam: int = 1                # beam for the per-epoch validation BLEU (1 = greedy)
    valid_limit: int | None = None     # validate (loss, BLEU) on the first N sentences (None: all)
    eval_batch_size: int = 100
    bucket_width: int = 1              # source-length bucket (1: no padding in the encoder)
    seed: int = 0
    max_batches: int | None = None     # per epoch (smoke tests)
    time_budget: float | None = None   # seconds; stop after the epoch in which it runs out

    def __post_init__(self):
        checks = {"epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1,
                  "optimizer": self.optimizer in ("adam", "sgd"), "lr": self.lr > 0,
                  "momentum": 0 <= self.momentum < 1, "weight_decay": self.weight_decay >= 0,
                  "schedule": self.schedule in ("plateau", "decay", "constant"),
                  "lr_decay": 0 < self.lr_decay <= 1, "decay_after": self.decay_after >= 0,
                  "patience": self.patience >= 0, "min_lr": self.min_lr >= 0, "clip": self.clip > 0,
                  "label_smoothing": 0 <= self.label_smoothing < 1, "select": self.select in ("bleu", "loss"),
                  "valid_beam": self.valid_beam >= 1, "eval_batch_size": self.eval_batch_size >= 1,
                  "bucket_width": self.bucket_width >= 1,
                  "valid_limit": self.valid_limit is None or self.valid_limit >= 1,
                  "max_batches": self.max_batches is None or self.max_batches >= 1}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"MTTrainConfig.{name} has an invalid value: {getattr(self, name)!r}")

    @property
    def metric(self) -> str:
        return "valid_bleu" if self.select == "bleu" else "valid_loss"


@dataclass
class MTTrainResult:
    history: list = field(default_factory=list)
    best: float = -math.inf            # best selection score (BLEU, or -loss)
    checkpoint: str = ""
    stopped_early: bool = False
    seconds: float = 0.0


def make_optimizer(model: nn.Module, tcfg: MTTrainConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if tcfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    if tcfg.schedule == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=tcfg.lr_decay,
                                                           patience=tcfg.patience, min_lr=tcfg.min_lr)
    else:
        d, after = (tcfg.lr_decay, tcfg.decay_after) if tcfg.schedule == "decay" else (1.0, 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: d ** max(0, e + 1 - after))
    return opt, sched


def _save_optimizer(path: Path, opt, sched, epoch: int) -> None:
    """Write the optimizer (and scheduler, when given) state atomically as safetensors."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    meta = {"epoch": epoch, "param_groups": sd["param_groups"], "scalars": scalars, "scheduler": sched.state_dict() if sched is not None else None}
    from safetensors.torch import save_file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={OPTIM_META: json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_optimizer(path: Path, opt, sched, epoch: int) -> None:
    from safetensors import safe_open
    if not path.is_file():
        raise CheckpointError(f"cannot resume exactly: the optimizer state {path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[OPTIM_META])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"{path}: the optimizer state is unreadable ({exc})") from None
    if meta.get("epoch") != epoch:
        raise CheckpointError(f"{path} holds the optimizer after epoch {meta.get('epoch')}, the model is from "
                              f"epoch {epoch}")
    state: dict = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    try:
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        if sched is not None:
            sched.load_state_dict(meta["scheduler"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: the optimizer state does not fit this model and settings ({exc})") from None


def _score(metric: str, entry: dict) -> float:
    """Selection score, higher is better."""
    return entry["valid_bleu"] if metric == "valid_bleu" else -entry["valid_loss"]


def _best_on_disk(best: Path, metric: str) -> float:
    if not best.exists():
        return -math.inf
    try:
        _, rec = load_checkpoint(best)
        b = rec["best"]
    except (CheckpointError, KeyError, TypeError):
        return -math.inf
    if b.get("metric") != metric:
        raise CheckpointError(f"{best} was selected by {b.get('metric')} and this run selects by {metric}: they "
                              "cannot be compared; move it away or select by the same metric")
    return float(b["score"])


def train_mt(model: nn.Module, data: TranslationData, tcfg: MTTrainConfig, out_dir: str | os.PathLike, *,
             resume: bool = False, init_from: str | os.PathLike | None = None, progress: bool | None = None,
             kind: str = "seq2seq", record_extra: dict | None = None, log=print, on_epoch=None) -> MTTrainResult:
    """Train ``model`` (``forward(src [S,B], tgt_in [T,B]) -> logits [T,B,V]``) on ``data.train``.

    After every epoch: validation loss and BLEU (``valid_beam``), ``best.safetensors`` when the
    selection metric improves (never replacing a better one already on disk), then the optimizer
    state and ``last.safetensors``. ``resume=True`` continues from ``last.safetensors`` exactly
    as an uninterrupted run would. ``on_epoch(entry)`` is called after each epoch's checkpoint.

    ``init_from`` (a ``last.safetensors`` of another run on the same data, e.g. a float baseline):
    when ``out_dir`` holds no run yet, start from that run's weights, optimizer and schedule state
    and epoch count, and go on training *this* model (its own gates: the G2 authors' MT recipe
    turns Gumbel gates on in a pretrained model), so that both continuations of one run have the
    same total epochs. The inherited epochs stay in the history (``"init": true``); ``best`` is
    chosen among this run's epochs only. With ``resume`` and a checkpoint in ``out_dir``, the
    run resumes and ``init_from`` is not used again.
    ``progress``: tqdm bars (default: only when stderr is a terminal).
    """
    if progress is None:
        progress = sys.stderr.isatty()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last, best = out / "last.safetensors", out / "best.safetensors"
    if data.sample:
        import warnings

        from .data.translation import SAMPLE_WARNING
        warnings.warn(SAMPLE_WARNING, stacklevel=2)
    extra = {"data": data.name, "sample": data.sample, "src_lang": data.src_lang, "tgt_lang": data.tgt_lang,
             "vocab": {"src": list(data.src_vocab.tokens), "tgt": list(data.tgt_vocab.tokens)},
             "bpe_codes": data.bpe_codes, **(record_extra or {})}
    result = MTTrainResult(checkpoint=str(last))
    opt, sched = make_optimizer(model, tcfg)
    metric = tcfg.metric
    start_epoch = 0
    initialize = init_from is not None and not (resume and last.exists())
    if init_from is not None and not initialize:
        log(f"{last} exists: resuming it (--init-from applies only to a new run)")
    if resume or initialize:
        src = Path(init_from) if initialize else last
        if not src.exists():
            raise FileNotFoundError(f"--init-from: no checkpoint at {src}" if initialize else
                                    f"--resume: no checkpoint at {last} (start without --resume)")
        state, rec = load_checkpoint(src)
        what = "continued with this model" if initialize else "resumed with this model and settings"
        try:
            model.load_state_dict(state)
            start_epoch = int(rec["epoch"]) + 1
            result.history = list(rec.get("history", []))
            opt_file = src.parent / rec["optimizer_state"]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{src} cannot be {what} (other model flags, data or a damaged checkpoint; "
                                  f"--init-from needs a run's last.safetensors): {str(exc).splitlines()[0]}") from None
        if rec.get("vocab") != extra["vocab"]:
            raise CheckpointError(f"{src} was trained with other vocabularies (data {rec.get('data')!r}); "
                                  f"{'continue' if initialize else 'resume'} it on the same data")
        _load_optimizer(opt_file, opt, sched, int(rec["epoch"]))
        if initialize:
            for h in result.history:
                h.setdefault("init", True)
            extra["init_from"] = {"path": str(src), "epochs": start_epoch, "kind": rec.get("kind"),
                                  "config": rec.get("config")}
            log(f"starting from {src} ({start_epoch} epoch(s) done there)")
        else:
            if rec.get("init_from"):
                extra["init_from"] = rec["init_from"]
            result.best = max([_score(metric, h) for h in result.history if not h.get("init")] or [-math.inf])
            log(f"resumed from {last}: {start_epoch} epoch(s) done")
        if start_epoch >= tcfg.epochs:
            log("nothing to do: all epochs are done")
            return result
    kept = _best_on_disk(best, metric)
    if kept > result.best:
        result.best = kept
        if not resume:
            log(f"{best} ({metric} {abs(kept):.2f}) is kept until this run beats it")

    train = data.train
    t_start = time.time()
    for epoch in range(start_epoch, tcfg.epochs):
        torch.manual_seed(tcfg.seed + epoch)
        rng = np.random.default_rng(tcfg.seed + epoch)
        batches = bucket_batches(train.src_lengths, train.tgt_lengths, tcfg.batch_size, rng=rng,
                                 bucket_width=tcfg.bucket_width)
        if tcfg.max_batches:
            batches = batches[:tcfg.max_batches]
        model.train()
        lr = opt.param_groups[0]["lr"]
        total_loss, total_tokens, t0 = 0.0, 0, time.time()
        bar, it, done = None, batches, 0
        if progress:
            from tqdm import tqdm
            it = bar = tqdm(batches, desc=f"epoch {epoch + 1}/{tcfg.epochs}", leave=False)
        for b, idx in enumerate(it):
            src_np = pad_batch([train.src[i] for i in idx])
            src = torch.as_tensor(src_np)
            lengths = train.src_lengths[idx] if tcfg.bucket_width > 1 else None
            tin, tout = (torch.as_tensor(a) for a in target_batch([train.tgt[i] for i in idx]))
            logits = model(src, tin, lengths)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tout.reshape(-1),
                                               ignore_index=PAD, label_smoothing=tcfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), tcfg.clip)
            opt.step()
            done += 1
            n = int((tout != PAD).sum())
            total_loss += loss.item() * n
            total_tokens += n
            if bar is not None and b % 20 == 0:
                bar.set_postfix(loss=f"{total_loss / total_tokens:.3f}", lr=f"{lr:.2g}")
            if tcfg.time_budget and time.time() - t_start > tcfg.time_budget:
                result.stopped_early = True
                break
        if bar is not None:
            bar.close()
        train_seconds = time.time() - t0
        vsplit = data.valid.subset(tcfg.valid_limit) if tcfg.valid_limit else data.valid
        v = valid_loss(model, vsplit, batch_size=tcfg.eval_batch_size)
        bleu = evaluate_bleu(model, vsplit, data.tgt_vocab, beam=tcfg.valid_beam, batch_size=tcfg.eval_batch_size)
        entry = {"epoch": epoch + 1, "lr": lr, "train_loss": total_loss / max(total_tokens, 1),
                 "valid_loss": v["loss"], "valid_ppl": v["ppl"], "valid_bleu": bleu["bleu"],
                 "valid_bleu_beam": tcfg.valid_beam, "valid_bleu_sentences": bleu["sentences"],
                 "bleu_signature": bleu["signature"], "batches": done,
                 "tokens": total_tokens, "train_seconds": train_seconds, "seconds": time.time() - t0}
        result.history.append(entry)
        log(f"epoch {epoch + 1:3d} | lr {lr:.2e} | train loss {entry['train_loss']:.3f} | valid ppl "
            f"{v['ppl']:7.2f} | valid BLEU {bleu['bleu']:5.2f} (beam {tcfg.valid_beam}) | {entry['seconds']:.0f}s")
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(_score(metric, entry))
        else:
            sched.step()
        rec = {"kind": kind, "train_config": asdict(tcfg), "epoch": epoch, "history": result.history, **extra}
        if "config" not in rec and hasattr(model, "config") and hasattr(model.config, "to_dict"):
            rec["config"] = model.config.to_dict()
        score = _score(metric, entry)
        if score > result.best:            # best first, then last (see g2quant.train)
            result.best = score
            save_checkpoint(best, model, {**rec, "best": {"metric": metric, "score": score, "epoch": epoch + 1}})
        opt_name = f"optim.e{epoch}.safetensors"
        _save_optimizer(out / opt_name, opt, sched, epoch)
        save_checkpoint(last, model, {**rec, "optimizer_state": opt_name})
        for old in out.glob("optim.e*.safetensors"):
            if old.name != opt_name:
                old.unlink(missing_ok=True)
        (out / "history.json").write_text(json.dumps(result.history, indent=1))
        if on_epoch is not None:
            on_epoch(entry)
        if result.stopped_early:
            log(f"time budget of {tcfg.time_budget:.0f}s reached; stopped after {epoch + 1} epoch(s)")
            break
    result.seconds = time.time() - t_start
    return result
