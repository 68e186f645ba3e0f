"""The SLURM templates under examples/slurm, dry-run (BOV_DRY_RUN=1): the command line and environment each
task would run, and Lightning reading SLURM's variables the way the training script sets devices and nodes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SLURM = Path(__file__).resolve().parent.parent / "examples" / "slurm"
STORE = {"BOV_OPTUNA_STORAGE": "postgresql://bov:secret@db-host/optuna", "MLFLOW_TRACKING_URI": "http://mlflow-host:5000"}


def dry_run(script: str, tmp_path: Path, **env) -> tuple[list[str], dict[str, str]]:
    """(the command the script would run, last first; the BOV_/MLFLOW_ environment it prints)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "BOV_", "MLFLOW_"))}
    done = subprocess.run(["bash", str(SLURM / script)], env={**clean, "BOV_DRY_RUN": "1", **env}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    shown = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith(("srun ", "bov ")))
    return [line for line in lines if line.startswith(("srun ", "bov "))], shown


@pytest.mark.parametrize("task", [0, 5])
def test_every_array_task_is_one_sweep_worker_on_the_shared_stores(tmp_path, task):
    cmds, env = dry_run("sweep_array.sbatch", tmp_path, STUDY="bank_layers_wikipedia", SLURM_ARRAY_JOB_ID="77",
                        SLURM_ARRAY_TASK_ID=str(task), **STORE)
    assert cmds == ["srun bov sweep bank_layers_wikipedia --workers 1"]
    assert env["BOV_OPTUNA_STORAGE"] == STORE["BOV_OPTUNA_STORAGE"] and env["MLFLOW_TRACKING_URI"] == STORE["MLFLOW_TRACKING_URI"]
    assert env["BOV_RUNS_DIR"] == str(tmp_path / "runs" / "slurm-77" / f"worker-{task}")  # its own checkpoints
    assert env["BOV_CACHE_DIR"] == str(tmp_path / "runs" / "cache")  # the one prepare.sbatch filled


@pytest.mark.parametrize("missing", ["STUDY", "BOV_OPTUNA_STORAGE", "MLFLOW_TRACKING_URI"])
def test_a_sweep_array_without_its_study_or_stores_stops_naming_what_is_missing(tmp_path, missing):
    env = {"STUDY": "bank_layers_wikipedia", **STORE}
    env.pop(missing)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "BOV_", "MLFLOW_"))}
    done = subprocess.run(["bash", str(SLURM / "sweep_array.sbatch")], env={**clean, "BOV_DRY_RUN": "1", **env},
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and f"{missing}: set {missing}" in done.stderr and not done.stdout


def test_prepare_tokenizes_the_study_once_and_caches_the_tasks(tmp_path):
    cmds, env = dry_run("prepare.sbatch", tmp_path, STUDY="bank_layers_wikipedia", TASKS="core")
    assert cmds == ["bov prepare --study bank_layers_wikipedia", "bov prepare --tasks core"]
    assert env["BOV_CACHE_DIR"] == str(tmp_path / "runs" / "cache")
    cmds, _ = dry_run("prepare.sbatch", tmp_path, PRESET="tiny", VARIANT="baseline")
    assert cmds == ["bov prepare --preset tiny --variant baseline"]


SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "bov-train", "SLURM_NNODES": "2",
             "SLURM_NTASKS_PER_NODE": "4", "SLURM_NTASKS": "8", "SLURM_NODELIST": "gpu[017-018]"}


def test_ddp_training_spans_the_nodes_and_every_rank_reads_its_place(tmp_path, monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from bov.config import load_config

    cmds, env = dry_run("train_ddp.sbatch", tmp_path, PRESET="tiny", VARIANT="bov", **SLURM_JOB,
                        MLFLOW_TRACKING_URI=STORE["MLFLOW_TRACKING_URI"])
    assert cmds == ["srun bov train --preset tiny --variant bov --set train.devices=4 --set train.num_nodes=2 "
                    "--set train.strategy=ddp"]
    cfg = load_config("tiny", "bov", ["train.devices=4", "train.num_nodes=2", "train.strategy=ddp"])
    ports = set()
    for rank in range(8):  # what srun gives each of the 8 tasks
        for k, v in {**SLURM_JOB, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % 4),
                     "SLURM_NODEID": str(rank // 4)}.items():
            monkeypatch.setenv(k, v)
        assert SLURMEnvironment.detect()
        slurm = SLURMEnvironment()
        assert (slurm.world_size(), slurm.global_rank(), slurm.local_rank(), slurm.node_rank()) == (8, rank, rank % 4, rank // 4)
        assert slurm.main_address == "gpu017"  # every rank meets rank 0 on the first node
        ports.add(slurm.main_port)
        slurm.validate_settings(num_devices=cfg.train.devices, num_nodes=cfg.train.num_nodes)  # what Lightning checks
    assert len(ports) == 1  # one port, from the job id
    with pytest.raises(ValueError, match="HINT: Set `devices=4`"):  # a mismatch is refused by Lightning itself
        SLURMEnvironment().validate_settings(num_devices=2, num_nodes=2)


def test_ddp_training_outside_sbatch_stops(tmp_path):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "BOV_", "MLFLOW_"))}
    done = subprocess.run(["bash", str(SLURM / "train_ddp.sbatch")], cwd=tmp_path, capture_output=True, text=True,
                          env={**clean, "BOV_DRY_RUN": "1", "MLFLOW_TRACKING_URI": "http://x:5000"}, timeout=60)
    assert done.returncode != 0 and "SLURM_NNODES: run under sbatch" in done.stderr
