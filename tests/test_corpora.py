"""Named corpora (bov.corpora): `corpus:wikipedia-en/...` resolves to a local copy, or to its public equivalent
rebuilt from the Hub by page id; with neither, one line. The Hub is out of reach here: its rows are stood in for
by the local copy's own records, reshaped as wikimedia/wikipedia serves them (id as text, no title line)."""

from __future__ import annotations

import json
import lzma
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bov import corpora
from bov.config import DataConfig, DataError, ExperimentConfig
from bov.sources import check_source, corpus_origin

BOV = [sys.executable, "-m", "bov.cli"]


def _records(path: Path) -> list[str]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return list(f)


def test_the_committed_manifest_is_the_local_copy_s_ids_and_digests(shared_data):
    made = corpora.manifest_of(shared_data / "wikipedia-en", "wikipedia-en", "wikimedia/wikipedia", "20231101.en")
    committed = json.loads((corpora.MANIFESTS / "wikipedia-en.json").read_text())
    assert made["files"] == committed["files"]
    assert sum(len(f["ids"]) for f in made["files"].values()) == len(corpora.manifest("wikipedia-en").ids) == 8153


def _small_manifest(shared_data, n=12) -> tuple[corpora.Manifest, dict[str, list[str]]]:
    """Two files of the validation split's first titled articles, in the local copy's own order."""
    lines = [ln for ln in _records(shared_data / "wikipedia-en" / "validation.jsonl.xz")
             if (r := json.loads(ln))["text"].startswith(r["title"] + "\n\n")][:2 * n]
    files = {"a.jsonl.xz": lines[:n], "b.jsonl.xz": lines[n:]}
    m = corpora.Manifest("wiki-small", "wikimedia/wikipedia", "20231101.en",
                         {f: {"sha256": "", "ids": [json.loads(ln)["id"] for ln in ls]} for f, ls in files.items()})
    return m, files


def _as_hub_rows(lines: list[str]) -> list[dict]:
    rows = []
    for ln in lines:
        r = json.loads(ln)
        rows.append({"id": str(r["id"]), "url": r["url"], "title": r["title"],
                     "text": r["text"][len(r["title"]) + 2:]})
    return rows


def test_the_public_equivalent_is_rebuilt_by_page_id_in_the_local_copy_s_order(shared_data, tmp_path):
    m, files = _small_manifest(shared_data)
    others = _records(shared_data / "wikipedia-en" / "train-00-of-04.jsonl.xz")[:30]  # articles it must not take
    rows = _as_hub_rows([ln for ls in files.values() for ln in ls] + others)
    random.Random(0).shuffle(rows)
    out = corpora.build_from_hub(m, tmp_path / "built", load=lambda *a, **k: iter(rows), log=lambda s: None)
    for fname, lines in files.items():  # the same records, byte for byte once decompressed, in the manifest's order
        assert _records(out / fname) == lines
    stamp = json.loads((out / corpora.STAMP).read_text())
    assert (stamp["wanted"], stamp["found"], stamp["missing"]) == (24, 24, [])
    assert not list(tmp_path.glob(".built.tmp*"))


def test_articles_gone_from_the_hub_are_skipped_and_counted(shared_data, tmp_path):
    m, files = _small_manifest(shared_data)
    rows = _as_hub_rows(files["a.jsonl.xz"][1:] + files["b.jsonl.xz"])
    gone = json.loads(files["a.jsonl.xz"][0])["id"]
    out = corpora.build_from_hub(m, tmp_path / "built", load=lambda *a, **k: iter(rows), log=lambda s: None)
    assert _records(out / "a.jsonl.xz") == files["a.jsonl.xz"][1:]
    stamp = json.loads((out / corpora.STAMP).read_text())
    assert (stamp["found"], stamp["missing"]) == (23, [gone])
    with pytest.raises(DataError, match="none of its page ids"):
        corpora.build_from_hub(m, tmp_path / "none", load=lambda *a, **k: iter([]), log=lambda s: None)
    assert not (tmp_path / "none").exists()


def test_a_hub_row_gets_the_local_copy_s_shape():
    row = {"id": "680", "url": "https://en.wikipedia.org/wiki/Aardvark", "title": "Aardvark", "text": "The aardvark is"}
    assert corpora.hub_record(row) == {"id": 680, "url": row["url"], "title": "Aardvark",
                                       "text": "Aardvark\n\nThe aardvark is"}
    titled = {**row, "text": "Aardvark\n\nThe aardvark is"}
    assert corpora.hub_record(titled)["text"] == titled["text"]


def test_select_stops_reading_once_past_every_id():
    m = corpora.Manifest("m", "h", "c", {"f": {"sha256": "", "ids": [3, 5, 99]}})
    read = []

    def stream():
        for i in range(1, 10_000_000):
            read.append(i)
            yield {"id": i}

    found = corpora.select(stream(), m, patience=50)
    assert sorted(found) == [3, 5, 99] and len(read) == 99  # every id found: no further record is read
    m2 = corpora.Manifest("m", "h", "c", {"f": {"sha256": "", "ids": [3, 7]}})
    read.clear()
    assert sorted(corpora.select((r for r in stream() if r["id"] != 7), m2, patience=50)) == [3]
    assert len(read) == 54  # 50 records after the last hit (3; 7 is absent), the largest id passed by then


