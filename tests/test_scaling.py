"""Crossed studies and what a variant is worth in compute: the cross in the study file, the compute multiplier
recovered from synthetic ladders of known worth, extrapolation flagged, degenerate ladders refused in one line,
the gain against size, and a two-axis micro study end to end (bov.study, bov.scaling, bov.crossed)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from bov.config import ConfigError
from bov.scaling import ALONG_SIZES, LadderError, PowerLaw, along_ladder, fit_ladder, multipliers, size_trend
from bov.study import load_sweep

LAW = PowerLaw(E=1.8, A=0.5, alpha=0.35, c0=1e12)
C1 = 2e13  # the 1x budget's FLOPs


def ladder(worth: dict[str, float], budgets=(0.5, 1, 2, 4), seeds=3, noise=0.002, seed=1, law=LAW) -> pd.DataFrame:
    """The baseline at every budget from `law`, plus each variant at 1x with the loss the baseline reaches at
    `worth` times that compute; Gaussian noise per seed."""
    rng = np.random.default_rng(seed)
    rows = [{"variant": "baseline", "budget": f"{m:g}x", "seed": s, "compute": m * C1,
             "val/bpb": float(law.loss(m * C1)) + rng.normal(0, noise)} for m in budgets for s in range(seeds)]
    rows += [{"variant": v, "budget": "1x", "seed": s, "compute": C1, "val/bpb": float(law.loss(w * C1)) + rng.normal(0, noise)}
             for v, w in worth.items() for s in range(seeds)]
    return pd.DataFrame(rows)


def test_the_fit_recovers_a_noiseless_law_and_inverts_it():
    c = np.array([0.5, 1, 2, 4, 8]) * C1
    fit = fit_ladder(c, LAW.loss(c))
    assert fit.loss(c) == pytest.approx(LAW.loss(c), abs=1e-6)
    assert fit.compute(fit.loss(3 * C1)) == pytest.approx(3 * C1, rel=1e-6)
    assert math.isinf(fit.compute(fit.E - 0.01))  # at or below the floor: no finite compute


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_variant_worth_1_5x_is_recovered_inside_its_interval(seed):
    m = multipliers(ladder({"bov": 1.5}, seed=seed), by="variant", budget="budget", baseline="baseline",
                    n_boot=1000).set_index("variant")
    row = m.loc["bov"]
    assert row["ci_low"] < 1.5 < row["ci_high"] and row["multiplier"] == pytest.approx(1.5, rel=0.1)
    assert row["ci_high"] - row["ci_low"] < 0.5 and not row["extrapolated"] and row["note"] == ""
    assert m.attrs["fit"].alpha > 0 and row["seeds"] == 3


def test_without_a_law_the_multiplier_is_read_between_the_measured_budgets():
    """`interpolated`: no fitted law, log compute linear in loss between the two budgets that bracket the loss.
    On a ladder that follows a law it agrees with the fit; where the law misses the ladder it does not, and the
    law's residual per budget says by how much."""
    m = multipliers(ladder({"bov": 1.5}, noise=0.0), "variant", "budget", "baseline", n_boot=200).iloc[0]
    chord = (math.log(2) - 0) * (LAW.loss(C1) - LAW.loss(1.5 * C1)) / (LAW.loss(C1) - LAW.loss(2 * C1))
    assert m["interpolated"] == pytest.approx(math.exp(chord), rel=1e-9)  # the chord of the 1x-2x segment
    assert abs(m["interpolated"] - 1.5) < 0.05 and m["multiplier"] == pytest.approx(1.5, rel=1e-3)
    assert all(abs(r) < 1e-6 for r in multipliers(ladder({"bov": 1.5}, noise=0.0), "variant", "budget", "baseline",
                                                  n_boot=50).attrs["residuals"].values())
    # a ladder whose 1x point sits above the law through the rest: the fit reads every variant short of it
    bent = ladder({"ref": 1.0}, noise=0.0)
    bent.loc[(bent["variant"] == "baseline") & (bent["budget"] == "1x"), "val/bpb"] += 0.01
    bent.loc[bent["variant"] == "ref", "val/bpb"] += 0.01  # a variant equal to the measured baseline at 1x
    row = multipliers(bent, "variant", "budget", "baseline", n_boot=200).iloc[0]
    assert row["interpolated"] == pytest.approx(1.0, abs=1e-9) and row["multiplier"] < 0.99
    far = multipliers(ladder({"far": 10.0}), "variant", "budget", "baseline", n_boot=50).iloc[0]
    assert math.isnan(far["interpolated"])  # beyond the measured losses: no reading without a law


