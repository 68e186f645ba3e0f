"""Config loading: presets, variants, dotted overrides, and one-line errors for bad input."""

from __future__ import annotations

import pytest

from bov.config import ConfigError, list_presets, list_variants, load_config
from conftest import VARIANTS


def test_every_preset_and_variant_loads():
    assert set(list_presets()) >= {"micro", "tiny", "135m", "780m"}
    assert set(list_variants()) >= set(VARIANTS)
    for preset in list_presets():
        for variant in list_variants():
            cfg = load_config(preset, variant)
            assert cfg.variant == variant and cfg.preset == preset


def test_paper_shapes():
    m = load_config("135m", "bov").model
    assert (m.n_layers, m.d_model, m.n_heads, m.head_dim, m.vocab_size, m.seq_len) == (12, 768, 6, 128, 32768, 2048)
    m = load_config("780m").model
    assert (m.n_layers, m.d_model, m.n_heads, m.head_dim) == (24, 1536, 12, 128)
    t = load_config("135m").train
    assert (t.optimizer, t.lr_matrix, t.lr_embedding, t.lr_unembedding, t.lr_scalar, t.weight_decay) == (
        "muon", 0.02, 0.30, 0.008, 0.50, 0.28)
    assert t.batch_size * t.grad_accum * 2048 == 524288


def test_overrides_as_dict_or_list_agree():
    a = load_config("micro", "bov", {"model.bank_layers": "every_other", "train.max_steps": 3})
    b = load_config("micro", "bov", ["model.bank_layers=every_other", "train.max_steps=3"])
    assert a == b and a.model.bank_layers == "every_other" and a.train.max_steps == 3
    c = load_config("micro", "bov", ["model.bank_layers=[0, 3]"])
    assert c.model.bank_layers == [0, 3]
    d = load_config("micro", "resformer", ["model.value_residual=off"])  # YAML's bare off
    assert d.model.value_residual == "off"


def test_flat_and_hash():
    a = load_config("micro", "bov")
    flat = a.flat()
    assert flat["model.bank_layers"] == "last_third" and flat["train.seed"] == 0
    assert a.config_hash() == load_config("micro", "bov").config_hash()
    assert a.config_hash() != load_config("micro", "bov", {"train.seed": 1}).config_hash()


BAD = [
    ({"model.bank_layer": "all"}, "unknown key model.bank_layer"),
    ({"modle.n_layers": 2}, "unknown key modle"),
    ({"model.bank_layers": "last_quarter"}, "model.bank_layers: unknown level 'last_quarter'; allowed: none, last_third"),
    ({"model.value_mode": "replace"}, "model.value_mode: Input should be 'context_free' or 'mixed'"),
    ({"model.value_source": "x1"}, "model.value_source: Input should be 'bank', 'x0', 'v1' or 'own'"),
    ({"model.value_coeff": "auto"}, "model.value_coeff: Input should be"),
    ({"model.bank_init": "xavier"}, "model.bank_init: Input should be 'aligned', 'normal', 'uniform' or 'zeros'"),
    ({"model.value_source": "x0", "model.bank_sharing": "shared"}, "model.bank_sharing=shared needs model.value_source=bank"),
    ({"model.value_source": "v1", "model.bank_init": "zeros"}, "model.bank_init=zeros needs model.value_source=bank"),
    ({"model.bank_layers": [0, 9]}, "model.bank_layers: layer 9 out of range 0..3"),
    ({"model.bank_layers": [1, 1]}, "model.bank_layers: duplicate layer"),
    ({"model.bank_layers": []}, "model.bank_layers: empty list"),
    ({"model.n_layers": 1, "model.bank_layers": "all_but_first"}, "model.bank_layers=all_but_first selects no layer of a 1-layer model"),
    ({"model.value_coeff": "gate"}, "model.value_coeff=gate needs model.value_mode=mixed"),
    ({"model.bank_layers": "all", "model.value_residual": "identity"}, "model.value_residual acts on layers >= 1"),
    ({"model.n_kv_heads": 3}, "model.n_heads (4) must be a multiple of model.n_kv_heads (3)"),
    ({"train.max_tokens": 100}, "exactly one of train.max_steps, train.max_tokens, train.max_flops"),
    ({"train.max_steps": None}, "exactly one of train.max_steps"),
    ({"train.optimizer": "sgd"}, "train.optimizer: Input should be 'adamw', 'muon' or 'normuon'"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m[:40] for _, m in BAD])
def test_invalid_input_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("micro", "bov", overrides)
    text = str(e.value)
    assert "\n" not in text
    assert message in text


def test_axis_without_target_layer_is_an_error():
    with pytest.raises(ConfigError, match="model.value_source has no effect when model.bank_layers resolves to no layer"):
        load_config("micro", "baseline", {"model.value_source": "x0"})


def test_unknown_preset_and_variant_list_choices():
    with pytest.raises(ConfigError, match="unknown scale 'huge'; available: .*micro"):
        load_config("huge")
    with pytest.raises(ConfigError, match="unknown variant 'bovv'; available: .*baseline, bov"):
        load_config("micro", "bovv")
    with pytest.raises(ConfigError, match="override 'model.n_layers' must look like"):
        load_config("micro", None, ["model.n_layers"])


def test_variant_order_names_every_variant_once():
    from bov.config import VARIANT_ORDER, list_variants

    assert sorted(VARIANT_ORDER) == list_variants()


def test_keys_added_later_leave_older_runs_hashes_alone():
    # hashes of the commit before model.residual_init / model.unembedding_init_std existed: a resumed study
    # must find its cells under the same names
    from bov.config import ExperimentConfig, validate

    assert ExperimentConfig().config_hash() == "877f2e625ece"
    bov = {"variant": "bov", "model": {"bank_layers": "last_third", "n_layers": 6}}
    assert validate(bov).config_hash() == "2af9ba599561"
    assert validate({**bov, "model": {**bov["model"], "residual_init": "zero"}}).config_hash() != "2af9ba599561"
    assert validate({**bov, "model": {**bov["model"], "unembedding_init_std": 0.001}}).config_hash() != "2af9ba599561"
