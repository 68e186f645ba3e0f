"""Named corpora: `corpus:wikipedia-en/<files>` in data.source resolves to a local copy, or to its public equivalent.

The committed Wikipedia studies were made from a local copy of 8,153 English Wikipedia articles (a 2015 dump).
A user's clone does not have it, so a study names the corpus instead of its path, and the name resolves, in
this order, to:

1. a local copy: `$BOV_CORPORA/wikipedia-en` when BOV_CORPORA is set, else `../shared/data/wikipedia-en` beside
   the repository;
2. its public equivalent, built once under the cache dir from the Hugging Face Hub: the same articles by page
   id (`bov/corpora/wikipedia-en.json` lists them per file, in file order), the same split, a newer revision
   of their text (`wikimedia/wikipedia`, config `20231101.en`), written as files of the same names;
3. neither (no copy, no network): one line naming both options.

`bov.sources.corpus_origin` says which one a run used (its tag `bov.corpus`, beside the corpus digest). A name
hashes as the path the studies used before names existed, so their stores and results/ keep their config hashes
(bov.config).
"""

from __future__ import annotations

import functools
import hashlib
import json
import lzma
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from bov.config import CORPUS_PREFIX, LEGACY_CORPUS_ROOT, DataError
from bov.paths import cache_dir

MANIFESTS = Path(__file__).parent / "corpora"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # ../shared/data beside the repository
STAMP = "bov-corpus.json"  # written last into a built copy: a copy without it is incomplete and built again


@dataclass(frozen=True)
class Manifest:
    name: str
    hub_id: str
    hub_config: str
    files: dict[str, dict]  # file name -> {"sha256": of the local copy's bytes, "ids": page ids in file order}

    @property
    def ids(self) -> set[int]:
        return {i for f in self.files.values() for i in f["ids"]}


def is_named(source: str | None) -> bool:
    return bool(source) and source.startswith(CORPUS_PREFIX)


def split_name(source: str) -> tuple[str, str]:
    """`corpus:wikipedia-en/train-*.jsonl.xz` -> ("wikipedia-en", "train-*.jsonl.xz")."""
    name, _, pattern = source[len(CORPUS_PREFIX):].partition("/")
    return name, pattern or "*"


@functools.cache  # read once per process: every source check and read resolves the name again
def manifest(name: str) -> Manifest:
    path = MANIFESTS / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in MANIFESTS.glob("*.json")))
        raise DataError(f"data.source: no corpus named {name!r} (known: {known})")
    d = json.loads(path.read_text())
    return Manifest(d["name"], d["hub"]["id"], d["hub"]["config"], d["files"])


def local_roots(name: str) -> list[Path]:
    """Where a local copy may be: $BOV_CORPORA/<name> when set, else ../shared/data/<name> beside the repository
    (or beside the working directory, for a bov installed elsewhere and run from a clone)."""
    if os.environ.get("BOV_CORPORA"):
        return [Path(os.environ["BOV_CORPORA"]).expanduser() / name]
    return [SHARED / name, Path(LEGACY_CORPUS_ROOT) / name]


def hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def built_root(name: str) -> Path:
    return cache_dir("corpora", make=False) / name


def _complete(root: Path, m: Manifest) -> bool:
    return all((root / f).is_file() for f in m.files)


def root_of(name: str, build: bool = True) -> Path:
    """The folder the name resolves to; builds the public equivalent when there is no copy and `build`."""
    m = manifest(name)
    for root in local_roots(name):
        if _complete(root, m):
            return root
    built = built_root(name)
    if (built / STAMP).is_file():
        return built
    if build:
        try:
            build_from_hub(m, built)
            return built
        except Exception as e:  # offline, no datasets cache, hub error: all say the same to the user
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__
            raise DataError(f"data.source: corpus {name!r} has no local copy (set BOV_CORPORA to a folder holding "
                            f"{name}/, or place it at {local_roots(name)[0]}) and its public equivalent could not be built "
                            f"from the Hugging Face Hub ({m.hub_id} {m.hub_config}: {why}); run `bov prepare "
                            f"--corpus {name}` where there is network") from None
    raise DataError(f"data.source: corpus {name!r}: no local copy and no built copy")


