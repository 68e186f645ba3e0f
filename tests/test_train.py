"""Training: budgets, schedule, MLflow tracking, exact resume after SIGKILL, failures, DDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest

from bov.config import load_config
from bov.model import build_model
from bov.budget import plan_budget
from bov.litmodule import lr_factor
from bov.train import run_training
from conftest import sigint_default

BOV = [sys.executable, "-m", "bov.cli"]


def env_with(runs_dir: Path) -> dict:
    env = dict(os.environ, BOV_RUNS_DIR=str(runs_dir), BOV_PROGRESS="0")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_flops_budget_gives_cheaper_variants_more_tokens():
    over = {"train.max_steps": None, "train.max_flops": 3e12}
    base = load_config("micro", "baseline", over)
    bov = load_config("micro", "bov", over)
    fb, fv = build_model(base.model).flops_per_token(), build_model(bov.model).flops_per_token()
    b1, b2 = plan_budget(base, fb), plan_budget(bov, fv)
    assert b2.tokens > b1.tokens and b1.flops <= 3e12 and b2.flops <= 3e12
    assert b1.steps == int(3e12 / fb) // (4 * 64)
    tok = plan_budget(load_config("micro", "bov", {"train.max_steps": None, "train.max_tokens": 2560}), fv)
    assert tok.steps == 10


def test_wsd_schedule_shape():
    t = load_config("micro", "bov", {"train.warmup_steps": 10, "train.decay_start": 0.65, "train.final_lr_frac": 0.05}).train
    f = [lr_factor(s, 100, t) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[64] == 1.0
    assert f[99] == pytest.approx(1 - 0.95 * 34 / 35) and all(a >= b for a, b in zip(f[10:], f[11:]))


def test_coefficient_metric_names_are_made_and_read_in_one_place():
    from bov.model import build_model
    from bov.tracking import COEFF_METRIC, coeff_metric

    assert COEFF_METRIC.match(coeff_metric(4, "b")).groups() == ("04", "b", None)
    assert COEFF_METRIC.match(coeff_metric(12, "a", 3)).groups() == ("12", "a", "3")
    model = build_model(load_config("micro", "bov", {"model.value_coeff": "learned_per_head"}).model)
    keys = model.value_coefficients()
    assert keys and all(COEFF_METRIC.match(coeff_metric(*k)) for k in keys)
    assert {k[2] for k in keys} == set(range(model.blocks[-1].attn.mix.b.numel()))  # one per head


def test_a_run_is_named_by_what_it_is():
    from bov.tracking import run_name

    cfg = load_config("micro", "bov", {"model.bank_layers": "all", "train.seed": 1, "data.source": "/x/y/text.txt",
                                       "tracking.log_every": 3})
    assert run_name(cfg) == "micro/bov model.bank_layers=all data.source=text.txt train.seed=1"
    assert run_name(cfg, {"bov.level": "all", "bov.seed": "1"}) == "all s1"  # a sweep cell
    named = load_config("micro", "bov", {"tracking.run_name": "mine"})
    assert run_name(named, {"bov.level": "all", "bov.seed": "1"}) == "mine"


def test_train_logs_everything_to_mlflow(runs):
    cfg = load_config("micro", "bov_add", {"train.max_steps": 20, "tracking.log_every": 5})
    s = run_training(cfg, log=lambda m: None)
    assert s["status"] == "FINISHED" and s["steps"] == 20 and s["tokens"] == 20 * 4 * 64
    assert 0 < s["val_bpb"] < 10 and s["val_loss"] > 0
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    run = client.get_run(s["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["variant"] == "bov_add" and run.data.tags["preset"] == "micro"
    assert {"git_commit", "config_hash", "data_fingerprint", "seed"} <= set(run.data.tags)
    assert run.data.params["model.bank_layers"] == "last_third"
    # what the MLflow UI lists: a name saying what the run is, the settings chosen (none unset), what the setup
    # derived as one `setup/` metrics section, the layers that hold a bank, no system/* metrics unless asked
    assert run.info.run_name == "micro/bov_add"  # train.max_steps=20 is micro's own
    assert "None" not in run.data.params.values() and "train.max_flops" not in run.data.params
    assert not [k for k in run.data.params if k.startswith(("budget.", "params.", "regime."))]
    assert run.data.metrics["setup/budget.tokens"] == 20 * 4 * 64 and run.data.metrics["setup/params.bank"] > 0
    assert run.data.tags["bov.bank_layers"] == "2,3" == run.data.tags["bov.target_layers"]
    assert not [k for k in run.data.metrics if k.startswith("system/")]
    m = run.data.metrics
    for key in ("train/loss", "val/loss", "val/bpb", "lr/matrix", "lr/bank", "lr/scalar", "tokens", "flops",
                "throughput/tokens_per_s", "coeff/layer02/a", "coeff/layer03/b"):
        assert key in m, key
    hist = client.get_metric_history(s["run_id"], "train/loss")
    assert [h.step for h in hist] == [5, 10, 15, 20]
    arts = {a.path for a in client.list_artifacts(s["run_id"])}
    assert {"config.yaml", "final_metrics.json"} <= arts
    assert (runs / "artifacts").is_dir() and run.info.artifact_uri.startswith((runs / "artifacts").as_uri())


def test_last_checkpoint_holds_the_trained_model_when_the_budget_is_no_multiple_of_the_save_interval(runs):
    """eval, probe, generate and lm-eval read last.ckpt: it must be the model the run's metrics describe."""
    import torch

    from bov.infer import load_checkpoint

    cfg = load_config("micro", "bov", {"train.max_steps": 23, "train.ckpt_every": 10})
    s = run_training(cfg, log=lambda m: None)
    (ckpt,) = runs.glob("train/*/last.ckpt")
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == s["steps"] == 23
    model = load_checkpoint(ckpt).model
    with torch.no_grad():
        assert float(sum(p.double().sum() for p in model.parameters())) == pytest.approx(s["param_checksum"], rel=1e-12)


