"""The analysis notebooks under `analysis/`, run headlessly for `make figures`: which notebook a study gets,
executed into `<results>/<study>/<name>.ipynb` (nbclient) or, without a kernel, run as a script."""

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
    saved = dict(os.environ)
    os.environ.update(env)  # the kernel inherits the parameters
    try:
        nbclient.NotebookClient(nb, kernel_name="python3", timeout=3600,
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
