"""Shared test setup: offline hub, the repository root on sys.path, tiny SD and SDXL pipeline folders."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pytest  # noqa: E402

# The documentation: every command in it is checked against its script (test_readme.py)
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]

# The official MNIST test split (MD5-checked by the tests); tests that need it skip without it.
MNIST_DIR = Path(os.environ.get("RANDCOND_MNIST_DIR", ROOT / "data" / "mnist"))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny SD-v1-shaped pipeline folder (same block types as SD v1.4, tiny widths), built once."""
    from tiny_sd import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL-shaped pipeline folder (SDXL base 1.0's topology, two text encoders), built once."""
    from tiny_sdxl import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))