def test_resume_after_sigkill_is_exact(tmp_path):
    args = ["train", "-p", "micro", "-v", "bov", "--set", "train.max_steps=60", "--set", "train.ckpt_every=30",
            "--set", "train.val_every=30", "--json"]
    straight = subprocess.run(BOV + args, env=env_with(tmp_path / "a"), capture_output=True, text=True, check=True)
    ref = json.loads(straight.stdout.strip().splitlines()[-1])

    runs = tmp_path / "b"
    proc = subprocess.Popen(BOV + args, env=env_with(runs), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (found := list(runs.glob("train/*/last.ckpt"))):  # first written at step 30, atomically
        assert proc.poll() is None, "training ended before the first checkpoint"
        assert time.time() - t0 < 180
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run_dir = found[0].parent
    assert not (run_dir / "final_metrics.json").exists()  # killed mid-run
    killed_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    assert client.get_run(killed_id).info.status == "RUNNING"  # what SIGKILL leaves; resume repairs it

    resumed = subprocess.run(BOV + args + ["--resume"], env=env_with(runs), capture_output=True, text=True, check=True)
    out = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert out["run_id"] == killed_id and out["status"] == "FINISHED" and out["steps"] == 60
    assert abs(out["train_loss"] - ref["train_loss"]) < 1e-6
    assert abs(out["val_loss"] - ref["val_loss"]) < 1e-6
    assert client.get_run(killed_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("bov").experiment_id])) == 1


def test_divergence_fails_cleanly(runs):
    cfg = load_config("micro", "baseline", {"train.max_steps": 30, "train.lr_matrix": 1e30, "train.lr_unembedding": 1e30,
                                            "train.lr_embedding": 1e30, "train.grad_clip": None, "tracking.log_every": 1,
                                            "train.optimizer": "adamw", "train.warmup_steps": 0})
    from bov.litmodule import Diverged

    with pytest.raises(Diverged, match="train loss is nan"):
        run_training(cfg, log=lambda m: None)
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("bov").experiment_id])
    assert run.info.status == "FAILED" and "train loss is nan" in run.data.tags["error"]


