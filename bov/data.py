"""Documents (bov.sources) -> byte-level BPE -> packed token streams (memmap) -> a LightningDataModule.

The train/validation split is at document level by a hash of the text, so it is deterministic and
disjoint. Tokens are packed into one flat uint16/uint32 file per
split, cached under the runs directory by a content hash of (source, tokenizer,
split settings); the cache is written atomically and verified by checksum, so a
partial or corrupt cache is rebuilt, never used.

Every stream keeps the exact UTF-8 byte count of each token id, so validation
bits-per-byte is exact: bpb = sum(nats) / (ln 2 * sum(bytes of the predicted tokens)).

What a run was trained on is its `PreparedData.identity` (corpus bytes, tokenizer, the token streams it reads);
checkpoints and studies record it, and `prepare(expect=...)` refuses, at the first stage that differs and before
the next one is built, to serve a run or a study other data than it recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import lightning.pytorch as pl
import numpy as np
import torch

from bov.config import DataConfig, DataError, ExperimentConfig
from bov.paths import cache_dir
from bov.corpora import sha256_file
from bov.sources import (HASH_BUCKETS, arrow_damage, cause_of, check_source, check_split, check_vocab, describe_source,
                         doc_bucket, drop_cache, load_documents, remember_digests)

BOS = "<|bos|>"
PACK_FORMAT = 1  # how _pack lays out a stream; a cache of another format is rebuilt, never read as this one
UNIQUE_SAMPLE_SEED = 20260526  # which windows data.max_unique_tokens keeps: fixed, not the training seed
TOKENIZER_TRAIN_CHARS = 20_000_000  # BPE merges converge long before this on one corpus


# ----------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """The byte <-> printable-character map of byte-level BPE (GPT-2's convention)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def token_byte_lengths(tok) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens)."""
    inv = {c: b for b, c in _bytes_to_unicode().items()}
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    out = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for piece, idx in tok.get_vocab().items():
        if piece in special:
            continue
        if all(ch in inv for ch in piece):
            out[idx] = len(piece)  # each character is one byte
        else:  # not byte-level (a loaded tokenizer): count its decoded text
            out[idx] = len(tok.decode([idx]).encode("utf-8"))
    return out


def train_tokenizer(texts: Iterator[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def remove_orphan_tmp(directory: Path) -> None:
    """Delete `*.tmp<pid>` files whose writer is gone (killed mid-write); a live writer's file stays."""
    for tmp in directory.glob("*.tmp*"):
        pid = tmp.suffix.removeprefix(".tmp")
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, another user's


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def get_tokenizer(cfg: ExperimentConfig, train_texts: Callable[[], Iterator[str]], fingerprint: str):
    """Load the configured tokenizer, or train (and cache) a byte-level BPE on train_texts()."""
    from tokenizers import Tokenizer

    vocab = cfg.model.vocab_size
    if cfg.data.tokenizer:
        path = Path(cfg.data.tokenizer)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise DataError(f"data.tokenizer: file not found: {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise DataError(f"data.tokenizer: {path} is not a tokenizers JSON file ({cause_of(e)})") from None
        if tok.get_vocab_size() > vocab:
            raise DataError(f"data.tokenizer: {path} has {tok.get_vocab_size()} tokens > model.vocab_size {vocab}")
        return tok, path
    remove_orphan_tmp(cache_dir("tokenizers"))
    path = cache_dir("tokenizers") / f"bpe-{fingerprint}-{vocab}.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path)), path
        except Exception:
            path.unlink()  # corrupt: rebuild below

    def texts():
        budget = TOKENIZER_TRAIN_CHARS
        for t in train_texts():
            yield t
            budget -= len(t)
            if budget <= 0:
                return

    tok = train_tokenizer(texts(), vocab)
    _atomic_write_text(path, tok.to_str())
    return tok, path


# ----------------------------------------------------------------------------- packed streams


@dataclass
class TokenStream:
    """One packed split: a flat token memmap plus its byte count.

    `complete`: the whole source was packed; otherwise packing stopped at a token budget, and a
    later, larger budget packs more. `head(n)` is the view a run with a budget of n tokens reads.
    """

    path: Path
    n_tokens: int
    n_bytes: int
    n_docs: int
    dtype: str
    complete: bool = True
    sha256: str = ""  # of the tokens this view holds: what a run's data identity records

    def array(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))

    def serves(self, n: int | None) -> bool:
        return self.complete or (n is not None and self.n_tokens >= n)

    def head(self, n: int | None, token_bytes: np.ndarray) -> "TokenStream":
        """The first n tokens (all when n is None or the stream is shorter), with their exact byte count."""
        if n is None or n >= self.n_tokens:
            return self
        head = np.asarray(self.array()[:n])
        n_bytes = int(token_bytes[head].sum())
        return TokenStream(self.path, n, n_bytes, 0, self.dtype, complete=False,
                           sha256=hashlib.sha256(head.tobytes()).hexdigest())


def _load_cached(bin_path: Path) -> TokenStream | None:
    meta_path = bin_path.with_suffix(".json")
    if not (bin_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format", 1) != PACK_FORMAT:  # written by a bov that packed otherwise
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        if bin_path.stat().st_size != meta["n_tokens"] * itemsize or sha256_file(bin_path) != meta["sha256"]:
            return None
        return TokenStream(bin_path, meta["n_tokens"], meta["n_bytes"], meta["n_docs"], meta["dtype"],
                           meta.get("complete", True), meta["sha256"])
    except (ValueError, KeyError, OSError):
        return None


def _pack(docs, tok, bos_id: int, bin_path: Path, num_proc: int, max_tokens: int | None) -> TokenStream:
    """Tokenize with batched (multi-process) map and append to a flat file, atomically."""
    import datasets

    dtype = np.uint16 if tok.get_vocab_size() <= 65536 else np.uint32

    def encode(batch):
        enc = tok.encode_batch(batch["text"], add_special_tokens=False)
        return {"ids": [[bos_id] + e.ids for e in enc], "n_bytes": [len(t.encode("utf-8")) for t in batch["text"]]}

    if isinstance(docs, datasets.Dataset):
        nproc = num_proc if len(docs) >= 64 * num_proc else None
        enc = docs.map(encode, batched=True, batch_size=256, num_proc=nproc, remove_columns=["text"])
    else:  # streaming: one process, stopping at the token budget; encode_batch runs on every core itself
        enc = docs.map(encode, batched=True, batch_size=4096, remove_columns=["text"])
    tmp = bin_path.with_suffix(f".tmp{os.getpid()}")
    n_tokens = n_bytes = n_docs = 0
    complete = True
    with open(tmp, "wb") as f:
        for row in enc:
            f.write(np.asarray(row["ids"], dtype=dtype).tobytes())
            n_tokens += len(row["ids"])
            n_bytes += row["n_bytes"]
            n_docs += 1
            if max_tokens is not None and n_tokens >= max_tokens:
                complete = False  # stopped at the budget: a larger budget packs again
                break
    if n_tokens < 2:
        tmp.unlink()
        raise DataError(f"data.source: split {bin_path.stem!r} is empty after tokenization")
    meta = {"n_tokens": n_tokens, "n_bytes": n_bytes, "n_docs": n_docs, "dtype": np.dtype(dtype).name,
            "sha256": sha256_file(tmp), "complete": complete, "format": PACK_FORMAT}
    os.replace(tmp, bin_path)  # data first, then the meta that vouches for it
    _atomic_write_text(bin_path.with_suffix(".json"), json.dumps(meta))
    return TokenStream(bin_path, n_tokens, n_bytes, n_docs, meta["dtype"], complete, meta["sha256"])


# ----------------------------------------------------------------------------- what a run was trained on

# The stages of a run's data identity, in the order prepare builds them, and how a refusal names each.
IDENTITY_STAGES = {"corpus": "corpus (the bytes of data.source and data.val_source, and the split settings)",
                   "tokenizer": "tokenizer", "train": "training token stream", "val": "validation token stream",
                   "fingerprint": "data fingerprint"}


class DataDrift(DataError):
    """A run or a study would continue on other data than it recorded."""


@dataclass(frozen=True)
class Recorded:
    """A data identity that a checkpoint or a study recorded, whom it belongs to, and what the user can do."""

    owner: str  # e.g. "--resume: the run in runs/train/tiny-bov-1c9e"
    identity: dict
    advice: str  # e.g. "restore the data it was trained on, or start a new run (without --resume)"

    def check(self, stage: str, now: str) -> None:
        was = self.identity.get(stage)
        if was is not None and was != now:
            raise DataDrift(f"{self.owner} was trained on another {IDENTITY_STAGES[stage]}: recorded {was[:16]}, "
                            f"now {now[:16]}; {self.advice}")


def check_identity(expect, identity: dict[str, str]) -> None:
    """Each recorded identity against the stages known so far: the first difference raises DataDrift."""
    for stage, now in identity.items():
        for rec in expect:
            rec.check(stage, now)


@dataclass
class PreparedData:
    train: TokenStream
    val: TokenStream
    token_bytes: np.ndarray  # bytes per token id
    tokenizer_path: Path
    fingerprint: str  # identifies (source, tokenizer, split settings)
    bos_id: int
    identity: dict  # IDENTITY_STAGES -> digest: what a run on this data is trained on

    def check_windows(self, seq_len: int) -> None:
        """Each split holds at least one window of seq_len + 1 tokens: said before a run is opened."""
        for name, stream in (("training", self.train), ("validation", self.val)):
            if stream.n_tokens < seq_len + 1:
                raise DataError(f"model.seq_len {seq_len}: the {name} split has {stream.n_tokens:,} tokens, "
                                f"fewer than one window of {seq_len + 1:,}")

    def unigram_bpb(self) -> float:
        """Bits per byte of a unigram model fitted on train (add-one), scored on val: the bar to clear."""
        counts = np.bincount(np.asarray(self.train.array()), minlength=len(self.token_bytes)).astype(np.float64) + 1
        logp = np.log2(counts / counts.sum())
        val = np.asarray(self.val.array())[1:]  # the predicted tokens, as in training
        return float(-logp[val].sum() / self.token_bytes[val].sum())


class _Documents:
    """A data setting's documents, read and split only when something has to be built (a tokenizer, a stream)."""

    def __init__(self, d: DataConfig, log):
        self.d, self.log, self.parts = d, log, {}

    def split(self) -> dict:
        """train/val datasets: a document-level hash split, or the separate validation source; each checked."""
        d = self.d
        if self.parts:
            return self.parts
        docs = load_documents(d.source, d)
        if d.val_source is None:
            cut = round(d.val_fraction * HASH_BUCKETS)
            parts = {"train": docs.filter(lambda t: doc_bucket(t) >= cut, input_columns="text"),
                     "val": docs.filter(lambda t: doc_bucket(t) < cut, input_columns="text")}
        else:
            parts = {"train": docs, "val": load_documents(d.val_source, d, key="data.val_source")}
        try:
            for name in ("train", "val"):
                check_split(parts[name], name, d, len(docs) if hasattr(docs, "__len__") else 0)
        except DataError:
            for ds in {id(x): x for x in (docs, parts["train"], parts["val"])}.values():
                drop_cache(ds)
            raise
        self.parts = parts
        return parts

    def rebuilt(self, step):
        """Run a step that reads the datasets' Arrow cache; a damaged entry (cut short, overwritten) is dropped
        and the step runs once more from the source files, since the cache is derived from them."""
        try:
            return step()
        except Exception as e:
            if not arrow_damage(e) or not self.parts:
                raise
            for ds in list(self.parts.values()):
                drop_cache(ds)
            self.parts = {}
            self.log(f"note: the datasets cache of {self.d.source} was damaged ({cause_of(e)}); rebuilt from the source")
            return step()


def corpus_fingerprint(d: DataConfig) -> str:
    """The corpus a setting reads: the bytes of its sources (a named corpus, whichever copy), and the split."""
    split_key = {"val_fraction": d.val_fraction, "val_source": d.hashed()["val_source"], "doc_split": d.doc_split,
                 "text_field": d.text_field, "max_docs": d.max_docs, "hub_config": d.hub_config}
    src_id = json.dumps({"train": describe_source(d.source), "val": d.val_source and describe_source(d.val_source),
                         **split_key}, sort_keys=True)
    return hashlib.sha256(src_id.encode()).hexdigest()[:16]


def prepare(cfg: ExperimentConfig, stream_tokens: int | None = None, log=print,
            expect: tuple[Recorded, ...] | list[Recorded] = ()) -> PreparedData:
    """Build (or reuse) the tokenizer and the packed train/val streams for a config.

    Streams are cached by (source, tokenizer, split settings), never by budget. With `data.streaming`
    the train split packs `stream_tokens` tokens (what the run's budget reads); a cached stream at least
    that long serves the run (as its first `stream_tokens` tokens, so what a run reads does not depend
    on what was cached before), and only a longer budget packs again.

    `expect`: identities recorded by a checkpoint or a study. Each stage is compared as soon as it is known
    (the corpus before a tokenizer is trained, the tokenizer before anything is tokenized), and the first
    difference raises DataDrift.
    """
    d = cfg.data
    check_vocab(cfg)
    check_source(d)
    corpus_fp = corpus_fingerprint(d)
    check_identity(expect, {"corpus": corpus_fp})

    docs = _Documents(d, log)
    tok, tok_path = docs.rebuilt(lambda: get_tokenizer(cfg, lambda: (r["text"] for r in docs.split()["train"]), corpus_fp))
    bos_id = tok.token_to_id(BOS)
    if bos_id is None:
        bos_id = tok.get_vocab_size() - 1 if cfg.data.tokenizer else 0
    tok_hash = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
    key = f"{corpus_fp}:{tok_hash}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    check_identity(expect, {"tokenizer": tok_hash, "fingerprint": fingerprint})
    root = cache_dir("tokens") / fingerprint
    root.mkdir(parents=True, exist_ok=True)
    remove_orphan_tmp(root)
    # A stream has no end: pack what the run will read (train) and twice the validation budget.
    limits = {"train": stream_tokens, "val": 2 * cfg.train.val_tokens} if d.streaming else {"train": None, "val": None}
    token_bytes = token_byte_lengths(tok)
    streams = {}
    for name in ("train", "val"):
        path = root / f"{name}.bin"
        stream = _load_cached(path)
        if stream is None or not stream.serves(limits[name]):
            docs.split()  # read (and checked) before we say we tokenize it
            log(f"tokenizing {name} split of {d.val_source if name == 'val' and d.val_source else d.source} -> {path}")
            stream = docs.rebuilt(lambda: _pack(docs.split()[name], tok, bos_id, path, d.num_proc or os.cpu_count() or 1,
                                                limits[name]))
        streams[name] = stream.head(limits[name], token_bytes)
        check_identity(expect, {name: streams[name].sha256})
    remember_digests()
    identity = {"corpus": corpus_fp, "tokenizer": tok_hash, "train": streams["train"].sha256,
                "val": streams["val"].sha256, "fingerprint": fingerprint}
    return PreparedData(streams["train"], streams["val"], token_bytes, tok_path, fingerprint, bos_id, identity)


# ----------------------------------------------------------------------------- loading


class TrainWindows(torch.utils.data.IterableDataset):
    """Endless random windows of seq_len + 1 tokens; sample k is a pure function of (seed, k).

    Epoch e visits every non-overlapping window once in a seed-and-e permutation, so
    the batch at any step is known without replaying the ones before it: resuming at
    step s starts at sample s * batch * accum * world, and ranks take disjoint slices.
    """

    def __init__(self, stream: TokenStream, seq_len: int, seed: int, start: int, rank: int, world: int, batch: int,
                 unique_tokens: int | None = None):
        super().__init__()
        self.stream, self.T, self.seed = stream, seq_len, seed
        self.start, self.rank, self.world, self.batch = start, rank, world, batch
        n = min(unique_tokens or stream.n_tokens, stream.n_tokens)
        total = (stream.n_tokens - 1) // seq_len
        self.n_windows = (n - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(f"data.source: {n} training tokens is fewer than one window of {seq_len + 1}")
        # data.max_unique_tokens: a fixed random sample of the stream's windows, the same for every seed and
        # variant. Not a prefix: a corpus packed in file order (stdlib) would narrow its domain as well as its size.
        self.pool = None
        if self.n_windows < total:
            g = torch.Generator().manual_seed(UNIQUE_SAMPLE_SEED)
            self.pool = torch.randperm(total, generator=g)[: self.n_windows].numpy()
        self._perm: tuple[int, np.ndarray] | None = None

    def windows(self, ks: np.ndarray) -> np.ndarray:
        """Sample numbers -> window indices in the stream."""
        epochs, pos = np.divmod(ks, self.n_windows)
        out = np.empty_like(ks)
        for e in np.unique(epochs):  # a batch spans at most two epochs
            if self._perm is None or self._perm[0] != e:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(e))
                self._perm = (int(e), torch.randperm(self.n_windows, generator=g).numpy())
            sel = epochs == e
            out[sel] = self._perm[1][pos[sel]]
        return out if self.pool is None else self.pool[out]

    def micro_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch at micro-step `step`: one global micro-batch is world * batch samples."""
        base = step * self.world * self.batch + self.rank * self.batch
        w = self.windows(np.arange(base, base + self.batch))
        rows = np.asarray(self.stream.array()[(w * self.T)[:, None] + np.arange(self.T + 1)], dtype=np.int64)
        chunk = torch.from_numpy(rows)  # gathered in one vectorized read
        return chunk[:, :-1], chunk[:, 1:]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        step, stride = self.start, 1
        if info is not None:  # DataLoader workers take turns, and the loader hands their batches out in turn
            step, stride = self.start + info.id, info.num_workers
        while True:
            yield self.micro_batch(step)
            step += stride


class ValWindows(torch.utils.data.Dataset):
    """The first `max_tokens` of the validation stream as consecutive windows, fixed."""

    def __init__(self, stream: TokenStream, seq_len: int, max_tokens: int):
        self.stream, self.T = stream, seq_len
        self.n = max(1, min(max_tokens, stream.n_tokens - 1) // seq_len)
        if stream.n_tokens - 1 < seq_len:
            raise DataError(f"validation split has {stream.n_tokens} tokens, fewer than one window of {seq_len + 1}")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        chunk = torch.from_numpy(self.stream.array()[i * self.T : i * self.T + self.T + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


class TokenDataModule(pl.LightningDataModule):
    """Train/val loaders over prepared streams; the train position follows trainer.global_step."""

    def __init__(self, cfg: ExperimentConfig, data: PreparedData, unique_tokens: int | None = None):
        super().__init__()
        self.cfg, self.data, self.unique_tokens = cfg, data, unique_tokens

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self):
        rank, world = self._rank_world()
        step = self.trainer.global_step if self.trainer is not None else 0  # restored before loaders on resume
        ds = TrainWindows(self.data.train, self.cfg.model.seq_len, self.cfg.train.seed,
                          step * self.cfg.train.grad_accum, rank, world, self.cfg.train.batch_size, self.unique_tokens)
        # On a GPU, two workers gather the next batches into pinned memory while the GPU trains; on a CPU
        # the cores are the trainer's, and a vectorized gather costs little.
        gpu = torch.cuda.is_available()
        return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2 if gpu else 0, pin_memory=gpu,
                                           persistent_workers=gpu)

    def val_dataloader(self):
        rank, world = self._rank_world()
        ds = ValWindows(self.data.val, self.cfg.model.seq_len, self.cfg.train.val_tokens)
        # every window exactly once across ranks (no padding), so summed nats/bytes stay exact
        shard = torch.utils.data.Subset(ds, range(rank, len(ds), world))
        return torch.utils.data.DataLoader(shard, batch_size=self.cfg.train.batch_size)
