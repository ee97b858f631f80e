"""Export page: the plan as JSON, the pruned checkpoint (verified by reloading it) and its model card."""
import streamlit as st

from pruneviz.deploy import runtimes
from pruneviz.export import EXPORT_FORMATS, default_folder_name, safe_folder_name, zip_folder
from pruneviz.gguf_export import WEIGHT_TYPES, kernel_note, slow_kernel_layers, unquantised_layers, verification_line
from pruneviz.plan import Plan
from pruneviz.ui import components as ui
from pruneviz.ui import services, state
from pruneviz.ui.speed_panel import gguf_speed_panel
from pruneviz.ui.vllm_panel import vllm_panel
from pruneviz.ui.work import show_error

loaded = ui.page("Export", "Take the plan or the pruned model with you. Checkpoints are written atomically and "
                 "reloaded before they are reported, so what you download reproduces the model you tested.")
plan = state.get_plan(loaded)
sha8 = plan.sha256()[:8]

# ==== plan file ======================================================================================================
st.subheader("Plan", anchor=False)
c1, c2 = st.columns(2, gap="large")
with c1:
    st.markdown(f"{'Nothing removed.' if plan.is_empty() else plan.summary()}  \n`sha256 {plan.sha256()[:16]}…`")
    st.download_button("Download plan JSON", plan.to_json(), file_name=f"pruneviz-plan-{sha8}.json",
                       mime="application/json", key="ex_plan_dl", icon=":material/download:", on_click="ignore")
    st.caption("Small and exact: apply it to the same base model with `pruneviz` to rebuild the pruned model.")
with c2:
    up = st.file_uploader("Load a plan file", type=["json"], key="ex_plan_up",
                          max_upload_size=state.MAX_UPLOAD_MB)
    if up is not None:
        try:
            other = Plan.from_json(up.getvalue()).validate(loaded.model, physical=False)
            st.caption(f"{other.summary()} · made with {other.provenance.get('criterion', 'unknown')}")
            if st.button("Use this plan", key="ex_plan_use"):
                state.set_plan(other)
                st.toast("Plan loaded.", icon=":material/check:")
                st.rerun()
        except Exception as e:  # noqa: BLE001 - PlanError: wrong model, malformed file
            show_error(e)

# ==== checkpoint =====================================================================================================
st.subheader("Pruned checkpoint", anchor=False)
exported = state.is_exported(loaded)
built, recovery = (loaded.model, None) if exported else (state.built_for(plan), state.recovery_for(plan))
if exported:
    st.caption("The loaded model is an exported checkpoint: it is exported as it is (with the plan it carries).")
if plan.is_empty():
    st.info("The plan removes nothing; make one on the Prune page first.", icon=":material/content_cut:")
    st.stop()
st.markdown("**Which runtimes load this plan**")
try:  # judged on the built model, or on the plan's shapes alone (no weights) before it is built
    support = runtimes(built) if built is not None else runtimes(loaded.model, plan)
    st.dataframe([{"Runtime": r.name, "Loads": "yes" if r.ok else "no", "Export format": r.format, "Why": r.reason}
                  for r in support], hide_index=True, key="ex_runtimes", placeholder=ui.MISSING)
except Exception as e:  # noqa: BLE001 - PlanError: the plan does not fit this model
    show_error(e)
if built is None:
    st.warning("The pruned model for this plan is not built yet.", icon=":material/construction:")
    if st.button("Build it now", key="ex_build", type="primary"):
        if services.apply_current_plan(loaded, plan):
            st.rerun()
    st.stop()

