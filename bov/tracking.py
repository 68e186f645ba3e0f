"""The MLflow run schema, in one place: names of tags and metrics, opening, tagging, ending and marking runs
(the store itself is checked and opened by bov.mlflow_store).

Writers (bov.train, bov.sweep) and the reader (bov.analysis) use the names defined here, so a tag or a
metric is spelled once. A training run carries the flattened config as params (plus `budget.*`, `params.*`,
`regime.*`), the tags below, and the artifacts `config.yaml` and `final_metrics.json`. A sweep's parent run
(`bov.role=sweep`) carries the study definition as structured data: the `sweep.yaml` it ran and
`study.json` (axis, levels, seeds, metric, baseline level, preset, definition name).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from bov.config import load_config, resolve_bank_layers
from bov.mlflow_store import ensure_experiment
from bov.paths import StoreError
from bov.sources import corpus_origin

# ----------------------------------------------------------------------------- names

# metrics (MLflow keys; the run summary and `--json` use the same quantities under SUMMARY_KEYS)
VAL_BPB, VAL_LOSS, TRAIN_LOSS = "val/bpb", "val/loss", "train/loss"
TOKENS_PER_S, MFU = "throughput/tokens_per_s", "throughput/mfu"
TOKENS, FLOPS, PEAK_MEMORY, LR_PREFIX = "tokens", "flops", "memory/peak_gib", "lr/"  # lr/<optimizer group>
# every learned value coefficient: coeff/layerNN/<a|b>, per head coeff/layerNN/<a|b>_headH (a: on the layer's own
# value, b: on the alternative source; the paper's Figure 2)
COEFF_METRIC = re.compile(r"^coeff/layer(\d+)/([ab])(?:_head(\d+))?$")
# bov probe's per-layer measurements (the run's PROBE_ARTIFACT), with the label a figure gives each
PROBES = {"attention_entropy": "attention entropy (nats)", "first_token_mass": "attention on the first token",
          "residual_cosine": "pairwise cosine, residual stream", "value_cosine": "pairwise cosine, values",
          "value_norm": "value norm", "coeff_a": "coefficient a (own value)", "coeff_b": "coefficient b (alternative value)"}
SUMMARY_KEYS = {VAL_BPB: "val_bpb", VAL_LOSS: "val_loss", TRAIN_LOSS: "train_loss"}
EVAL_PREFIX, TASK_PREFIX = "eval/", "task/"  # bov eval: eval/<text>/<bpb|loss|tokens>, task/<task>/<metric>
PROBE_ARTIFACT = "probe.json"  # bov probe: per-layer mechanism measurements, one file per run


def eval_metric(text: str, quantity: str) -> str:
    return f"{EVAL_PREFIX}{text}/{quantity}"


def task_metric(task: str, metric: str) -> str:
    return f"{TASK_PREFIX}{task}/{metric}"


def coeff_metric(layer: int, which: str, head: int | None = None) -> str:
    return f"coeff/layer{layer:02d}/{which}" + ("" if head is None else f"_head{head}")

# tags of every training run
TAG_VARIANT, TAG_PRESET, TAG_SEED = "variant", "preset", "seed"
TAG_GIT, TAG_CONFIG_HASH, TAG_DATA, TAG_REPEATED = "git_commit", "config_hash", "data_fingerprint", "data_repeated"
TAG_ERROR, TAG_RESUMED_AFTER_ERROR = "error", "resumed_after_error"
# tags of sweep trials and of a sweep's parent run
TAG_STUDY, TAG_TRIAL, TAG_AXIS, TAG_LEVEL, TAG_CELL_SEED = "bov.study", "bov.trial", "bov.axis", "bov.level", "bov.seed"
TAG_COORD = "bov.coord."  # + axis: a crossed study's cell, its level on that axis (bov.coord.budget = 2x)
TAG_SWEEP_FILE, TAG_ROLE, TAG_PRUNED_AT = "bov.sweep_file", "bov.role", "bov.pruned_at_step"
TAG_SWEEP_PROCESS = "bov.sweep_process"  # on a sweep's parent run: "host:pid:start time" of the sweep running it
TAG_FAILED_CELLS = "bov.failed_cells"  # on a sweep's parent run: "level seed N: reason; ..."
ROLE_SWEEP = "sweep"
TAG_NOTE = "mlflow.note.content"  # MLflow's own: a run's description, rendered as markdown
# the layers the value axes act on (value_source's targets) and those of them that hold a bank table: "4,5"
TAG_TARGET_LAYERS, TAG_BANK_LAYERS = "bov.target_layers", "bov.bank_layers"
TAG_CORPUS = "bov.corpus"  # a named corpus (bov.corpora): which copy it read, and the corpus digest
# What a run's setup derives (budget, parameter counts, data regime: `budget.tokens`, `params.bank`, ...) is
# logged as metrics at step 0 named SETUP + key (one section of the MLflow chart view), not as params: params are
# the settings a user chose. Older stores hold them as params; the analysis reads either (bov.analysis.load_runs).
SETUP = "setup/"
STUDY_ARTIFACT, SWEEP_ARTIFACT = "study.json", "sweep.yaml"

# Optuna study / trial attributes that point at MLflow
STUDY_PARENT_RUN, STUDY_TRACKING_URI, TRIAL_RUN_ID = "mlflow_parent_run_id", "mlflow_tracking_uri", "mlflow_run_id"


@functools.cache  # the code this process runs: what was checked out when it started, not a later commit
def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _log_params(client, run_id: str, params: dict[str, Any]) -> None:
    """Params as MLflow shows them: None (a setting left unset) is not logged."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items() if v is not None]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[i : i + 100])


