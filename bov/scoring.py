"""Exact bits per byte of a model on any text, in sliding windows: the leaf that `bov eval`, `bov probe` and the
lm-eval model class share (bov.evaluate runs it over checkpoints and logs to their runs).

A text is what `data.source` takes (local files, globs, compressed, a hub id, `stdlib`), read with the
checkpoint's own tokenizer and packed as training packs it: each document is `BOS + tokens`, documents
follow one another. Every token after the first is predicted once; a long stream is cut into windows of the
model's context C moved by a stride S <= C: the first window scores all of its C predictions, each later
window only its last S, so every scored token sees at least C - S tokens of context (S = C: disjoint
windows, as training's validation; smaller S: more context, more compute).

    bpb = sum(nats of the predicted tokens) / (ln 2 * sum(UTF-8 bytes of the predicted tokens))

with BOS predicted at the start of each later document (0 bytes), the same convention as `val/bpb`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from bov.config import DataConfig, DataError

TEXT_NAME = re.compile(r"^[A-Za-z0-9_.\- ]+$")  # what an MLflow key accepts between slashes


@dataclass
class Text:
    """One evaluation text: a name (the metric key's middle part) and its token stream."""

    name: str
    source: str
    ids: np.ndarray  # int64, BOS + doc tokens, per document, concatenated
    token_bytes: np.ndarray  # bytes per vocabulary id (0 for BOS)
    documents: int

    @property
    def n_bytes(self) -> int:
        return int(self.token_bytes[self.ids[1:]].sum())

    def unigram_bpb(self) -> float:
        """Bits per byte of a unigram model fitted on this text itself: an optimistic unigram bar."""
        y = self.ids[1:]
        counts = np.bincount(y, minlength=len(self.token_bytes)).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(counts[counts > 0] * np.log2(p)).sum() / max(1, self.n_bytes))


def text_name(source: str) -> str:
    """A short metric-safe name: the file stem without its extensions, the hub id's last part, or `stdlib`."""
    base = source.rstrip("/").split("/")[-1] or source
    base = base.split(".")[0] if not base.startswith(".") else base
    name = re.sub(r"[^A-Za-z0-9_.\- ]", "_", base).strip("_") or "text"
    return name


def parse_data_arg(arg: str) -> tuple[str, str]:
    """`NAME=SOURCE` or `SOURCE` -> (name, source)."""
    if "=" in arg and not arg.startswith(("/", ".", "~")):
        name, source = arg.split("=", 1)
        if not TEXT_NAME.match(name) or name.startswith("."):  # it names a metric and a folder
            raise DataError(f"--data {arg!r}: a text name holds letters, digits, _ . - only, and starts with no '.'")
        return name, source
    return text_name(arg), arg


def parse_texts(args: list[str]) -> list[tuple[str, str]]:
    """`--data` options -> (name, source) pairs, each source checked (one DataError line) before any compute."""
    from bov.sources import check_source

    texts = [parse_data_arg(a) for a in args]
    names = [n for n, _ in texts]
    if len(set(names)) < len(names):
        raise DataError(f"--data: two texts are named {max(names, key=names.count)!r}; name them (NAME=SOURCE)")
    for _, source in texts:
        check_source(DataConfig(source=source))
    return texts


def load_text(source: str, name: str, tokenizer, bos_id: int, token_bytes: np.ndarray,
              max_tokens: int | None = None, text_field: str = "text", max_docs: int | None = None) -> Text:
    """Read and tokenize a text source as training packs it (BOS before each document)."""
    from bov.sources import check_source, load_documents

    cfg = DataConfig(source=source, text_field=text_field, max_docs=max_docs, streaming=False)
    check_source(cfg)
    try:  # a file that is not what its name says fails in load_documents, naming it (and its line or record)
        ds = load_documents(source, cfg, key="--data")
    except DataError:
        raise
    except Exception as e:  # a hub dataset that cannot be read
        raise DataError(f"--data {source}: cannot be read as text ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    pieces, n, docs = [], 0, 0
    for start in range(0, len(ds), 1000):
        texts = ds[start : start + 1000]["text"]  # an empty document is a BOS alone, as training packs it
        for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
            pieces.append(np.asarray([bos_id, *enc.ids], dtype=np.int64))
            n += len(enc.ids) + 1
            docs += 1
            if max_tokens is not None and n >= max_tokens:
                break
        if max_tokens is not None and n >= max_tokens:
            break
    if not pieces:
        raise DataError(f"--data {source}: no text in it")
    ids = np.concatenate(pieces)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise DataError(f"--data {source}: fewer than 2 tokens")
    return Text(name, source, ids, token_bytes, docs)


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) for a stream of n tokens: the window reads ids[begin:end] and predicts
    ids[begin+1:end+1]; its last `scored` predictions are counted. Every prediction 1..n-1 is counted once."""
    if not 1 <= stride <= context:
        raise ValueError(f"--stride {stride}: must be between 1 and the context ({context})")
    out, done, begin = [], 0, 0
    while done < n - 1:
        end = min(begin + context, n - 1)
        out.append((begin, end, end - done))
        done = end
        begin += stride
    return out


@torch.no_grad()
def score(model, ids: np.ndarray, token_bytes: np.ndarray, context: int, stride: int, batch_size: int = 8,
          device: torch.device | str = "cpu") -> dict[str, float]:
    """Sum of nats and bytes over every prediction of the stream, in sliding windows; per-window lengths
    are equal except the last, so full windows run in batches."""
    spans = windows(len(ids), context, stride)
    t_ids = torch.from_numpy(ids).to(device)
    t_bytes = torch.from_numpy(token_bytes).to(device)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, len(spans), batch_size):
        group = spans[i : i + batch_size]
        by_len: dict[int, list[tuple[int, int, int]]] = {}
        for s in group:
            by_len.setdefault(s[1] - s[0], []).append(s)
        for length, same in by_len.items():
            x = torch.stack([t_ids[b:e] for b, e, _ in same])
            y = torch.stack([t_ids[b + 1 : e + 1] for b, e, _ in same])
            per_tok = model(x, targets=y).double()
            keep = torch.zeros_like(per_tok, dtype=torch.bool)
            for row, (_, _, k) in enumerate(same):
                keep[row, length - k :] = True
            nats += per_tok[keep].sum()
            nbytes += t_bytes[y[keep]].sum().double()
    predicted = len(ids) - 1
    n, b = nats.item(), nbytes.item()
    return {"bpb": n / (math.log(2) * b) if b else float("nan"), "loss": n / predicted, "tokens": predicted,
            "bytes": int(b), "nats": n}
