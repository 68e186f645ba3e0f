"""`bov probe`: the mechanisms the papers argue from, measured per layer on a checkpoint and a text.

- attention entropy (nats, mean over queries) and the attention mass on the window's first token, per head:
  ResFormer's "attention concentration" (deep layers collapse onto few tokens);
- mean pairwise cosine similarity of token representations in the residual stream after each layer and of
  the values each layer attends with (over all pairs i != j of a window), and the mean norm of the values;
- the learned value coefficients (a on the layer's own value, b on the alternative);
- for each bank table, the cosine between each row and the row it started from (RMSNorm(e_i) W_V under aligned
  init), regenerated from the run's seed, by how often the token occurs in the probed text: BoV's claim that
  deep layers want context-free values, and how far training moves them.

Forward hooks read q (before QK-norm and RoPE, which the probe applies as the model does), keys and values;
the model itself is unchanged. Attention probabilities are recomputed in fp32 with the layer's causal window.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bov.model import GPT, build_model, layer_windows, norm

FREQUENCY_BUCKETS = ((0, 1, "0"), (1, 10, "1-9"), (10, 100, "10-99"), (100, 1000, "100-999"), (1000, math.inf, ">=1000"))


def attention_probs(q: torch.Tensor, k: torch.Tensor, window: int | None) -> torch.Tensor:
    """q [B, T, H, dh], k [B, T, H_kv, dh] (after QK-norm and RoPE) -> softmax weights [B, H, T, T]."""
    B, T, H, dh = q.shape
    k = k.repeat_interleave(H // k.size(2), dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / math.sqrt(dh)
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    seen = (j <= i) & (i - j < (window or T))
    return scores.masked_fill(~seen, float("-inf")).softmax(-1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each distribution over the last axis (0 log 0 = 0)."""
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """x [B, T, d] -> mean over sequences of the mean cosine of all pairs i != j: (|sum u|^2 - T) / (T (T - 1))."""
    B, T, _ = x.shape
    if T < 2:
        return float("nan")
    u = F.normalize(x.double(), dim=-1)
    s = u.sum(1)
    return float(((s * s).sum(-1) - T).div(T * (T - 1)).mean())


class _Taps:
    """Forward hooks on every layer's q projection and block: per-layer statistics, computed as they pass."""

    def __init__(self, model: GPT):
        self.model, self.windows = model, layer_windows(model.cfg)
        self.q: dict[int, torch.Tensor] = {}
        self.stats: dict[str, list] = {k: [[] for _ in model.blocks] for k in ("entropy", "first", "vnorm", "vcos", "xcos")}
        self.handles = []
        for l, block in enumerate(model.blocks):
            self.handles.append(block.attn.q_proj.register_forward_hook(self._q(l)))
            self.handles.append(block.register_forward_hook(self._block(l)))
        self.handles.append(model.lm_head.register_forward_hook(self._final()))

    def _q(self, l):
        def hook(module, args, out):
            self.q[l] = out
        return hook

    def _block(self, l):
        def hook(module, args, out):
            x, ctx = args
            B, T, _ = x.shape
            att = module.attn
            q = ctx.rope(norm(self.q.pop(l).view(B, T, att.n_heads, att.dh), att.eps), 0)
            _, v, k = out
            p = attention_probs(q, k, self.windows[l])
            self.stats["entropy"][l].append(entropy(p).mean(dim=(0, 2)))  # per head
            self.stats["first"][l].append(p[:, :, 1:, 0].mean(dim=(0, 2)) if T > 1 else p[:, :, :, 0].mean(dim=(0, 2)))
            self.stats["vnorm"][l].append(v.float().norm(dim=-1).mean(dim=(0, 1)))  # per KV head
            self.stats["vcos"][l].append(mean_pairwise_cosine(v.reshape(B, T, -1)))
            if l > 0:  # the stream entering layer l is what layer l - 1 wrote
                self.stats["xcos"][l - 1].append(mean_pairwise_cosine(x))
        return hook

    def _final(self):
        def hook(module, args, out):
            self.stats["xcos"][len(self.model.blocks) - 1].append(mean_pairwise_cosine(args[0]))
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _mean(parts: list) -> Any:
    if not parts:
        return None
    if isinstance(parts[0], torch.Tensor):
        return torch.stack(parts).mean(0).tolist()
    return float(np.mean(parts))


def coefficients_by_layer(model: GPT) -> dict[str, list]:
    """a (on the layer's own value) and b (on the alternative) per layer, learned or fixed; the mean over heads
    where they are per head; None where the layer has none (no mix, or a gate, whose b depends on the token)."""
    out: dict[str, list] = {"coeff_a": [], "coeff_b": []}
    for block in model.blocks:
        mix = block.attn.mix
        for name in ("a", "b"):
            t = getattr(mix, name, None) if mix is not None else None
            out[f"coeff_{name}"].append(float(t.detach().float().mean()) if isinstance(t, torch.Tensor) else None)
    return out


