"""Importance page: run criteria on calibration text, see their maps side by side, compare them."""
import pandas as pd
import streamlit as st

from pruneviz.arch import UNITS, geometry_of
from pruneviz.importance import available, usable_criteria
from pruneviz.ui import analysis, background, figures, jobs_panel, services, state, unit_views
from pruneviz.ui import components as ui
from pruneviz.ui.work import show_error

loaded = ui.page("Importance", "How much each query head, KV group, MLP channel and block matters, by several "
                 "criteria. Higher = more important = kept longer.")
ui.exported_gate(loaded, "score its units here", "imp")
g = geometry_of(loaded.model)
crits, offered = available(), usable_criteria(loaded.model)

# ==== 1. criteria ====================================================================================================
st.subheader("1 · Criteria", anchor=False)
names = st.pills("Criteria", list(offered), selection_mode="multi", default=["magnitude"] if "magnitude" in offered
                 else list(offered)[:1], format_func=lambda n: crits[n].title, key="imp_criteria",
                 help="Pick one or more; each gives its own maps.")
if len(offered) < len(crits):
    st.caption(":material/storage: This model is offloaded, so only criteria that run one block at a time are "
               "offered; " + ", ".join(c.title for n, c in crits.items() if n not in offered) + " need the whole "
               "model in memory (load it without offloading on a larger device).")
options = {}
for name in names:
    crit = crits[name]
    flags = " · ".join(x for x in ("needs calibration text" if crit.needs_calibration else "weights only",
                                   "backpropagates (training-size memory)" if crit.uses_gradients else "",
                                   "maps: " + ", ".join(crit.produces)) if x)
    with st.expander(f"{crit.title}", icon=":material/tune:"):
        st.caption(f"{crit.paper or ''}  \n{flags}")
        if crit.is_solver:
            st.info(f"{crit.title.split(' (')[0]} is a solver: this map is the *dense-model {crit.score_label}* of "
                    "each unit. Its real plans come from the solver on the Prune page.", icon=":material/info:")
        try:
            options[name] = ui.criterion_options(crit, "imp_opt")
        except Exception as e:  # noqa: BLE001 - bad option values: say which
            show_error(e)

# ==== 2. calibration =================================================================================================
needs_cal = any(crits[n].needs_calibration for n in names)
st.subheader("2 · Calibration", anchor=False)
with st.container(border=True):
    if not needs_cal and names:
        st.caption("The selected criteria read only the weights; calibration text is not used.")
    cfg = ui.calibration_controls(loaded, "imp_cal")

# ==== 3. estimate and run ============================================================================================
rows = []
for name in names:
    if name not in options:
        continue
    try:
        e = services.estimate(loaded, crits[name], options[name], cfg.n_samples, cfg.seq_len)
    except Exception as err:  # noqa: BLE001
        show_error(err)
        continue
    rows.append({"criterion": crits[name].title, "forward tokens": e["tokens"],
                 "backward": "yes" if e["backward"] else "no",
                 "≈ time": ui.human_seconds(e["seconds"]) + (" (from your last run)" if e["measured"] else ""),
                 "≈ extra memory": ui.human_bytes(e["extra_bytes"]) if e["extra_bytes"] else "small"})
if rows:
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="imp_estimate", placeholder=analysis.MISSING)
    st.caption("Times come from your last run of each criterion on this model when there is one, else from a "
               "forward pass timed here at this window length; repeated settings come from the cache.")

busy = jobs_panel.running("scoring")
run = st.button("Compute importance", type="primary", icon=":material/play_arrow:", key="imp_run",
                disabled=not rows or busy is not None,
                help="Runs in the background (Jobs in the sidebar): other pages stay usable, a reload keeps it.")
if busy is not None:
    st.caption(f":material/hourglass_top: {busy.label}: {busy.fraction:.0%} (progress and Cancel: Jobs in the "
               "sidebar).")
if run:
    try:
        calib = ui.build_calibration(loaded, cfg) if needs_cal else None
    except Exception as e:  # noqa: BLE001 - TextError: says what to do
        show_error(e)
    else:
        job = background.start_importance(loaded, [n for n in names if n in options], options, calib)
        if job is not None and job.snapshot().status == "done":
            st.toast(f"Maps ready: {', '.join(n for n in names if n in st.session_state['imaps'])}",
                     icon=":material/check:")

