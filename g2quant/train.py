"""Training loops: word-level LM with truncated BPTT, checkpoints every epoch, resume.

The loss is the per-token mean cross-entropy, so the classic Zaremba et al. settings (lr 1,
clip 5 on a loss summed over 20 steps) become lr ≈ 20, clip ≈ 0.25 here.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .evaluate import batchify, detach_hidden, lm_perplexity


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 13
    lr: float = 20.0
    lr_decay: float = 0.5          # multiply lr by this every epoch after `decay_after`
    decay_after: int = 4           # epochs at full lr (Zaremba small: 4)
    batch_size: int = 20
    bptt: int = 20
    clip: float = 0.25
    eval_batch_size: int = 10
    eval_bptt: int = 35
    seed: int = 0
    time_budget: float | None = None   # seconds; stop early (for demos), checkpoint what was done
    max_batches: int | None = None     # per epoch; for tests and demos
    optimizer: str = "sgd"             # "sgd" | "adam" (torch.optim; the lr follows lr_at(epoch))
    momentum: float = 0.0              # SGD momentum
    distill_weight: float = 0.0        # QAT: weight of the KL to a teacher's softened logits
    distill_temperature: float = 2.0

    def __post_init__(self):
        checks = {"epochs": self.epochs >= 1, "lr": self.lr > 0, "lr_decay": 0 < self.lr_decay <= 1,
                  "decay_after": self.decay_after >= 0, "batch_size": self.batch_size >= 1,
                  "bptt": self.bptt >= 1, "clip": self.clip > 0, "eval_batch_size": self.eval_batch_size >= 1,
                  "eval_bptt": self.eval_bptt >= 1, "optimizer": self.optimizer in ("sgd", "adam"),
                  "momentum": 0 <= self.momentum < 1, "distill_weight": 0 <= self.distill_weight <= 1,
                  "distill_temperature": self.distill_temperature > 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"TrainConfig.{name} has an invalid value: {getattr(self, name)!r}")

    def lr_at(self, epoch: int) -> float:
        """Learning rate for 0-based ``epoch``."""
        return self.lr * self.lr_decay ** max(0, epoch + 1 - self.decay_after)


@dataclass
class TrainResult:
    history: list = field(default_factory=list)   # one dict per epoch
    best_valid_ppl: float = math.inf
    checkpoint: str = ""
    stopped_early: bool = False


def _record(kind: str, model, tcfg: TrainConfig, epoch: int, history: list, extra: dict) -> dict:
    rec = {"kind": kind, "train_config": asdict(tcfg), "epoch": epoch, "history": history, **extra}
    if "config" not in rec and hasattr(model, "config") and hasattr(model.config, "to_dict"):
        rec["config"] = model.config.to_dict()
    return rec


def _best_on_disk(best: Path) -> float:
    """The validation perplexity best.safetensors was saved with (inf when absent or unreadable)."""
    if not best.exists():
        return math.inf
    try:
        _, rec = load_checkpoint(best)
        if "best_valid_ppl" in rec:
            return float(rec["best_valid_ppl"])
        return float(rec["history"][int(rec["epoch"])]["valid_ppl"])
    except (CheckpointError, KeyError, TypeError, ValueError, IndexError):
        return math.inf


def distributed() -> tuple[int, int]:
    """``(rank, world_size)``; under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is started
    (gloo on CPU, nccl with CUDA) on first use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shard(tokens, rank: int, world: int):
    """Rank ``rank``'s contiguous part of a token stream (equal parts; the tail is dropped)."""
    n = len(tokens) // world
    return tokens[rank * n:(rank + 1) * n]


def _all_average_grads(model: nn.Module, world: int) -> None:
    import torch.distributed as dist
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    k = 0
    for g in grads:
        g.copy_(flat[k:k + g.numel()].view_as(g))
        k += g.numel()


def _broadcast_float(value: float, world: int) -> float:
    if world <= 1:
        return value
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, 0)
    return float(t)


def _optimizer(model: nn.Module, tcfg: TrainConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if tcfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=tcfg.lr)
    return torch.optim.SGD(params, lr=tcfg.lr, momentum=tcfg.momentum)


def _distill_loss(logits, teacher_logits, T: float):
    """``T² · KL(softmax(teacher / T) ‖ softmax(student / T))`` per token (Hinton et al. 2015)."""
    s = nn.functional.log_softmax(logits.reshape(-1, logits.size(-1)) / T, dim=-1)
    t = nn.functional.log_softmax(teacher_logits.reshape(-1, logits.size(-1)) / T, dim=-1)
    return nn.functional.kl_div(s, t, log_target=True, reduction="batchmean") * T * T


