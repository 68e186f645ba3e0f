"""Where text comes from: a data source -> Hugging Face `datasets` documents, checked before any compute.

Sources: the embedded offline corpus `stdlib` (this interpreter's standard-library sources, one document per
file, in sorted path order), local files (txt, jsonl, parquet; .gz/.xz; globs), or a hub dataset id. A bad
source (no file, unreadable JSON, no text column, an empty split) is one DataError line naming the key and
file, before a tokenizer is trained. Train/validation split at document level by a hash of the text
(`doc_bucket`), so it is deterministic and disjoint. bov.data turns the documents into token streams.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path


from bov import corpora
from bov.config import DataConfig, DataError, ExperimentConfig
from bov.corpora import hub_offline, sha256_file
from bov.paths import cache_dir

HASH_BUCKETS = 10_000


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "__pycache__")
    return sorted(p for p in root.rglob("*.py") if not any(s in p.relative_to(root).parts for s in skip))


def _local_files(source: str) -> list[Path]:
    source = corpora.resolve(source)  # a named corpus: its local copy, or its public equivalent (built once)
    paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise DataError(f"data.source: no file matches {source!r}")
    return paths


def _kind(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".xz", ".bz2", ".zst")]
    ext = suffixes[-1] if suffixes else ""
    return {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(ext, "text")


FILE_SUFFIXES = (".txt", ".md", ".py", ".json", ".jsonl", ".parquet", ".gz", ".xz", ".bz2", ".zst")


def is_local(source: str) -> bool:
    """stdlib, a path or a glob; anything else (e.g. `org/name`) is a hub dataset id."""
    return (source == "stdlib" or corpora.is_named(source) or source.startswith(("/", ".", "~")) or any(c in source for c in "*?[")
            or source.endswith(FILE_SUFFIXES) or Path(source).exists())


def describe_source(source: str) -> dict:
    """Identity of a source for cache keys: local files by their bytes (`file_digest`), the rest by name."""
    if source == "stdlib":
        files = stdlib_files()
        return {"source": "stdlib", "python": sys.version.split()[0],
                "files": hashlib.sha256("".join(f"{p}:{p.stat().st_size}" for p in files).encode()).hexdigest()}
    if is_local(source):
        return {"sha256": [file_digest(p) for p in _local_files(source)]}
    return {"source": source}


SAME_BYTES = "the files results/ was made from"  # what corpus_origin says of a copy with the committed bytes


def corpus_origin(source: str | None) -> str | None:
    """Which copy a named corpus resolved to, in words (None for any other source): a run's tag bov.corpus."""
    if not corpora.is_named(source):
        return None
    name, _ = corpora.split_name(source)
    root = corpora.root_of(name, build=False)
    if root == corpora.built_root(name):
        stamp = json.loads((root / corpora.STAMP).read_text())
        return (f"{name}: public equivalent from {stamp['hub_id']} {stamp['hub_config']} ({stamp['found']:,} of "
                f"{stamp['wanted']:,} page ids; newer text than results/ was made from)")
    same = all(file_digest(root / f) == meta["sha256"] for f, meta in corpora.manifest(name).files.items())
    return f"{name}: local copy {root} ({SAME_BYTES if same else 'other bytes than ' + SAME_BYTES})"


_UNSAVED_DIGESTS: dict[Path, str] = {}  # memo file -> digest, computed in this process, saved by remember_digests


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read once per (path, size, mtime) and remembered under the cache dir.

    Keyed by content rather than by mtime, because a corpus copied afresh (a re-provisioned data folder,
    `cp` without -p) keeps its bytes but not its mtimes: its tokenizer and token streams must not be built
    again. One read of the file per new mtime is the price (about 0.1 s per 30 MB here). The memo is written
    by `remember_digests` once the corpus has proved usable, so a refused corpus leaves no file behind."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_dir("digests") / f"{key}.sha256"
    if memo in _UNSAVED_DIGESTS:
        return _UNSAVED_DIGESTS[memo]
    if memo.is_file():
        known = memo.read_text(errors="replace").strip()
        if len(known) == 64 and all(c in "0123456789abcdef" for c in known):
            return known  # else a damaged memo: read the file again (remember_digests replaces it)
    _UNSAVED_DIGESTS[memo] = sha256_file(path)
    return _UNSAVED_DIGESTS[memo]


