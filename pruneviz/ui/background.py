"""Long journeys run as background jobs (:mod:`pruneviz.ui.jobs_panel`): importance scoring (Importance page),
perplexity evaluation and ratio sweeps (Evaluate page).

Each ``start_*`` reads what it needs from the session in the script thread, hands the job a ``work(progress,
cancel)`` that calls only :mod:`pruneviz` functions on those objects (shared caches are written through the
thread-safe :class:`~pruneviz.ui.state.SharedStore`), and an ``apply(session_state, result)`` that stores the
result in whichever session owns the job when it is collected (the same one, or the one after a page reload).
"""
from __future__ import annotations

import dataclasses
import time

import streamlit as st

from ..arch import geometry_of
from ..data import text_hash
from ..evaluate import perplexity, sweep
from ..fidelity import with_fidelity
from ..importance import Cancelled, available, compute
from ..plan import dense_params
from . import jobs_panel, persist, services, state
from .state import EvalRecord


def dense_key(spec: state.ModelSpec, text: str, protocol: str) -> str:
    """The process cache key of a dense perplexity (the one :mod:`pruneviz.ui.services` uses)."""
    return f"ppl|{spec.key}|{protocol}|{text_hash(text, 64)}"


class Stages:
    """Progress of a job made of ``n`` library calls, each reporting its own 0..1: one bar over all of them."""

    def __init__(self, progress, n: int):
        self.progress, self.n, self.i = progress, max(int(n), 1), 0

    def part(self, prefix: str = ""):
        i = self.i
        self.i += 1
        return lambda f, msg="": self.progress((i + min(max(float(f), 0.0), 1.0)) / self.n, f"{prefix}{msg}")


# ---- importance ---------------------------------------------------------------------------------------------------

def start_importance(loaded, names: list[str], options: dict, calib):
    """Compute the maps of ``names`` in the background (cached maps are taken at once). Finished maps are kept when
    a later one is cancelled or fails. Returns the job (None when one is already running)."""
    crits, spec, store = available(), state.session_spec(), state.shared()
    if calib is not None:
        state.save(lambda ss: ss.__setitem__("calib", calib))
    todo = []
    for name in names:
        cal = calib if crits[name].needs_calibration else None
        key = state.imap_key(spec, name, options[name], cal.describe() if cal is not None else None)
        todo.append((name, cal, key, state.cached_imap(key)))
    model, geom, n_params = loaded.model, geometry_of(loaded.model), dense_params(loaded.model)

    def work(progress, cancel):
        stages, done = Stages(progress, len(todo)), []
        for name, cal, key, imap in todo:
            part = stages.part(f"{crits[name].title}: ")
            if imap is None:
                try:
                    imap = compute(model, name, cal, options[name], progress=part, cancel=cancel)
                except Cancelled:
                    break
                store.remember(store.imaps, key, imap.to_dict(), 64)
            tokens = 0
            if cal is not None:
                n, T = (int(x) for x in cal.tokens.shape)
                tokens = crits[name].estimate(geom, n_params, n, T, options[name]).get("forward_tokens", 0)
            done.append((name, imap, tokens))
            if cancel():
                break
        return done

    def apply(ss, done):
        for name, imap, tokens in done:
            ss["imaps"][name] = imap
            seconds = float((imap.meta or {}).get("seconds") or 0.0)
            if tokens > 0 and seconds > 0:
                ss.setdefault("cost_rates", {})[name] = seconds / tokens

    label = "Computing " + (", ".join(names) if len(names) <= 3 else f"{len(names)} criteria")
    return jobs_panel.submit("scoring", label, work, apply)


# ---- evaluation ---------------------------------------------------------------------------------------------------

