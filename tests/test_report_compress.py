"""Compression analysis, trade-off reports, and the finetune / report / export / demo commands."""
import json

import pytest
import torch

from g2quant.checkpoint import load_checkpoint
from g2quant.cli import main
from g2quant.compress import compress_gates, compress_tensor
from g2quant.data.synthetic import synthetic_corpus
from g2quant.models import LMConfig, WordLM
from g2quant.report import QATSettings, pareto_front, tradeoff


def test_compress_tensor_formulas():
    w = torch.tensor([[0.05, 0.11, -0.29, 0.55, -1.3]])
    torch.testing.assert_close(compress_tensor(w, "round", r=0.2), torch.tensor([[0.0, 0.2, -0.2, 0.6, -1.2]]))  # -6.5 rounds half to even
    torch.testing.assert_close(compress_tensor(w, "round_clip", r=0.2, c=0.4),
                               torch.tensor([[0.0, 0.2, -0.2, 0.4, -0.4]]))
    m = torch.randn(8, 6)
    low = compress_tensor(m, "svd", rank=2)
    assert torch.linalg.matrix_rank(low) == 2
    torch.testing.assert_close(compress_tensor(m, "svd", rank=6), m, atol=1e-5, rtol=1e-5)


def test_compress_gates_touches_only_chosen_gate_rows():
    torch.manual_seed(0)
    m = WordLM(LMConfig(vocab_size=20, emb_size=8, hidden_size=8))
    c = compress_gates(m, "round_clip", gates="if")
    H = 8
    for name, p in m.rnn.named_parameters():
        q = dict(c.rnn.named_parameters())[name]
        if name.startswith("weight_"):
            torch.testing.assert_close(q[:2 * H], p[:2 * H].div(0.2).round().mul(0.2).clamp(-0.4, 0.4))
            torch.testing.assert_close(q[2 * H:], p[2 * H:])      # g and o rows untouched
        else:
            torch.testing.assert_close(q, p)                      # biases untouched
    assert not torch.equal(m.rnn.weight_hh_l0, c.rnn.weight_hh_l0)   # the original is not modified in place
    with pytest.raises(ValueError, match="unknown compression"):
        compress_gates(m, "prune")


def test_pareto_front():
    rows = [{"size_bytes": 1, "ppl": 200}, {"size_bytes": 2, "ppl": 150}, {"size_bytes": 3, "ppl": 160},
            {"size_bytes": 4, "ppl": 100}]
    assert [r["size_bytes"] for r in pareto_front(rows)] == [1, 2, 4]


@pytest.fixture(scope="module")
def tiny_lm():
    corpus = synthetic_corpus(n_train=2000, n_valid=150, n_test=150)
    torch.manual_seed(0)
    model = WordLM(LMConfig(vocab_size=len(corpus.vocab), emb_size=16, hidden_size=16, gates="gumbel")).eval()
    return model, corpus


def test_tradeoff_writes_results_and_resumes(tiny_lm, tmp_path):
    model, corpus = tiny_lm
    kw = dict(eval_data=corpus.test, train_data=corpus.train, valid_data=corpus.valid, out_dir=tmp_path,
              name="tiny", widths=(8, 2, "ternary"), methods=("ptq", "qat"), gate_modes=("soft", "hard"),
              qat=QATSettings(max_batches=5, batch_size=8, bptt=8), progress=False, log=lambda s: None)
    rows = tradeoff(model, **kw)
    assert len(rows) == 2 + 3 * 2 * 2             # float soft/hard + widths x methods x gates
    saved = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert saved == rows
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000
    table = (tmp_path / "table.md").read_text()
    assert "| 8 | ptq | soft |" in table and "Δppl" in table
    by = {(r["bits"], r["method"], r["gates"]): r for r in rows}
    assert by[(2, "ptq", "soft")]["size_bytes"] < by[(8, "ptq", "soft")]["size_bytes"] < by[("float", "float", "soft")]["size_bytes"]
    assert by[("float", "float", "soft")]["delta_ppl_pct"] == 0.0
    # a rerun finds every row done and recomputes nothing
    again = tradeoff(model, **kw)
    assert [r["seconds"] for r in again] == [r["seconds"] for r in rows]