# ==== 4. maps ========================================================================================================
imaps = st.session_state["imaps"]
if not imaps:
    st.info("No maps yet. Choose criteria and press **Compute importance** (magnitude needs no text and is "
            "instant).", icon=":material/grid_on:")
    st.stop()

st.subheader("3 · Maps", anchor=False)
known = st.session_state.get("imp_show_known")
if known is not None and "imp_show" in st.session_state:  # maps computed since: shown too (the newest three)
    fresh = [n for n in imaps if n not in known]
    st.session_state["imp_show"] = [n for n in st.session_state["imp_show"] if n in imaps] + fresh
st.session_state["imp_show_known"] = list(imaps)
shown = st.pills("Show", list(imaps), selection_mode="multi", key="imp_show",
                 default=None if "imp_show" in st.session_state else list(imaps)[-3:],
                 format_func=lambda n: crits[n].title if n in crits else n)  # its own row: pills wrap
c2, c3 = st.columns([3, 1], vertical_alignment="bottom")
scale = c2.segmented_control("Colour by", ["score", "rank", "log10"], default="rank", key="imp_scale",
                             help="rank: position inside its layer (0 = least important), good for comparing "
                                  "criteria with different scales (the Prune page's default too).") or "rank"
plan = state.get_plan(loaded)
overlay = c3.toggle("Show plan", value=not plan.is_empty(), key="imp_overlay",
                    help="Darken the units the current plan removes.")
plan_for_fig = plan if overlay else None
shown = shown or list(imaps)[-1:]
c1, c2 = st.columns([1, 1])
linked_on = c1.toggle("Linked maps", key="imp_linked", help="The shown maps of a kind in one figure: zoom or pan "
                      "one and all follow.")
shared_colour = c2.toggle("One colour scale", value=True, key="imp_shared_colour", disabled=not linked_on,
                          help="Colour every linked map on the range of all of them (with Colour by: score, "
                               "criteria on different scales wash each other out; rank is comparable as it is).")

KINDS = list(UNITS)  # head, kv, channel, block
tabs = st.tabs([ui.unit_title(kind) for kind in KINDS] + ["Compare"])
for kind, tab in zip(KINDS, tabs):
    with tab:
        have = [n for n in shown if imaps[n].get(kind) is not None]
        if not have:
            st.caption(f"None of the shown criteria scores {UNITS[kind].plural}.")
            continue
        view = ui.channel_view(g, f"imp_{kind}") if kind == "channel" else None
        unit_views.kind_maps(imaps, have, kind, plan_for_fig, scale, view, linked_on, shared_colour)
        unit_views.selected_unit(imaps, kind, g, scale)

with tabs[-1]:
    if len(imaps) < 2:
        st.info("Compute at least two criteria to compare them.", icon=":material/compare_arrows:")
    else:
        c1, c2 = st.columns([1, 2])
        kind = c1.selectbox("Unit", KINDS, format_func=lambda k: UNITS[k].plural, key="imp_cmp_kind")
        ratio = c2.slider("Would prune (per layer)", 5, 90, 25, 5, format="%d%%", key="imp_cmp_ratio",
                          help="Share of the lowest-scored units per layer whose sets are compared.") / 100
        maps = {n: imaps[n].get(kind).numpy() for n in imaps if imaps[n].get(kind) is not None}
        if len(maps) < 2:
            st.caption(f"Fewer than two criteria score {UNITS[kind].plural}.")
        else:
            left, right = st.columns(2)
            names_, corr = analysis.rank_correlations(maps)
            left.plotly_chart(figures.correlation_figure(names_, corr, UNITS[kind].plural),
                              key="imp_corr")
            names_, over = analysis.prune_overlaps({n: m.reshape(1, -1) if m.ndim == 1 else m
                                                    for n, m in maps.items()}, ratio)
            right.plotly_chart(figures.overlap_figure(names_, over, UNITS[kind].plural, ratio),
                               key="imp_overlap")
            st.caption("ρ near 1: the criteria rank units alike. Jaccard 1: they would remove the same units.")

with st.expander("Download scores", icon=":material/download:"):
    for name, imap in imaps.items():
        st.download_button(f"{name}.json", imap.to_json(), file_name=f"importance-{name}.json",
                           mime="application/json", key=f"imp_dl_{name}", on_click="ignore")
