"""Cached inference: a KV cache in which context-free layers store no values, sampling, checkpoints.

Every layer caches its keys. Values are cached only where they depend on context
(`LayerPlan.value_cache == "values"`): a BoV layer keeps nothing and gathers
`b * E_v[ids]` from the token ids (cached once, for all layers) when it attends; an
SVFormer layer rescales layer 0's cached values; ResFormer, value-embedding and
Depth-Attention layers cache their mixed values, as the baseline caches its own. A
sliding-window layer keeps only its last `window` positions, in a ring.
The model's forward pass takes the cache as an argument (bov.model.GPT.forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bov.config import ExperimentConfig, ModelConfig, validate
from bov.model import GPT, layer_windows
from bov.plan import build_plan

IDS_DTYPE = torch.long


def cache_lengths(cfg: ModelConfig, max_len: int) -> tuple[list[int], list[int]]:
    """Positions kept per layer for keys and for values, in a cache for sequences of up to max_len tokens.

    A window layer keeps its last `window` keys (a ring); a full layer keeps all. Values follow the keys
    where the plan caches them (0 where it caches none), except that layer 0's values are also read by
    the layers that rebuild theirs from V_0 (SVFormer, v1 targets), so they reach as far back as those do.
    """
    plan = build_plan(cfg)
    windows = layer_windows(cfg)
    reach = [min(w or max_len, max_len) for w in windows]
    values = [r if p.value_cache == "values" else 0 for p, r in zip(plan, reach)]
    readers = [r for p, r in zip(plan, reach) if p.value_cache == "first_layer"]
    if readers:
        values[0] = max([values[0], *readers])
    return reach, values


class KVCache:
    """Preallocated cache for `batch` sequences of up to `max_len` tokens.

    `ids` [B, max_len] are shared by all layers; `k[l]` [B, n, H_kv, d_h] for every layer, n = max_len or,
    for a sliding-window layer, its window (a ring: position p lives in slot p % n); `v[l]` likewise where the
    layer's plan caches values, else None (`cache_lengths`).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, banks: "OffloadedBanks | None" = None):
        if max_len < 1 or batch < 1:
            raise ValueError(f"KVCache: batch ({batch}) and max_len ({max_len}) must be >= 1")
        self.plan = build_plan(cfg)
        self.batch, self.max_len = batch, max_len
        klen, vlen = cache_lengths(cfg, max_len)

        def buf(n: int) -> torch.Tensor | None:  # empty, not zeros: slots not yet written are never read
            return torch.empty(batch, n, cfg.n_kv_heads, cfg.head_dim, dtype=dtype, device=device) if n else None

        self.ids = torch.empty(batch, max_len, dtype=IDS_DTYPE, device=device)
        self.k = [buf(n) for n in klen]
        self.v = [buf(n) for n in vlen]
        self.length = 0  # tokens cached
        self.start = self.end = 0  # the positions of the forward pass in progress
        self.banks = banks  # None: the model's own tables

    @classmethod
    def for_model(cls, model: GPT, batch: int, max_len: int, offload_banks: bool = False) -> "KVCache":
        """A cache matching the model's dtype and device; `offload_banks` serves bank rows from host memory."""
        p = model.wte.weight
        banks = OffloadedBanks(model.banks, p.device, batch * max_len) if offload_banks and len(model.banks) else None
        return cls(model.cfg, batch, max_len, dtype=p.dtype, device=p.device, banks=banks)

    def begin(self, ids: torch.Tensor) -> None:
        """Called by the model before its layers run: append the new token ids."""
        B, T = ids.shape
        if B != self.batch:
            raise ValueError(f"KVCache: batch {B} != the cache's {self.batch}")
        if self.length + T > self.max_len:
            raise ValueError(f"KVCache: {self.length} cached + {T} new tokens > max_len {self.max_len}")
        self.start, self.end = self.length, self.length + T
        self.ids[:, self.start : self.end] = ids
        if self.banks is not None:
            self.banks.prefetch(ids)

    def extend(self, layer: int, kind: str, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Store the new positions of layer's keys ("k") or values ("v"); return (history, first position):
        every position the buffer held before this pass, then the new ones."""
        buf = (self.k if kind == "k" else self.v)[layer]
        n, T = buf.size(1), x.size(1)
        if n == self.max_len:  # a full buffer: slot = position, the history is a view
            buf[:, self.start : self.end] = x
            return buf[:, : self.end], 0
        first = max(0, self.start - n)  # a ring: read what it holds before overwriting it
        old = buf[:, torch.arange(first, self.start, device=buf.device) % n]
        keep = min(T, n)
        buf[:, torch.arange(self.end - keep, self.end, device=buf.device) % n] = x[:, T - keep :]
        return torch.cat([old, x], dim=1), first

    def commit(self) -> None:
        self.length = self.end

    def tensors(self) -> list[torch.Tensor]:
        return [self.ids, *self.k, *(v for v in self.v if v is not None)]

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors, counted from their storages (each once)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.tensors()}
        return sum(storages.values())

    def value_bytes(self) -> list[int]:
        """Bytes of each layer's value cache (0 where the layer stores none)."""
        return [0 if v is None else v.untyped_storage().nbytes() for v in self.v]


class OffloadedBanks:
    """Bank tables in host memory (pinned when the model is on a GPU); the device holds only the rows
    of tokens that occurred, each copied once, before the forward pass that first needs it.

    `banks[b](ids)` gathers like the model's own `nn.Embedding`, so the forward pass is unchanged.
    Device memory is at most min(distinct tokens, |V|) rows per table instead of |V|.
    """

    def __init__(self, banks, device: torch.device | str, capacity: int):
        device = torch.device(device)
        self.host = [b.weight.detach().to("cpu") for b in banks]
        if device.type == "cuda":
            self.host = [h.pin_memory() for h in self.host]
        V, width = self.host[0].shape
        cap = min(V, capacity)
        self.device = device
        self.slot_host = torch.full((V,), -1, dtype=torch.long)  # token id -> row of the device copy
        self.slot = self.slot_host.to(device)
        self.rows = [torch.empty(cap, width, dtype=h.dtype, device=device) for h in self.host]
        self.n_rows = 0
        self.rows_copied = 0  # over the cache's life: each distinct token once per table

    def prefetch(self, ids: torch.Tensor) -> None:
        new = torch.unique(ids.detach().to("cpu"))
        new = new[self.slot_host[new] < 0]
        if not len(new):
            return
        where = torch.arange(self.n_rows, self.n_rows + len(new))
        if self.n_rows + len(new) > self.rows[0].size(0):
            raise ValueError(f"OffloadedBanks: more than {self.rows[0].size(0)} distinct tokens")
        for host, rows in zip(self.host, self.rows):
            staged = host[new]
            if self.device.type == "cuda":
                staged = staged.pin_memory()  # an asynchronous copy needs a pinned source
            rows[self.n_rows : self.n_rows + len(new)].copy_(staged, non_blocking=True)
        self.slot_host[new] = where
        self.slot[new.to(self.device)] = where.to(self.device)
        self.n_rows += len(new)
        self.rows_copied += len(new) * len(self.rows)

    def __getitem__(self, b: int):
        return lambda ids: self.rows[b][self.slot[ids]]

    def __len__(self) -> int:
        return len(self.rows)

    def device_bytes(self) -> int:
        return sum(r.untyped_storage().nbytes() for r in self.rows) + self.slot.untyped_storage().nbytes()


def analytic_cache_bytes(cfg: ModelConfig, context: int, batch: int = 1, bytes_per: int = 2) -> dict[str, int]:
    """The cache size from the spec's formula (section 2), with the plan's value caches and the windows.

    keys: H_kv * d_h * b per kept position, T positions for a full layer and min(T, window) for a window
    layer; values: the same where the layer caches them (`LayerPlan.value_cache == "values"`; layer 0 also as
    far back as the layers that rebuild from V_0 read); ids: T * 8 bytes.
    """
    per_position = batch * cfg.n_kv_heads * cfg.head_dim * bytes_per
    klen, vlen = cache_lengths(cfg, context)
    ids = batch * context * torch.tensor([], dtype=IDS_DTYPE).element_size()
    keys, values = sum(klen) * per_position, sum(vlen) * per_position
    return {"keys": keys, "values": values, "ids": ids, "total": keys + values + ids,
            "layers_without_values": sum(n == 0 for n in vlen)}


# ----------------------------------------------------------------------------- decoding


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, vocab] -> next ids [B]: greedy at temperature 0, else softmax(logits / t) over the top k."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             stop_id: int | None = None, offload_banks: bool = False) -> torch.Tensor:
    """Prefill the prompt [B, T0] once, then decode one token at a time from the cache; returns [B, <= N] new ids."""
    if prompt.ndim == 1:
        prompt = prompt[None]
    cache = KVCache.for_model(model, prompt.size(0), prompt.size(1) + max_new_tokens, offload_banks)
    logits = model(prompt, cache)[:, -1]
    out = []
    for i in range(max_new_tokens):
        nxt = sample(logits, temperature, top_k, generator)
        out.append(nxt)
        if stop_id is not None and bool((nxt == stop_id).all()):
            break
        if i + 1 < max_new_tokens:
            logits = model(nxt[:, None], cache)[:, -1]
    return torch.stack(out, dim=1) if out else prompt.new_empty(prompt.size(0), 0)


