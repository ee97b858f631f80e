"""Plotly figures for the linked views (Importance), the Pareto view (Evaluate) and the Inspect page.

Pure functions from arrays and library results to ``go.Figure`` (no Streamlit calls), like
:mod:`pruneviz.ui.figures`, whose heatmaps they reuse: a selectable map keeps its invisible overlay of clickable
cells (``customdata = [layer, first unit, last unit + 1, score, removed share]``, read back by
:func:`pruneviz.ui.analysis.points_to_cells`).

- :func:`linked_maps_figure`: several maps of one unit kind side by side in *one* figure, so their axes are
  linked (zooming one zooms all) and they can share one colour scale;
- :func:`histogram_figure`: each layer's score distribution on common bins, with a selected unit marked;
- :func:`pareto_figure`: perplexity (or KL) vs parameters or measured tokens/s, one trace per criterion and
  allocation, the Pareto front drawn over them and the current plan marked;
- :func:`attention_figure`, :func:`layer_unit_figure`, :func:`layer_bar_figure`: what :mod:`pruneviz.inspection`
  measured.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..compare import layer_histograms, pareto_front
from .figures import INK, MUTED, PRIMARY, SEQUENTIAL, SERIES, unit_heatmap

DIVERGING = "RdBu"


def _layout(fig: go.Figure, title: str, height: int) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0, xanchor="left", font=dict(size=15)), template="plotly_white",
                      height=height, margin=dict(l=10, r=10, t=44, b=10), font=dict(color=INK),
                      hoverlabel=dict(bgcolor="white", font=dict(color=INK)))
    return fig


# ---- linked maps --------------------------------------------------------------------------------------------------

def shared_range(values: Sequence[np.ndarray]) -> tuple[float, float]:
    """One colour range over several maps' values (finite ones; ``(0, 1)`` when there are none)."""
    finite = [v[np.isfinite(v)] for v in (np.asarray(x, dtype=float) for x in values)]
    finite = [f for f in finite if f.size]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(float(f.min()) for f in finite), max(float(f.max()) for f in finite)
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def linked_maps_figure(panels: Sequence[dict], *, unit_label: str, colorbar: str, shared_colour: bool = True,
                       title: str = "") -> go.Figure:
    """Maps side by side in one figure with linked axes (zoom or pan one, all follow).

    Each panel is a dict with ``title`` and the arrays of :func:`pruneviz.ui.analysis.heatmap_data`: ``values``,
    ``raw``, ``removed``, ``layers``, ``cells`` (every panel of one kind and view, so the axes are the same). With
    ``shared_colour`` every map is coloured on one scale (one colour bar, the range of all of them); without, each
    keeps its own range. Cells stay clickable (the overlay of :func:`pruneviz.ui.figures.unit_heatmap`).
    """
    n = len(panels)
    fig = make_subplots(rows=1, cols=n, shared_yaxes=True, horizontal_spacing=0.02 if n > 1 else 0.0,
                        subplot_titles=[p["title"] for p in panels])
    lo, hi = shared_range([p["values"] for p in panels])
    for j, p in enumerate(panels, start=1):
        single = unit_heatmap(p["values"], p["raw"], p["removed"], p["layers"], p["cells"], unit_label=unit_label,
                              title="", colorbar=colorbar, selectable=True)
        for trace in single.data:
            if trace.name == "scores":
                if shared_colour:
                    trace.update(coloraxis="coloraxis", showscale=None)
                else:
                    trace.update(showscale=False)
            fig.add_trace(trace, row=1, col=j)
        fig.update_xaxes(single.layout.xaxis, row=1, col=j)
        fig.update_xaxes(title=unit_label if j == (n + 1) // 2 else None, row=1, col=j)
    layers = panels[0]["layers"]
    fig.update_yaxes(title=None, showgrid=False, zeroline=False, range=[layers[-1] + 0.5, layers[0] - 0.5])
    fig.update_yaxes(title="layer", row=1, col=1)
    fig.update_xaxes(matches="x")  # one zoom for every map
    if shared_colour:
        fig.update_layout(coloraxis=dict(colorscale=SEQUENTIAL, cmin=lo, cmax=hi,
                                         colorbar=dict(title=dict(text=colorbar, side="right"), thickness=12)))
    fig.update_layout(clickmode="event+select", hovermode="closest", hoverdistance=-1, dragmode="zoom",
                      showlegend=False)
    return _layout(fig, title, max(260, min(900, 22 * len(layers) + 130)))


def histogram_figure(scores, *, title: str, score_label: str = "score", log: bool = False, bins: int = 24,
                     mark: tuple[int, float] | None = None) -> go.Figure:
    """Each layer's score distribution (rows: layers, columns: common score bins, colour: share of the layer's
    units in the bin) for a ``[L, U]`` map; ``mark = (layer, score)`` draws the selected unit."""
    edges, counts = layer_histograms(scores, bins=bins, log=log)  # [B + 1], [L, B]
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # [L, B]
    centres = (edges[:-1] + edges[1:]) / 2
    layers = np.arange(counts.shape[0])
    label = f"log10 |{score_label}|" if log else score_label
    fig = go.Figure(go.Heatmap(
        z=share, x=centres, y=layers, colorscale="Blues", zmin=0, customdata=counts,
        colorbar=dict(title=dict(text="share of layer", side="right"), thickness=12, tickformat=".0%"),
        hovertemplate=f"layer %{{y}}<br>{label} ≈ %{{x:.3g}}<br>%{{customdata}} units (%{{z:.0%}})<extra></extra>"))
    if mark is not None and np.isfinite(mark[1]):
        x = float(np.log10(max(abs(mark[1]), np.finfo(float).tiny))) if log else float(mark[1])
        fig.add_trace(go.Scatter(x=[x], y=[mark[0]], mode="markers", name="selected", showlegend=False,
                                 marker=dict(symbol="diamond", size=13, color="#e5484d", line=dict(color="white",
                                                                                                   width=2)),
                                 hovertemplate=f"selected unit<br>{label} %{{x:.4g}}<extra></extra>"))
    fig.update_xaxes(title=label, showgrid=False)
    fig.update_yaxes(title="layer", autorange="reversed", dtick=1 if len(layers) <= 32 else None, showgrid=False)
    return _layout(fig, title, max(240, min(700, 18 * len(layers) + 120)))


# ---- Pareto view --------------------------------------------------------------------------------------------------

Axis = str | Callable


def _get(p, field: Axis):
    v = field(p) if callable(field) else getattr(p, field, None)
    return None if v is None or not np.isfinite(float(v)) else float(v)


def pareto_figure(points: Sequence, x: Axis, y: Axis, *, x_label: str, y_label: str, x_better: str = "low",
                  current: Sequence = (), dense=None, log_y: bool = False, x_scale: float = 1.0,
                  title: str = "") -> go.Figure:
    """Sweep points (:class:`pruneviz.evaluate.SweepPoint`) as a trade-off plot: one trace per criterion and
    allocation (``what``), the Pareto front (:func:`pruneviz.compare.pareto_front`, lower ``y`` better, ``x`` as
    ``x_better`` says) as a dashed line through its points, ``current`` (points of the current plan) as rings and
    ``dense`` as a star. ``x`` / ``y`` are attribute names or functions of a point; ``x_scale`` divides ``x`` for
    display (1e6: millions)."""
    fig = go.Figure()
    groups: dict[tuple[str, str], list] = {}
    for p in points:
        if _get(p, x) is not None and _get(p, y) is not None:
            groups.setdefault((p.criterion, p.what), []).append(p)
    for i, ((crit, what), pts) in enumerate(sorted(groups.items())):
        pts = sorted(pts, key=lambda p: _get(p, x))
        fig.add_trace(go.Scatter(
            x=[_get(p, x) / x_scale for p in pts], y=[_get(p, y) for p in pts], mode="lines+markers",
            name=f"{crit} · {what}", line=dict(color=SERIES[i % len(SERIES)], width=1.5), marker=dict(size=8),
            customdata=[[p.ratio] for p in pts],
            hovertemplate=f"{crit} · {what} %{{customdata[0]:.0%}}<br>{x_label} %{{x:.4g}}<br>{y_label} %{{y:.4g}}"
                          "<extra></extra>"))
    every = [p for pts in groups.values() for p in pts] + ([dense] if dense is not None else [])
    front = [every[i] for i in pareto_front(every, x, y, x_better=x_better)]
    if front:
        fig.add_trace(go.Scatter(
            x=[_get(p, x) / x_scale for p in front], y=[_get(p, y) for p in front], mode="lines+markers",
            name="Pareto front", line=dict(color=INK, width=2, dash="dash", shape="hv" if x_better == "low" else "vh"),
            marker=dict(size=12, color="rgba(0,0,0,0)", line=dict(color=INK, width=2)), hoverinfo="skip"))
    if dense is not None and _get(dense, x) is not None and _get(dense, y) is not None:
        fig.add_trace(go.Scatter(x=[_get(dense, x) / x_scale], y=[_get(dense, y)], mode="markers", name="dense",
                                 marker=dict(symbol="star", size=15, color=INK),
                                 hovertemplate=f"dense<br>{x_label} %{{x:.4g}}<br>{y_label} %{{y:.4g}}<extra></extra>"))
    mine = [p for p in current if _get(p, x) is not None and _get(p, y) is not None]
    if mine:
        fig.add_trace(go.Scatter(x=[_get(p, x) / x_scale for p in mine], y=[_get(p, y) for p in mine],
                                 mode="markers", name="current plan",
                                 marker=dict(symbol="circle-open", size=20, color="#e5484d", line=dict(width=3)),
                                 hovertemplate=f"current plan<br>{x_label} %{{x:.4g}}<br>{y_label} %{{y:.4g}}"
                                               "<extra></extra>"))
    fig.update_xaxes(title=x_label)
    fig.update_yaxes(title=y_label + (" (log scale)" if log_y else ""), type="log" if log_y else "linear")
    fig.update_layout(legend=dict(orientation="h", y=-0.18, x=0), hovermode="closest")
    return _layout(fig, title or f"{y_label} vs {x_label}", 440)


# ---- Inspect page -------------------------------------------------------------------------------------------------

def _labels(tokens: Sequence[str]) -> list[str]:
    """Unique axis labels: ``position: token`` (tokens repeat; plotly would merge equal category labels)."""
    return [f"{i}: {t!r}"[:24] for i, t in enumerate(tokens)]


def attention_figure(pattern, tokens: Sequence[str], *, title: str) -> go.Figure:
    """One head's attention pattern ``[T, T]``: row = query position, column = key position it reads."""
    z = np.asarray(pattern, dtype=float)
    labels = _labels(tokens)
    z = np.where(np.triu(np.ones_like(z, dtype=bool), 1), np.nan, z)  # nothing to show above the diagonal
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=labels, colorscale="Purples", zmin=0, zmax=float(np.nanmax(z)) or 1,
                               colorbar=dict(title=dict(text="attention", side="right"), thickness=12),
                               hovertemplate="query %{y}<br>reads %{x}<br>weight %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title="query position", showgrid=False)
    fig.update_xaxes(title="key position", showgrid=False, tickangle=-60)
    return _layout(fig, title, max(320, min(800, 14 * len(labels) + 160)))


def layer_unit_figure(values, *, title: str, unit_label: str, colorbar: str, diverging: bool = False) -> go.Figure:
    """Layers × units (e.g. query heads) of one measured quantity ``[L, U]``; cells are clickable (the
    :func:`pruneviz.ui.figures.unit_heatmap` overlay). ``diverging``: a red/blue scale centred on 0."""
    v = np.asarray(values, dtype=float)
    L, U = v.shape
    lim = float(np.nanmax(np.abs(v))) if diverging and np.isfinite(v).any() else None
    fig = unit_heatmap(v, v, None, list(range(L)), [(u, u + 1) for u in range(U)], unit_label=unit_label,
                       title=title, colorbar=colorbar, selectable=True,
                       colorscale=DIVERGING if diverging else SEQUENTIAL, zmid=0.0 if diverging else None)
    if lim:
        fig.update_traces(zmin=-lim, zmax=lim, selector=dict(name="scores"))
    return fig


def layer_bar_figure(series: dict[str, np.ndarray], *, title: str, y_label: str) -> go.Figure:
    """One value per layer for each named series (e.g. MLP output norm, attention output norm)."""
    fig = go.Figure()
    for i, (name, vals) in enumerate(series.items()):
        v = np.asarray(vals, dtype=float)
        fig.add_trace(go.Bar(x=np.arange(len(v)), y=v, name=name, marker_color=[PRIMARY, SERIES[1], MUTED][i % 3],
                             hovertemplate=f"layer %{{x}}<br>{name} %{{y:.4g}}<extra></extra>"))
    n = len(next(iter(series.values()), []))
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=1.12, x=1, xanchor="right"))
    fig.update_xaxes(title="layer", dtick=1 if n <= 40 else None)
    fig.update_yaxes(title=y_label)
    return _layout(fig, title, 300)
