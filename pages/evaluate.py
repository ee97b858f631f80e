"""Evaluate page: perplexity of dense, pruned (and pruned + LoRA) under one protocol, LoRA recovery, sweeps,
per-token losses, history."""
import json
import math

import pandas as pd
import streamlit as st

from pruneviz.data import domain_note
from pruneviz.evaluate import PROTOCOLS, SWEEP_WHAT
from pruneviz.importance import available
from pruneviz.plan import Plan
from pruneviz.recovery import SCHEDULES, LoRAOptions
from pruneviz.threads import describe as threading_policy
from pruneviz.ui import analysis, background, figures, jobs_panel, services, state
from pruneviz.ui import components as ui
from pruneviz.ui.pareto_panel import pareto_panel
from pruneviz.ui.work import show_error
from pruneviz.ui.zeroshot_panel import zeroshot_panel

loaded = ui.page("Evaluate", "Perplexity under one stated protocol, trade-off curves per criterion, where the loss "
                 "changes token by token, and every configuration you tried.")
plan = state.get_plan(loaded)
model, how = state.compare_model(loaded, plan)
crits = available()

with st.container(border=True):
    c1, c2 = st.columns([1, 2], gap="large")
    protocol = c1.selectbox("PPL protocol", list(PROTOCOLS), key="ev_protocol",
                            help="quick: 16 windows of 128 tokens (seconds on a CPU) · paper: all 128-token windows "
                                 "(LLM-Pruner / SlimGPT) · long: sliding 1024-token windows.")
    c1.caption(PROTOCOLS[protocol].describe())
    with c2:
        text = ui.text_picker("eval", "ev_text")

# ==== 1. perplexity ==================================================================================================
if state.is_exported(loaded):  # an exported checkpoint: its own perplexity; the comparisons need its base
    st.subheader("Perplexity", anchor=False)
    st.caption(f"**The exported model itself** (pruned with: {plan.summary()}).")
    if st.button("Evaluate perplexity", type="primary", key="ev_run", icon=":material/play_arrow:",
                 disabled=text is None):
        services.evaluate_exported(loaded, plan, text.name, text.text, protocol)
    last = state.latest_eval(plan)
    if last is not None:
        c1, c2, c3 = st.columns(3)
        c1.metric("Perplexity", ui.fmt_ppl(last.pruned_ppl), border=True)
        c2.metric("Scored tokens", f"{last.tokens:,}", border=True)
        c3.metric("Fidelity to dense", "N/A", border=True, help="KL and top-1 agreement need the dense base.")
        st.caption(("⚠️ PARTIAL (cancelled) · " if not last.complete else "") + f"{last.protocol_text} Text: "
                   f"{last.text}.")
    st.info("Fidelity to the dense model (KL, top-1 agreement), LoRA recovery, sweeps and per-token comparisons "
            "need the dense base: load it with this plan on the Prune page.", icon=":material/info:")
    st.stop()

st.subheader("Perplexity", anchor=False)
st.caption(f"Pruned side: **{how}** · plan: {'nothing removed' if plan.is_empty() else plan.summary()}")
if text is not None:
    calib = st.session_state.get("calib")
    calib_name = (plan.provenance.get("calibration") or {}).get("text") or (calib.text_name if calib else None)
    note, same_domain = domain_note(calib_name, text.name)
    st.caption(f"Text: {note}.")
    if same_domain:
        st.warning("This text shares the calibration's domain; numbers here flatter methods that fit the "
                   "calibration; also evaluate on a text from elsewhere.", icon=":material/warning:")
ev_busy = jobs_panel.running("evaluation")
if st.button("Evaluate dense and pruned", type="primary", key="ev_run", icon=":material/play_arrow:",
             disabled=text is None or ev_busy is not None,
             help="Runs in the background (Jobs in the sidebar): other pages stay usable, a reload keeps it."):
    background.start_evaluation(loaded, plan, text.name, text.text, protocol)
if ev_busy is not None:
    st.caption(f":material/hourglass_top: {ev_busy.label}: {ev_busy.fraction:.0%} (progress and Cancel: Jobs in "
               "the sidebar).")

