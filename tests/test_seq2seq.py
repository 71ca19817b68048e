"""Seq2seq model, decoding, BLEU, training/resume and the translation commands, on a tiny
made-up parallel corpus (a word-for-word 'language' with a noun-adjective swap)."""
import argparse
import json
import math

import numpy as np
import pytest
import sacrebleu
import torch

import g2quant
from g2quant.checkpoint import load_model
from g2quant.data.translation import EOS, BPE, build_data, learn_joint_bpe, remove_bpe
from g2quant.evaluate_mt import corpus_bleu, evaluate_bleu, translate_ids, valid_loss
from g2quant.models.seq2seq import Memory, Seq2Seq, Seq2SeqConfig, beam_search, greedy_decode
from g2quant.train_mt import MTTrainConfig, train_mt

_NOUNS = {"hund": "dog", "katze": "cat", "mann": "man", "frau": "woman", "kind": "child", "haus": "house"}
_ADJS = {"rot": "red", "klein": "small", "alt": "old", "neu": "new"}
_VERBS = {"sieht": "sees", "mag": "likes", "findet": "finds"}
_ART = {"der": "the", "ein": "a"}


def _phrase(rng):
    art, noun = rng.choice(list(_ART)), rng.choice(list(_NOUNS))
    if rng.random() < 0.5:
        adj = rng.choice(list(_ADJS))                 # de: art noun adj  ->  en: art adj noun
        return [art, noun, adj], [_ART[art], _ADJS[adj], _NOUNS[noun]]
    return [art, noun], [_ART[art], _NOUNS[noun]]


def toy_pairs(n, seed):
    rng = np.random.default_rng(seed)
    src, tgt = [], []
    for _ in range(n):
        s1, t1 = _phrase(rng)
        if rng.random() < 0.6:
            v = rng.choice(list(_VERBS))
            s2, t2 = _phrase(rng)
            s1, t1 = s1 + [v] + s2, t1 + [_VERBS[v]] + t2
        src.append(" ".join(s1 + ["."]))
        tgt.append(" ".join(t1 + ["."]))
    return src, tgt


@pytest.fixture(scope="module")
def toy():
    train = toy_pairs(1200, 0)
    codes = learn_joint_bpe(*train, 40)                 # few merges: some words stay split into pieces
    bpe = BPE(codes)
    splits = {"train": train, "valid": toy_pairs(60, 1), "test": toy_pairs(60, 2)}
    return build_data("toy", {k: (bpe.apply(s), bpe.apply(t)) for k, (s, t) in splits.items()}, codes)


def _model(data, **kw):
    torch.manual_seed(0)
    cfg = {**dict(emb_size=24, hidden_size=32, num_layers=1, dropout=0.0, init_range=0.3), **kw}   # 0.1: attention
    # starts too flat for a model this small to learn it in a few hundred updates
    return Seq2Seq(Seq2SeqConfig(len(data.src_vocab), len(data.tgt_vocab), **cfg))


TCFG = MTTrainConfig(epochs=2, batch_size=16, lr=1e-2, label_smoothing=0.0, max_batches=40, eval_batch_size=64)
QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    m = _model(toy)
    before = valid_loss(m, toy.valid)["loss"]
    out = tmp_path_factory.mktemp("run")
    r = train_mt(m, toy, MTTrainConfig(**{**TCFG.__dict__, "epochs": 3, "max_batches": 70}), out, **QUIET)
    return m, before, r, out


def test_config_is_validated():
    with pytest.raises(ValueError, match="hidden_size"):
        Seq2SeqConfig(10, 10, hidden_size=0)
    with pytest.raises(ValueError, match="even hidden_size"):
        Seq2SeqConfig(10, 10, hidden_size=33, bidirectional=True)
    with pytest.raises(ValueError, match="tied"):
        Seq2SeqConfig(10, 10, emb_size=8, hidden_size=16, tied=True)
    with pytest.raises(ValueError, match="gates"):
        Seq2SeqConfig(10, 10, gates="hard")
    with pytest.raises(ValueError, match="special ids"):
        Seq2SeqConfig(2, 10)
    with pytest.raises(ValueError, match="unknown Seq2SeqConfig fields"):
        Seq2SeqConfig.from_dict({"src_vocab_size": 10, "tgt_vocab_size": 10, "heads": 4})
    with pytest.raises(ValueError, match="select"):
        MTTrainConfig(select="accuracy")


