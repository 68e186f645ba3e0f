"""The decoder: RoPE, QK-norm, gain-free RMSNorm, GQA, relu^2/SwiGLU MLP, untied embeddings.

Every value variant is the same forward pass. Each layer's attention builds its
value as `v = a * (x_l W_V) + b * alt` following its `LayerPlan` (bov.plan), where
`alt` is a bank row E_v[i], `x0 W_V`, or the first layer's value V_0.

Weights are drawn in one fixed order that does not depend on the variant, so two
variants built after the same `torch.manual_seed` share every common weight:
comparisons across variants are paired at initialization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from bov.config import GATE_CHANNELS, ModelConfig
from bov.plan import LayerPlan, build_plan, num_banks

# How sliding-window layers attend in a full forward pass (no cache):
#   "flex":   FlexAttention with a sliding-window block mask: a fused kernel that scores only the blocks
#             inside the window (CUDA; on CPU it runs forward only, unfused).
#   "blocks": SDPA over query blocks of `window` positions, each against the 2 * window keys it can see:
#             about 2x the window's work instead of T / window x; any device, with gradients.
#   "mask":   SDPA with a dense boolean mask: scores every (query, key) pair; the reference.
#   "auto":   flex on CUDA, blocks elsewhere.
WINDOW_KERNEL = "auto"


def window_kernel(device: torch.device) -> str:
    return ("flex" if device.type == "cuda" else "blocks") if WINDOW_KERNEL == "auto" else WINDOW_KERNEL


def blocked_window_attention(q, k, v, window: int) -> torch.Tensor:
    """Causal sliding-window attention (key j seen by query i iff i - window < j <= i) as SDPA over blocks.

    q, k, v [B, H, T, dh] (k, v already expanded to H heads). Query block b (positions bW..bW+W-1) sees
    keys (b-1)W..bW+W-1, so each block is one small SDPA call with a fixed [W, 2W] mask.
    """
    B, H, T, dh = q.shape
    W = window
    n = -(-T // W)
    pad = n * W - T
    qb = F.pad(q, (0, 0, 0, pad)).view(B, H, n, W, dh)
    kv = [F.pad(t, (0, 0, W, pad)).unfold(2, 2 * W, W).transpose(-1, -2) for t in (k, v)]  # [B, H, n, 2W, dh]
    r = torch.arange(W, device=q.device)[:, None]  # query offset in its block
    c = torch.arange(2 * W, device=q.device)[None, :]  # key offset from the previous block's start
    mask = ((c > r) & (c <= r + W)).expand(n, W, 2 * W).clone()
    mask[0, :, :W] = False  # block 0 has no previous block (those keys are padding)
    y = F.scaled_dot_product_attention(qb, kv[0], kv[1], attn_mask=mask)
    return y.reshape(B, H, n * W, dh)[:, :, :T]


_compiled_flex = None


def _flex():
    """FlexAttention: as is inside a compiled model; compiled once per process for an eager one (eager flex
    materializes the scores)."""
    global _compiled_flex
    if torch.compiler.is_compiling() or not torch.cuda.is_available():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


@torch.compiler.disable  # built eagerly, once per (length, window, device); the compiled graph reads it
def sliding_window_block_mask(T: int, window: int, device: torch.device):
    """Causal sliding window as a FlexAttention block mask: key j is seen by query i iff i - window < j <= i."""
    return _block_mask(T, window, str(device))


@lru_cache(maxsize=64)
def _block_mask(T: int, window: int, device: str):
    def in_window(b, h, q, k):
        return (k <= q) & (q - k < window)

    return create_block_mask(in_window, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


def norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm without a learnable gain."""
    return F.rms_norm(x, (x.size(-1),), eps=eps)


