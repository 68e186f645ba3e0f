"""Sweep definitions under sweeps/ name real presets, variants and config keys."""

from __future__ import annotations

from bov.config import list_variants, load_config
from bov.study import load_sweep
from conftest import VARIANTS


def test_variants_sweep_covers_every_named_variant():
    sweep = load_sweep("variants")
    assert set(sweep.levels) == set(list_variants()) == set(VARIANTS)
    budget = sweep.cell("baseline", 0).cfg.train.max_flops
    for level in sweep.levels:
        cfg = sweep.cell(level, 0).cfg
        named = load_config("tiny", level).model
        assert cfg.variant == level and cfg.model == named  # each level is exactly the named variant
        assert cfg.train.max_flops == budget  # compute-matched
