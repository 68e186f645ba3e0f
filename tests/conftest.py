"""Shared fixtures: real corpora paths (skipped cleanly when absent) and model builders."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from bov.config import VARIANT_ORDER, load_config
from bov.model import build_model

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

VARIANTS = list(VARIANT_ORDER)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(False)


def sigint_default() -> None:
    """In a child process: take SIGINT as a terminal delivers it. A suite started as a background job of a
    non-interactive shell inherits SIGINT ignored (POSIX), and Python then keeps ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def make(variant: str | None = "baseline", preset: str = "micro", seed: int = 0, **overrides):
    """Build a model for a preset/variant with dotted overrides, after torch.manual_seed(seed)."""
    cfg = load_config(preset, variant, {k.replace("__", "."): v for k, v in overrides.items()})
    torch.manual_seed(seed)
    return build_model(cfg.model), cfg


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A fresh runs dir (MLflow, Optuna, caches) for the test, the embedded MLflow store, no progress bars."""
    monkeypatch.setenv("BOV_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("BOV_PROGRESS", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "runs"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present on this machine")
    return SHARED_DATA
