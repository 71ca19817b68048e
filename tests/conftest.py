import os
from pathlib import Path

import pytest

DATA = os.environ.get("G2QUANT_DATA")


@pytest.fixture
def data_root() -> Path:
    """The shared data folder ($G2QUANT_DATA); tests using it skip only when it is unset."""
    if not DATA:
        pytest.skip("G2QUANT_DATA is not set")
    return Path(DATA)