@torch.no_grad()
def decode_error(model: GPT, ids: torch.Tensor, prefill: int, chunk: int) -> float:
    """Max |logits| difference between one full forward pass over ids [B, T] and cached decoding of the same
    tokens: a prefill of `prefill` tokens, one chunk of `chunk`, then one token at a time."""
    B, T = ids.shape
    full = model(ids)
    cache = KVCache.for_model(model, B, T)
    steps = [model(ids[:, :prefill], cache), model(ids[:, prefill : prefill + chunk], cache)]
    steps += [model(ids[:, t : t + 1], cache) for t in range(prefill + chunk, T)]
    return (torch.cat(steps, 1) - full).abs().max().item()


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class Loaded:
    model: GPT
    cfg: ExperimentConfig
    tokenizer: object  # tokenizers.Tokenizer
    bos_id: int


def checkpoint_extras(cfg: ExperimentConfig, tokenizer_json: str | None) -> dict:
    """What training stores in each checkpoint so that `bov generate` needs nothing else."""
    return {"config": cfg.model_dump(mode="json"), "tokenizer": tokenizer_json}


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Loaded:
    """A Lightning checkpoint of `bov train` (or a sweep cell) -> model, config and tokenizer."""
    from tokenizers import Tokenizer

    from bov.data import BOS

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: no file at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--checkpoint: {path} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"--checkpoint: {path} holds no model weights (no state_dict); not a checkpoint of bov train")
    extras = ckpt.get("bov")
    if extras is None or extras.get("tokenizer") is None:
        raise ValueError(f"--checkpoint: {path} holds no bov config and tokenizer (written by an older bov); "
                         "train it again")
    cfg = validate(extras["config"])
    state = {}
    for k, v in ckpt["state_dict"].items():  # LitBoV.model, possibly wrapped by torch.compile
        if k.startswith("model."):
            state[k.removeprefix("model.").replace("_orig_mod.", "")] = v
    with torch.device("meta"):
        model = GPT(cfg.model)
    model.to_empty(device=device)
    model.rope.reset()  # a non-persistent buffer: not in the state dict
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"--checkpoint: {path} does not match {cfg.preset}/{cfg.variant}: "
                         f"{str(e).splitlines()[-1].strip()}") from None
    if dtype is not None:
        model.to(dtype)
    model.eval()
    try:
        tok = Tokenizer.from_str(extras["tokenizer"])
    except Exception as e:
        raise ValueError(f"--checkpoint: {path} holds an unreadable tokenizer ({type(e).__name__})") from None
    bos = tok.token_to_id(BOS)
    return Loaded(model, cfg, tok, bos if bos is not None else 0)