def test_training_lowers_the_loss_and_translates(trained, toy):
    m, before, r, out = trained
    after = valid_loss(m, toy.valid)["loss"]
    assert after < 0.35 * before, (before, after)       # untrained: ~log(V)
    assert [h["epoch"] for h in r.history] == [1, 2, 3]
    assert r.history[-1]["valid_bleu"] > 60, r.history
    assert "tok:none" in r.history[-1]["bleu_signature"]
    assert (out / "best.safetensors").exists() and (out / "last.safetensors").exists()
    assert len(list(out.glob("optim.e*.safetensors"))) == 1
    best = max(h["valid_bleu"] for h in r.history)
    m2, rec = load_model(out / "best.safetensors")
    assert rec["best"] == {"metric": "valid_bleu", "score": best, "epoch": rec["epoch"] + 1}
    assert rec["vocab"]["tgt"] == list(toy.tgt_vocab.tokens) and rec["bpe_codes"] == toy.bpe_codes


def test_beam_one_equals_greedy(trained, toy):
    m, *_ = trained
    for model in (m, _model(toy, init_range=0.5)):        # trained, and untrained (long, odd outputs)
        ids = translate_ids(model, toy.test.src, beam=1)
        lengths = [len(s) for s in toy.test.src[:20]]
        src = torch.as_tensor(np.stack([np.pad(s, (0, max(lengths) - len(s))) for s in toy.test.src[:20]], axis=1))
        g = greedy_decode(model, src, lengths)
        assert g == beam_search(model, src, lengths, beam=1)
        assert g == ids[:20]                               # padded mixed-length batch == equal-length batches


def test_mixed_length_batches_equal_one_sentence_at_a_time(toy):
    m = _model(toy, bidirectional=True, num_layers=2, init_range=0.3)
    m.eval()
    srcs = toy.test.src[:6]
    S = max(len(s) for s in srcs)
    src = torch.as_tensor(np.stack([np.pad(s, (0, S - len(s))) for s in srcs], axis=1))
    lengths = [len(s) for s in srcs]
    assert len(set(lengths)) > 1
    memory, (h, c) = m.encode(src, lengths)
    for b, s in enumerate(srcs):
        mem1, (h1, c1) = m.encode(torch.as_tensor(s)[:, None])
        torch.testing.assert_close(memory.values[b, :len(s)], mem1.values[0])
        torch.testing.assert_close(h[:, b], h1[:, 0])
        torch.testing.assert_close(c[:, b], c1[:, 0])
        assert memory.mask[b].tolist() == [i < len(s) for i in range(S)]
    batched = beam_search(m, src, lengths, beam=3, max_len=8)
    single = [beam_search(m, torch.as_tensor(s)[:, None], beam=3, max_len=8)[0] for s in srcs]
    assert batched == single


class _TableModel:
    """A 'model' whose next-token probabilities are a hand-written table over prefixes; its
    decoder state is the prefix's row number (so beam search must reorder it correctly)."""

    def __init__(self, table, vocab=8):
        from types import SimpleNamespace
        self.config = SimpleNamespace(eos_id=EOS, bos_id=1)
        self.prefixes = {(): 0}
        self.table = table
        self.V = vocab

    def encode(self, src, src_lengths=None):
        B = src.shape[1]
        z = torch.zeros(B, src.shape[0], 1)
        return Memory(z, z, None), (torch.full((1, B, 1), -1.0), torch.zeros(1, B, 1))

    def init_feed(self, B):
        return torch.zeros(B, 1)

    def decode_step(self, prev, state, feed, memory):
        rows = []
        for b in range(prev.shape[0]):
            code = int(state[0][0, b, 0])
            prefix = () if code < 0 else self._prefix(code) + (int(prev[b]),)
            self.prefixes.setdefault(prefix, len(self.prefixes))
            rows.append(prefix)
        probs = torch.full((len(rows), self.V), 1e-9)
        for r, prefix in enumerate(rows):
            for tok, p in self.table.get(prefix, {EOS: 1.0}).items():
                probs[r, tok] = p
        codes = torch.tensor([float(self.prefixes[p]) for p in rows]).view(1, -1, 1)
        return probs.log(), (codes, state[1]), feed

    def _prefix(self, code):
        return next(p for p, c in self.prefixes.items() if c == code)


