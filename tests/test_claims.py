"""Several reference levels and the paper's claims: deltas paired by seed against each reference, verdicts,
seeds needed, a study without ResFormer, and a study file's analysis-only keys (bov.stats, bov.analysis)."""

from __future__ import annotations

import math
import re
import statistics

import mlflow
import optuna
import pandas as pd
import pytest
import yaml
from mlflow.entities import Metric, Param

from bov import analysis as A
from bov import stats as S
from bov import tracking
from bov.mlflow_store import ensure_experiment
from bov.config import ConfigError
from bov.study import load_sweep
from bov.trials import format_summary, summarize

T_975_DF2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom
# Seed effects (+0.0, +0.3, -0.2) far larger than the level effects: only a paired interval resolves them.
SEED_EFFECT = {0: 0.0, 1: 0.3, 2: -0.2}
LEVEL = {"baseline": 2.00, "resformer": 1.99, "bank": 1.95, "bank_shared": 1.97}
NOISE = {"baseline": (0.001, -0.002, 0.0), "resformer": (0.0, 0.001, -0.001), "bank": (0.002, 0.0, -0.001),
         "bank_shared": (0.0, -0.003, 0.002)}
PAPER = {"source": "a paper, Table 1", "values": {"baseline": 0.854, "bank": 0.845, "bank_shared": 0.860},
         "claims": [{"level": "bank_shared", "than": "bank", "paper": "worse"}]}


def bpb(level: str, seed: int) -> float:
    return LEVEL[level] + SEED_EFFECT[seed] + NOISE[level][seed]


def frame(levels=tuple(LEVEL), seeds=(0, 1, 2)) -> pd.DataFrame:
    return pd.DataFrame([{"level": lv, "seed": s, "val/bpb": bpb(lv, s)} for lv in levels for s in seeds])


def paired(level: str, ref: str, seeds=(0, 1, 2)) -> tuple[float, float, float]:
    d = [bpb(level, s) - bpb(ref, s) for s in seeds]
    half = T_975_DF2 * statistics.stdev(d) / math.sqrt(len(d))
    return statistics.fmean(d), statistics.fmean(d) - half, statistics.fmean(d) + half


def test_every_level_against_every_reference_is_paired_by_seed():
    t = S.compare(frame(), baseline="baseline", references=["baseline", "resformer"], order=list(LEVEL)).set_index("level")
    for level in ("bank", "bank_shared", "resformer"):
        assert (t.loc[level, "delta"], t.loc[level, "ci_low"], t.loc[level, "ci_high"]) == pytest.approx(paired(level, "baseline"))
        assert t.loc[level, "ci_method"] == "paired t, n=3"
    for level in ("bank", "bank_shared", "baseline"):
        got = [t.loc[level, f"{k} vs resformer"] for k in ("delta", "ci_low", "ci_high")]
        assert got == pytest.approx(paired(level, "resformer"))
    # the seed effects cancel: bank's interval against either reference excludes 0, as unpaired it could not
    assert t.loc["bank", "ci_high"] < 0 and t.loc["bank", "ci_high vs resformer"] < 0
    unpaired = S.interval(frame(["bank"]).set_index("seed")["val/bpb"],  # seeds {0, 1, 2} against {0, 1}
                          frame(["baseline"], seeds=(0, 1)).set_index("seed")["val/bpb"])
    assert unpaired[3].startswith("bootstrap") and unpaired[1] < 0 < unpaired[2]
    shown = S.format_table(t.reset_index(), baseline="baseline").set_index("level")
    assert shown.loc["resformer", "Δ vs resformer (95% CI)"] == "(reference)"
    assert shown.loc["baseline", "Δ vs baseline (95% CI)"] == "(baseline)"
    d, lo, hi = paired("bank", "resformer")
    assert shown.loc["bank", "Δ vs resformer (95% CI)"] == f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
    long = A.deltas(t.reset_index(), "baseline", ["baseline", "resformer"])
    assert len(long) == 2 * len(LEVEL) and set(long["vs"]) == {"baseline", "resformer"}


def test_a_study_without_resformer_compares_with_its_baseline_only():
    t = S.compare(frame(["baseline", "bank"]), baseline="baseline", references=["baseline", "resformer"])
    assert t["delta vs resformer"].isna().all()  # a reference with no finished run: no delta, no error
    t = S.compare(frame(["baseline", "bank"]), baseline="baseline", references=["baseline"])
    assert [c for c in t if "vs" in c] == [] and t.set_index("level").loc["bank", "delta"] == pytest.approx(paired("bank", "baseline")[0])
    v = S.verdicts(frame(["baseline", "bank"]), PAPER, ["baseline"])
    assert list(zip(v["level"], v["vs"])) == [("bank", "baseline")]  # claims on levels that never ran: left out


