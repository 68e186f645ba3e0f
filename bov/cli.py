"""The `bov` command line: thin wrappers that parse options and call the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from bov.cli_common import PRESET, SET, VARIANT, fail, load_or_exit
from bov.cli_measure import register
from bov.config import ConfigError, list_presets, list_variants

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Ablations of attention value paths.")

@app.command()
def presets() -> None:
    """List scale presets and named variants."""
    typer.echo("scales:   " + ", ".join(list_presets()))
    typer.echo("variants: " + ", ".join(list_variants()))


V_CACHE = {"values": "stored", "bank": "none (ids)", "first_layer": "none (V_0)"}  # what decoding caches


@app.command()
def describe(preset: str = PRESET, variant: str = VARIANT, set_: Optional[List[str]] = SET) -> None:
    """Print the per-layer value plan, parameter split and FLOPs of a preset/variant."""
    import torch

    from bov.model import GPT, layer_windows

    cfg = load_or_exit(preset, variant, set_)
    with torch.device("meta"):  # shapes only: describes 780m without allocating it
        model = GPT(cfg.model)
    m = cfg.model
    typer.echo(f"{cfg.preset} / {cfg.variant}: {m.n_layers} layers, d={m.d_model}, "
               f"heads {m.n_heads} (kv {m.n_kv_heads}) x {m.head_dim}, vocab {m.vocab_size}, seq {m.seq_len}")
    typer.echo(f"{'layer':>5}  {'role':<9} {'W_V':<4} {'window':<7} {'coeff':<17} {'V cache':<12} value")
    for p, w in zip(model.plan, layer_windows(m)):
        typer.echo(f"{p.layer:>5}  {p.role:<9} {'yes' if p.has_v_proj else 'no':<4} {w or 'full'!s:<7} "
                   f"{(p.coeff if p.source else '-'):<17} {V_CACHE[p.value_cache]:<12} {p.describe()}")
    split = model.param_breakdown()
    typer.echo("params: " + ", ".join(f"{k} {v:,}" for k, v in split.items()))
    typer.echo(f"params total {model.num_params():,}; without lookup tables {model.num_params(exclude_embeddings=True):,}")
    typer.echo(f"training FLOPs/token at seq {m.seq_len}: {model.flops_per_token():.4e}")


@app.command()
def train(
    preset: str = PRESET,
    variant: str = VARIANT,
    set_: Optional[List[str]] = SET,
    resume: bool = typer.Option(False, "--resume", help="continue the same run from its last checkpoint"),
    wait: bool = typer.Option(False, "--wait", help="when another process is writing this run, wait for it to "
                              "end (default: refuse)"),
    json_out: bool = typer.Option(False, "--json", help="print a one-line JSON summary last"),
) -> None:
    """Train one variant to its budget, tracked in MLflow."""
    import json

    from bov import preflight
    from bov.data import DataError
    from bov.litmodule import Diverged
    from bov.train import run_training

    cfg = load_or_exit(preset, variant, set_)
    try:
        preflight.run(cfg)  # one line before any compute
    except (DataError, ValueError) as e:
        fail(str(e))

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    log = (lambda msg: typer.echo(msg, err=True)) if json_out else typer.echo
    from bov.paths import StoreError

    try:
        summary = run_training(cfg, resume=resume, log=log, wait=wait)
    except (DataError, StoreError) as e:  # the data, or the run's own state, found as they are read (before training)
        fail(str(e))
    except (Diverged, FileNotFoundError, ValueError) as e:
        fail(str(e), code=1)
    except (KeyboardInterrupt, SystemExit, SIGTERMException) as e:  # Lightning stopped gracefully; the run is KILLED
        how = "SIGTERM" if isinstance(e, SIGTERMException) else "interrupted"
        typer.echo(f"{how}: the run ended KILLED; the same command with --resume continues it from its last "
                   "checkpoint", err=True)
        raise typer.Exit(143 if isinstance(e, SIGTERMException) else 130)
    if json_out:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(f"{summary['status']}: {cfg.preset}/{cfg.variant} val_bpb={summary['val_bpb']:.4f} "
                   f"val_loss={summary['val_loss']:.4f} train_loss={summary['train_loss']:.4f} "
                   f"tokens={summary['tokens']:,} run_id={summary['run_id']}")
        typer.echo(f"unigram baseline on the same validation text: {summary['unigram_bpb']:.4f} bits/byte")


@app.command("prepare")
def prepare_cmd(
    preset: str = PRESET,
    variant: str = VARIANT,
    set_: Optional[List[str]] = SET,
    tokens: Optional[int] = typer.Option(None, "--tokens", min=1, help="a streaming source: tokens to pack "
                                         "(default: what the config's budget reads)"),
    study: Optional[str] = typer.Option(None, "--study", help="a study under sweeps/ (or a YAML path): every data "
                                        "setting of its cells, e.g. once before a cluster job array of workers"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-eval tasks to cache for offline `bov eval` "
                                        "(e.g. core), comma-separated"),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="a directory of lm-eval task YAMLs"),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="a named corpus (wikipedia-en): find its local copy, "
                                         "or build its public equivalent from the Hugging Face Hub once"),
) -> None:
    """Tokenize a corpus once (the tokenizer and token streams every run, budget and sweep cell then reuses), or
    fetch the datasets of lm-eval tasks or a named corpus once, so that later runs need no network."""
    if tasks is not None:
        return _prepare_tasks(tasks, include_path)
    if corpus is not None:
        return _prepare_corpus(corpus)
    from bov.budget import model_shape, plan_budget, world_size
    from bov.data import DataError, prepare
    from bov.sources import check_source

    if study is not None:
        return _prepare_study(study)
    cfg = load_or_exit(preset, variant, set_)
    try:
        check_source(cfg.data)
        need = tokens or plan_budget(cfg, model_shape(cfg.model)[0], world_size(cfg)).tokens + cfg.model.seq_len + 1
        data = prepare(cfg, stream_tokens=need if cfg.data.streaming else None, log=typer.echo)
    except (DataError, ValueError) as e:
        fail(str(e))
    typer.echo(f"{cfg.data.source}: train {data.train.n_tokens:,} tokens, validation {data.val.n_tokens:,} tokens, "
               f"vocabulary {len(data.token_bytes):,}; streams in {data.train.path.parent}, "
               f"tokenizer {data.tokenizer_path}")


def _prepare_corpus(name: str) -> None:
    from bov.corpora import CORPUS_PREFIX, root_of
    from bov.data import DataError
    from bov.sources import corpus_origin

    try:
        root_of(name)
        typer.echo(corpus_origin(f"{CORPUS_PREFIX}{name}/*"))
    except DataError as e:
        fail(str(e).replace("data.source", "--corpus", 1))


def _prepare_study(name: str) -> None:
    from bov.data import DataError
    from bov.sources import check_source
    from bov.study import load_sweep
    from bov.sweep import prepare_study

    try:
        sweep = load_sweep(name)
        for c in sweep.cells:
            check_source(c.cfg.data)
        prepared = prepare_study(sweep, log=typer.echo)
    except (ConfigError, DataError, ValueError) as e:
        fail(str(e))
    for data in prepared.values():
        typer.echo(f"{sweep.name}: train {data.train.n_tokens:,} tokens, validation {data.val.n_tokens:,} tokens; "
                   f"streams in {data.train.path.parent}")


def _prepare_tasks(tasks: str, include_path: Optional[Path]) -> None:
    from bov.lmeval import cache_tasks, task_manager

    if include_path is not None and not include_path.is_dir():
        fail(f"--include-path: no directory at {include_path}")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    try:
        found, where = cache_tasks(names, task_manager(names, str(include_path) if include_path else None))
    except ValueError as e:
        fail(str(e))
    except (ConnectionError, OSError) as e:  # no network and nothing cached: say which task and what to do
        fail(f"--tasks {tasks}: a dataset could not be fetched ({str(e).splitlines()[0][:300]}); run this where "
             "the Hugging Face Hub is reachable, then copy the cache (BOV_CACHE_DIR or HF_DATASETS_CACHE)")
    for task, n in sorted(found.items()):
        typer.echo(f"{task}: {n:,} documents")
    typer.echo(f"cached {len(found)} task(s) under {where}; `bov eval --tasks {tasks}` now runs with "
               "HF_DATASETS_OFFLINE=1")


def _seeds(text: str | None) -> list[int] | None:
    """`3` -> seeds 0, 1, 2; `0,5,7` -> those seeds."""
    if not text:
        return None
    try:
        parts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"--seeds {text!r}: a count (3) or a comma-separated list (0,1,2)")
    return list(range(parts[0])) if len(parts) == 1 and "," not in text else parts


@app.command()
def sweep(
    name: str = typer.Argument("bank_layers", help="a study under sweeps/ (e.g. bank_layers, variants) or a YAML path"),
    scale: Optional[str] = typer.Option(None, "--scale", help="another scale preset (its own step budget)"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="3 (seeds 0..2) or 0,1,2; default: the study's"),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="local worker processes; default: one per "
                                          "GPU on a multi-GPU host, else 1"),
    study: Optional[str] = typer.Option(None, "--study", help="study name (default <study>-<scale>)"),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default: BOV_OPTUNA_STORAGE, "
                                          "else sqlite under the runs dir); postgresql://... for many machines"),
    steps: Optional[int] = typer.Option(None, "--steps", help="reference steps of the compute-matched budget"),
    heartbeat: int = typer.Option(30, "--heartbeat", help="seconds between trial heartbeats; a worker silent for "
                                  "3x this is presumed dead and its cell is run again"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="run again cells that failed on their own (diverged, an error), from scratch, each at most 3 times in all"),
    set_: Optional[List[str]] = SET,
) -> None:
    """Run (or continue) an Optuna study over one axis; every trial is an MLflow child run."""
    from bov.data import DataError
    from bov.study import load_sweep
    from bov.sweep import run_sweep
    from bov.trials import format_summary

    if workers is None:
        import torch

        workers = max(1, torch.cuda.device_count())
    try:
        sw = load_sweep(name, scale=scale, seeds=_seeds(seeds), study=study, steps=steps, overrides=set_)
        result = run_sweep(sw, workers=workers, storage=storage, heartbeat=heartbeat, retry_failed=retry_failed,
                           log=typer.echo)
    except (ConfigError, DataError, ValueError) as e:
        fail(str(e))
    typer.echo("")
    typer.echo(format_summary(result.table, sw))
    typer.echo("")
    typer.echo("trials: " + ", ".join(f"{n} {k}" for k, n in sorted(result.trials.items())))
    typer.echo(f"full results: MLflow experiment {result.name!r} at {result.tracking_uri} (make ui); "
               f"Optuna study {result.name!r} at {result.storage} (make dashboard); "
               f"table: {result.files[0]}")
    if result.interrupted:  # the shell's convention: 128 + the signal's number
        raise typer.Exit(143 if result.interrupted == "SIGTERM" else 130)
    if result.failed:
        lv, sd, why = result.failed[0]
        fail(f"{len(result.failed)} of {len(sw.cells)} cells failed ({lv} seed {sd}: {why}"
             f"{'; ...' if len(result.failed) > 1 else ''}); all reasons in {result.files[0]}; "
             "--retry-failed runs them again", code=1)
    if not result.complete:
        fail("the study is not complete (see failed trials above); re-run to continue", code=1)


@app.command()
def figures(
    study: Optional[List[str]] = typer.Option(None, "--study", help="an MLflow experiment holding a sweep "
                                              "(repeatable); default: every sweep in the store"),
    script: bool = typer.Option(False, "--script", help="run the notebooks as plain scripts (no executed .ipynb)"),
) -> None:
    """Run the analysis notebooks headlessly: tables and figures (and executed notebooks) under results/."""
    from bov.notebooks import run_figures

    try:
        written = run_figures(study, script, log=typer.echo)
    except RuntimeError as e:  # a notebook failed
        fail(str(e), code=1)
    except ValueError as e:
        fail(str(e))
    for out in written:
        typer.echo(f"written: {out}/ ({', '.join(sorted(p.name for p in out.glob('*') if p.is_file()))})")


@app.command()
def reproduce(
    study: str = typer.Argument(..., help="a study under results/ with a record (study.json, runs.csv)"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="seeds to re-run, e.g. 0 or 0,1 (default: all)"),
    levels: Optional[str] = typer.Option(None, "--levels", help="levels to re-run, comma-separated (default: all)"),
    runs_dir_: Optional[Path] = typer.Option(None, "--runs-dir", help="scratch runs dir (default: "
                                             "<runs>/reproduce/<study>; a re-run continues it)"),
) -> None:
    """Run a committed study again (or part of it) and say per level whether it lands inside what the committed
    seeds allow; exit 1 when a level does not."""
    from bov.data import DataError
    from bov.reproduce import reproduce as run

    try:
        chosen = [int(x) for x in seeds.split(",")] if seeds else None
    except ValueError:
        fail(f"--seeds: {seeds!r} is not a comma-separated list of integers")
    try:  # a study without a record, a subset it did not run, data this machine refuses: one line
        table, stopped = run(study, chosen, levels.split(",") if levels else None, runs_dir_, log=typer.echo)
    except (ConfigError, DataError, ValueError) as e:
        fail(str(e))
    if stopped:  # the scratch study resumes; the shell's convention: 128 + the signal's number
        raise typer.Exit(143 if stopped == "SIGTERM" else 130)
    outside = table[table["inside"] == False]  # noqa: E712 (None: unchecked)
    if len(outside):
        typer.echo(f"\n{len(outside)} level(s) outside what the committed seeds allow: "
                   f"{', '.join(outside['level'])}", err=True)
        raise typer.Exit(1)


@app.command()
def sweeps() -> None:
    """List the studies under sweeps/."""
    from bov.study import SWEEPS_DIR, list_sweeps

    for name in list_sweeps():
        first = (SWEEPS_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ").strip()
        typer.echo(f"{name:<22} {first}")


register(app)  # eval, probe, generate, bench-*: bov.cli_measure


def main() -> None:
    """The `bov` command: the app, with a mistyped command line and run-state directories that cannot be used
    reported in one line, as every other bad input."""
    import os

    from bov.paths import StateDirError, StoreError

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per study.json read is noise

    def is_a(e: BaseException, name: str) -> bool:  # click's classes, whether typer vendors click or not
        return any(c.__name__ == name for c in type(e).__mro__)

    try:
        code = app(standalone_mode=False)  # usage errors reach us instead of click's boxed report
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        code = 1
    except (StateDirError, StoreError) as e:  # wherever a command first touches the runs dir or opens a store
        typer.echo(f"error: {e}", err=True)
        code = 2
    except Exception as e:
        if not is_a(e, "UsageError"):
            raise
        ctx = getattr(e, "ctx", None)
        if is_a(e, "NoArgsIsHelpError"):  # plain `bov`: the help, as before
            typer.echo(ctx.get_help() if ctx else str(e))
        else:
            typer.echo(f"error: {e.format_message()} (see `{ctx.command_path if ctx else 'bov'} --help`)", err=True)
        code = 2
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