def remember_digests() -> None:
    """Save the digests this process computed (bov.data.prepare calls it once its caches stand)."""
    while _UNSAVED_DIGESTS:
        memo, digest = _UNSAVED_DIGESTS.popitem()
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, memo)  # never a half-written digest


BYTE_LEVEL_MIN_VOCAB = 257  # 256 byte tokens + BOS


def check_vocab(cfg: ExperimentConfig) -> None:
    """A trained byte-level BPE has at least 257 ids: a smaller model.vocab_size would index past its table."""
    if cfg.data.tokenizer is None and cfg.model.vocab_size < BYTE_LEVEL_MIN_VOCAB:
        raise DataError(f"model.vocab_size {cfg.model.vocab_size}: a byte-level BPE needs at least "
                        f"{BYTE_LEVEL_MIN_VOCAB} ids (256 bytes + BOS)")


def check_source(cfg: DataConfig) -> None:
    """Fail in one line, before any compute, when a source cannot be read."""
    for key, src in (("data.source", cfg.source), ("data.val_source", cfg.val_source)):
        if src is None or src == "stdlib":
            continue
        if is_local(src):
            try:  # a named corpus: its copy, or one line naming where a copy could come from
                src = corpora.resolve(src)
            except DataError as e:
                raise DataError(str(e).replace("data.source", key, 1)) from None
            try:
                files = _local_files(src)
            except DataError:
                raise DataError(f"{key}: no file matches {src!r}") from None
            for f in files:  # an .xz ends with its stream footer: a cut copy is caught without reading it
                if f.suffix == ".xz" and f.stat().st_size and _tail(f, 2) != b"YZ":
                    raise DataError(f"{key}: {f} is truncated (no .xz end-of-stream footer)")
            continue
        if hub_offline():
            continue  # the usual cluster setup: datasets reads its own cache and asks no server
        try:
            from huggingface_hub import HfApi

            HfApi().dataset_info(src, timeout=10)
        except Exception as e:  # offline, unknown id, gated: all say the same thing to the user
            raise DataError(f"{key}: hub dataset {src!r} is not reachable ({type(e).__name__}); give local files "
                            "instead (a path or glob of .jsonl/.parquet/.txt, compressed or not), or set "
                            "HF_HUB_OFFLINE=1 to read a dataset already in the datasets cache") from None