def test_cli_bad_input_one_line(tmp_path):
    env = env_with(tmp_path)
    r = subprocess.run(BOV + ["train", "-p", "micro", "--set", "data.source=/no/such/file.jsonl"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: data.source: no file matches '/no/such/file.jsonl'"
    r = subprocess.run(BOV + ["train", "-p", "micro", "--set", "model.bank_layers=last_quarter"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "model.bank_layers: unknown level" in r.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing started


@pytest.mark.parametrize("optimizer", ["muon", "normuon"])
def test_muon_recipe_trains(runs, optimizer):
    cfg = load_config("micro", "bov", {"train.max_steps": 10, "train.optimizer": optimizer, "train.lr_matrix": 0.02,
                                       "train.grad_accum": 2})
    s = run_training(cfg, log=lambda m: None)
    assert s["status"] == "FINISHED" and s["steps"] == 10 and s["tokens"] == 10 * 2 * 4 * 64


@pytest.mark.slow  # DDP agreement is also checked, rank by rank, by test_scale's accumulation test
def test_ddp_two_processes_agree(tmp_path):
    runs = tmp_path / "ddp"
    r = subprocess.run(BOV + ["train", "-p", "micro", "-v", "bov", "--set", "train.max_steps=6", "--set", "train.devices=2",
                              "--set", "train.strategy=ddp", "--set", "train.val_every=6", "--json"],
                       env=env_with(runs), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # that the ranks end with equal weights is checked by a callback on each rank in
    # test_scale.py::test_ddp_accumulation_all_reduces_once_per_step_and_equals_one_large_batch
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["tokens"] == 6 * 2 * 4 * 64  # two ranks, each 4 x 64 per step


@pytest.mark.parametrize("signum,code,error", [(signal.SIGINT, 130, "interrupted"),
                                               (signal.SIGTERM, 143, "interrupted (SIGTERM)")])
def test_ctrl_c_ends_run_killed(tmp_path, signum, code, error):
    runs = tmp_path / "int"
    args = ["train", "-p", "micro", "--set", "train.max_steps=5000", "--set", "train.ckpt_every=10", "--set", "train.val_every=10"]
    proc = subprocess.Popen(BOV + args, env=env_with(runs), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)
    try:
        t0 = time.time()
        while not list(runs.glob("train/*/last.ckpt")):  # training is under way
            assert proc.poll() is None and time.time() - t0 < 180
            time.sleep(0.02)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:  # never leave a 5000-step run behind when an assertion fails
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, stderr[-3000:]
    assert "the run ended KILLED; the same command with --resume continues it" in stderr.strip().splitlines()[-1]
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("bov").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["error"] == error
    assert not list(runs.glob("train/*/.*.tmp*"))  # no half-written checkpoint left behind


def test_failure_while_building_the_trainer_ends_failed(runs):
    cfg = load_config("micro", "baseline", {"train.max_steps": 2, "train.strategy": "no_such_strategy"})
    with pytest.raises(Exception, match="no_such_strategy"):
        run_training(cfg, log=lambda m: None)
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("bov").experiment_id])
    assert run.info.status == "FAILED" and "no_such_strategy" in run.data.tags["error"]


def test_a_loss_that_explodes_without_nan_is_divergence():
    from bov.litmodule import Diverged, check_loss

    check_loss(6.3, 1, 512)  # about uniform guessing over 512 tokens: fine
    for bad in (float("nan"), float("inf"), 1e5, 4 * 6.24 + 0.1):
        with pytest.raises(Diverged, match="at step 7"):
            check_loss(bad, 7, 512)


def test_a_checkpoint_save_cut_short_leaves_the_previous_one_whole(tmp_path):
    import torch

    from bov.train import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "shm" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    good = path.read_bytes()
    with pytest.raises(Exception):  # fails mid-write: the object cannot be pickled
        io.save_checkpoint({"step": 2, "w": torch.zeros(3), "bad": lambda: None}, path)
    assert path.read_bytes() == good and sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    io.save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True) == {"step": 3}


def test_unreachable_tracking_server_fails_in_one_line_before_compute(tmp_path):
    env = env_with(tmp_path / "runs")
    env["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"  # nothing listens on the discard port
    t0 = time.time()
    r = subprocess.run(BOV + ["train", "-p", "micro"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and time.time() - t0 < 60
    assert r.stderr.count("\n") == 1 and "http://127.0.0.1:9 is not reachable" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_override_values_and_devices_are_one_line(tmp_path):
    r = subprocess.run(BOV + ["train", "-p", "micro", "--set", "model.bank_layers=[1,"], env=env_with(tmp_path / "r"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "model.bank_layers=[1," in r.stderr
    r = subprocess.run(BOV + ["generate", "-c", str(tmp_path / "none.ckpt"), "--device", "tpu"],
                       env=env_with(tmp_path / "r"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--device 'tpu'" in r.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # subprocesses: in `make test-slow`, out of the 10-minute default run
def test_two_trainings_started_at_once_on_a_fresh_runs_dir_both_finish(tmp_path):
    """Both create the embedded MLflow store at the same moment; its migration is serialized, not raced."""
    env = {**os.environ, "BOV_RUNS_DIR": str(tmp_path / "runs"), "BOV_PROGRESS": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "bov.cli", "train", "-p", "micro", "-s", "train.max_steps=2", "-s", "train.val_every=2"]
    procs = [subprocess.Popen([*cmd, "-s", f"train.seed={i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    assert all(o[0].startswith("FINISHED") or "FINISHED:" in o[0] for o in outs)


def test_orphan_temp_files_of_dead_writers_are_removed_and_live_ones_kept(runs):
    from bov.data import prepare

    cfg = load_config("micro", "baseline")
    data = prepare(cfg, log=lambda m: None)
    root = data.train.path.parent
    dead, live = root / "train.tmp999999999", root / f"val.tmp{os.getpid()}"
    dead.write_bytes(b"half a stream")
    live.write_bytes(b"being written")
    prepare(cfg, log=lambda m: None)
    assert not dead.exists() and live.exists()


SLOW_SAVE = """
import sys, time, torch
from bov.train import AtomicCheckpointIO

class Slow:  # pickled mid-save: the process is killed while the checkpoint file is half written
    def __reduce__(self):
        time.sleep(60)
        return (Slow, ())

AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1000), "slow": Slow()}, sys.argv[1])
"""


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm on this machine")
def test_sigkill_during_a_checkpoint_save_on_another_filesystem_keeps_the_previous_one(tmp_path):
    import torch

    from bov.train import AtomicCheckpointIO

    run_dir = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="bov-test-"))  # tmpfs: not the temp dir's filesystem
    try:
        path = run_dir / "last.ckpt"
        AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
        good = path.read_bytes()
        child = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(path)])
        deadline = time.time() + 120
        while not list(run_dir.glob(".last.ckpt.tmp*")) and time.time() < deadline and child.poll() is None:
            time.sleep(0.05)
        assert list(run_dir.glob(".last.ckpt.tmp*")), "the save never started"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        assert path.read_bytes() == good  # the previous checkpoint, whole
        assert torch.load(path, weights_only=True)["step"] == 1
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.slow  # ~30 s of tokenizing on 2 cores: in `make test-slow`
def test_sigkill_while_the_data_is_built_loses_nothing_and_the_rerun_finishes(tmp_path):
    """A kill in mid-tokenization (the packed stream half written) leaves no run and no cache entry that a later
    run trusts; the same command then builds the data and trains."""
    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w") as f:
        for i in range(6000):
            f.write(json.dumps({"text": f"document {i}: " + " ".join(f"w{(i * 7 + j) % 997}" for j in range(150))}) + "\n")
    runs = tmp_path / "runs"
    args = BOV + ["train", "-p", "micro", "-s", f"data.source={corpus}", "-s", "train.max_steps=4", "-s",
                  "train.val_every=4", "-s", "data.num_proc=2", "-s", "data.max_docs=null", "--json"]
    proc = subprocess.Popen(args, env=env_with(runs), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own group: datasets' map workers die with it
    try:
        while not list(runs.glob("cache/tokens/*/train.tmp*")):  # the train stream is being written
            assert proc.poll() is None, "the data was built before the kill"
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not list(runs.glob("cache/tokens/*/train.json"))  # nothing vouches for the half-written stream
    db = runs / "mlflow.db"
    if db.exists():  # data comes before the run: a kill here opens none
        client = mlflow.MlflowClient(f"sqlite:///{db}")
        assert all(not client.search_runs([e.experiment_id]) for e in client.search_experiments())

    out = subprocess.run(args, env=env_with(runs), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads(out.stdout.strip().splitlines()[-1])
    assert s["status"] == "FINISHED" and s["steps"] == 4
    assert not list(runs.glob("cache/tokens/*/*.tmp*"))  # the dead writer's file was removed
    meta = json.loads(next(runs.glob("cache/tokens/*/train.json")).read_text())
    assert meta["complete"] and meta["n_docs"] > 5000


def test_the_console_counts_steps_of_the_budget_and_shows_no_tips():
    import logging
    from types import SimpleNamespace

    from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

    from bov import console

    console.quiet_tips()
    console.quiet_tips()  # once is enough, twice is harmless
    made_by = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    tip = logging.LogRecord(made_by.name, logging.INFO, __file__, 1, "💡 Tip: try installing litlogger", None, None)
    other = logging.LogRecord(made_by.name, logging.INFO, __file__, 1, "`Trainer.fit` stopped", None, None)
    assert not made_by.filter(tip) and made_by.filter(other) and len(made_by.filters) == 1
    bar = console.progress_bar()
    bar._trainer = SimpleNamespace(max_steps=30, accumulate_grad_batches=2, max_epochs=-1)
    assert isinstance(bar, ProgressBar) and bar.total_train_batches == 60  # micro-batches of the budget
    if hasattr(bar, "_get_train_description"):  # Rich: Lightning wrote "Epoch 0/-2" here
        assert bar._get_train_description(0) == "train"
