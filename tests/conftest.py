"""Shared test fixtures."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("SPML_GOLDEN_DIR", REPO.parent / "shared" / "spec" / "golden"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def load_golden(name: str) -> dict[str, np.ndarray]:
    """Arrays of one golden case (``shared/spec/golden/<name>.npz``), skipping if absent."""
    path = GOLDEN_DIR / f"{name}.npz"
    if not path.is_file():
        pytest.skip(f"golden vectors not found at {path} (set SPML_GOLDEN_DIR)")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture
def golden():
    return load_golden


@pytest.fixture
def golden_compare():
    """The comparison module shipped with the golden vectors (``compare.py``)."""
    if not (GOLDEN_DIR / "compare.py").is_file():
        pytest.skip(f"golden vectors not found at {GOLDEN_DIR}")
    sys.path.insert(0, str(GOLDEN_DIR))
    try:
        import compare  # type: ignore
    finally:
        sys.path.pop(0)
    return compare