def _log_derived(client, run_id: str, values: dict[str, Any]) -> None:
    """A run's derived numbers as metrics at step 0 (timestamp 0, so a resumed run's re-log adds no history)."""
    from mlflow.entities import Metric

    items = [Metric(SETUP + k, float(v), 0, 0) for k, v in values.items() if v is not None]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, metrics=items[i : i + 100])


def run_name(cfg, tags: dict[str, str] | None = None) -> str:
    """What the MLflow UI lists a run as: `tracking.run_name` if set; a sweep cell's level and seed
    (`last_third s0`); else `<preset>/<variant>` and the settings that differ from them (`tiny/bov
    model.bank_layers=all train.seed=1`; a path shows its file name)."""

    tags = tags or {}
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    if TAG_LEVEL in tags and TAG_CELL_SEED in tags:
        return f"{tags[TAG_LEVEL]} s{tags[TAG_CELL_SEED]}"
    try:
        default = load_config(cfg.preset, cfg.variant).flat()
    except Exception:  # a preset or variant file gone since: the name still says what it is
        default = {}
    changed = [f"{k}={Path(str(v)).name if isinstance(v, str) and '/' in v else v}" for k, v in cfg.flat().items()
               if not k.startswith("tracking.") and default.get(k, v) != v]
    return " ".join([f"{cfg.preset}/{cfg.variant}", *changed])[:250]


# ----------------------------------------------------------------------------- training runs


