"""Cached calls behind the Inspect page (:mod:`pruneviz.inspection`), so reruns that change nothing cost nothing.

- the dense inspection of a prompt is shared by every session of the process (it depends on the model and the
  prompt only);
- removal effects are computed on request (a :class:`~pruneviz.ui.work.Job` with progress and Cancel) and kept
  in the session for the model, prompt and position they were measured at;
- a plan's per-token effect is kept in the session for the plan, the prompt and the model standing for "pruned".
"""
from __future__ import annotations

import streamlit as st

from ..inspection import Inspection, PlanEffect, RemovalEffects, inspect_prompt, plan_effect, removal_effects
from . import state
from .work import Job

EFFECTS_KEY = "inspect_effects"  # session: (record key, RemovalEffects)
PLAN_EFFECT_KEY = "inspect_plan_effect"  # session: (record key, PlanEffect)


def inspection(loaded, prompt: str, max_tokens: int) -> Inspection:
    """:func:`pruneviz.inspection.inspect_prompt` of the session's dense model, cached per process."""
    key = f"inspect|{state.session_spec().key}|{max_tokens}|{prompt}"
    found = state.cached_result(key)
    if found is None:
        found = inspect_prompt(loaded.model, loaded.tokenizer, prompt, max_tokens=max_tokens)
        state.store_result(key, found)
    return found


def _effects_key(prompt: str, position: int, max_tokens: int) -> str:
    return f"{state.session_spec().key}|{max_tokens}|{position}|{prompt}"


def stored_effects(prompt: str, position: int, max_tokens: int) -> RemovalEffects | None:
    """The session's removal effects for this model, prompt and position, if measured."""
    rec = st.session_state.get(EFFECTS_KEY)
    return rec[1] if rec and rec[0] == _effects_key(prompt, position, max_tokens) else None


def compute_effects(loaded, prompt: str, position: int, max_tokens: int, batch_size: int = 16) -> bool:
    """Measure :func:`pruneviz.inspection.removal_effects` (every head, KV group and MLP) into the session."""
    key = _effects_key(prompt, position, max_tokens)
    with Job("Removing each unit in turn…", key="ins_job", done_label="Removal effects measured") as job:
        eff = removal_effects(loaded.model, loaded.tokenizer, prompt, position=position, batch_size=batch_size,
                              max_tokens=max_tokens, progress=job.progress, cancel=job.cancelled)
        if not job.cancelled():
            state.save(lambda ss: ss.update({EFFECTS_KEY: (key, eff)}))
    return job.ok


def plan_effect_for(loaded, plan, prompt: str, max_tokens: int, k: int = 5) -> tuple[PlanEffect, str]:
    """:func:`pruneviz.inspection.plan_effect` of the dense base vs the plan's model (built, recovered or masked:
    :func:`pruneviz.ui.state.compare_model`) and how that model was made; cached per session."""
    model, how = state.compare_model(loaded, plan)
    key = (plan.sha256(), prompt, max_tokens, k, id(model))
    rec = st.session_state.get(PLAN_EFFECT_KEY)
    if not rec or rec[0] != key:
        rec = (key, plan_effect(loaded.model, model, loaded.tokenizer, prompt, k=k, max_tokens=max_tokens))
        st.session_state[PLAN_EFFECT_KEY] = rec
    return rec[1], how
