"""`bov reproduce`: run a committed study again, or part of it, and say per level whether the new runs fall
where the committed seeds say they should.

`make figures` writes, next to a study's tables, `study.json` (its definition, as its MLflow parent run
records it, and the commit it ran at) and `runs.csv` (every run: level, seed, metric, config hash). From
those, `reproduce` resolves the study file again (`--seeds`, `--levels` pick a subset), refuses in one line
when a cell's config is no longer the one recorded (its hash: a preset or the study file changed since; check
out the recorded commit), runs the cells in a scratch runs dir (the token caches are shared), and compares:

* a level's new mean against its committed mean, allowing what the committed seeds' spread allows for a mean
  of that many new seeds: |new - committed| <= t(0.975, n-1) * sd * sqrt(1/n + 1/k) (a 95% prediction
  interval; n committed seeds, k new ones);
* each new seed against the committed run of the same seed (the difference is shown; on the same machine and
  software it is 0 or close to it).

When the new runs read other text than the committed ones (the record's `data_fingerprint`, or for older
records the runs' `bov.corpus` tag: a named corpus's public equivalent, or a local copy of other bytes), their
absolute numbers are not expected to match: each level's paired difference from the study's reference level is
compared instead, in the same way, the reference's own row left out.

A level outside its interval makes the exit code 1. It is the researcher's way to check a committed claim
before trusting it, and the maintainers' regression check after a change.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bov.analysis import RECORD, RUNS, load_runs, references_of, results_dir


class ReproduceError(ValueError):
    """A study that cannot be re-run as recorded: one line."""


@dataclass
class Committed:
    name: str
    folder: Path
    definition: dict
    runs: pd.DataFrame  # level, seed, metric, config_hash


def load_committed(study: str, results: Path) -> Committed:
    folder = results / study
    if not (folder / RECORD).is_file() or not (folder / RUNS).is_file():
        have = sorted(p.parent.name for p in results.glob(f"*/{RECORD}"))
        raise ReproduceError(f"{folder}: no committed study to reproduce ({RECORD} and {RUNS}, written by make "
                             f"figures); studies with a record: {', '.join(have) or 'none'}")
    return Committed(study, folder, json.loads((folder / RECORD).read_text()), pd.read_csv(folder / RUNS))


def resolve(committed: Committed, seeds: list[int] | None, levels: list[str] | None, name: str):
    """The recorded study file at the recorded scale, narrowed to the chosen seeds and levels, each cell checked
    against the config it ran with."""
    from bov.config import ConfigError
    from bov.study import SWEEPS_DIR, load_sweep

    d = committed.definition
    stem = Path(d.get("sweep_file") or f"{d['definition']}.yaml").stem
    if not (SWEEPS_DIR / f"{stem}.yaml").is_file():
        raise ReproduceError(f"{committed.folder / RECORD}: its study file sweeps/{stem}.yaml is gone; check out "
                             f"the commit it ran at ({d.get('git_commit') or 'unknown'})")
    known = sorted(set(committed.runs["level"]))
    if bad := [lv for lv in levels or [] if lv not in known]:
        raise ReproduceError(f"--levels: {bad[0]!r} is not a level of {committed.name} ({', '.join(known)})")
    ran = sorted(set(committed.runs["seed"]))
    if bad := [s for s in seeds or [] if s not in ran]:
        raise ReproduceError(f"--seeds: {bad[0]} is not a seed {committed.name} ran ({', '.join(map(str, ran))})")
    try:
        sweep = load_sweep(stem, scale=d.get("preset"), seeds=seeds or ran, study=name, overrides=d.get("overrides"))
    except ConfigError as e:
        raise ReproduceError(str(e)) from None
    sweep.cells = [c for c in sweep.cells if (not levels or c.level in levels) and c.level in known]
    recorded = {(r["level"], int(r["seed"])): r.get("config_hash") for r in committed.runs.to_dict("records")}
    for c in sweep.cells:
        was = recorded.get((c.level, c.seed))
        if isinstance(was, str) and was != c.cfg.config_hash():
            raise ReproduceError(f"{stem}: level {c.level} seed {c.seed} now resolves to config {c.cfg.config_hash()}, "
                                 f"not the {was} it ran with (a preset or the study file changed since); check out "
                                 f"the commit it ran at ({d.get('git_commit') or 'unknown'})")
    return sweep


def other_data(committed: Committed, new: pd.DataFrame) -> str | None:
    """Why the new runs' text is not the committed runs' (None when it is, or nothing says otherwise)."""
    from bov.sources import SAME_BYTES

    if "data_fingerprint" in committed.runs and "data_fingerprint" in new:
        was, now = set(committed.runs["data_fingerprint"].dropna()), set(new["data_fingerprint"].dropna())
        if now and not now <= was:
            return f"data fingerprint {', '.join(sorted(now))}, not the committed {', '.join(sorted(was))}"
        return None
    said = sorted({o for o in new.get("corpus", pd.Series(dtype=object)).dropna() if SAME_BYTES not in o})
    return "; ".join(said) or None


def reference_of(committed: Committed) -> str:
    """The level differences are taken from: the study's first reference, as its tables take it."""
    return (references_of(committed.definition) or ["baseline"])[0]