A, B_, C, D = 4, 5, 6, 7


def test_beam_search_finds_the_best_sequence():
    table = {(): {A: 0.55, B_: 0.45}, (A,): {EOS: 0.29, C: 0.36, D: 0.35}, (B_,): {EOS: 0.9, C: 0.1}}
    src = torch.zeros(3, 2, dtype=torch.long)                 # two identical sentences in one batch
    assert greedy_decode(_TableModel(table), src) == [[A, C], [A, C]]          # p = 0.198
    best, scores = beam_search(_TableModel(table), src, beam=2, return_scores=True)
    assert best == [[B_], [B_]]                                                # p = 0.405
    assert scores[0] == pytest.approx(math.log(0.45 * 0.9) / 2)               # normalized by 2 tokens (B, </s>)


def test_length_normalization_prefers_the_longer_hypothesis():
    # raw: "</s>" (0.5) beats "A B </s>" (0.32); per token: -0.69 < -0.38, so the longer one wins
    table = {(): {EOS: 0.5, A: 0.5}, (A,): {B_: 0.8, C: 0.2}, (A, B_): {EOS: 0.8, D: 0.2}}
    src = torch.zeros(2, 1, dtype=torch.long)
    assert beam_search(_TableModel(table), src, beam=3, len_penalty=0.0) == [[]]
    assert beam_search(_TableModel(table), src, beam=3, len_penalty=1.0) == [[A, B_]]


def test_max_len_closes_the_beams():
    table = {(): {A: 0.9, EOS: 0.1}, (A,): {A: 0.9, EOS: 0.1}, (A, A): {A: 0.9, EOS: 0.1},
             (A, A, A): {A: 0.9, EOS: 0.1}}
    src = torch.zeros(2, 1, dtype=torch.long)
    assert greedy_decode(_TableModel(table), src, max_len=3) == [[A, A, A]]
    assert beam_search(_TableModel(table), src, beam=1, max_len=3) == [[A, A, A]]
    with pytest.raises(ValueError, match="beam"):
        beam_search(_TableModel(table), src, beam=0)


def test_bleu_equals_sacrebleu():
    hyps = ["a man rides a bike .", "Two dogs play in the snow .", "the woman sings", "x"]
    refs = ["a man is riding a bike .", "two dogs are playing in the snow .", "a woman sings .", "y z"]
    b = corpus_bleu(hyps, refs)
    ref = sacrebleu.corpus_bleu(hyps, [refs], tokenize="none", lowercase=True)
    assert b.score == pytest.approx(ref.score, abs=1e-9) and 20 < b.score < 60
    assert "case:lc" in b.signature and "tok:none" in b.signature and "nrefs:1" in b.signature
    assert corpus_bleu(refs, refs).score == pytest.approx(100.0)
    # BPE'd text scores like the text it comes from, once BPE is removed
    bped = ["a man ri@@ des a bi@@ ke .", "T@@ wo dogs play in the snow .", "the wo@@ man sings", "x"]
    assert corpus_bleu([remove_bpe(h) for h in bped], refs).score == pytest.approx(b.score)
    # "tokenize=none": a tokenizing metric would split "bike." and score differently
    glued = ["a man rides a bike.", hyps[1], hyps[2], hyps[3]]
    assert corpus_bleu(glued, refs).score < b.score
    with pytest.raises(ValueError, match="one hypothesis per reference"):
        corpus_bleu(hyps[:2], refs)


