"""Prune page: sliders and heatmap clicks edit the session's plan; live costs; masked preview; apply."""
from functools import partial

import pandas as pd
import streamlit as st

from pruneviz.allocate import DEPLOYABLE, WIDTH, deployable_refusal
from pruneviz.arch import UNITS, geometry_of, unit_count
from pruneviz.errors import PlanError
from pruneviz.importance import available, make_options
from pruneviz.recipe import RECOMMENDED
from pruneviz.schedules import SCHEDULES
from pruneviz.ui import analysis, background, figures, jobs_panel, services, state
from pruneviz.ui import components as ui
from pruneviz.ui.work import show_error

loaded = ui.page("Prune", "Sliders set how much to remove; clicking or box-selecting cells adds or takes back single "
                 "units. The preview updates at once; Apply builds the smaller model.")
ui.exported_gate(loaded, "edit the plan here", "pr")
g = geometry_of(loaded.model)
crits = available()
imaps = st.session_state["imaps"]



ALIGNMENTS = [1, 8, 32, 64, 128]
ALIGN_HELP = ("Every pruned layer keeps an MLP width that is a multiple of this. 32: every weight row quantises in "
              "a q8_0 / q4_0 GGUF export (other widths stay f16 there); 64 or 128 suit GPU kernels. The plan "
              "still lands at or under its target.")


def alignment_label(n: int) -> str:
    return "any width" if n == 1 else f"{n} channels"


def recommended_panel() -> None:
    """The recommended recipe (:data:`pruneviz.recipe.RECOMMENDED`) at a parameter target, in one click."""
    with st.container(border=True):
        st.markdown("**Recommended**")
        st.caption(RECOMMENDED.describe() + ": what the quality benchmark found best on text outside the "
                   "calibration's domain. It computes its own calibration and scores, so no map is needed.")
        share = st.slider("Parameters removed", 5, 70, 20, 5, format="%d%%", key="pr_recipe_target",
                          help="Share of the non-embedding parameters; the model lands at or under it.") / 100
        multiple = st.selectbox("MLP widths in multiples of", ALIGNMENTS, key="pr_recipe_multiple",
                                format_func=alignment_label, help=ALIGN_HELP)
        busy = jobs_panel.running("recipe")
        if st.button("Run the recommended recipe", key="pr_recipe_run", icon=":material/auto_awesome:",
                     disabled=busy is not None, help="Runs in the background (Jobs in the sidebar): other pages "
                     "stay usable, a reload keeps it. Its plan and built model replace the current ones."):
            if jobs_panel.finished_here(background.start_recipe(loaded, share, multiple)):
                st.rerun()
        if busy is not None:
            jobs_panel.busy_note(busy, "Its plan replaces the current one when it finishes.")


# ==== quick start ====================================================================================================
if not imaps:
    st.info("No importance maps yet. Compute some on the Importance page, or start with weight magnitude "
            "(no calibration text, takes a moment).", icon=":material/grid_on:")
    if st.button("Score by weight magnitude", key="pr_quick", icon=":material/bolt:", type="primary"):
        services.compute_importance(loaded, ["magnitude"], {"magnitude": make_options("magnitude")}, None)
        st.rerun()
    recommended_panel()
    st.stop()

# ==== controls =======================================================================================================
DEFAULTS = {"criterion": list(imaps)[-1], "head_pct": 0, "channel_pct": 0, "block_count": 0, "attn_unit": "kv",
            "strategy": "uniform", "plus_rule": False, "width_layers": (0, g.n_layers - 1), "deployable": None,
            "multiple_of": 1}
saved = st.session_state.get("prune_ui") or DEFAULTS
if saved.get("criterion") not in imaps:
    saved = {**saved, "criterion": DEFAULTS["criterion"]}
for k, v in {**DEFAULTS, **saved}.items():
    st.session_state.setdefault(state.SLIDER_PREFIX + k, v)
if st.session_state.get("pr_criterion") not in imaps:
    st.session_state["pr_criterion"] = DEFAULTS["criterion"]

