"""`bov reproduce`: the record `make figures` writes, the comparison's arithmetic, one-line refusals, and (slow)
a micro study reproduced from its record: inside, then outside once its committed numbers are moved."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from bov import analysis as A
from bov import reproduce as R

METRIC = "val/bpb"


def committed(values: dict[str, list[float]], folder: Path = Path("results/x")) -> R.Committed:
    runs = pd.DataFrame([{"level": lv, "seed": s, METRIC: v} for lv, vs in values.items() for s, v in enumerate(vs)])
    return R.Committed("x", folder, {"metric": METRIC}, runs)


def test_a_new_mean_is_judged_by_the_committed_seeds_prediction_interval():
    c = committed({"a": [2.00, 2.02, 2.04], "b": [1.90, 1.91, 1.92], "one": [1.5]})
    new = pd.DataFrame([{"level": "a", "seed": 0, METRIC: 2.00}, {"level": "b", "seed": 0, METRIC: 1.99},
                        {"level": "one", "seed": 0, METRIC: 1.7}])
    t = R.compare(c, new, METRIC).set_index("level")
    half = stats.t.ppf(0.975, 2) * 0.01 * math.sqrt(1 / 3 + 1 / 1)  # sd of (1.90, 1.91, 1.92) is 0.01
    assert t.loc["b", "allowed"] == pytest.approx(half) and t.loc["b", "inside"] is False  # 1.99 - 1.91 > 0.0497
    assert t.loc["a", "inside"] is True and t.loc["a", "same-seed diff"] == pytest.approx(0.0)
    assert t.loc["b", "same-seed diff"] == pytest.approx(0.09)
    assert t.loc["one", "inside"] is None  # one committed seed: no spread to judge by
    shown = R.format_comparison(t.reset_index(), METRIC)
    assert "OUTSIDE" in shown and "unchecked: one committed seed has no spread" in shown and "± 0.0100 (n=3)" in shown


def test_runs_on_other_text_are_judged_by_their_differences_from_the_reference():
    c = committed({"baseline": [2.00, 2.01, 2.02], "bov": [1.97, 1.985, 1.99]})
    c.definition["references"] = ["baseline", "bov"]
    shifted = pd.DataFrame([{"level": lv, "seed": s, METRIC: v + 0.3}  # newer text: every number 0.3 higher
                            for lv, vs in {"baseline": [2.00, 2.01, 2.02], "bov": [1.975, 1.98, 1.995]}.items()
                            for s, v in enumerate(vs)])
    assert R.compare(c, shifted, METRIC).set_index("level")["inside"].tolist() == [False, False]
    ref = R.reference_of(c)
    t = R.compare(R.Committed("x", c.folder, c.definition, R.as_deltas(c.runs, METRIC, ref)),
                  R.as_deltas(shifted, METRIC, ref), METRIC).set_index("level")
    assert list(t.index) == ["bov"] and bool(t.loc["bov", "inside"])
    assert t.loc["bov", "committed"] == pytest.approx(-0.085 / 3) and t.loc["bov", "new"] == pytest.approx(-0.08 / 3)
    assert t.loc["bov", "same-seed diff"] == pytest.approx(0.005)  # each seed: -0.025 against -0.03, or back


def test_what_says_the_new_runs_read_other_text():
    c = committed({"a": [2.0, 2.1]})
    assert R.other_data(c, pd.DataFrame({"level": ["a"], "corpus": [None]})) is None  # a source without a name
    same = "wikipedia-en: local copy /x/wikipedia-en (the files results/ was made from)"
    assert R.other_data(c, pd.DataFrame({"corpus": [same]})) is None
    hub = "wikipedia-en: public equivalent from wikimedia/wikipedia 20231101.en (8,100 of 8,153 page ids; ...)"
    assert R.other_data(c, pd.DataFrame({"corpus": [same, hub]})) == hub
    c.runs["data_fingerprint"] = ["f1", "f1"]  # a record with fingerprints: they decide
    assert R.other_data(c, pd.DataFrame({"data_fingerprint": ["f1"], "corpus": [hub]})) is None
    assert R.other_data(c, pd.DataFrame({"data_fingerprint": ["f2"]})) == "data fingerprint f2, not the committed f1"


def test_a_study_without_a_record_or_a_bad_subset_is_one_line(tmp_path):
    with pytest.raises(R.ReproduceError, match="no committed study to reproduce"):
        R.load_committed("nothing-here", tmp_path)
    folder = tmp_path / "x"
    A.write_record({"sweep_file": "bank_layers.yaml", "preset": "micro", "metric": METRIC},
                   pd.DataFrame([{"level": "none", "seed": 0, METRIC: 3.5, "config_hash": "abc"}]), METRIC, "deadbee", folder)
    c = R.load_committed("x", tmp_path)
    assert c.definition["git_commit"] == "deadbee" and list(c.runs["level"]) == ["none"]
    with pytest.raises(R.ReproduceError, match=r"--levels: 'nope' is not a level of x \(none\)"):
        R.resolve(c, None, ["nope"], "x-reproduce")
    with pytest.raises(R.ReproduceError, match=r"--seeds: 4 is not a seed x ran \(0\)"):
        R.resolve(c, [4], None, "x-reproduce")
    with pytest.raises(R.ReproduceError, match=r"now resolves to config \w+, not the abc it ran with .*\(deadbee\)"):
        R.resolve(c, None, None, "x-reproduce")  # the recorded hash is not today's config
    json.dump({"sweep_file": "gone.yaml", "git_commit": "deadbee"}, (folder / A.RECORD).open("w"))
    with pytest.raises(R.ReproduceError, match="sweeps/gone.yaml is gone; check out the commit it ran at \\(deadbee\\)"):
        R.resolve(R.load_committed("x", tmp_path), None, None, "x-reproduce")


@pytest.mark.slow  # a micro sweep, its figures and two reproductions: about a minute on 2 cores
def test_a_committed_micro_study_reproduces_and_a_moved_number_fails(tmp_path):
    from test_sweep import env_with, write_sweep

    write_sweep(tmp_path, levels=["none", "last_third"], seeds=[0, 1])
    runs, results = tmp_path / "runs", tmp_path / "results"
    env = {**env_with(runs, BOV_RESULTS_DIR=str(results)), "BOV_SWEEPS_DIR": str(tmp_path)}
    for args in (["sweep", "mini"], ["figures", "--study", "mini-micro", "--script"]):
        done = subprocess.run([sys.executable, "-m", "bov.cli", *args], env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
    record = results / "mini-micro"
    assert {A.RECORD, A.RUNS} <= {p.name for p in record.iterdir()}
    cmd = [sys.executable, "-m", "bov.cli", "reproduce", "mini-micro", "--seeds", "0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("| none ") or ln.startswith("| last_third ")]
    assert len(lines) == 2 and all("| inside " in ln for ln in lines)
    assert "0.00e+00" in lines[0]  # the same seed on the same machine: the same number
    assert not (runs / "reproduce" / "mini-micro" / "cache").exists()  # the token caches were shared, not rebuilt
    moved = pd.read_csv(record / A.RUNS)
    moved.loc[moved["level"] == "none", METRIC] += 1.0
    moved.to_csv(record / A.RUNS, index=False)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)  # the same scratch: no training
    assert done.returncode == 1 and "1 level(s) outside what the committed seeds allow: none" in done.stderr