def train_lm(model: nn.Module, train_data, valid_data, tcfg: TrainConfig, out_dir: str | os.PathLike, *,
             resume: bool = False, progress: bool = True, kind: str = "word_lm",
             record_extra: dict | None = None, log=print, teacher: nn.Module | None = None,
             init_from: str | os.PathLike | None = None) -> TrainResult:
    """Train ``model`` (``forward(tokens [T,B], hidden) -> (logits, hidden)``) on a token stream.

    Writes ``out_dir/last.safetensors`` after every epoch and ``out_dir/best.safetensors`` when
    validation perplexity improves (both atomic), plus ``out_dir/history.json``. With
    ``resume=True`` the model, epoch counter and history are restored from ``last.safetensors``
    and training continues with the next epoch (each epoch reseeds from ``seed + epoch``, so
    a resumed run equals an uninterrupted one; an optimizer with state — Adam, momentum — is saved
    beside the checkpoint and restored). ``teacher`` (with ``tcfg.distill_weight`` > 0): the loss is
    ``(1 − w)·CE + w·T²·KL`` to the teacher's logits at temperature T (distillation for QAT).

    Under ``torchrun --nproc_per_node N`` each of the N ranks trains on a contiguous shard of
    ``train_data`` (batch ``batch_size`` per rank, state carried per rank); gradients are averaged
    across ranks before clipping and the update, so a step equals one single-process step on the
    N ranks' batches side by side. Rank 0 evaluates, writes the checkpoints and the history (which
    record ``world_size``); the others wait for it.

    ``init_from`` (a ``last.safetensors`` of another run on the same corpus, e.g. a float baseline
    after 4 epochs): when ``out_dir`` holds no run yet, start from that run's weights and epoch
    count and go on training *this* model on the same schedule (its own gates: the G2 authors'
    recipe turns Gumbel gates on in a pretrained model), so both continuations have the same
    total epochs. The inherited epochs stay in the history (``"init": true``); ``best`` is chosen
    among this run's epochs only. With ``resume`` and a checkpoint in ``out_dir`` the run resumes
    and ``init_from`` is not used again. A stateful optimizer (Adam, momentum) starts afresh.
    """
    rank, world = distributed()
    if world > 1 and tcfg.time_budget:
        raise ValueError("a time budget stops ranks at different batches; it is for single-process runs only")
    if world > 1:
        extra_log = log
        log = (lambda s: extra_log(f"[rank 0/{world}] {s}")) if rank == 0 else (lambda s: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last, best = out / "last.safetensors", out / "best.safetensors"
    extra = {**dict(record_extra or {}), "world_size": world}
    result = TrainResult(checkpoint=str(last))
    start_epoch = 0
    initialize = init_from is not None and not (resume and last.exists())
    if init_from is not None and not initialize:
        log(f"{last} exists: resuming it (--init-from applies only to a new run)")
    if initialize:
        src = Path(init_from)
        if not src.is_file():
            raise FileNotFoundError(f"--init-from: no checkpoint at {src}")
        state, rec = load_checkpoint(src)
        try:
            model.load_state_dict(state)
            start_epoch = int(rec["epoch"]) + 1
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{src} cannot start this model (another preset, vocabulary or a damaged "
                                  f"checkpoint; --init-from needs a run's last.safetensors): "
                                  f"{str(exc).splitlines()[0]}") from None
        if rec.get("data") != extra.get("data", rec.get("data")):
            raise CheckpointError(f"{src} was trained on {rec.get('data')!r}, this run is on {extra.get('data')!r}")
        result.history = [{**h, "init": True} for h in rec.get("history", [])]
        extra["init_from"] = {"path": str(src), "epochs": start_epoch, "kind": rec.get("kind"),
                              "config": rec.get("config")}
        log(f"starting from {src} ({start_epoch} epoch(s) done there)")
        if start_epoch >= tcfg.epochs:
            raise CheckpointError(f"--init-from {src} has done {start_epoch} epoch(s), as many as --epochs "
                             f"{tcfg.epochs}: nothing would be trained")
        resume = False
    if resume:
        if not last.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {last} (start without --resume)")
        state, rec = load_checkpoint(last)
        resume_rec = rec
        try:
            model.load_state_dict(state)
            start_epoch = int(rec["epoch"]) + 1
            result.history = list(rec.get("history", []))
            result.best_valid_ppl = min([float(h["valid_ppl"]) for h in result.history if not h.get("init")]
                                        or [math.inf])
            if rec.get("init_from"):
                extra["init_from"] = rec["init_from"]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{last} cannot be resumed with this model and settings (another preset, "
                                  f"data or a damaged checkpoint): {str(exc).splitlines()[0]}") from None
        log(f"resumed from {last}: {start_epoch} epoch(s) done")
        if start_epoch >= tcfg.epochs:
            log("nothing to do: all epochs are done")
            return result
    kept = _best_on_disk(best)
    if kept < result.best_valid_ppl:
        # best.safetensors is better than anything this run has seen (a crash between the two
        # writes, or a new run in the same folder): it is only replaced when beaten
        result.best_valid_ppl = kept
        if not resume:
            log(f"{best} (valid ppl {kept:.2f}) is kept until this run beats it")

    opt = _optimizer(model, tcfg)
    stateful = tcfg.optimizer == "adam" or tcfg.momentum > 0
    if resume and stateful:
        from .train_mt import _load_optimizer
        name = resume_rec.get("optimizer_state")
        if not name:
            raise CheckpointError(f"{last} has no saved optimizer state to resume {tcfg.optimizer} exactly")
        _load_optimizer(out / name, opt, None, int(resume_rec["epoch"]))
    if teacher is not None:
        teacher.eval()
    streams = batchify(shard(train_data, rank, world), tcfg.batch_size)
    n_batches = (streams.size(0) - 1 + tcfg.bptt - 1) // tcfg.bptt
    if tcfg.max_batches:
        n_batches = min(n_batches, tcfg.max_batches)
    t_start = time.time()
    for epoch in range(start_epoch, tcfg.epochs):
        torch.manual_seed(tcfg.seed + epoch)
        lr = tcfg.lr_at(epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        hidden = t_hidden = None
        total_loss, total_tokens = 0.0, 0
        t0 = time.time()
        batches = range(n_batches)
        bar = None
        if progress and rank == 0:
            from tqdm import tqdm
            batches = bar = tqdm(batches, desc=f"epoch {epoch + 1}/{tcfg.epochs}", leave=False)
        for b in batches:
            i = b * tcfg.bptt
            seq = min(tcfg.bptt, streams.size(0) - 1 - i)
            x, y = streams[i:i + seq], streams[i + 1:i + 1 + seq]
            hidden = detach_hidden(hidden)
            logits, hidden = model(x, hidden)
            loss = ce = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
            if teacher is not None and tcfg.distill_weight > 0:
                with torch.no_grad():
                    t_logits, t_hidden = teacher(x, t_hidden)
                w = tcfg.distill_weight
                loss = (1 - w) * ce + w * _distill_loss(logits, t_logits, tcfg.distill_temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                _all_average_grads(model, world)
            nn.utils.clip_grad_norm_(model.parameters(), tcfg.clip)
            opt.step()
            loss = ce
            total_loss += loss.item() * y.numel()
            total_tokens += y.numel()
            if bar is not None and b % 50 == 0:
                bar.set_postfix(ppl=f"{math.exp(total_loss / total_tokens):.1f}", lr=f"{lr:g}")
            if tcfg.time_budget and time.time() - t_start > tcfg.time_budget:
                result.stopped_early = True
                break
        if bar is not None:
            bar.close()
        train_ppl = math.exp(total_loss / max(total_tokens, 1))
        vppl = lm_perplexity(model, valid_data, batch_size=tcfg.eval_batch_size,
                             bptt=tcfg.eval_bptt)["ppl"] if rank == 0 else 0.0
        valid = {"ppl": _broadcast_float(vppl, world)}
        entry = {"epoch": epoch + 1, "lr": lr, "train_ppl": train_ppl, "valid_ppl": valid["ppl"],
                 "seconds": time.time() - t0, "tokens": total_tokens * world, "world_size": world}
        result.history.append(entry)
        log(f"epoch {epoch + 1:3d} | lr {lr:7.4f} | train ppl {train_ppl:8.2f} | valid ppl {valid['ppl']:8.2f} "
            f"| {entry['seconds']:.0f}s")
        # best first, then last: whatever a crash interrupts, best.safetensors holds the best model that
        # any history records (resume reads its perplexity from the file itself)
        rec = _record(kind, model, tcfg, epoch, result.history, extra)
        if stateful and rank == 0:
            from .train_mt import _save_optimizer
            rec["optimizer_state"] = f"optim.e{epoch}.safetensors"
            _save_optimizer(out / rec["optimizer_state"], opt, None, epoch)
        if valid["ppl"] < result.best_valid_ppl:
            result.best_valid_ppl = valid["ppl"]
            if rank == 0:
                save_checkpoint(best, model, {**rec, "best_valid_ppl": valid["ppl"]})
        if rank == 0:
            save_checkpoint(last, model, rec)
            (out / "history.json").write_text(json.dumps(result.history, indent=1))
            for old in out.glob("optim.e*.safetensors"):          # the state of the last epoch is enough
                if old.name != rec.get("optimizer_state"):
                    old.unlink(missing_ok=True)
        if world > 1:
            import torch.distributed as dist
            dist.barrier()
        if result.stopped_early:
            log(f"time budget of {tcfg.time_budget:.0f}s reached; stopped after {epoch + 1} epoch(s)")
            break
    return result