evals = st.session_state["evals"]
last = state.latest_eval(plan)
if last is not None:
    lora_ppl = last.lora_ppl
    cols = st.columns(4 if lora_ppl is not None else 3)
    cols[0].metric("Dense PPL", ui.fmt_ppl(last.dense_ppl), border=True)
    cols[1].metric("Pruned PPL", ui.fmt_ppl(last.pruned_ppl), border=True, delta_color="inverse",
                   delta=ui.ppl_delta(last.pruned_ppl, last.dense_ppl))
    if lora_ppl is not None:
        cols[2].metric("Pruned + LoRA PPL", ui.fmt_ppl(lora_ppl), border=True, delta_color="inverse",
                       delta=ui.ppl_delta(lora_ppl, last.dense_ppl), help=f"LoRA: {last.lora}")
    cols[-1].metric("Scored tokens", f"{last.tokens:,}", border=True)
    st.dataframe(pd.DataFrame(analysis.ppl_rows(last)), hide_index=True, key="ev_ppl_table",
                 placeholder=analysis.MISSING, column_config={
        "parameters": st.column_config.NumberColumn(format="compact"),
        "perplexity": st.column_config.NumberColumn(format="%.4g"),
        "vs dense": st.column_config.NumberColumn(format="percent")})
    st.caption(("⚠️ PARTIAL (cancelled) · " if not last.complete else "") +
               f"{last.protocol_text} Text: {last.text}." + (f" LoRA: {last.lora}." if last.lora else ""))
if evals:
    with st.expander(f"All evaluations ({len(evals)})", icon=":material/table:"):
        frame = pd.DataFrame([state.asdict_shallow(e) for e in evals]).reindex(columns=[
            "time", "summary", "dense_ppl", "pruned_ppl", "lora_ppl", "lora", "protocol", "text", "how", "complete"])
        frame = frame.dropna(axis="columns", how="all")  # no column of empty cells (no LoRA run yet)
        st.dataframe(frame, hide_index=True, key="ev_table", placeholder=analysis.MISSING, column_config={
            "dense_ppl": st.column_config.NumberColumn("dense PPL", format="%.3f"),
            "pruned_ppl": st.column_config.NumberColumn("pruned PPL", format="%.4g"),
            "lora_ppl": st.column_config.NumberColumn("pruned + LoRA PPL", format="%.4g")})
zeroshot_panel(loaded, plan, text, protocol)

# ==== 2. LoRA recovery ===============================================================================================
st.subheader("Recover (LoRA)", anchor=False)
built, recovery = state.pruned_for(plan), state.recovery_for(plan)
if built is None:
    st.caption("A short LoRA fine-tune of the physically pruned model recovers part of the lost quality (Shortened "
               "LLaMA, LLM-Pruner). Build the pruned model on the Prune page first.")
