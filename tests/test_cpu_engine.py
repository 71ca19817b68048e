"""CPU engine on word-LM artifacts and the artifact CLI commands, against the NumPy reference
(the LM-specific ``targets/cpu/reference.lm_step_ref`` and the graph reference runtime)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from g2quant.cli import main
from g2quant.targets.artifact import ArtifactError
from g2quant.targets.cpu import reference
from g2quant.targets.cpu.engine import Engine
from g2quant.targets.cpu.legacy_v1 import write_v1_lm_artifact
from g2quant.targets.cpu.target import read, write_lm_artifact
from g2quant.targets.cpu.testing import random_lm_weights
from g2quant.targets.runtime import State

V, H, E = 97, 24, 20
VOCAB = ["<unk>", "<eos>"] + [f"w{i}" for i in range(V - 2)]


def _assert_same_weights(a, b):
    mats = lambda w: [w.embedding] + [m for l in w.layers for m in (l.w_ih, l.w_hh)] + \
        ([] if w.decoder is None else [w.decoder])
    assert len(mats(a)) == len(mats(b))
    for x, y in zip(mats(a), mats(b)):
        assert (x.bits, x.scheme) == (y.bits, y.scheme)
        assert x.q.dtype == y.q.dtype
        np.testing.assert_array_equal(x.q, y.q)
        np.testing.assert_array_equal(x.scale, y.scale)
    for la, lb in zip(a.layers, b.layers):
        np.testing.assert_array_equal(la.bias, lb.bias)
    np.testing.assert_array_equal(a.decoder_bias, b.decoder_bias)
    assert (a.hard_gates, a.act_bits, a.tied, a.extra) == (b.hard_gates, b.act_bits, b.tied, b.extra)


def _close(got, want):
    tol = 1e-3 * max(1.0, float(np.abs(want).max()))
    assert float(np.abs(got - want).max()) <= tol


CASES = [dict(bits=b) for b in (1, 2, 3, 4, 8, 32)] + [
    dict(bits=2, scheme="ternary"), dict(bits=4, tied=True), dict(bits=4, act_bits=None),
    dict(bits=4, emb_bits=8, dec_bits=2)]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_export_round_trip_exact(tmp_path, kw):
    w = random_lm_weights(V, H, 2, emb=None if kw.get("tied") else E, hard_gates=("i", "o"), seed=3, **kw)
    p = write_lm_artifact(tmp_path / "m.g2q", w, VOCAB, validation={"ppl": 123.4}, meta={"name": "t"})
    g, vocab, man = read(p)
    want = w.to_graph()
    assert sorted(g.params) == sorted(want.params)
    for name, a in want.params.items():
        b = g.params[name]
        if hasattr(a, "q"):
            assert (a.bits, a.scheme) == (b.bits, b.scheme) and a.q.dtype == b.q.dtype
            np.testing.assert_array_equal(a.q, b.q)
            np.testing.assert_array_equal(a.scale, b.scale)
        else:
            np.testing.assert_array_equal(a, b)
    assert [n.to_json() for n in g.nodes] == [n.to_json() for n in want.nodes]
    assert vocab == VOCAB
    assert man["target"] == "cpu" and man["format_version"] == 2
    assert g.node("rnn").attrs["hard_gates"] == "io"
    assert ("decoder.weight" in g.params) == (not kw.get("tied"))
    assert man["validation"] == {"ppl": 123.4} and man["meta"]["name"] == "t"
    entry = man["params"]["rnn.l0.w_hh"]
    assert entry["bits"] == w.layers[0].w_hh.bits and entry["scale"] == "rnn.l0.w_hh.scale"


def test_v1_artifacts_still_load_and_run(tmp_path):
    w = random_lm_weights(V, H, 2, 4, emb=E, hard_gates=("f",), seed=8)
    p = write_v1_lm_artifact(tmp_path / "old.g2q", w, VOCAB)
    assert json.loads((p / "manifest.json").read_text())["format_version"] == 1
    eng = Engine.load(p)
    toks = np.array([[1, 2], [3, 4], [5, 6]])
    want, _ = Engine(w.to_graph(), backend="reference").run(toks)
    got, _ = eng.run(toks)
    _close(got, want)
    assert eng.vocab == VOCAB and eng.is_lm


def test_packed_size_is_small(tmp_path):
    w4 = random_lm_weights(2000, 128, 2, 4, seed=0)
    w32 = random_lm_weights(2000, 128, 2, 32, seed=0)
    vocab = [f"w{i}" for i in range(2000)]
    s4 = Engine.load(write_lm_artifact(tmp_path / "a.g2q", w4, vocab)).size_bytes
    s32 = Engine.load(write_lm_artifact(tmp_path / "b.g2q", w32, vocab)).size_bytes
    assert s4 < s32 / 6, (s4, s32)     # 1/8 of the weights plus scales, biases, vocab


def test_export_validation_errors(tmp_path):
    w = random_lm_weights(V, H, 1, 4, emb=E)
    with pytest.raises(ValueError, match="a vocabulary of 3 words does not fit"):
        write_lm_artifact(tmp_path / "m.g2q", w, ["a", "b", "c"])
    with pytest.raises(ValueError, match="duplicate"):
        write_lm_artifact(tmp_path / "m.g2q", w, ["a"] * V)
    w.layers[0].bias = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"l0.bias must have shape \[96\]"):
        write_lm_artifact(tmp_path / "m.g2q", w, VOCAB)
    assert not (tmp_path / "m.g2q").exists()


def test_read_detects_inconsistent_manifest(tmp_path):
    p = write_lm_artifact(tmp_path / "m.g2q", random_lm_weights(V, H, 1, 4, emb=E), VOCAB)
    man = json.loads((p / "manifest.json").read_text())
    man["graph"]["nodes"][1]["attrs"]["hidden_size"] = 99
    (p / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match=r"l0.w_ih must have shape \[396, 20\]"):
        read(p)
    man["graph"]["nodes"][1]["attrs"]["hidden_size"] = H
    man["target"] = "gpu-fp16"
    (p / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="target is 'gpu-fp16'"):
        Engine.load(p)


HARD = [(), ("i", "f"), ("i", "f", "o")]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("hard", HARD, ids=lambda h: "hard-" + ("".join(h) or "none"))
def test_engine_matches_reference(tmp_path, bits, hard):
    w = random_lm_weights(V, H, 2, bits, emb=E, hard_gates=hard, seed=bits)
    eng = Engine.load(write_lm_artifact(tmp_path / "m.g2q", w, VOCAB))
    rng = np.random.default_rng(1)
    B = 3
    h, c = reference.initial_state(w, B)
    state = State([(h.copy(), c.copy())])
    for _ in range(6):
        toks = rng.integers(0, V, B)
        want, h_ref, c_ref = reference.lm_step_ref(w, toks, h, c)
        # one step from the reference's state: independent of drift in earlier steps
        got, new = eng.step(toks, (h.copy(), c.copy()))
        _close(got, want)
        _close(new.h, h_ref)
        _close(new.c, c_ref)
        logits, state = eng.step(toks, state)      # the engine's own trajectory
        h, c = h_ref, c_ref
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("kw", [dict(bits=32), dict(bits=4, act_bits=None), dict(bits=4, tied=True),
                                dict(bits=2, scheme="ternary"), dict(bits=3), dict(bits=4, emb_bits=8, dec_bits=1)],
                         ids=["float", "no-act-quant", "tied", "ternary", "3bit", "mixed"])
def test_engine_matches_reference_variants(tmp_path, kw):
    w = random_lm_weights(V, H, 2, emb=None if kw.get("tied") else E, hard_gates=("f",), seed=4, **kw)
    eng = Engine.load(write_lm_artifact(tmp_path / "m.g2q", w, VOCAB))
    h, c = reference.initial_state(w, 2)
    for toks in ([1, 2], [3, 96], [50, 0]):
        want, h_ref, c_ref = reference.lm_step_ref(w, np.array(toks), h, c)
        got, new = eng.step(toks, (h.copy(), c.copy()))
        _close(got, want)
        _close(new.h, h_ref)
        h, c = h_ref, c_ref


def test_step_does_not_alias_state(tmp_path):
    w = random_lm_weights(V, H, 2, 4, emb=E)
    eng = Engine.load(write_lm_artifact(tmp_path / "m.g2q", w, VOCAB))
    s0 = eng.initial_state(2)
    l1, s1 = eng.step([3, 4], s0)
    assert not s0.h.any() and not s0.c.any()         # caller's state untouched
    l2, s2 = eng.step([3, 4], s0)
    np.testing.assert_array_equal(l1, l2)             # logits are fresh arrays, not a reused buffer
    np.testing.assert_array_equal(s1.h, s2.h)
    assert s1.h is not s2.h
    logits = eng.step_([3, 4], s0)                     # the in-place variant updates s0
    np.testing.assert_array_equal(s0.h, s1.h)
    np.testing.assert_allclose(logits, l1)
    with pytest.raises(ValueError, match="out of range"):
        eng.step([V], eng.initial_state(1))
    with pytest.raises(ValueError, match=r"state of 'rnn' must be float32 arrays of shape \(2, 2, 24\)"):
        eng.step([1, 2], eng.initial_state(1))
    with pytest.raises(ValueError, match="token ids must be integers"):
        eng.step([1.9])
    with pytest.raises(ValueError, match=r"step\(\) expects token ids of shape \[B\]"):
        eng.step([])


def _ref_logprobs(w, seq):
    h, c = reference.initial_state(w, 1)
    out = []
    for t in range(len(seq) - 1):
        logits, h, c = reference.lm_step_ref(w, seq[t:t + 1], h, c)
        out.append(reference.log_softmax(logits)[0, seq[t + 1]])
    return np.array(out)


@pytest.mark.parametrize("hard", [(), ("i", "f", "o")], ids=["soft", "hard"])
def test_score_and_perplexity_match_reference(tmp_path, hard):
    w = random_lm_weights(V, H, 2, 4, emb=E, hard_gates=hard, seed=7)
    eng = Engine.load(write_lm_artifact(tmp_path / "m.g2q", w, VOCAB))
    ids = np.random.default_rng(2).integers(0, V, 64)
    lp = eng.score(ids)
    assert lp.shape == (63,)
    np.testing.assert_allclose(lp, _ref_logprobs(w, ids), atol=2e-3)
    batch = eng.score(np.stack([ids[:32], ids[32:]]))
    np.testing.assert_allclose(batch[1], eng.score(ids[32:]), atol=1e-5)
    # perplexity = exp(-mean) over batch_size contiguous rows, state carried
    rep = eng.perplexity(ids, batch_size=4, bptt=5)
    rows = ids.reshape(4, 16)
    want = -np.concatenate([_ref_logprobs(w, r) for r in rows]).mean()
    assert rep.tokens == 4 * 15 and rep.batch_size == 4 and rep.bptt == 5
    assert abs(rep.nll - want) < 2e-3
    assert abs(eng.perplexity(ids, batch_size=4, bptt=3).nll - rep.nll) < 1e-9   # bptt does not matter
    assert "batch size 4, bptt 5" in str(rep)


def test_generate(tmp_path):
    w = random_lm_weights(V, H, 2, 4, emb=E, seed=5)
    eng = Engine.load(write_lm_artifact(tmp_path / "m.g2q", w, VOCAB))
    prompt = eng.encode("w1 w2 w3")
    g1 = eng.generate(prompt, 8)
    np.testing.assert_array_equal(g1, eng.generate(prompt, 8))
    # greedy = argmax of the reference at each step
    h, c = reference.initial_state(w, 1)
    for t in prompt:
        logits, h, c = reference.lm_step_ref(w, [t], h, c)
    for tok in g1:
        assert tok == int(np.argmax(logits[0]))
        logits, h, c = reference.lm_step_ref(w, [tok], h, c)
    s1 = eng.generate(prompt, 8, temperature=1.0, seed=3)
    np.testing.assert_array_equal(s1, eng.generate(prompt, 8, temperature=1.0, seed=3))
    assert len(eng.generate([], 3)) == 3                     # starts from <eos>
    assert eng.decode(eng.encode("w5 nonsense")) == "w5 <unk>"
    with pytest.raises(ValueError, match="'nonsense' is not in the vocabulary"):
        eng.encode("nonsense", unknown="error")


NO_TORCH = """
import sys, numpy as np
from g2quant.targets.cpu.engine import Engine
eng = Engine.load(sys.argv[1])
st = eng.initial_state(2)
for t in range(3):
    logits, st = eng.step(np.array([1, 2]), st)
