"""Nothing lost, nothing silently wrong, no traceback for a user mistake: each test is one fault
or one careless use (named by the test) and what g2quant must do about it."""
import json
import os
import stat

import numpy as np
import pytest
import torch

import g2quant
from g2quant.checkpoint import load_checkpoint, save_checkpoint
from g2quant.cli import main
from g2quant.targets import artifact
from g2quant.targets.artifact import load_artifact, write_artifact
from g2quant.targets.cpu.engine import Engine
from g2quant.targets.cpu.target import write_lm_artifact
from g2quant.targets.cpu.testing import random_lm_weights

TRAIN = ["train-lm", "--data", "synthetic", "--preset", "tiny", "--epochs", "1", "--max-batches", "8",
         "--batch-size", "8", "--bptt", "8", "--threads", "1", "-q"]
DEAD_PID = 2 ** 22 + 12345           # above the default pid_max: never a live process


def _cli(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    assert main(TRAIN + ["--out", str(out)]) == 0
    return out


# ---- data loss --------------------------------------------------------------------------------
def test_training_again_into_a_run_folder_without_resume_is_refused(run_dir, capsys):
    before = (run_dir / "best.safetensors").read_bytes()
    rc, out = _cli(TRAIN + ["--out", str(run_dir)], capsys)
    assert rc == 2 and "already holds a run" in out.err and "--resume" in out.err and "--force" in out.err
    assert (run_dir / "best.safetensors").read_bytes() == before


def test_force_never_replaces_a_better_best(run_dir, tmp_path, capsys):
    import shutil
    d = tmp_path / "copy"
    shutil.copytree(run_dir, d)
    _, rec = load_checkpoint(d / "best.safetensors")
    old = rec["history"][-1]["valid_ppl"]
    for lr in ("0.01", "50"):                                # new runs started over in the same folder
        rc, _ = _cli(TRAIN + ["--out", str(d), "--force", "--lr", lr, "--max-batches", "2"], capsys)
        assert rc == 0
        new = load_checkpoint(d / "last.safetensors")[1]["history"][-1]["valid_ppl"]
        _, rec2 = load_checkpoint(d / "best.safetensors")
        kept = rec2.get("best_valid_ppl", rec2["history"][-1]["valid_ppl"])
        assert kept == min(old, new)                          # best.safetensors holds the better model
        old = kept


def test_crash_between_writing_best_and_last_keeps_best_and_its_record(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    from g2quant import train
    real = train.save_checkpoint
    calls = []

    def crashing(path, model, record):
        calls.append(path.name)
        if path.name == "last.safetensors" and record["epoch"] == 1:
            raise KeyboardInterrupt                         # killed after best, before last
        return real(path, model, record)

    monkeypatch.setattr(train, "save_checkpoint", crashing)
    argv = TRAIN + ["--out", str(out), "--epochs", "2"]
    argv[argv.index("-q")] = "-v"
    rc, _ = _cli(argv, capsys)
    assert rc == 130
    monkeypatch.undo()
    _, best = load_checkpoint(out / "best.safetensors")
    _, last = load_checkpoint(out / "last.safetensors")
    assert best["epoch"] == 1 and last["epoch"] == 0         # best is ahead of last
    rc, _ = _cli(argv + ["--resume"], capsys)
    assert rc == 0
    _, best2 = load_checkpoint(out / "best.safetensors")
    assert best2["best_valid_ppl"] <= best["best_valid_ppl"]


def test_kill_between_the_two_renames_of_an_overwrite_is_recovered(tmp_path):
    p = write_artifact(tmp_path / "m.g2q", {"target": "x", "v": 1}, {"a": np.zeros(3, np.float32)})
    os.rename(p, tmp_path / f".m.g2q.old-{DEAD_PID}-abc")    # what a kill after the first rename leaves
    (tmp_path / f".m.g2q.tmp-{DEAD_PID}-def").mkdir()         # and the unfinished new one
    man, _, _ = load_artifact(p)                              # the load puts the old one back
    assert man["v"] == 1 and not [e for e in tmp_path.iterdir() if e.name.startswith(".")]


def test_leftovers_of_a_killed_export_are_removed_by_the_next_write(tmp_path):
    junk = tmp_path / f".m.g2q.tmp-{DEAD_PID}-xyz"
    junk.mkdir()
    (junk / "weights.safetensors").write_bytes(b"0" * 1000)
    live = tmp_path / f".m.g2q.tmp-{os.getpid()}-live"       # a writer that is still running: kept
    live.mkdir()
    write_artifact(tmp_path / "m.g2q", {"target": "x"}, {"a": np.zeros(3, np.float32)})
    assert not junk.exists() and live.exists()


def test_leftover_checkpoint_tmp_files_are_removed(tmp_path):
    m = torch.nn.Linear(2, 2)
    junk = tmp_path / f"last.safetensors.{DEAD_PID}.abcd.tmp"
    junk.write_bytes(b"x" * 100)
    save_checkpoint(tmp_path / "last.safetensors", m, {"kind": "test"})
    assert not junk.exists()


def test_artifacts_and_checkpoints_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = write_artifact(tmp_path / "m.g2q", {"target": "x"}, {"a": np.zeros(3, np.float32)})
        c = save_checkpoint(tmp_path / "c.safetensors", torch.nn.Linear(2, 2), {"kind": "test"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in p.iterdir())
    assert stat.S_IMODE(c.stat().st_mode) == 0o644


# ---- user mistakes: one line, non-zero exit -------------------------------------------------
@pytest.fixture(scope="module")
def q_ckpt(run_dir):
    return run_dir / "best.safetensors"


def test_export_to_a_path_under_a_file(q_ckpt, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    rc, out = _cli(["export", str(q_ckpt), "--data", "synthetic", "--out", str(tmp_path / "f" / "m.g2q"),
                    "--no-validate", "-q"], capsys)
    assert rc == 2 and out.err.startswith("g2quant: error:") and "Traceback" not in out.err


@pytest.mark.parametrize("make", ["file", "folder"])
def test_export_over_a_file_or_a_non_artifact_folder_is_refused(q_ckpt, tmp_path, capsys, make):
    target = tmp_path / "x.g2q"
    if make == "file":
        target.write_text("precious")
    else:
        target.mkdir()
        (target / "precious.txt").write_text("x")
    rc, out = _cli(["export", str(q_ckpt), "--data", "synthetic", "--out", str(target), "--no-validate", "-q"],
                   capsys)
    assert rc == 2 and "refusing to replace it" in out.err
    assert target.exists()


def test_export_when_the_disk_is_full(q_ckpt, tmp_path, capsys, monkeypatch):
    import errno

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(artifact, "_write_file", full)
    rc, out = _cli(["export", str(q_ckpt), "--data", "synthetic", "--out", str(tmp_path / "m.g2q"),
                    "--no-validate", "-q"], capsys)
    assert rc == 2 and "No space left on device" in out.err
    assert not list(tmp_path.iterdir())                      # nothing half-written


def test_resume_with_another_preset(run_dir, tmp_path, capsys):
    import shutil
    d = tmp_path / "r"
    shutil.copytree(run_dir, d)
    argv = TRAIN + ["--out", str(d), "--resume"]
    argv[argv.index("tiny")] = "small"
    rc, out = _cli(argv, capsys)
    assert rc == 2 and "cannot be resumed with this model" in out.err


@pytest.mark.parametrize("damage", ["truncated", "bad-json", "no-kind"])
def test_damaged_checkpoint(q_ckpt, tmp_path, capsys, damage):
    from safetensors import safe_open
    from safetensors.torch import save_file
    p = tmp_path / "c.safetensors"
    if damage == "truncated":
        p.write_bytes(q_ckpt.read_bytes()[:1000])
    else:
        with safe_open(str(q_ckpt), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            meta = dict(f.metadata())
        meta["g2quant_checkpoint"] = "{not json" if damage == "bad-json" else json.dumps({"config": {}})
        save_file(state, str(p), metadata=meta)
    rc, out = _cli(["eval", str(p), "--data", "synthetic", "-q"], capsys)
    assert rc == 2 and out.err.startswith("g2quant: error:") and "Traceback" not in out.err


@pytest.mark.parametrize("argv,message", [
    (TRAIN + ["--out", "x", "--noise-p", "5"], "probability in [0, 1]"),
    (TRAIN + ["--out", "{tmp}/big", "--batch-size", "100000000"], "too large"),
    (["eval", "{ckpt}", "--data", "ptb"], "trained on 'synthetic'"),
    (["eval", "{ckpt}", "--limit", "-5"], "--limit must be at least 2"),
    (["finetune", "{ckpt}", "--bits", "9", "--out", "x"], "bits=9 is invalid"),
])
def test_bad_options(argv, message, q_ckpt, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(q_ckpt)) for a in argv]
    rc, out = _cli(argv, capsys)
    assert rc == 2 and message in out.err and "Traceback" not in out.err


def test_sixteen_bit_export_agrees_with_torch(q_ckpt, tmp_path, capsys):
    """A float layer means the same on both sides: int8 activations, float weights."""
    rc, out = _cli(["export", str(q_ckpt), "--data", "synthetic", "--bits", "16", "--out", str(tmp_path / "m.g2q"),
                    "--no-validate", "-q"], capsys)
    assert rc == 0, out.err
    val = json.loads((tmp_path / "m.g2q" / "manifest.json").read_text())["validation"]
    assert val["max_rel_diff_vs_torch"] < 2e-3


# ---- loose inputs -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    w = random_lm_weights(30, 8, 1, 4, seed=0)
    return Engine(w.to_graph(), ["<unk>", "<eos>"] + [f"w{i}" for i in range(28)])


@pytest.mark.parametrize("call,message", [
    (lambda e: e.step([1.9]), "token ids must be integers"),
    (lambda e: e.step(["a"]), "token ids must be integers"),
    (lambda e: e.step([]), r"expects token ids of shape \[B\]"),
    (lambda e: e.step([30]), "out of range"),
    (lambda e: e.decode([-1]), "out of range"),
    (lambda e: e.generate([1], 3, temperature=float("nan")), "temperature must be a finite number"),
    (lambda e: e.generate([1], 3, top_k=-3), "top_k must be a positive integer"),
    (lambda e: e.generate([1], -1), "n must be a non-negative integer"),
    (lambda e: e.perplexity(np.arange(40) % 30, batch_size=0), "batch_size must be a positive integer"),
    (lambda e: e.run(np.zeros((3, 2))), "token ids must be integers"),
    (lambda e: e.run(np.zeros((3,), np.int64)), r"expects token ids of shape \[T, B\]"),
])
def test_loose_engine_inputs(engine, call, message):
    with pytest.raises(ValueError, match=message):
        call(engine)


def test_many_batch_sizes_do_not_grow_memory(engine):
    for b in range(1, 120):
        engine.step(np.zeros(b, np.int64))
    assert len(engine._shapes) <= 64                         # a bounded cache, no scratch per batch size


def test_quantize_rejects_nan_weights():
    m = torch.nn.LSTM(4, 8)
    with torch.no_grad():
        m.weight_hh_l0[0, 0] = float("nan")
    with pytest.raises(ValueError, match="contains NaN or infinite values"):
        g2quant.quantize(m, bits=4)
