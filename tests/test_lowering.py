"""Any recurrent model to an artifact: lowering of the common model shapes, the engine's run/step
against the torch quantized model, unsupported wiring, per-layer widths, the target registry.

Tolerance: ``max|Δ| ≤ 2e-3 · max(1, max|y|)`` between torch and the engine (integer sums exact on
both sides; float rounding of scales and nonlinearities, and rarely an activation rounding tie
that flips one int8 step, differ) — the same bound export enforces (``AGREEMENT_RTOL``).
"""
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import g2quant
from g2quant.export import AGREEMENT_RTOL, HARD_GATE_WARN, ExportError
from g2quant.lower import example_input
from g2quant.nn.g2lstm import G2LSTM
from g2quant.targets.cpu.engine import Engine


def close(got, want):
    want = np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert float(np.abs(got - want).max()) <= AGREEMENT_RTOL * max(1.0, float(np.abs(want).max()))


class Forecaster(nn.Module):
    """float features -> 2-layer LSTM (batch_first) -> Linear on the last step"""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(5, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1, :])


class Classifier(nn.Module):
    """tokens -> bidirectional LSTM -> cat(h_n fwd, bwd) -> Linear, ReLU, Dropout, Linear, LogSoftmax"""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 12)
        self.lstm = nn.LSTM(12, 16, bidirectional=True, batch_first=True)
        self.fc = nn.Sequential(nn.Linear(32, 20), nn.ReLU(), nn.Dropout(0.2), nn.Linear(20, 4))

    def forward(self, x):
        _, (h, _) = self.lstm(self.emb(x))
        return torch.log_softmax(self.fc(torch.cat([h[-2], h[-1]], dim=1)), dim=-1)


class Tagger(nn.Module):
    """tokens -> 2-layer bidirectional LSTM (time-major) -> Linear on every step"""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 12)
        self.lstm = nn.LSTM(12, 16, num_layers=2, bidirectional=True)
        self.out = nn.Linear(32, 7)

    def forward(self, x):
        out, _ = self.lstm(self.emb(x))
        return self.out(out)


class FlatLM(nn.Module):
    """the PyTorch example LM: decoder on out.view(-1, H), an optional initial state"""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 12)
        self.lstm = nn.LSTM(12, 16, num_layers=2, dropout=0.3)
        self.drop = nn.Dropout(0.3)
        self.dec = nn.Linear(16, 50)

    def forward(self, x, hidden=None):
        out, hidden = self.lstm(self.drop(self.emb(x)), hidden)
        return self.dec(self.drop(out).view(-1, 16)), hidden


class Stacked(nn.Module):
    """features -> LSTM -> Tanh -> G2LSTM (sharpened, soft gates) -> Linear, Sigmoid per step"""

    def __init__(self):
        super().__init__()
        self.a = nn.LSTM(6, 10)
        self.b = G2LSTM(10, 12, gates="sharpened")
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        y, _ = self.a(x)
        y, _ = self.b(torch.tanh(y))
        return torch.sigmoid(self.head(y))


class LastState(nn.Module):
    """tokens (batch_first) -> G2LSTM -> h_n[-1] -> Linear -> Softmax"""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.rnn = G2LSTM(8, 16, num_layers=2, batch_first=True, gates="gumbel")
        self.head = nn.Sequential(nn.Linear(16, 5), nn.Softmax(dim=-1))

    def forward(self, x):
        _, (h, c) = self.rnn(self.emb(x))
        return self.head(h[-1])


SHAPES = [Forecaster, Classifier, Tagger, FlatLM, Stacked, LastState]


