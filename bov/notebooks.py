"""The analysis notebooks under `analysis/`, run headlessly for `make figures` (`run_figures`): which notebook a
study gets, executed into `<results>/<study>/<name>.ipynb` (nbclient) or, without a kernel, run as a script; then
each study's files published to its MLflow parent run."""

from __future__ import annotations

import os
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "analysis"


def notebook_for(definition: str | None, crossed: bool = False) -> Path:
    """analysis/<study>.py when the study has its own notebook, else the generic crossed_sweep.py (two axes)
    or axis_sweep.py."""
    own = NOTEBOOKS / f"{definition}.py"
    return own if definition and own.is_file() else NOTEBOOKS / ("crossed_sweep.py" if crossed else "axis_sweep.py")


def run_notebook(notebook: Path, out_dir: Path, env: dict[str, str], execute: bool) -> Path | None:
    """Run a jupytext notebook headlessly: executed into `<out_dir>/<name>.ipynb` (nbclient), or as a script."""
    import subprocess
    import sys

    out_dir.mkdir(parents=True, exist_ok=True)
    if not execute:
        done = subprocess.run([sys.executable, str(notebook)], env=env, capture_output=True, text=True)
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"{notebook.name} failed: {tail[0]}")
        return None
    import jupytext
    import nbclient
    import nbformat

    nb = jupytext.read(notebook)
    for i, cell in enumerate(nb.cells):  # fixed ids and no timings: the same results give the same file
        cell["id"] = f"cell-{i}"
    saved = dict(os.environ)
    os.environ.update(env)  # the kernel inherits the parameters
    try:
        nbclient.NotebookClient(nb, kernel_name="python3", timeout=3600, record_timing=False,
                                resources={"metadata": {"path": str(Path.cwd())}}).execute()
    except nbclient.exceptions.CellExecutionError as e:
        raise RuntimeError(f"{notebook.name} failed: {str(e).strip().splitlines()[-1]}") from None
    finally:
        os.environ.clear()
        os.environ.update(saved)
    target = out_dir / f"{notebook.stem}.ipynb"
    nbformat.write(nb, target)
    return target


def can_execute_notebooks() -> bool:
    try:
        import ipykernel  # noqa: F401
        import nbclient  # noqa: F401
    except ImportError:
        return False
    return True


def run_figures(studies: list[str] | None, script: bool = False, log=print) -> list[Path]:
    """`make figures`: every study's notebook (or those named), then each study's tables and figures attached to
    its MLflow parent run, with the record `bov reproduce` reads. The folders written, in order. A store or study
    that is not there is a ValueError (one line); a notebook that fails is a RuntimeError."""
    from bov import analysis as A
    from bov.paths import runs_dir, tracking_uri
    from bov.mlflow_store import check_tracking_uri, relocate_artifacts
    from bov.tracking import retire_dead_sweep, sweep_parent

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():  # do not create an empty store
        raise ValueError(f"no MLflow store at {uri}; run `make sweep` first (or set MLFLOW_TRACKING_URI)")
    check_tracking_uri(uri)
    relocate_artifacts(uri)  # a runs dir copied from elsewhere: its study definitions are read from here
    names = studies or A.sweep_experiments(uri)
    if not names:
        raise ValueError(f"no sweep in the MLflow store {uri}; run `make sweep` first (or pass --study)")
    results = A.results_dir().resolve()
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, BOV_RESULTS_DIR=str(results), BOV_RUNS_DIR=str(runs_dir()),
               MPLBACKEND="Agg", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")  # no timings in executed notebooks
    jobs = []
    for name in names:
        if (parent := sweep_parent(uri, name)) and retire_dead_sweep(uri, parent):
            log(f"{name}: its sweep process is gone; its parent run now ends KILLED (re-run the sweep to continue)")
        loaded = A.load_study(name, uri)
        if loaded.runs.empty:
            if studies:
                raise ValueError(f"study {name!r} has no finished runs yet; run its sweep first")
            log(f"{name}: no finished runs yet, skipped")
            continue
        jobs.append((name, notebook_for(loaded.definition, crossed=bool(loaded.axes)), results / name))
    jobs.append(("vcache_memory", NOTEBOOKS / "vcache_memory.py", results / "vcache_memory"))
    execute = not script and can_execute_notebooks()
    for name, notebook, out in jobs:
        log(f"{name}: analysis/{notebook.name} -> {out}")
        try:
            run_notebook(notebook, out, {**env, "BOV_STUDY": name}, execute)
        except RuntimeError as e:
            raise RuntimeError(f"{name}: {e}") from None
    for name, _, out in jobs:
        if name != "vcache_memory":
            A.publish(name, uri, out)  # the record `bov reproduce` reads; the MLflow parent shows what results/ shows
    return [out for _, _, out in jobs]
