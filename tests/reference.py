"""A hand-written decoder forward, independent of bov.model, for exactness tests."""

import math

import torch
import torch.nn.functional as F


def reference_forward(model, ids, v_rule):
    """A hand-written decoder forward over the model's weights.

    v_rule(l, own, v0, q=..., k=..., mem=...) -> the value layer l attends with; mem maps
    earlier layers to their (key, value).
    """
    cfg = model.cfg
    B, T = ids.shape
    H, Hk, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    rms = lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
    pos = torch.arange(T, dtype=torch.float32)
    inv = 1.0 / cfg.rope_base ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh)
    ang = pos[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def rope(t):
        a, b = t[..., : dh // 2], t[..., dh // 2 :]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

    x = rms(model.wte.weight[ids])
    v0 = None
    mem = {}
    causal = torch.ones(T, T).tril().bool()
    for l, blk in enumerate(model.blocks):
        att = blk.attn
        h = rms(x)
        q = rope(rms((h @ att.q_proj.weight.T).view(B, T, H, dh)))
        k = rope(rms((h @ att.k_proj.weight.T).view(B, T, Hk, dh)))
        own = (h @ att.v_proj.weight.T).view(B, T, Hk, dh)
        v = v_rule(l, own, v0, q=q, k=k, mem=dict(mem))
        v0 = v if v0 is None else v0
        mem[l] = (k, v)
        k = k.repeat_interleave(H // Hk, dim=2)
        vv = v.repeat_interleave(H // Hk, dim=2)
        s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dh)
        p = s.masked_fill(~causal, float("-inf")).softmax(-1)
        y = torch.einsum("bhts,bshd->bthd", p, vv).reshape(B, T, H * dh)
        x = x + y @ att.o_proj.weight.T
        m = rms(x)
        x = x + (F.relu(m @ blk.mlp.up.weight.T) ** 2) @ blk.mlp.down.weight.T
    logits = rms(x) @ model.lm_head.weight.T
    c = model.cfg.logit_softcap
    return logits if c is None else c * torch.tanh(logits / c)