left, right = st.columns([1, 2.6], gap="large")
with left:
    with st.container(border=True):
        st.markdown("**Allocation**")
        origin_note = st.empty()  # filled once the plan of this run is known
        crit = st.selectbox("Scores from", list(imaps), key="pr_criterion",
                            format_func=lambda n: crits[n].title if n in crits else n)
        imap = imaps[crit]
        has_attn, has_blocks = imap.get("kv") is not None or imap.get("head") is not None, imap.blocks is not None
        st.slider("Attention removed", 0, 90, step=5, format="%d%%", key="pr_head_pct", disabled=not has_attn,
                  help="Share of attention units removed in every kept layer.")
        st.segmented_control("Attention unit", ["kv", "head"], key="pr_attn_unit", required=True,
                             format_func=lambda k: UNITS[k].plural,
                             help="KV groups also shrink the KV cache; query heads are removed equally from "
                                  "every group (what physical surgery needs).")
        st.slider("MLP channels removed", 0, 90, step=5, format="%d%%", key="pr_channel_pct",
                  disabled=imap.channels is None)
        st.slider("Blocks removed", 0, g.n_layers - 1, key="pr_block_count", disabled=not has_blocks,
                  help="Whole decoder layers with the lowest block scores." if has_blocks else
                  "This criterion has no block scores.")
        st.selectbox("Strategy", list(WIDTH), key="pr_strategy",
                     help="uniform: same share per layer · global: lowest normalised scores across layers (FLAP) "
                          "· incremental: more in later layers (SlimGPT schedule).")
        st.selectbox("Deployable in", [None, *DEPLOYABLE], key="pr_deployable",
                     format_func={None: "any runtime (pruneviz loads every plan)", "stock": "stock transformers",
                                  "vllm": "vLLM (DeciLM)"}.get,
                     help="Only plans that runtime loads. stock: the same widths in every layer (strategy uniform, "
                          "every layer). vLLM: attention cut alike in every layer, MLP channels per the strategy; "
                          "export as decilm. The Export page shows which runtimes load the plan.")
        st.selectbox("MLP widths in multiples of", ALIGNMENTS, key="pr_multiple_of", format_func=alignment_label,
                     disabled=imap.channels is None, help=ALIGN_HELP)
        st.checkbox("Protect first 4 and last 2 blocks", key="pr_plus_rule", disabled=not has_blocks,
                    help="Shortened LLaMA's + rule for block removal.")
        st.slider("Layers pruned in width", 0, g.n_layers - 1, key="pr_width_layers",
                  help="Heads and channels are removed only in this range of layers; the others stay whole "
                       "(LLM-Pruner prunes layers 4 to L-3). The first and last layers are usually the most "
                       "sensitive.")
    settings = {k: st.session_state[state.SLIDER_PREFIX + k] for k in DEFAULTS}
    st.session_state["prune_ui"] = settings

    edits = st.session_state.get("edits", [])
    c1, c2 = st.columns([2, 1], vertical_alignment="center")
    c1.caption(f"{len(edits)} manual edit{'s' if len(edits) != 1 else ''} on top of the sliders")
    if c2.button("Clear", key="pr_clear_edits", disabled=not edits, help="Forget clicked/selected changes."):
        st.session_state["edits"] = []
        origin = st.session_state.get("plan_origin")
        if st.session_state.get("plan_settings") is None and origin is not None:
            st.session_state["plan"] = origin  # a solver / file / history plan: back to it, not to the sliders
        else:
            st.session_state["prune_seen"] = None  # rebuilt from the sliders
        st.rerun()

# ==== (re)build the plan when the sliders moved ======================================================================
if st.session_state.get("prune_seen") == state.KEEP_PLAN:  # a plan from elsewhere: kept until a slider moves
    st.session_state["prune_seen"] = settings
if settings != st.session_state.get("prune_seen"):
    try:
        st.session_state["plan"] = services.build_plan(loaded, settings)
        st.session_state["plan_settings"] = settings
    except Exception as e:  # noqa: BLE001 - PlanError says what to change
        with left:
            show_error(e)
    st.session_state["prune_seen"] = settings
plan = state.get_plan(loaded)
ui.plan_line(loaded)  # the sidebar drew the plan before this page changed it
if st.session_state.get("plan_settings") is not None and deployable_refusal(loaded.model, plan,
                                                                            settings["deployable"]):
    with left:  # manual edits on top of a deployable allocation can leave the runtime's space
        st.warning(deployable_refusal(loaded.model, plan, settings["deployable"]), icon=":material/warning:")
