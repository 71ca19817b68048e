"""Training loop, checkpoints, resume, evaluation and the CLI on a tiny generated corpus."""
import json

import pytest
import torch

from g2quant.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from g2quant.cli import main
from g2quant.data.synthetic import synthetic_corpus
from g2quant.defaults import RECOMMENDED_DROPOUT, RECOMMENDED_NOISE_P
from g2quant.evaluate import lm_perplexity
from g2quant.models import LMConfig, WordLM
from g2quant.train import TrainConfig, train_lm


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus(n_train=3000, n_valid=200, n_test=200)


def _model(corpus, **kw):
    torch.manual_seed(0)
    return WordLM(LMConfig(vocab_size=len(corpus.vocab), emb_size=24, hidden_size=24, **{"gates": "gumbel", **kw}))


TCFG = TrainConfig(epochs=2, lr=10.0, batch_size=10, bptt=10, max_batches=60, decay_after=10)


def test_training_lowers_perplexity(corpus, tmp_path):
    m = _model(corpus)
    before = lm_perplexity(m, corpus.valid)["ppl"]
    r = train_lm(m, corpus.train, corpus.valid, TCFG, tmp_path, progress=False, log=lambda s: None)
    after = lm_perplexity(m, corpus.valid)["ppl"]
    assert after < 0.75 * before, (before, after)   # untrained: ~vocab size (59)
    assert [h["epoch"] for h in r.history] == [1, 2]
    assert (tmp_path / "last.safetensors").exists() and (tmp_path / "best.safetensors").exists()
    assert json.loads((tmp_path / "history.json").read_text())[-1]["valid_ppl"] == pytest.approx(after, rel=1e-4)


def test_checkpoint_round_trip_including_tied(corpus, tmp_path):
    for tied in (False, True):
        m = _model(corpus, tied=tied)
        path = save_checkpoint(tmp_path / f"m{tied}.safetensors", m, {"kind": "word_lm", "config": m.config.to_dict(),
                                                                       "epoch": 0, "history": []})
        m2, rec = load_model(path)
        assert rec["config"]["tied"] is tied
        for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
            torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)
        if tied:
            assert m2.decoder.weight.data_ptr() == m2.embedding.weight.data_ptr()
        x = torch.randint(0, len(corpus.vocab), (5, 2))
        m.eval()
        torch.testing.assert_close(m(x)[0], m2(x)[0])
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("opt", [{}, {"momentum": 0.9, "lr": 2.0}, {"optimizer": "adam", "lr": 0.01}],
                         ids=["sgd", "momentum", "adam"])
def test_resume_continues_where_it_stopped(corpus, tmp_path, opt):
    cfg = TrainConfig(**{**TCFG.__dict__, **opt})
    full = _model(corpus)
    train_lm(full, corpus.train, corpus.valid, cfg, tmp_path / "full", progress=False, log=lambda s: None)
    part = _model(corpus)
    one = TrainConfig(**{**cfg.__dict__, "epochs": 1})
    train_lm(part, corpus.train, corpus.valid, one, tmp_path / "part", progress=False, log=lambda s: None)
    fresh = _model(corpus)   # as if the process was killed and restarted
    r = train_lm(fresh, corpus.train, corpus.valid, cfg, tmp_path / "part", resume=True, progress=False,
                 log=lambda s: None)
    assert [h["epoch"] for h in r.history] == [1, 2]
    for (k, a), (_, b) in zip(full.state_dict().items(), fresh.state_dict().items()):
        torch.testing.assert_close(b, a, msg=k, atol=0, rtol=0)     # exact: the optimizer state came back
    saved = sorted(p.name for p in (tmp_path / "part").glob("optim.e*.safetensors"))
    assert saved == ([] if not opt else ["optim.e1.safetensors"])   # only the last epoch's state is kept


