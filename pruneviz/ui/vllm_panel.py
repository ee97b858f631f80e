"""Export page panel: run a Hugging Face or DeciLM export in a real vLLM and compare it with pruneviz.

The check is :func:`pruneviz.vllm_runtime.verify_in_vllm` (vLLM in its own environment, ``make vllm``); the
reference is the folder reloaded in pruneviz, which the export has already shown to give the in-memory model's
logits exactly. Runs as a background job (:mod:`pruneviz.ui.jobs_panel`); the result is kept in
``session_state["vllm_check"]`` for the folder it checked.
"""
from __future__ import annotations

import streamlit as st

from ..loading import load_model
from ..vllm_runtime import INSTALL_HINT, verify_in_vllm, vllm_python
from . import jobs_panel

KEY = "vllm_check"


def start_check(tokenizer, folder: str):
    """Reload ``folder`` in pruneviz and run it in vLLM as a background job; the result is kept for that folder."""

    def work(progress, cancel):
        progress(0.05, "reloading the export in pruneviz")
        model = load_model(folder, device="cpu", dtype="fp32").model
        progress(0.2, "starting vLLM (about a minute on a CPU)")
        return verify_in_vllm(model, tokenizer, folder)

    def apply(ss, res):
        ss[KEY] = {"folder": folder, "result": res}

    return jobs_panel.submit("vllm", "Running the export in vLLM", work, apply)


def vllm_panel(loaded, report) -> None:
    """A "Run in vLLM" button for an ``hf`` or ``decilm`` export (``report``) and the last result for it; without a
    vLLM environment, how to get one."""
    if report.gguf or report.format not in ("stock", "decilm"):
        return
    st.markdown("**In vLLM**")
    if vllm_python() is None:
        st.caption(f"To run this export in a real vLLM and compare its tokens with pruneviz's: {INSTALL_HINT} "
                   "(README, 'Which plans load where').")
        return
    busy = jobs_panel.running("vllm")
    folder = str(report.folder)
    if st.button("Run in vLLM", key="ex_vllm", icon=":material/rocket_launch:", disabled=busy is not None,
                 help="Starts vLLM (CPU build, fp32) on the folder, generates 16 greedy tokens from a fixed prompt "
                      "and compares them and the top-5 log-probabilities with pruneviz (tolerance 1e-3). Runs in "
                      "the background (Jobs in the sidebar)."):
        if jobs_panel.finished_here(start_check(loaded.tokenizer, folder)):
            st.rerun()
    if busy is not None:
        jobs_panel.busy_note(busy)
    rec = st.session_state.get(KEY)
    if not rec or rec["folder"] != folder:
        return
    got = rec["result"]
    (st.success if got.ok else st.error)(f"{got.line()} ({got.architecture}, engine built in {got.load_s:.0f} s).",
                                         icon=":material/verified:" if got.ok else ":material/error:")