else:
    max_pos = getattr(built.config, "max_position_embeddings", None) or 2048
    lens = [n for n in ui.SEQ_LENS if n <= max_pos] or [max_pos]
    with st.expander("Settings and training text", icon=":material/model_training:", expanded=recovery is None):
        c1, c2, c3, c4 = st.columns(4)
        steps = c1.number_input("Steps", 1, 10_000, 100, key="ev_lora_steps",
                                help="Optimizer steps (the papers train ~1.5k steps of 64 on Alpaca; 100 fit a CPU).")
        lr = c2.select_slider("Learning rate", [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3], value=1e-4, key="ev_lora_lr",
                              format_func=lambda v: f"{v:g}")
        rank = c3.selectbox("Rank r", [2, 4, 8, 16, 32, 64], index=2, key="ev_lora_rank")
        alpha = c4.number_input("Alpha", 1.0, 1024.0, 16.0, key="ev_lora_alpha",
                                help="Adapters are scaled by alpha / r.")
        c1, c2, c3, c4 = st.columns(4)
        batch = c1.number_input("Windows per step", 1, 256, 4, key="ev_lora_batch")
        seq = c2.selectbox("Tokens per window", lens, index=lens.index(128) if 128 in lens else len(lens) - 1,
                           key="ev_lora_seq")
        seed = c3.number_input("Seed", 0, 2 ** 31 - 1, 0, key="ev_lora_seed", help="Windows, their order, LoRA init.")
        schedule = c4.selectbox("Schedule", list(SCHEDULES), key="ev_lora_schedule",
                                help="After 10 warm-up steps: linear decay (HF Trainer), cosine (SlimGPT) or constant.")
        train = ui.text_picker("calib", "ev_lora")
    options = LoRAOptions(r=int(rank), alpha=float(alpha), lr=float(lr), steps=int(steps), batch_size=int(batch),
                          seq_len=int(seq), seed=int(seed), schedule=schedule)
    st.caption(f"About {ui.human_seconds(services.recovery_seconds(loaded, options))} here. Trains a copy (the pruned "
               "model is kept), then measures dense / pruned / pruned + LoRA on the held-out text and protocol above. "
               "Afterwards Chat, Evaluate and Export use the recovered model.")
    lora_busy = jobs_panel.running("lora")
    if st.button("Fine-tune with LoRA", type="primary", key="ev_lora_run", icon=":material/model_training:",
                 disabled=train is None or lora_busy is not None,
                 help="Runs in the background (Jobs in the sidebar shows each step's loss): other pages stay "
                      "usable, a reload keeps it; Cancel keeps the steps done."):
        job = background.start_recovery(loaded, plan, options, train.name, train.text, text.name if text else None,
                                        text.text if text else None, protocol)
        if jobs_panel.finished_here(job):
            st.rerun()
    if lora_busy is not None:
        jobs_panel.busy_note(lora_busy, "The loss curve shows here when it finishes.")
    if recovery is not None:
        st.plotly_chart(figures.loss_figure(recovery.losses), key="ev_lora_loss")
        st.caption(("⚠️ stopped early · " if recovery.cancelled else "") +
                   f"{recovery.tag} · trained on {recovery.text} in {ui.human_seconds(recovery.seconds)} · "
                   f"{recovery.record['trainable_params']:,} LoRA parameters, merged into the weights")
        if st.button("Discard the recovered model", key="ev_lora_discard", icon=":material/undo:",
                     help="Chat, Evaluate and Export go back to the pruned model without LoRA."):
            services.discard_recovery(plan)
            st.rerun()

# ==== 3. sweep =======================================================================================================
st.subheader("Sweep", anchor=False)
imaps = st.session_state["imaps"]
if not imaps:
    st.caption("Compute importance maps first to sweep over pruning ratios.")
else:
    c1, c3 = st.columns([3, 1])
    sweep_crits = c1.multiselect("Criteria", list(imaps), default=list(imaps)[:2], key="ev_sweep_crits",
                                 format_func=lambda n: crits[n].title if n in crits else n)
    ratios = st.pills("Ratios", [10, 20, 30, 40, 50, 60, 70], selection_mode="multi", default=[10, 30, 50],
                      format_func=lambda r: f"{r}%", key="ev_sweep_ratios")  # its own row: pills wrap
    what = c3.selectbox("Prune", list(SWEEP_WHAT), key="ev_sweep_what",
                        help="width: attention and MLP at the same ratio · blocks: that share of whole layers.")
    latency = st.toggle("Also measure latency (builds each pruned model; slower)", key="ev_sweep_latency",
                        help=f"Greedy decoding at batch 1, timed with {threading_policy()}.")
    kl = st.toggle("Also measure KL to the dense model (fidelity on any text; one more pass per point)",
                   key="ev_sweep_kl")
    n = len(sweep_crits) * len(ratios or [])
    sweep_busy = jobs_panel.running("sweep")
    if st.button(f"Run sweep ({n} configurations)", key="ev_sweep_run", icon=":material/stacked_line_chart:",
                 disabled=not n or text is None or sweep_busy is not None,
                 help="Runs in the background (Jobs in the sidebar); finished points are kept if you cancel."):
        background.start_sweep(loaded, sweep_crits, [r / 100 for r in sorted(ratios)], what, text.text, protocol,
                               latency, kl)
    if sweep_busy is not None:
        st.caption(f":material/hourglass_top: {sweep_busy.label}: {sweep_busy.fraction:.0%} (see Jobs in the "
                   "sidebar).")
    points = state.sweep_points(protocol, text.text if text is not None else None)
    if points:
        dense = next((p for p in points if p.criterion == "dense"), None)
        rest = [p for p in points if p.criterion != "dense"]
        st.plotly_chart(figures.sweep_figure(rest, "ppl", dense), key="ev_sweep_fig")
        if any(p.ms_per_token for p in rest):
            st.plotly_chart(figures.sweep_figure(rest, "ms_per_token", dense), key="ev_sweep_lat")
        if any(p.kl_mean is not None for p in rest):
            st.plotly_chart(figures.sweep_figure(rest, "kl_mean", dense), key="ev_sweep_kl_fig")
        st.caption(f"{len(rest)} points · masked models (identical outputs to physical ones) · "
                   f"{PROTOCOLS[protocol].describe()}")
        pareto_panel(rest, dense, plan, protocol, text)
        c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
        labels = {i: f"{p.criterion} · {p.what} {p.ratio:.0%} · PPL {ui.fmt_ppl(p.ppl)}" for i, p in enumerate(rest)}
        pick = c1.selectbox("Use a sweep point as the plan", list(labels), format_func=labels.get, key="ev_sweep_pick")
        if c2.button("Load plan", key="ev_sweep_load") and pick is not None:
            state.set_plan(rest[pick].plan.validate(loaded.model, physical=False))
            st.toast("Plan loaded: see the Prune page.", icon=":material/check:")
            st.rerun()
    if st.session_state["sweep"] and st.button("Clear sweep", key="ev_sweep_clear"):
        st.session_state["sweep"] = []
        st.rerun()

