"""Wanda-sp: weight magnitude times input-activation norm, the structured Wanda baseline of FLAP.

Wanda (Sun et al., arXiv 2306.11695) scores a weight by ``|W_ij| · ‖X_j‖₂``, X_j being input feature j over the
calibration tokens. Its structured variant "Wanda-sp", as implemented in the FLAP repository (arXiv 2312.11983,
``lib/prune.py: prune_wanda_sp``), scores only the *output projections*: the score of input column j of
``o_proj``/``down_proj`` is ``Σ_i |W_ij| · ‖X_j‖₂``; a head sums its ``head_dim`` columns, a channel is its
column. (FLAP divides by the number of rows and by sqrt(#samples); these are constant factors and change no
ranking, so pruneviz keeps the plain sums over all calibration tokens.)

Options:

- ``coupled=False`` (default): FLAP's out-projection-only reading above.
- ``coupled=True``: also add the rows a unit owns in the input projections (q/k/v or fused qkv for heads and KV
  groups, gate/up or fc1 for channels), each row i scored ``Σ_j |W_ij| · ‖X_j‖₂`` with X the hidden state those
  projections read (Wanda's per-output-row score, summed over the unit's rows).

A KV group's score is the sum of its query heads' scores, plus (coupled) its key/value rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch import adapter_for, geometry_of, get_path
from ..importance import Calibration, Context, Criterion, ImportanceMap, register
from ..progress import Span
from .stats import DEFAULT_BATCH_SIZE, CalibrationStats, collect_stats, input_site
from .units import FeatureFn, aggregate_units, feature_sums, scale_inputs


@dataclass
class WandaSPOptions:
    """coupled: also score the unit's rows of q/k/v and gate/up (default False = FLAP's Wanda-sp, output
    projection columns only). batch_size: calibration windows per forward pass (memory only)."""

    coupled: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE


def wanda_features(stats: CalibrationStats, adapter) -> FeatureFn:
    """Per-feature Σ |W_ij|·‖X_j‖₂ of a projection, X its input at the matching site."""
    norms = {}

    def features(l: int, layer: nn.Module, path: str) -> dict[str, torch.Tensor]:
        site = input_site(adapter, path)
        if site not in norms:
            norms[site] = stats.norms(site)  # [L, F]
        mod = get_path(layer, path)
        return feature_sums(mod, scale_inputs(mod, mod.weight.detach().float().abs(), norms[site][l]))
    return features


@register
class WandaSP(Criterion):
    name = "wanda_sp"
    title = "Wanda-sp (|W|·‖X‖)"
    paper = "Wanda (arXiv 2306.11695), structured as in FLAP (arXiv 2312.11983)"
    produces = ("heads", "kv", "channels")
    layerwise = True
    Options = WandaSPOptions

    def score(self, model: nn.Module, calib: Calibration, options: WandaSPOptions, ctx: Context) -> ImportanceMap:
        adapter = adapter_for(model)
        sites = ("attn_in", "attn_out", "mlp_in", "mlp_out") if options.coupled else ("attn_out", "mlp_out")
        stats = collect_stats(model, calib, Span(ctx, 0.0, 0.8), sites, options.batch_size)
        modules = None if options.coupled else (adapter.attn_out, adapter.mlp_out)
        with torch.no_grad():
            maps = aggregate_units(model, wanda_features(stats, adapter), modules=modules, span=Span(ctx, 0.8, 1.0))
        return ImportanceMap(self.name, geometry_of(model), **maps,
                             extras={"calibration_tokens": stats.tokens})
