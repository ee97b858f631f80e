"""The Importance page's maps of one unit kind with linked views: click a unit to see its score and rank under
every computed criterion (:func:`pruneviz.compare.unit_scores`) and where it sits in its layer's score
distribution (:func:`pruneviz.ui.linked.histogram_figure`); optionally all maps in one figure with one colour
scale and synced zoom (:func:`pruneviz.ui.linked.linked_maps_figure`).

The selected unit lives in ``session_state`` under ``imp_sel_<kind>_layer`` / ``imp_sel_<kind>_index`` (the
number inputs of :func:`selected_unit`); a click on any map of the kind sets them (chart callbacks run before
the rerun, so the inputs show the clicked unit).
"""
from __future__ import annotations

from functools import partial

import pandas as pd
import streamlit as st

from ..arch import UNITS, Geometry, unit_count
from ..compare import unit_scores
from ..importance import available
from . import analysis, components, figures, linked

CONFIG = {"displaylogo": False}


def _title(name: str) -> str:
    crit = available().get(name)
    return crit.title if crit is not None else name


def _keys(kind: str) -> tuple[str, str]:
    return f"imp_sel_{kind}_layer", f"imp_sel_{kind}_index"


def on_select(kind: str, chart_key: str) -> None:
    """Chart callback: the first clicked cell of a ``kind`` map becomes the selected unit."""
    event = st.session_state.get(chart_key) or {}
    cells = analysis.points_to_cells((event.get("selection") or {}).get("points"))
    if cells:
        layer, first, _ = cells[0]
        k_layer, k_index = _keys(kind)
        st.session_state[k_layer], st.session_state[k_index] = layer, first


def kind_maps(imaps: dict, names: list[str], kind: str, plan, scale: str, view, linked_view: bool,
              shared_colour: bool = True) -> None:
    """The maps of ``names`` for ``kind``: two per row (each its own figure), or with ``linked_view`` one figure
    with linked axes (and, with ``shared_colour``, one colour scale). Every map's units are clickable."""
    if linked_view and kind != "block" and len(names) > 1:
        panels = []
        for name in names:
            values, raw, removed, layers, cells = analysis.heatmap_data(imaps[name].get(kind).numpy(), kind, plan,
                                                                        scale, view or analysis.View())
            panels.append(dict(title=_title(name), values=values, raw=raw, removed=removed, layers=layers,
                               cells=cells))
        label = figures.score_label(names[0])
        bar = {"score": label, "rank": "rank in layer", "log10": f"log10 {label}"}[scale]
        key = f"imp_linked_{kind}"
        st.plotly_chart(linked.linked_maps_figure(panels, unit_label=UNITS[kind].label, colorbar=bar,
                                                  shared_colour=shared_colour, title=f"{UNITS[kind].plural}: "
                                                  "linked maps (zoom one, all follow)"),
                        key=key, on_select=partial(on_select, kind, key), selection_mode="points", config=CONFIG)
        return
    for start in range(0, len(names), 2):
        cols = st.columns(2 if len(names) > 1 else 1)
        for col, name in zip(cols, names[start:start + 2]):
            fig = figures.importance_figure(imaps[name], kind, plan, scale, view, selectable=True,
                                            title=figures.map_title(name, _title(name), UNITS[kind].plural))
            key = f"imp_fig_{kind}_{name}"
            col.plotly_chart(fig, key=key, on_select=partial(on_select, kind, key), selection_mode="points",
                             config=CONFIG)
            col.caption(components.map_caption(imaps[name]))


def selected_unit(imaps: dict, kind: str, g: Geometry, scale: str) -> None:
    """The selected unit of ``kind``: its score and rank under every computed criterion, and (for heads, KV groups
    and channels) each layer's score distribution with the unit marked."""
    k_layer, k_index = _keys(kind)
    n_units = unit_count(g, kind) if kind != "block" else 1
    for key, n in ((k_layer, g.n_layers), (k_index, n_units)):
        if st.session_state.get(key) is not None and not 0 <= st.session_state[key] < n:
            del st.session_state[key]
    with st.container(border=True):
        c1, c2, c3 = st.columns([1, 1, 2], vertical_alignment="bottom")
        label = UNITS[kind].label
        layer = int(c1.number_input("Block" if kind == "block" else "Layer", 0, g.n_layers - 1, key=k_layer))
        index = 0 if kind == "block" else int(c2.number_input(label.capitalize(), 0, n_units - 1, key=k_index))
        c3.caption(f"Click a {label} on any map above (or type it here) to compare its score and rank under "
                   "every computed criterion.")
        rows = unit_scores(imaps, layer, kind, index)
        for r in rows:
            r["criterion"] = _title(r["criterion"])
        st.dataframe(pd.DataFrame(rows), hide_index=True, key=f"imp_sel_table_{kind}",
                     placeholder=analysis.MISSING, column_config={
            "score": st.column_config.NumberColumn(format="%.4g"),
            "rank": st.column_config.NumberColumn("rank in layer", help="1 = most important (highest score)"),
            "of": st.column_config.NumberColumn("of"),
            "model_rank": st.column_config.NumberColumn("rank in model"),
            "model_of": st.column_config.NumberColumn("of "),
            "percentile": st.column_config.ProgressColumn("better than (in layer)", format="percent",
                                                          min_value=0.0, max_value=1.0)})
        if kind == "block":
            return
        names = [n for n in imaps if imaps[n].get(kind) is not None]
        name = st.selectbox("Score histograms per layer of", names, format_func=_title, key=f"imp_hist_{kind}")
        if name is None:
            return
        scores = imaps[name].get(kind)
        st.plotly_chart(linked.histogram_figure(scores.numpy(), title=f"{_title(name)}: {UNITS[kind].plural} "
                                                f"score distribution per layer", score_label=figures.score_label(name),
                                                log=scale == "log10", mark=(layer, float(scores[layer, index]))),
                        key=f"imp_hist_fig_{kind}", config=CONFIG)