def _tail(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(-min(n, path.stat().st_size), os.SEEK_END)
        return f.read()




def cause_of(e: BaseException) -> str:
    """The innermost reason of a `datasets` error, in one short line."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def arrow_damage(e: BaseException) -> bool:
    """The error, or one that caused it, is Arrow failing to read a file: in bov, a damaged datasets cache entry
    (the sources themselves are read by datasets' own JSON, text and Parquet readers and checked before)."""
    import pyarrow

    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, (pyarrow.lib.ArrowInvalid, pyarrow.lib.ArrowIOError)) and "JSON" not in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _first_bad_json_line(files: list[str]) -> tuple[str, str] | None:
    """(file, "line N: why") of the first line that is not one JSON object, or None (say, all are)."""
    import bz2
    import gzip
    import lzma

    opener = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
    for f in files:
        n = 1
        try:
            with opener.get(Path(f).suffix, open)(f, "rt", encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip() and not isinstance(json.loads(line), dict):
                        return f, f"line {n}: not a JSON object"
        except (ValueError, EOFError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return f, f"line {n}: {type(e).__name__}: {str(e)[:160]}"
    return None


def _check_text_column(ds, source: str, key: str, field: str) -> None:
    import datasets

    if isinstance(ds, datasets.Dataset) and len(ds) == 0:
        raise DataError(f"{key}: {source!r} holds no records")
    if field not in (ds.column_names or [field]):
        raise DataError(f"data.text_field: {source!r} has no column {field!r} (columns: {', '.join(ds.column_names)})")
    if isinstance(ds, datasets.Dataset):  # Arrow knows the column's type and nulls without reading a row
        import pyarrow.compute as pc

        col = ds.data.column(field)
        if not (col.type.equals("string") or col.type.equals("large_string") or col.null_count == len(col)):
            raise DataError(f"{key}: {source!r}: field {field!r} holds {col.type}, not text")
        if col.null_count:
            first = pc.index(pc.is_null(col), True).as_py()
            raise DataError(f"{key}: {source!r}: record {first + 1} has no {field!r} (null)")


def load_documents(source: str, cfg: DataConfig, key: str = "data.source"):
    """A `datasets` Dataset (or IterableDataset when streaming) with one `text` column.

    A file that is not what its name says (binary, not UTF-8, invalid JSON lines, truncated compression),
    holds no records, or whose text field is missing, null or not text fails here in one line naming the
    key and the file (and the record)."""
    import datasets

    datasets.disable_progress_bars()
    if source == "stdlib":
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()]
        ds = datasets.Dataset.from_dict({"text": texts})
    elif is_local(source):
        files = [str(p) for p in _local_files(source)]
        kind = _kind(Path(files[0]))
        kwargs = {"sample_by": "document" if cfg.doc_split == "file" else "paragraph"} if kind == "text" else {}
        logger = datasets.utils.logging.get_logger("datasets")
        level = logger.level
        logger.setLevel(100)  # its own report of a bad file is several lines; ours is one
        load = lambda **more: datasets.load_dataset(kind, data_files=files, split="train",  # noqa: E731
                                                    streaming=cfg.streaming, cache_dir=str(cache_dir("datasets")),
                                                    **kwargs, **more)
        try:  # its Arrow cache under BOV_CACHE_DIR, not ~/.cache/huggingface: run state stays where it is told
            try:
                ds = load()
            except Exception as e:  # a damaged cache entry is derived data: build it again from the files, once
                if not arrow_damage(e):
                    raise
                ds = load(download_mode="force_redownload")
        except Exception as e:
            if all(Path(f).stat().st_size == 0 for f in files):
                raise DataError(f"{key}: {source!r} holds no records") from None
            what = {"json": "JSON lines", "parquet": "Parquet", "text": "UTF-8 text"}[kind]
            name, why = (files[0] if len(files) == 1 else f"{source!r} ({len(files)} files)"), cause_of(e)
            if kind == "json":
                name, why = _first_bad_json_line(files) or (name, why)
            raise DataError(f"{key}: {name} is not readable as {what} ({why})") from None
        finally:
            logger.setLevel(level)
    else:
        try:
            ds = datasets.load_dataset(source, cfg.hub_config, split="train", streaming=cfg.streaming)
        except Exception as e:
            where = "is not in the datasets cache (HF_HUB_OFFLINE is set)" if hub_offline() else "could not be loaded"
            raise DataError(f"data.source: hub dataset {source!r} {where} ({type(e).__name__}); give local files "
                            "instead (a path or glob of .jsonl/.parquet/.txt)") from None
    plain_text = source == "stdlib" or (is_local(source) and _kind(Path(source)) == "text")
    field = "text" if plain_text else cfg.text_field  # jsonl, parquet and hub rows name their text field
    try:
        _check_text_column(ds, source, key, field)
    except DataError:
        if source != "stdlib":
            drop_cache(ds)
        raise
    if field != "text":
        ds = ds.rename_column(field, "text")
    keep = ["text"]
    ds = ds.remove_columns([c for c in (ds.column_names or []) if c not in keep])
    if cfg.max_docs is not None:
        ds = ds.take(cfg.max_docs) if not isinstance(ds, datasets.Dataset) else ds.select(range(min(cfg.max_docs, len(ds))))
    return ds


def drop_cache(ds) -> None:
    """Remove the Arrow cache entry of a Dataset we refuse (an IterableDataset has none)."""
    import datasets

    if isinstance(ds, datasets.Dataset):
        for d in {Path(c["filename"]).parent for c in ds.cache_files}:
            shutil.rmtree(d, ignore_errors=True)


def check_split(ds, name: str, d: DataConfig, n_docs: int) -> None:
    """A split with no document, or only empty ones, fails before the tokenizer is trained or anything is packed.

    A stream is not read ahead for this; `_pack` still refuses an empty one."""
    import datasets

    if not isinstance(ds, datasets.Dataset):
        return
    if len(ds) == 0:
        if name == "val":
            raise DataError(f"data.val_fraction: no document of {d.source!r} falls in the validation split "
                            f"({n_docs} documents at val_fraction {d.val_fraction}); give more documents, a larger "
                            "data.val_fraction, or data.val_source")
        raise DataError(f"data.source: no document of {d.source!r} is left for training ({n_docs} documents at "
                        f"val_fraction {d.val_fraction})")
    if not any(t for batch in ds.iter(batch_size=1024) for t in batch["text"]):
        key = "data.val_source" if name == "val" and d.val_source else "data.source"
        raise DataError(f"{key}: every document of the {name} split is empty text")


def doc_bucket(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "replace")).digest()[:8], "little") % HASH_BUCKETS
