"""Analysis: a real MLflow store with known values -> exact table numbers, figures and notebooks on disk."""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.entities import Metric, Param

from bov import analysis as A
from bov import stats as S
from bov import tracking

T_975_DF2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom
BPB = {  # level -> {seed: final val/bpb}
    "base": {0: 1.0, 1: 1.2, 2: 1.1},
    "paired": {0: 0.9, 1: 1.0, 2: 1.05},  # same seeds as base: paired t
    "unpaired": {0: 0.8, 1: 0.9, 3: 1.0},  # another seed set: bootstrap
    "single": {0: 0.95},  # one seed: no interval
}
TOKENS_PER_STEP, STEPS, TRAIN_TOKENS, FPT = 1000, 20, 5000, 3.0e6
SPLIT = {"matrix": 800, "embedding": 100, "unembedding": 100, "bank": 50, "scalar": 2}


def _run(client, exp_id, parent, level, seed, bpb, status="FINISHED", study="demo-micro"):
    run = client.create_run(exp_id, tags={"bov.study": study, "bov.level": level, "bov.seed": str(seed),
                                          "seed": str(seed), "variant": "bov", "preset": "micro",
                                          "mlflow.parentRunId": parent})
    rid = run.info.run_id
    params = {"budget.tokens": TOKENS_PER_STEP * STEPS, "budget.steps": STEPS, "budget.flops_per_token": FPT,
              "data.train_tokens": TRAIN_TOKENS, "model.bank_layers": "last_third", "variant": "bov",
              **{f"params.{k}": v for k, v in SPLIT.items()},
              **({"regime.unique_tokens": 2500} if level == "single" else {})}  # data.max_unique_tokens
    metrics = [Metric("val/bpb", bpb + 0.5, 0, 10), Metric("val/bpb", bpb, 0, 20),
               Metric("val/loss", 2 * bpb, 0, 20), Metric("tokens", TOKENS_PER_STEP * STEPS, 0, 20),
               Metric("throughput/tokens_per_s", 500.0 + seed, 0, 20),
               Metric("coeff/layer02/b", 1.0 + seed, 0, 20), Metric("coeff/layer03/b", 2.0 + seed, 0, 20)]
    client.log_batch(rid, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(rid, status=status)
    return rid


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An MLflow store holding sweep `demo-micro` (parent + trials, one FAILED) and `variants-micro`."""
    from bov.mlflow_store import ensure_experiment

    monkeypatch.setenv("BOV_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    for name, definition, levels in (("demo-micro", "demo", list(BPB)), ("variants-micro", "variants", ["base", "paired"])):
        exp = ensure_experiment(name, uri)
        parent = client.create_run(exp, tags={"bov.role": "sweep", "bov.study": name}).info.run_id
        client.log_batch(parent, params=[Param("axis", "variant"), Param("levels", ",".join(levels)),
                                         Param("metric", "val/bpb"), Param("preset", "micro")])
        client.log_text(parent, yaml.safe_dump({"study": definition, "baseline_level": "base"}), "sweep.yaml")
        for level in levels:
            for seed, bpb in BPB[level].items():
                _run(client, exp, parent, level, seed, bpb, study=name)
        client.set_terminated(parent, "FINISHED")
    _run(client, client.get_experiment_by_name("demo-micro").experiment_id, parent, "base", 9, 0.1, status="FAILED")
    return uri


def test_load_study_reads_runs_and_definition(store):
    study = A.load_study("demo-micro", store)
    assert (study.axis, study.levels, study.baseline, study.definition) == ("variant", list(BPB), "base", "demo")
    runs = study.runs
    assert len(runs) == 10 and set(runs["status"]) == {"FINISHED"}  # no parent, no FAILED run
    r = runs[(runs["level"] == "paired") & (runs["seed"] == 1)].iloc[0]
    assert r["val/bpb"] == 1.0 and r["val/loss"] == 2.0 and r["model.bank_layers"] == "last_third"
    assert r["params"] == sum(SPLIT.values()) and r["params_non_embedding"] == 800 + 100 + 2
    assert r["epochs"] == pytest.approx(20_000 / 5000) and r["tokens_per_s"] == 501.0
    assert runs["wall_s"].notna().all() and (runs["wall_s"] >= 0).all()  # start to end of each run
    assert r["tokens_per_param"] == pytest.approx(20_000 / sum(SPLIT.values()))
    assert A.sweep_experiments(store) == ["demo-micro", "variants-micro"]


def test_history_has_tokens_and_flops_per_step(store):
    study = A.load_study("demo-micro", store)
    h = A.load_history(study.runs[study.runs["level"] == "single"], tracking_uri=store)
    bpb = h[h["metric"] == "val/bpb"]
    assert list(bpb["step"]) == [10, 20] and list(bpb["value"]) == [1.45, 0.95]
    assert list(bpb["tokens"]) == [10_000, 20_000] and list(bpb["flops"]) == [10_000 * FPT, 20_000 * FPT]


def test_comparison_table_numbers_are_exact(store):
    study = A.load_study("demo-micro", store)
    t = S.compare(study.runs, baseline="base", order=study.levels).set_index("level")
    assert list(t.index) == list(BPB)
    for level, vals in BPB.items():
        assert t.loc[level, "runs"] == len(vals)
        assert t.loc[level, "val/bpb mean"] == pytest.approx(statistics.fmean(vals.values()))
        assert t.loc[level, "val/loss mean"] == pytest.approx(2 * statistics.fmean(vals.values()))
    assert t.loc["base", "val/bpb std"] == pytest.approx(statistics.stdev([1.0, 1.2, 1.1]))
    assert math.isnan(t.loc["single", "val/bpb std"])
    # paired by seed: d = (-0.1, -0.2, -0.05)
    d = [-0.1, -0.2, -0.05]
    half = T_975_DF2 * statistics.stdev(d) / math.sqrt(3)
    assert t.loc["paired", "delta"] == pytest.approx(statistics.fmean(d))
    assert (t.loc["paired", "ci_low"], t.loc["paired", "ci_high"]) == pytest.approx((statistics.fmean(d) - half,
                                                                                     statistics.fmean(d) + half))
    assert t.loc["paired", "ci_method"] == "paired t, n=3"
    # different seeds: bootstrap of the difference of means, reproducible, around the point estimate
    assert t.loc["unpaired", "delta"] == pytest.approx(0.9 - 1.1)
    assert t.loc["unpaired", "ci_method"].startswith("bootstrap")
    assert t.loc["unpaired", "ci_low"] < -0.2 < t.loc["unpaired", "ci_high"] < 0
    again = S.compare(study.runs, baseline="base").set_index("level")
    assert again.loc["unpaired", "ci_low"] == t.loc["unpaired", "ci_low"]
    # one seed: a delta, no invented interval
    assert t.loc["single", "delta"] == pytest.approx(0.95 - 1.1) and math.isnan(t.loc["single", "ci_low"])
    assert t.loc["base", "ci_method"] == "baseline"
    assert t.loc["paired", "flops_per_token"] == FPT and t.loc["paired", "epochs"] == pytest.approx(4.0)
    assert t.loc["single", "epochs"] == pytest.approx(8.0)  # over its unique prefix, not the whole stream
    assert t.loc["paired", "tokens_per_param_non_embedding"] == pytest.approx(20_000 / 902)


def md_rows(text: str) -> dict[str, list[str]]:
    """A Markdown table -> first cell -> the other cells."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    return {r[0]: r[1:] for r in rows if not r[0].startswith(":")}


def test_tables_written_as_markdown_csv_latex(store, tmp_path):
    study = A.load_study("demo-micro", store)
    table = S.compare(study.runs, baseline="base", order=study.levels)
    csv, md, tex = A.write_table(table, tmp_path / "out", "table", baseline="base", caption="demo")
    assert pd.read_csv(csv)["val/bpb mean"].round(6).tolist() == [1.1, 0.983333, 0.9, 0.95]
    rows = md_rows(md.read_text())
    assert rows["level"][:4] == ["seeds", "val/bpb", "Δ vs base (95% CI)", "val/loss"] and "epochs" in rows["level"]
    assert rows["paired"][:3] == ["3", "0.9833 ± 0.0764", "-0.1167 [-0.3064, +0.0731]"]
    assert rows["single"][:3] == ["1", "0.9500", "-0.1500 (single seed)"]  # no invented interval
    assert rows["base"][2] == "(baseline)"
    latex = tex.read_text()
    assert r"\begin{tabular}" in latex and r"$\pm$" in latex and r"\caption{demo}" in latex


def test_every_figure_is_written(store, tmp_path):
    study = A.load_study("demo-micro", store)
    out = tmp_path / "figs"
    history = A.load_history(study.runs, tracking_uri=store)
    files = A.save(A.plot_curves(history, order=study.levels, highlight="base"), out, "curves")
    files += A.save(A.plot_coefficients(A.coefficients(study.runs)), out, "coefficients")
    files += A.save(A.plot_axis(study.runs, order=study.levels, baseline="base"), out, "axis")
    measured = pd.DataFrame({"vocab": [32768], "context": [65536], "saved_bytes": [4 * 768 * 2 * (65536 - 32768)]})
    files += A.save(A.plot_vcache("135m", "bov", measured=measured), out, "vcache")
    files += A.save(A.plot_epochs(study.runs, hue="level"), out, "epochs")
    assert len(files) == 10 and all(p.stat().st_size > 1000 for p in files)
    import time

    first = {p: p.read_bytes() for p in files if p.name.startswith("vcache")}
    time.sleep(1.1)  # a PDF's creation date has a resolution of one second
    A.save(A.plot_vcache("135m", "bov", measured=measured), out, "vcache")
    assert all(p.read_bytes() == b for p, b in first.items())  # drawn again: the same bytes, no churn in results/


def test_coefficients_are_final_values_per_layer(store):
    study = A.load_study("demo-micro", store)
    c = A.coefficients(study.runs).set_index(["level", "seed", "layer", "coeff"])["value"]
    assert c[("paired", 1, 3, "b")] == 3.0 and c[("single", 0, 2, "b")] == 1.0


def test_coefficient_table_rows_in_study_order_blank_where_a_layer_has_no_bank(tmp_path):
    runs = pd.DataFrame({"level": ["all", "last", "all"], "seed": [0, 0, 1],
                         "coeff/layer00/b": [0.031, None, 0.5], "coeff/layer01/b": [1.0, 2.456, 0.25]})
    shown = A.coefficient_table(runs, tmp_path, "t", order=["last", "all"])
    assert list(shown.index) == [("last", 0), ("all", 0), ("all", 1)]
    assert shown.loc[("last", 0)].tolist() == ["", "2.46"] and shown.loc[("all", 0)].tolist() == ["0.03", "1.00"]
    assert (tmp_path / "coefficients.md").read_text().startswith("t\n\n| level")


def test_compare_within_uses_the_baseline_of_the_same_group():
    rows = [("baseline", "1x", 0, 1.50), ("baseline", "1x", 1, 1.52), ("bov", "1x", 0, 1.40), ("bov", "1x", 1, 1.43),
            ("baseline", "0.25x", 0, 1.60), ("baseline", "0.25x", 1, 1.62), ("bov", "0.25x", 0, 1.61),
            ("bov", "0.25x", 1, 1.64)]
    runs = pd.DataFrame(rows, columns=["variant", "data.max_unique_tokens", "seed", "val/bpb"])
    t = S.compare_within(runs, group="data.max_unique_tokens").set_index(["data.max_unique_tokens", "variant"])
    assert t.loc[("1x", "bov"), "delta"] == pytest.approx(-0.095)
    assert t.loc[("0.25x", "bov"), "delta"] == pytest.approx(0.015)  # against 0.25x's baseline, not 1x's
    assert t.loc[("0.25x", "bov"), "ci_method"] == "paired t, n=2" and t.loc[("1x", "baseline"), "delta"] == 0


def test_vcache_formula_and_bank_layer_count():
    n, kv = A.cacheless_layers("135m", "bov")
    assert (n, kv) == (4, 768)  # the last third of 12 layers, 6 heads x 128
    assert A.cacheless_layers("135m", "bov_add")[0] == 0  # mixed mode still caches V
    saved = A.vcache_saving_bytes(n, kv, 32768, [32768, 65536])
    assert list(saved) == [0.0, 4 * 768 * 2 * 32768]  # break-even at T = |V|


def test_the_notebooks_shared_pieces_give_the_comparison_s_numbers(store, tmp_path):
    """deltas_within, mean_std and write_markdown: what the study notebooks build their tables from."""
    study = A.load_study("demo-micro", store)
    assert study.seeds == [0, 1, 2, 3]
    runs = study.runs.assign(epochs=study.runs["seed"].map(lambda s: 1.0 if s < 3 else 2.0))
    runs = runs[runs["epochs"] == 1.0]  # one group; "unpaired" keeps seeds 0 and 1 there
    within, shown = A.deltas_within(runs, group="epochs", by="level", baseline="base", metric="val/bpb",
                                    label=lambda e: f"{e:g} epochs")
    plain = S.compare(runs, by="level", baseline="base", metric="val/bpb").set_index("level")
    assert list(shown.columns) == ["1 epochs"] and "base" not in shown.index
    for level, row in within.set_index("level").iterrows():
        assert row["delta"] == pytest.approx(plain.loc[level, "delta"])
        assert shown.loc[level, "1 epochs"] == S.delta_cell(*plain.loc[level, ["delta", "ci_low", "ci_high", "ci_method"]])
    assert shown.loc["paired", "1 epochs"] == "-0.1167 [-0.3064, +0.0731]"  # the table test's paired interval
    numbers, pm = A.mean_std(runs, ["level"], ["val/bpb"])
    assert numbers.set_index("level").loc["paired", "val/bpb mean"] == pytest.approx(2.95 / 3)
    assert pm.set_index("level").loc["single", "val/bpb"] == "0.9500"  # one seed: the mean alone
    assert pm.set_index("level").loc["base", "val/bpb"] == f"1.1000 ± {pd.Series([1.0, 1.2, 1.1]).std():.4f}"
    A.write_markdown(pm, tmp_path, "t", "a title", numbers=numbers)
    assert (tmp_path / "t.md").read_text().startswith("a title\n\n| level ")
    assert pd.read_csv(tmp_path / "t.csv").shape == numbers.shape


def test_figures_command_runs_every_notebook(store, tmp_path):
    results = tmp_path / "results"
    env = dict(os.environ, BOV_RESULTS_DIR=str(results), MPLBACKEND="Agg")
    out = subprocess.run([sys.executable, "-m", "bov.cli", "figures", "--script"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "demo-micro: analysis/axis_sweep.py" in out.stdout and "variants-micro: analysis/variants.py" in out.stdout
    for name in ("table.md", "table.csv", "table.tex", "curves.png", "curves.pdf", "metric_by_level.png"):
        assert (results / "demo-micro" / name).stat().st_size > 0
    assert (results / "variants-micro" / "coefficients.png").stat().st_size > 0
    assert (results / "vcache_memory" / "vcache_saved.pdf").stat().st_size > 0
    assert md_rows((results / "demo-micro" / "table.md").read_text())["paired"][2] == "-0.1167 [-0.3064, +0.0731]"
    # the parent run carries what results/ holds: the table as its description, every file as an artifact
    # (the record `bov reproduce` reads among them); publishing again overwrites them (one file per name)
    client = mlflow.MlflowClient(store)
    parent = tracking.sweep_parent(store, "demo-micro")
    for rerun in (True, False):
        attached = sorted(a.path for a in client.list_artifacts(parent, "results"))
        assert attached == sorted(f"results/{p.name}" for p in (results / "demo-micro").iterdir() if p.is_file())
        note = client.get_run(parent).data.tags["mlflow.note.content"]
        assert note.startswith("# demo-micro\n\n") and (results / "demo-micro" / "table.md").read_text() in note
        if rerun:  # what `bov figures` does after each notebook, again
            A.publish("demo-micro", store, results / "demo-micro")


def test_a_parent_run_left_running_by_a_dead_sweep_ends_killed(store):
    """What `bov figures` does first for each study: a SIGKILLed sweep's parent no longer shows RUNNING."""
    import socket
    import time

    client = mlflow.MlflowClient(store)
    parent = tracking.sweep_parent(store, "demo-micro")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    now = f"{time.time():.0f}"
    for who, retired in ((f"{socket.gethostname()}:{os.getpid()}:{now}", False),  # alive: this test
                         (f"another-host:{gone.pid}:{now}", False),  # not this machine's to judge
                         (f"{socket.gethostname()}:{gone.pid}:{now}", True)):
        client.update_run(parent, status="RUNNING")
        client.set_tag(parent, tracking.TAG_SWEEP_PROCESS, who)
        assert tracking.retire_dead_sweep(store, parent) is retired
        run = client.get_run(parent)
        assert run.info.status == ("KILLED" if retired else "RUNNING")
    assert f"the sweep process {gone.pid} on {socket.gethostname()} is gone" in run.data.tags["error"]
    assert tracking.retire_dead_sweep(store, parent) is False  # ended already


def test_figures_without_any_sweep_says_so(tmp_path):
    env = dict(os.environ, BOV_RUNS_DIR=str(tmp_path / "runs"), BOV_RESULTS_DIR=str(tmp_path / "results"))
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-m", "bov.cli", "figures"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: no MLflow store at sqlite:///")
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs" / "mlflow.db").exists()


def test_study_definition_is_stored_as_data_and_read_back(tmp_path, monkeypatch):
    """A parent run written by bov.tracking carries study.json; load_study reads levels, seeds and the baseline
    from it as data (the store of the fixture above has the older schema, comma-joined params: both load)."""
    from bov import tracking
    from bov.mlflow_store import ensure_experiment
    from bov.study import load_sweep

    monkeypatch.setenv("BOV_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    sweep = load_sweep("value_source", scale="micro", seeds=[0, 3], study="vs-micro")
    parent = tracking.create_sweep_run(sweep, uri, ensure_experiment(sweep.name, uri), "sqlite:///x.db")
    client = mlflow.MlflowClient(uri)
    for level in sweep.levels[:2]:
        _run(client, client.get_experiment_by_name("vs-micro").experiment_id, parent, level, 0, 1.0, study="vs-micro")
    study = A.load_study("vs-micro", uri)
    assert study.levels == sweep.levels and study.baseline == sweep.spec.baseline_level
    assert (study.axis, study.definition, study.preset) == (sweep.spec.axis, "value_source", "micro")
    stored = tracking.read_study_definition(client.get_run(parent))
    assert stored["seeds"] == [0, 3] and stored["levels"] == sweep.levels and isinstance(stored["budget"], dict)
    assert client.get_run(parent).data.params["n_levels"] == str(len(sweep.levels))


def test_report_adds_eval_tables_task_scores_and_probe_figures(store, tmp_path):
    from bov import tracking as T

    client = mlflow.MlflowClient(store)
    study = A.load_study("demo-micro", store)
    for r in study.runs.to_dict("records"):  # what bov eval and bov probe attach to a run
        if r["level"] in ("base", "paired"):
            client.log_metric(r["run_id"], T.eval_metric("wiki", "bpb"), 2.0 + 0.1 * r["seed"] + (r["level"] == "paired") * 0.2)
            client.log_metric(r["run_id"], T.task_metric("core", "centered"), 0.1 * r["seed"])
            T.log_probe(store, r["run_id"], {"per_layer": {"attention_entropy": [1.0, 2.0 + r["seed"]],
                                                           "coeff_b": [None, 1.5]},
                                             "bank_drift": {"1": {"0": {"rows": 3, "cosine": 0.9}}}})
    study = A.load_study("demo-micro", store)
    out = tmp_path / "report"
    files = A.report(study, out, tracking_uri=store)["files"]
    rows = md_rows((out / "eval_wiki.md").read_text())
    assert rows["base"][:2] == ["3", "2.1000 ± 0.1000"] and rows["paired"][:3] == ["3", "2.3000 ± 0.1000", "+0.2000 [+0.2000, +0.2000]"]
    tasks = md_rows((out / "tasks.md").read_text())
    assert tasks["base"][:2] == ["3", "0.1000 ± 0.1000"] and "core/centered" in tasks["level"]
    for name in ("attention_entropy", "coeff_b", "bank_drift"):
        assert out / f"probe_{name}.png" in files and (out / f"probe_{name}.png").stat().st_size > 1000
    from bov.figures import probe_frame

    frame = probe_frame(A.load_probes(study.runs, store))
    base = frame[(frame["level"] == "base") & (frame["probe"] == "attention_entropy") & (frame["layer"] == 1)]
    assert sorted(base["value"]) == [2.0, 3.0, 4.0]