name = st.text_input("Folder name", value=default_folder_name(loaded.name, plan), key="ex_name")
name = safe_folder_name(name, f"pruned-{sha8}")
folder = state.exports_root() / name
overwrite = st.checkbox("Overwrite if it exists", key="ex_overwrite")
fmt = st.radio("Format", list(EXPORT_FORMATS), horizontal=True, key="ex_format",
               format_func={"hf": "Hugging Face folder", "gguf": "GGUF for llama.cpp",
                            "decilm": "DeciLM for vLLM"}.get,
               help="GGUF: one file for llama.cpp (llama, or deci for per-layer widths), run in llama.cpp to verify "
                    "it where a llama.cpp binding is installed, else read back. DeciLM: block_configs folder for "
                    "vLLM (vllm serve --trust-remote-code); the table above says whether the plan fits")
options = {"format": fmt}
if fmt == "gguf":
    options["weight_type"] = st.selectbox("GGUF weights", WEIGHT_TYPES, index=WEIGHT_TYPES.index("f16"),
                                          key="ex_wtype", help="norms and biases stay f32")
    slow = kernel_note(slow_kernel_layers(loaded.model, plan))
    if slow:
        st.info(slow, icon=":material/speed:")
    off_blocks = unquantised_layers(loaded.model, plan, options["weight_type"])
    if off_blocks:
        st.info(f"{len(off_blocks)} layer(s) keep an MLP width that is not a whole number of "
                f"{options['weight_type']} blocks (32 values): their ffn_down stays f16 in this file. Choose "
                "\"MLP widths in multiples of 32\" on the Prune page to quantise every weight.",
                icon=":material/info:")
st.caption(f"Written to `{folder}`")
if recovery is not None:
    st.caption(f"The LoRA-recovered model is exported ({recovery.tag}); the model card records the recovery.")
evaluation = services.card_evaluation_for(plan)
if evaluation is not None:
    st.caption(f"The model card will include the evaluation: PPL {ui.fmt_ppl(evaluation['perplexity (pruned)'])} "
               f"(dense {ui.fmt_ppl(evaluation['perplexity (dense)'])}).")

if st.button("Export checkpoint", type="primary", key="ex_run", icon=":material/save:"):
    services.export_checkpoint(loaded, plan, folder, overwrite, **options)

rec = state.export_for(plan)
if rec is not None:
    report = rec.report
    ok = report.ok
    if report.gguf:
        g, v = report.gguf, report.gguf["verification"]
        st.success(f"Verified in {v['runtime']}: {g['arch']} architecture, {g['weight_type']} weights, "
                   f"{verification_line(v)}. {g['arch_reason']}.",
                   icon=":material/verified:")
        gguf_speed_panel(loaded, g)
    (st.success if ok else st.error)(
        f"{'Verified' if ok else 'NOT verified'}: reloaded in {report.format} format, max |Δ logit| "
        f"{report.reload_max_abs_diff:.3g}" + (f", with trust_remote_code {report.remote_code_max_abs_diff:.3g}"
                                                 if report.remote_code_max_abs_diff is not None else "") + ".",
        icon=":material/verified:" if ok else ":material/error:")
    c1, c2, c3 = st.columns(3)
    c1.metric("Format", report.format, border=True,
              help="stock: loads with plain transformers · pruneviz: per-layer widths, loads with "
                   "trust_remote_code=True or pruneviz · decilm: vLLM's DeciLMForCausalLM (and pruneviz)")
    c2.metric("Parameters", ui.human(report.params), border=True)
    c3.metric("Export time", ui.human_seconds(report.seconds), border=True)
    st.caption("Files: " + ", ".join(f"`{f}`" for f in report.files))
    vllm_panel(loaded, report)
    d1, d2 = st.columns(2)
    d1.download_button("Download checkpoint (.zip)", data=lambda: zip_folder(report.folder),
                       file_name=f"{name}.zip", mime="application/zip", key="ex_zip", icon=":material/folder_zip:",
                       on_click="ignore")
    d2.download_button("Download model card", report.card, file_name="README.md", mime="text/markdown",
                       key="ex_card_dl", icon=":material/description:", on_click="ignore")
    with st.expander("Model card", icon=":material/description:", expanded=True):
        front, body = ui.split_front_matter(report.card)
        if front:
            st.code(front, language="yaml")
        st.markdown(body)
