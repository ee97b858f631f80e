"""Inspect page: one prompt through the dense model unit by unit (attention patterns, what each head and MLP writes
into the residual stream, what removing each would do to the next token) and what the current plan removed."""
import math
from functools import partial

import pandas as pd
import streamlit as st

from pruneviz.arch import geometry_of
from pruneviz.ui import analysis, inspecting, linked, state
from pruneviz.ui import components as ui
from pruneviz.ui.work import show_error

loaded = ui.page("Inspect", "One prompt through the dense model, unit by unit: where each query head looks, how "
                 "much each head and MLP writes into the residual stream, what removing it does to the next token, "
                 "and what the current plan's removals did to every token.")
ui.exported_gate(loaded, "inspect its units here", "ins")
g = geometry_of(loaded.model)
plan = state.get_plan(loaded)

c1, c2 = st.columns([4, 1])
prompt = c1.text_area("Prompt", value="The capital of France is Paris. The capital of Italy is", height=90,
                      key="ins_prompt")
max_tok = int(c2.number_input("Tokens (at most)", 2, 256, 48, key="ins_max",
                              help="The prompt's first tokens that are inspected (a BOS token is added when the "
                                   "tokenizer has one)."))
try:
    ins = inspecting.inspection(loaded, prompt, max_tok)
except Exception as e:  # noqa: BLE001 - TextError: says what to type
    show_error(e)
    st.stop()
T = ins.n_tokens

# selections survive reruns in these keys (a click on a map sets them); drop values another model made stale
for key, n in (("ins_layer", g.n_layers), ("ins_head", g.n_heads), ("ins_pos", T)):
    if st.session_state.get(key) is not None and not 0 <= st.session_state[key] < n:
        del st.session_state[key]
st.session_state.setdefault("ins_pos", max(T - 2, 0))
st.session_state.setdefault("ins_layer", 0)
st.session_state.setdefault("ins_head", 0)


def token_label(t: int) -> str:
    nxt = f" → {ins.tokens[t + 1]!r}" if t + 1 < T else " → (next)"
    return f"{t}: {ins.tokens[t]!r}{nxt}"


pos = st.select_slider("Position", options=list(range(T)), format_func=token_label, key="ins_pos",
                       help="The token whose contributions and next-token prediction are shown: position t reads "
                            "token t and predicts token t + 1.")


def on_unit_click(chart_key: str) -> None:
    """A click on a layer × head map selects that layer and head for the attention pattern."""
    cells = analysis.points_to_cells(((st.session_state.get(chart_key) or {}).get("selection") or {}).get("points"))
    if cells:
        layer, first, _ = cells[0]
        st.session_state["ins_layer"], st.session_state["ins_head"] = layer, first


# ==== 1. attention pattern ===========================================================================================
st.subheader("Attention pattern", anchor=False)
c1, c2, c3 = st.columns([1, 1, 2], vertical_alignment="bottom")
layer = c1.selectbox("Layer", list(range(g.n_layers)), key="ins_layer")
head = c2.selectbox("Query head", list(range(g.n_heads)), key="ins_head",
                    format_func=lambda h: f"{h} (KV group {g.kv_of(h)})" if g.n_kv != g.n_heads else str(h))
c3.caption("Click a cell of the contribution or removal maps below to pick its layer and head.")
st.plotly_chart(linked.attention_figure(ins.attention[layer, head].numpy(), ins.tokens,
                                        title=f"Layer {layer}, query head {head}: where each position looks"),
                key="ins_attention", config={"displaylogo": False})

# ==== 2. contributions ===============================================================================================
st.subheader("Contributions to the residual stream", anchor=False)
where = st.segmented_control("Norms", ["at this position", "mean over the prompt"], default="at this position",
                             key="ins_norm_at", required=True) or "at this position"
at_pos = where == "at this position"
heads_v = ins.head_norm[:, :, pos] if at_pos else ins.head_norm.mean(-1)  # [L, H]
left, right = st.columns(2)
left.plotly_chart(linked.layer_unit_figure(heads_v.numpy(), title="Each head's output norm ‖W_o[:, h] · z_h‖",
                                           unit_label="query head", colorbar="norm"),
                  key="ins_head_norm", on_select=partial(on_unit_click, "ins_head_norm"), selection_mode="points",
                  config={"displaylogo": False})
pick = (lambda x: x[:, pos]) if at_pos else (lambda x: x.mean(-1))
right.plotly_chart(linked.layer_bar_figure({"attention (all heads)": pick(ins.attn_norm).numpy(),
                                            "MLP": pick(ins.mlp_norm).numpy(),
                                            "residual stream in": pick(ins.stream_norm[:-1]).numpy()},
                                           title="Attention, MLP and residual stream norms", y_label="L2 norm"),
                   key="ins_layer_norm", config={"displaylogo": False})