def test_quantized_model_stays_close_to_float(trained, toy):
    m, *_ = trained
    float_ids = translate_ids(m, toy.test.src, beam=1)
    q = g2quant.quantize(m, bits=4)
    assert sum(1 for _ in q.model.modules() if type(_).__name__.startswith("Quant")) >= 7   # 2 emb, 2 lstm, 3 linear
    q_ids = translate_ids(q, toy.test.src, beam=1)
    same = np.mean([a == b for a, b in zip(float_ids, q_ids)])
    assert same >= 0.8, same
    fb = evaluate_bleu(m, toy.test, toy.tgt_vocab, beam=3)["bleu"]
    qb = evaluate_bleu(q, toy.test, toy.tgt_vocab, beam=3)["bleu"]
    assert qb > fb - 5, (fb, qb)
    assert q.size_bytes() < 0.3 * q.float_size_bytes()


def test_resume_is_bit_exact(toy, tmp_path):
    cfg = MTTrainConfig(**{**TCFG.__dict__, "max_batches": 15, "valid_limit": 20})
    full = _model(toy, gates="gumbel", dropout=0.1)
    train_mt(full, toy, cfg, tmp_path / "full", **QUIET)
    part = _model(toy, gates="gumbel", dropout=0.1)
    train_mt(part, toy, MTTrainConfig(**{**cfg.__dict__, "epochs": 1}), tmp_path / "part", **QUIET)
    resumed = _model(toy, gates="gumbel", dropout=0.1)
    r = train_mt(resumed, toy, cfg, tmp_path / "part", resume=True, **QUIET)
    assert [h["epoch"] for h in r.history] == [1, 2]
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)
    h_full = json.loads((tmp_path / "full" / "history.json").read_text())
    h_part = json.loads((tmp_path / "part" / "history.json").read_text())
    assert [h["valid_loss"] for h in h_full] == [h["valid_loss"] for h in h_part]
    # sgd with momentum and the decay schedule resume exactly too
    sgd = MTTrainConfig(**{**cfg.__dict__, "optimizer": "sgd", "lr": 0.5, "momentum": 0.9, "schedule": "decay",
                           "decay_after": 1})
    a, b = _model(toy), _model(toy)
    train_mt(a, toy, sgd, tmp_path / "sgd-full", **QUIET)
    train_mt(b, toy, MTTrainConfig(**{**sgd.__dict__, "epochs": 1}), tmp_path / "sgd-part", **QUIET)
    b = _model(toy)
    r = train_mt(b, toy, sgd, tmp_path / "sgd-part", resume=True, **QUIET)
    assert r.history[1]["lr"] == pytest.approx(0.25)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=0, rtol=0, msg=k)


def test_init_from_continues_a_float_run_with_gumbel_gates(toy, tmp_path):
    """--init-from: the G2 authors' MT recipe (Gumbel gates turned on in a trained float model).
    The continuation is resuming the float run in a new folder with this model's gates: same
    weights, optimizer state and data order, so with the same (sigmoid) gates it is bit-exact
    that resume."""
    cfg = MTTrainConfig(**{**TCFG.__dict__, "epochs": 2, "max_batches": 10, "valid_limit": 20})
    train_mt(_model(toy), toy, MTTrainConfig(**{**cfg.__dict__, "epochs": 1}), tmp_path / "float", **QUIET)
    init = tmp_path / "float" / "last.safetensors"
    same = _model(toy)
    r = train_mt(same, toy, cfg, tmp_path / "g2", init_from=init, **QUIET)
    assert [h["epoch"] for h in r.history] == [1, 2] and r.history[0]["init"] and "init" not in r.history[1]
    import shutil
    shutil.copytree(tmp_path / "float", tmp_path / "float-resumed")
    ref = _model(toy)
    train_mt(ref, toy, cfg, tmp_path / "float-resumed", resume=True, **QUIET)
    for (k, a), (_, b) in zip(ref.state_dict().items(), same.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)
    # Gumbel gates: training goes on from the float weights and differs from the float run; the
    # checkpoints say where they started, and best is chosen among the continuation's epochs
    g2 = _model(toy, gates="gumbel")
    train_mt(g2, toy, cfg, tmp_path / "g2-noisy", init_from=init, **QUIET)
    assert any(not torch.equal(a, b) for a, b in zip(ref.state_dict().values(), g2.state_dict().values()))
    m, rec = load_model(tmp_path / "g2-noisy" / "best.safetensors")
    assert rec["init_from"]["path"] == str(init) and rec["init_from"]["epochs"] == 1
    assert rec["best"]["epoch"] == 2 and m.config.gates == "gumbel"
    # resuming a continued run keeps its record; errors name the problem
    again = train_mt(_model(toy, gates="gumbel"), toy, MTTrainConfig(**{**cfg.__dict__, "epochs": 3}),
                     tmp_path / "g2-noisy", resume=True, init_from=init, **QUIET)
    assert [h["epoch"] for h in again.history] == [1, 2, 3]
    assert load_model(tmp_path / "g2-noisy" / "last.safetensors")[1]["init_from"]["epochs"] == 1
    with pytest.raises(FileNotFoundError, match="--init-from: no checkpoint"):
        train_mt(_model(toy), toy, cfg, tmp_path / "x", init_from=tmp_path / "nope.safetensors", **QUIET)
    from g2quant.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="cannot be continued"):
        train_mt(_model(toy, hidden_size=16), toy, cfg, tmp_path / "y", init_from=init, **QUIET)
    with pytest.raises(CheckpointError, match="last.safetensors"):      # best has no optimizer state
        train_mt(_model(toy), toy, cfg, tmp_path / "z", init_from=tmp_path / "float" / "best.safetensors", **QUIET)


