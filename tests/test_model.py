"""The model's value path: exact equalities, causality, counts and FLOPs for every variant."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bov.plan import resolve_bank_layers
from conftest import VARIANTS, make
from reference import reference_forward as _reference_forward


def ids_for(cfg, B=2, T=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.model.vocab_size, (B, T or cfg.model.seq_len), generator=g)


def maxdiff(a, b):
    return (a - b).abs().max().item()


# 1 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["last_third", "every_other", "all", [0, 2]])
def test_aligned_bank_equals_x0_replace_at_init(rule):
    bov, cfg = make("bov", model__bank_layers=rule)
    x0, _ = make("x0_replace", model__bank_layers=rule)
    base, _ = make("baseline")
    ids = ids_for(cfg)
    with torch.no_grad():
        lb, lx, l0 = bov(ids), x0(ids), base(ids)
    assert maxdiff(lb, lx) < 1e-5
    assert maxdiff(lb, l0) > 1e-3  # the value path matters: the equality is not vacuous


def test_aligned_bank_rows_are_normalized_embedding_times_wv():
    bov, cfg = make("bov")
    x0, _ = make("x0_replace")
    target = resolve_bank_layers("last_third", cfg.model.n_layers)[0]
    expect = F.rms_norm(x0.wte.weight, (cfg.model.d_model,), eps=cfg.model.norm_eps) @ x0.blocks[target].attn.v_proj.weight.T
    assert maxdiff(bov.banks[0].weight, expect) < 1e-6


# 2 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["bank", "x0", "v1"])
@pytest.mark.parametrize("coeff", ["learned", "learned_per_head"])
def test_mixed_learned_at_init_equals_baseline(source, coeff):
    mixed, cfg = make("bov_add", model__value_source=source, model__value_coeff=coeff,
                      **({} if source == "bank" else {"model__bank_init": "aligned"}))
    base, _ = make("baseline")
    ids = ids_for(cfg)
    with torch.no_grad():
        assert maxdiff(mixed(ids), base(ids)) < 1e-6
        # moving b off zero changes the logits, so the equality above has teeth
        for blk in mixed.blocks:
            if blk.attn.mix is not None:
                blk.attn.mix.b.fill_(0.7)
        assert maxdiff(mixed(ids), base(ids)) > 1e-3


def test_resformer_identity_matches_two_layer_reference():
    model, cfg = make("resformer", model__n_layers=2)
    ids = ids_for(cfg)
    ref = _reference_forward(model, ids, lambda l, own, v0, **_: own if l == 0 else 0.5 * v0 + 0.5 * own)
    plain = _reference_forward(model, ids, lambda l, own, v0, **_: own)
    with torch.no_grad():
        out = model(ids)
    assert maxdiff(out, ref) < 1e-5
    assert maxdiff(out, plain) > 1e-3  # the residual changed something


def test_baseline_matches_reference():
    model, cfg = make("baseline")
    ids = ids_for(cfg)
    with torch.no_grad():
        assert maxdiff(model(ids), _reference_forward(model, ids, lambda l, own, v0, **_: own)) < 1e-5


def test_svformer_reads_v0_everywhere():
    model, cfg = make("svformer", model__n_layers=3)
    base, _ = make("baseline", model__n_layers=3)
    # svformer holds no W_V at layers >= 1; put the baseline's there for the reference
    ids = ids_for(cfg)
    ref = _reference_forward(base, ids, lambda l, own, v0, **_: own if l == 0 else v0)
    with torch.no_grad():
        assert maxdiff(model(ids), ref) < 1e-5


def test_same_seed_shares_weights_across_variants():
    a, _ = make("baseline")
    b, _ = make("value_embed")
    for la, lb in zip(a.blocks, b.blocks):
        assert torch.equal(la.attn.q_proj.weight, lb.attn.q_proj.weight)
        assert torch.equal(la.mlp.down.weight, lb.mlp.down.weight)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)


def test_value_embed_gate_starts_near_one_and_a_half():
    model, cfg = make("value_embed")
    ids = ids_for(cfg)
    x = torch.randn(2, 8, cfg.model.d_model)
    for blk in model.blocks:
        if blk.attn.mix is not None:
            g = 3 * torch.sigmoid(blk.attn.mix.gate(x[..., :12]))
            assert 1.4 < g.mean().item() < 1.6
    assert model(ids).isfinite().all()


# 3 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("window", ["L", "SL"])
def test_causality(variant, window):
    model, cfg = make(variant, model__window_pattern=window, model__short_window=8)
    ids = ids_for(cfg, T=32)
    t = 13
    ids2 = ids.clone()
    ids2[:, t + 1 :] = torch.randint(0, cfg.model.vocab_size, ids2[:, t + 1 :].shape)
    with torch.no_grad():
        a, b = model(ids), model(ids2)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert maxdiff(a[:, t + 1 :], b[:, t + 1 :]) > 0


def test_sliding_window_limits_reach():
    """Layer 0 with window 4 sees positions (t-4, t]; the last layer is always full."""
    model, cfg = make("baseline", model__window_pattern="S", model__short_window=4, model__n_layers=2)
    assert [b.attn.window for b in model.blocks] == [4, None]
    one, _ = make("baseline", model__window_pattern="SS", model__short_window=4, model__n_layers=2)
    one.blocks[1].attn.window = 4  # both layers windowed: reach is 2 * (4 - 1) = 6 positions back
    ids = ids_for(cfg, T=32)
    ids2 = ids.clone()
    ids2[:, 10] = (ids2[:, 10] + 1) % cfg.model.vocab_size
    with torch.no_grad():
        a, b = one(ids), one(ids2)
    changed = ((a - b).abs().amax(dim=(0, 2)) > 0).nonzero().flatten().tolist()
    assert changed == list(range(10, 17))


# 4 -------------------------------------------------------------------------------------
EXPECTED_LAYERS = {
    4: {"none": [], "last_third": [2, 3], "every_other": [1, 3], "second_half": [2, 3],
        "last_two_thirds": [1, 2, 3], "all": [0, 1, 2, 3], "all_but_first": [1, 2, 3]},
    6: {"none": [], "last_third": [4, 5], "every_other": [1, 3, 5], "second_half": [3, 4, 5],
        "last_two_thirds": [2, 3, 4, 5], "all": [0, 1, 2, 3, 4, 5], "all_but_first": [1, 2, 3, 4, 5]},
    12: {"none": [], "last_third": [8, 9, 10, 11], "every_other": [1, 3, 5, 7, 9, 11],
         "second_half": [6, 7, 8, 9, 10, 11], "last_two_thirds": [4, 5, 6, 7, 8, 9, 10, 11],
         "all": list(range(12)), "all_but_first": list(range(1, 12))},
    24: {"none": [], "last_third": list(range(16, 24)), "every_other": list(range(1, 24, 2)),
         "second_half": list(range(12, 24)), "last_two_thirds": list(range(8, 24)),
         "all": list(range(24)), "all_but_first": list(range(1, 24))},
}


@pytest.mark.parametrize("L", sorted(EXPECTED_LAYERS))
def test_bank_layer_rules(L):
    for rule, expected in EXPECTED_LAYERS[L].items():
        assert list(resolve_bank_layers(rule, L)) == expected, (L, rule)
    assert resolve_bank_layers([3, 0], L) == (0, 3)


def test_every_other_on_odd_depth_keeps_last_layer():
    assert resolve_bank_layers("every_other", 5) == (0, 2, 4)


# 5 -------------------------------------------------------------------------------------
def closed_form_params(variant: str, cfg) -> int:
    m = cfg.model
    d, V, L = m.d_model, m.vocab_size, m.n_layers
    kv, hd = m.n_kv_heads * m.head_dim, m.n_heads * m.head_dim
    hidden = round(m.mlp_ratio * d)
    base = 2 * V * d + L * (d * hd + 2 * d * kv + hd * d + 2 * d * hidden)
    T = len(EXPECTED_LAYERS[L]["last_third"])
    E = len(EXPECTED_LAYERS[L]["every_other"])
    delta = {
        "baseline": 0,
        "bov": T * (V * kv - d * kv + 1),  # table in, W_V out, gamma
        "bov_add": T * (V * kv + 2),  # table in, W_V kept, (a, b)
        "x0_replace": T,  # W_V kept (it projects x0), gamma
        "v1_replace": T * (1 - d * kv),  # W_V out, gamma
        "resformer": 0,
        "resformer_learned": 2 * (L - 1),
        "svformer": -(L - 1) * d * kv,
        "value_embed": E * (V * kv + 12 * m.n_kv_heads),  # table + gate
        "depth_attention": 0,  # no new parameters
        "neutreno": 0,
        "denseformer": L * (L + 3) // 2,  # block l averages l + 2 outputs
    }[variant]
    return base + delta


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("preset", ["micro", "tiny"])
def test_parameter_count_closed_form(variant, preset):
    model, cfg = make(variant, preset=preset)
    assert model.num_params() == closed_form_params(variant, cfg)
    m = cfg.model
    wte = m.vocab_size * m.d_model
    banks = len(model.banks) * m.vocab_size * m.n_kv_heads * m.head_dim
    assert model.num_params(exclude_embeddings=True) == model.num_params() - wte - banks


def test_context_free_targets_hold_no_value_projection():
    for variant, keeps in [("bov", False), ("v1_replace", False), ("x0_replace", True), ("bov_add", True)]:
        model, cfg = make(variant)
        for l in EXPECTED_LAYERS[4]["last_third"]:
            assert (model.blocks[l].attn.v_proj is not None) == keeps, variant
    sv, _ = make("svformer")
    assert [b.attn.v_proj is not None for b in sv.blocks] == [True, False, False, False]


def test_shared_bank_is_one_table():
    per, cfg = make("bov", model__bank_layers="all")
    shared, _ = make("bov", model__bank_layers="all", model__bank_sharing="shared")
    V, kv = cfg.model.vocab_size, cfg.model.n_kv_heads * cfg.model.head_dim
    assert len(per.banks) == 4 and len(shared.banks) == 1
    assert per.num_params() - shared.num_params() == 3 * V * kv
    assert {b.attn.plan.bank for b in shared.blocks} == {0}


def test_learned_per_head_counts():
    a, cfg = make("bov", model__value_coeff="learned_per_head")
    b, _ = make("bov")
    assert a.num_params() - b.num_params() == 2 * (cfg.model.n_kv_heads - 1)


def test_swiglu_count():
    model, cfg = make("baseline", model__mlp="swiglu")
    m = cfg.model
    hidden = round(m.mlp_ratio * m.d_model)
    base = closed_form_params("baseline", cfg)
    assert model.num_params() == base + m.n_layers * m.d_model * hidden


# 6 -------------------------------------------------------------------------------------
def measured_flops_per_token(model, cfg, T):
    ids = ids_for(cfg, B=2, T=T)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(ids).float().logsumexp(-1).mean().backward()
    return fc.get_total_flops() / ids.numel()


@pytest.mark.parametrize("variant", VARIANTS + ["swiglu"])
def test_flops_per_token_matches_flop_counter(variant):
    if variant == "swiglu":
        model, cfg = make("bov_add", model__mlp="swiglu", model__value_source="x0")
    else:
        model, cfg = make(variant)
    T = cfg.model.seq_len
    analytic = model.flops_per_token(T)
    measured = measured_flops_per_token(model, cfg, T)
    assert abs(analytic - measured) / measured < 0.02, (analytic, measured)


def test_flops_drop_by_value_matmul_per_bank_layer():
    bov, cfg = make("bov")
    base, _ = make("baseline")
    m = cfg.model
    T = len(EXPECTED_LAYERS[4]["last_third"])
    assert base.flops_per_token() - bov.flops_per_token() == 3 * 2 * m.d_model * m.n_kv_heads * m.head_dim * T


def test_flops_count_window_keys():
    model, cfg = make("baseline", model__window_pattern="SSSL", model__short_window=16)
    full, _ = make("baseline")
    m = cfg.model
    # layers 0, 1, 2 use 16 keys instead of 64; the last layer is full
    saved = 3 * 2 * 2 * m.n_heads * m.head_dim * (m.seq_len - 16) * 3
    assert full.flops_per_token() - model.flops_per_token() == saved


def test_paper_flops_per_token():
    from bov.config import load_config
    from bov.model import GPT

    for preset, paper in [("135m", 7.60e8), ("780m", 4.78e9)]:
        with torch.device("meta"):
            model = GPT(load_config(preset, "baseline").model)
        assert abs(model.flops_per_token() - paper) / paper < 0.005


def test_own_source_scales_the_standard_value():
    """value_source=own (BoV Table 1 row 2): v = c * x_l W_V, c learned from 1, so step 0 is the baseline."""
    scaled, cfg = make("baseline", model__bank_layers="last_third", model__value_source="own")
    base, _ = make("baseline")
    ids = ids_for(cfg)
    targets = resolve_bank_layers("last_third", cfg.model.n_layers)
    assert scaled.num_params() == base.num_params() + len(targets)  # one scalar per target layer
    assert scaled.flops_per_token(cfg.model.seq_len) == base.flops_per_token(cfg.model.seq_len)
    with torch.no_grad():
        assert maxdiff(scaled(ids), base(ids)) < 1e-6
        scaled.blocks[targets[0]].attn.mix.b.fill_(0.5)
        ref = _reference_forward(scaled, ids, lambda l, own, v0, **_: 0.5 * own if l == targets[0] else own)
        assert maxdiff(scaled(ids), ref) < 1e-5
        assert maxdiff(scaled(ids), base(ids)) > 1e-3


def test_zero_residual_init_zeroes_only_the_branch_outputs_and_keeps_every_other_draw():
    scaled, _ = make("bov")
    zero, _ = make("bov", model__residual_init="zero", model__unembedding_init_std=0.001)
    for (name, a), (_, b) in zip(scaled.named_parameters(), zero.named_parameters()):
        if name.endswith(("o_proj.weight", "mlp.down.weight")):
            assert not b.any(), name
        elif name == "lm_head.weight":
            assert torch.allclose(b, a * 0.001 * math.sqrt(a.size(1)))  # the same draw, rescaled
            assert b.std().item() == pytest.approx(0.001, rel=0.05)
        else:
            assert torch.equal(a, b), name  # same RNG order: variants stay paired at initialization
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():  # every block starts as the identity: the logits are those of the embedding alone
        x = F.rms_norm(zero.wte(ids), (zero.cfg.d_model,), eps=zero.cfg.norm_eps)
        want = zero.lm_head(F.rms_norm(x, (zero.cfg.d_model,), eps=zero.cfg.norm_eps))
        assert torch.allclose(zero(ids), want, atol=1e-6)
