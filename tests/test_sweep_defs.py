"""Sweep definitions under sweeps/ name real presets, variants and config keys."""

from __future__ import annotations

from pathlib import Path

import yaml

from bov.config import list_variants, load_config
from conftest import VARIANTS

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


def test_variants_sweep_covers_every_named_variant():
    spec = yaml.safe_load((SWEEPS / "variants.yaml").read_text())
    assert set(spec["levels"]) == set(list_variants()) == set(VARIANTS)
    for level in spec["levels"]:
        overrides = {"train.max_steps": None, **spec["budget"]}
        cfg = load_config(spec["base"]["preset"], level, overrides)
        assert cfg.train.max_flops == float(spec["budget"]["train.max_flops"])
