"""The ``onnx`` target: every model shape exported for onnxruntime equals the torch quantized model
(tolerance as export's agreement check), streaming ``step.onnx`` equals ``model.onnx``, sizes."""
import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import g2quant  # noqa: E402
from g2quant.export import AGREEMENT_RTOL  # noqa: E402
from g2quant.lower import example_input  # noqa: E402
from g2quant.targets.onnx.target import OnnxRuntime  # noqa: E402

from test_lowering import SHAPES, _model  # noqa: E402


def _close(got, want):
    assert got.shape == want.shape
    assert float(np.abs(got - want).max()) <= AGREEMENT_RTOL * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("cls", SHAPES, ids=lambda c: c.__name__)
def test_onnx_artifact_equals_torch(cls, tmp_path):
    q = g2quant.quantize(_model(cls), bits=4, hard_gates="if" if cls.__name__ != "Stacked" else "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = q.export(tmp_path / "m.g2q", target="onnx")
    rt = g2quant.load(p)
    assert isinstance(rt, OnnxRuntime)
    x = example_input(q.model)
    x = torch.randint(0, 30, x.shape) if not torch.is_floating_point(x) else torch.randn(x.shape)
    y = q(x)
    y = (y[0] if isinstance(y, tuple) else y).detach().numpy()
    got, state = rt.run(x.numpy())
    _close(got, y)
    man = json.loads((p / "manifest.json").read_text())
    assert man["onnx"]["model"] == "model.onnx" and (man["onnx"]["step"] is not None) == rt.streamable
    import onnx
    for f in ("model.onnx", "step.onnx") if rt.streamable else ("model.onnx",):
        m = onnx.load(str(p / f))
        onnx.checker.check_model(m)
        assert len(m.graph.node) >= 3 * len(rt.graph.nodes)        # never an empty or trivial graph
    if rt.streamable:                                  # step.onnx, one step at a time, equals model.onnx
        xs = x.numpy() if not rt.batch_first else x.numpy().swapaxes(0, 1)
        st = rt.initial_state(xs.shape[1])
        for t in range(xs.shape[0]):
            yt, st = rt.step(xs[t], st)
        for a, b in zip(st, state):
            for u, v in zip(a, b):
                _close(u, v)


def test_onnx_weights_are_int4_and_the_artifact_is_small(tmp_path):
    import onnx
    from onnx import TensorProto
    torch.manual_seed(0)
    m = _BigTagger().eval()                             # big enough that the weights dominate
    q = g2quant.quantize(m, bits=4)
    p = q.export(tmp_path / "t.g2q", target="onnx")
    model = onnx.load(str(p / "model.onnx"))
    types = {i.data_type for i in model.graph.initializer if len(i.dims) == 2}
    assert TensorProto.INT4 in types
    fp32 = 4 * sum(t.numel() for t in m.parameters())
    assert (p / "model.onnx").stat().st_size < fp32 / 6      # 4-bit + row scales, about 1/8
    assert q.size_bytes(target="onnx") < q.size_bytes(target="cpu") * 1.2


class _BigTagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(300, 96)
        self.lstm = torch.nn.LSTM(96, 96, num_layers=2)
        self.out = torch.nn.Linear(96, 300)

    def forward(self, x):
        return self.out(self.lstm(self.emb(x))[0])


def test_eight_bit_layers_use_int8(tmp_path):
    import onnx
    from onnx import TensorProto
    q = g2quant.quantize(_model(SHAPES[0]), bits={"lstm": 8, "head": 4})
    p = q.export(tmp_path / "f.g2q", target="onnx")
    types = [i.data_type for i in onnx.load(str(p / "model.onnx")).graph.initializer if len(i.dims) == 2]
    assert TensorProto.INT8 in types and TensorProto.INT4 in types


@pytest.mark.parametrize("bits", [4, 2, "ternary", "binary"])
def test_matmulnbits_weights_equal_torch(bits, tmp_path):
    """``weights="nbits"``: com.microsoft.MatMulNBits with exactly dequantized weights."""
    import onnx
    q = g2quant.quantize(_model(SHAPES[3]), bits=bits)                # the flattened-output LM
    p = q.export(tmp_path / "n.g2q", target="onnx", weights="nbits")
    ops = {n.op_type for n in onnx.load(str(p / "model.onnx")).graph.node}
    assert "MatMulNBits" in ops
    x = torch.randint(0, 50, (7, 3))
    _close(g2quant.load(p).run(x.numpy())[0], q(x)[0].detach().numpy())
    with pytest.raises(Exception, match="weights must be one of"):
        q.export(tmp_path / "bad.g2q", target="onnx", weights="int3")
