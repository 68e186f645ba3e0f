"""What a run or a study is refused for before any data is built or compute spent, in one place: its data
sources and vocabulary, the compiler `train.compile` needs, Lightning's reading of the trainer settings, and
the tracking store. `bov train` runs `run(cfg)`; `bov.sweep.run_sweep` runs `study(sweep)` (each distinct
setting once, a failure naming the study file and level). Every refusal is one line (ValueError, DataError,
ConfigError)."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch

from bov.config import ConfigError, ExperimentConfig
from bov.paths import tracking_uri
from bov.sources import check_source, check_vocab
from bov.mlflow_store import check_tracking_uri
from bov.train import precision


def run(cfg: ExperimentConfig) -> None:
    """One training run's checks, in the order a user fixes them."""
    check_source(cfg.data)
    check_vocab(cfg)
    check_compile(cfg)
    check_trainer(cfg)
    check_tracking_uri(tracking_uri(cfg.tracking.tracking_uri))


def study(sweep) -> None:
    """A study's checks: every distinct data setting and trainer setting once, every cell's compile setting."""
    for data in {c.cfg.data.model_dump_json(): c.cfg.data for c in sweep.cells}.values():
        check_source(data)
    trainers: set[tuple] = set()
    for c in sweep.cells:
        t = c.cfg.train
        trainer = (str(t.devices), t.strategy, t.num_nodes, t.precision)
        try:
            check_compile(c.cfg)
            if trainer not in trainers:  # Lightning's own reading of them, once per distinct setting
                check_trainer(c.cfg)
                trainers.add(trainer)
        except ValueError as e:
            raise ConfigError(f"{sweep.path}: level {c.level}: {e}") from None
    check_tracking_uri(tracking_uri(sweep.cells[0].cfg.tracking.tracking_uri))


def check_compile(cfg: ExperimentConfig) -> None:
    """train.compile off a GPU compiles C++ kernels: fail in one line, before any compute, without a compiler."""
    import shutil

    if not cfg.train.compile or torch.cuda.is_available():
        return
    compilers = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    if not any(shutil.which(c) for c in compilers):
        raise ValueError(f"train.compile: compiling for the CPU needs a C++ compiler ({' / '.join(compilers)} not "
                         "found); install one, or set train.compile=false")


def check_trainer(cfg: ExperimentConfig) -> None:
    """train.strategy, devices, num_nodes and precision as Lightning reads them, before any data or compute."""
    import logging

    quiet = logging.getLogger("lightning.pytorch")
    level, quiet.level = quiet.level, logging.WARNING  # no "GPU available" lines for a dry construction
    try:
        pl.Trainer(accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=cfg.train.devices,
                   num_nodes=cfg.train.num_nodes, strategy=cfg.train.strategy, precision=precision(cfg),
                   logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    except Exception as e:
        raise ValueError(f"train.strategy {cfg.train.strategy!r} / train.devices {cfg.train.devices!r}: "
                         f"{str(e).strip().splitlines()[0][:240]}") from None
    finally:
        quiet.level = level