@torch.no_grad()
def bank_drift(model: GPT, seed: int, counts: np.ndarray) -> dict[str, dict[str, dict[str, float]]]:
    """Per bank layer and frequency bucket: rows, and mean cosine between each row and its starting row."""
    if not len(model.banks):
        return {}
    torch.manual_seed(seed)  # as bov.train builds it: the same draws, so the same starting tables
    start = build_model(model.cfg)
    out = {}
    for p in model.plan:
        if p.bank is None:
            continue
        now, then = model.banks[p.bank].weight.float().cpu(), start.banks[p.bank].weight.float()
        cos = F.cosine_similarity(now, then, dim=-1).numpy()
        buckets = {}
        for lo, hi, label in FREQUENCY_BUCKETS:
            rows = (counts >= lo) & (counts < hi)
            if rows.any():
                buckets[label] = {"rows": int(rows.sum()), "cosine": float(cos[rows].mean())}
        out[str(p.layer)] = buckets
    return out


@torch.no_grad()
def probe(model: GPT, ids: np.ndarray, seed: int, batch_size: int = 4, max_windows: int = 64) -> dict[str, Any]:
    """Run the probes over up to `max_windows` disjoint windows of the model's context from the stream `ids`."""
    T = model.rope.max_len
    n = min(max_windows, max(1, (len(ids) - 1) // T))
    device = model.wte.weight.device
    windows = torch.from_numpy(ids[: n * T].reshape(n, T) if len(ids) > T else ids[None, :]).to(device)
    taps = _Taps(model)
    try:
        for s in range(0, len(windows), batch_size):
            model(windows[s : s + batch_size])
    finally:
        taps.close()
    st = taps.stats
    per_head = {"attention_entropy": [_mean(x) for x in st["entropy"]],
                "first_token_mass": [_mean(x) for x in st["first"]],
                "value_norm": [_mean(x) for x in st["vnorm"]]}
    per_layer = {k: [float(np.mean(h)) for h in v] for k, v in per_head.items()}
    per_layer["residual_cosine"] = [_mean(x) for x in st["xcos"]]
    per_layer["value_cosine"] = [_mean(x) for x in st["vcos"]]
    per_layer.update(coefficients_by_layer(model))
    counts = np.bincount(ids, minlength=model.cfg.vocab_size)[: model.cfg.vocab_size]
    return {"layers": len(model.blocks), "windows": int(len(windows)), "context": int(windows.size(1)),
            "tokens": int(windows.numel()), "per_layer": per_layer, "per_head": per_head,
            "bank_drift": bank_drift(model, seed, counts)}


def probe_checkpoints(checkpoints: list, source: str, name: str, max_tokens: int = 65536, max_windows: int = 64,
                      batch_size: int = 4, device: str = "cpu", uri: str | None = None, log=print) -> list[dict]:
    """`probe` on each (checkpoint, run id); each result names its checkpoint, variant, seed and text, and is
    logged to the checkpoint's run as bov.tracking.PROBE_ARTIFACT when `uri` is given and the run is known."""
    from bov import tracking
    from bov.data import token_byte_lengths
    from bov.scoring import load_text
    from bov.infer import load_checkpoint

    out = []
    for path, run_id in checkpoints:
        loaded = load_checkpoint(path, device=device)
        text = load_text(source, name, loaded.tokenizer, loaded.bos_id, token_byte_lengths(loaded.tokenizer), max_tokens)
        result = {"checkpoint": str(path), "run_id": run_id, "variant": loaded.cfg.variant,
                  "level": loaded.cfg.variant, "seed": loaded.cfg.train.seed, "text": name, "source": source,
                  **probe(loaded.model, text.ids, loaded.cfg.train.seed, batch_size, max_windows)}
        log(f"{path}: probed {result['tokens']:,} tokens of {name}")
        if uri and run_id:
            tracking.log_probe(uri, run_id, result)
        out.append(result)
    return out


def probe_report(checkpoints: list, source: str, name: str, out, max_tokens: int = 65536, max_windows: int = 64,
                 device: str = "cpu", uri: str | None = None, log=print) -> list:
    """`bov probe`: probe every checkpoint, write `<out>/probes.json` and one figure per probe (a line per
    variant; two checkpoints of one variant and seed are told apart by their run directory). The files drawn."""
    import json
    from pathlib import Path

    from bov.figures import probe_figures

    results = probe_checkpoints(checkpoints, source, name, max_tokens, max_windows, device=device, uri=uri, log=log)
    labels = [r["variant"] for r in results]
    for r in results:
        if sum(1 for x in results if (x["variant"], x["seed"]) == (r["variant"], r["seed"])) > 1 and labels.count(r["variant"]) > 1:
            r["level"] = f"{r['variant']} ({Path(r['checkpoint']).parent.name})"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probes.json").write_text(json.dumps(results, indent=1))
    return probe_figures(results, out, title=f"probed on {name}")
