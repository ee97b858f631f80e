"""Evaluate page panel: fidelity to the dense model (KL, top-1, PPL ratio) and zero-shot tasks through lm-eval.

Library first: the numbers come from :func:`pruneviz.fidelity.fidelity` and :func:`pruneviz.zeroshot.run_tasks`;
this module runs them as background jobs (:mod:`pruneviz.ui.jobs_panel`: progress, ETA, Cancel, kept across page
reloads) and shows what the session
measured, for dense / pruned / pruned + LoRA and across the configurations tried (each row names its plan).
Results live in ``session_state["fidelity"]`` and ``session_state["zeroshot"]`` as frozen records tagged with the
base model's key, so another model's rows are never shown as this one's.
"""
from __future__ import annotations

import os
import pathlib
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
import streamlit as st

from ..fidelity import FidelityResult, fidelity
from ..fsio import atomic_write_bytes
from ..zeroshot import (
    PAPER_TASKS,
    ZeroShotResult,
    check_task_name,
    paper_average,
    parse_tasks,
    run_tasks,
    write_mc_task,
)
from . import jobs_panel, state
from .analysis import MISSING
from .background import Stages
from .work import show_error

TASK_DIR_ENV = "PRUNEVIZ_TASK_DIR"  # default folder of local lm-eval task YAMLs


@dataclass(frozen=True)
class FidelityRecord:
    """KL / top-1 / PPL ratio of one model against the dense base on one text and protocol."""

    model_key: str
    sha: str
    summary: str
    label: str  # "pruned" or "pruned + LoRA"
    how: str
    text: str
    protocol: str
    result: FidelityResult
    time: str


@dataclass(frozen=True)
class ZeroShotRecord:
    """lm-eval numbers of one model (dense / pruned / pruned + LoRA) of one plan."""

    model_key: str
    sha: str
    summary: str
    label: str
    how: str
    result: ZeroShotResult
    time: str


def _mine(key: str) -> list:
    spec = state.session_spec().key
    return [r for r in st.session_state.get(key, []) if r.model_key == spec]


def _models(loaded, plan, lora: bool = True) -> list[tuple[str, Any, str]]:
    """(label, model, how) of the pruned side: the plan's model and, after LoRA recovery, the recovered one."""
    model, how = state.compare_model(loaded, plan, lora=False)
    out = [("pruned", model, how)]
    recovery = state.recovery_for(plan) if lora else None
    if recovery is not None:
        out.append(("pruned + LoRA", recovery.model, f"physically pruned + LoRA recovery ({recovery.tag})"))
    return out


# ---- fidelity ---------------------------------------------------------------------------------------------------

def start_fidelity(loaded, plan, text_name: str, text: str, protocol: str):
    """Fidelity of the pruned (and pruned + LoRA) model to the dense base, as a background job (jobs panel:
    progress, ETA, Cancel; kept across reloads); one record per model, a cancelled model's record partial and the
    rest skipped. Returns the job (None when one is already running)."""
    summary, spec, sha = plan.summary(), state.session_spec().key, plan.sha256()
    base, tok, models = loaded.model, loaded.tokenizer, _models(loaded, plan)

    def work(progress, cancel):
        stages, out = Stages(progress, len(models)), []
        for label, model, how in models:
            res = fidelity(base, model, tok, text, protocol, progress=stages.part(f"{label}: "), cancel=cancel)
            if res.n_tokens:
                out.append(FidelityRecord(spec, sha, summary, label, how, text_name, protocol, res,
                                          time.strftime("%H:%M:%S")))
            if not res.complete:
                break
        return out

    def apply(ss, records):
        ss.setdefault("fidelity", []).extend(records or [])

    return jobs_panel.submit("fidelity", "Comparing with the dense model", work, apply)


def fidelity_rows(records: list[FidelityRecord]) -> list[dict]:
    return [{"time": r.time, "plan": r.summary, "model": r.label, "KL mean": r.result.kl_mean,
             "KL p99": r.result.kl_p99, "top-1": r.result.top1_agreement, "PPL ratio": r.result.ppl_ratio,
             "tokens": r.result.n_tokens, "protocol": r.protocol, "text": r.text, "complete": r.result.complete}
            for r in records]