def _model(cls):
    torch.manual_seed(0)
    return cls().eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every shape quantized to 4 bits (hard i/f gates where the model has LSTMs), exported, with
    a random input and the torch output saved next to it."""
    root = tmp_path_factory.mktemp("shapes")
    out = {}
    for cls in SHAPES:
        q = g2quant.quantize(_model(cls), bits=4, hard_gates="if" if cls is not Stacked else "")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")            # hard gates on untrained gates: expected here
            path = q.export(root / f"{cls.__name__}.g2q")
        x = example_input(q.model)
        x = torch.randint(0, 30, x.shape) if not torch.is_floating_point(x) else torch.randn(x.shape)
        y = q(x)
        y = (y[0] if isinstance(y, tuple) else y).detach().numpy()
        np.save(root / f"{cls.__name__}.x.npy", x.numpy())
        np.save(root / f"{cls.__name__}.y.npy", y)
        out[cls.__name__] = (q, path, x, y)
    return root, out


@pytest.mark.parametrize("cls", SHAPES, ids=lambda c: c.__name__)
def test_engine_run_equals_torch(exported, cls):
    _, out = exported
    q, path, x, y = out[cls.__name__]
    eng = Engine.load(path)
    got, state = eng.run(x.numpy())
    close(got, y)
    if eng.streamable:
        # streaming: step by step from the zero state reproduces run()
        xs = x.numpy() if not eng.batch_first else x.numpy().swapaxes(0, 1)
        st = eng.initial_state(xs.shape[1])
        steps = []
        for t in range(xs.shape[0]):
            yt, st = eng.step(xs[t], st)
            steps.append(yt)
        full, _ = eng.run(x.numpy())
        if eng.output_info.kind == "vec":
            close(steps[-1], full)
        else:
            seq = np.stack(steps)
            lay = eng.graph.output["layout"]
            seq = {"tb": seq, "bt": seq.swapaxes(0, 1), "flat_tb": seq.reshape(-1, seq.shape[-1])}[lay]
            close(seq, full)
        for a, b in zip(st, state):
            for u, v in zip(a, b):
                close(u, v)
    else:
        with pytest.raises(ValueError, match="bidirectional"):
            eng.step(x.numpy()[0])


NO_TORCH = """
import json, sys
sys.modules['torch'] = None                       # importing torch now fails
import numpy as np
from g2quant.targets.base import load
out = {}
for name, art in json.loads(sys.argv[1]).items():
    eng = load(art)
    y, _ = eng.run(np.load(art[:-4] + '.x.npy'))
    want = np.load(art[:-4] + '.y.npy')
    out[name] = float(np.abs(y - want).max() / max(1.0, np.abs(want).max()))