class Rotary(nn.Module):
    def __init__(self, head_dim: int, max_len: int, base: float):
        super().__init__()
        self.head_dim, self.max_len, self.base = head_dim, max_len, base
        self.register_buffer("cos", torch.empty(max_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_len, head_dim // 2), persistent=False)

    @torch.no_grad()
    def reset(self) -> None:
        inv = 1.0 / self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=self.cos.device) / self.head_dim)
        ang = torch.outer(torch.arange(self.max_len, dtype=torch.float32, device=self.cos.device), inv)
        self.cos.copy_(ang.cos())
        self.sin.copy_(ang.sin())

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:  # x: [B, T, heads, dh]
        T = x.size(1)
        if offset + T > self.max_len:
            raise ValueError(f"position {offset + T - 1} is past the RoPE table ({self.max_len} positions = model.seq_len)")
        cos = self.cos[offset : offset + T, None, :].to(x.dtype)
        sin = self.sin[offset : offset + T, None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


@dataclass
class Pass:
    """What one forward pass shares with every layer, so no layer signature grows with a new value source.

    `earlier[l]` holds the (key, value after mixing) that layer l attended with, for the layers a later
    layer reads (layer 0 for V_0; Depth-Attention's candidates). With a cache, `value_history[l]` is layer
    l's value over its stored history and the new positions, with the first of those positions.
    """

    ids: torch.Tensor
    x0: torch.Tensor
    banks: object  # the model's tables, or an offloading cache's
    rope: Rotary
    cache: object | None = None  # bov.infer.KVCache
    window_masks: dict = field(default_factory=dict)  # window -> FlexAttention block mask
    earlier: dict = field(default_factory=dict)
    value_history: dict = field(default_factory=dict)

    @property
    def v0(self) -> torch.Tensor | None:
        return self.earlier[0][1] if 0 in self.earlier else None


# `alt` of each value source (bov.config.VALUE_SOURCES), from the layer, its input x, its own value (None when
# the plan does not compute it) and the pass's context. A new source is one function here plus its level there.
ALT_VALUES = {
    "bank": lambda att, x, own, ctx: ctx.banks[att.plan.bank](ctx.ids),  # E_v[i]
    "x0": lambda att, x, own, ctx: att.v_proj(ctx.x0),  # the layer's own projection of the initial embedding
    "own": lambda att, x, own, ctx: att.v_proj(x),  # the standard value, only rescaled
    # V_0; at layer 0 the layer's own projection (reused when the plan computes it already)
    "v1": lambda att, x, own, ctx: ctx.earlier[0][1] if att.plan.reads else (own if own is not None else att.v_proj(x)),
}


class ValueMix(nn.Module):
    """v = a * own + b * alt, with fixed, learned (per layer or per KV head) or gated b."""

    def __init__(self, plan: LayerPlan, n_kv_heads: int):
        super().__init__()
        self.plan = plan
        a, b = plan.init
        shape = (n_kv_heads, 1) if plan.coeff == "learned_per_head" else ()
        self.gate = nn.Linear(GATE_CHANNELS, n_kv_heads, bias=False) if plan.coeff == "gate" else None
        if plan.coeff in ("learned", "learned_per_head"):
            self.a = nn.Parameter(torch.full(shape, a)) if plan.uses_own else None
            self.b = nn.Parameter(torch.full(shape, b))
        else:  # fixed constants; a gate fixes a = 1
            self.register_buffer("a", torch.tensor(a) if plan.uses_own else None, persistent=False)
            self.register_buffer("b", None if self.gate is not None else torch.tensor(b), persistent=False)

    def reset(self) -> None:
        a, b = self.plan.init
        with torch.no_grad():
            if self.a is not None:
                self.a.fill_(a)
            if self.b is not None:
                self.b.fill_(b)

    def forward(self, own: torch.Tensor | None, alt: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:  # modded-nanogpt value-embedding gate, per KV head
            b = 3 * torch.sigmoid(self.gate(x[..., :GATE_CHANNELS])).unsqueeze(-1)
        else:
            b = self.b
        v = b * alt
        return v if own is None else self.a * own + v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: LayerPlan, window: int | None):
        super().__init__()
        self.plan, self.window, self.eps = plan, window, cfg.norm_eps
        self.n_heads, self.n_kv, self.dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False) if plan.has_v_proj else None  # BoV / v1 targets hold none
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, d, bias=False)
        self.mix = ValueMix(plan, cfg.n_kv_heads) if plan.source is not None else None

    def value(self, x, ctx: Pass) -> torch.Tensor:
        """The value this layer attends with, as its plan says: a * own + b * alt. [B, T, H_kv, dh]"""
        B, T = ctx.ids.shape
        p = self.plan
        own = self.v_proj(x) if p.uses_own else None
        if p.source is None:
            v = own
        else:
            alt = ALT_VALUES[p.source](self, x, own, ctx)
            v = self.mix(None if own is None else own.view(B, T, self.n_kv, self.dh),
                         alt.reshape(B, T, self.n_kv, self.dh), x)
        return v.view(B, T, self.n_kv, self.dh)

    def depth_mix(self, q, k, v, earlier: dict):
        """Depth-Attention: per position and KV head, attend over earlier layers' (key, mixed value) and self."""
        B, T = q.shape[:2]
        qbar = q.view(B, T, self.n_kv, self.n_heads // self.n_kv, self.dh).mean(3)
        keys = torch.stack([earlier[j][0] for j in self.plan.depth_candidates] + [k], dim=3)  # [B, T, Hkv, J, dh]
        vals = torch.stack([earlier[j][1] for j in self.plan.depth_candidates] + [v], dim=3)
        w = torch.einsum("btgd,btgjd->btgj", qbar.float(), keys.float()) / math.sqrt(self.dh)
        return torch.einsum("btgj,btgjd->btgd", w.softmax(-1).to(v.dtype), vals)

    def cached(self, ctx: Pass, k, v):
        """Decoding: store the new positions' keys (and values, if the plan keeps them); return the keys and
        values of the positions the new queries may see, and the first of those positions.

        A window layer's cache is a ring of its last `window` positions (bov.infer.KVCache)."""
        cache = ctx.cache
        keys, first = cache.extend(self.plan.layer, "k", k)
        lo = first if self.window is None else max(first, cache.start - self.window + 1)
        kind = self.plan.value_cache
        if kind == "values":
            values, vfirst = cache.extend(self.plan.layer, "v", v)
            ctx.value_history[self.plan.layer] = (values, vfirst)
            values = values[:, lo - vfirst :]
        else:  # nothing stored: rebuilt from the token ids (bank rows) or from layer 0's cached values
            past = Pass(cache.ids[:, lo : cache.end], None, ctx.banks, ctx.rope)
            if kind == "first_layer":
                hist, v0_first = ctx.value_history[0]
                past.earlier[0] = (None, hist[:, lo - v0_first :])
            values = self.value(None, past)
        return keys[:, lo - first :], values, lo

    def attend(self, q, keys, values, first: int, ctx: Pass):
        """Softmax attention of the new queries over `keys`/`values` (positions first, first + 1, ...)."""
        B, T = q.shape[:2]
        S = keys.size(1)
        start = 0 if ctx.cache is None else ctx.cache.start
        q, keys, values = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        gqa = self.n_kv != self.n_heads
        windowed = self.window is not None and self.window < start + T
        if ctx.cache is None and windowed:
            kernel = window_kernel(q.device)
            if kernel == "flex":  # flex does not autocast: give it one dtype, the autocast one under bf16-mixed
                dt = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype
                q, keys, values = q.to(dt), keys.to(dt), values.to(dt)
                return _flex()(q, keys, values, block_mask=ctx.window_masks[self.window], enable_gqa=gqa)
            if kernel == "blocks":
                rep = self.n_heads // self.n_kv
                keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
                return blocked_window_attention(q, keys, values, self.window)
        mask, causal = None, ctx.cache is None
        if ctx.cache is not None and T == 1 and (not windowed or S <= self.window):
            causal = False  # one new query sees every key kept for it
        elif windowed or ctx.cache is not None:
            i = torch.arange(start, start + T, device=q.device)[:, None]  # query positions
            j = torch.arange(first, first + S, device=q.device)[None, :]  # key positions
            mask, causal = (j <= i) & (i - j < (self.window or (start + T))), False  # keys in (i - window, i]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=gqa)

    def forward(self, x, ctx: Pass):
        B, T, _ = x.shape
        start = 0 if ctx.cache is None else ctx.cache.start  # position of the first new token
        q = ctx.rope(norm(self.q_proj(x).view(B, T, self.n_heads, self.dh), self.eps), start)
        k = ctx.rope(norm(self.k_proj(x).view(B, T, self.n_kv, self.dh), self.eps), start)
        v = self.value(x, ctx)
        if self.plan.depth_candidates:
            v = self.depth_mix(q, k, v, ctx.earlier)
        keys, values, first = (k, v, 0) if ctx.cache is None else self.cached(ctx, k, v)
        y = self.attend(q, keys, values, first, ctx).transpose(1, 2)
        if self.plan.neutreno is not None:  # NeuTRENO: U_l = A_l V_l + lam (V_0 - V_l)
            y = y + self.plan.neutreno * (ctx.v0 - v).repeat_interleave(self.n_heads // self.n_kv, dim=2)
        return self.o_proj(y.reshape(B, T, -1)), v, k


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = round(cfg.mlp_ratio * cfg.d_model)
        self.swiglu = cfg.mlp == "swiglu"
        self.up = nn.Linear(cfg.d_model, hidden, bias=False)
        self.gate = nn.Linear(cfg.d_model, hidden, bias=False) if self.swiglu else None
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x):
        h = F.silu(self.gate(x)) * self.up(x) if self.swiglu else F.relu(self.up(x)).square()
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: LayerPlan, window: int | None):
        super().__init__()
        self.eps = cfg.norm_eps
        self.attn = Attention(cfg, plan, window)
        self.mlp = MLP(cfg)

    def forward(self, x, ctx: Pass):
        a, v, k = self.attn(norm(x, self.eps), ctx)
        x = x + a
        return x + self.mlp(norm(x, self.eps)), v, k


