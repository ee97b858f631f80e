"""Long journeys run as background jobs (:mod:`pruneviz.ui.jobs_panel`): importance scoring (Importance page), the
SlimGPT solver and the recommended recipe (Prune page), perplexity evaluation, LoRA recovery and ratio sweeps
(Evaluate page).

Each ``start_*`` reads what it needs from the session in the script thread, hands the job a ``work(progress,
cancel)`` that calls only :mod:`pruneviz` functions on those objects (shared caches are written through the
thread-safe :class:`~pruneviz.ui.state.SharedStore`), and an ``apply(session_state, result)`` that stores the
result in whichever session owns the job when it is collected (the same one, or the one after a page reload).
A job stops only when its owner presses Cancel (never because the page that started it was reloaded or closed, as
the in-page :class:`pruneviz.ui.work.Job` does); at most one job of a kind runs per owner (``start_*`` returns None
and says so otherwise).
"""
from __future__ import annotations

import dataclasses
import time

import streamlit as st

from .. import recipe as recipes
from ..allocate import Target
from ..arch import geometry_of
from ..criteria.slimgpt import slimgpt_prune
from ..data import text_hash
from ..errors import PlanError
from ..evaluate import perplexity, sweep
from ..fidelity import with_fidelity
from ..importance import Cancelled, available, compute
from ..plan import dense_params
from ..recovery import recover
from . import jobs_panel, persist, services, state
from .state import EvalRecord, PrunedRecord, RecoveryRecord


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
    params, n_dense = plan.param_count(base), dense_params(base)

    def work(progress, cancel):
        stages = Stages(progress, (cached is None) + 1 + (recovery is not None))
        dense, pruned, lora = _perplexities(base, tok, model, recovery.model if recovery else None, text, protocol,
                                            store, key, cached, stages, cancel)
        return _measured(entry, text_name, protocol, how, dense, pruned, lora, recovery.tag if recovery else None,
                         params, n_dense)

    def apply(ss, result):
        if result is not None:
            out, measured = result
            persist.add_eval(ss, out, entry.plan_json)
            state.add_history(measured, ss)

    return jobs_panel.submit("evaluation", "Evaluating perplexity", work, apply)


def _perplexities(base, tok, model, lora_model, text: str, protocol: str, store, key: str, cached, stages, cancel):
    """Dense (from the process cache ``key`` when there), pruned and (with ``lora_model``, once pruned finished)
    pruned + LoRA perplexity: three :func:`pruneviz.evaluate.perplexity` calls, one stage each."""
    dense = cached
    if dense is None:
        dense = perplexity(base, tok, text, protocol, progress=stages.part("dense: "), cancel=cancel)
        if dense.complete:
            store.remember(store.results, key, dense, 256)
    pruned = perplexity(model, tok, text, protocol, progress=stages.part("pruned: "), cancel=cancel)
    lora = None
    if lora_model is not None and pruned.complete:
        lora = perplexity(lora_model, tok, text, protocol, progress=stages.part("pruned + LoRA: "), cancel=cancel)
    return dense, pruned, lora


def _measured(entry, text_name: str, protocol: str, how: str, dense, pruned, lora, tag: str | None, params: int,
              n_dense: int):
    """The :class:`EvalRecord` of one evaluation and its history entry with the numbers; None when no window was
    scored. ``tag`` names the LoRA recovery that was to be measured (None: none)."""
    if not (dense.n_windows and pruned.n_windows):
        return None
    has_lora = lora is not None and lora.n_windows > 0
    complete = bool(dense.complete and pruned.complete and (tag is None or (has_lora and lora.complete)))
    out = EvalRecord(entry.sha, entry.summary, text_name, protocol, pruned.protocol.describe(), dense.ppl, pruned.ppl,
                     pruned.n_tokens, how, complete, pruned.seconds, params, n_dense, time.strftime("%H:%M:%S"),
                     lora.ppl if has_lora else None, tag if has_lora else None)
    return out, dataclasses.replace(entry, params=params, dense_ppl=out.dense_ppl, ppl=out.pruned_ppl,
                                    lora_ppl=out.lora_ppl, protocol=protocol)


# ---- solver and recipe: a plan and its built model ----------------------------------------------------------------

def _adopt(ss, plan, model, seconds: float, calib) -> None:
    """Make a solver's or recipe's ``plan`` the session's, its built ``model`` the pruned record, ``calib`` the
    session's calibration, and record it in the history (what the Prune page did in-page before)."""
    entry = services.history_entry(plan, settings=None, edits=[])
    state.set_plan(plan, None, [], ss)
    ss.update(pruned=PrunedRecord(plan.sha256(), model, plan, seconds), calib=calib)
    state.add_history(entry, ss)


def start_solver(loaded, calib, target: float, schedule: str, attn_unit: str):
    """The SlimGPT solver (:func:`pruneviz.criteria.slimgpt.slimgpt_prune`: plan and compensated model at once) in
    the background; its plan becomes the session's, its model the pruned record, ``calib`` the session's
    calibration. A cancelled solver leaves nothing. Returns the job (None when one is already running)."""
    model = loaded.model

    def work(progress, cancel):
        t0 = time.perf_counter()
        plan, pruned = slimgpt_prune(model, calib, target, schedule=schedule, attn_unit=attn_unit,
                                     progress=progress, cancel=cancel)
        return (plan.with_provenance(criterion="slimgpt", strategy="slimgpt solver"), pruned,
                time.perf_counter() - t0)

    def apply(ss, result):
        plan, pruned, seconds = result
        _adopt(ss, plan, pruned, seconds, calib)

    return jobs_panel.submit("solver", f"Running the SlimGPT solver ({target:.0%})", work, apply)