def open_run(cfg, uri: str, *, run_name: str, params: dict[str, Any], data: dict[str, str], repeated: bool,
             state_path: Path, resume: bool = False, extra_tags: dict[str, str] | None = None,
             parent_run_id: str | None = None) -> str:
    """Create a training run (the config as params, `params`: what its setup derived, as metrics; tags; the
    config artifact) and remember its id (and the data identity it is trained on) in `state_path`; on resume,
    reopen the stored run, keeping why it stopped as `resumed_after_error`."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment(cfg.tracking.experiment, uri)  # first: it creates the store, one at a time
    client = mlflow.MlflowClient(uri)
    if resume and state_path.is_file():
        run_id = resumed_run_id(uri, state_path)
        client.update_run(run_id, status="RUNNING")
        error = client.get_run(run_id).data.tags.get(TAG_ERROR)
        if error:  # the run goes on: keep why it stopped, but not as its error
            client.set_tag(run_id, TAG_RESUMED_AFTER_ERROR, error)
            client.delete_tag(run_id, TAG_ERROR)
        for k, v in (extra_tags or {}).items():  # e.g. the sweep trial that took the run over
            client.set_tag(run_id, k, v)
        return run_id

    targets = resolve_bank_layers(cfg.model.bank_layers, cfg.model.n_layers)
    tags = {TAG_VARIANT: cfg.variant, TAG_PRESET: cfg.preset, TAG_SEED: str(cfg.train.seed), TAG_GIT: git_commit(),
            TAG_CONFIG_HASH: cfg.config_hash(), TAG_DATA: data["fingerprint"], TAG_REPEATED: str(repeated).lower(),
            TAG_TARGET_LAYERS: ",".join(map(str, targets)),
            TAG_BANK_LAYERS: ",".join(map(str, targets)) if cfg.model.value_source == "bank" else "",
            **_corpus_tag(cfg, data), **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id = client.create_run(experiment_id, tags=tags, run_name=run_name).info.run_id
    tmp = state_path.with_name(f".{state_path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"run_id": run_id, "data": data}))
    os.replace(tmp, state_path)  # never a half-written run.json
    _log_params(client, run_id, cfg.flat())
    _log_derived(client, run_id, params)
    client.log_text(run_id, cfg.to_yaml(), "config.yaml")
    return run_id


def _corpus_tag(cfg, data: dict) -> dict[str, str]:
    """`bov.corpus`: where a named corpus's training and validation text came from (a local copy or its public
    build) and the digest of what was read; no tag for text given by path."""
    said = [o for o in dict.fromkeys(map(corpus_origin, (cfg.data.source, cfg.data.val_source))) if o]
    return {TAG_CORPUS: f"{'; '.join(said)}; corpus digest {data.get('corpus', '?')}"} if said else {}


def resumed_run_id(uri: str, state_path: Path) -> str:
    """The MLflow run a run directory continues; a damaged run.json, or a run this store does not hold (a runs
    dir copied without its store), is one line, and no store is created to find that out."""
    import mlflow

    try:
        run_id = json.loads(state_path.read_text())["run_id"]
        assert isinstance(run_id, str)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise StoreError(f"--resume: {state_path} is damaged (no run id); move the run directory away and start "
                         "a new run (without --resume)") from None
    try:
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
            raise FileNotFoundError(uri)
        mlflow.MlflowClient(uri).get_run(run_id)
    except Exception:
        raise StoreError(f"--resume: {state_path} continues MLflow run {run_id}, which the store {uri} does not "
                         "hold (a runs dir moved without its store?); point MLFLOW_TRACKING_URI at the store it "
                         "was logged to, or start a new run (without --resume)") from None
    return run_id


def end_run(uri: str, run_id: str, status: str, error: str | None, summary: dict[str, Any]) -> None:
    """The final status, the error (if any) as a tag, and the run summary as `final_metrics.json`."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    if error:
        client.set_tag(run_id, TAG_ERROR, error[:5000])
    client.log_dict(run_id, summary, "final_metrics.json")
    client.set_terminated(run_id, status=status)


def mark_pruned(uri: str, run_id: str, step: int) -> None:
    import mlflow

    client = mlflow.MlflowClient(uri)
    client.set_tag(run_id, TAG_PRUNED_AT, str(step))
    client.set_terminated(run_id, status="KILLED")


def mark_lost_run(study, trial, why: str = "no heartbeat") -> None:
    """A trial whose worker died (Optuna's heartbeat callback, or a dead local pid): its MLflow run ends
    KILLED with the reason, not RUNNING forever."""
    import mlflow

    uri = study.user_attrs.get(STUDY_TRACKING_URI)
    run_id = trial.user_attrs.get(TRIAL_RUN_ID)
    if not uri or not run_id:
        return
    client = mlflow.MlflowClient(uri)
    with contextlib.suppress(Exception):
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, TAG_ERROR, f"worker lost ({why}); trial {trial.number} will be retried")
            client.set_terminated(run_id, status="KILLED")


# ----------------------------------------------------------------------------- sweeps


ANALYSIS_ONLY = ("references", "paper")  # study-file keys no cell's config depends on


def study_definition(sweep) -> dict[str, Any]:
    """What the analysis needs to know of a study, as data (not strings to parse back)."""
    spec = sweep.spec
    return {"study": sweep.name, "definition": spec.study, "axis": spec.axis, "levels": sweep.levels,
            "seeds": sweep.seeds, "metric": spec.metric, "baseline_level": spec.baseline_level,
            "references": sweep.references, "paper": spec.paper.model_dump() if spec.paper else None,
            "axes": sweep.axes,
            "preset": sweep.preset, "sampler": spec.sampler, "sweep_file": sweep.path.name,
            "overrides": sweep.overrides,  # the sweep command's --set, on every cell
            "budget": {k: v for k, v in sweep.cells[0].overrides.items() if k.startswith("train.max_") and v is not None}}


