"""Plotly figure builders for the app: pure functions from arrays to ``go.Figure`` (no Streamlit calls).

Heatmaps put layers on y (layer 0 on top) and units on x. Plotly clicks and box selections on a ``Heatmap``
trace never reach Streamlit (streamlit#8760), so every selectable figure carries an invisible ``Scatter``
overlay with one marker per cell; its ``customdata`` is ``[layer, first unit, last unit + 1, score, removed
share]``, which :func:`pruneviz.ui.analysis.points_to_cells` reads back. The overlay must keep a
``hovertemplate`` (``hoverinfo="skip"`` would also disable its clicks); the heatmaps under it skip hover.
Removed units are drawn as a dark translucent layer with an x mark, so one figure shows both the scores and the
plan.
"""
from __future__ import annotations

import html
import math
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from ..arch import UNITS
from ..importance import available
from .analysis import View, heatmap_data, removed_mask

INK = "#1d2130"
PRIMARY = "#5b5bd6"
MUTED = "#9aa0b4"
SEQUENTIAL = "Viridis"
SERIES = ["#5b5bd6", "#12a594", "#e5484d", "#f5a524", "#8e4ec6", "#0090ff", "#d6409f", "#46a758"]
REMOVED_SCALE = [[0.0, "rgba(14,16,26,0.30)"], [1.0, "rgba(14,16,26,0.82)"]]
GL_THRESHOLD = 6000  # cells above which the overlay uses WebGL


def _base_layout(fig: go.Figure, title: str, height: int) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, x=0, xanchor="left", font=dict(size=15)),
        template="plotly_white", height=height, margin=dict(l=10, r=10, t=44, b=10),
        font=dict(color=INK), hoverlabel=dict(bgcolor="white", font=dict(color=INK)),
    )
    return fig


def _col_labels(cells: Sequence[tuple[int, int]]) -> list[str]:
    return [str(a) if b - a == 1 else f"{a}–{b - 1}" for a, b in cells]


