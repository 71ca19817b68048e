"""Translation artifacts: a quantized seq2seq model exported as graphs, run by the torch-free
runtime (encoder, attention, beam search in NumPy) — translations equal torch's."""
import json

import numpy as np
import pytest
import torch

import g2quant
from g2quant.export_seq2seq import export_seq2seq, lower_seq2seq
from g2quant.models.seq2seq import Seq2Seq, Seq2SeqConfig, beam_search, greedy_decode
from g2quant.targets.artifact import ArtifactError
from g2quant.targets.seq2seq import PARTS, Seq2SeqRuntime


@pytest.fixture(params=[(False, False), (True, True)], ids=["uni", "bi-tied"])
def qmodel(request):
    bi, tied = request.param
    torch.manual_seed(0)
    m = Seq2Seq(Seq2SeqConfig(src_vocab_size=50, tgt_vocab_size=40, emb_size=16, hidden_size=16, bidirectional=bi,
                              tied=tied, gates="gumbel")).eval()
    return g2quant.quantize(m, bits=4, hard_gates="if")


def test_artifact_translations_equal_torch(qmodel, tmp_path):
    p = export_seq2seq(qmodel, tmp_path / "mt.g2q", src_vocab=["<pad>", "<s>", "</s>", "<unk>"] +
                       [f"s{i}" for i in range(46)], tgt_vocab=["<pad>", "<s>", "</s>", "<unk>"] +
                       [f"t{i}" for i in range(36)], bpe_codes="#version: 0.2\n")
    rt = g2quant.load(p)
    assert isinstance(rt, Seq2SeqRuntime) and rt.src_vocab[4] == "s0" and rt.bpe_codes.startswith("#version")
    gen = torch.Generator().manual_seed(1)
    src = torch.randint(4, 50, (9, 6), generator=gen)
    lens = [9, 7, 9, 3, 5, 1]
    assert rt.greedy(src.numpy(), lens) == greedy_decode(qmodel, src, lens)
    assert rt.beam_search(src.numpy(), lens, beam=4) == beam_search(qmodel, src, lens, beam=4)
    assert rt.beam_search(src.numpy(), lens, beam=1) == rt.greedy(src.numpy(), lens)
    sent = [list(src[:n, j].numpy()) for j, n in enumerate(lens)]
    assert rt.translate_ids(sent, beam=3, batch_size=4) == beam_search(qmodel, src, lens, beam=3)
    man = json.loads((p / "manifest.json").read_text())
    assert set(man["graphs"]) == set(PARTS) and man["model"]["kind"] == "seq2seq"
    assert man["validation"]["max_rel_diff_vs_torch"] < 2e-3


def test_tied_output_layer_is_stored_once(qmodel):
    graphs, _ = lower_seq2seq(qmodel)
    names = {n.params["weight"] for n in graphs["generator"].nodes if n.op == "linear"}
    if qmodel.model.config.tied:
        assert names == {"tgt_embedding.weight"}
    else:
        assert names == {"generator.weight"}


def test_a_missing_graph_is_a_clear_error(qmodel, tmp_path):
    p = export_seq2seq(qmodel, tmp_path / "mt.g2q")
    man = json.loads((p / "manifest.json").read_text())
    del man["graphs"]["attn_out"]
    (p / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError):
        g2quant.load(p)


def test_runtime_rejects_bad_beam(qmodel, tmp_path):
    rt = g2quant.load(export_seq2seq(qmodel, tmp_path / "mt.g2q"))
    with pytest.raises(ValueError, match="beam must be a positive integer"):
        rt.beam_search(np.ones((3, 1), np.int64) * 5, beam=0)


@pytest.mark.parametrize("delta", [0.01, 1.0])
def test_export_refuses_graphs_that_do_not_reproduce_the_model(qmodel, tmp_path, monkeypatch, delta):
    """Even with hard gates (where one probe may see a gate flip at z ≈ 0) a graph with one output
    bias off by 0.01 (or 1.0) is refused, and nothing is written."""
    import g2quant.export_seq2seq as ex
    orig = ex.lower_seq2seq

    def broken(q):
        graphs, md = orig(q)
        b = graphs["generator"].params["generator.bias"].copy()
        b[5] += np.float32(delta)
        graphs["generator"].params["generator.bias"] = b
        return graphs, md
    monkeypatch.setattr(ex, "lower_seq2seq", broken)
    with pytest.raises(g2quant.lower.ExportError, match="do not reproduce the model"):
        export_seq2seq(qmodel, tmp_path / "bad.g2q")
    assert not (tmp_path / "bad.g2q").exists()