def test_verdicts_say_agrees_disagrees_or_unresolved_and_the_seeds_needed():
    v = S.verdicts(frame(), PAPER, ["baseline", "resformer"]).set_index(["level", "vs"])
    # bank: the paper -0.009, here about -0.05 resolved: agrees
    row = v.loc[("bank", "baseline")]
    assert row["paper Δ"] == pytest.approx(0.845 - 0.854) and row["paper says"] == "better"
    assert (row["delta"], row["ci_low"], row["ci_high"]) == pytest.approx(paired("bank", "baseline"))
    assert bool(row["resolved"]) and row["verdict"] == "agrees"
    sd = statistics.stdev([bpb("bank", s) - bpb("baseline", s) for s in range(3)])
    assert row["sd"] == pytest.approx(sd) and row["seeds needed"] == S.seeds_needed(sd, 0.009)
    # bank_shared: the paper says worse than the baseline (+0.006); here better, resolved: disagrees
    assert v.loc[("bank_shared", "baseline"), "verdict"] == "disagrees"
    # the direction-only claim: shared worse than bank, here +0.02 resolved: agrees, no paper number
    row = v.loc[("bank_shared", "bank")]
    assert row["paper says"] == "worse" and math.isnan(row["paper Δ"]) and row["verdict"] == "agrees"
    assert math.isnan(row["seeds needed"])
    assert ("bank", "resformer") not in v.index  # the paper gives resformer no number
    assert S.verdict(-0.01, -0.02, 0.001, -1) == "unresolved" and S.verdict(0.01, 0.005, 0.02, 0) == "disagrees"
    shown = S.format_verdicts(v.reset_index()).set_index(["level", "vs"])
    assert shown.loc[("bank", "baseline"), "paper Δ"] == "-0.009" and shown.loc[("bank_shared", "bank"), "paper Δ"] == "worse"
    assert shown.loc[("bank", "baseline"), "resolved"] == "yes"


@pytest.mark.parametrize("sd,diff", [(0.01, 0.003), (0.002, 0.004), (0.0005, 0.02), (0.03, 0.0025)])
def test_seeds_needed_is_the_first_n_whose_interval_is_narrower_than_the_difference(sd, diff):
    from scipy import stats

    n = S.seeds_needed(sd, diff)
    half = lambda k: stats.t.ppf(0.975, k - 1) * sd / math.sqrt(k)  # noqa: E731
    assert n >= 2 and half(n) < diff and (n == 2 or half(n - 1) >= diff)
    assert S.seeds_needed(sd, -diff) == n  # the sign does not matter
    assert S.seeds_needed(0.05, 1e-6) == math.inf and math.isnan(S.seeds_needed(math.nan, diff))
    assert math.isnan(S.seeds_needed(sd, 0.0))


def test_rank_agreement_is_spearman_over_the_levels_both_have():
    rho, n = S.rank_agreement(frame(), PAPER["values"])
    assert n == 3 and rho == pytest.approx(0.5)  # paper: bank < baseline < shared; here bank < shared < baseline
    assert math.isnan(S.rank_agreement(frame(["baseline", "bank"]), PAPER["values"])[0])


def _spec(tmp_path, **fields):
    spec = {"study": "refs", "base": {"preset": "micro", "variant": "bov"}, "axis": "row",
            "levels": {"baseline": {"variant": "baseline"}, "resformer": {"variant": "resformer"}, "bank": {}},
            "baseline_level": "baseline", "seeds": [0, 1, 2], "sampler": "grid", **fields}
    path = tmp_path / "refs.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("fields,key", [({"references": ["baseline", "resfomer"]}, "references"),
                                        ({"paper": {"source": "x", "values": {"bnak": 0.8}}}, "paper.values"),
                                        ({"paper": {"source": "x", "claims": [{"level": "bank", "than": "x", "paper": "worse"}]}},
                                         "paper.claims[0]"),
                                        ({"paper": {"source": "x", "claims": [{"level": "bank", "than": "baseline",
                                                                               "paper": "lower"}]}}, "paper.claims.0.paper")])
def test_a_reference_or_claim_naming_no_level_is_refused_naming_the_key(tmp_path, fields, key):
    with pytest.raises(ConfigError, match=rf"refs.yaml: {re.escape(key)}"):
        load_sweep(str(_spec(tmp_path, **fields)))