def _fidelity_section(loaded, plan, text, protocol: str) -> None:
    st.subheader("Fidelity to the dense model", anchor=False)
    st.caption("KL(dense ‖ pruned) of the next-token distributions, top-1 agreement and the perplexity ratio on the "
               "same windows as the perplexity above: 0 / 100% / 1 for a pruned model that predicts like the dense "
               "one, on any text (unlike perplexity, it does not need the text to match the model's domain).")
    busy = jobs_panel.running("fidelity")
    if st.button("Compare with the dense model", key="ev_fid_run", icon=":material/compare_arrows:",
                 disabled=text is None or plan.is_empty() or busy is not None,
                 help="Needs a non-empty plan: the pruned model is compared with the dense base. Runs in the "
                      "background (Jobs in the sidebar)."):
        if jobs_panel.finished_here(start_fidelity(loaded, plan, text.name, text.text, protocol)):
            st.rerun()
    if busy is not None:
        jobs_panel.busy_note(busy)
    records = _mine("fidelity")
    latest = [r for r in records if r.sha == plan.sha256() and r.protocol == protocol]
    for r in latest[-2:]:
        res = r.result
        cols = st.columns(4)
        cols[0].metric(f"KL mean · {r.label}", f"{res.kl_mean:.4f}", border=True, help="nats per token")
        cols[1].metric("KL p99", f"{res.kl_p99:.4f}", border=True, help="99th percentile over scored tokens")
        cols[2].metric("Top-1 agreement", f"{100 * res.top1_agreement:.2f}%", border=True)
        cols[3].metric("PPL ratio", f"{res.ppl_ratio:.4f}", border=True,
                       help=f"{res.ppl_dense:.3f} → {res.ppl_pruned:.3f}")
        st.caption(("⚠️ PARTIAL (cancelled) · " if not res.complete else "") +
                   f"{r.label}: {r.how} · {res.n_tokens:,} tokens · {res.protocol_text}")
    if records:
        with st.expander(f"All fidelity measurements ({len(records)})", icon=":material/table:"):
            st.dataframe(pd.DataFrame(fidelity_rows(records)), hide_index=True, key="ev_fid_table", placeholder=MISSING,
                         column_config={
                "KL mean": st.column_config.NumberColumn(format="%.4f"),
                "KL p99": st.column_config.NumberColumn(format="%.4f"),
                "top-1": st.column_config.NumberColumn(format="percent"),
                "PPL ratio": st.column_config.NumberColumn(format="%.4f")})


# ---- zero-shot ----------------------------------------------------------------------------------------------------

def start_zeroshot(loaded, plan, which: list[str], tasks: list[str], limit: int | None, task_dir: str | None):
    """lm-eval ``tasks`` on each model in ``which`` ("dense", "pruned", "pruned + LoRA") as a background job (jobs
    panel); one record per model, stopping after a model that was cancelled. Returns the job (None when one is
    already running)."""
    summary, spec, sha, tok = plan.summary(), state.session_spec().key, plan.sha256(), loaded.tokenizer
    models = [("dense", loaded.model, "dense")] + _models(loaded, plan)
    chosen = [m for m in models if m[0] in which]

    def work(progress, cancel):
        stages, out = Stages(progress, len(chosen)), []
        for label, model, how in chosen:
            res = run_tasks(model, tok, tasks, limit=limit, task_dir=task_dir, progress=stages.part(f"{label}: "),
                            cancel=cancel)
            if res.scores:
                out.append(ZeroShotRecord(spec, sha, summary, label, how, res, time.strftime("%H:%M:%S")))
            if not res.complete:
                break
        return out

    def apply(ss, records):
        ss.setdefault("zeroshot", []).extend(records or [])

    return jobs_panel.submit("zeroshot", f"lm-eval: {', '.join(tasks)[:40]}", work, apply)


def zeroshot_rows(records: list[ZeroShotRecord]) -> list[dict]:
    """One row per task and model run: plan, model, task, n, acc ± stderr, acc_norm ± stderr."""
    rows = []
    for r in records:
        for row in r.result.rows(r.label):
            rows.append({"time": r.time, "plan": r.summary, **row, "limit": r.result.limit,
                         "complete": r.result.complete})
    return rows


def comparison_table(records: list[ZeroShotRecord]) -> pd.DataFrame:
    """Task x model (latest run of each model): acc / acc_norm ± stderr as text, plus the papers' average."""
    latest: dict[str, ZeroShotRecord] = {}
    for r in records:
        latest[r.label] = r
    table: dict[str, dict[str, str]] = {}
    for label, r in latest.items():
        for s in r.result.scores:
            row = table.setdefault(s.task, {"task": s.task, "n": str(s.n)})
            for name, v, e in (("acc", s.acc, s.acc_stderr), ("acc_norm", s.acc_norm, s.acc_norm_stderr)):
                row[f"{label} {name}"] = "–" if v is None else (f"{100 * v:.2f}" +
                                                                (f" ± {100 * e:.2f}" if e is not None else ""))
        avg = paper_average(r.result)
        if avg is not None:
            table.setdefault("7-task average", {"task": "7-task average (papers' metrics)", "n": ""})[
                f"{label} acc"] = f"{100 * avg:.2f}"
    return pd.DataFrame(list(table.values()))


