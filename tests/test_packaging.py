"""The runtime-only install (``pip install g2quant``: numpy, numba, llvmlite, safetensors; no torch)
loads and runs artifacts made by the full install, through the API and the CLI.

CI (``.ci/run``) builds that install in a fresh venv and points ``G2QUANT_RUNTIME_PYTHON`` at its
interpreter; without it the test is skipped.
"""
import json
import os
import subprocess

import numpy as np
import pytest
import torch

import g2quant

RUNTIME_PYTHON = os.environ.get("G2QUANT_RUNTIME_PYTHON")

SCRIPT = """
import importlib.util, json, sys
import numpy as np
assert importlib.util.find_spec('torch') is None, 'torch is installed in the runtime-only venv'
import g2quant
eng = g2quant.load(sys.argv[1])
y, state = eng.run(np.load(sys.argv[2]))
print(json.dumps({'err': float(np.abs(y - np.load(sys.argv[3])).max()), 'loop': eng.loop}))
"""


@pytest.mark.skipif(not RUNTIME_PYTHON, reason="G2QUANT_RUNTIME_PYTHON is not set (.ci/run sets it)")
def test_runtime_only_install_runs_artifacts(tmp_path):
    from torch import nn

    class Forecaster(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 12, batch_first=True)
            self.head = nn.Linear(12, 2)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    torch.manual_seed(0)
    q = g2quant.quantize(Forecaster().eval(), bits=4)
    art = q.export(tmp_path / "f.g2q")
    x = torch.randn(3, 9, 4)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", q(x).detach().numpy())
    r = subprocess.run([RUNTIME_PYTHON, "-c", SCRIPT, str(art), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["err"] <= 2e-3 * max(1.0, float(np.abs(np.load(tmp_path / "y.npy")).max()))
    # the CLI of the runtime-only install (run outside the checkout, whose g2quant/ lacks the mapped targets/)
    r = subprocess.run([RUNTIME_PYTHON, "-m", "g2quant", "run", str(art), "--input", str(tmp_path / "x.npy"),
                        "--output", str(tmp_path / "y2.npy"), "-q"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y2.npy"), np.load(tmp_path / "y.npy"), atol=2e-3)
    r = subprocess.run([RUNTIME_PYTHON, "-m", "g2quant", "info", str(art)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and "lstm" in r.stdout, r.stderr