def resolve(source: str, build: bool = True) -> str:
    """A named source -> a glob of files on this machine (other sources unchanged)."""
    if not is_named(source):
        return source
    name, pattern = split_name(source)
    return str(root_of(name, build) / pattern)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- the public equivalent

def hub_record(row: dict) -> dict:
    """A wikimedia/wikipedia row in the local copy's form: integer id, and the text opening with its title."""
    title, text = row["title"], row["text"]
    if not text.startswith(title + "\n"):
        text = f"{title}\n\n{text}"
    return {"id": int(row["id"]), "url": row["url"], "title": title, "text": text}


def select(records: Iterable[dict], m: Manifest, patience: int = 200_000) -> dict[int, dict]:
    """The manifest's articles out of a stream of records (any order). The dump is in page-id order, so
    reading stops `patience` records after the last one found once every id has been passed."""
    wanted, found, since = m.ids, {}, 0
    top = max(wanted)
    for r in records:
        i = int(r["id"])
        if i in wanted and i not in found:
            found[i], since = r, 0
            if len(found) == len(wanted):
                break
        else:
            since += 1
        if i > top and since >= patience:
            break
    return found


def write_copy(found: dict[int, dict], m: Manifest, out: Path, about: dict) -> Path:
    """Write the selected articles as the manifest's files (its order; absent ids skipped) into `out`,
    through a temporary folder renamed at the end: a copy is whole or absent."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_files(found, m, tmp, about)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _write_files(found: dict[int, dict], m: Manifest, tmp: Path, about: dict) -> None:
    for fname, meta in m.files.items():
        with lzma.open(tmp / fname, "wt", encoding="utf-8") as f:
            for i in meta["ids"]:
                if i in found:
                    f.write(json.dumps(found[i], ensure_ascii=False) + "\n")
    (tmp / STAMP).write_text(json.dumps({**about, "wanted": len(m.ids), "found": len(found),
                                         "missing": sorted(m.ids - set(found))}, indent=1))


def build_from_hub(m: Manifest, out: Path, load: Callable | None = None, log=print) -> Path:
    """Stream the Hub dataset, keep the manifest's page ids, write them as the local copy's files."""
    import datasets

    if load is None:  # no network fails here in a second, rather than in datasets' retries
        if hub_offline():
            raise ConnectionError("HF_HUB_OFFLINE is set")
        from huggingface_hub import HfApi

        HfApi().dataset_info(m.hub_id, timeout=10)
    log(f"corpus {m.name}: building its public equivalent from {m.hub_id} {m.hub_config} "
        f"({len(m.ids):,} page ids) under {out}")
    ds = (load or datasets.load_dataset)(m.hub_id, m.hub_config, split="train", streaming=True)
    found = select((hub_record(r) for r in ds), m)
    if not found:
        raise DataError(f"data.source: corpus {m.name}: none of its page ids is in {m.hub_id} {m.hub_config}")
    return write_copy(found, m, out, {"hub_id": m.hub_id, "hub_config": m.hub_config})


def manifest_of(root: Path, name: str, hub_id: str, hub_config: str) -> dict:
    """The manifest of a local copy (how bov/corpora/<name>.json was made): every file's digest and page ids."""
    files = {}
    for path in sorted(root.glob("*.jsonl.xz")):
        with lzma.open(path, "rt", encoding="utf-8") as f:
            files[path.name] = {"sha256": sha256_file(path), "ids": [json.loads(line)["id"] for line in f]}
    return {"name": name, "hub": {"id": hub_id, "config": hub_config}, "files": files}