def test_tradeoff_hard_rows_use_the_gates_the_model_trained_binary(tmp_path):
    """The "hard" rows evaluate the model's own Gumbel gates: i, f for a G2-LSTM, r and z (or the
    one it trained) for a G2-GRU, whose alphabet has no i or f."""
    from g2quant.report import default_hard_gates
    corpus = synthetic_corpus(n_train=600, n_valid=80, n_test=80)
    torch.manual_seed(0)
    V = len(corpus.vocab)
    gru = WordLM(LMConfig(vocab_size=V, emb_size=8, hidden_size=8, cell="gru", gates="gumbel")).eval()
    gru_r = WordLM(LMConfig(vocab_size=V, emb_size=8, hidden_size=8, cell="gru", gates="gumbel",
                            gumbel_gates="r")).eval()
    lstm = WordLM(LMConfig(vocab_size=V, emb_size=8, hidden_size=8)).eval()
    assert (default_hard_gates(gru), default_hard_gates(gru_r), default_hard_gates(lstm)) == ("rz", "r", "if")
    rows = tradeoff(gru_r, eval_data=corpus.test, out_dir=tmp_path / "r", widths=(4,), methods=("ptq",),
                    gate_modes=("soft", "hard"), progress=False, log=lambda s: None)
    by = {(r["bits"], r["gates"]): r for r in rows}
    assert by[(4, "hard")]["hard_gates"] == "r" and by[(4, "soft")]["hard_gates"] == ""
    assert by[(4, "hard")]["ppl"] != by[(4, "soft")]["ppl"]
    rows = tradeoff(gru_r, eval_data=corpus.test, out_dir=tmp_path / "z", widths=(4,), methods=("ptq",),
                    gate_modes=("hard",), progress=False, log=lambda s: None, hard_gates="z")
    assert {r["hard_gates"] for r in rows} == {"z"}


def test_cli_finetune_export_eval_and_errors(tmp_path, capsys):
    ck = tmp_path / "float"
    assert main(["train-lm", "--data", "synthetic", "--preset", "tiny", "--epochs", "1", "--max-batches", "10",
                 "--out", str(ck), "--quiet", "--threads", "1"]) == 0
    qk = tmp_path / "qat"
    assert main(["finetune", str(ck / "best.safetensors"), "--data", "synthetic", "--bits", "3", "--max-batches", "5",
                 "--optimizer", "adam", "--lr", "1e-3", "--distill", "0.5", "--out", str(qk), "--quiet",
                 "--threads", "1"]) == 0
    assert [p.name for p in qk.glob("optim.e*.safetensors")] == ["optim.e0.safetensors"]
    assert load_checkpoint(qk / "last.safetensors")[1]["train_config"]["distill_weight"] == 0.5
    art = tmp_path / "m.g2q"
    assert main(["export", str(qk / "best.safetensors"), "--data", "synthetic", "--out", str(art),
                 "--threads", "1"]) == 0
    man = json.loads((art / "manifest.json").read_text())
    lstm = next(n for n in man["graph"]["nodes"] if n["op"] == "lstm")
    assert lstm["attrs"]["hard_gates"] == "if"
    assert man["validation"]["max_rel_diff_vs_torch"] < 2e-3
    assert "test_ppl_quantized_torch" in man["validation"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["finetune", str(ck), "--bits", "9", "--out", "x"])
    assert exc.value.code == 2 and "bits=9 is invalid" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "x.g2q")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--data", "synthetic", "--seconds", "2", "--out", str(out), "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "artifact in the CPU engine" in text
    rep = json.loads((out / "report.json").read_text())
    a = rep["artifact"]
    assert abs(a["valid_ppl_engine"] / a["valid_ppl_torch"] - 1) < 1e-3      # engine == torch quantized model
    assert a["size_bytes_on_disk"] < a["float_size_bytes"] / 4
    assert (out / "gates.png").stat().st_size > 1000 and (out / "model.g2q" / "manifest.json").exists()
    # the demo artifact scores any text file in its vocabulary
    text = tmp_path / "t.txt"
    text.write_text("the dog sees a cat\nsome old teachers sleep today\n")
    capsys.readouterr()
    assert main(["eval", str(out / "model.g2q"), "--text", str(text), "--batch-size", "1", "--json", "-q"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] == 11 + 1 - 1 and res["perplexity"] > 1