eng.generate([1, 2], 3); eng.perplexity(np.arange(40) % eng.vocab_size, batch_size=2)
assert np.isfinite(logits).all()
assert 'torch' not in sys.modules, 'torch was imported'
print('ok', eng.backend)
"""


def test_engine_does_not_import_torch(tmp_path):
    p = write_lm_artifact(tmp_path / "m.g2q", random_lm_weights(V, H, 2, 4, emb=E), VOCAB)
    r = subprocess.run([sys.executable, "-c", NO_TORCH, str(p)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


# ---- CLI ---------------------------------------------------------------------------------------
def _cli(argv):
    return main(argv)


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    w = random_lm_weights(V, H, 2, 4, emb=E, seed=11)
    return write_lm_artifact(tmp_path_factory.mktemp("cli") / "tiny.g2q", w, VOCAB)


def test_cli_run(tiny_artifact, capsys):
    assert _cli(["run", str(tiny_artifact), "--prompt", "w1 w2 zzz", "--max-tokens", "5"]) == 0
    out = capsys.readouterr()
    assert out.out.split()[:3] == ["w1", "w2", "<unk>"] and len(out.out.split()) == 8
    assert "mapped to <unk>: zzz" in out.err
    assert _cli(["run", str(tiny_artifact), "--prompt", "w1", "--temperature", "0.7", "--seed", "1"]) == 0
    capsys.readouterr()
    assert _cli(["run", str(tiny_artifact), "--ids", "1 2 3", "--max-tokens", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["prompt_ids"] == [1, 2, 3] and len(res["ids"]) == 2 and len(res["text"].split()) == 2


def test_cli_bench(tiny_artifact, capsys):
    assert _cli(["bench", str(tiny_artifact), "--steps", "5", "--batch-size", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["batch_size"] == 2 and res["ms_per_step"] > 0 and res["size_bytes"] > 0
    assert res["loop"] and res["backend"] == "kernels" and res["run_tokens_per_s"] > 0


def test_cli_errors(tmp_path, tiny_artifact, capsys):
    assert _cli(["run", str(tmp_path / "missing.g2q"), "--prompt", "w1"]) == 2
    assert "artifact not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        _cli(["bench", str(tiny_artifact), "--steps", "0"])
    assert exc.value.code == 2 and "--steps: expected a positive integer" in capsys.readouterr().err


def test_cli_eval_ptb(tmp_path, capsys, data_root):
    from g2quant.data.ptb import load_ptb

    corpus = load_ptb(data_root / "ptb", download=False)
    w = random_lm_weights(len(corpus.vocab), 16, 1, 4, seed=0)
    p = write_lm_artifact(tmp_path / "ptb.g2q", w, corpus.vocab)
    assert _cli(["eval", str(p), "--data", "ptb", "--split", "valid", "--batch-size", "4",
                 "--bptt", "10", "--limit", "400", "--no-download", "--data-dir", str(data_root / "ptb")]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "batch size 4, bptt 10" in out
    eng = Engine.load(p)
    want = eng.perplexity(corpus.valid[:400], batch_size=4, bptt=10).perplexity
    assert f"{want:.2f}" in out


def test_backends():
    w = random_lm_weights(V, H, 2, 4, emb=E, seed=2)
    g = w.to_graph()
    ref = Engine(g, VOCAB, backend="reference")
    assert ref.backend == "reference"
    toks = np.array([1, 5])
    want = reference.lm_step_ref(w, toks, *reference.initial_state(w, 2))[0]
    np.testing.assert_array_equal(ref.step(toks)[0], want)
    fast = Engine(g, VOCAB, backend="kernels")
    assert fast.backend == "kernels"
    _close(fast.step(toks)[0], want)
    with pytest.raises(ValueError, match="backend must be"):
        Engine(g, VOCAB, backend="gpu")


def test_cli_eval_maps_vocab_and_rejects_without_unk(tmp_path, capsys, monkeypatch):
    from g2quant.data import ptb

    words = ["a", "b", "c", "<eos>"]
    corpus = ptb.Corpus(words, np.array([0, 1, 2, 3] * 10), np.array([0, 1, 2, 3] * 10),
                        np.array([0, 1, 2, 3, 0, 1] * 10))
    monkeypatch.setattr(ptb, "load_ptb", lambda *a, **k: corpus)
    w = random_lm_weights(4, 8, 1, 4, seed=1)
    p = write_lm_artifact(tmp_path / "x.g2q", w, ["<unk>", "a", "<eos>", "b"])     # "c" unknown
    assert _cli(["eval", str(p), "--batch-size", "2", "--bptt", "4"]) == 0
    captured = capsys.readouterr()
    assert "1 ptb word types are not in the model's vocabulary" in captured.err
    assert "batch size 2, bptt 4" in captured.out
    p2 = write_lm_artifact(tmp_path / "y.g2q", w, ["z", "a", "<eos>", "b"])         # no <unk>
    assert _cli(["eval", str(p2)]) == 2
    assert "no <unk>" in capsys.readouterr().err


def test_cli_eval_text_file(tiny_artifact, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("w1 w2 w3 zzz\nw4 w5\n\nw1 w1 w2\n")
    assert _cli(["eval", str(tiny_artifact), "--text", str(text), "--batch-size", "2", "--bptt", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    eng = Engine.load(tiny_artifact)
    ids = [eng.word2id[w] for w in "w1 w2 w3 <unk> <eos> w4 w5 <eos> w1 w1 w2 <eos>".split()]
    want = eng.perplexity(np.array(ids), batch_size=2, bptt=3)
    assert res["tokens"] == want.tokens and abs(res["perplexity"] - want.perplexity) < 1e-9


def test_every_subcommand_help_shows_defaults(capsys):
    from g2quant.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        out = capsys.readouterr().out
        assert "(default:" in out and "--quiet" in out, name
        assert "example" in out, name