def layer_windows(cfg: ModelConfig) -> list[int | None]:
    """Attention window per layer from the repeating pattern; the last layer is full."""
    pat = cfg.window_pattern
    w = [cfg.short_window if pat[l % len(pat)] == "S" else None for l in range(cfg.n_layers)]
    w[-1] = None
    return w


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.plan = build_plan(cfg)
        kv = cfg.n_kv_heads * cfg.head_dim
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.banks = nn.ModuleList(nn.Embedding(cfg.vocab_size, kv) for _ in range(num_banks(self.plan)))
        self.blocks = nn.ModuleList(Block(cfg, p, w) for p, w in zip(self.plan, layer_windows(cfg)))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rope = Rotary(cfg.head_dim, cfg.seq_len, cfg.rope_base)
        self.depth_sources = {j for p in self.plan for j in p.depth_candidates}  # layers a depth step reads
        self.kept = {j for p in self.plan for j in p.reads} | self.depth_sources  # layers a later layer reads
        self.windows = {w for w in layer_windows(cfg) if w is not None}
        # DenseFormer: after block l, x = sum_j alpha[l][j] * out_j over the embedding and blocks 0..l
        self.dwa = nn.ParameterList(nn.Parameter(torch.empty(l + 2)) for l in range(cfg.n_layers)) if cfg.denseformer else None

    # ------------------------------------------------------------------ forward
    def forward(self, ids: torch.Tensor, cache=None, targets: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, vocab] (fp32); with `targets` [B, T], the loss per token in nats [B, T].

        The loss is computed here, not by the caller, so that under torch.compile the unembedding, soft-cap
        and cross-entropy are one compiled region and the fp32 logits never leave it.

        With a `bov.infer.KVCache`, ids are the next T tokens after those already cached,
        and attention reads the cached keys and values. Everything else in the pass
        (value mixing, depth mixing, NeuTRENO, DenseFormer) is per position.
        """
        eps = self.cfg.norm_eps
        masks = self.window_masks(ids.size(1), ids.device, cache)  # first: under compile, the one graph break
        banks = self.banks
        if cache is not None:
            cache.begin(ids)
            if cache.banks is not None:  # an offloading cache serves the bank rows itself
                banks = cache.banks
        x = x0 = norm(self.wte(ids), eps)
        ctx = Pass(ids, x0, banks, self.rope, cache, masks)
        outputs = [x]  # DenseFormer's history of block outputs
        for l, block in enumerate(self.blocks):
            x, v, k = block(x, ctx)
            if l in self.kept:  # V_0, what a later depth step reads, any earlier layer a source reads
                ctx.earlier[l] = (k, v)
            if self.dwa is not None:
                outputs.append(x)
                x = sum(w * h for w, h in zip(self.dwa[l], outputs))
        if cache is not None:
            cache.commit()
        logits = self.lm_head(norm(x, eps)).float()
        if self.cfg.logit_softcap is not None:
            c = self.cfg.logit_softcap
            logits = c * torch.tanh(logits / c)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view_as(targets)

    def window_masks(self, T: int, device: torch.device, cache=None) -> dict:
        """Block masks for the layers whose window is shorter than T, when they attend through FlexAttention."""
        if cache is not None or window_kernel(device) != "flex":
            return {}
        return {w: sliding_window_block_mask(T, w, device) for w in self.windows if w < T}

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """Draw every weight from the global RNG in a variant-independent order.

        Per layer the draws are q, k, v, o, MLP, whether or not the layer keeps W_V, so
        the same seed gives every variant the same shared weights. A layer without W_V
        still draws one: aligned bank init uses it (E_v[i] = RMSNorm(e_i) W_V), then it
        is discarded. Variant-only parameters (non-aligned banks, gates) draw last.
        """
        cfg = self.cfg
        dev = self.wte.weight.device
        L = cfg.n_layers

        def uniform(shape, fan_in, scale=1.0):  # std = scale / sqrt(fan_in)
            bound = scale * math.sqrt(3.0 / fan_in)
            return torch.empty(shape).uniform_(-bound, bound).to(dev)

        d, kv, hd = cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg.n_heads * cfg.head_dim
        self.wte.weight.copy_(torch.randn(cfg.vocab_size, d).to(dev))
        head = uniform((cfg.vocab_size, d), d)
        if cfg.unembedding_init_std is not None:
            head *= cfg.unembedding_init_std * math.sqrt(d)
        self.lm_head.weight.copy_(head)
        # residual-branch outputs: GPT-2's scaled draw, or zero (drawn anyway, so the RNG order stays the same)
        out_scale = 1.0 / math.sqrt(2 * L) if cfg.residual_init == "scaled" else 0.0
        fresh_wv: dict[int, torch.Tensor] = {}
        for l, block in enumerate(self.blocks):
            att, mlp = block.attn, block.mlp
            att.q_proj.weight.copy_(uniform((hd, d), d))
            att.k_proj.weight.copy_(uniform((kv, d), d))
            fresh_wv[l] = uniform((kv, d), d)
            if att.v_proj is not None:
                att.v_proj.weight.copy_(fresh_wv[l])
            att.o_proj.weight.copy_(uniform((d, hd), hd, out_scale))
            mlp.up.weight.copy_(uniform(mlp.up.weight.shape, d))
            if mlp.gate is not None:
                mlp.gate.weight.copy_(uniform(mlp.gate.weight.shape, d))
            mlp.down.weight.copy_(uniform(mlp.down.weight.shape, mlp.down.in_features, out_scale))
        x0_table = norm(self.wte.weight, cfg.norm_eps)
        for b, table in enumerate(self.banks):
            first = next(p.layer for p in self.plan if p.bank == b)  # shared: the first target's W_V
            if cfg.bank_init == "aligned":
                table.weight.copy_(x0_table @ fresh_wv[first].T)
            elif cfg.bank_init == "normal":
                table.weight.copy_((torch.randn(table.weight.shape) * cfg.bank_init_std).to(dev))
            elif cfg.bank_init == "uniform":
                table.weight.copy_(uniform(table.weight.shape, d))
            else:
                table.weight.zero_()
        for block in self.blocks:
            if block.attn.mix is not None:
                block.attn.mix.reset()
                if block.attn.mix.gate is not None:  # gate starts near 3*sigmoid(0) = 1.5
                    block.attn.mix.gate.weight.copy_(torch.empty(block.attn.mix.gate.weight.shape).uniform_(0, 0.02).to(dev))
        if self.dwa is not None:  # identity: each average starts as the latest block output
            for w in self.dwa:
                w.zero_()
                w[-1] = 1.0
        self.rope.reset()

    # ------------------------------------------------------------------ accounting
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer group: matrices, embeddings, unembedding, banks, scalars."""
        groups: dict[str, list[nn.Parameter]] = {k: [] for k in ("matrix", "embedding", "unembedding", "bank", "scalar")}
        for name, p in self.named_parameters():
            if name.startswith("wte."):
                groups["embedding"].append(p)
            elif name.startswith("banks."):
                groups["bank"].append(p)
            elif name.startswith("lm_head."):
                groups["unembedding"].append(p)
            elif p.ndim >= 2 and ".mix." not in name:
                groups["matrix"].append(p)
            else:  # value coefficients and value-embedding gates
                groups["scalar"].append(p)
        return groups

    def param_breakdown(self) -> dict[str, int]:
        return {k: sum(p.numel() for p in ps) for k, ps in self.param_groups().items()}

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """All parameters; with exclude_embeddings, without the lookup tables (wte and banks).

        The unembedding stays in: it is a matmul (the paper's tokens-per-parameter count).
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            b = self.param_breakdown()
            n -= b["embedding"] + b["bank"]
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward = 3x forward), attention included.

        Matmuls as 2 * in * out per token; attention as 4 * H * d_h * keys per token
        forward, counting min(window, T) keys per query (the paper's accounting);
        Depth-Attention as 4 * (|S| + 1) * d_h * H_kv. Bank lookups and elementwise
        work (value mixing, NeuTRENO, DenseFormer averages) count no matmul FLOPs.
        """
        cfg = self.cfg
        T = seq_len or cfg.seq_len
        d, kv, hd = cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg.n_heads * cfg.head_dim
        hidden = round(cfg.mlp_ratio * d)
        mlp = (3 if cfg.mlp == "swiglu" else 2) * d * hidden
        fwd = d * cfg.vocab_size  # unembedding
        for p, w in zip(self.plan, layer_windows(cfg)):
            fwd += d * hd + d * kv + p.v_matmuls * d * kv + hd * d + mlp
            fwd += GATE_CHANNELS * cfg.n_kv_heads if p.coeff == "gate" and p.source is not None else 0
            fwd += 2 * hd * min(w or T, T)  # q.k and attn.v
            if p.depth_candidates:  # depth scores and mixing over |S| + 1 layers, per KV head
                fwd += 2 * (len(p.depth_candidates) + 1) * cfg.head_dim * cfg.n_kv_heads
        return 3 * 2 * fwd

    def value_coefficients(self) -> dict[tuple[int, str, int | None], float]:
        """Learned value coefficients: (layer, "a" or "b", head or None for one per layer) -> value (training
        logs them as `coeff/...` metrics, bov.tracking.coeff_metric; the paper's Figure 2)."""
        out: dict[tuple[int, str, int | None], float] = {}
        for l, block in enumerate(self.blocks):
            mix = block.attn.mix
            if mix is None:
                continue
            for name in ("a", "b"):
                t = getattr(mix, name)
                if isinstance(t, nn.Parameter):
                    if t.ndim == 0:
                        out[(l, name, None)] = t.item()
                    else:
                        for h, val in enumerate(t.flatten().tolist()):
                            out[(l, name, h)] = val
        return out


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> GPT:
    """Construct on the meta device (no memory, no RNG use), then draw the weights."""
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device or "cpu")
    model.init_weights()
    return model