def unit_heatmap(values: np.ndarray, scores: np.ndarray, removed: np.ndarray | None, layers: Sequence[int],
                 cells: Sequence[tuple[int, int]], *, unit_label: str, title: str, colorbar: str = "score",
                 selectable: bool = True, colorscale=SEQUENTIAL, zmid: float | None = None) -> go.Figure:
    """Layers x units heatmap.

    ``values`` ``[l, u]`` are what is coloured (e.g. scores, log10 or per-layer rank), ``scores`` ``[l, u]`` the
    raw numbers shown on hover, ``removed`` ``[l, u]`` the removed share of each cell (0..1, or None),
    ``layers`` the layer numbers of the rows and ``cells`` the unit range ``(first, last + 1)`` of each column
    (bins for channels). With ``selectable`` an invisible scatter overlay makes cells clickable (and carries the
    hover text); without it the heatmap itself shows each cell's layer, units, score and removed share on hover.
    """
    values, scores = np.asarray(values, dtype=float), np.asarray(scores, dtype=float)
    n_l, n_u = values.shape
    xs, labels = np.arange(n_u), _col_labels(cells)
    gap = 1 if n_u <= 32 else 0
    hover = {} if selectable else dict(customdata=_cell_custom(scores, removed, layers, cells),
                                       hovertemplate=_cell_template(unit_label, cells))
    fig = go.Figure(go.Heatmap(z=values, x=xs, y=list(layers), colorscale=colorscale, zmid=zmid,
                               colorbar=dict(title=dict(text=colorbar, side="right"), thickness=12),
                               xgap=gap, ygap=gap, name="scores", **(hover or dict(hoverinfo="skip"))))
    if removed is not None and np.any(removed > 0):
        _add_removed_layer(fig, np.asarray(removed, dtype=float), xs, layers, gap)
    if selectable:
        _add_cell_overlay(fig, scores, removed, layers, cells, unit_label)
    ticks = xs if n_u <= 16 else xs[::max(1, n_u // 8)]
    binned = any(b - a > 1 for a, b in cells)
    fig.update_xaxes(title=f"{unit_label} (cells of {cells[0][1] - cells[0][0]})" if binned else unit_label,
                     tickmode="array", tickvals=ticks,
                     ticktext=[labels[i] if n_u <= 16 else str(cells[i][0]) for i in ticks],
                     showgrid=False, zeroline=False, range=[-0.5, n_u - 0.5])
    fig.update_yaxes(title="layer", showgrid=False, zeroline=False, dtick=1 if n_l <= 32 else None,
                     range=[layers[-1] + 0.5, layers[0] - 0.5])  # layer 0 on top
    fig.update_layout(clickmode="event+select", hovermode="closest", hoverdistance=-1, dragmode="zoom")
    return _base_layout(fig, title, max(240, min(900, 22 * n_l + 110)))


def _add_removed_layer(fig: go.Figure, removed: np.ndarray, xs, layers, gap: int) -> None:
    shade = np.where(removed > 0, removed, np.nan)  # [l, u]
    fig.add_trace(go.Heatmap(z=shade, x=xs, y=list(layers), colorscale=REMOVED_SCALE, zmin=0, zmax=1,
                             showscale=False, xgap=gap, ygap=gap, hoverinfo="skip", name="removed"))
    if removed.size <= 1500:
        ly, ux = np.nonzero(removed >= 1.0)
        fig.add_trace(go.Scatter(x=xs[ux], y=np.asarray(layers)[ly], mode="markers", hoverinfo="skip",
                                 marker=dict(symbol="x-thin-open", size=9, color="white", line=dict(width=2)),
                                 showlegend=False, name="removed marks"))


def _cell_custom(scores: np.ndarray, removed, layers, cells) -> np.ndarray:
    """Per cell ``[layer, first unit, last unit + 1, score, removed share]``, shape ``[l, u, 5]``."""
    n_l, n_u = scores.shape
    yy, xx = np.mgrid[0:n_l, 0:n_u]  # [l, u] each
    first = np.array([a for a, _ in cells])[xx]
    stop = np.array([b for _, b in cells])[xx]
    share = np.zeros_like(scores) if removed is None else np.asarray(removed, dtype=float)
    return np.stack([np.asarray(layers)[yy], first, stop, scores, share], axis=-1)


def _cell_template(unit_label: str, cells) -> str:
    """Hover text of a cell from its :func:`_cell_custom` row."""
    many = any(b - a > 1 for a, b in cells)
    unit = f"{unit_label}s %{{customdata[1]}}–%{{customdata[2]}} (exclusive)" if many else \
        f"{unit_label} %{{customdata[1]}}"
    return (f"layer %{{customdata[0]}} · {unit}<br>score %{{customdata[3]:.4g}}"
            f"<br>removed %{{customdata[4]:.0%}}<extra></extra>")


def _add_cell_overlay(fig: go.Figure, scores: np.ndarray, removed, layers, cells, unit_label: str) -> None:
    n_l, n_u = scores.shape
    yy, xx = np.mgrid[0:n_l, 0:n_u]  # [l, u] each
    custom = _cell_custom(scores, removed, layers, cells).reshape(-1, 5)
    template = _cell_template(unit_label, cells)
    trace = go.Scattergl if n_l * n_u > GL_THRESHOLD else go.Scatter
    fig.add_trace(trace(x=xx.ravel(), y=np.asarray(layers)[yy].ravel(), mode="markers", customdata=custom,
                        hovertemplate=template, showlegend=False, name="cells",
                        marker=dict(symbol="square", size=10, opacity=0.01, color=INK),
                        selected=dict(marker=dict(opacity=0.01)), unselected=dict(marker=dict(opacity=0.01))))


def block_values(scores: np.ndarray, scale: str = "score") -> tuple[np.ndarray, str]:
    """What the block chart plots for "Colour by" ``scale``: the scores, their rank among the blocks (0 = least
    important, 1 = most) or log10 of their magnitude (one outlier block no longer flattens the others), and the
    axis label's prefix."""
    scores = np.asarray(scores, dtype=float)
    if scale == "rank" and scores.size > 1:
        return np.argsort(np.argsort(scores, kind="stable"), kind="stable") / (scores.size - 1), "rank of "
    if scale == "log10":
        tiny = np.finfo(float).tiny
        return np.log10(np.maximum(np.abs(scores), tiny)), "log10 |"
    return scores, ""


def block_chart(scores: np.ndarray, removed: np.ndarray | None, *, title: str, score_label: str = "score",
                selectable: bool = True, scale: str = "score") -> go.Figure:
    """Whole-block scores as a lollipop chart: one stem per layer, grey when removed; dots are clickable.
    ``scale`` (score, rank, log10) is what the stems show (:func:`block_values`); hover shows the raw score."""
    raw = np.asarray(scores, dtype=float)
    scores, prefix = block_values(raw, scale)
    score_label = f"{prefix}{score_label}{'|' if prefix == 'log10 |' else ''}"
    L = scores.shape[0]
    gone = np.zeros(L, bool) if removed is None else np.asarray(removed, bool)
    colors = np.where(gone, MUTED, PRIMARY)
    layers = np.arange(L)
    span = float(np.ptp(scores)) if L else 0.0
    floor = float(scores.min()) - 0.15 * (span or abs(float(scores.min())) or 1.0)  # stems start below the lowest
    fig = go.Figure(go.Bar(x=layers, y=scores - floor, base=floor, marker=dict(color=colors), width=0.18,
                           hoverinfo="skip", name="score", showlegend=False))
    custom = np.stack([layers, layers, layers + 1, raw, gone.astype(float)], axis=-1)
    fig.add_trace(go.Scatter(
        x=layers, y=scores, mode="markers", customdata=custom, name="blocks", showlegend=False,
        marker=dict(size=13, color=colors, line=dict(color="white", width=2),
                    symbol=np.where(gone, "x", "circle").tolist()),
        hovertemplate="block %{x}<br>score %{customdata[3]:.4g}" + (f"<br>{score_label} %{{y:.3g}}" if prefix else "")
                      + "<br>removed %{customdata[4]:.0%}<extra></extra>",
        selected=dict(marker=dict(opacity=1)), unselected=dict(marker=dict(opacity=1))))
    fig.update_xaxes(title="block (layer)", dtick=1 if L <= 40 else None, showgrid=False, range=[-0.5, L - 0.5])
    fig.update_yaxes(title=score_label, zeroline=False)
    if selectable:
        fig.update_layout(clickmode="event+select", hovermode="x", dragmode="zoom")
    return _base_layout(fig, title, 300)


def matrix_figure(names: Sequence[str], matrix: np.ndarray, *, title: str, zmin: float, zmax: float,
                  colorscale, zmid: float | None = None, colorbar: str = "") -> go.Figure:
    """Annotated square matrix (criterion x criterion): rank correlations or prune-set overlaps."""
    m = np.asarray(matrix, dtype=float)
    text = [["–" if math.isnan(v) else f"{v:.2f}" for v in row] for row in m]
    fig = go.Figure(go.Heatmap(z=m, x=list(names), y=list(names), zmin=zmin, zmax=zmax, zmid=zmid,
                               colorscale=colorscale, text=text, texttemplate="%{text}",
                               colorbar=dict(title=dict(text=colorbar), thickness=12),
                               hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>", xgap=2, ygap=2))
    fig.update_yaxes(autorange="reversed")
    return _base_layout(fig, title, max(260, 70 * len(names) + 90))


def correlation_figure(names: Sequence[str], matrix: np.ndarray, kind_label: str) -> go.Figure:
    return matrix_figure(names, matrix, title=f"Rank correlation of {kind_label} scores (Spearman ρ)",
                         zmin=-1, zmax=1, zmid=0, colorscale="RdBu", colorbar="ρ")


def overlap_figure(names: Sequence[str], matrix: np.ndarray, kind_label: str, ratio: float) -> go.Figure:
    return matrix_figure(names, matrix, title=f"Overlap of the {ratio:.0%} lowest {kind_label} per layer "
                         f"(Jaccard)", zmin=0, zmax=1, colorscale="Blues", colorbar="J")


def kept_profile_figure(profile: Mapping[str, np.ndarray], title: str = "Kept per layer") -> go.Figure:
    """Grouped bars of the kept share per layer for query heads, KV groups and MLP channels."""
    fig = go.Figure()
    for i, (kind, share) in enumerate(profile.items()):
        name = UNITS[kind].plural
        fig.add_trace(go.Bar(x=np.arange(len(share)), y=share, name=name, marker_color=SERIES[i % len(SERIES)],
                             hovertemplate=f"layer %{{x}}: %{{y:.0%}} of {name} kept<extra></extra>"))
    fig.update_layout(barmode="group", bargap=0.25, legend=dict(orientation="h", y=1.12, x=1, xanchor="right"))
    fig.update_yaxes(tickformat=".0%", range=[0, 1.05], title="kept")
    fig.update_xaxes(title="layer", dtick=1 if len(next(iter(profile.values()), [])) <= 40 else None)
    return _base_layout(fig, title, 280)


def sweep_figure(points: Sequence, y: str = "ppl", dense=None) -> go.Figure:
    """Perplexity (or the field ``y``) vs parameters, one line per criterion, of
    :class:`pruneviz.evaluate.SweepPoint` s (``dense``: the dense model's point, drawn as a star)."""
    fig = go.Figure()
    by_crit: dict[str, list] = {}
    for p in points:
        if getattr(p, y) is not None:
            by_crit.setdefault(p.criterion, []).append(p)
    for i, (crit, pts) in enumerate(sorted(by_crit.items())):
        pts = sorted(pts, key=lambda p: p.params)
        fig.add_trace(go.Scatter(
            x=[p.params / 1e6 for p in pts], y=[getattr(p, y) for p in pts], mode="lines+markers", name=crit,
            line=dict(color=SERIES[i % len(SERIES)], width=2), marker=dict(size=8),
            customdata=[[p.ratio] for p in pts],
            hovertemplate=f"{crit}<br>ratio %{{customdata[0]:.0%}}<br>%{{x:.2f}} M params<br>{y} %{{y:.4g}}"
                          "<extra></extra>"))
    if dense is not None and getattr(dense, y) is not None:
        fig.add_trace(go.Scatter(x=[dense.params / 1e6], y=[getattr(dense, y)], mode="markers", name="dense",
                                 marker=dict(symbol="star", size=15, color=INK),
                                 hovertemplate=f"dense<br>%{{x:.2f}} M params<br>{y} %{{y:.4g}}<extra></extra>"))
    label = {"ppl": "perplexity (log scale)", "ms_per_token": "latency, ms / token",
             "kl_mean": "KL(dense || pruned) per token"}.get(y, y)
    fig.update_yaxes(title=label, type="log" if y == "ppl" else "linear")
    fig.update_xaxes(title="parameters (millions)")
    fig.update_layout(legend=dict(orientation="h", y=1.12, x=1, xanchor="right"))
    title = {"ppl": "Perplexity vs parameters", "ms_per_token": "Latency vs parameters",
             "kl_mean": "KL to the dense model vs parameters"}.get(y, y)
    return _base_layout(fig, title, 380)


def loss_figure(losses: Sequence[float], title: str = "LoRA training loss") -> go.Figure:
    """Training loss per step of a recovery run, with its moving average over about 5% of the steps."""
    y = np.asarray(losses, dtype=float)
    steps = np.arange(1, len(y) + 1)
    fig = go.Figure(go.Scatter(x=steps, y=y, mode="lines+markers" if len(y) <= 60 else "lines", name="per step",
                               line=dict(color=MUTED, width=1), marker=dict(size=5),
                               hovertemplate="step %{x}<br>loss %{y:.4f}<extra></extra>"))
    w = max(1, len(y) // 20)
    if w > 1:
        fig.add_trace(go.Scatter(x=steps[w - 1:], y=np.convolve(y, np.ones(w) / w, mode="valid"), mode="lines",
                                 name=f"mean of {w} steps", line=dict(color=PRIMARY, width=2.5),
                                 hovertemplate=f"steps %{{x}}: mean of {w}<br>loss %{{y:.4f}}<extra></extra>"))
    fig.update_xaxes(title="step", tickformat="d", dtick=1 if len(y) <= 12 else None)  # whole steps only
    fig.update_yaxes(title="cross-entropy (nats / token)")
    fig.update_layout(legend=dict(orientation="h", y=1.12, x=1, xanchor="right"))
    return _base_layout(fig, title, 300)


def _loss_colour(delta: float, scale: float) -> str:
    if not math.isfinite(delta) or scale <= 0:
        return "transparent"
    a = min(abs(delta) / scale, 1.0) * 0.75
    return f"rgba(229,72,77,{a:.2f})" if delta > 0 else f"rgba(0,144,255,{a:.2f})"


def token_diff_html(tokens: Sequence[str], dense_nll: Sequence[float], pruned_nll: Sequence[float]) -> str:
    """Text with each token shaded by its loss change (pruned - dense): red = pruned worse, blue = better.

    Hovering a token shows both losses. The colour saturates at the 95th percentile of |change|.
    """
    deltas = np.array([p - d for d, p in zip(dense_nll, pruned_nll)], dtype=float)
    finite = np.abs(deltas[np.isfinite(deltas)])
    scale = float(np.percentile(finite, 95)) if finite.size else 1.0
    spans = []
    for tok, d, p, dl in zip(tokens, dense_nll, pruned_nll, deltas):
        text = html.escape(tok).replace("\n", "↵<br>")
        tip = html.escape(f"{tok!r}: dense {d:.2f}, pruned {p:.2f}, Δ {dl:+.2f} nats")
        spans.append(f'<span title="{tip}" style="background:{_loss_colour(dl, scale)};'
                     f'border-radius:3px;padding:1px 0">{text}</span>')
    return ('<div style="font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:0.9rem;'
            'line-height:1.9;white-space:pre-wrap;word-break:break-word">' + "".join(spans) + "</div>")


# ---- from importance maps ------------------------------------------------------------------------------------------

def score_label(criterion: str) -> str:
    """Colour-bar label: what the criterion's numbers are (``Criterion.score_label``; "score" when unknown)."""
    crit = available().get(criterion)
    return crit.score_label if crit is not None else "score"


def map_title(criterion: str, title: str, kind_plural: str) -> str:
    """A map's title; a solver's map (``Criterion.is_solver``) says it is the dense-model quantity it ranks by."""
    crit = available().get(criterion)
    suffix = f" — dense-model {crit.score_label}" if crit is not None and crit.is_solver else ""
    return f"{title}: {kind_plural}{suffix}"


def importance_figure(imap, kind: str, plan=None, scale: str = "score", view=None, selectable: bool = False,
                      title: str | None = None) -> go.Figure | None:
    """Heatmap (or block chart) of one map of an :class:`~pruneviz.importance.ImportanceMap`; None if absent.

    ``kind`` is head / kv / channel / block; ``plan`` (optional) is drawn as removed cells; ``view`` an
    :class:`pruneviz.ui.analysis.View` (layer/unit zoom and channel bins).
    """
    scores = imap.get(kind)
    if scores is None:
        return None
    label = score_label(imap.criterion)
    title = title or map_title(imap.criterion, imap.criterion, UNITS[kind].plural)
    if kind == "block":
        removed = removed_mask(plan, "block") if plan is not None else None
        return block_chart(scores.numpy(), removed, title=title, score_label=label, selectable=selectable,
                           scale=scale)
    values, raw, removed, layers, cells = heatmap_data(scores.numpy(), kind, plan, scale, view or View())
    bar = {"score": label, "rank": "rank in layer", "log10": f"log10 {label}"}[scale]
    return unit_heatmap(values, raw, removed, layers, cells, unit_label=UNITS[kind].label, title=title,
                        colorbar=bar, selectable=selectable)
