"""What every `bov` command shares: the preset/variant/--set options, the one-line failure, and the checks of a
store, a device and checkpoints that end a command in one line (exit 2)."""

from __future__ import annotations

from pathlib import Path

import typer

from bov.config import ConfigError, load_config

PRESET = typer.Option("tiny", "--preset", "-p", help="scale preset: micro, tiny, 135m, 780m, or a YAML path")
VARIANT = typer.Option("baseline", "--variant", "-v", help="named variant (see `bov presets`) or a YAML path")
SET = typer.Option(None, "--set", "-s", help="dotted override, e.g. model.bank_layers=every_other (repeatable)")


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_or_exit(preset: str, variant: str | None, overrides: list[str] | None):
    try:
        return load_config(preset, variant, overrides or [])
    except ConfigError as e:
        fail(str(e))


def store() -> str:
    """The MLflow store this command reads or writes, checked first: a damaged, foreign or other-version store
    is one line (StoreError, bov.cli.main)."""
    from bov.paths import tracking_uri
    from bov.mlflow_store import check_tracking_uri

    uri = tracking_uri()
    check_tracking_uri(uri)
    return uri


def device_or_exit(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] not in ("cpu", "cuda"):
        fail(f"--device {device!r}: auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device}: no CUDA device on this machine (use --device cpu)")
    return device


def checkpoints_or_exit(checkpoint: list[Path] | None, study: list[str] | None, uri: str) -> list[tuple[Path, str | None]]:
    from bov.evaluate import find_checkpoints

    try:
        return find_checkpoints(checkpoint, study, uri)
    except ValueError as e:
        fail(str(e))
