import os

# the gpu-fp16 kernels are tested in Triton's interpreter on CPU tensors unless G2QUANT_TEST_CUDA=1
# (set before anything imports triton: it reads the variable once)
if os.environ.get("G2QUANT_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

DATA = os.environ.get("G2QUANT_DATA")


@pytest.fixture
def data_root() -> Path:
    """The shared data folder ($G2QUANT_DATA); tests using it skip only when it is unset."""
    if not DATA:
        pytest.skip("G2QUANT_DATA is not set")
    return Path(DATA)
