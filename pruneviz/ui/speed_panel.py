"""Export page panel: the measured llama.cpp speed-up of a GGUF export against the dense model.

The numbers come from :func:`pruneviz.speed.gguf_speedup` (the dense model written as a GGUF of the same weight
type, both timed interleaved in llama.cpp subprocesses under :mod:`pruneviz.threads`' policy); this module only
runs it as a background job (:mod:`pruneviz.ui.jobs_panel`) and shows the result, kept in
``session_state["gguf_speed"]`` for the
exported file it measured.
"""
from __future__ import annotations

import streamlit as st

from ..speed import APP_PROTOCOL, gguf_speedup, llama_cpp_available
from . import jobs_panel, state

KEY = "gguf_speed"


def start_speed(loaded, gguf: dict):
    """Time the dense model and the exported GGUF in llama.cpp as a background job (jobs panel: progress, ETA,
    Cancel); the result is kept for that file. Returns the job (None when one is already running)."""
    model, tok, path, weight_type = loaded.model, loaded.tokenizer, gguf["path"], gguf["weight_type"]

    def work(progress, cancel):
        return gguf_speedup(model, tok, path, weight_type, progress=progress, cancel=cancel)

    def apply(ss, res):
        ss[KEY] = {"path": path, "result": res}

    return jobs_panel.submit("speed", "Timing dense and export in llama.cpp", work, apply)


def gguf_speed_panel(loaded, gguf: dict) -> None:
    """A "Measure llama.cpp speed" button for the exported GGUF (``report.gguf``) and the last measurement of it.

    Without a llama.cpp binding it says how to install one; when the loaded model is itself an export there is no
    dense model to compare with, and it says so."""
    st.markdown("**Speed in llama.cpp**")
    if not llama_cpp_available():
        st.caption("Install a llama.cpp binding to measure the export's speed-up in llama.cpp "
                   "(`pip install -r requirements.txt` installs the pinned llama-cpp-py-sync; README, "
                   "'GGUF for llama.cpp').")
        return
    if state.is_exported(loaded):
        st.caption("The loaded model is an export: there is no dense model here to compare with. Load the base "
                   "model to measure the speed-up.")
        return
    busy = jobs_panel.running("speed")
    if st.button("Measure llama.cpp speed", key="ex_speed", icon=":material/speed:", disabled=busy is not None,
                 help=f"Writes the dense model as {gguf['weight_type']} GGUF too and times both: "
                      f"{APP_PROTOCOL.describe()}. Runs in the background (Jobs in the sidebar)."):
        if jobs_panel.finished_here(start_speed(loaded, gguf)):
            st.rerun()
    if busy is not None:
        jobs_panel.busy_note(busy)
    rec = st.session_state.get(KEY)
    if not rec or rec["path"] != gguf["path"]:
        return
    res = rec["result"]
    dense, pruned, ratio = res["dense"], res["pruned"], res["ratio"]
    b = min(dense["decode_tps"])
    c1, c2, c3 = st.columns(3)
    c1.metric("Decode, dense", f"{dense['decode_tps'][b]:,.1f} tok/s", border=True)
    c2.metric("Decode, export", f"{pruned['decode_tps'][b]:,.1f} tok/s", border=True)
    c3.metric("Decode speed-up", f"{ratio['decode'][b]:.2f}x", border=True,
              help=f"prefill {dense['prefill_tps'][b]:,.0f} -> {pruned['prefill_tps'][b]:,.0f} tok/s "
                   f"({ratio['prefill'][b]:.2f}x)")
    mb = {k: v / 2**20 for k, v in res["file_bytes"].items()}
    st.caption(f"Batch {b}, {res['protocol']}. Prefill {ratio['prefill'][b]:.2f}x. Files {mb['dense']:,.0f} MB "
               f"(dense) and {mb['pruned']:,.0f} MB. Timed with {res['threading']}; the machine's other load "
               f"changes both alike, so the ratio is the number to read.")
