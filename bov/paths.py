"""Where run state lives and who may write it: `runs/` by default, moved wholesale by BOV_RUNS_DIR (caches alone
by BOV_CACHE_DIR); one writer per run directory (`RunLock`); what a SQLite store holds before anyone opens it."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path


class StateDirError(ValueError):
    """The runs or cache dir cannot be made or written; `bov` says so in one line (bov.cli.main)."""


class StoreError(ValueError):
    """A store bov would open (MLflow, Optuna, a run's checkpoint or state file) is corrupt, of a kind bov does
    not use, from an incompatible version, or owned by another process: one line naming it and what to do,
    exit code 2 (bov.cli.main), before anything is written to it."""


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


def cache_dir(name: str, make: bool = True) -> Path:
    """Tokenizers and token streams: `<runs>/cache`, or BOV_CACHE_DIR (e.g. one cache shared by many runs dirs).
    `make=False`: only where it would be (nothing is created to look)."""
    root = os.environ.get("BOV_CACHE_DIR")
    if root:
        path = Path(root).expanduser().resolve() / name
        return _make(path, "BOV_CACHE_DIR") if make else path
    if not make:
        return Path(os.environ.get("BOV_RUNS_DIR", "runs")).expanduser().resolve() / "cache" / name
    return _make(runs_dir() / "cache" / name, "BOV_RUNS_DIR")


def tracking_uri(explicit: str | None = None) -> str:
    """MLflow store: an explicit URI, else MLFLOW_TRACKING_URI, else SQLite under the runs dir."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{runs_dir() / 'mlflow.db'}"


# ----------------------------------------------------------------------------- SQLite stores

SQLITE_HEADER = b"SQLite format 3\x00"


def sqlite_tables(path: Path, what: str) -> set[str] | None:
    """The tables of an existing SQLite file (None: no file yet, the store will be created), read without
    writing to it. `what` names the store in the one line of a StoreError."""
    import sqlite3

    if not path.exists():
        return None
    if not path.is_file():
        raise StoreError(f"{what}: {path} is not a file (a directory?); point it at a SQLite file, or remove it")
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_HEADER))
    if not head:
        return set()  # an empty file is an empty database
    if head != SQLITE_HEADER:
        raise StoreError(f"{what}: {path} is not a SQLite database; move it away (bov then starts a new store), "
                         "or point the setting at the right file")
    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30) as db:
            return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{what}: {path} is a damaged SQLite database ({e}); restore it from a backup, or move it "
                         "away to start a new store") from None


def sqlite_value(path: Path, sql: str):
    """One value of a read-only query on a SQLite file (None where the query finds nothing)."""
    import sqlite3

    with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30) as db:
        row = db.execute(sql).fetchone()
    return row[0] if row else None


# ----------------------------------------------------------------------------- one writer per run


class RunBusy(StoreError):
    """Another live process owns the run directory."""


class RunLock:
    """One writer per run directory: an exclusive flock on `<run_dir>/.lock` for the whole run.

    The kernel drops the lock when its process ends, however it ends (SIGKILL included), so a dead owner never
    holds it; the file's text (pid, host, command, since) only names the owner in a refusal, and a clean end
    removes the file. A second process refuses in one line (RunBusy), or with `wait` waits for the owner to
    finish. The DDP ranks of one run are one writer: only rank 0 takes the lock. (On NFS, flock is emulated by POSIX locks, which NFS v4 honours
    across machines.)
    """

    NAME = ".lock"

    def __init__(self, run_dir: Path, wait: bool = False, log=print):
        self.run_dir, self.wait, self.log = Path(run_dir), wait, log
        self._file = None

    def acquire(self) -> "RunLock":
        import fcntl

        path = self.run_dir / self.NAME
        while True:
            self.run_dir.mkdir(parents=True, exist_ok=True)  # (again: an owner that wrote nothing removes it)
            try:
                f = open(path, "a+")
            except FileNotFoundError:  # removed between the two lines by an owner letting go
                continue
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self.owner_text(f)
                if not self.wait:
                    f.close()
                    raise RunBusy(f"{self.run_dir} is being written by {owner}; wait for it to end (bov train "
                                  "--wait), or stop it (SIGTERM ends its run KILLED, and --resume continues it)") from None
                self.log(f"waiting for {owner} to release {self.run_dir}")
                fcntl.flock(f, fcntl.LOCK_EX)
            try:  # the owner we waited for removes the file as it lets go: lock the file that is there now
                if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            f.close()
        f.seek(0)
        f.truncate()
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command}))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        """Let go, removing the lock file (and the run directory, when the run left nothing in it)."""
        import contextlib
        import fcntl

        if self._file is None:
            return
        with contextlib.suppress(OSError):
            (self.run_dir / self.NAME).unlink()
            self.run_dir.rmdir()  # only when empty: a run refused before it wrote anything
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    @staticmethod
    def owner_text(f) -> str:
        f.seek(0)
        try:
            o = json.loads(f.read() or "{}")
            return f"pid {o['pid']} on {o['host']} since {o['since']} ({o['command']})"
        except (ValueError, KeyError):
            return "another process"

    @classmethod
    def owner(cls, run_dir: Path) -> str | None:
        """Who holds the run directory now (None: nobody alive). Asked of another process's run only: a
        process's own second open of its lock file would count as another owner."""
        import fcntl

        path = Path(run_dir) / cls.NAME
        if not path.is_file():
            return None
        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return cls.owner_text(f)
            fcntl.flock(f, fcntl.LOCK_UN)
        return None


def process_alive(pid: int, since: float) -> bool:
    """The process `pid` exists and is the one that started by `since` (a Unix time), not a reused pid."""
    import psutil

    try:
        return psutil.Process(pid).create_time() <= since + 1.0
    except psutil.Error:
        return False