def test_init_from_continues_another_runs_schedule(corpus, tmp_path):
    """A run started from another run's epoch-1 checkpoint equals the uninterrupted run exactly (same
    gates), inherits its epochs in the history, picks its best among its own epochs only, and resumes."""
    sig = dict(gates="sigmoid")
    full = _model(corpus, **sig)
    train_lm(full, corpus.train, corpus.valid, TCFG, tmp_path / "full", progress=False, log=lambda s: None)
    one = TrainConfig(**{**TCFG.__dict__, "epochs": 1})
    train_lm(_model(corpus, **sig), corpus.train, corpus.valid, one, tmp_path / "base", progress=False,
             log=lambda s: None)
    cont = _model(corpus, **sig)
    r = train_lm(cont, corpus.train, corpus.valid, TCFG, tmp_path / "cont", progress=False, log=lambda s: None,
                 init_from=tmp_path / "base" / "last.safetensors")
    for (k, a), (_, b) in zip(full.state_dict().items(), cont.state_dict().items()):
        torch.testing.assert_close(b, a, msg=k, atol=0, rtol=0)
    assert [(h["epoch"], h.get("init", False)) for h in r.history] == [(1, True), (2, False)]
    assert r.best_valid_ppl == r.history[1]["valid_ppl"]      # not the inherited epoch's, even if lower
    rec = load_checkpoint(tmp_path / "cont" / "last.safetensors")[1]
    assert rec["init_from"]["epochs"] == 1 and rec["init_from"]["config"]["gates"] == "sigmoid"

    # G2 gates on the baseline's weights; a resume of that run keeps the record and ignores init_from
    g2 = _model(corpus)
    two = TrainConfig(**{**TCFG.__dict__, "epochs": 2})
    train_lm(g2, corpus.train, corpus.valid, two, tmp_path / "g2", progress=False, log=lambda s: None,
             init_from=tmp_path / "base" / "last.safetensors")
    logs = []
    r = train_lm(_model(corpus), corpus.train, corpus.valid, TrainConfig(**{**TCFG.__dict__, "epochs": 3}),
                 tmp_path / "g2", resume=True, progress=False, log=logs.append,
                 init_from=tmp_path / "base" / "last.safetensors")
    assert any("resuming it" in s for s in logs) and [h["epoch"] for h in r.history] == [1, 2, 3]
    assert load_checkpoint(tmp_path / "g2" / "last.safetensors")[1]["init_from"]["epochs"] == 1
    assert load_checkpoint(tmp_path / "g2" / "last.safetensors")[1]["config"]["gates"] == "gumbel"


def test_init_from_refuses_bad_starts(corpus, tmp_path):
    one = TrainConfig(**{**TCFG.__dict__, "epochs": 1})
    train_lm(_model(corpus), corpus.train, corpus.valid, one, tmp_path / "base", progress=False, log=lambda s: None)
    src = tmp_path / "base" / "last.safetensors"
    with pytest.raises(CheckpointError, match="has done 1 epoch.*nothing would be trained"):
        train_lm(_model(corpus), corpus.train, corpus.valid, one, tmp_path / "a", progress=False,
                 log=lambda s: None, init_from=src)
    torch.manual_seed(0)
    wider = WordLM(LMConfig(vocab_size=len(corpus.vocab), emb_size=32, hidden_size=32, gates="gumbel"))
    with pytest.raises(CheckpointError, match="cannot start this model"):
        train_lm(wider, corpus.train, corpus.valid, TCFG, tmp_path / "b", progress=False, log=lambda s: None,
                 init_from=src)
    with pytest.raises(FileNotFoundError, match="--init-from: no checkpoint"):
        train_lm(_model(corpus), corpus.train, corpus.valid, TCFG, tmp_path / "c", progress=False,
                 log=lambda s: None, init_from=tmp_path / "nope.safetensors")
    assert not (tmp_path / "b" / "last.safetensors").exists()


def test_resume_without_optimizer_state_refuses(corpus, tmp_path):
    cfg = TrainConfig(**{**TCFG.__dict__, "epochs": 1, "optimizer": "adam", "lr": 0.01})
    train_lm(_model(corpus), corpus.train, corpus.valid, cfg, tmp_path, progress=False, log=lambda s: None)
    (tmp_path / "optim.e0.safetensors").unlink()
    with pytest.raises(CheckpointError, match="optimizer state .* is missing"):
        train_lm(_model(corpus), corpus.train, corpus.valid, TrainConfig(**{**cfg.__dict__, "epochs": 2}), tmp_path,
                 resume=True, progress=False, log=lambda s: None)


