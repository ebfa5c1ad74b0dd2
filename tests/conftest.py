"""Test-wide settings: everything runs offline (no Hub, W&B in offline mode) on the shared corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_SHAKESPEARE = Path(
    os.environ.get("ALTGRAD_TINYSHAKESPEARE", REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt")
)
os.environ.setdefault("ALTGRAD_TINYSHAKESPEARE", str(TINY_SHAKESPEARE))


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    if not TINY_SHAKESPEARE.is_file():
        pytest.fail(f"Tiny Shakespeare not found at {TINY_SHAKESPEARE}; set ALTGRAD_TINYSHAKESPEARE")
    return TINY_SHAKESPEARE