def create_sweep_run(sweep, uri: str, experiment_id: str, storage_url: str) -> str:
    """The study's parent run: tags, typed params, and the definition as `sweep.yaml` and `study.json`."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    spec = sweep.spec
    tags = {TAG_STUDY: sweep.name, TAG_AXIS: spec.axis, TAG_SWEEP_FILE: sweep.path.name, TAG_ROLE: ROLE_SWEEP,
            TAG_PRESET: sweep.preset, TAG_GIT: git_commit(),
            "optuna_storage": storage_url.split("@")[-1]}  # never a password
    run_id = client.create_run(experiment_id, tags=tags, run_name=f"sweep {sweep.name}").info.run_id
    definition = study_definition(sweep)
    _log_params(client, run_id, {"axis": spec.axis, "sampler": spec.sampler, "metric": spec.metric,
                                 "preset": sweep.preset, "baseline_level": spec.baseline_level or "-",
                                 "n_levels": len(sweep.levels), "n_seeds": len(sweep.seeds),
                                 **{f"budget.{k.removeprefix('train.')}": v for k, v in definition["budget"].items()}})
    client.log_text(run_id, sweep.path.read_text(), SWEEP_ARTIFACT)
    client.log_dict(run_id, definition, STUDY_ARTIFACT)
    return run_id


def extend_sweep_run(sweep, uri: str, run_id: str) -> None:
    """A study continued with more levels or seeds: the parent run's recorded definition grows to hold them
    (levels and seeds recorded before stay, in their order), so the analysis lists every level that ran. What
    only the analysis reads (references, the paper's claims) follows the study file. The params logged at
    creation stay: MLflow params cannot change."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    try:
        old = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{STUDY_ARTIFACT}"))
    except Exception:
        old = read_study_definition(run)
    new = study_definition(sweep)
    grown = {"levels": list(dict.fromkeys([*old.get("levels", []), *new["levels"]])),
             "seeds": list(dict.fromkeys([*old.get("seeds", []), *new["seeds"]])),
             "axes": _grown_axes(old.get("axes") or [], new["axes"])}
    analysis = {k: new[k] for k in ANALYSIS_ONLY}
    if all(old.get(k) == v for k, v in {**grown, **analysis}.items()):
        return
    client.log_text(run_id, sweep.path.read_text(), SWEEP_ARTIFACT)
    client.log_dict(run_id, {**old, **{k: v for k, v in new.items() if k not in old}, **analysis, **grown},
                    STUDY_ARTIFACT)


def _grown_axes(old: list[dict], new: list[dict]) -> list[dict]:
    """A crossed study's axes with each axis's levels grown the same way (recorded ones first, in their order)."""
    before = {ax["name"]: ax["levels"] for ax in old}
    return [{**ax, "levels": list(dict.fromkeys([*before.get(ax["name"], []), *ax["levels"]]))} for ax in new]


def read_study_definition(run) -> dict[str, Any]:
    """A parent run's study definition: `study.json`, or (stores written before it existed) the comma-joined
    params and `sweep.yaml` of the older schema."""
    import mlflow
    import yaml

    run_id = run.info.run_id
    with contextlib.suppress(Exception):
        return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{STUDY_ARTIFACT}"))
    p = run.data.params
    out = {"axis": p.get("axis", "level"), "levels": [lv for lv in p.get("levels", "").split(",") if lv],
           "metric": p.get("metric", "val/bpb"), "preset": p.get("preset"), "baseline_level": None, "definition": None,
           "references": [], "paper": None}
    with contextlib.suppress(Exception):
        spec = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/{SWEEP_ARTIFACT}"))
        out.update(baseline_level=spec.get("baseline_level"), definition=spec.get("study"))
    return out


def metric_key(*parts: str) -> str:
    """A metric name MLflow accepts (alphanumerics, _ - . space : /), from level names that may hold others."""
    import re

    return "/".join(re.sub(r"[^\w\-. :]", "_", str(p)) for p in parts)


def publish_study(uri: str, parent: str, description: str, metrics: dict[str, float], step: int,
                  cells: dict[str, dict[str, float]] | None = None, names: dict[str, str] | None = None) -> None:
    """The study's answer where the MLflow UI shows it: the parent run's description (markdown) and its
    per-level metrics, each cell's own delta as a metric of its run (a column of the runs table), and the cells'
    `names` (a run of an older store keeps its hash name until then). Logged at
    `step` (the count of finished cells) with timestamp = step, so a re-run with the same cells adds no history."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(uri)
    client.set_tag(parent, TAG_NOTE, description[:60000])
    for run_id, name in (names or {}).items():
        if client.get_run(run_id).info.run_name != name:
            client.update_run(run_id, name=name)
    for run_id, values in [(parent, metrics), *(cells or {}).items()]:
        items = [Metric(k, float(v), step, step) for k, v in values.items() if v is not None and v == v]
        for i in range(0, len(items), 500):
            client.log_batch(run_id, metrics=items[i : i + 500])


def attach_results(uri: str, parent: str, folder: Path, description: str | None = None) -> None:
    """`make figures`' tables and figures as the parent run's `results/` artifacts (a re-run overwrites them),
    and its table as the description."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    client.log_artifacts(parent, str(folder), artifact_path="results")
    if description:
        client.set_tag(parent, TAG_NOTE, description[:60000])


def mark_sweep_process(uri: str, parent: str) -> None:
    """Record on the parent run which process runs the sweep now (see retire_dead_sweep)."""
    import socket
    import time

    import mlflow

    who = f"{socket.gethostname()}:{os.getpid()}:{time.time():.0f}"
    mlflow.MlflowClient(uri).set_tag(parent, TAG_SWEEP_PROCESS, who)


def retire_dead_sweep(uri: str, parent: str) -> bool:
    """A parent run left RUNNING by a sweep process of this machine that is gone (SIGKILL, a crash) ends KILLED,
    saying so; True when it did. Another machine's sweep is never judged from here."""
    import socket

    import mlflow

    from bov.paths import process_alive

    client = mlflow.MlflowClient(uri)
    run = client.get_run(parent)
    host, _, rest = run.data.tags.get(TAG_SWEEP_PROCESS, "").partition(":")
    pid, _, since = rest.partition(":")
    if run.info.status != "RUNNING" or host != socket.gethostname() or not pid.isdigit() or not since.isdigit():
        return False
    if process_alive(int(pid), float(since)):
        return False
    client.set_tag(parent, TAG_ERROR, f"the sweep process {pid} on {host} is gone (killed, or it crashed); re-run "
                                      "the sweep to continue the study")
    client.set_terminated(parent, status="KILLED")
    return True


def sweep_parent(uri: str, experiment: str) -> str | None:
    """The run id of the sweep parent run of an experiment (the oldest, if several)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = '{ROLE_SWEEP}'",
                               order_by=["attributes.start_time ASC"], max_results=1)
    return found[0].info.run_id if found else None


def log_probe(uri: str, run_id: str, result: dict[str, Any]) -> None:
    """`bov probe`'s measurements as the run's PROBE_ARTIFACT (replacing an earlier one)."""
    import mlflow

    mlflow.MlflowClient(uri).log_dict(run_id, result, PROBE_ARTIFACT)


def read_probe(uri: str, run_id: str) -> dict[str, Any] | None:
    """The run's probe artifact, or None when `bov probe` has not been run on it."""
    import tempfile

    import mlflow

    client = mlflow.MlflowClient(uri)  # this store, without touching the process-wide tracking URI
    if not any(f.path == PROBE_ARTIFACT for f in client.list_artifacts(run_id)):
        return None
    with tempfile.TemporaryDirectory() as d:
        return json.loads(Path(client.download_artifacts(run_id, PROBE_ARTIFACT, d)).read_text())


def retire_orphan_runs(uri: str, experiment: str, cell_tags: dict[str, str], keep: str | None = None) -> int:
    """Delete the RUNNING runs of one sweep cell (its study, level and seed tags) other than `keep`: runs of a
    worker killed between creating its run and recording it (or before its first checkpoint), which nothing
    will ever end. Called by the one worker that holds the cell, so no live run is touched; a cell keeps one run."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in cell_tags.items()) + " and attributes.status = 'RUNNING'"
    gone = 0
    for run in client.search_runs([exp.experiment_id], filter_string=query, max_results=1000):
        if run.info.run_id != keep:
            client.set_terminated(run.info.run_id, status="KILLED")
            client.delete_run(run.info.run_id)
            gone += 1
    return gone