def generate_text(loaded: Loaded, prompt: str, max_new_tokens: int | None, temperature: float = 0.0,
                  top_k: int | None = None, seed: int = 0, offload_banks: bool = False) -> str:
    """Tokenize (after BOS, as in training), decode, detokenize the new tokens.

    `max_new_tokens=None`: 64, or what the context leaves after the prompt. `offload_banks` moves the bank
    tables to host memory and copies to the device only the rows of tokens that occur (OffloadedBanks)."""
    ids = [loaded.bos_id, *loaded.tokenizer.encode(prompt).ids]
    limit = loaded.model.rope.max_len
    if max_new_tokens is None:
        max_new_tokens = max(1, min(64, limit - len(ids)))
    if len(ids) + max_new_tokens > limit:
        raise ValueError(f"prompt ({len(ids)} tokens) + --max-new-tokens ({max_new_tokens}) > the model's "
                         f"context of {limit} tokens (model.seq_len)")
    device = loaded.model.wte.weight.device
    if offload_banks:
        loaded.model.banks.to("cpu")
    g = torch.Generator(device=device).manual_seed(seed)
    new = generate(loaded.model, torch.tensor([ids], device=device), max_new_tokens, temperature, top_k, g,
                   stop_id=loaded.bos_id, offload_banks=offload_banks)
    return loaded.tokenizer.decode(new[0].tolist())
