import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture
def config(tmp_path):
    """A small DRAM-only store: fast and needs no daemons."""
    path = tmp_path / "spillway.toml"
    path.write_text('slot-size = "4k"\nmax-page-size = "256k"\n[[tier]]\nkind = "dram"\ncapacity = "16m"\n')
    return str(path)
