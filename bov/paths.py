"""Where run state lives: `runs/` by default, moved wholesale by BOV_RUNS_DIR (caches alone by BOV_CACHE_DIR)."""

from __future__ import annotations

import os
from pathlib import Path


class StateDirError(ValueError):
    """The runs or cache dir cannot be made or written; `bov` says so in one line (bov.cli.main)."""


def _make(path: Path, key: str) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(f"not writable: {path}")
    except OSError as e:
        raise StateDirError(f"{key}: cannot use {path} for run state ({type(e).__name__}: {e.strerror or e})") from None
    return path


def runs_dir() -> Path:
    return _make(Path(os.environ.get("BOV_RUNS_DIR", "runs")).expanduser().resolve(), "BOV_RUNS_DIR")


def cache_dir(name: str) -> Path:
    """Tokenizers and token streams: `<runs>/cache`, or BOV_CACHE_DIR (e.g. one cache shared by many runs dirs)."""
    root = os.environ.get("BOV_CACHE_DIR")
    if root:
        return _make(Path(root).expanduser().resolve() / name, "BOV_CACHE_DIR")
    return _make(runs_dir() / "cache" / name, "BOV_RUNS_DIR")


def tracking_uri(explicit: str | None = None) -> str:
    """MLflow store: an explicit URI, else MLFLOW_TRACKING_URI, else SQLite under the runs dir."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{runs_dir() / 'mlflow.db'}"