def start_evaluation(loaded, plan, text_name: str, text: str, protocol: str):
    """Dense, pruned (and, after LoRA recovery, pruned + LoRA) perplexity in the background, into ``evals``, the
    history and the run store. A cancelled evaluation is stored as partial (``complete=False``) when any window
    was scored. Returns the job (None when one is already running)."""
    model, how = state.compare_model(loaded, plan, lora=False)
    recovery, entry = state.recovery_for(plan), services.history_entry(plan)
    spec, store = state.session_spec(), state.shared()
    key = dense_key(spec, text, protocol)
    cached = store.results.get(key)
    base, tok = loaded.model, loaded.tokenizer
    params, n_dense, sha = plan.param_count(base), dense_params(base), plan.sha256()

    def work(progress, cancel):
        stages = Stages(progress, (cached is None) + 1 + (recovery is not None))
        dense = cached
        if dense is None:
            dense = perplexity(base, tok, text, protocol, progress=stages.part("dense: "), cancel=cancel)
            if dense.complete:
                store.remember(store.results, key, dense, 256)
        pruned = perplexity(model, tok, text, protocol, progress=stages.part("pruned: "), cancel=cancel)
        lora = None
        if recovery is not None and pruned.complete:
            lora = perplexity(recovery.model, tok, text, protocol, progress=stages.part("pruned + LoRA: "),
                              cancel=cancel)
        if not (dense.n_windows and pruned.n_windows):
            return None
        has_lora = lora is not None and lora.n_windows > 0
        complete = bool(dense.complete and pruned.complete and (recovery is None or (has_lora and lora.complete)))
        out = EvalRecord(sha, entry.summary, text_name, protocol, pruned.protocol.describe(), dense.ppl, pruned.ppl,
                         pruned.n_tokens, how, complete, pruned.seconds, params, n_dense, time.strftime("%H:%M:%S"),
                         lora.ppl if has_lora else None, recovery.tag if has_lora else None)
        return out, dataclasses.replace(entry, params=params, dense_ppl=out.dense_ppl, ppl=out.pruned_ppl,
                                        lora_ppl=out.lora_ppl, protocol=protocol)

    def apply(ss, result):
        if result is not None:
            out, measured = result
            persist.add_eval(ss, out, entry.plan_json)
            state.add_history(measured, ss)

    return jobs_panel.submit("evaluation", "Evaluating perplexity", work, apply)


# ---- sweep --------------------------------------------------------------------------------------------------------

def start_sweep(loaded, criteria: list[str], ratios: list[float], what: str, text: str, protocol: str,
                latency: bool, kl: bool = False):
    """:func:`pruneviz.evaluate.sweep` over the session's maps of ``criteria`` in the background, into
    ``session_state.sweep`` and the run store. A cancelled sweep keeps its finished points. Returns the job."""
    imaps = {c: st.session_state["imaps"][c] for c in criteria}
    have_dense = any(p.criterion == "dense" and (not latency or p.ms_per_token)
                     for p in state.sweep_points(protocol, text))
    spec, store = state.session_spec(), state.shared()
    key = dense_key(spec, text, protocol)
    cached = store.results.get(key)
    base, tok = loaded.model, loaded.tokenizer

    def work(progress, cancel):
        stages = Stages(progress, (not have_dense and cached is None) + 1 + bool(kl))
        dense = False
        if not have_dense:
            dense = cached
            if dense is None:
                dense = perplexity(base, tok, text, protocol, progress=stages.part("dense: "), cancel=cancel)
                if dense.complete:
                    store.remember(store.results, key, dense, 256)
        points = sweep(base, tok, imaps, ratios, what, text, protocol, progress=stages.part(), cancel=cancel,
                       latency=latency, dense=dense if dense and dense.complete else False)
        if kl and not cancel():
            points = with_fidelity(base, tok, points, text, protocol, stages.part("KL: "), cancel)
        return [p for p in points if p.complete and (not kl or p.kl_mean is not None)]

    def apply(ss, done):
        for p in done:
            services.append_once(ss.setdefault("sweep", []), p)
        persist.record_sweep(done, ss)

    return jobs_panel.submit("sweep", f"Sweeping {len(criteria) * len(ratios)} configurations", work, apply)
