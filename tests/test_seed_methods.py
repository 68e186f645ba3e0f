"""Depth-Attention, NeuTRENO, DenseFormer: the methods the field compares against, checked exactly."""

from __future__ import annotations

import math

import pytest
import torch

from bov.config import ConfigError, load_config
from conftest import make
from reference import reference_forward
from test_model import ids_for, maxdiff


def test_depth_step_with_equal_keys_is_an_equal_weight_mix():
    model, cfg = make("depth_attention", model__depth_stride=1, model__n_layers=3)
    att = model.blocks[2].attn
    assert att.plan.depth_candidates == (0, 1)
    B, T, Hk, dh = 2, 5, cfg.model.n_kv_heads, cfg.model.head_dim
    q = torch.randn(B, T, cfg.model.n_heads, dh)
    k = torch.randn(B, T, Hk, dh)
    vs = [torch.randn(B, T, Hk, dh) for _ in range(3)]
    out = att.depth_mix(q, k, vs[2], {0: (k, vs[0]), 1: (k, vs[1])})
    assert maxdiff(out, (vs[0] + vs[1] + vs[2]) / 3) < 1e-6


def test_one_candidate_layer_matches_reference():
    model, cfg = make("depth_attention", model__n_layers=2)  # stride L//2 = 1: layer 1 sees layer 0
    assert [b.attn.plan.depth_candidates for b in model.blocks] == [(), (0,)]
    H, Hk, dh = cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.head_dim

    def rule(l, own, v0, q, k, mem):
        if l == 0:
            return own
        B, T = q.shape[:2]
        qbar = q.view(B, T, Hk, H // Hk, dh).mean(3)
        k0, v0_mixed = mem[0]
        s0 = (qbar * k0).sum(-1) / math.sqrt(dh)
        s1 = (qbar * k).sum(-1) / math.sqrt(dh)
        w0 = torch.exp(s0) / (torch.exp(s0) + torch.exp(s1))
        return w0[..., None] * v0_mixed + (1 - w0[..., None]) * own

    ids = ids_for(cfg)
    base, _ = make("baseline", model__n_layers=2)
    with torch.no_grad():
        out = model(ids)
        assert maxdiff(out, reference_forward(model, ids, rule)) < 1e-5
        assert maxdiff(out, base(ids)) > 1e-3


def test_depth_attention_candidates_and_params():
    model, cfg = make("depth_attention", preset="tiny")  # L = 6, stride 3
    assert [b.attn.plan.depth_candidates for b in model.blocks] == [(), (0,), (0,), (0,), (0, 3), (0, 3)]
    base, _ = make("baseline", preset="tiny")
    assert model.num_params() == base.num_params()
    m = cfg.model
    extra = 3 * 4 * (2 + 2 + 2 + 3 + 3) * m.head_dim * m.n_kv_heads
    assert model.flops_per_token() - base.flops_per_token() == extra


def test_depth_attention_composes_with_a_bank():
    model, cfg = make("bov", model__depth_attention=True)
    ids = ids_for(cfg)
    assert model(ids).isfinite().all()
    with pytest.raises(ConfigError, match="model.depth_stride needs model.depth_attention=on"):
        load_config("micro", "bov", {"model.depth_stride": 2})


def test_denseformer_at_init_equals_baseline():
    dense, cfg = make("denseformer")
    base, _ = make("baseline")
    ids = ids_for(cfg)
    with torch.no_grad():
        assert maxdiff(dense(ids), base(ids)) < 1e-6
        dense.dwa[1][0] = 0.3  # the averages matter once they move
        assert maxdiff(dense(ids), base(ids)) > 1e-3
    assert {id(p) for p in dense.dwa} <= {id(p) for p in dense.param_groups()["scalar"]}


def test_neutreno_with_zero_lambda_equals_baseline():
    zero, cfg = make("neutreno", model__neutreno_lambda=0.0)
    neu, _ = make("neutreno")
    base, _ = make("baseline")
    ids = ids_for(cfg)
    with torch.no_grad():
        assert maxdiff(zero(ids), base(ids)) < 1e-6
        assert maxdiff(neu(ids), base(ids)) > 1e-3
    assert [b.attn.plan.neutreno for b in neu.blocks] == [None, 0.4, 0.4, 0.4]


def test_depth_memory_keeps_only_layers_read_and_plan_shows_them():
    model, _ = make("depth_attention", preset="tiny")
    assert model.depth_sources == {0, 3}
    base, _ = make("baseline")
    assert base.depth_sources == set()
    assert model.plan[4].describe() == "x_l W_V, then depth-mixed with layers [0, 3]"
