"""Runs page: the plans, evaluations, exports and sweeps stored for the loaded model (they survive reloads and
restarts), compared side by side, reloaded as the session's plan, labelled, deleted, shared as a link."""
import pandas as pd
import streamlit as st

from pruneviz.runs import KINDS
from pruneviz.ui import components as ui
from pruneviz.ui import persist, urlstate
from pruneviz.ui.work import show_error

loaded = ui.page("Runs", "Everything tried on this model, kept on disk: compare runs side by side, load a stored "
                 "plan, share a link to it.")
store = persist.store()
st.caption(f"Stored in `{store.path}` (set `PRUNEVIZ_RUNS` to use another file) · CLI: `python -m pruneviz runs "
           "list`.")
runs = persist.runs_for(st.session_state)
if runs is None:
    st.error(persist.problem() or "The run store cannot be read.", icon=":material/error:")
    st.stop()
if not runs:
    st.info("No stored runs for this model yet. Applying or evaluating a plan, a sweep or an export records one.",
            icon=":material/history:")
    st.stop()

kinds = st.pills("Kinds", list(KINDS), selection_mode="multi", default=list(KINDS), key="runs_kinds")
shown = [r for r in runs if r.kind in (kinds or KINDS)][::-1]  # newest first
by_id = {r.id: r for r in runs}
rows = [{"run": r.id, "kind": r.kind, "time": r.when, "label": r.label, "plan": r.summary() if r.plan else "",
         "PPL": r.metrics.get("ppl", r.metrics.get("pruned_ppl")), "dense PPL": r.metrics.get("dense_ppl"),
         "parameters": r.metrics.get("params"), "notes": r.notes} for r in shown]
st.dataframe(pd.DataFrame(rows), hide_index=True, key="runs_table", placeholder=ui.MISSING, column_config={
    "parameters": st.column_config.NumberColumn(format="compact"),
    "PPL": st.column_config.NumberColumn(format="%.4g"), "dense PPL": st.column_config.NumberColumn(format="%.3f")})


def run_name(rid: int) -> str:
    r = by_id[rid]
    return f"#{r.id} {r.kind} · {r.label or r.summary()}"[:120]


# ==== compare ========================================================================================================
st.subheader("Compare", anchor=False)
picked = st.multiselect("Runs to compare", [r.id for r in shown], default=[r.id for r in shown[:2]],
                        format_func=run_name, key="runs_compare")
if picked:
    try:
        table = pd.DataFrame(store.compare(picked)).set_index("run").T
    except Exception as e:  # noqa: BLE001 - RunStoreError says what to do
        show_error(e)
    else:
        table.columns = [f"#{c}" for c in table.columns]
        st.dataframe(table.astype(str).replace({"None": "", "nan": ""}), key="runs_compare_table",
                     placeholder=ui.MISSING)
        st.caption("One column per run: the plan's summary and removed units, then every metric the runs hold.")

# ==== one run ========================================================================================================
st.subheader("One run", anchor=False)
rid = st.selectbox("Run", [r.id for r in shown], format_func=run_name, key="runs_pick")
if rid is not None:
    run = by_id[rid]
    c1, c2, c3 = st.columns(3)
    if c1.button("Load plan", key="runs_load", type="primary", icon=":material/restore_page:",
                 disabled=run.plan is None, help="Make this run's plan the session's plan (checked against the "
                 "loaded model first)."):
        if urlstate.load_run_plan(loaded, run.id):
            st.rerun()
    with c2.popover("Label and notes", icon=":material/edit_note:"):
        label = st.text_input("Label", value=run.label, key=f"runs_label_{run.id}")
        notes = st.text_area("Notes", value=run.notes, key=f"runs_notes_{run.id}")
        if st.button("Save", key="runs_annotate"):
            try:
                store.annotate(run.id, label, notes)
                st.rerun()
            except Exception as e:  # noqa: BLE001
                show_error(e)
    with c3.popover("Delete", icon=":material/delete:"):
        st.caption("Removes this run from the store (its exported files, if any, stay where they are).")
        if st.button(f"Delete run #{run.id}", key="runs_delete", type="primary"):
            try:
                store.delete(run.id)
                st.toast(f"Run #{run.id} deleted.", icon="🗑️")
                st.rerun()
            except Exception as e:  # noqa: BLE001
                show_error(e)
    with st.expander("Stored data", icon=":material/data_object:"):
        st.json({"metrics": run.metrics, "extra": {k: v for k, v in run.extra.items() if k != "rows"},
                 "plan_sha256": run.plan_sha}, expanded=1)
        if run.extra.get("rows"):
            st.dataframe(pd.DataFrame(run.extra["rows"]), hide_index=True, key="runs_sweep_rows",
                         placeholder=ui.MISSING)

# ==== share =========================================================================================================
st.subheader("Share", anchor=False)
query = urlstate.share_query(loaded)
base = str(getattr(st.context, "url", "") or "").split("?")[0].rstrip("/")
root = base[: -len("/runs")] if base.endswith("/runs") else base
st.code(f"{root}/{query}" if root else query, language=None)
st.caption("Opens this page with this model and the session's stored plan. A link never turns on remote code; a "
           "Hugging Face id is filled into the picker, not downloaded by itself.")