# ==== 4. per-token loss difference ===================================================================================
st.subheader("Per-token loss difference", anchor=False)
st.caption("Each token shaded by how much worse (red) or better (blue) the pruned model predicts it. Hover a token "
           "for both losses.")
default_text = (text.text[:700] if text is not None else "")
sample = st.text_area("Text", value=default_text, height=120, key="ev_tok_text")
max_tok = st.slider("Tokens", 16, 512, 192, 16, key="ev_tok_max")
if st.button("Compare token losses", key="ev_tok_run", disabled=not sample.strip()):
    try:
        services.token_diff(loaded, plan, model, sample, max_tok)
    except Exception as e:  # noqa: BLE001
        show_error(e)
diff = st.session_state.get("tokdiff")
if diff:
    if diff.sha != plan.sha256():
        st.caption("Computed for an earlier plan; press the button again for the current one.")
    pairs = [(a, b) for a, b in zip(diff.dense, diff.pruned) if math.isfinite(a) and math.isfinite(b)]
    mean_delta = sum(b - a for a, b in pairs) / max(len(pairs), 1)
    st.metric("Mean loss change", f"{mean_delta:+.3f} nats/token", border=True)
    st.html(figures.token_diff_html(diff.tokens, diff.dense, diff.pruned))

# ==== 5. history =====================================================================================================
st.subheader("History", anchor=False)
hist = st.session_state["history"]
if not hist:
    st.caption("Every plan you apply or evaluate is recorded here and can be reloaded.")
else:
    rows = [h.row() for h in hist]
    cols = [c for c in ("n", "time", "summary", "criterion", "strategy", "params", "dense_ppl", "ppl", "lora_ppl",
                        "protocol") if any(r[c] is not None for r in rows)]
    st.dataframe(pd.DataFrame(rows)[cols], hide_index=True, key="ev_history", placeholder=analysis.MISSING,
                 column_config={
        "params": st.column_config.NumberColumn("parameters", format="compact"),
        "dense_ppl": st.column_config.NumberColumn("dense PPL", format="%.3f"),
        "ppl": st.column_config.NumberColumn("pruned PPL", format="%.4g"),
        "lora_ppl": st.column_config.NumberColumn("pruned + LoRA PPL", format="%.4g")})
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    pick = c1.selectbox("Configuration", [h.n for h in hist], key="ev_hist_pick",
                        format_func=lambda n: f"#{n}: {hist[n - 1].summary}")
    if c2.button("Reload", key="ev_hist_load", icon=":material/history:"):
        entry = hist[pick - 1]
        try:
            restored = Plan.from_json(entry.plan_json).validate(loaded.model, physical=False)
            state.set_plan(restored, json.loads(entry.settings or "null"),
                           [tuple(e) for e in json.loads(entry.edits or "[]")])
            st.toast(f"Configuration #{pick} reloaded.", icon=":material/check:")
            st.rerun()
        except Exception as e:  # noqa: BLE001
            show_error(e)