if st.session_state.get("plan_settings") is None and not plan.is_empty():
    made = plan.provenance
    origin = ("the SlimGPT solver" if made.get("criterion") == "slimgpt" else "the recommended recipe"
              if made.get("recipe") else f"{made.get('strategy', 'elsewhere')} ({made.get('criterion', 'manual')})")
    origin_note.info(f"The current plan comes from {origin}, not from these sliders. Moving one replaces it with "
                     "an allocation from the sliders.", icon=":material/info:")


def _on_select(kind: str, chart_key: str) -> None:
    """Plotly selection -> edits on the plan (runs once per new click / box, before the rerun)."""
    event = st.session_state.get(chart_key) or {}
    points = (event.get("selection") or {}).get("points", [])
    cells = analysis.points_to_cells(points)
    if not cells:
        return
    cur = st.session_state["plan"]
    new = analysis.edits_for_cells(cur, kind, cells, st.session_state.get("pr_action", "toggle"))
    st.session_state["edits"] = list(st.session_state.get("edits", [])) + new
    st.session_state["plan"] = analysis.apply_edits(cur, new).with_provenance(
        manual_edits=len(st.session_state["edits"]))


with right:
    # ---- live counters ----
    max_pos = getattr(loaded.model.config, "max_position_embeddings", None) or 2048
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    c1.markdown(f"**Plan:** {'nothing removed yet' if plan.is_empty() else plan.summary()}")
    ctx = c2.number_input("Context for FLOPs / KV", 16, 1 << 20, min(2048, max_pos), step=256, key="pr_ctx")
    ui.cost_metrics(loaded, plan, int(ctx))
    try:
        plan.check_gqa()
        gqa_error = None
    except PlanError as e:
        gqa_error = str(e)
        st.warning(f"The preview works, but **Apply** needs equal heads per KV group: {gqa_error}",
                   icon=":material/warning:")

    # ---- maps with selection ----
    c1, c2 = st.columns([2, 3], vertical_alignment="bottom")
    c1.segmented_control("Click / box does", ["toggle", "remove", "restore"], key="pr_action", required=True,
                         default="toggle", help="Box-select: pick the box tool in the chart's toolbar and drag.")
    scale = c2.segmented_control("Colour by", ["score", "rank", "log10"], key="pr_scale", required=True,
                                 default="rank") or "rank"
    kinds = [k for k in ("kv", "head", "channel", "block") if imap.get(k) is not None]
    tabs = st.tabs([ui.unit_title(k) for k in kinds], key="pr_tabs", on_change="rerun")  # kept by key: a warning
    # appearing above must not send the view back to the first tab
    for kind, tab in zip(kinds, tabs):
        with tab:
            view = ui.channel_view(g, f"pr_{kind}") if kind == "channel" else None
            fig = figures.importance_figure(imap, kind, plan, scale, view, selectable=True,
                                            title=figures.map_title(crit, "click or box-select to edit",
                                                                    UNITS[kind].plural))
            key = f"pr_fig_{kind}"
            st.plotly_chart(fig, key=key, on_select=partial(_on_select, kind, key), selection_mode=("points", "box"),
                            config={"displaylogo": False})

    with st.expander("Edit by list", icon=":material/edit_note:"):
        c1, c2 = st.columns([1, 1])
        kind = c1.selectbox("Unit", ["kv", "head", "channel", "block"], format_func=lambda k: UNITS[k].plural,
                            key="pr_list_kind")
        if kind == "block":
            layer, n, current = None, g.n_layers, list(plan.blocks)
        else:
            layer = c2.selectbox("Layer", list(range(g.n_layers)), key="pr_list_layer")
            n = unit_count(g, kind)
            current = list(analysis.removed_mask(plan, kind)[layer].nonzero()[0])
        chosen = st.multiselect("Removed", list(range(n)), default=[int(i) for i in current],
                                key=f"pr_list_{kind}_{layer}")
        if st.button("Set removed units", key="pr_list_apply"):
            restore = tuple(i for i in range(n) if i not in chosen)
            new = [(kind, layer, restore, False), (kind, layer, tuple(chosen), True)]
            st.session_state["edits"] = list(st.session_state.get("edits", [])) + new
            st.session_state["plan"] = analysis.apply_edits(plan, new)
            st.rerun()

    st.plotly_chart(figures.kept_profile_figure(analysis.kept_profile(plan)), key="pr_profile")

