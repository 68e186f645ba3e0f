"""State integrity: a run and a study continue only on the data they recorded, every store bov opens fails in
one line when it is damaged, foreign or of another version, and a run directory has one writer.

Real processes, real files changed or damaged, a real second process."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch  # noqa: F401  (imported here, not first inside CliRunner: Lightning's log handler
import mlflow                # would keep CliRunner's captured stream, closed after that invocation)
import optuna
import pytest
import yaml
from test_sweep import postgres  # noqa: F401  (the fixture: a real PostgreSQL server)

BOV = [sys.executable, "-m", "bov.cli"]
HANG = 600  # seconds: a guard against a hung child, never a performance budget
WORDS = {"a": "the of and to in a is that for it as was with be by on not he this are or his from at which but have",
         "b": "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau"}


def corpus(path: Path, kind: str, docs: int = 200) -> Path:
    """A JSON-lines corpus of `docs` documents drawn from one of two vocabularies."""
    import random

    rng, words = random.Random(kind), WORDS[kind].split()
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(100))}) + "\n"
                            for _ in range(docs)))
    return path


def env_with(runs: Path, **extra) -> dict:
    env = dict(os.environ, BOV_RUNS_DIR=str(runs), BOV_PROGRESS="0", **extra)
    for k in ("MLFLOW_TRACKING_URI", "BOV_OPTUNA_STORAGE", "BOV_CACHE_DIR"):
        if k not in extra:
            env.pop(k, None)
    return env


def bov(runs: Path, *args: str, timeout: int = HANG, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([*BOV, *args], env=env_with(runs, **extra), capture_output=True, text=True, timeout=timeout)


def train_args(source: Path, *more: str, steps: int = 6) -> list[str]:
    return ["train", "-p", "micro", "-s", f"data.source={source}", "-s", f"train.max_steps={steps}",
            "-s", "train.val_every=3", *[x for m in more for x in ("-s", m)]]


def one_line(r: subprocess.CompletedProcess, needle: str) -> str:
    err = r.stderr.strip()
    assert r.returncode == 2, f"rc {r.returncode}: {r.stderr[-2500:]}"
    assert err.startswith("error: ") and "\n" not in err and needle in err, r.stderr[-2500:]
    return err


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"} if root.exists() else {}


def only_run(runs: Path, experiment: str = "bov"):
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


# ----------------------------------------------------------------------------- a run's data


@pytest.mark.parametrize("replaced", ["data.source", pytest.param("data.val_source", marks=pytest.mark.slow)])
def test_resume_on_a_replaced_corpus_stops_before_any_compute(tmp_path, monkeypatch, replaced):
    """The issue's case: the corpus (or the validation text) is replaced under the same name after the run
    stopped; --resume refuses in one line naming both digests, builds no tokenizer or stream, and the run keeps
    its status."""
    runs, text, val = tmp_path / "runs", corpus(tmp_path / "text.jsonl", "a"), corpus(tmp_path / "val.jsonl", "a", 40)
    args = train_args(text, f"data.val_source={val}")
    code, out = cli(runs, monkeypatch, *args)  # trained here; the resume below is a process of its own
    assert code == 0, out[-2000:]
    recorded = json.loads(next(runs.glob("train/*/run.json")).read_text())["data"]
    corpus(text if replaced == "data.source" else val, "b", 200 if replaced == "data.source" else 40)
    caches = files_under(runs / "cache" / "tokens"), files_under(runs / "cache" / "tokenizers")

    r = bov(runs, *args, "--resume")
    err = one_line(r, "was trained on another corpus (the bytes of data.source and data.val_source")
    assert f"recorded {recorded['corpus']}" in err and "now " in err and "start a new run (without --resume)" in err
    assert (files_under(runs / "cache" / "tokens"), files_under(runs / "cache" / "tokenizers")) == caches
    assert only_run(runs).info.status == "FINISHED"  # not reopened


@pytest.mark.slow  # real processes training: in `make test-slow`
def test_resume_with_a_changed_tokenizer_file_stops_before_tokenizing(tmp_path):
    """data.tokenizer given by path, then that file rewritten with another tokenizer."""
    runs = tmp_path / "runs"
    text, other = corpus(tmp_path / "text.jsonl", "a"), corpus(tmp_path / "other.jsonl", "b")
    assert bov(runs, "prepare", "-p", "micro", "-s", f"data.source={other}").returncode == 0
    assert bov(runs, "prepare", "-p", "micro", "-s", f"data.source={text}").returncode == 0
    made = sorted((runs / "cache" / "tokenizers").glob("*.json"), key=lambda p: p.stat().st_mtime)
    tok = tmp_path / "tokenizer.json"
    tok.write_bytes(made[1].read_bytes())  # the tokenizer of `text`
    args = train_args(text, f"data.tokenizer={tok}")
    assert bov(runs, *args).returncode == 0
    tok.write_bytes(made[0].read_bytes())  # now the tokenizer of the other text
    streams = files_under(runs / "cache" / "tokens")
    err = one_line(bov(runs, *args, "--resume"), "was trained on another tokenizer: recorded")
    assert "restore the data" in err
    assert files_under(runs / "cache" / "tokens") == streams  # nothing tokenized with the new one


@pytest.mark.slow  # real processes training: in `make test-slow`
def test_a_token_cache_of_other_content_or_format_is_never_read_as_the_run_s(tmp_path):
    """A stream cache rewritten with other tokens (as another bov's packing would) stops a resume; a cache of
    another format is rebuilt for a new run, not read."""
    runs, text = tmp_path / "runs", corpus(tmp_path / "text.jsonl", "a")
    args = train_args(text)
    assert bov(runs, *args).returncode == 0
    (train_bin,) = runs.glob("cache/tokens/*/train.bin")
    meta_path = train_bin.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    import numpy as np

    from bov.sources import sha256_file

    tokens = np.fromfile(train_bin, dtype=meta["dtype"])
    np.roll(tokens, 1).tofile(train_bin)  # same size, same vocabulary, other order: a valid cache of other tokens
    meta_path.write_text(json.dumps({**meta, "sha256": sha256_file(train_bin)}))
    one_line(bov(runs, *args, "--resume"), "was trained on another training token stream")

    meta_path.write_text(json.dumps({**meta, "sha256": sha256_file(train_bin), "format": 99}))
    r = bov(runs, *args, "-s", "train.seed=1")  # a new run: the foreign-format cache is packed again
    assert r.returncode == 0 and "tokenizing train split" in r.stdout, r.stderr[-2000:]
    assert json.loads(meta_path.read_text())["format"] == 1 and sha256_file(train_bin) == meta["sha256"]


# ----------------------------------------------------------------------------- a study's data


def write_sweep(tmp_path: Path, source: Path, levels=("none", "last_third"), seeds=(0,), steps: int = 4) -> Path:
    spec = {"study": "state", "base": {"preset": "micro", "variant": "bov"}, "axis": "model.bank_layers",
            "levels": list(levels), "baseline_level": "none", "seeds": list(seeds),
            "budget": {"steps": steps, "match": "flops"}, "overrides": {"data.source": str(source)}}
    path = tmp_path / "state.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_continuing_a_study_on_a_replaced_corpus_stops_before_any_compute(tmp_path, monkeypatch):
    runs, text = tmp_path / "runs", corpus(tmp_path / "text.jsonl", "a")
    path = write_sweep(tmp_path, text)
    assert cli(runs, monkeypatch, "sweep", str(path))[0] == 0
    study = optuna.load_study(study_name="state-micro", storage=f"sqlite:///{runs / 'optuna.db'}")
    (recorded,) = study.user_attrs["bov.data"].values()
    corpus(text, "b")
    tokenizers = files_under(runs / "cache" / "tokenizers")
    err = one_line(bov(runs, "sweep", str(path), "--seeds", "2"), "study state-micro was trained on another corpus")
    assert f"recorded {recorded['corpus']}" in err and "--study NAME" in err
    assert files_under(runs / "cache" / "tokenizers") == tokenizers
    assert len(study.get_trials()) == 2  # no cell ran

    study.set_user_attr("bov.data", None)  # a study from before the record: its cells' fingerprint tags stand in
    one_line_here(cli(runs, monkeypatch, "sweep", str(path), "--seeds", "2"),
                  f"was trained on another data fingerprint: recorded {recorded['fingerprint']}")
    assert files_under(runs / "cache" / "tokenizers") != tokenizers  # checked once the new tokenizer exists
    assert len(study.get_trials()) == 2


@pytest.mark.slow  # real processes training: in `make test-slow`
def test_a_corpus_replaced_under_a_running_study_stops_its_next_cell(tmp_path):
    """A file changed while the study runs: the cells already trained stand, the next one refuses, the sweep
    exits 2 in one line and its parent run does not stay RUNNING."""
    runs, text = tmp_path / "runs", corpus(tmp_path / "text.jsonl", "a")
    path = write_sweep(tmp_path, text, levels=("none", "last_third", "all"), steps=150)
    proc = subprocess.Popen([*BOV, "sweep", str(path)], env=env_with(runs), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:  # the first cell's result
            lines.append(line)
            if "val/bpb" in line and "[trial 0]" in line:
                break
        corpus(text, "b")
        out, err = proc.communicate(timeout=HANG)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, "".join(lines) + out + err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: ") and "was trained on another corpus" in err
    study = optuna.load_study(study_name="state-micro", storage=f"sqlite:///{runs / 'optuna.db'}")
    states = [t.state.name for t in study.get_trials()]
    assert states.count("COMPLETE") in (1, 2) and states[-1] == "FAIL"
    assert not study.get_trials()[-1].user_attrs.get("bov.final_failure")  # runs again once the data is back
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    runs_now = client.search_runs([client.get_experiment_by_name("state-micro").experiment_id])
    assert not [r for r in runs_now if r.info.status == "RUNNING"]


# ----------------------------------------------------------------------------- stores


def mlflow_store(path: Path, schema: str | None = None) -> Path:
    """A real MLflow store; `schema` rewrites its recorded schema revision (as another MLflow's)."""
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    if schema:
        with sqlite3.connect(path) as db:
            db.execute("UPDATE alembic_version SET version_num = ?", (schema,))
    return path


def optuna_store(path: Path, version: str | None = None) -> Path:
    """A real Optuna storage; `version` makes it look set up by that (old) Optuna."""
    optuna.create_study(storage=f"sqlite:///{path}", study_name="x")
    if version:
        with sqlite3.connect(path) as db:
            db.execute("UPDATE alembic_version SET version_num = 'v2.6.0.a'")
            db.execute("UPDATE version_info SET library_version = ?", (version,))
    return path


def foreign_db(path: Path) -> Path:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (x)")
    return path


STORES = [  # (case, set up -> (extra env or argv, the file that must stay unchanged), needle)
    ("mlflow: not a database", lambda d: ({"MLFLOW_TRACKING_URI": f"sqlite:///{d / 'm.db'}"},
                                          (d / "m.db").write_bytes(b"not a database" * 50) and d / "m.db"),
     "is not a SQLite database"),
    ("mlflow: a directory", lambda d: ({"MLFLOW_TRACKING_URI": str(d)}, None), "MLflow's retired file store"),
    ("mlflow: a file: URI", lambda d: ({"MLFLOW_TRACKING_URI": d.as_uri()}, None), "MLflow's retired file store"),
    ("mlflow: another database", lambda d: ({"MLFLOW_TRACKING_URI": f"sqlite:///{foreign_db(d / 'f.db')}"}, d / "f.db"),
     "is a SQLite database but not MLflow's (tables: notes)"),
    ("mlflow: another version", lambda d: ({"MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_store(d / 'v.db', '0123abcd')}"},
                                           d / "v.db"), "has schema 0123abcd"),
    ("mlflow: an Optuna storage", lambda d: ({"MLFLOW_TRACKING_URI": f"sqlite:///{optuna_store(d / 'o.db')}"}, d / "o.db"),
     "but not MLflow's"),
    ("mlflow: an unsupported kind", lambda d: ({"MLFLOW_TRACKING_URI": "databricks://profile"}, None),
     "a databricks URI, which bov does not use"),
]
OPTUNA = [
    ("optuna: not a database", lambda d: ((d / "o.db").write_bytes(b"junk" * 100) and d / "o.db"), "is not a SQLite database"),
    ("optuna: an MLflow store", lambda d: mlflow_store(d / "m.db"), "is a SQLite database but not Optuna's"),
    ("optuna: another database", lambda d: foreign_db(d / "f.db"), "but not Optuna's (tables: notes)"),
    ("optuna: another version", lambda d: optuna_store(d / "old.db", "2.6.0"), "optuna storage upgrade"),
]


def cli(runs: Path, monkeypatch, *argv: str, **env: str) -> tuple[int, str]:
    """`bov` in this process (a store is refused before any compute, so no child interpreter is needed)."""
    from typer.testing import CliRunner

    from bov.cli import app

    monkeypatch.setenv("BOV_RUNS_DIR", str(runs))
    monkeypatch.setenv("BOV_PROGRESS", "0")
    for k in ("MLFLOW_TRACKING_URI", "BOV_OPTUNA_STORAGE", "BOV_CACHE_DIR"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    res = CliRunner().invoke(app, list(argv))
    return res.exit_code, res.output.strip()


def one_line_here(result: tuple[int, str], needle: str) -> None:
    code, out = result
    assert code == 2 and out.startswith("error: ") and "\n" not in out and needle in out, f"rc {code}: {out[-2500:]}"


@pytest.mark.parametrize("case", STORES, ids=[c[0] for c in STORES])
def test_a_bad_mlflow_store_is_one_line_and_stays_untouched(case, tmp_path, monkeypatch):
    _, setup, needle = case
    env, keep = setup(tmp_path)
    before = keep.read_bytes() if keep else None
    runs = tmp_path / "runs"
    for argv in (["train", "-p", "micro"], ["sweep", "bank_layers", "--scale", "micro"]):
        one_line_here(cli(runs, monkeypatch, *argv, **env), needle)
    if keep:
        assert keep.read_bytes() == before
    assert files_under(runs) == {} and not list(tmp_path.glob("mlruns"))


def test_a_bad_store_is_one_line_from_the_installed_command_too(tmp_path):
    """Through `bov`'s own entry point (exit 2, not a traceback), where `figures` meets the store first."""
    db = tmp_path / "m.db"
    db.write_bytes(b"not a database" * 50)
    for argv in (["train", "-p", "micro"], ["figures"]):
        r = subprocess.run([str(Path(sys.executable).with_name("bov")), *argv], capture_output=True, text=True,
                           timeout=HANG, env=env_with(tmp_path / "runs", MLFLOW_TRACKING_URI=f"sqlite:///{db}"))
        one_line(r, f"{db} is not a SQLite database")
    assert db.read_bytes() == b"not a database" * 50


@pytest.mark.parametrize("case", OPTUNA, ids=[c[0] for c in OPTUNA])
def test_a_bad_optuna_storage_is_one_line_and_stays_untouched(case, tmp_path, monkeypatch):
    _, setup, needle = case
    store = setup(tmp_path)
    before = store.read_bytes()
    runs = tmp_path / "runs"
    one_line_here(cli(runs, monkeypatch, "sweep", "bank_layers", "--scale", "micro", "--storage", f"sqlite:///{store}"),
                  needle)
    assert store.read_bytes() == before and files_under(runs) == {}


def test_damaged_run_state_on_resume_is_one_line(tmp_path, monkeypatch):
    """A checkpoint cut short, one of another run copied in, a run.json that is not JSON, a runs dir resumed
    against a store that lacks its run: each one line, exit 2, nothing reopened and no store created."""
    runs, text = tmp_path / "runs", corpus(tmp_path / "text.jsonl", "a")
    args = train_args(text)
    assert cli(runs, monkeypatch, *args)[0] == 0
    (run_dir,) = runs.glob("train/*")
    ckpt, state = run_dir / "last.ckpt", run_dir / "run.json"
    good_ckpt, good_state = ckpt.read_bytes(), state.read_bytes()

    ckpt.write_bytes(good_ckpt[: len(good_ckpt) // 3])
    one_line_here(cli(runs, monkeypatch, *args, "--resume"), f"{ckpt} is not a readable checkpoint")
    assert bov(runs, *args, "-s", "train.seed=1").returncode == 0  # another config, its own run dir
    (other,) = [p for p in runs.glob("train/*/last.ckpt") if p != ckpt]
    ckpt.write_bytes(other.read_bytes())  # a checkpoint copied in from another run
    one_line_here(cli(runs, monkeypatch, *args, "--resume"), f"{ckpt} holds a run of another config")
    ckpt.write_bytes(good_ckpt)
    state.write_text("{damaged")
    one_line_here(cli(runs, monkeypatch, *args, "--resume"), f"{state} is damaged (no run id)")
    state.write_bytes(good_state)
    elsewhere = tmp_path / "other.db"
    one_line_here(cli(runs, monkeypatch, *args, "--resume", MLFLOW_TRACKING_URI=f"sqlite:///{elsewhere}"),
                  "which the store sqlite:///")
    assert not elsewhere.exists()
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    assert {r.info.status for r in client.search_runs([client.get_experiment_by_name("bov").experiment_id])} \
        == {"FINISHED"}
    code, out = cli(runs, monkeypatch, *args, "--resume")  # all restored: the run continues (at its budget already)
    assert code == 0 and "FINISHED: " in out, out[-2000:]


@pytest.mark.slow  # real processes training: in `make test-slow`
def test_damaged_caches_are_rebuilt_from_the_source(tmp_path):
    """Derived caches are rebuilt, never used damaged: a datasets Arrow file cut short, a corpus digest memo
    overwritten. The tokens come out the same."""
    runs, text = tmp_path / "runs", corpus(tmp_path / "text.jsonl", "a")
    prep = ["prepare", "-p", "micro", "-s", f"data.source={text}"]
    assert bov(runs, *prep).returncode == 0
    streams = files_under(runs / "cache" / "tokens")
    for arrow in runs.glob("cache/datasets/**/*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[:300])
    for memo in runs.glob("cache/digests/*.sha256"):
        memo.write_text("0" * 12)
    for gone in ("tokens", "tokenizers"):
        import shutil

        shutil.rmtree(runs / "cache" / gone)
    r = bov(runs, *prep)
    assert r.returncode == 0, r.stderr[-2000:]
    assert files_under(runs / "cache" / "tokens") == streams
    assert all(len(m.read_text()) == 64 for m in runs.glob("cache/digests/*.sha256"))


# ----------------------------------------------------------------------------- one writer per run


def test_a_second_identical_training_refuses_while_the_first_writes(tmp_path):
    """The issue's case: two identical `bov train`. While the first trains, the second refuses in one line
    naming the first's pid, before any compute: one MLflow run, one writer of the run directory. (The first is
    long and stopped by SIGTERM, so that the two overlap whatever the machine's load.)"""
    runs, text = tmp_path / "runs", corpus(tmp_path / "text.jsonl", "a")
    args = train_args(text, "train.val_every=100", steps=100_000)
    first = subprocess.Popen([*BOV, *args], env=env_with(runs), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        lock, t0 = runs / "train", time.time()
        while f'"pid": {first.pid}' not in "".join(p.read_text() for p in lock.glob("*/.lock")):
            assert first.poll() is None and time.time() - t0 < HANG, first.stderr.read()[-2000:]
            time.sleep(0.05)
        err = one_line(bov(runs, *args), f"is being written by pid {first.pid} on ")
        assert "--wait" in err
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=HANG)
    assert first.returncode == 143
    assert only_run(runs).info.status == "KILLED"  # the first's run, ended as SIGTERM ends it; no second run


def test_wait_waits_for_the_live_owner_then_trains(tmp_path, monkeypatch):
    """A run directory held by a live process (here: this one): `bov train` refuses, `--wait` waits and then
    trains once the owner lets go."""
    from bov.config import load_config
    from bov.paths import RunLock
    from bov.train import run_key

    runs, text = tmp_path / "runs", corpus(tmp_path / "text.jsonl", "a")
    args = train_args(text)
    run_dir = runs / "train" / run_key(load_config("micro", "baseline", {"data.source": str(text),
                                                                        "train.max_steps": 6, "train.val_every": 3}))
    held = RunLock(run_dir).acquire()
    try:
        one_line_here(cli(runs, monkeypatch, *args), f"is being written by pid {os.getpid()} on ")
        waiter = subprocess.Popen([*BOV, *args, "--wait"], env=env_with(runs), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in waiter.stdout:  # the waiter says whom it waits for, then blocks
            seen.append(line)
            if "waiting for" in line:
                break
        assert f"waiting for pid {os.getpid()}" in "".join(seen), "".join(seen)[-2000:]
        assert not list(run_dir.glob("*.ckpt")) and waiter.poll() is None  # blocked: nothing written
    finally:
        held.release()
    out, _ = waiter.communicate(timeout=HANG)
    assert waiter.returncode == 0 and "FINISHED: " in out, out[-2000:]


def test_a_dead_owner_holds_nothing(tmp_path):
    """A SIGKILLed owner leaves its name in the lock file, but not its lock."""
    from bov.paths import RunLock

    run_dir = tmp_path / "run"
    code = f"from bov.paths import RunLock; import time; lock = RunLock({str(run_dir)!r}).acquire(); print('held', flush=True); time.sleep(600)"
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == "held"
    assert f"pid {owner.pid} on " in RunLock.owner(run_dir)
    with pytest.raises(Exception, match=f"is being written by pid {owner.pid}"):
        RunLock(run_dir).acquire()
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert f'"pid": {owner.pid}' in (run_dir / ".lock").read_text()  # its name is left behind ...
    assert RunLock.owner(run_dir) is None  # ... its lock is not
    RunLock(run_dir).acquire().release()


@pytest.mark.slow  # real processes training: in `make test-slow`
def test_a_sweep_worker_never_runs_a_cell_whose_run_directory_has_a_live_writer(tmp_path):
    """The claim lock and the run lock agree: a cell whose directory another live process holds is left to
    later (its trial fails, not finally); once the holder is gone the cell runs, once."""
    from bov.paths import RunLock

    runs, text = tmp_path / "runs", corpus(tmp_path / "text.jsonl", "a")
    path = write_sweep(tmp_path, text)
    held = RunLock(runs / "sweeps" / "state-micro" / "none-seed0").acquire()  # this test process is the writer
    proc = subprocess.Popen([*BOV, "sweep", str(path), "--heartbeat", "1"], env=env_with(runs),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if "is being written by pid" in line:
                assert f"pid {os.getpid()}" in line
                break
        held.release()
        out, err = proc.communicate(timeout=HANG)
    finally:
        held.release()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="state-micro", storage=f"sqlite:///{runs / 'optuna.db'}")
    from bov.trials import cell_of

    done = [cell_of(t) for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert sorted(done) == [("last_third", 0), ("none", 0)]
    busy = [t for t in study.get_trials() if t.state.name == "FAIL"]
    assert busy and all("is being written by" in t.user_attrs["bov.error"] and not t.user_attrs.get("bov.final_failure")
                        for t in busy)


def test_a_runs_dir_copied_elsewhere_resumes_there_and_writes_only_there(tmp_path, monkeypatch):
    """A runs dir copied to another path (as to another machine) resumes against its own store, and the
    artifacts the resumed run writes land in the copy, not at the old path its store recorded."""
    import shutil

    text = corpus(tmp_path / "text.jsonl", "a")
    args = train_args(text)
    old, new = tmp_path / "runs", tmp_path / "copy"
    assert cli(old, monkeypatch, *args)[0] == 0
    shutil.copytree(old, new)
    shutil.rmtree(old)
    r = bov(new, *args, "--resume")  # a process of its own, as on the other machine
    assert r.returncode == 0 and "FINISHED: " in r.stdout, r.stderr[-2000:]
    assert not old.exists(), sorted(str(p) for p in old.rglob("*"))  # nothing written at the old path
    run = only_run(new)
    assert run.info.artifact_uri.startswith((new / "artifacts").as_uri())
    assert {f.path for f in mlflow.MlflowClient(f"sqlite:///{new / 'mlflow.db'}").list_artifacts(run.info.run_id)} \
        >= {"config.yaml", "final_metrics.json"}


@pytest.mark.slow  # starts a PostgreSQL server (installing it where it is missing)
def test_a_postgres_database_that_is_not_optuna_s_is_refused_untouched(postgres, tmp_path, monkeypatch):
    import sqlalchemy

    url = postgres.replace("postgresql://", "postgresql+psycopg://")
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TABLE notes (x integer)"))
    one_line_here(cli(tmp_path / "runs", monkeypatch, "sweep", "bank_layers", "--scale", "micro", "--storage", postgres),
                  "is a database but not Optuna's (tables: notes)")
    with engine.connect() as conn:
        assert set(sqlalchemy.inspect(conn).get_table_names()) == {"notes"}  # Optuna added nothing
