"""Where run state lives: `runs/` by default, moved wholesale by BOV_RUNS_DIR (caches alone by BOV_CACHE_DIR)."""

from __future__ import annotations

import os
from pathlib import Path


def runs_dir() -> Path:
    path = Path(os.environ.get("BOV_RUNS_DIR", "runs")).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(name: str) -> Path:
    """Tokenizers and token streams: `<runs>/cache`, or BOV_CACHE_DIR (e.g. one cache shared by many runs dirs)."""
    root = os.environ.get("BOV_CACHE_DIR")
    path = (Path(root).expanduser().resolve() if root else runs_dir() / "cache") / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def tracking_uri(explicit: str | None = None) -> str:
    """MLflow store: an explicit URI, else MLFLOW_TRACKING_URI, else SQLite under the runs dir."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{runs_dir() / 'mlflow.db'}"
