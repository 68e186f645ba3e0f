"""Resolve the value-path config axes, once, into a per-layer plan.

Every layer's value is one formula,

    v_l = a * own + b * alt

where `own = x_l W_V^l` is the standard contextual value and `alt` is a
context-free (or earlier-layer) source: a bank row `E_v[i]`, `x0 W_V^l`, or the
first layer's value `V_0`. A layer's `LayerPlan` fixes which terms exist and how
a, b are parameterized; the model's forward pass reads the plan and never the
config axes. Standard attention is `own` alone, BoV is `b * E_v[i]` alone,
ResFormer is `0.5 * own + 0.5 * V_0`, value embeddings are `own + gate(x) * E_v[i]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Sequence

from bov.config import VALUE_SOURCES, Coeff, ModelConfig, Source, resolve_bank_layers

__all__ = ["LayerPlan", "build_plan", "num_banks", "resolve_bank_layers", "Source", "Coeff"]


@dataclass(frozen=True)
class LayerPlan:
    """How one layer builds the value its attention reads: v = a * own + b * alt."""

    layer: int
    role: Literal["standard", "target", "residual"]
    source: Source | None  # None: v = own
    uses_own: bool  # the combination includes x_l W_V^l
    has_v_proj: bool  # holds W_V: for its own value, to project x0, or as V_0 itself
    coeff: Coeff
    init: tuple[float, float]  # (a, b) at initialization; a unused when not uses_own
    bank: int | None = None  # index into the model's bank tables
    reads: tuple[int, ...] = ()  # earlier layers whose value the source reads (V_0: layer 0)
    depth_candidates: tuple[int, ...] = ()  # Depth-Attention: earlier layers attended over depth (+ self)
    neutreno: float | None = None  # NeuTRENO lambda: y += lam * (V_0 - V_l) after attention

    @property
    def v_matmuls(self) -> int:
        """How many times this layer applies W_V per token: to x (for its own value, for the `own` source, or
        for a source with nothing earlier to read at this layer, e.g. v1 at layer 0) and to x0 (`x0`)."""
        if self.source is None:
            return 1
        on_x = self.uses_own or self.source == "own" or (self.source not in ("bank", "x0") and not self.reads)
        return int(on_x) + int(self.source == "x0")

    @property
    def value_cache(self) -> Literal["values", "bank", "first_layer"]:
        """What a KV cache keeps for this layer's values (bov.infer).

        A value that depends only on the token ids (a bank row) or only on layer 0's
        values, scaled by constant coefficients, is rebuilt when the layer attends, so
        nothing is stored: "bank" gathers E_v[ids], "first_layer" rescales layer 0's
        cached values (SVFormer). Anything mixed with x_l, gated by x_l or depth-mixed
        is contextual and cached as "values".
        """
        rebuildable = not self.uses_own and self.coeff != "gate" and not self.depth_candidates
        if rebuildable and self.source == "bank":
            return "bank"
        if rebuildable and self.source == "v1" and self.layer > 0:
            return "first_layer"
        return "values"

    def describe(self) -> str:
        """The layer's value formula, e.g. `0.5*x_l W_V + 0.5*V_0` or `b*E_v[i] (table 0)`."""
        depth = f", then depth-mixed with layers {list(self.depth_candidates)}" if self.depth_candidates else ""
        if self.source is None:
            post = f", y += {self.neutreno:g}*(V_0 - V_l)" if self.neutreno is not None else ""
            return "x_l W_V" + depth + post
        a, b = self.init
        fixed = self.coeff == "fixed"
        alt = VALUE_SOURCES[self.source].symbol
        alt_c = "gate(x)*" if self.coeff == "gate" else (f"{b:g}*" if fixed else "b*")
        own_c = "" if self.coeff == "gate" else (f"{a:g}*" if fixed else "a*")
        text = f"{alt_c}{alt}" + (f" (table {self.bank})" if self.bank is not None else "")
        return (f"{own_c}x_l W_V + {text}" if self.uses_own else text) + depth


def build_plan(cfg: ModelConfig) -> tuple[LayerPlan, ...]:
    """Config axes -> one LayerPlan per layer. The only place the axes are interpreted."""
    targets = resolve_bank_layers(cfg.bank_layers, cfg.n_layers)
    stride = cfg.depth_stride or max(1, cfg.n_layers // 2)
    plans = []
    for l in range(cfg.n_layers):
        if l in targets:
            mixed = cfg.value_mode == "mixed"
            if cfg.value_coeff == "fixed":
                init = (0.5, 0.5) if mixed else (0.0, 1.0)
            else:  # learned starts as the standard value (mixed) or as the source itself (replace)
                init = (1.0, 0.0) if mixed else (0.0, 1.0)
            if cfg.value_coeff == "gate":
                init = (1.0, math.nan)  # b is 3*sigmoid(W_gate x[..., :12]), not a number
            bank = None
            if cfg.value_source == "bank":
                bank = 0 if cfg.bank_sharing == "shared" else targets.index(l)
            spec = VALUE_SOURCES[cfg.value_source]
            reads = spec.reads(l)
            # A source that reads nothing and projects nothing at this layer is the layer's own projection
            # (v1 at layer 0 is V_0 itself), so the layer keeps W_V there too.
            has_v = mixed or spec.applies_w_v or (cfg.value_source != "bank" and not reads)
            plans.append(LayerPlan(l, "target", cfg.value_source, mixed, has_v, cfg.value_coeff, init, bank, reads))
        elif l >= 1 and cfg.value_residual in ("identity", "learned"):
            coeff: Coeff = "fixed" if cfg.value_residual == "identity" else "learned"
            plans.append(LayerPlan(l, "residual", "v1", True, True, coeff, (0.5, 0.5), reads=(0,)))
        elif l >= 1 and cfg.value_residual == "neutreno":
            plans.append(LayerPlan(l, "residual", None, True, True, "fixed", (1.0, 0.0), reads=(0,),
                                   neutreno=cfg.neutreno_lambda))
        else:
            plans.append(LayerPlan(l, "standard", None, True, True, "fixed", (1.0, 0.0)))
    if cfg.depth_attention:  # layer 0 has no depth step
        plans = [replace(p, depth_candidates=tuple(j for j in range(p.layer) if j % stride == 0)) if p.layer else p
                 for p in plans]
    return tuple(plans)


def num_banks(plan: Sequence[LayerPlan]) -> int:
    return len({p.bank for p in plan if p.bank is not None})
