"""Pure computations behind the app's views: masks, binning, criterion comparison, plan costs, selections.

Nothing here imports Streamlit, so every function is unit-testable. The app turns importance maps and plans
into NumPy arrays here, and :mod:`pruneviz.ui.figures` turns those into Plotly figures.

Choices documented here (the papers leave them open):

- *Rank correlation* between two criteria is Spearman's rho over all units of one kind (every layer pooled);
  a per-layer rho would hide the cross-layer allocation that global criteria imply.
- *Overlap* of "what each criterion would prune" takes, in every layer, the ``ratio`` share of units with the
  lowest score (uniform allocation) and reports the Jaccard index of those sets, so criteria with different
  scales across layers are compared on the same budget.
- *Live cost counters* are estimated from the plan without surgery: parameters exactly
  (:meth:`Plan.param_count`), FLOPs/token as the dense count minus 2 x removed matmul weights (removed
  parameters less the norm weights of removed blocks) minus the removed heads' attention term (the same
  accounting as :func:`pruneviz.evaluate.flops_per_token`), KV-cache bytes in proportion to the kept KV heads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
from scipy.stats import spearmanr

from ..arch import WIDTH_KINDS, Geometry, adapter_for, unit_count
from ..evaluate import attention_widths, flops_per_token, kv_cache_bytes
from ..plan import Plan, dense_params

MISSING = "–"  # what tables show for a missing value (st.dataframe(placeholder=...)); never "None"/"nan"
Cell = tuple[int, int, int]  # (layer, first unit, last unit + 1)
Edit = tuple[str, "int | None", tuple[int, ...], bool]  # (kind, layer, indices, remove?)


# ---- masks and binning --------------------------------------------------------------------------------------------

def removed_mask(plan: Plan, kind: str) -> np.ndarray:
    """Boolean mask of removed units: ``[L]`` for blocks, ``[L, U]`` otherwise (removed blocks fully True)."""
    g = plan.geometry
    if kind == "block":
        mask = np.zeros(g.n_layers, dtype=bool)  # [L]
        mask[list(plan.blocks)] = True
        return mask
    mask = np.zeros((g.n_layers, unit_count(g, kind)), dtype=bool)  # [L, U]
    for layer in range(g.n_layers):
        if layer in plan.blocks:
            mask[layer] = True
        elif kind == "head":
            mask[layer, list(plan.removed_heads_all(layer))] = True
        else:
            mask[layer, list(plan.removed(kind, layer))] = True
    return mask


def bin_columns(z: np.ndarray, size: int) -> np.ndarray:
    """Mean over consecutive column bins of ``size``: ``[L, C] -> [L, ceil(C / size)]`` (last bin may be short)."""
    if size <= 1:
        return np.asarray(z, dtype=float)
    L, C = z.shape
    n_bins = -(-C // size)
    padded = np.full((L, n_bins * size), np.nan)  # [L, B * size]
    padded[:, :C] = z
    return np.nanmean(padded.reshape(L, n_bins, size), axis=2)  # [L, B]


def bin_edges(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """Unit ranges ``[(first, last + 1), ...]`` of the bins covering ``start..stop-1``."""
    size = max(1, size)
    return [(a, min(a + size, stop)) for a in range(start, stop, size)]


def per_layer_rank(z: np.ndarray) -> np.ndarray:
    """Rank of each unit inside its layer scaled to [0, 1] (0 = least important); ``[L, U] -> [L, U]``."""
    z = np.asarray(z, dtype=float)
    if z.ndim == 1 or z.shape[1] < 2:
        return np.argsort(np.argsort(z, axis=-1), axis=-1) / max(z.shape[-1] - 1, 1)
    ranks = np.argsort(np.argsort(z, axis=1, kind="stable"), axis=1, kind="stable")  # [L, U]
    return ranks / (z.shape[1] - 1)


def colour_values(z: np.ndarray, scale: str) -> np.ndarray:
    """Values to colour by: ``"score"`` (raw), ``"log10"`` (of |score|) or ``"rank"`` (within each layer)."""
    z = np.asarray(z, dtype=float)
    if scale == "log10":
        tiny = np.finfo(float).tiny
        return np.log10(np.maximum(np.abs(z), tiny))
    if scale == "rank":
        return per_layer_rank(z)
    return z


# ---- comparing criteria -------------------------------------------------------------------------------------------

def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two equally shaped maps (flattened); NaN if either is constant."""
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape or a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def lowest_units(z: np.ndarray, ratio: float) -> set[tuple[int, int]]:
    """The ``ratio`` share of units with the lowest score in every layer, as ``{(layer, unit)}``."""
    z = np.atleast_2d(np.asarray(z, dtype=float))  # [L, U] (blocks: [1, L])
    k = int(round(ratio * z.shape[1]))
    if k <= 0:
        return set()
    order = np.argsort(z, axis=1, kind="stable")[:, :k]  # [L, k]
    return {(int(l), int(u)) for l in range(z.shape[0]) for u in order[l]}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def rank_correlations(maps: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Names and the symmetric matrix of pairwise Spearman correlations ``[n, n]`` (diagonal 1)."""
    names = list(maps)
    m = np.eye(len(names))
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            m[i, j] = m[j, i] = spearman(maps[a], maps[names[j]])
    return names, m


def prune_overlaps(maps: Mapping[str, np.ndarray], ratio: float) -> tuple[list[str], np.ndarray]:
    """Names and the ``[n, n]`` Jaccard matrix of the units each criterion would prune at ``ratio``."""
    names = list(maps)
    sets = {n: lowest_units(maps[n], ratio) for n in names}
    m = np.array([[jaccard(sets[a], sets[b]) for b in names] for a in names])
    return names, m


# ---- costs --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Costs:
    """Size and compute of one model (dense or planned): parameters, FLOPs/token and KV-cache bytes."""

    params: int
    non_embedding: int
    flops_per_token: int
    kv_bytes: int
    context: int

    def ratio(self, dense: "Costs") -> dict[str, float]:
        safe = lambda a, b: a / b if b else float("nan")  # noqa: E731
        return {"params": safe(self.params, dense.params), "flops": safe(self.flops_per_token, dense.flops_per_token),
                "kv": safe(self.kv_bytes, dense.kv_bytes)}


def dense_costs(model, context: int) -> Costs:
    """Exact costs of a (dense or physically pruned) model at ``context`` tokens."""
    return Costs(dense_params(model), dense_params(model, non_embedding=True),
                 flops_per_token(model, context), kv_cache_bytes(model, context), context)


def attention_flops_per_head(model, n_heads: int, context: int) -> list[float]:
    """Per layer, the attention FLOPs/token one of the ``n_heads`` query heads costs at ``context``."""
    return [2 * context * (w["q"] + w["o_in"]) / max(n_heads, 1) for w in attention_widths(model)]


def non_matmul_params(block) -> int:
    """Parameters of a decoder block outside its matmuls (norm weights; biases of projections are matmul)."""
    total = sum(p.numel() for p in block.parameters())
    matmul = sum(p.numel() for m in block.modules() if getattr(getattr(m, "weight", None), "ndim", 0) == 2
                 for p in m.parameters(recurse=False))
    return total - matmul


def plan_costs(model, plan: Plan, dense: Costs) -> Costs:
    """Estimated costs of ``plan`` on the dense ``model`` (see module docstring), without surgery."""
    g = plan.geometry
    params = plan.param_count(model)
    non_emb = plan.param_count(model, non_embedding=True)
    per_head = attention_flops_per_head(model, g.n_heads, dense.context)
    heads_gone = [len(plan.removed_heads_all(l)) for l in range(g.n_layers)]
    attn_saved = sum(f * n for f, n in zip(per_head, heads_gone))
    norms = non_matmul_params(adapter_for(model).layers(model)[0]) * len(plan.blocks)
    flops = dense.flops_per_token - 2 * (dense.non_embedding - non_emb - norms) - attn_saved
    kept_kv = sum(len(plan.kept("kv", l)) for l in plan.kept_blocks())
    kv = dense.kv_bytes * kept_kv / max(g.n_layers * g.n_kv, 1)
    return Costs(params, non_emb, int(round(flops)), int(round(kv)), dense.context)


# ---- selections and edits ------------------------------------------------------------------------------------------

def points_to_cells(points: Iterable[Mapping]) -> list[Cell]:
    """Cells ``(layer, first, stop)`` from Plotly selection points whose customdata is ``[layer, first, stop, ...]``.

    Streamlit returns customdata as a dict with string keys (``{"0": ..., "1": ...}``) or as a list.
    """
    cells = []
    for p in points or ():
        cd = p.get("customdata") if isinstance(p, Mapping) else None
        if cd is None:
            continue
        vals = [cd[str(i)] for i in range(len(cd))] if isinstance(cd, Mapping) else list(cd)
        if len(vals) >= 3:
            cells.append((int(vals[0]), int(vals[1]), int(vals[2])))
    return sorted(set(cells))


def edits_for_cells(plan: Plan, kind: str, cells: Iterable[Cell], action: str) -> list[Edit]:
    """Edits that ``action`` (remove / restore / toggle) makes on ``cells`` of ``kind``.

    A toggle restores a cell whose units are all removed and removes it otherwise (a half-removed channel bin
    becomes fully removed). Blocks use ``layer=None`` and the layer as index.
    """
    mask = removed_mask(plan, kind)
    edits: list[Edit] = []
    for layer, first, stop in cells:
        if kind == "block":
            gone = bool(mask[layer])
            remove = action == "remove" or (action == "toggle" and not gone)
            edits.append(("block", None, (layer,), remove))
            continue
        idx = tuple(range(first, stop))
        gone = bool(mask[layer, first:stop].all())
        remove = action == "remove" or (action == "toggle" and not gone)
        edits.append((kind, layer, idx, remove))
    return edits


def apply_edits(plan: Plan, edits: Iterable[Edit]) -> Plan:
    """``plan`` with every edit applied in order (each removes or restores units)."""
    for kind, layer, idx, remove in edits:
        plan = plan.with_units(kind, layer, idx, remove=remove)
    return plan


def kept_profile(plan: Plan) -> dict[str, np.ndarray]:
    """Kept share per layer of query heads, KV groups and MLP channels (0 for removed blocks), each ``[L]``."""
    g: Geometry = plan.geometry
    out = {}
    for kind in WIDTH_KINDS:
        n = unit_count(g, kind)
        out[kind] = np.array([0.0 if l in plan.blocks else len(plan.kept(kind, l)) / n for l in range(g.n_layers)])
    return out


# ---- heatmap data -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class View:
    """Which part of a map to draw: layer range, unit range (channels) and bin size (both ranges exclusive)."""

    layers: tuple[int, int] | None = None
    units: tuple[int, int] | None = None
    bin: int = 1


def heatmap_data(scores, kind: str, plan: Plan | None, scale: str = "score", view: View = View()):
    """Arrays for :func:`pruneviz.ui.figures.unit_heatmap` from a ``[L, U]`` score map.

    Returns ``(values, raw, removed_share, layers, cells)``: coloured values and raw scores (binned means),
    removed share per cell, the layer numbers of the rows and each column's unit range.
    """
    z = np.asarray(scores, dtype=float)  # [L, U]
    L, U = z.shape
    l0, l1 = view.layers or (0, L)
    u0, u1 = view.units or (0, U)
    sub = z[l0:l1, u0:u1]  # [l, u]
    mask = removed_mask(plan, kind)[l0:l1, u0:u1] if plan is not None else np.zeros_like(sub, dtype=bool)
    raw = bin_columns(sub, view.bin)
    removed = bin_columns(mask.astype(float), view.bin)
    values = colour_values(raw, scale)
    cells = bin_edges(u0, u1, view.bin)
    return values, raw, removed, list(range(l0, l1)), cells


# ---- perplexity table ---------------------------------------------------------------------------------------------

def ppl_rows(entry) -> list[dict]:
    """The rows of one evaluation's perplexity table (an :class:`pruneviz.ui.state.EvalRecord`): dense, pruned and
    (after LoRA recovery) pruned + LoRA, each with its parameter count, perplexity and the relative change against
    dense (None for dense)."""
    rows = [("dense", entry.dense_params, entry.dense_ppl), ("pruned", entry.params, entry.pruned_ppl)]
    if entry.lora_ppl is not None:
        rows.append(("pruned + LoRA", entry.params, entry.lora_ppl))
    dense = entry.dense_ppl
    return [{"model": name, "parameters": params, "perplexity": ppl,
             "vs dense": None if name == "dense" or not dense else ppl / dense - 1} for name, params, ppl in rows]