def test_best_is_never_replaced_by_a_worse_run(trained, toy, tmp_path):
    m, _, r, out = trained
    import shutil
    shutil.copy(out / "best.safetensors", tmp_path / "best.safetensors")
    kept = (tmp_path / "best.safetensors").read_bytes()
    weak = train_mt(_model(toy), toy, MTTrainConfig(**{**TCFG.__dict__, "epochs": 1, "max_batches": 2}), tmp_path,
                    **QUIET)
    assert weak.history[0]["valid_bleu"] < r.best
    assert (tmp_path / "best.safetensors").read_bytes() == kept
    from g2quant.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="selected by valid_bleu"):
        train_mt(_model(toy), toy, MTTrainConfig(**{**TCFG.__dict__, "select": "loss", "max_batches": 1}), tmp_path,
                 **QUIET)


def test_resume_errors_are_clear(toy, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_mt(_model(toy), toy, TCFG, tmp_path, resume=True, **QUIET)
    train_mt(_model(toy), toy, MTTrainConfig(**{**TCFG.__dict__, "epochs": 1, "max_batches": 1}), tmp_path, **QUIET)
    from g2quant.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        train_mt(_model(toy, hidden_size=16), toy, TCFG, tmp_path, resume=True, **QUIET)
    for f in tmp_path.glob("optim.e*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match="optimizer state .* is missing"):
        train_mt(_model(toy), toy, TCFG, tmp_path, resume=True, **QUIET)


def test_variants_and_tied_checkpoint_round_trip(toy, tmp_path):
    from g2quant.checkpoint import save_checkpoint
    for kw in (dict(bidirectional=True, num_layers=2), dict(tied=True, emb_size=32), dict(gates="sharpened")):
        m = _model(toy, **kw)
        src = torch.as_tensor(toy.train.src[0])[:, None]
        tin = torch.as_tensor(np.r_[1, toy.train.tgt[0][:-1]])[:, None]
        assert m(src, tin).shape == (len(tin), 1, len(toy.tgt_vocab))
        path = save_checkpoint(tmp_path / "m.safetensors", m, {"kind": "seq2seq", "config": m.config.to_dict()})
        m2, _ = load_model(path)
        m.eval()
        torch.testing.assert_close(m(src, tin), m2(src, tin))
        if kw.get("tied"):
            assert m2.generator.weight.data_ptr() == m2.tgt_embedding.weight.data_ptr()
    with pytest.raises(ValueError, match=r"\[S, B\]"):
        m.encode(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="src_lengths"):
        m.encode(torch.zeros(3, 2, dtype=torch.long), [3, 4])


# ---------------------------------------------------------------- commands (need the shared data)
def _main(argv, monkeypatch):
    """``g2quant.cli.main`` with the translation commands, wired here if cli.py does not yet."""
    from g2quant import cli, cli_mt
    orig = cli.build_parser

    def wired():
        p = orig()
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        if "train-mt" not in sub.choices:
            common = argparse.ArgumentParser(add_help=False)
            common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS)

            def add(name, func, help_, **kw):
                q = sub.add_parser(name, help=help_, formatter_class=cli._Formatter, parents=[common], **kw)
                q.set_defaults(func=func)
                return q
            cli_mt.add_commands(add)
        return p
    monkeypatch.setattr(cli, "build_parser", wired)
    return cli.main(argv)


def test_cli_train_translate_eval(data_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    small = ["--emb-size", "16", "--hidden-size", "16", "--layers", "1", "--threads", "1", "-q"]
    argv = ["train-mt", "--data", "iwslt14", "--allow-sample", "--epochs", "1", "--max-batches", "3",
            "--valid-limit", "10", "--out", str(out)] + small
    assert _main(argv, monkeypatch) == 0
    err = capsys.readouterr().err
    assert "smoke tests only" in err
    assert _main(argv, monkeypatch) == 2                                    # a run is there already
    assert "--resume" in capsys.readouterr().err
    g2 = tmp_path / "g2"                       # Gumbel gates turned on in that run, one more epoch
    assert _main(["train-mt", "--data", "iwslt14", "--allow-sample", "--epochs", "2", "--max-batches", "3",
                  "--valid-limit", "10", "--gates", "gumbel", "--init-from", str(out / "last.safetensors"),
                  "--out", str(g2)] + small, monkeypatch) == 0
    from g2quant.checkpoint import load_checkpoint as _lc
    rec = _lc(g2 / "last.safetensors")[1]
    assert rec["config"]["gates"] == "gumbel" and rec["init_from"]["epochs"] == 1 and len(rec["history"]) == 2
    capsys.readouterr()
    assert _main(["train-mt", "--data", "iwslt14", "--allow-sample", "--epochs", "2", "--init-from",
                  str(out / "best.safetensors"), "--out", str(tmp_path / "g2b")] + small, monkeypatch) == 2
    assert "last.safetensors" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("ein mann .\n\nzwei hunde .\n"))
    assert _main(["translate", str(out / "best.safetensors"), "--beam", "2", "--max-len", "5", "-q"],
                 monkeypatch) == 0
    lines = capsys.readouterr().out.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""
    assert all("@@" not in line and len(line.split()) <= 5 for line in lines)
    assert _main(["eval-mt", str(out), "--split", "valid", "--limit", "8", "--beam", "2", "--json", "-q"],
                 monkeypatch) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["data"] == "iwslt14" and res["sentences"] == 8 and "tok:none" in res["signature"]
    assert any("pipeline check" in n for n in res["notes"])
    qat = tmp_path / "qat"                                                  # seq2seq QAT through `finetune`
    assert _main(["finetune", str(out / "best.safetensors"), "--bits", "4", "--hard-gates", "if", "--max-batches",
                  "2", "--out", str(qat), "--threads", "1", "-q"], monkeypatch) == 0
    assert "best valid BLEU" in capsys.readouterr().out
    from g2quant.checkpoint import load_checkpoint
    rec = load_checkpoint(qat / "best.safetensors")[1]
    assert rec["kind"] == "quantized_seq2seq" and rec["train_config"]["optimizer"] == "adam"
    assert rec["quant_config"]["hard_gates"] == "if" and rec["vocab"] == load_checkpoint(out / "best.safetensors")[1]["vocab"]
    assert _main(["eval-mt", str(qat), "--split", "valid", "--limit", "4", "--beam", "2", "--json", "-q"],
                 monkeypatch) == 0
    assert json.loads(capsys.readouterr().out)["sentences"] == 4
    assert _main(["finetune", str(out / "best.safetensors"), "--distill", "0.5", "--out", str(tmp_path / "q2"), "-q"],
                 monkeypatch) == 2
    assert "--distill applies to word LMs" in capsys.readouterr().err
    assert _main(["eval-mt", str(tmp_path / "nothing.safetensors"), "-q"], monkeypatch) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _main(["train-mt", "--data", "iwslt14", "--out", str(tmp_path / "r2"), "--no-download"] + small,
                 monkeypatch) == 2
    assert "allow-sample" in capsys.readouterr().err