def test_distillation_pulls_the_student_to_the_teacher(corpus, tmp_path):
    from g2quant.train import _distill_loss
    x = torch.randn(4, 3, 7)
    assert _distill_loss(x, x.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert _distill_loss(x, torch.randn(4, 3, 7), 2.0).item() > 0.01
    torch.manual_seed(7)   # a teacher whose (random, peaked) predictions the data alone would not teach
    teacher = WordLM(LMConfig(vocab_size=len(corpus.vocab), emb_size=24, hidden_size=24, gates="gumbel"))
    with torch.no_grad():
        teacher.decoder.weight.mul_(8.0)
    teacher.eval()

    def kl_to_teacher(m):
        m.eval()
        with torch.no_grad():
            xb = torch.as_tensor(corpus.valid[:200]).view(20, 10)
            return _distill_loss(m(xb)[0], teacher(xb)[0], 1.0).item()

    runs = {}
    for w in (0.0, 1.0):
        torch.manual_seed(1)
        student = WordLM(LMConfig(vocab_size=len(corpus.vocab), emb_size=24, hidden_size=24, gates="gumbel"))
        cfg = TrainConfig(**{**TCFG.__dict__, "distill_weight": w, "epochs": 1})
        train_lm(student, corpus.train, corpus.valid, cfg, tmp_path / f"s{w}", progress=False, log=lambda s: None,
                 teacher=teacher)
        runs[w] = kl_to_teacher(student)
    assert runs[1.0] < 0.5 * runs[0.0], runs


def test_damaged_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(bad)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a g2quant checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors")


def test_train_config_validation():
    with pytest.raises(ValueError, match="TrainConfig.lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="tied weights need"):
        LMConfig(emb_size=10, hidden_size=12, tied=True)
    assert TrainConfig(lr=20, decay_after=4, lr_decay=0.5).lr_at(5) == 20 * 0.25


def test_cli_train_eval_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train-lm", "--data", "synthetic", "--preset", "tiny", "--epochs", "1", "--max-batches", "20",
            "--batch-size", "8", "--bptt", "8", "--out", str(out), "--quiet", "--threads", "1", "--gates", "sigmoid"]
    assert main(args) == 0
    assert main(["eval-lm", str(out), "--data", "synthetic", "--split", "valid", "--quiet", "--hard-gates", "if"]) == 0
    text = capsys.readouterr().out
    assert "perplexity" in text and "batch size 10, bptt 35" in text and "hard gates: if" in text
    args[args.index("--epochs") + 1] = "2"
    assert main([a for a in args if a != "--quiet"] + ["--resume"]) == 0
    assert "resumed from" in capsys.readouterr().err
    # G2 gates started from that sigmoid run's 2 epochs, on to a 3rd
    g2 = [a if a != str(out) else str(tmp_path / "g2") for a in args]
    g2[g2.index("--epochs") + 1] = "3"
    assert main(g2 + ["--gates", "gumbel", "--init-from", str(out / "last.safetensors")]) == 0
    hist = json.loads((tmp_path / "g2" / "history.json").read_text())
    assert [h.get("init", False) for h in hist] == [True, True, False]
    # no --noise-p: the measured default (docs/results.md §9), not the paper's p = 1
    assert load_model(tmp_path / "g2" / "last.safetensors")[1]["config"]["noise_p"] == RECOMMENDED_NOISE_P == 0.2


def test_cli_train_lm_small_defaults_to_measured_dropout(tmp_path):
    """The "small" preset is Zaremba's, without dropout; train-lm adds the 0.25 measured best, unless told."""
    base = ["train-lm", "--data", "synthetic", "--preset", "small", "--epochs", "1", "--max-batches", "1",
            "--batch-size", "4", "--bptt", "4", "--quiet", "--threads", "1"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--dropout", "0"]) == 0
    assert load_model(tmp_path / "a" / "last.safetensors")[1]["config"]["dropout"] == RECOMMENDED_DROPOUT["small"] == 0.25
    assert load_model(tmp_path / "b" / "last.safetensors")[1]["config"]["dropout"] == 0.0


@pytest.mark.parametrize("argv,code,message", [
    (["train-lm", "--epochs", "0", "--out", "x"], 2, "expected a positive integer"),
    (["train-lm", "--gates", "binary", "--out", "x"], 2, "invalid choice"),
    (["train-lm", "--data", "synthetic", "--preset", "tiny", "--out", "{tmp}/r", "--resume"], 2, "no checkpoint"),
    (["train-lm", "--data", "synthetic", "--preset", "tiny", "--out", "{tmp}/r", "--init-from", "{tmp}/no.safetensors"],
     2, "--init-from: no checkpoint"),
    (["eval-lm", "{tmp}/missing", "--data", "synthetic"], 2, "does not exist"),
    (["eval-lm", "x", "--hard-gates", "ix"], 2, "--hard-gates: may contain only"),
    (["train-lm", "--data", "ptb", "--data-dir", "{tmp}/nodata", "--out", "x"], 2, "does not exist"),
    (["no-such-command"], 2, "invalid choice"),
])
def test_cli_errors(argv, code, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as exc:   # argparse errors
        rc = exc.code
    assert rc == code
    assert message in capsys.readouterr().err
