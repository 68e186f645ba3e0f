"""Where a study's state lives and who may claim its next cell: Optuna storages and the claim lock.

SQLite under the runs dir by default (one machine), or a PostgreSQL URL shared by many machines. The claim
lock serializes "which cell next" across workers; on SQLite, a dead local worker's trial is failed at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import zlib
from pathlib import Path

from bov.config import ConfigError
from bov.paths import RunLock, StoreError, process_alive, runs_dir, sqlite_tables
from bov.tracking import mark_lost_run


def default_storage() -> str:
    return os.environ.get("BOV_OPTUNA_STORAGE") or f"sqlite:///{(runs_dir() / 'optuna.db').resolve()}"


def normalize_storage(url: str) -> str:
    """The storage URL as SQLAlchemy takes it, once it is known to be an Optuna storage or a new one."""
    if url.startswith("postgresql://"):  # SQLAlchemy's default driver is psycopg2; we ship psycopg 3
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if not url.startswith(("sqlite:///", "postgresql+", "mysql")):
        raise ConfigError(f"optuna storage {url!r}: use sqlite:///PATH or postgresql://USER@HOST/DB")
    # an existing database must be an Optuna storage: Optuna would add its tables to any other
    tables = sqlite_tables(Path(url[len("sqlite:///"):]), "the Optuna storage") if url.startswith("sqlite:///") \
        else _server_tables(url)
    if tables and "studies" not in tables:
        kind = "a SQLite database" if url.startswith("sqlite:///") else "a database"
        raise StoreError(f"the Optuna storage {url.split('@')[-1]} is {kind} but not Optuna's (tables: "
                         f"{', '.join(sorted(tables)[:4])}); give --storage / BOV_OPTUNA_STORAGE an Optuna "
                         "storage, or a new database")
    return url


def _server_tables(url: str) -> set[str]:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            return set(sqlalchemy.inspect(conn).get_table_names())
    except Exception as e:
        raise ConfigError(f"optuna storage {url.split('@')[-1]} not usable: {type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0][:300]}") from None


class ClaimLock:
    """Serializes "which cell next" across workers: a file lock for SQLite, an advisory lock on a server.

    Optuna's GridSampler picks cells at random and hands out running cells again once the
    grid is exhausted, so two workers can run one cell; claiming under this lock cannot.
    """

    def __init__(self, url: str, study: str):
        self.url, self.key = url, zlib.crc32(study.encode()) & 0x7FFFFFFF
        self._file = self._conn = None
        if url.startswith("sqlite:///"):
            self._path = Path(url[len("sqlite:///"):] + ".claim.lock")
        else:
            import sqlalchemy

            self._engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)

    def acquire(self) -> None:
        if self.url.startswith("sqlite:///"):
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self._path, "a")
            fcntl.flock(self._file, fcntl.LOCK_EX)
            return
        import sqlalchemy

        self._conn = self._engine.connect()
        sql = "SELECT pg_advisory_lock(:k)" if "postgresql" in self.url else "SELECT GET_LOCK(:k, -1)"
        self._conn.execute(sqlalchemy.text(sql), {"k": self.key})

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._conn is not None:
            import sqlalchemy

            sql = "SELECT pg_advisory_unlock(:k)" if "postgresql" in self.url else "SELECT RELEASE_LOCK(:k)"
            with contextlib.suppress(Exception):
                self._conn.execute(sqlalchemy.text(sql), {"k": self.key})
            self._conn.close()
            self._conn = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def fail_dead_local_trials(study) -> None:
    """Fail at once the running trials of workers on this machine whose process is gone.

    Only for SQLite (one machine by construction): there a re-run after a SIGKILL need not
    wait out the heartbeat grace period. On a shared server a host name may repeat across
    containers, so only heartbeats decide there.
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or pid is None or process_alive(pid, t.datetime_start.timestamp()):
            continue
        if t.user_attrs.get("run_dir") and RunLock.owner(Path(t.user_attrs["run_dir"])):
            continue  # its run directory still has a live writer: not dead, whatever the pid says
        with contextlib.suppress(UpdateFinishedTrialError):  # the same call optuna's fail_stale_trials makes
            if study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                mark_lost_run(study, t, why=f"process {pid} is gone")




def open_storage(url: str, heartbeat: int):
    import optuna

    kw = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kw, heartbeat_interval=heartbeat,
                                          grace_period=3 * heartbeat, heartbeat_stale_trial_callback=mark_lost_run)
    except Exception as e:  # unreachable, damaged, or of another Optuna version (its message says to upgrade)
        raise ConfigError(f"optuna storage {url.split('@')[-1]} not usable: {type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0][:300]}") from None
