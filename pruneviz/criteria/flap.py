"""FLAP: fluctuation of output-projection inputs, with bias compensation (An et al., arXiv 2312.11983, AAAI 2024).

FLAP asks how much the output of ``o_proj``/``down_proj`` would change if input column j were replaced by a
constant (its calibration mean): the change has variance ``Var(X_j) · ‖W_:,j‖₂²``, the *weighted input feature
variance* (WIFV, FLAP's default metric). A head sums its ``head_dim`` columns; a channel is one column. The mean
``W_:,j · mean(X_j)`` that removal loses can be put back as a bias: that is FLAP's *bias compensation*, here the
compensator ``"flap_bias"`` that :func:`pruneviz.surgery.apply_plan` runs for plans with
``compensation="flap_bias"``.

Details taken from the official code (``lib/prune.py``, ``lib/layerwrapper.py``):

- ``metric``: "WIFV" (default) ``Var(X_j)·Σ_i W_ij²``; "IFV" ``Var(X_j)``; "WIFN" ``Σ_i |W_ij|·‖X_j‖₂``.
- ``square_attention=True``: the code squares the attention (``o_proj``) column metric before aggregating heads.
- ``standardize=True`` (FLAP's default "AL-AM" structure): per layer and module, the column metrics are
  standardised (``(m − mean)/std`` over that layer's columns), a head is the *mean* of its standardised columns
  and a channel its standardised column, so heads and channels of all layers can be ranked globally. The
  per-layer means and standard deviations go to ``extras["standardization"]``, so the other form is always
  available: :func:`raw_maps` and :func:`standardized_maps` convert exactly. With ``standardize=False`` the
  maps are raw sums (FLAP's uniform "UL-UM" structure).
- Variance is over all calibration tokens, unbiased (FLAP's running estimate normalises by samples instead of
  tokens and skips its first batch; both only rescale or add noise, pruneviz uses the plain token variance).
- GQA (FLAP has none): a KV group's score aggregates the columns of its query heads (sum, or mean when
  standardised); its key/value rows have no input-variance meaning of their own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..arch import adapter_for, check_residual_outputs, geometry_of, get_path, is_conv1d, weight_axis
from ..errors import CriterionError
from ..importance import Calibration, Context, Criterion, ImportanceMap, register
from ..offload import materialized
from ..plan import Plan
from ..progress import Span, context_of
from ..surgery import register_compensator
from .stats import DEFAULT_BATCH_SIZE, CalibrationStats, collect_stats
from .units import aggregate_units

METRICS = ("WIFV", "IFV", "WIFN")


@dataclass
class FlapOptions:
    """metric: WIFV (default, FLAP's), IFV or WIFN. standardize: FLAP's per-layer, per-module standardisation for
    global ranking (default True = FLAP's AL-AM; raw maps recoverable via flap.raw_maps). square_attention: square
    the o_proj column metric as FLAP's code does. batch_size: calibration windows per forward (memory only)."""

    metric: str = "WIFV"
    standardize: bool = True
    square_attention: bool = True
    batch_size: int = DEFAULT_BATCH_SIZE


# ---- the fluctuation metric ---------------------------------------------------------------------------------------

def column_metric(module: nn.Module, var: torch.Tensor, norm: torch.Tensor, metric: str) -> torch.Tensor:
    """FLAP's per-input-column metric of one output projection [n_in], from its input's variance and norm [n_in]."""
    w = module.weight.detach().float()
    col = lambda t: t.sum(dim=weight_axis(module, "out")).to(var.device)  # noqa: E731  [n_in]
    if metric == "IFV":
        return var
    if metric == "WIFV":
        return var * col(w.pow(2))
    return col(w.abs()) * norm  # WIFN


def standardize_rows(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row z-scores of ``m`` [L, F] as FLAP's ``standarlization`` (unbiased std). Returns (z, mean, std)."""
    mean = m.mean(dim=1, keepdim=True)  # [L, 1]
    std = m.std(dim=1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)  # [L, 1]
    return (m - mean) / std, mean.squeeze(1), std.squeeze(1)


def column_tables(model: nn.Module, stats: CalibrationStats, options: FlapOptions) -> dict[str, torch.Tensor]:
    """The metric of every output-projection input column, ``{"attn_out": [L, H*d], "mlp_out": [L, C]}``."""
    adapter = adapter_for(model)
    tables = {}
    for site, path in (("attn_out", adapter.attn_out), ("mlp_out", adapter.mlp_out)):
        var, norm = stats.variances(site), stats.norms(site)  # [L, F]
        rows = []
        for l, layer in enumerate(adapter.layers(model)):
            with materialized(layer):  # offloaded weights are read one block at a time
                rows.append(column_metric(get_path(layer, path), var[l], norm[l], options.metric).float().cpu())
        tables[site] = torch.stack(rows)  # [L, F]
    if options.square_attention:
        tables["attn_out"] = tables["attn_out"].pow(2)
    return tables


def _table_features(model: nn.Module, tables: dict[str, torch.Tensor]) -> Callable:
    """Per-feature scores for :func:`aggregate_units`: the column table as input features of the two output
    projections (units own only input columns of those, so their output features score nothing)."""
    adapter = adapter_for(model)
    site_of = {adapter.attn_out: "attn_out", adapter.mlp_out: "mlp_out"}

    def features(l: int, layer: nn.Module, path: str) -> dict[str, torch.Tensor]:
        mod = get_path(layer, path)
        return {"in": tables[site_of[path]][l], "out": torch.zeros(mod.weight.shape[weight_axis(mod, "out")])}
    return features


def column_counts(model: nn.Module) -> dict[str, int]:
    """Output-projection columns aggregated into one unit of each map (to turn sums into means)."""
    g = geometry_of(model)
    return {"heads": g.head_dim, "kv": g.group_size * g.head_dim, "channels": 1}


# ---- raw <-> standardised ---------------------------------------------------------------------------------------

_SITE_OF_MAP = {"heads": "attn_out", "kv": "attn_out", "channels": "mlp_out"}


def raw_maps(imap: ImportanceMap) -> dict[str, torch.Tensor]:
    """FLAP's raw (summed, unstandardised) maps of a ``flap`` result, whichever form it holds."""
    if not imap.extras.get("standardized"):
        return {m: imap.get(m) for m in _SITE_OF_MAP}
    st, counts = imap.extras["standardization"], imap.extras["columns_per_unit"]
    out = {}
    for m, site in _SITE_OF_MAP.items():
        mean, std = torch.tensor(st[site]["mean"])[:, None], torch.tensor(st[site]["std"])[:, None]  # [L, 1]
        out[m] = counts[m] * (imap.get(m) * std + mean)
    return out


def standardized_maps(imap: ImportanceMap) -> dict[str, torch.Tensor]:
    """FLAP's standardised maps (for global ranking across layers and modules) of a ``flap`` result."""
    if imap.extras.get("standardized"):
        return {m: imap.get(m) for m in _SITE_OF_MAP}
    st, counts = imap.extras["standardization"], imap.extras["columns_per_unit"]
    out = {}
    for m, site in _SITE_OF_MAP.items():
        mean, std = torch.tensor(st[site]["mean"])[:, None], torch.tensor(st[site]["std"])[:, None]  # [L, 1]
        out[m] = (imap.get(m) / counts[m] - mean) / std
    return out


# ---- the criterion ----------------------------------------------------------------------------------------------

@register
class Flap(Criterion):
    name = "flap"
    title = "FLAP fluctuation (WIFV)"
    paper = "FLAP, An et al., arXiv 2312.11983 (AAAI 2024)"
    produces = ("heads", "kv", "channels")
    layerwise = True
    Options = FlapOptions

    def score(self, model: nn.Module, calib: Calibration, options: FlapOptions, ctx: Context) -> ImportanceMap:
        if options.metric not in METRICS:
            raise CriterionError(f"flap: metric must be one of {METRICS}, not {options.metric!r}")
        adapter = adapter_for(model)
        stats = collect_stats(model, calib, Span(ctx, 0.0, 0.8), ("attn_out", "mlp_out"), options.batch_size)
        with torch.no_grad():
            tables = column_tables(model, stats, options)
        standardization = {}
        for site in tables:
            z, mean, std = standardize_rows(tables[site])
            standardization[site] = {"mean": mean.tolist(), "std": std.tolist()}
            if options.standardize:
                tables[site] = z
        maps = aggregate_units(model, _table_features(model, tables), modules=(adapter.attn_out, adapter.mlp_out),
                               span=Span(ctx, 0.8, 1.0))
        counts = column_counts(model)
        if options.standardize:
            maps = {m: v / counts[m] for m, v in maps.items()}
        extras = {"standardized": options.standardize, "standardization": standardization,
                  "columns_per_unit": counts, "calibration_tokens": stats.tokens}
        return ImportanceMap(self.name, geometry_of(model), **maps, extras=extras)


# ---- bias compensation --------------------------------------------------------------------------------------------

def add_mean_bias(module: nn.Module, columns: list[int], mean: torch.Tensor) -> torch.Tensor | None:
    """``bias += W[:, columns] @ mean[columns]`` on ``module`` (creating a zero bias if it has none).

    Returns the added vector [n_out] (None if ``columns`` is empty). Mutates ``module``.
    """
    if not columns:
        return None
    w = module.weight.detach()
    idx = torch.as_tensor(columns, dtype=torch.long, device=w.device)
    w_cols = w.index_select(weight_axis(module, "in"), idx).float()  # Linear [out, k]; Conv1D [k, out]
    m = mean.to(w.device).float()[idx]  # [k]
    added = m @ w_cols if is_conv1d(module) else w_cols @ m  # [out]
    if getattr(module, "bias", None) is None:
        module.bias = nn.Parameter(torch.zeros(added.shape[0], dtype=w.dtype, device=w.device),
                                   requires_grad=module.weight.requires_grad)
    with torch.no_grad():
        module.bias.add_(added.to(module.bias.dtype))
    return added


@register_compensator("flap_bias")
def flap_bias(model: nn.Module, plan: Plan, calibration: torch.Tensor, progress=None) -> None:
    """FLAP bias compensation, in place on ``model`` (the dense-shaped copy that is about to be sliced).

    For every kept layer, the removed heads' columns of the attention output projection and the removed
    channels' columns of the MLP down projection add ``W[:, removed] @ mean(X[removed])`` to that projection's
    bias. The means are taken in one pass of ``calibration`` ([N, T] token ids) through the *dense* model,
    before any weight is changed, as FLAP does (its statistics come from unpruned layers). Removed blocks get no
    compensation. Refused on families that normalise the projection outputs before the residual add.
    """
    check_residual_outputs(model, "FLAP's bias compensation")
    adapter, g = adapter_for(model), geometry_of(model)
    span = Span(context_of(progress), 0.0, 1.0)
    stats = collect_stats(model, calibration, span, ("attn_out", "mlp_out"))
    attn_mean, mlp_mean = stats.means("attn_out"), stats.means("mlp_out")  # [L, H*d], [L, C]
    for l, layer in enumerate(adapter.layers(model)):
        if l in plan.blocks:
            continue
        cols = [h * g.head_dim + i for h in plan.removed_heads_all(l) for i in range(g.head_dim)]
        add_mean_bias(get_path(layer, adapter.attn_out), cols, attn_mean[l])
        add_mean_bias(get_path(layer, adapter.mlp_out), list(plan.removed("channel", l)), mlp_mean[l])