def test_no_interval_depends_on_the_order_the_runs_were_read_in():
    """The sweep's summary reads runs from Optuna, `make figures` from MLflow, in other orders: the same
    multipliers and intervals, to the last bit, whichever order and whatever other variants are there."""
    runs = ladder({"bov": 1.5, "x0": 1.2})
    shuffled = runs.sample(frac=1.0, random_state=3)
    cols = ["multiplier", "ci_low", "ci_high", "interpolated", "interpolated_low", "interpolated_high"]
    a = multipliers(runs, "variant", "budget", "baseline", n_boot=200).set_index("variant")[cols]
    b = multipliers(shuffled, "variant", "budget", "baseline", n_boot=200).set_index("variant")[cols]
    pd.testing.assert_frame_equal(a.loc[["bov", "x0"]], b.loc[["bov", "x0"]])
    alone = multipliers(runs[runs["variant"] != "x0"], "variant", "budget", "baseline", n_boot=200)
    assert alone.set_index("variant").loc["bov", cols].tolist() == a.loc["bov"].tolist()


def test_more_noise_widens_the_interval_and_one_seed_has_none():
    tight = multipliers(ladder({"bov": 1.5}), "variant", "budget", "baseline", n_boot=500).iloc[0]
    loose = multipliers(ladder({"bov": 1.5}, noise=0.01), "variant", "budget", "baseline", n_boot=500).iloc[0]
    assert loose["ci_high"] - loose["ci_low"] > 2 * (tight["ci_high"] - tight["ci_low"])
    one = multipliers(ladder({"bov": 1.5}, seeds=1), "variant", "budget", "baseline", n_boot=200).iloc[0]
    assert math.isnan(one["ci_low"]) and "one seed" in one["note"]


def test_a_variant_outside_the_ladder_is_flagged_extrapolated():
    m = multipliers(ladder({"far": 10.0, "worse": 0.2, "inside": 2.0}), "variant", "budget", "baseline",
                    n_boot=300).set_index("variant")
    assert bool(m.loc["far", "extrapolated"]) and "below the ladder's" in m.loc["far", "note"]
    assert bool(m.loc["worse", "extrapolated"]) and "above the ladder's" in m.loc["worse", "note"]
    assert not m.loc["inside", "extrapolated"] and m.loc["far", "multiplier"] > 4


@pytest.mark.parametrize("budgets,message", [((0.5, 1, 2), "ran at 3 budget(s) (0.5x, 1x, 2x); a compute multiplier "
                                                            "needs a ladder of at least 4"),
                                             ((1,), "ran at 1 budget(s)")])
def test_a_ladder_of_fewer_than_four_budgets_gives_one_line(budgets, message):
    with pytest.raises(LadderError, match=re.escape(message)):
        multipliers(ladder({"bov": 1.5}, budgets=budgets), "variant", "budget", "baseline")


def test_a_baseline_whose_loss_does_not_fall_gives_one_line():
    rising = PowerLaw(E=1.8, A=0.5, alpha=-0.2, c0=1e12)  # more compute, higher loss
    with pytest.raises(LadderError, match="does not fall with compute"):
        multipliers(ladder({"bov": 1.0}, law=rising), "variant", "budget", "baseline")
    flat = ladder({}, noise=0.0, law=PowerLaw(E=2.0, A=0.0, alpha=0.3, c0=1e12))
    with pytest.raises(LadderError, match="does not fall with compute"):
        multipliers(flat, "variant", "budget", "baseline")