def as_deltas(runs: pd.DataFrame, metric: str, reference: str) -> pd.DataFrame:
    """Each run's metric minus its seed's run of the reference level (the reference's rows dropped)."""
    base = runs[runs["level"] == reference].set_index("seed")[metric]
    out = runs[runs["level"] != reference].copy()
    out[metric] = out[metric].to_numpy() - base.reindex(out["seed"]).to_numpy()
    return out.dropna(subset=[metric])


def compare(committed: Committed, new: pd.DataFrame, metric: str, confidence: float = 0.95) -> pd.DataFrame:
    """Per level: committed mean ± sd (n seeds), the new mean (k seeds), the allowed half-width, inside or not,
    and the largest same-seed difference."""
    from scipy import stats

    rows = []
    old = committed.runs
    for level, g in new.groupby("level", sort=False):
        was = old[old["level"] == level]
        n, k = len(was), len(g)
        m, sd = was[metric].mean(), was[metric].std(ddof=1) if n > 1 else math.nan
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd * math.sqrt(1 / n + 1 / k) if n > 1 else math.nan
        same = g.merge(was[["seed", metric]], on="seed", suffixes=("", " committed"))
        diff = (same[metric] - same[f"{metric} committed"]).abs().max() if len(same) else math.nan
        new_mean = g[metric].mean()
        inside = None if math.isnan(half) else bool(abs(new_mean - m) <= half)
        rows.append({"level": level, "committed": m, "sd": sd, "n": n, "new": new_mean, "k": k, "allowed": half,
                     "inside": inside, "same-seed diff": diff})
    return pd.DataFrame(rows)


def format_comparison(table: pd.DataFrame, metric: str) -> str:
    def verdict(r) -> str:
        if r["inside"] is None:
            return "unchecked: one committed seed has no spread"
        return "inside" if r["inside"] else "OUTSIDE"

    shown = pd.DataFrame({
        "level": table["level"],
        f"committed {metric}": [f"{m:.4f} ± {s:.4f} (n={n})" if not math.isnan(s) else f"{m:.4f} (n=1)"
                                for m, s, n in zip(table["committed"], table["sd"], table["n"])],
        "new": [f"{v:.4f} (k={k})" for v, k in zip(table["new"], table["k"])],
        "95% allowed": [("-" if math.isnan(h) else f"±{h:.4f}") for h in table["allowed"]],
        "same-seed diff": [("-" if math.isnan(d) else f"{d:.2e}") for d in table["same-seed diff"]],
        "verdict": [verdict(r) for r in table.to_dict("records")]})
    return shown.to_markdown(index=False, disable_numparse=True)


def reproduce(study: str, seeds: list[int] | None, levels: list[str] | None, scratch: Path | None,
              log=print) -> tuple[pd.DataFrame | None, str | None]:
    """`bov reproduce`: re-run the chosen cells of a committed study in a scratch runs dir (`<runs>/reproduce/
    <study>`; a re-run continues it; the token caches are shared), print the comparison and return it, or None
    and the signal that interrupted the sweep. Points this process's runs dir, cache dir and MLflow store at the
    scratch ones."""
    import os

    from bov.paths import cache_dir, runs_dir
    from bov.sweep import run_sweep

    committed = load_committed(study, results_dir())
    scratch = (scratch or runs_dir() / "reproduce" / study).resolve()
    name = f"{study}-reproduce"
    os.environ["BOV_CACHE_DIR"] = str(cache_dir("tokens").parent)  # caches shared: the scratch dir only runs
    os.environ["BOV_RUNS_DIR"] = str(scratch)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"  # never the user's own server
    sweep = resolve(committed, seeds, levels, name)
    metric = committed.definition.get("metric", "val/bpb")
    log(f"reproducing {len(sweep.cells)} cell(s) of {study} in {scratch}")
    if stopped := run_sweep(sweep, workers=1, storage=f"sqlite:///{scratch / 'optuna.db'}").interrupted:
        return None, stopped
    new, shown = load_runs(name, os.environ["MLFLOW_TRACKING_URI"]), metric
    if (why := other_data(committed, new)) and (ref := reference_of(committed)) in set(new["level"]):
        log(f"\nthese runs read other text than the committed ones ({why}): their {metric} is not expected to "
            f"match, so each level's paired difference from {ref} is compared instead")
        committed = Committed(committed.name, committed.folder, committed.definition,
                              as_deltas(committed.runs, metric, ref))
        new, shown = as_deltas(new, metric, ref), f"{metric} - {ref}"
    elif why:
        log(f"\nthese runs read other text than the committed ones ({why}); re-run with --levels including "
            f"{reference_of(committed)} to compare differences rather than {metric}")
    table = compare(committed, new[["level", "seed", metric]], metric)
    log(f"\n{study}: committed (results/{study}/runs.csv) against this machine's runs\n")
    log(format_comparison(table, shown))
    return table, None
