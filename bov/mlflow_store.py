"""The MLflow store, checked before it is opened: a server that does not answer, a SQLite file that is not a
database or holds another schema, a database of another MLflow version are each one line (StoreError) before
anything is written; experiments are created one process at a time, with artifacts under the runs dir."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from bov.paths import StoreError, runs_dir, sqlite_tables, sqlite_value

MLFLOW_DATABASES = ("postgresql", "mysql", "mssql")  # SQLAlchemy URLs MLflow's tracking store takes


def check_tracking_uri(uri: str) -> None:
    """The MLflow store, in one line (StoreError or ValueError), before anything is written to it: a server that
    does not answer within seconds (MLflow itself retries for minutes), a SQLite file that is not a database,
    not MLflow's, or of another MLflow version, a database server that refuses, or a kind bov does not use
    (MLflow's retired file store)."""
    scheme = uri.split(":", 1)[0].split("+")[0] if "://" in uri else ""
    if scheme in ("http", "https"):
        _check_server(uri)
    elif scheme == "sqlite" and uri.startswith("sqlite:///"):
        _check_sqlite_store(uri)
    elif scheme in MLFLOW_DATABASES:
        _check_database(uri)
    else:
        what = "a path: MLflow's retired file store, which" if scheme in ("", "file") else f"a {scheme} URI, which"
        raise StoreError(f"MLFLOW_TRACKING_URI / tracking.tracking_uri: {uri} is {what} bov does not use; use "
                         "sqlite:///PATH, a database URL (postgresql://...) or a server (http://HOST:PORT), or "
                         "unset it for the embedded store under the runs dir")


def _check_server(uri: str) -> None:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:
        raise StoreError(f"MLFLOW_TRACKING_URI / tracking.tracking_uri: the MLflow server {uri} is not reachable "
                         f"({type(e).__name__}); start it, or unset the variable to use the embedded store") from None


def _check_sqlite_store(uri: str) -> None:
    path = Path(uri[len("sqlite:///"):])
    what = "the MLflow store"
    if not path.exists():
        return  # new: MLflow creates it (ensure_experiment, one process at a time)
    with _store_lock(uri):  # not while another bov process migrates a new store through its revisions
        tables = sqlite_tables(path, what)
        if not tables:
            return
        if "experiments" not in tables or "alembic_version" not in tables:
            listed = ", ".join(sorted(tables)[:4])
            raise StoreError(f"{what}: {path} is a SQLite database but not MLflow's (tables: {listed}); point "
                             "MLFLOW_TRACKING_URI at an MLflow store, or move it away")
        _check_schema(uri, sqlite_value(path, "SELECT version_num FROM alembic_version"))


def _check_schema(uri: str, found: str | None) -> None:
    import mlflow

    try:
        from mlflow.store.db.utils import _get_latest_schema_revision  # MLflow's own check reads the same

        expected = _get_latest_schema_revision()
    except Exception:  # a private helper: where it moved, MLflow's own check stands
        return
    if found != expected:
        raise StoreError(f"the MLflow store {uri} has schema {found}, MLflow {mlflow.__version__} expects {expected}: "
                         f"it was written by another MLflow version; back it up and run `mlflow db upgrade {uri}` "
                         "(an older store), or use the MLflow that wrote it")


def _check_database(uri: str) -> None:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            tables = set(sqlalchemy.inspect(conn).get_table_names())
            found = conn.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar() \
                if "alembic_version" in tables else None
    except Exception as e:
        raise StoreError(f"MLFLOW_TRACKING_URI: the database {uri.split('@')[-1]} is not usable "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if tables and "experiments" not in tables:
        raise StoreError(f"MLFLOW_TRACKING_URI: the database {uri.split('@')[-1]} holds tables but not MLflow's; "
                         "point it at an MLflow database")
    if tables:
        _check_schema(uri.split("@")[-1], found)


@contextlib.contextmanager
def _store_lock(uri: str):
    """One process at a time creates an embedded SQLite store (MLflow migrates a fresh database on first use,
    and two processes migrating at once fail with "Online migration expected to match one row")."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".init.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def relocate_artifacts(uri: str) -> int:
    """An embedded store moved with its runs dir (another path, another machine) still names the old path for
    its artifacts, and MLflow would write them there, outside the runs dir. Point them at the runs dir the
    store now sits in (the artifacts moved with it). Returns the number of experiments moved."""
    import sqlite3

    if not uri.startswith("sqlite:///"):
        return 0
    db = Path(uri[len("sqlite:///"):]).resolve()
    here = (db.parent / "artifacts").as_uri()
    if db.parent != runs_dir().resolve() or not db.is_file():
        return 0  # only bov's own store, whose artifacts live beside it
    with sqlite3.connect(db, timeout=60) as con:
        try:
            old = {r[0] for r in con.execute("SELECT artifact_location FROM experiments")}
        except sqlite3.OperationalError:  # not created yet
            return 0
        moved = [o for o in old if o and o.startswith("file://") and o.endswith("/artifacts") and o != here]
        for o in moved:
            con.execute("UPDATE experiments SET artifact_location = ? WHERE artifact_location = ?", (here, o))
            con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) WHERE artifact_uri LIKE ?",
                        (here, len(o) + 1, o + "/%"))
    return len(moved)


def ensure_experiment(name: str, uri: str) -> str:
    """The experiment's id, creating it (and the store); with the embedded store, artifacts go under the runs
    dir too (and follow it when it moved)."""
    import mlflow

    with _store_lock(uri):
        relocate_artifacts(uri)
        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        local = uri.startswith("sqlite:")  # a server (MLFLOW_TRACKING_URI) keeps its own artifact store
        return client.create_experiment(name, artifact_location=(runs_dir() / "artifacts").as_uri() if local else None)
