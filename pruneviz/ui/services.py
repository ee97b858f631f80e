"""The app's in-page actions: each wraps one or a few :mod:`pruneviz` calls in a :class:`~.work.Job`, which blocks
the script run and stops when the page is reloaded or closed.

The long journeys (minutes: importance scoring, the SlimGPT solver, the recommended recipe, perplexity evaluation,
LoRA recovery, sweeps) are background jobs instead (:mod:`pruneviz.ui.background`, listed in the jobs panel of
every page, kept across reloads). What stays here is short: building the pruned model for a plan
(:func:`apply_current_plan`) and writing and verifying a checkpoint (:func:`export_checkpoint`) take seconds on
the bundled model, are not cancellable (surgery and export leave nothing half done), and the page the user is on
needs their result at once (the built model, the export report), so a job panel entry would only add a rerun.
So do the quick-start magnitude map (:func:`compute_importance`: weights only, instant), the previews and the
perplexity of a loaded exported checkpoint (:func:`evaluate_exported`, not moved yet).

Every action stores its results through :func:`pruneviz.ui.state.save` as soon as each piece is finished, so
cancelling (or an error in a later piece) keeps what was computed; the work itself touches ``st.session_state``
only before it starts (a superseded run may not touch it, see :mod:`pruneviz.ui.work`). Results that are safe to
share between sessions (importance maps, dense perplexity) also go to the process-wide store, keyed by everything
they depend on.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time

import streamlit as st
import torch

from ..allocate import plan_from_ratios
from ..arch import adapter_for, geometry_of
from ..data import text_hash
from ..errors import PlanError
from ..evaluate import next_token_top_k, perplexity, token_losses
from ..export import card_evaluation, save_pruned
from ..importance import Cancelled, available, compute
from ..offload import execution_device, is_offloaded
from ..plan import Plan, dense_params
from ..surgery import apply_plan
from . import analysis, persist, state
from .state import EvalRecord, HistoryEntry, Preview, PrunedRecord, RecoveryRecord, TokenDiff
from .work import Job

# ---- speed and estimates ------------------------------------------------------------------------------------------

SPEED_BATCH = 4  # windows per timed forward pass: what the criteria run at once


def forward_speed(loaded, seq_len: int = 128) -> float:
    """Forward tokens per second of the base model on a representative batch (``SPEED_BATCH`` windows of
    ``seq_len`` tokens, after a warm-up pass; the faster of two timed passes), measured once per process and
    window length."""
    max_pos = getattr(loaded.model.config, "max_position_embeddings", None) or 128
    T = int(max(8, min(seq_len, max_pos)))
    key = f"speed|{state.session_spec().key}|{T}"
    hit = state.cached_result(key)
    if hit is not None:
        return hit
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (SPEED_BATCH, T), generator=torch.Generator().manual_seed(0))
    ids = ids.to(execution_device(loaded.model))  # [B, T]
    offloaded = bool(loaded.info.get("offload"))  # reads every block from disk/CPU: one pass only
    best = math.inf
    with torch.inference_mode():
        if not offloaded:
            loaded.model(input_ids=ids, use_cache=False)  # warm-up
        for _ in range(1 if offloaded else 2):
            t0 = time.perf_counter()
            loaded.model(input_ids=ids, use_cache=False)
            best = min(best, time.perf_counter() - t0)
    tps = ids.numel() / max(best, 1e-6)
    state.store_result(key, tps)
    return tps


def estimate(loaded, crit, options, n_samples: int, seq_len: int) -> dict:
    """The criterion's own cost estimate turned into seconds and bytes for display. The time comes from this
    session's last run of the criterion on this model (seconds per forward token, see :func:`record_rate`) when
    there is one (``measured`` True), else from :func:`forward_speed` (a backward pass counted as two forwards)."""
    est = crit.estimate(geometry_of(loaded.model), dense_params(loaded.model), n_samples, seq_len, options)
    tokens = est.get("forward_tokens", 0)
    rate = st.session_state.get("cost_rates", {}).get(crit.name)
    if tokens and rate is not None:
        seconds = tokens * rate
    else:
        factor = 3.0 if est.get("backward") else 1.0
        seconds = tokens * factor / forward_speed(loaded, seq_len) if tokens else 0.0
    return {"tokens": tokens, "backward": bool(est.get("backward")), "seconds": seconds,
            "extra_bytes": est.get("extra_bytes", 0), "measured": bool(tokens and rate is not None)}


def record_rate(name: str, seconds: float, tokens: int) -> None:
    """Keep ``seconds / tokens`` of a finished run (a criterion's, or "lora") for the session's next estimates."""
    if tokens > 0 and seconds > 0:
        state.save(lambda ss: ss.setdefault("cost_rates", {}).__setitem__(name, seconds / tokens))


# ---- offloaded models ---------------------------------------------------------------------------------------------

def offload_summary(loaded) -> str | None:
    """One line on where an offloaded base keeps its blocks and what that rules out (None when not offloaded)."""
    where = loaded.info.get("offload")
    if not where:
        return None
    layers = adapter_for(loaded.model).layers(loaded.model)
    off = sum(is_offloaded(layer) for layer in layers)
    if not off:
        return (f"Offloading asked for ({where}), but all {len(layers)} blocks fit on {loaded.device}: the model "
                f"is resident and every criterion works.")
    place = "on disk" if where == "disk" else "in CPU memory"
    kept = f" ({len(layers) - off} kept on {loaded.device})" if off < len(layers) else ""
    whole = ", ".join(c.title.split(" (")[0] for c in available().values() if not c.layerwise)
    return (f"{off} of {len(layers)} blocks {place}{kept}, scored one block at a time; {whole} need the whole "
            f"model in memory. The pruned model is built in CPU memory.")


# ---- importance ---------------------------------------------------------------------------------------------------

def compute_importance(loaded, names: list[str], options: dict, calib) -> list[str]:
    """Compute (or fetch from the cache) each criterion's map into ``session_state.imaps``; returns done names.

    Each finished map is kept even if a later one is cancelled or fails.
    """
    crits, done = available(), []
    spec = state.session_spec()
    if calib is not None:
        st.session_state["calib"] = calib
    with Job("Computing importance…", key="imp_job", done_label="Importance maps ready") as job:
        for i, name in enumerate(names):
            crit = crits[name]
            cal = calib if crit.needs_calibration else None
            key = state.imap_key(spec, name, options[name], cal.describe() if cal is not None else None)
            imap = state.cached_imap(key)
            if imap is None:
                job.note(f"{crit.title} ({i + 1}/{len(names)})…")
                prog = lambda f, msg, i=i: job.progress((i + f) / len(names), f"{crit.title}: {msg}")  # noqa: E731
                try:
                    imap = compute(loaded.model, name, cal, options[name], progress=prog, cancel=job.cancelled)
                except Cancelled:
                    break
                state.store_imap(key, imap)
            if cal is not None and not job.cancelled():  # its time (measured in this process, maybe cached)
                n, T = (int(x) for x in cal.tokens.shape)
                est = crit.estimate(geometry_of(loaded.model), dense_params(loaded.model), n, T, options[name])
                record_rate(name, float((imap.meta or {}).get("seconds") or 0.0), est.get("forward_tokens", 0))
            state.save(lambda ss, name=name, imap=imap: ss["imaps"].__setitem__(name, imap))
            done.append(name)
            if job.cancelled():
                break
    return done


# ---- plans --------------------------------------------------------------------------------------------------------

def width_range(loaded, settings: dict) -> dict:
    """The ``width_layers`` slider (first, last layer pruned in width) as ``skip_first`` / ``skip_last``."""
    n = geometry_of(loaded.model).n_layers
    lo, hi = settings.get("width_layers") or (0, n - 1)
    return {"skip_first": int(lo), "skip_last": int(n - 1 - hi)}


def build_plan(loaded, settings: dict):
    """A plan from the slider settings (allocation over the chosen map) with the session's manual edits on top."""
    imap = st.session_state["imaps"].get(settings.get("criterion") or "")
    head, chan = settings["head_pct"] / 100, settings["channel_pct"] / 100
    if imap is None or (head == 0 and chan == 0 and settings["block_count"] == 0):
        plan = Plan.empty(loaded.model).with_provenance(criterion=settings.get("criterion") or "manual",
                                                       strategy="manual")
    else:
        plan = plan_from_ratios(loaded.model, imap, head_ratio=head, channel_ratio=chan,
                                block_count=settings["block_count"], attn_unit=settings["attn_unit"],
                                strategy=settings["strategy"], plus_rule=settings.get("plus_rule", False),
                                deployable=settings.get("deployable"), multiple_of=settings.get("multiple_of", 1),
                                **width_range(loaded, settings))
    edits = st.session_state.get("edits", [])
    if edits:
        plan = analysis.apply_edits(plan, edits).with_provenance(manual_edits=len(edits))
    return plan


def apply_current_plan(loaded, plan) -> bool:
    """Build the physically smaller model for ``plan`` into ``session_state.pruned``; True on success."""
    calib = st.session_state.get("calib")
    tokens = calib.tokens if (plan.compensation and calib is not None) else None
    entry = history_entry(plan)
    with Job("Building the pruned model…", key="apply_job", cancellable=False,
             done_label="Pruned model built") as job:
        t0 = time.perf_counter()
        model = apply_plan(loaded.model, plan, calibration=tokens, progress=job.progress)
        rec = PrunedRecord(plan.sha256(), model, plan, time.perf_counter() - t0)
        state.save(lambda ss: ss.update(pruned=rec, masked=None))
        state.save(lambda ss: state.add_history(entry, ss))
    return job.ok


def history_entry(plan, settings="session", edits="session") -> HistoryEntry:
    """A history record of ``plan``: summary, plan JSON, the slider settings and edits that made it."""
    settings = st.session_state.get("plan_settings") if settings == "session" else settings
    edits = st.session_state.get("edits", []) if edits == "session" else edits
    return HistoryEntry(plan.sha256(), "nothing removed" if plan.is_empty() else plan.summary(),
                        plan.provenance.get("criterion", "manual"), plan.provenance.get("strategy", "manual"),
                        plan.to_json(None), json.dumps(settings), json.dumps(edits))


# ---- evaluation ---------------------------------------------------------------------------------------------------

def dense_ppl(loaded, key: str, text: str, protocol: str, job: Job):
    """Perplexity of the shared base (cached per process under ``key``: model, protocol and text)."""
    hit = state.cached_result(key)
    if hit is not None:
        return hit
    res = perplexity(loaded.model, loaded.tokenizer, text, protocol, progress=job.prefixed("dense: "),
                     cancel=job.cancelled)
    if res.complete:
        state.store_result(key, res)
    return res


def _dense_key(text: str, protocol: str) -> str:
    return f"ppl|{state.session_spec().key}|{protocol}|{text_hash(text, 64)}"


def _evaluate(loaded, plan, model, how: str, recovery: RecoveryRecord | None, text_name: str, text: str,
              protocol: str, job: Job, entry: HistoryEntry) -> EvalRecord | None:
    """Dense, pruned and (with ``recovery``) pruned + LoRA perplexity into ``evals`` and the history."""
    dense = dense_ppl(loaded, _dense_key(text, protocol), text, protocol, job)
    job.note("Evaluating the pruned model…")
    pruned = perplexity(model, loaded.tokenizer, text, protocol, progress=job.prefixed("pruned: "),
                        cancel=job.cancelled)
    lora = None
    if recovery is not None and pruned.complete:
        job.note("Evaluating the pruned model after LoRA recovery…")
        lora = perplexity(recovery.model, loaded.tokenizer, text, protocol,
                          progress=job.prefixed("pruned + LoRA: "), cancel=job.cancelled)
    if not (dense.n_windows and pruned.n_windows):
        return None
    has_lora = lora is not None and lora.n_windows > 0
    complete = bool(dense.complete and pruned.complete and (recovery is None or (has_lora and lora.complete)))
    out = EvalRecord(plan.sha256(), entry.summary, text_name, protocol, pruned.protocol.describe(), dense.ppl,
                     pruned.ppl, pruned.n_tokens, how, complete, pruned.seconds, plan.param_count(loaded.model),
                     dense_params(loaded.model), time.strftime("%H:%M:%S"), lora.ppl if has_lora else None,
                     recovery.tag if has_lora else None)
    measured = dataclasses.replace(entry, params=out.params, dense_ppl=out.dense_ppl, ppl=out.pruned_ppl,
                                   lora_ppl=out.lora_ppl, protocol=protocol)
    state.save(lambda ss: (persist.add_eval(ss, out, entry.plan_json), state.add_history(measured, ss)))
    return out


def evaluate_exported(loaded, plan, text_name: str, text: str, protocol: str) -> EvalRecord | None:
    """Perplexity of an exported checkpoint as it is (the session's model; its dense base is not loaded, so the
    dense perplexity is NaN: not measured), stored in ``session_state.evals`` under the plan it carries."""
    out = None  # stays None when the job fails (its error is shown in the job's box)
    with Job("Evaluating perplexity…", key="ev_job", done_label="Perplexity ready") as job:
        res = dense_ppl(loaded, _dense_key(text, protocol), text, protocol, job)
        if res.n_windows:
            n = dense_params(loaded.model)
            out = EvalRecord(plan.sha256(), plan.summary(), text_name, protocol, res.protocol.describe(),
                             float("nan"), res.ppl, res.n_tokens, "the exported model itself", res.complete,
                             res.seconds, n, n, time.strftime("%H:%M:%S"))
            state.save(lambda ss: persist.add_eval(ss, out, plan.to_dict()))
    return out


# ---- LoRA recovery ------------------------------------------------------------------------------------------------

def lora_tag(record: dict) -> str:
    """A short name of a recovery run (its settings, steps and text), shown in tables and used to match results."""
    return (f"r {record['r']}, lr {record['lr']:g}, {record['steps_done']}/{record['steps']} steps, "
            f"seed {record['seed']}, text {record['text_sha256'][:6]}")


def recovery_seconds(loaded, options) -> float:
    """Rough time of a recovery run: every training token at the seconds per token of this session's last LoRA
    run when there is one, else forward + backward (about three forward passes) at the base model's measured
    forward speed (the pruned model is a little faster)."""
    tokens = options.steps * options.batch_size * options.seq_len
    rate = st.session_state.get("cost_rates", {}).get("lora")
    return tokens * rate if rate is not None else 3.0 * tokens / forward_speed(loaded, options.seq_len)


def discard_recovery(plan) -> None:
    """Forget the recovered model of ``plan``: chat, evaluation and export use the pruned model again."""
    cur = state.pruned_record(plan)
    if cur is not None:
        st.session_state["pruned"] = dataclasses.replace(cur, recovery=None)
        st.session_state["preview"] = None


def append_once(items: list, item) -> None:
    """Append ``item`` unless this very object is already there (a queued update may be applied again)."""
    if not any(x is item for x in items):
        items.append(item)


# ---- instant preview ----------------------------------------------------------------------------------------------

def quick_look(model, tokenizer, text: str, max_tokens: int = 64, top: int = 5) -> Preview:
    """Loss of ``model`` on the first ``max_tokens`` tokens of ``text`` (:func:`pruneviz.evaluate.token_losses`)
    and its ``top`` next-token guesses (:func:`pruneviz.evaluate.next_token_top_k`)."""
    tokens, nll = token_losses(model, tokenizer, text, max_tokens=max_tokens)
    finite = [x for x in nll if math.isfinite(x)]
    mean = sum(finite) / max(len(finite), 1)
    nxt = next_token_top_k(model, tokenizer, text, k=top, max_tokens=max_tokens)
    return Preview(math.exp(mean), tuple(nll), tuple(tokens), tuple(nxt))


def preview_pair(loaded, plan, text: str) -> tuple[Preview, Preview]:
    """:func:`quick_look` of the dense model (cached per process) and of the plan's model (the built one if there
    is one, else the masked preview; cached per session for the last plan and text), so reruns that change
    neither cost nothing."""
    key = f"look|{state.session_spec().key}|{text}"
    dense = state.cached_result(key)
    if dense is None:
        dense = quick_look(loaded.model, loaded.tokenizer, text)
        state.store_result(key, dense)
    if plan.is_empty():
        return dense, dense
    model, _ = state.compare_model(loaded, plan)
    mine = (plan.sha256(), text, id(model))
    rec = st.session_state.get("preview")
    if not rec or rec[0] != mine:
        rec = (mine, quick_look(model, loaded.tokenizer, text))
        st.session_state["preview"] = rec
    return dense, rec[1]


def token_diff(loaded, plan, model, text: str, max_tokens: int) -> TokenDiff:
    """Per-token losses of the dense base and of ``model`` (the plan's) on ``text``, into ``session_state``."""
    toks, dense = token_losses(loaded.model, loaded.tokenizer, text, max_tokens=max_tokens)
    _, pruned = token_losses(model, loaded.tokenizer, text, max_tokens=max_tokens)
    diff = TokenDiff(tuple(toks), tuple(dense), tuple(pruned), plan.sha256())
    st.session_state["tokdiff"] = diff
    return diff


# ---- export -------------------------------------------------------------------------------------------------------

def card_evaluation_for(plan) -> dict | None:
    """The model card's evaluation entries from the latest finished evaluation of ``plan`` (LoRA perplexity only
    when it was measured on the recovery being exported); None when there is none."""
    e, recovery = state.latest_eval(plan, complete_only=True), state.recovery_for(plan)
    if e is None or not math.isfinite(e.dense_ppl):  # an exported model's own evaluation has no dense number
        return None
    lora = e.lora_ppl if recovery is not None and e.lora == recovery.tag else None
    return card_evaluation(e.pruned_ppl, e.dense_ppl, e.text, e.protocol_text, lora)


def export_checkpoint(loaded, plan, folder, overwrite: bool, **options) -> bool:
    """Write and verify the plan's built (or recovered) model at ``folder`` (:func:`pruneviz.export.save_pruned`;
    ``options``: its ``format`` and ``weight_type``) into ``session_state.export``; True on success."""
    model = loaded.model if state.is_exported(loaded) else state.built_for(plan)  # an export: as it is
    if model is None:
        raise PlanError("build the pruned model for this plan first (Prune page)")
    evaluation = card_evaluation_for(plan)
    with Job("Exporting and verifying…", key="ex_job", cancellable=False, done_label="Checkpoint exported") as job:
        job.progress(0.1, "writing weights, tokenizer, plan and model card")
        report = save_pruned(model, loaded.tokenizer, folder, plan=plan, evaluation=evaluation, overwrite=overwrite,
                             **options)
        state.save(lambda ss: (ss.update(export=state.ExportRecord(plan.sha256(), report)),
                               persist.record_export(plan, report, ss)))
        job.progress(1.0, "reloaded and compared")
    return job.ok