def _local_task_upload(task_dir_key: str) -> None:
    """Upload a multiple-choice JSONL; it becomes a task YAML in the session's local task folder."""
    with st.expander("Add a local multiple-choice file (JSONL)", icon=":material/upload_file:"):
        st.caption('One item per line: {"question": "...", "choices": ["...", "..."], "answer": 0}. lm-eval scores '
                   'each choice as " " + choice after the question; acc_norm divides by its length in characters.')
        c1, c2 = st.columns([2, 1])
        up = c1.file_uploader("JSONL file", type=["jsonl", "json"], key="ev_zs_upload")
        name = c2.text_input("Task name", "my_items", key="ev_zs_upload_name")
        if up is not None and st.button("Add task", key="ev_zs_add", icon=":material/add:"):
            folder = pathlib.Path(st.session_state.get(task_dir_key) or _session_task_dir())
            try:
                check_task_name(name)
                data = folder / "data" / f"{name}.jsonl"
                data.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(data, up.getvalue(), "the uploaded items")
                write_mc_task(data, folder, name)
            except Exception as exc:  # noqa: BLE001
                show_error(exc)
                return
            st.session_state[task_dir_key] = str(folder)
            st.success(f"Task '{name}' written to {folder}. Add it to the tasks above.")


def _session_task_dir() -> str:
    return str(pathlib.Path(tempfile.gettempdir()) / "pruneviz-tasks" / state.session_id())


def _zeroshot_section(loaded, plan) -> None:
    st.subheader("Zero-shot tasks (lm-evaluation-harness)", anchor=False)
    st.caption("Accuracy on multiple-choice tasks, as the papers report next to perplexity (lm-eval's own code on "
               "the in-memory model). 'paper' = " + ", ".join(PAPER_TASKS) + ". Built-in tasks need their data "
               "(Hub or cache); offline, point them at local files (README: Zero-shot tasks).")
    st.session_state.setdefault("ev_zs_dir", os.environ.get(TASK_DIR_ENV, ""))
    c1, c2, c3 = st.columns([2, 2, 1])
    spec = c1.text_input("Tasks", "paper", key="ev_zs_tasks", help="Comma-separated lm-eval task names.")
    task_dir = c2.text_input("Local task folder", key="ev_zs_dir",
                             help=f"Folder of task YAMLs (write_mc_task / write_local_task); default ${TASK_DIR_ENV}.")
    limit = c3.number_input("Limit", 0, 100_000, 50, key="ev_zs_limit",
                            help="First N documents per task (0 = all). Limited runs are for a quick look only.")
    has_lora = state.recovery_for(plan) is not None
    options = ["dense"] + ([] if plan.is_empty() else ["pruned"]) + (["pruned + LoRA"] if has_lora else [])
    which = st.multiselect("Models", options, default=options, key="ev_zs_models")
    _local_task_upload("ev_zs_dir")
    busy = jobs_panel.running("zeroshot")
    if st.button("Run tasks", key="ev_zs_run", type="primary", icon=":material/quiz:",
                 disabled=not which or busy is not None, help="Runs in the background (Jobs in the sidebar)."):
        try:
            tasks = parse_tasks(spec)
        except Exception as exc:  # noqa: BLE001
            show_error(exc)
        else:
            if jobs_panel.finished_here(start_zeroshot(loaded, plan, which, tasks, int(limit) or None,
                                                       task_dir.strip() or None)):
                st.rerun()
    if busy is not None:
        jobs_panel.busy_note(busy)
    records = _mine("zeroshot")
    current = [r for r in records if r.sha == plan.sha256()]
    if current:
        st.dataframe(comparison_table(current), hide_index=True, key="ev_zs_compare", placeholder=MISSING)
        last = current[-1].result
        st.caption(("⚠️ PARTIAL (cancelled) · " if not last.complete else "") + last.protocol())
    if records:
        with st.expander(f"All zero-shot runs ({len(records)})", icon=":material/table:"):
            st.dataframe(pd.DataFrame(zeroshot_rows(records)), hide_index=True, key="ev_zs_table", placeholder=MISSING,
                         column_config={
                "acc": st.column_config.NumberColumn(format="percent"),
                "acc_norm": st.column_config.NumberColumn(format="percent"),
                "acc_stderr": st.column_config.NumberColumn("± acc", format="percent"),
                "acc_norm_stderr": st.column_config.NumberColumn("± acc_norm", format="percent")})


def zeroshot_panel(loaded, plan, text, protocol: str) -> None:
    """The Evaluate page's fidelity and zero-shot sections (``text`` is the page's text choice, or None)."""
    _fidelity_section(loaded, plan, text, protocol)
    _zeroshot_section(loaded, plan)