print(json.dumps(out))
"""


def test_runs_in_a_process_without_torch(exported):
    root, out = exported
    arts = {name: str(path) for name, (_, path, _, _) in out.items()}
    r = subprocess.run([sys.executable, "-c", NO_TORCH, json.dumps(arts)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    errs = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(errs) == set(arts) and max(errs.values()) <= AGREEMENT_RTOL, errs


def test_lowered_graphs_have_the_expected_nodes(exported):
    _, out = exported
    ops = {name: [n.op for n in Engine.load(p).graph.nodes] for name, (_, p, _, _) in out.items()}
    assert ops["Forecaster"] == ["lstm", "select_step", "linear"]
    assert ops["Classifier"] == ["embedding", "lstm", "state_select", "state_select", "concat", "linear",
                                 "activation", "linear", "activation"]
    assert ops["Tagger"] == ["embedding", "lstm", "linear"]
    assert ops["Stacked"] == ["lstm", "activation", "lstm", "linear", "activation"]
    assert ops["LastState"] == ["embedding", "lstm", "state_select", "linear", "activation"]
    g = Engine.load(out["FlatLM"][1]).graph
    assert g.output == {"value": "dec", "layout": "flat_tb"}
    assert g.node("lstm").attrs["hard_gates"] == "if"
    assert Engine.load(out["Forecaster"][1]).graph.input == {"kind": "features", "size": 5, "layout": "bt"}


def test_initial_state_given(exported):
    """run(x, state) equals model(x, hidden) for a model whose forward takes the state."""
    _, out = exported
    q, path, x, _ = out["FlatLM"]
    eng = Engine.load(path)
    torch.manual_seed(1)
    h0, c0 = torch.randn(2, 3, 16) * 0.5, torch.randn(2, 3, 16) * 0.5
    y_t, (h_t, c_t) = q(x, (h0, c0))
    y_e, st = eng.run(x.numpy(), (h0.numpy(), c0.numpy()))
    close(y_e, y_t.numpy())
    close(st.h, h_t.numpy())
    close(st.c, c_t.numpy())


def test_lm_conveniences_on_a_lowered_word_lm(tmp_path):
    from g2quant.models import LMConfig, WordLM
    torch.manual_seed(0)
    m = WordLM(LMConfig(vocab_size=40, emb_size=16, hidden_size=16, gates="gumbel")).eval()
    q = g2quant.quantize(m, bits=4)
    vocab = ["<unk>", "<eos>"] + [f"w{i}" for i in range(38)]
    eng = g2quant.load(q.export(tmp_path / "lm.g2q", vocab=vocab))
    assert isinstance(eng, Engine) and eng.is_lm
    ids = np.random.default_rng(0).integers(0, 40, 60)
    with torch.no_grad():
        logits = q(torch.as_tensor(ids[:-1, None]))[0][:, 0].numpy()
    want = torch.log_softmax(torch.as_tensor(logits), -1).numpy()[np.arange(59), ids[1:]]
    np.testing.assert_allclose(eng.score(ids), want, atol=2e-3)
    assert len(eng.generate(eng.encode("w1 w2"), 5)) == 5


def test_ids_only_artifact(tmp_path):
    q = g2quant.quantize(_model(Tagger), bits=4)
    p = q.export(tmp_path / "t.g2q")
    man = json.loads((p / "manifest.json").read_text())
    assert man["vocab"] is None and "vocab.txt" not in man["files"]
    eng = Engine.load(p)
    assert eng.vocab is None
    with pytest.raises(ValueError, match="no vocabulary"):
        eng.encode("a b")


# ---- what cannot be lowered ------------------------------------------------------------------
class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(5, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out * 2)


class MeanPool(Scaled):
    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out.mean(dim=0))


class TimeSoftmax(Scaled):
    def forward(self, x):
        out, _ = self.lstm(x)
        return torch.softmax(self.head(out), dim=0)


class WithRNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(5, 8)                 # an Elman RNN: no quantize handler, no lowering
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out)


@pytest.mark.parametrize("cls,message", [
    (Scaled, "mul"), (MeanPool, "mean"), (TimeSoftmax, "softmax over axis 0"), (WithRNN, "RNN"),
], ids=["mul", "mean", "softmax-axis", "rnn"])
def test_unsupported_wiring_raises_export_error(cls, message, tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        q = g2quant.quantize(cls().eval(), bits=4)
    if cls is WithRNN:
        assert any("'rnn' (RNN) has no quantize handler" in str(x.message) for x in w)
    with pytest.raises(ExportError, match=message):
        q.export(tmp_path / "x.g2q")
    assert not (tmp_path / "x.g2q").exists()


def test_export_refuses_nan_and_quantize_refuses_nan(tmp_path):
    m = _model(Forecaster)
    with torch.no_grad():
        m.head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'head.weight' contains NaN"):
        g2quant.quantize(m, bits=4)
    q = g2quant.quantize(_model(Forecaster), bits=4)
    with torch.no_grad():
        q.model.head.bias[0] = float("inf")
    with pytest.raises(ExportError, match="head.bias: contains NaN or infinite"):
        q.export(tmp_path / "x.g2q")


def test_hard_gates_on_untrained_gates_warn_with_the_measured_change(tmp_path):
    q = g2quant.quantize(_model(Forecaster), bits=8, hard_gates="if")
    with pytest.warns(UserWarning, match=r"hard gates change the model's output by \d+%"):
        p = q.export(tmp_path / "h.g2q")
    change = json.loads((p / "manifest.json").read_text())["validation"]["hard_gate_output_change"]
    assert change > HARD_GATE_WARN


# ---- per-layer widths ------------------------------------------------------------------------
def test_per_layer_bit_map(tmp_path):
    m = _model(Tagger)
    q = g2quant.quantize(m, bits={"lstm": 4, "out": 8, "lstm.weight_hh_l1*": 2, "emb": "ternary"})
    wq = q.model.lstm.wq
    assert wq["weight_ih_l0"].bits == 4 and wq["weight_hh_l0"].bits == 4
    assert wq["weight_hh_l1"].bits == 2 and wq["weight_hh_l1_reverse"].bits == 2   # glob on parameters
    assert wq["weight_ih_l1"].bits == 4
    assert q.model.out.wq.bits == 8 and q.model.emb.wq.scheme == "ternary"
    g = Engine.load(q.export(tmp_path / "mixed.g2q")).graph
    assert g.params["lstm.l2.w_hh"].bits == 2 and g.params["lstm.l2.w_ih"].bits == 4
    assert g.params["out.weight"].bits == 8
    assert q.size_bytes() < g2quant.quantize(m, bits=8).size_bytes()
    with pytest.raises(ValueError, match="layer_bits names 'decoder', which matches no quantized layer"):
        g2quant.quantize(m, bits=4, layer_bits={"decoder": 8})
    with pytest.raises(ValueError, match=r"layer_bits\['out'\]=9 is invalid|out.*9"):
        g2quant.quantize(m, bits=4, layer_bits={"out": 9})
    # a float (>= 16 bits) layer keeps int8 activations on both sides: export agrees with torch
    q16 = g2quant.quantize(m, bits=4, layer_bits={"out": 16})
    eng = Engine.load(q16.export(tmp_path / "f16.g2q"))
    x = torch.randint(0, 50, (7, 3))
    close(eng.run(x.numpy())[0], q16(x).detach().numpy())


# ---- the target registry ---------------------------------------------------------------------
def test_a_new_target_registers_without_touching_export(tmp_path):
    from g2quant.targets import base
    from g2quant.targets.graphio import read_graph_artifact, write_graph_artifact
    from g2quant.targets.cpu.target import CODEC
    from g2quant.targets.reference import ReferenceRuntime

    written = []

    def write(graph, path, *, vocab=None, validation=None, meta=None):
        written.append(graph)
        return write_graph_artifact(path, graph, target="dummy", codec=CODEC, vocab=vocab, validation=validation,
                                    meta=meta)

    def load(path, **options):
        return ReferenceRuntime(read_graph_artifact(path, CODEC, target="dummy")[0])

    base.register_target(base.Target("dummy", "test-only NumPy target", check=lambda g: None, write=write,
                                     load=load, size_bytes=lambda params: 123))
    try:
        q = g2quant.quantize(_model(Forecaster), bits=4)
        p = q.export(tmp_path / "d.g2q", target="dummy")
        assert written and q.size_bytes(target="dummy") == 123 + 0
        rt = g2quant.load(p)
        assert isinstance(rt, ReferenceRuntime)
        x = torch.randn(3, 7, 5)
        close(rt.run(x.numpy())[0], q(x).detach().numpy())
        with pytest.raises(ExportError, match="unknown target 'nope'; available: cpu, dummy"):
            q.export(tmp_path / "n.g2q", target="nope")
    finally:
        base.TARGETS.pop("dummy", None)


def test_export_check_rule_tolerates_one_rounding_flip_only():
    from g2quant.export import FLIP_RTOL, probes_agree
    ok, bad = AGREEMENT_RTOL / 2, AGREEMENT_RTOL * 3
    assert probes_agree([ok])
    assert probes_agree([bad, ok, ok])                      # one A8 / hard-gate flip on one input
    assert not probes_agree([bad])                          # (no other probes to look at)
    assert not probes_agree([bad, bad, ok])                 # wrong on most inputs
    assert not probes_agree([FLIP_RTOL * 2, ok, ok])        # too large for an activation-code flip
    assert probes_agree([FLIP_RTOL * 2, ok, ok], hard_gates=True)   # a hard gate flip is not bounded
    assert not probes_agree([bad, bad, ok], hard_gates=True)
    assert not probes_agree([bad, ok, float("nan")])
    assert not probes_agree([float("nan")])


@pytest.mark.parametrize("delta", [0.01, 1.0])
def test_export_refuses_a_graph_that_does_not_reproduce_the_model(tmp_path, monkeypatch, delta):
    """A decoder bias off by ``delta`` differs on every probe: refused, nothing written."""
    import g2quant.export as ex
    from g2quant.models import LMConfig, WordLM
    torch.manual_seed(0)
    q = g2quant.quantize(WordLM(LMConfig(vocab_size=50, emb_size=16, hidden_size=16)).eval(), bits=4)
    orig = ex.lower

    def broken(model, example=None):
        graph, x, y = orig(model, example)
        lin = next(n for n in graph.nodes if n.op == "linear")
        graph.params[lin.params["bias"]] = graph.params[lin.params["bias"]] + np.float32(delta)
        return graph, x, y
    monkeypatch.setattr(ex, "lower", broken)
    with pytest.raises(ExportError, match="does not reproduce the model"):
        q.export(tmp_path / "bad.g2q")
    assert not (tmp_path / "bad.g2q").exists() and not list(tmp_path.iterdir())