# ==== preview, apply ==================================================================================================
st.divider()
pv, ap = st.columns([3, 2], gap="large")
with pv:
    st.subheader("Preview", anchor=False)
    if state.pruned_for(plan) is not None:
        st.caption("The built model for this plan.")
    else:
        st.caption("The dense weights with the plan's units masked by hooks: instant, and the same outputs as the "
                   "physically pruned model (compensation such as SlimGPT's runs only when the plan is applied).")
    text = st.text_input("Preview text", key="pr_preview_text",
                         value="The quick brown fox jumps over the lazy dog because it")
    if text.strip():
        try:
            dense, masked = services.preview_pair(loaded, plan, text)
            c1, c2 = st.columns(2)
            c1.metric("Dense PPL on this text", ui.fmt_ppl(dense.ppl))
            c2.metric("Pruned PPL on this text", ui.fmt_ppl(masked.ppl),
                      delta=ui.ppl_delta(masked.ppl, dense.ppl) if masked is not dense else None,
                      delta_color="inverse")
            st.dataframe(pd.DataFrame({"dense next token": [f"{t!r} {p:.0%}" for t, p in dense.next],
                                       "pruned next token": [f"{t!r} {p:.0%}" for t, p in masked.next]}),
                         hide_index=True, key="pr_next", placeholder=analysis.MISSING)
        except Exception as e:  # noqa: BLE001
            show_error(e)

with ap:
    st.subheader("Apply", anchor=False)
    rec = state.pruned_record(plan)
    if rec is not None:
        st.success("The pruned model for this plan is built. Chat, Evaluate and Export use it.",
                   icon=":material/check_circle:")
        exact = ui.dense_costs_of(rec.model, int(ctx))
        st.caption(f"Built in {ui.human_seconds(rec.seconds)} · measured on it: {ui.human(exact.params)} parameters, "
                   f"{ui.human(exact.flops_per_token)} FLOPs/token, {ui.human_bytes(exact.kv_bytes)} KV cache.")
    elif st.button("Build the pruned model", type="primary", key="pr_apply", icon=":material/content_cut:",
                   disabled=plan.is_empty() or gqa_error is not None,
                   help="Slices the weights into a new, physically smaller model (the shared base is untouched)."):
        if services.apply_current_plan(loaded, plan):
            st.rerun()
    if plan.compensation:
        st.caption(f"This plan re-runs the **{plan.compensation}** weight update when applied (it needs the "
                   "calibration windows it was made with).")

    recommended_panel()

    solver = next((c for c in crits.values() if c.is_solver), None)
    if solver is not None:
        with st.expander(f"{solver.title.split(' (')[0]} solver (prunes and compensates weights)",
                         icon=":material/functions:"):
            st.caption("Greedy OBS removal layer by layer with weight updates (Ling et al. 2024). Its heatmap on "
                       "the Importance page is the dense-model OBS error; the solver re-scores after every step.")
            target = st.slider("Target ratio", 5, 70, 20, 5, format="%d%%", key="pr_slim_target") / 100
            sched = st.selectbox("Layer schedule", list(SCHEDULES), key="pr_slim_schedule")
            unit = st.segmented_control("Attention unit", ["kv", "head"], default="kv", required=True,
                                        key="pr_slim_unit")
            calib = st.session_state.get("calib")
            st.caption("Calibration: " + (f"{calib.tokens.shape[0]}×{calib.tokens.shape[1]} tokens of "
                                          f"{calib.text_name}" if calib is not None else
                                          "none yet — compute a calibrated criterion on the Importance page first"))
            busy = jobs_panel.running("solver")
            if st.button("Run SlimGPT", key="pr_slim_run", disabled=calib is None or busy is not None,
                         help="Runs in the background (Jobs in the sidebar): other pages stay usable, a reload "
                              "keeps it. Its plan and compensated model replace the current ones."):
                if jobs_panel.finished_here(background.start_solver(loaded, calib, target, sched, unit)):
                    st.rerun()
            if busy is not None:
                jobs_panel.busy_note(busy, "Its plan replaces the current one when it finishes.")

    c1, c2, c3 = st.columns(3)
    c1.page_link("pages/chat.py", label="Chat", icon=":material/forum:")
    c2.page_link("pages/evaluate.py", label="Evaluate", icon=":material/speed:")
    c3.page_link("pages/export.py", label="Export", icon=":material/ios_share:")