st.caption(("Embeddings + every head + every attention bias + every MLP output add up to the final hidden state "
            "(checked on this prompt)." if ins.additive else
            "This family normalises or scales the attention and MLP outputs before adding them to the residual "
            "stream: the norms are measured at the output projections, before that step.")
           + f" Final hidden state norm here: {float(ins.stream_norm[-1, pos]):.3g}.")

# ==== 3. removal effects =============================================================================================
st.subheader("Removing one unit", anchor=False)
n_units = g.n_layers * (g.n_heads + g.n_kv + 1)
passes = 1 + math.ceil(n_units / 16)
effects = inspecting.stored_effects(prompt, pos, max_tok)
if st.button(f"Measure removal effects at position {pos} ({n_units} units, {passes} batched passes)",
             key="ins_effects_run", icon=":material/science:", type="primary" if effects is None else "secondary"):
    if inspecting.compute_effects(loaded, prompt, pos, max_tok):
        st.rerun()
if effects is None:
    st.caption("Each query head, KV group and MLP is removed in turn (its output projection input zeroed, exactly "
               "a plan's masked preview) and the log-probability of the next token re-measured.")
else:
    what = "the next token" if effects.actual else "the dense model's top guess"
    c1, c2, c3 = st.columns(3)
    c1.metric("Scored token", repr(effects.target_token), border=True, help=f"At position {pos}: {what}.")
    c2.metric("Dense probability", f"{math.exp(effects.logp):.1%}", border=True)
    worst = float(min(t.nan_to_num(0).min() for t in (effects.head, effects.kv, effects.mlp)))
    c3.metric("Largest drop from one unit", f"{worst:+.3f} nats", border=True)
    left, right = st.columns(2)
    left.plotly_chart(linked.layer_unit_figure(effects.head.numpy(), title="Δ log p with one query head removed",
                                               unit_label="query head", colorbar="Δ log p", diverging=True),
                      key="ins_eff_head", on_select=partial(on_unit_click, "ins_eff_head"), selection_mode="points",
                      config={"displaylogo": False})
    right.plotly_chart(linked.layer_unit_figure(effects.kv.numpy(), title="Δ log p with one KV group removed",
                                                unit_label="KV group", colorbar="Δ log p", diverging=True),
                       key="ins_eff_kv", config={"displaylogo": False})
    st.plotly_chart(linked.layer_bar_figure({"MLP removed": effects.mlp.numpy()}, title="Δ log p with one MLP "
                                            "removed", y_label="Δ log p (nats)"), key="ins_eff_mlp")
    st.caption("Negative: the unit helped predict this token (blue cells hurt when removed); positive: it worked "
               "against it. Each unit is removed alone; removing several interacts.")

# ==== 4. what the plan removed =======================================================================================
st.subheader("What did this plan's removals do?", anchor=False)
if plan.is_empty():
    st.info("The plan removes nothing yet. Make one on the Prune page to see, token by token, what its units did.",
            icon=":material/content_cut:")
    st.stop()
try:
    effect, how = inspecting.plan_effect_for(loaded, plan, prompt, max_tok)
except Exception as e:  # noqa: BLE001
    show_error(e)
    st.stop()
st.caption(f"Dense base vs **{how}** · plan: {plan.summary()}")
c1, c2, c3 = st.columns(3)
c1.metric("Mean loss change", f"{effect.mean_delta:+.3f} nats/token", border=True)
c2.metric("Mean KL(dense ‖ pruned)", f"{effect.mean_kl:.4f}", border=True)
c3.metric("Same top-1", f"{effect.top1_agreement:.0%}", border=True)
here = next((c for c in effect.by_position if c.position == pos), None)
if here is not None:
    st.markdown(f"**At position {pos}** ({here.context!r} → {here.target!r}): loss {here.nll_dense:.3f} → "
                f"{here.nll_pruned:.3f} nats ({here.delta:+.3f}).")
    left, right = st.columns(2)
    left.dataframe(pd.DataFrame(here.dense_top, columns=["dense: next token", "p"]), hide_index=True,
                   key="ins_top_dense", placeholder=ui.MISSING,
                   column_config={"p": st.column_config.NumberColumn(format="percent")})
    right.dataframe(pd.DataFrame(here.pruned_top, columns=["pruned: next token", "p"]), hide_index=True,
                    key="ins_top_pruned", placeholder=ui.MISSING,
                    column_config={"p": st.column_config.NumberColumn(format="percent")})
st.markdown("**Tokens whose loss changed most**")
st.dataframe(pd.DataFrame([c.row() for c in effect.changes[:20]]), hide_index=True, key="ins_changes",
             placeholder=ui.MISSING,
             column_config={"dense loss": st.column_config.NumberColumn(format="%.3f"),
                            "pruned loss": st.column_config.NumberColumn(format="%.3f"),
                            "Δ loss": st.column_config.NumberColumn(format="%+.3f"),
                            "KL": st.column_config.NumberColumn(format="%.4f")})
