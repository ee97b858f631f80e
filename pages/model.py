"""Model page: what is loaded and which units it has (layers, heads, KV groups, channels, parameters)."""
import pandas as pd
import streamlit as st

from pruneviz.arch import UNITS, adapter_for, family_notes, geometry_of, unit_count, unit_params
from pruneviz.plan import dense_params
from pruneviz.ui import components as ui
from pruneviz.ui import services, state
from pruneviz.ui.analysis import MISSING

loaded = ui.page("Model", "The dense base model every plan is made against. Choose another one in the sidebar.")
model, g = loaded.model, geometry_of(loaded.model)

st.subheader(loaded.name, anchor=False)
st.caption(f"source `{loaded.source or 'bundled'}` · device **{loaded.device}** · dtype "
           f"**{str(loaded.dtype).replace('torch.', '')}** · loaded in {loaded.load_seconds:.1f} s · "
           f"{g.describe()}")
offloaded = services.offload_summary(loaded)
if offloaded:
    st.caption(f":material/storage: {offloaded}")

total, non_emb = dense_params(model), dense_params(model, non_embedding=True)
if state.is_exported(loaded):  # an already pruned checkpoint: what it carries, not the base's unit table
    carried = state.exported_plan(loaded)
    cols = st.columns(3)
    cols[0].metric("Blocks", model.config.num_hidden_layers, border=True, help="Decoder blocks it kept.")
    cols[1].metric("Parameters", ui.human(total), border=True)
    cols[2].metric("Non-embedding", ui.human(non_emb), border=True)
    st.subheader("The plan it carries", anchor=False)
    if carried is None:
        st.caption("This checkpoint is pruned but records no plan.")
    else:
        st.markdown(f"{carried.summary()}  \nbase `{carried.base.name}` · criterion "
                    f"{carried.provenance.get('criterion', 'unknown')} · compensation {carried.compensation or 'none'}"
                    f" · `sha256 {carried.sha256()[:16]}…`")
        st.download_button("Download its plan JSON", carried.to_json(), file_name="pruneviz-plan.json",
                           mime="application/json", key="model_plan_dl", icon=":material/download:",
                           on_click="ignore")
    st.caption("Its layers have their own widths, so it is explored through its base: Importance and Prune offer to "
               "load the base with this plan. Chat, Evaluate and Export work on it as it is.")
    card = state.model_card(loaded)
    with st.expander("Model card (README.md)", icon=":material/description:", expanded=True):
        if card is None:
            st.caption("No README.md in its folder.")
        else:
            front, body = ui.split_front_matter(card)
            if front:
                st.code(front, language="yaml")
            st.markdown(body)
    with st.expander("Configuration", icon=":material/settings:"):
        st.json(model.config.to_diff_dict(), expanded=False)
    st.stop()

cols = st.columns(6)
cols[0].metric("Layers", g.n_layers, border=True, help="Decoder blocks.")
cols[1].metric("Query heads", g.n_heads, border=True, help=f"Per layer; head dimension {g.head_dim}.")
cols[2].metric("KV groups", g.n_kv, border=True,
               help=f"Per layer; {g.group_size} query heads share each key/value head." if g.n_kv != g.n_heads
               else "Per layer; multi-head attention: every head has its own keys and values.")
cols[3].metric("MLP channels", g.n_channels, border=True, help="Per layer (intermediate size).")
cols[4].metric("Parameters", ui.human(total), border=True)
cols[5].metric("Non-embedding", ui.human(non_emb), border=True, delta=f"{non_emb / total:.0%} of all",
               delta_color="off", delta_arrow="off")  # no help icon: the label fits its column at 1400 px

for note in family_notes(model):  # generic llama-like, multi-query attention, post-norms, (1 + w), vocabulary share
    st.info(note, icon=":material/info:")

st.subheader("Prunable units", anchor=False)
adapter = adapter_for(model)
OWNS = {"block": "whole layer", "kv": "k/v rows + its heads"}
rows = []
for kind in ("block", "kv", "head", "channel"):
    per = unit_params(g, adapter, model, kind)
    count = unit_count(g, kind) * (g.n_layers if UNITS[kind].width else 1)
    label = UNITS[kind].label + (f" ({OWNS[kind]})" if kind in OWNS else "")
    rows.append({"unit": label, "count": count, "parameters each": per, "% of non-embedding": 100 * per / non_emb})
st.dataframe(pd.DataFrame(rows), hide_index=True, key="model_units", placeholder=MISSING, column_config={
    "% of non-embedding": st.column_config.NumberColumn(format="%.4f %%"),
    "parameters each": st.column_config.NumberColumn(format="localized"),
    "count": st.column_config.NumberColumn(format="localized")})
st.caption("One unit's share shows how fine-grained each kind of pruning is. Removing a KV group removes its "
           "key/value rows and every query head that reads them; removing query heads keeps the KV cache.")

with st.expander("Configuration", icon=":material/settings:"):
    st.json(model.config.to_diff_dict(), expanded=False)

st.divider()
st.markdown("**Next:** score the units, then prune.")
c1, c2 = st.columns(2)
c1.page_link("pages/importance.py", label="Importance: score heads, channels and blocks", icon=":material/grid_on:")
c2.page_link("pages/prune.py", label="Prune: turn scores into a plan", icon=":material/content_cut:")