def test_a_name_hashes_as_the_path_the_studies_gave_before_names():
    named = ExperimentConfig(data=DataConfig(source="corpus:wikipedia-en/train-0[0-3]-of-04.jsonl.xz",
                                             val_source="corpus:wikipedia-en/validation.jsonl.xz"))
    path = ExperimentConfig(data=DataConfig(source="../shared/data/wikipedia-en/train-0[0-3]-of-04.jsonl.xz",
                                            val_source="../shared/data/wikipedia-en/validation.jsonl.xz"))
    assert named.config_hash() == path.config_hash()
    assert named.config_hash() != ExperimentConfig().config_hash()


def test_a_name_keeps_the_corpus_fingerprint_its_studies_recorded(shared_data):
    from bov.data import corpus_fingerprint

    files = ("train-0[0-3]-of-04.jsonl.xz", "validation.jsonl.xz")
    named = DataConfig(source=f"corpus:wikipedia-en/{files[0]}", val_source=f"corpus:wikipedia-en/{files[1]}")
    path = DataConfig(source=f"{shared_data}/wikipedia-en/{files[0]}", val_source=f"../shared/data/wikipedia-en/{files[1]}")
    assert corpus_fingerprint(named) == "1f374560ed517442"  # what compute_multiplier_wikipedia-tiny recorded
    assert corpus_fingerprint(path) == corpus_fingerprint(named)


def _copy(root: Path, records: dict[str, list[dict]]) -> Path:
    (root / "wikipedia-en").mkdir(parents=True)
    for fname in corpora.manifest("wikipedia-en").files:
        with lzma.open(root / "wikipedia-en" / fname, "wt", encoding="utf-8") as f:
            for r in records.get(fname[:5], []):
                f.write(json.dumps(r) + "\n")
    return root


def test_bov_corpora_points_at_a_local_copy_and_the_run_records_which(shared_data, runs, tmp_path, monkeypatch):
    docs = [json.loads(ln) for ln in _records(shared_data / "wikipedia-en" / "validation.jsonl.xz")[:40]]
    monkeypatch.setenv("BOV_CORPORA", str(_copy(tmp_path / "corpora", {"train": docs[:36], "valid": docs[36:]})))
    src = "corpus:wikipedia-en/train-0[0-3]-of-04.jsonl.xz"
    assert corpora.resolve(src) == str(tmp_path / "corpora" / "wikipedia-en" / "train-0[0-3]-of-04.jsonl.xz")
    assert corpus_origin(src) == (f"wikipedia-en: local copy {tmp_path / 'corpora' / 'wikipedia-en'} "
                                  "(other bytes than the files results/ was made from)")
    monkeypatch.delenv("BOV_CORPORA")
    assert corpus_origin(src).endswith("(the files results/ was made from)")  # the copy beside the repository
    monkeypatch.setenv("BOV_CORPORA", str(tmp_path / "corpora"))
    sets = ["--set", f"data.source={src}", "--set", "data.val_source=corpus:wikipedia-en/validation.jsonl.xz",
            "--set", "model.vocab_size=300", "--set", "train.max_steps=2", "--set", "train.val_tokens=256"]
    done = subprocess.run(BOV + ["train", "-p", "micro", *sets], capture_output=True, text=True, env=os.environ)
    assert done.returncode == 0, done.stderr[-2000:]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    tag = run.data.tags["bov.corpus"]
    assert tag.startswith(f"wikipedia-en: local copy {tmp_path / 'corpora' / 'wikipedia-en'} (other bytes")
    assert tag.endswith(f"corpus digest {json.loads(next((runs / 'train').glob('*/run.json')).read_text())['data']['corpus']}")


def test_no_copy_and_no_hub_is_one_line_naming_both_and_leaves_nothing(runs, tmp_path):
    env = {**os.environ, "BOV_CORPORA": str(tmp_path / "nowhere"), "HF_HUB_OFFLINE": "1"}
    for cmd in (["prepare", "--corpus", "wikipedia-en"],
                ["train", "-p", "micro", "--set", "data.source=corpus:wikipedia-en/train-00-of-04.jsonl.xz"]):
        done = subprocess.run(BOV + cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.strip().splitlines()
        assert "corpus 'wikipedia-en' has no local copy (set BOV_CORPORA" in line
        assert "Hugging Face Hub (wikimedia/wikipedia 20231101.en: ConnectionError: HF_HUB_OFFLINE is set)" in line
        assert "bov prepare --corpus wikipedia-en" in line
    assert not runs.exists()
    with pytest.raises(DataError, match="no corpus named 'nope' \\(known: wikipedia-en\\)"):
        check_source(DataConfig(source="corpus:nope/x.jsonl"))