def sizes(gain_at: dict[float, float], seeds=3, noise=0.002, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for n, gain in gain_at.items():
        for s in range(seeds):
            shared = rng.normal(0, 0.05)  # a seed's effect, common to both variants at this size: paired away
            rows += [{"variant": "baseline", "size": f"{n:g}", "seed": s, "params_non_embedding": n, "val/bpb": 2 + shared},
                     {"variant": "bov", "size": f"{n:g}", "seed": s, "params_non_embedding": n,
                      "val/bpb": 2 + shared - gain + rng.normal(0, noise)}]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("gains,trend", [({1e6: 0.05, 3e6: 0.035, 1e7: 0.02}, "shrinks"),
                                         ({1e6: 0.03, 3e6: 0.03, 1e7: 0.03}, "holds (no resolved trend)"),
                                         ({1e6: 0.01, 3e6: 0.03, 1e7: 0.05}, "grows"),
                                         ({1e6: -0.05, 3e6: -0.035, 1e7: -0.02}, "narrows (a deficit)"),
                                         ({1e6: -0.02, 3e6: -0.035, 1e7: -0.05}, "widens (a deficit)")])
def test_the_gain_against_size_says_whether_it_shrinks_holds_or_grows(gains, trend):
    table, t = size_trend(sizes(gains), "variant", "size", "baseline", "bov")
    assert t["trend"] == trend and t["ci_low"] <= t["slope"] <= t["ci_high"]
    assert list(table["delta"]) == pytest.approx([-g for g in gains.values()], abs=0.01)
    assert set(table["ci_method"]) == {"paired t, n=3"}
    assert t["range"] == (1e6, 1e7) and t["read_up_to"] == pytest.approx(1e8)
    assert "135M is 14x the largest size: out of its reach" in t["text"]
    assert f"{-table['delta'].iloc[0]:+.4f} at 1.00M, {-table['delta'].iloc[-1]:+.4f} at 10.00M" in t["text"]


def size_ladder(worth: float, seeds=3, noise=0.002, seed=0) -> pd.DataFrame:
    """The baseline at three sizes, compute 1x/4x/16x (tokens tied to size), its loss linear in log compute
    (so the law-free reading is exact); the variant at each size with the loss the baseline ladder reaches at
    `worth` times that size's compute."""
    rng = np.random.default_rng(seed)
    line = lambda c: 3.0 - 0.1 * math.log(c / C1)  # noqa: E731
    rows = []
    for n, m in ((1e6, 1), (3e6, 4), (1e7, 16)):
        for s in range(seeds):
            rows += [{"variant": "baseline", "size": f"{n:g}", "seed": s, "params_non_embedding": n,
                      "compute": m * C1, "val/bpb": line(m * C1) + rng.normal(0, noise)},
                     {"variant": "bov", "size": f"{n:g}", "seed": s, "params_non_embedding": n,
                      "compute": m * C1, "val/bpb": line(worth * m * C1) + rng.normal(0, noise)}]
    return pd.DataFrame(rows)


def test_the_multiplier_per_size_is_read_along_the_baselines_sizes():
    """A variant worth 1.5x at every size: recovered inside its interval at the sizes below the largest; at the
    largest its loss lies beyond every baseline's, so there is no reading (no law to extrapolate with)."""
    exact = along_ladder(size_ladder(1.5, noise=0.0), "variant", "size", "baseline", n_boot=100)
    assert list(exact["multiplier"][:2]) == pytest.approx([1.5, 1.5], rel=1e-9) and math.isnan(exact["multiplier"][2])
    table, t = size_trend(size_ladder(1.5), "variant", "size", "baseline", "bov")
    for _, row in table.iloc[:2].iterrows():
        assert row["multiplier_low"] < 1.5 < row["multiplier_high"] and row["multiplier"] == pytest.approx(1.5, rel=0.05)
    assert table["multiplier"].isna().iloc[2] and t["worth"] == ALONG_SIZES
    # each cell group's interval is its own: another variant in the runs does not move it
    both = pd.concat([size_ladder(1.5), size_ladder(1.2, seed=5).query("variant == 'bov'").assign(variant="x0")])
    alone = along_ladder(size_ladder(1.5), "variant", "size", "baseline").set_index("size")
    beside = along_ladder(both.sample(frac=1.0, random_state=1), "variant", "size", "baseline")
    beside = beside.query("variant == 'bov'").set_index("size").loc[alone.index]
    pd.testing.assert_frame_equal(alone, beside)
    assert along_ladder(size_ladder(1.5, seeds=1), "variant", "size", "baseline", n_boot=50)["ci_low"].isna().all()
    from bov.figures import plot_size_trend

    assert [ax.get_ylabel() for ax in plot_size_trend(table, t).axes] == [
        "gain in validation bpb (baseline - variant)", "compute-equivalent multiplier"]
    bare, t = size_trend(sizes({1e6: 0.05, 3e6: 0.035, 1e7: 0.02}), "variant", "size", "baseline", "bov")
    assert len(plot_size_trend(bare, t).axes) == 1  # no multiplier: the gain alone


def test_a_size_ladder_without_compute_or_a_falling_baseline_has_no_multiplier_but_its_trend():
    table, t = size_trend(sizes({1e6: 0.05, 3e6: 0.035, 1e7: 0.02}), "variant", "size", "baseline", "bov")
    assert "multiplier" not in table and t["worth"] == "no multiplier: the runs carry no training FLOPs"
    flat = sizes({1e6: 0.05, 3e6: 0.035, 1e7: 0.02}).assign(compute=C1)
    table, t = size_trend(flat, "variant", "size", "baseline", "bov")
    assert "does not fall with compute" in t["worth"] and t["trend"] == "shrinks"
    with pytest.raises(LadderError, match=r"ran at 1 size\(s\) \(1e\+06\); a compute multiplier needs a ladder of at least 2"):
        along_ladder(size_ladder(1.5).query("size == '1e+06'"), "variant", "size", "baseline")


def test_a_size_trend_needs_three_sizes():
    with pytest.raises(LadderError, match="share 2 size"):
        size_trend(sizes({1e6: 0.05, 3e6: 0.04}), "variant", "size", "baseline", "bov")


# ----------------------------------------------------------------------------- the cross in a study file


def cross_file(tmp_path: Path, cross: dict, **fields) -> Path:
    spec = {"study": "x", "base": {"preset": "micro", "variant": "baseline"}, "axis": "variant",
            "levels": ["baseline", "bov"], "baseline_level": "baseline", "seeds": [0, 1],
            "budget": {"steps": 20, "match": "flops"}, "sampler": "grid", "cross": cross, **fields}
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_budget_cross_scales_the_flops_and_keeps_the_selected_cells(tmp_path):
    sw = load_sweep(str(cross_file(tmp_path, {"axis": "budget", "levels": [0.5, 1, 2, 4],
                                              "keep": [{"variant": "baseline"}, {"budget": 1}]})))
    assert sw.levels == ["baseline@0.5x", "baseline@1x", "bov@1x", "baseline@2x", "baseline@4x"]
    assert len(sw.cells) == 10 and sw.cell("bov@1x", 1).coords == {"variant": "bov", "budget": "1x"}
    flops = {c.level: c.cfg.train.max_flops for c in sw.cells}
    assert [flops[f"baseline@{m:g}x"] / flops["baseline@1x"] for m in (0.5, 2, 4)] == [0.5, 2.0, 4.0]
    assert flops["bov@1x"] == flops["baseline@1x"]  # compute-matched within the budget level
    assert sw.axes[1] == {"name": "budget", "kind": "budget", "levels": ["0.5x", "1x", "2x", "4x"]}
    assert load_sweep(str(cross_file(tmp_path, {"axis": "budget", "levels": [1, 2]}))).levels == [
        "baseline@1x", "bov@1x", "baseline@2x", "bov@2x"]  # no keep: the full cross


def test_a_size_cross_scales_width_heads_and_table_rates_and_ties_tokens_to_size(tmp_path):
    sw = load_sweep(str(cross_file(tmp_path, {"axis": "size", "levels": [2, 4, 8]},
                                   budget={"tokens_per_param": 2.0, "match": "flops"})))
    by = {c.level: c.cfg for c in sw.cells if c.seed == 0}
    micro = by["baseline@depth4"]  # micro's own shape: 4 layers, d 64, heads of 16
    assert (micro.model.n_layers, micro.model.d_model, micro.model.n_heads, micro.model.n_kv_heads) == (4, 64, 4, 2)
    big = by["baseline@depth8"].model
    assert (big.n_layers, big.d_model, big.n_heads, big.n_kv_heads) == (8, 128, 8, 4)
    assert by["bov@depth8"].model.d_model == 128 and by["baseline@depth2"].model.d_model == 32
    rate = by["baseline@depth8"].train.lr_embedding / micro.train.lr_embedding
    assert rate == pytest.approx((64 / 128) ** 0.5) and by["baseline@depth8"].train.lr_matrix == micro.train.lr_matrix
    from bov.budget import model_shape, plan_budget
    for level in ("baseline@depth2", "baseline@depth8"):
        cfg = by[level]
        fpt, params = model_shape(cfg.model)
        b = plan_budget(cfg, fpt)
        non_embedding = sum(params.values()) - params["embedding"] - params["bank"]
        assert b.tokens == pytest.approx(2.0 * non_embedding, rel=0.1)  # whole steps of 256 tokens


def test_a_crossed_study_grown_by_a_level_records_it_on_its_axis(tmp_path):
    """A level added to a crossed study's file (the size ladder's depth-8 control) reaches the analysis: the
    parent run's recorded axes grow like its levels, so the size section and figures see the new level."""
    from bov import tracking
    from bov.analysis import load_study
    from bov.mlflow_store import ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = load_sweep(str(cross_file(tmp_path, {"axis": "size", "levels": [2, 4]})))
    parent = tracking.create_sweep_run(sweep, uri, ensure_experiment(sweep.name, uri), "sqlite:///x")
    grown = load_sweep(str(cross_file(tmp_path, {"axis": "size", "levels": [2, 4, 6]},
                                      levels=["baseline", "bov", "resformer"])))
    tracking.extend_sweep_run(grown, uri, parent)
    tracking.extend_sweep_run(sweep, uri, parent)  # a narrower re-run forgets nothing
    axes = load_study(sweep.name, uri).axes
    assert [ax["levels"] for ax in axes] == [["baseline", "bov", "resformer"], ["depth2", "depth4", "depth6"]]


@pytest.mark.parametrize("cross,fields,message", [
    ({"axis": "size", "levels": [4, 6.5]}, {}, "cross.levels: sizes are model depths"),
    ({"axis": "budget", "levels": [1, -2]}, {}, "cross.levels: budget multiples must be positive"),
    ({"axis": "budget", "levels": [1, 2], "keep": [{"variant": "nope"}]}, {}, "cross.keep[0]: variant='nope' is not a level"),
    ({"axis": "budget", "levels": [1, 1.0]}, {}, "cross.levels: duplicate level"),
    ({"axis": "budget"}, {}, "cross.levels: Field required"),
    ({"axis": "budget", "levels": [1, 2], "keep": [{"varaint": "bov"}]}, {}, "cross.keep[0]: 'varaint' is not an axis"),
    ({"axis": "budget", "levels": [1, 2], "keep": [{"budget": 3}]}, {}, "cross.keep[0]: budget=3 is not a level (1x, 2x)"),
    ({"axis": "budget", "levels": [1, 2]}, {"paper": {"source": "x", "values": {"bov": 0.8}}},
     "paper: the paper's claims are checked in a single-axis study"),
])
def test_a_bad_cross_is_one_line_naming_the_key(tmp_path, cross, fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_sweep(str(cross_file(tmp_path, cross, **fields)))


def test_a_single_axis_study_has_no_coordinates():
    sw = load_sweep("bank_layers")
    assert sw.axes == [] and all(c.coords == {} for c in sw.cells) and "@" not in "".join(sw.levels)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow  # two subprocesses: about 30 s on 2 cores
def test_a_two_axis_micro_study_runs_through_sweep_mlflow_and_figures(tmp_path):
    from test_sweep import env_with

    path = cross_file(tmp_path, {"axis": "budget", "levels": [0.5, 1, 2, 4], "keep": [{"variant": "baseline"},
                                                                                   {"budget": 1}]}, seeds=[0])
    runs, results = tmp_path / "runs", tmp_path / "results"
    env = {**env_with(runs, BOV_RESULTS_DIR=str(results)), "BOV_CACHE_DIR": str(tmp_path / "cache")}
    prepared = subprocess.run([sys.executable, "-m", "bov.cli", "prepare", "--study", str(path)], env=env,
                              capture_output=True, text=True, timeout=900)  # as a cluster's prepare job would
    assert prepared.returncode == 0 and "x-micro: train " in prepared.stdout, prepared.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", "bov.cli", "sweep", str(path)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tokeniz" not in done.stdout + done.stderr  # the workers only read what prepare made
    assert "| bov@1x " in done.stdout and "× compute (95% CI)" in done.stdout
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("x-micro")
    cells = {(r.data.tags["bov.coord.variant"], r.data.tags["bov.coord.budget"])
             for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("bov.role") != "sweep"}
    assert cells == {("baseline", "0.5x"), ("baseline", "1x"), ("baseline", "2x"), ("baseline", "4x"), ("bov", "1x")}
    done = subprocess.run([sys.executable, "-m", "bov.cli", "figures", "--study", "x-micro", "--script"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    out = results / "x-micro"
    assert {"table.md", "table.csv", "compute.png", "multipliers.png", "curves.png"} <= {p.name for p in out.iterdir()}
    table = pd.read_csv(out / "table.csv")
    assert set(zip(table["coord.variant"], table["coord.budget"])) == cells
    assert np.isfinite(table.loc[table["coord.variant"] == "bov", "multiplier"]).all()
    assert "| variant " in (out / "table.md").read_text() and "× compute" in (out / "table.md").read_text()


@pytest.mark.slow  # 12 micro cells and the figures: about a minute on 2 cores
def test_a_size_ladder_micro_study_reports_its_trend(tmp_path):
    from test_sweep import env_with

    path = cross_file(tmp_path, {"axis": "size", "levels": [2, 4, 6]}, levels=["baseline", "bov"])
    runs, results = tmp_path / "runs", tmp_path / "results"
    env = env_with(runs, BOV_RESULTS_DIR=str(results))
    printed = []
    for args in (["sweep", str(path)], ["figures", "--study", "x-micro", "--script"]):
        done = subprocess.run([sys.executable, "-m", "bov.cli", *args], env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        printed.append(done.stdout + done.stderr)
    assert ALONG_SIZES in printed[0]  # the sweep's summary says how its multiplier column is read
    out = results / "x-micro"
    assert {"size_trend.md", "size_trend_bov.png", "compute.png"} <= {p.name for p in out.iterdir()}
    text = (out / "size_trend.md").read_text()
    assert "The gain of bov over baseline (baseline - bov in val/bpb: " in text and " per decade [" in text
    table = pd.read_csv(out / "table.csv")
    assert sorted(set(table["coord.size"])) == ["depth2", "depth4", "depth6"]
    assert table.loc[table["coord.variant"] == "baseline", "multiplier"].isna().all()  # per variant, not the baseline
    assert "| size   |" in text and "× compute (95% CI)" in text and ALONG_SIZES in (out / "table.md").read_text() and "| × compute along sizes (95% CI) " in (out / "table.md").read_text()


def test_the_multipliers_figure_shows_both_readings():
    from bov.figures import plot_multipliers

    m = multipliers(ladder({"bov": 1.5, "x0": 1.2}), "variant", "budget", "baseline", n_boot=100)
    fig = plot_multipliers(m, by="variant", title="t")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["fitted law", "no law: between the measured budgets"]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["bov @ 1x", "x0 @ 1x"]
