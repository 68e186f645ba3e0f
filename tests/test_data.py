"""Data pipeline: real corpora, cache reuse and rebuild, document-level split, exact byte counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bov.config import load_config
from bov.data import DataError, TrainWindows, prepare
from bov.sources import check_source, doc_bucket, load_documents


def cfg_for(source, **over):
    return load_config("micro", "baseline", {"data.source": str(source), **over})


def test_stdlib_cache_reused_then_rebuilt_when_corrupt(runs):
    cfg = load_config("micro", "baseline")
    logs: list[str] = []
    first = prepare(cfg, log=logs.append)
    assert len(logs) == 2  # built train and val
    again = prepare(cfg, log=logs.append)
    assert len(logs) == 2 and again.train.n_tokens == first.train.n_tokens  # reused, nothing rebuilt
    ref = np.array(first.train.array())
    raw = bytearray(first.train.path.read_bytes())  # flip one byte: corrupt
    raw[100] ^= 0xFF
    first.train.path.write_bytes(bytes(raw))
    rebuilt = prepare(cfg, log=logs.append)
    assert len(logs) == 3 and np.array_equal(np.array(rebuilt.train.array()), ref)
    first.val.path.write_bytes(first.val.path.read_bytes()[:50])  # truncate: partial
    prepare(cfg, log=logs.append)
    assert len(logs) == 4


def test_bpb_bytes_are_exact(runs):
    d = prepare(load_config("micro", "baseline"))
    for stream in (d.train, d.val):
        arr = np.array(stream.array())
        assert d.token_bytes[arr].sum() == stream.n_bytes  # every text byte, none for BOS
        assert arr[0] == d.bos_id and (arr == d.bos_id).sum() == stream.n_docs


def test_split_is_document_level_and_disjoint():
    cfg = load_config("micro", "baseline")
    docs = load_documents("stdlib", cfg.data)
    cut = round(cfg.data.val_fraction * 10_000)
    val = {t for t in docs["text"] if doc_bucket(t) < cut}
    train = {t for t in docs["text"] if doc_bucket(t) >= cut}
    assert val and train and not (val & train)


def test_text_files_one_doc_per_file_or_per_paragraph(tmp_path, runs):
    for i in range(3):
        (tmp_path / f"d{i}.txt").write_text(f"first {i}\n\nsecond {i}\n")
    per_file = load_documents(str(tmp_path / "*.txt"), cfg_for(tmp_path / "*.txt").data)
    per_par = load_documents(str(tmp_path / "*.txt"), cfg_for(tmp_path / "*.txt", **{"data.doc_split": "blank_line"}).data)
    assert len(per_file) == 3 and len(per_par) == 6


def test_missing_sources_fail_in_one_line(tmp_path):
    with pytest.raises(DataError, match=r"^data.source: no file matches '.*nope\*.txt'$"):
        check_source(cfg_for(tmp_path / "nope*.txt").data)
    with pytest.raises(DataError, match=r"^data.source: hub dataset 'no-such-org/no-such-dataset-bov' is not reachable"):
        check_source(cfg_for("no-such-org/no-such-dataset-bov").data)


def test_jsonl_xz_corpus(shared_data, runs):
    src = shared_data / "wikipedia-en" / "validation.jsonl.xz"
    cfg = cfg_for(src, **{"data.max_docs": 60})
    d = prepare(cfg)
    assert d.train.n_docs + d.val.n_docs == 60
    assert d.token_bytes[np.array(d.train.array())].sum() == d.train.n_bytes
    assert 2.0 < d.train.n_bytes / d.train.n_tokens < 6.0  # a BPE on English text


def test_train_windows_are_a_pure_function_of_position(runs):
    d = prepare(load_config("micro", "baseline"))
    full = TrainWindows(d.train, 64, seed=3, start=0, rank=0, world=1, batch=4)
    it = iter(full)
    seq = [row for _ in range(10) for row in next(it)[0]]  # 10 batches of 4 samples
    later = iter(TrainWindows(d.train, 64, seed=3, start=5, rank=0, world=1, batch=4))
    assert all(np.array_equal(row, seq[20 + i]) for i, row in enumerate(next(later)[0]))
    later = TrainWindows(d.train, 64, seed=3, start=5, rank=0, world=1, batch=4)
    assert all(np.array_equal(later.micro_batch(5 + i // 4)[0][i % 4], seq[20 + i]) for i in range(8))  # step 5 = sample 20
    r0 = iter(TrainWindows(d.train, 64, seed=3, start=0, rank=0, world=2, batch=2))
    r1 = iter(TrainWindows(d.train, 64, seed=3, start=0, rank=1, world=2, batch=2))
    a = [*next(r0)[0], *next(r1)[0]]
    assert all(np.array_equal(x, y) for x, y in zip(a, seq[:4]))  # ranks split one global batch
    # DataLoader workers take turns and the loader interleaves them back into the same order
    loader = torch.utils.data.DataLoader(full, batch_size=None, num_workers=2)
    got = [row for _, (x, _y) in zip(range(5), loader) for row in x]
    assert all(np.array_equal(x, y) for x, y in zip(got, seq[:20])) and len(got) == 20


def test_valid_cache_does_not_read_the_corpus(runs, monkeypatch):
    cfg = load_config("micro", "baseline")
    first = prepare(cfg, log=lambda m: None)

    def no_read(*a, **k):
        raise AssertionError("the corpus was read although tokenizer and streams are cached")

    monkeypatch.setattr("bov.data.load_documents", no_read)
    again = prepare(cfg, log=lambda m: None)
    assert again.fingerprint == first.fingerprint and again.train.n_tokens == first.train.n_tokens


def test_streaming_packs_only_the_budget(tmp_path, runs):
    import gzip
    import json

    with gzip.open(tmp_path / "docs.jsonl.gz", "wt") as f:
        for i in range(400):
            f.write(json.dumps({"body": f"document {i}: " + "some words here and there " * 20}) + "\n")
    over = {"data.streaming": True, "data.text_field": "body", "train.val_tokens": 256}
    cfg = cfg_for(tmp_path / "docs.jsonl.gz", **over)
    small = prepare(cfg, stream_tokens=3000, log=lambda m: None)
    full = prepare(cfg_for(tmp_path / "docs.jsonl.gz", **{"data.text_field": "body"}), log=lambda m: None)
    per_doc = full.train.n_tokens / full.train.n_docs
    assert 3000 <= small.train.n_tokens < 3000 + 2 * per_doc < full.train.n_tokens  # stopped at the budget
    assert 512 <= small.val.n_tokens < 512 + 2 * per_doc
    assert small.token_bytes[np.array(small.train.array())].sum() == small.train.n_bytes
    bigger = prepare(cfg, stream_tokens=6000, log=lambda m: None)
    assert bigger.fingerprint == small.fingerprint and bigger.train.n_tokens == 6000  # budget keys nothing
    assert bigger.tokenizer_path == small.tokenizer_path  # the BPE does not depend on the budget
    assert bigger.token_bytes[np.array(bigger.train.array())[:6000]].sum() == bigger.train.n_bytes
    # a shorter budget is served by the longer stream, as its first tokens, without tokenizing again
    said = []
    again = prepare(cfg, stream_tokens=3000, log=said.append)
    assert said == [] and again.train.n_tokens == 3000
    assert np.array_equal(np.array(again.train.array())[:3000], np.array(bigger.train.array())[:3000])


def test_a_fresh_copy_of_the_same_corpus_keeps_its_caches_and_an_edit_rebuilds_them(tmp_path, runs, monkeypatch):
    """Caches are keyed by the corpus's bytes, not its mtimes: a data folder provisioned afresh (new mtimes,
    same bytes) once cost every session a new tokenizer and token streams; an edit is still seen."""
    import os
    import shutil

    monkeypatch.delenv("BOV_CACHE_DIR", raising=False)  # this test's own cache, so its digests can be counted
    words = " ".join(f"w{i % 97}" for i in range(4000))
    for i in range(40):
        (tmp_path / f"a{i:02d}.txt").write_text(f"doc {i} {words}\n")
    over = {"model.vocab_size": 300, "data.val_fraction": 0.2}
    first = prepare(cfg_for(tmp_path / "a*.txt", **over), log=lambda m: None)
    from bov.paths import cache_dir

    assert len(list(cache_dir("digests").glob("*.sha256"))) == 40  # each file read once, remembered
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in sorted(tmp_path.glob("a*.txt")):
        shutil.copy(f, copy / f.name)  # bytes only: new mtimes
        os.utime(copy / f.name, ns=(1, 1))

    def no_read(*a, **k):
        raise AssertionError("the corpus was read although the same bytes are cached")

    with monkeypatch.context() as m:
        m.setattr("bov.data.load_documents", no_read)
        again = prepare(cfg_for(copy / "a*.txt", **over), log=lambda m: None)
    assert again.fingerprint == first.fingerprint and again.train.n_tokens == first.train.n_tokens

    edited = copy / "a03.txt"
    edited.write_text(edited.read_text().replace("doc 3", "doc X"))  # same size, new bytes
    changed = prepare(cfg_for(copy / "a*.txt", **over), log=lambda m: None)
    assert changed.fingerprint != first.fingerprint