def test_references_and_claims_change_no_cell_and_reach_the_parent_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plain = load_sweep(str(_spec(tmp_path)))
    hashes = [c.cfg.config_hash() for c in plain.cells]
    parent = tracking.create_sweep_run(plain, uri, ensure_experiment(plain.name, uri), "sqlite:///x")
    assert A.load_study(plain.name, uri).references == ["baseline"] and A.load_study(plain.name, uri).paper is None
    claimed = load_sweep(str(_spec(tmp_path, references=["resformer"], paper=PAPER | {"values": {"bank": 0.8, "baseline": 0.81}, "claims": []})))
    assert [c.cfg.config_hash() for c in claimed.cells] == hashes  # a study in flight trains the same cells
    assert claimed.references == ["baseline", "resformer"]
    tracking.extend_sweep_run(claimed, uri, parent)  # the re-run records what the analysis now reads
    study = A.load_study(plain.name, uri)
    assert study.references == ["baseline", "resformer"] and study.paper["values"] == {"bank": 0.8, "baseline": 0.81}


def test_the_sweep_summary_shows_every_reference_and_the_verdicts(tmp_path):
    sweep = load_sweep(str(_spec(tmp_path, references=["resformer"],
                                 paper={"source": "a paper", "values": {"baseline": 0.854, "bank": 0.845}})))
    study = optuna.create_study()
    dist = {"level": optuna.distributions.CategoricalDistribution(sweep.levels),
            "seed": optuna.distributions.CategoricalDistribution(sweep.seeds)}
    for level, seed in [(lv, s) for lv in ("baseline", "resformer", "bank") for s in range(3)]:
        study.add_trial(optuna.trial.create_trial(params={"level": level, "seed": seed}, distributions=dist,
                                                  value=bpb(level, seed), user_attrs={"tokens": 1e6, "epochs": 0.5}))
    text = format_summary(summarize(study, sweep), sweep)
    header = next(line for line in text.splitlines() if line.startswith("| level"))
    assert "Δ vs baseline (95% CI)" in header and "Δ vs resformer (95% CI)" in header
    assert "The paper's claims (a paper) against this study: 1 agrees, 0 disagrees, 0 unresolved" in text


def _store(tmp_path, monkeypatch, references, paper):
    """A real MLflow store: a sweep parent run with its definition and 3 seeds of each level."""
    monkeypatch.setenv("BOV_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = ensure_experiment("refs-micro", uri)
    parent = client.create_run(exp, tags={"bov.role": "sweep", "bov.study": "refs-micro"}).info.run_id
    levels = ["baseline", *(["resformer"] if "resformer" in references else []), "bank", "bank_shared"]
    client.log_dict(parent, {"axis": "row", "levels": levels, "metric": "val/bpb", "preset": "micro",
                             "baseline_level": "baseline", "definition": "refs", "references": references,
                             "paper": paper}, tracking.STUDY_ARTIFACT)
    for level in levels:
        for seed in range(3):
            rid = client.create_run(exp, tags={"bov.study": "refs-micro", "bov.level": level, "bov.seed": str(seed),
                                               "mlflow.parentRunId": parent}).info.run_id
            client.log_batch(rid, metrics=[Metric("val/bpb", bpb(level, seed), 0, 10)],
                             params=[Param("budget.tokens", "1000"), Param("budget.steps", "10")])
            client.set_terminated(rid)
    return uri


@pytest.mark.parametrize("references", [["baseline", "resformer"], ["baseline"]])
def test_report_writes_every_reference_the_deltas_figure_and_the_verdicts(tmp_path, monkeypatch, references):
    uri = _store(tmp_path, monkeypatch, references, PAPER)
    study = A.load_study("refs-micro", uri)
    assert study.references == references
    out = A.report(study, tmp_path / "out", uri)
    names = {p.name for p in out["files"]}
    assert {"table.md", "deltas.png", "verdicts.md", "verdicts.csv"} <= names
    head = (tmp_path / "out" / "table.md").read_text().splitlines()[2]
    assert ("Δ vs resformer (95% CI)" in head) == ("resformer" in references)
    v = pd.read_csv(tmp_path / "out" / "verdicts.csv")
    assert set(v["vs"]) == {"baseline", "bank"} and (v["verdict"] == "agrees").sum() == 2
    text = (tmp_path / "out" / "verdicts.md").read_text()
    assert "2 agrees, 1 disagrees, 0 unresolved" in text and "Spearman ρ = +0.50" in text
