"""Weight magnitude: data-free scores of heads, KV groups, channels (LLM-Pruner's L1/L2) and blocks (Shortened LLaMA).

Width (LLM-Pruner ``--pruner_type l1|l2``, Torch-Pruning's group magnitude): a unit's score is the norm of all
parameters it owns, as declared once in :mod:`pruneviz.arch`: for a query head its query rows (and their biases)
and its output-projection columns; for a KV group its key/value rows plus all its query heads; for a channel its
up/gate rows (and biases) and its down-projection column. ``norm="l1"`` (default, LLM-Pruner's and Shortened
LLaMA's ``p=1``) is ``Σ|w|``; ``norm="l2"`` is the group L2 norm ``sqrt(Σ w²)``.

Depth (Shortened LLaMA, arXiv 2402.02834, ``src/anal_block_sensitivity_magnitude.py``): block score
``I_n = Σ_k Σ_ij |W^k_ij|^p`` over every weight tensor k of block n: the projection matrices *and* the norm
weights (``include_norms=True``), ``p = norm_power = 1``. Biases are not included, as in the reference code
(it keeps parameters whose name contains "weight").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch import adapter_for, geometry_of, get_path
from ..errors import CriterionError
from ..importance import Calibration, Context, Criterion, ImportanceMap, register
from ..progress import Span
from .units import FeatureFn, aggregate_units, block_scores, feature_sums, with_bias

# ---- the criterion ----------------------------------------------------------------------------------------------

@dataclass
class MagnitudeOptions:
    """norm: "l1" (Σ|w|, LLM-Pruner/Shortened default p=1) or "l2" (sqrt Σw²) of everything a unit owns.
    norm_power: p of the Shortened-LLaMA block score Σ|W|^p (1 as in its scripts).
    include_norms: add the block's norm weights to the block score (as Shortened LLaMA does)."""

    norm: str = "l1"
    norm_power: float = 1.0
    include_norms: bool = True


def magnitude_features(norm: str) -> FeatureFn:
    """Per-feature Σ|w| (l1) or Σw² (l2) of a projection's weight and bias."""
    fn = (lambda t: t.abs()) if norm == "l1" else (lambda t: t.pow(2))

    def features(l: int, layer: nn.Module, path: str) -> dict[str, torch.Tensor]:
        mod = get_path(layer, path)
        return with_bias(mod, feature_sums(mod, fn(mod.weight.detach().float())), fn)
    return features


@register
class Magnitude(Criterion):
    name = "magnitude"
    title = "Weight magnitude"
    paper = "LLM-Pruner (arXiv 2305.11627) L1/L2; Shortened LLaMA (arXiv 2402.02834) block magnitude"
    produces = ("heads", "kv", "channels", "blocks")
    needs_calibration = False
    layerwise = True
    Options = MagnitudeOptions

    def score(self, model: nn.Module, calib: Calibration | None, options: MagnitudeOptions,
              ctx: Context) -> ImportanceMap:
        if options.norm not in ("l1", "l2"):
            raise CriterionError(f"magnitude: norm must be 'l1' or 'l2', not {options.norm!r}")
        with torch.no_grad():
            maps = aggregate_units(model, magnitude_features(options.norm), span=Span(ctx, 0.0, 0.9))
            if options.norm == "l2":
                maps = {k: v.sqrt() for k, v in maps.items()}
            norm_weight = adapter_for(model).norm_weight  # a (1 + w) norm (Gemma) scores its scale 1 + w
            blocks = block_scores(model, lambda l, n, p: norm_weight(n, p), options.norm_power, options.include_norms)
        return ImportanceMap(self.name, geometry_of(model), blocks=blocks, **maps)