def start_recipe(loaded, target: float, multiple_of: int = 1, calib=None, samples: int | None = None):
    """The recommended recipe (:func:`pruneviz.recipe.run_recipe` with :data:`pruneviz.recipe.RECOMMENDED`) to
    ``target``, a share of the non-embedding parameters, in the background: its plan becomes the session's, its
    built (compensated) model the pruned record, its calibration the session's. ``multiple_of``: MLP widths kept
    in multiples of it (:attr:`pruneviz.allocate.AllocOptions.multiple_of`). ``calib``: windows of a text to use
    instead of the self-generated calibration (the recipe recorded in the plan then says ``calibration="text"``,
    as the CLI's ``prune --calibration text``). ``samples``: how many windows the model writes for itself
    (default the recipe's; the CLI's ``prune --samples``). A cancelled recipe leaves nothing. Returns the job
    (None when one is already running)."""
    model, tok, recipe = loaded.model, loaded.tokenizer, recipes.RECOMMENDED
    if samples is not None:
        recipe = dataclasses.replace(recipe, samples=int(samples))
    if multiple_of > 1:
        recipe = recipe.with_alloc(multiple_of=int(multiple_of))
    if calib is not None:
        recipe = dataclasses.replace(recipe, calibration="text", text=calib.text_name,
                                     samples=int(calib.tokens.shape[0]), seq_len=int(calib.tokens.shape[1]),
                                     seed=int(calib.seed))

    def work(progress, cancel):
        t0 = time.perf_counter()
        res = recipes.run_recipe(model, tok, Target(target, "non_embedding"), recipe=recipe, progress=progress,
                                 cancel=cancel, calibration=calib)
        return res, time.perf_counter() - t0

    def apply(ss, result):
        res, seconds = result
        _adopt(ss, res.plan, res.model, seconds, res.calibration)

    return jobs_panel.submit("recipe", f"Running the recommended recipe ({target:.0%})", work, apply)


# ---- LoRA recovery ------------------------------------------------------------------------------------------------

def start_recovery(loaded, plan, options, train_name: str, train_text: str, eval_name: str | None = None,
                   eval_text: str | None = None, protocol: str = "quick"):
    """LoRA-fine-tune a copy of the session's pruned model for ``plan`` (:func:`pruneviz.recovery.recover`) in the
    background and keep it as the pruned record's ``recovery``; then, with ``eval_text``, measure dense / pruned /
    pruned + LoRA perplexity into ``evals`` and the history. The base and the pruned model stay unchanged. The
    job's progress message carries the step and its loss ("LoRA step 12/100: loss 3.2104"); the loss curve is
    drawn once the result is stored. A cancelled run keeps the steps done so far (merged), without the evaluation.
    Returns the job (None when one is already running)."""
    pruned = state.pruned_for(plan)
    if pruned is None:
        raise PlanError("build the pruned model for this plan first (Prune page); LoRA fine-tunes the built model")
    sha, entry = plan.sha256(), services.history_entry(plan)
    spec, store = state.session_spec(), state.shared()
    key = dense_key(spec, eval_text, protocol) if eval_text is not None else ""
    cached = store.results.get(key) if eval_text is not None else None
    base, tok = loaded.model, loaded.tokenizer
    params, n_dense = plan.param_count(base), dense_params(base)
    share = 0.8 if eval_text is not None else 1.0  # of the bar: training, then the three perplexities

    def work(progress, cancel):
        res = recover(pruned, tok, train_text, options, progress=lambda f, msg="": progress(share * f, msg),
                      cancel=cancel)
        if not res.steps_done:
            return None
        tag, measured = services.lora_tag(res.record), None
        if eval_text is not None and not cancel():
            rest = Stages(lambda f, msg="": progress(share + (1 - share) * f, msg), (cached is None) + 2)
            dense, ppl, lora = _perplexities(base, tok, pruned, res.model, eval_text, protocol, store, key, cached,
                                             rest, cancel)
            measured = _measured(entry, eval_name or "text", protocol, "physically pruned", dense, ppl, lora, tag,
                                 params, n_dense)
        return res, tag, measured

    def apply(ss, result):
        if result is None:
            return
        res, tag, measured = result
        tokens = res.steps_done * options.batch_size * options.seq_len
        if tokens > 0 and res.seconds > 0:
            ss.setdefault("cost_rates", {})["lora"] = res.seconds / tokens
        _attach_recovery(ss, sha, RecoveryRecord(res.model, tuple(res.losses), res.record, tag, res.cancelled,
                                                 res.seconds, train_name))
        if measured is not None:
            out, hist = measured
            persist.add_eval(ss, out, entry.plan_json)
            state.add_history(hist, ss)

    return jobs_panel.submit("lora", f"Fine-tuning with LoRA ({options.steps} steps)", work, apply)


def _attach_recovery(ss, sha: str, rec: RecoveryRecord) -> None:
    cur = ss.get("pruned")
    if cur is not None and cur.sha == sha:  # the plan may have been rebuilt meanwhile: then it belongs nowhere
        ss["pruned"] = dataclasses.replace(cur, recovery=rec)
        ss["preview"] = None


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
