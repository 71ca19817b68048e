"""The ``gpu-fp16`` target's Triton kernels, run on CPU tensors by Triton's interpreter.

Tolerance: the GPU path feeds fp16 activations (not int8) into the dot products of exactly
dequantized weights, so it is compared with the NumPy reference of the same graph with activation
quantization off: ``max|Δ| ≤ 2e-3 · max(1, max|y|)`` (fp16 rounding of activations; seen ≤ 7e-5).
"""
import copy
import os
import warnings

# TRITON_INTERPRET=1 is set by conftest.py (before triton is first imported) unless G2QUANT_TEST_CUDA=1

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

import g2quant  # noqa: E402
from g2quant.lower import example_input  # noqa: E402
from g2quant.targets.gpu_fp16 import kernels as K  # noqa: E402
from g2quant.targets.reference import ReferenceRuntime  # noqa: E402

from test_lowering import SHAPES, _model  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs a CUDA device or TRITON_INTERPRET=1")
DEVICE = "cuda" if (torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1") else "cpu"


def _close(got, want, tol=2e-3):
    assert got.shape == want.shape
    assert float(np.abs(got - want).max()) <= tol * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("bw", [1, 2, 4, 8])
def test_words_round_trip_and_qlinear_is_the_integer_product(bw):
    rng = np.random.default_rng(bw)
    qmax = 1 if bw <= 2 else 2 ** (bw - 1) - 1
    q = rng.integers(-qmax, qmax + 1, (37, 45)).astype(np.int8)
    if bw == 1:
        q = np.where(q >= 0, 1, -1).astype(np.int8)
    q[0, :] = qmax                                   # extreme codes
    q[1, :] = -qmax
    words = K.pack_words(q, bw)
    np.testing.assert_array_equal(K.unpack_words(words, 45, bw), q)
    s = rng.uniform(0.5, 2, 37).astype(np.float32)
    m = K.GMatrix(torch.as_tensor(words, device=DEVICE), torch.as_tensor(s, device=DEVICE), 37, 45, bw)
    x = torch.randn(5, 45)
    b = torch.randn(37)
    y = K.qlinear(m, x.to(DEVICE), b.to(DEVICE)).cpu()
    want = (x.half().float() @ torch.as_tensor(q, dtype=torch.float32).t()) * torch.as_tensor(s) + b
    _close(y.numpy(), want.numpy(), 1e-5)


@pytest.mark.parametrize("cls", SHAPES, ids=lambda c: c.__name__)
def test_gpu_artifact_equals_the_reference_with_fp16_activations(cls, tmp_path):
    q = g2quant.quantize(_model(cls), bits=4, hard_gates="if" if cls.__name__ != "Stacked" else "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = q.export(tmp_path / "m.g2q", target="gpu-fp16")
    rt = g2quant.load(p, device=DEVICE)
    g = copy.deepcopy(rt.graph)
    for n in g.nodes:
        if "act_bits" in n.attrs:
            n.attrs["act_bits"] = None
    x = example_input(q.model).numpy()
    y, state = rt.run(x)
    want, _ = ReferenceRuntime(g).run(x)
    _close(y, want)
    if rt.streamable:
        xs = x if not rt.batch_first else x.swapaxes(0, 1)
        st = rt.initial_state(xs.shape[1])
        for t in range(xs.shape[0]):
            yt, st = rt.step(xs[t], st)
        for a, b in zip(st, state):
            for u, v in zip(a, b):
                _close(u, v, 1e-5)


def test_gpu_size_is_packed():
    q = g2quant.quantize(_model(SHAPES[0]), bits=2)
    assert q.size_bytes(target="gpu-fp16") < q.float_size_bytes() / 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_requested_without_a_device_is_a_clear_error():
    from g2quant.lower import lower
    from g2quant.targets.gpu_fp16.runtime import GpuRuntime
    q = g2quant.quantize(_model(SHAPES[0]), bits=4)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        GpuRuntime(lower(q)[0], device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="the CUDA-graph runner needs a CUDA device (run with G2QUANT_TEST_CUDA=1 on a GPU machine)")
def test_cuda_graph_streaming_equals_launched_kernels(tmp_path):
    q = g2quant.quantize(_model(SHAPES[3]), bits=4, hard_gates="if")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = q.export(tmp_path / "m.g2q", target="gpu-fp16")
    graphed, plain = g2quant.load(p, device="cuda"), g2quant.load(p, device="cuda", cuda_graphs=False)
    xs = np.random.default_rng(0).integers(0, 50, (12, 2))
    s1, s2 = graphed.initial_state(2), plain.initial_state(2)
    for t in range(xs.shape[0]):
        y1, s1 = graphed.step(xs[t], s1)
        y2, s2 = plain.step(xs[t], s2)
        _close(y1, y2, 1e-5)


@pytest.mark.parametrize("hard", ["", "rz"])
def test_gru_models_on_the_gpu_target(hard, tmp_path):
    from test_g2gru import GRUClassifier, GRUTagger
    for cls in (GRUTagger, GRUClassifier):
        torch.manual_seed(0)
        q = g2quant.quantize(cls().eval(), bits=4, hard_gates=hard if cls is GRUTagger else "")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = q.export(tmp_path / f"{cls.__name__}.g2q", target="gpu-fp16")
        rt = g2quant.load(p, device=DEVICE)
        g = copy.deepcopy(rt.graph)
        for n in g.nodes:
            if "act_bits" in n.attrs:
                n.attrs["act_bits"] = None
        x = example_input(q.model).numpy()
        y, state = rt.run(x)
        _close(y, ReferenceRuntime(g).run(x)[0])
        if rt.streamable:
            st = rt.initial_state(x.shape[1])
            for t in range(x.shape[0]):
                _, st = rt.step(x[t], st)
            _close(st.h, state.h, 1e-5)
