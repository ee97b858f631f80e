"""Compare criteria unit by unit and configurations by their trade-offs.

- :func:`unit_scores`: one unit's score and rank under every computed criterion (the linked views of the
  Importance page);
- :func:`layer_histograms`: the distribution of a map's scores per layer;
- :func:`pareto_front`: the configurations no other one beats on two objectives (sweeps: perplexity or KL vs
  parameters or decoding speed).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .arch import unit_kind
from .errors import PlanError

__all__ = ["layer_histograms", "pareto_front", "tokens_per_s", "unit_scores"]


# ---- one unit under every criterion -------------------------------------------------------------------------------

def _rank(values: torch.Tensor, value: float) -> int:
    """1 + how many of ``values`` score strictly higher than ``value`` (1 = most important; ties share a rank)."""
    return 1 + int((values > value).sum())


def unit_scores(maps: Mapping[str, Any], layer: int, kind: str, index: int) -> list[dict]:
    """One row per map of ``maps`` (name -> :class:`~pruneviz.importance.ImportanceMap`) that scores ``kind``:
    the score of unit ``index`` of ``layer`` and its rank there.

    Row keys: ``criterion``; ``score``; ``rank`` (in its layer, 1 = most important, i.e. the highest score; ties
    share the better rank) of ``of`` units; ``model_rank`` of ``model_of`` among that kind's units of every layer;
    ``percentile``: the share of the layer's other units scored lower (1 = the layer's best, 0 = its worst, the
    Importance page's "rank" colour). For ``kind == "block"`` the unit is block ``layer`` (``index`` is ignored)
    and both ranks are among the blocks. A unit a criterion did not score (NaN) gets ``None`` ranks. Maps
    without ``kind`` are skipped; an index outside the map raises :class:`PlanError`.
    """
    u = unit_kind(kind)
    rows = []
    for name, imap in maps.items():
        scores = imap.get(u.name)
        if scores is None:
            continue
        scores = torch.as_tensor(scores, dtype=torch.float64)  # [L, U] or [L]
        if u.width:
            if not (0 <= layer < scores.shape[0] and 0 <= index < scores.shape[1]):
                raise PlanError(f"{u.label} {index} of layer {layer} is outside {name}'s map "
                                f"({scores.shape[0]} layers × {scores.shape[1]})")
            row, value = scores[layer], float(scores[layer, index])
        else:
            if not 0 <= layer < scores.shape[0]:
                raise PlanError(f"block {layer} is outside {name}'s map ({scores.shape[0]} blocks)")
            row, value = scores, float(scores[layer])
        rows.append(_row(name, value, row, scores))
    return rows


def _row(name: str, value: float, row: torch.Tensor, everything: torch.Tensor) -> dict:
    finite_row, finite_all = row[~row.isnan()], everything[~everything.isnan()]
    scored = not math.isnan(value)
    lower = int((finite_row < value).sum()) if scored else 0
    return {"criterion": name, "score": value,
            "rank": _rank(finite_row, value) if scored else None, "of": int(finite_row.numel()),
            "model_rank": _rank(finite_all, value) if scored else None, "model_of": int(finite_all.numel()),
            "percentile": lower / max(int(finite_row.numel()) - 1, 1) if scored else None}


def layer_histograms(scores, bins: int = 24, log: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer histograms of a map's scores ``[L, U]`` on common bins: ``(edges [bins + 1], counts [L, bins])``.

    With ``log`` the bins are on ``log10 |score|`` (zero scores at the smallest positive magnitude). NaNs are not
    counted. One common set of edges makes the layers comparable (what a stacked view needs)."""
    values = np.asarray(scores, dtype=float)
    values = values.reshape(1, -1) if values.ndim == 1 else values  # [L, U]
    if log:
        tiny = np.finfo(float).tiny
        values = np.log10(np.maximum(np.abs(values), tiny))
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    counts = np.stack([np.histogram(r[np.isfinite(r)], bins=edges)[0] for r in values])  # [L, bins]
    return edges, counts


# ---- Pareto fronts ------------------------------------------------------------------------------------------------

Field = str | Callable[[Any], Any]


def _value(point, field: Field) -> float | None:
    """``field`` of ``point``: a callable of the point, a key of a mapping or an attribute; None when absent."""
    if callable(field):
        v = field(point)
    elif isinstance(point, Mapping):
        v = point.get(field)
    else:
        v = getattr(point, field, None)
    if v is None or isinstance(v, bool):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def tokens_per_s(point) -> float | None:
    """Measured decoding speed of a sweep point (``1000 / ms_per_token``), None when its latency was not measured."""
    ms = _value(point, "ms_per_token")
    return 1000.0 / ms if ms else None


def pareto_front(points: Sequence, x: Field, y: Field, x_better: str = "low", y_better: str = "low") -> list[int]:
    """Indices of the points of ``points`` that no other point dominates on ``x`` and ``y``, ordered by ``x``.

    ``x`` and ``y`` name an attribute (or mapping key) of each point, or are functions of a point (e.g.
    :func:`tokens_per_s`); ``x_better`` / ``y_better`` say which direction is better ("low" or "high"). A point
    dominates another when it is at least as good on both and better on one; equal points are all on the front.
    Points whose ``x`` or ``y`` is missing or not finite are left out. ``O(n log n)``.
    """
    signs = []
    for name, better in (("x_better", x_better), ("y_better", y_better)):
        if better not in ("low", "high"):
            raise ValueError(f"{name} must be 'low' or 'high', not {better!r}")
        signs.append(1.0 if better == "low" else -1.0)
    cands = []
    for i, p in enumerate(points):
        vx, vy = _value(p, x), _value(p, y)
        if vx is not None and vy is not None:
            cands.append((signs[0] * vx, signs[1] * vy, i))  # both minimised from here on
    cands.sort()
    front, best_y, best_x = [], math.inf, None
    for vx, vy, i in cands:
        if vy < best_y or (vy == best_y and vx == best_x):  # better y than every point with smaller x, or a twin
            front.append(i)
            if vy < best_y:
                best_y, best_x = vy, vx
    return sorted(front, key=lambda i: _value(points[i], x))
