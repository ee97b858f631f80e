"""The Evaluate page's Pareto view of a sweep: perplexity (or KL to dense) vs parameters (or measured decoding
tokens/s), one trace per criterion and allocation, the front of undominated configurations
(:func:`pruneviz.compare.pareto_front`) drawn over them and the current plan marked.

Speed is the sweep's measured decoding latency at batch 1 (``SweepPoint.ms_per_token``, when the sweep was run
with "Also measure latency"); KL is there when it ran with "Also measure KL". The current plan is the sweep point
made of the same plan, else its latest evaluation under the same protocol and text (perplexity and parameters).
"""
from __future__ import annotations

import streamlit as st

from ..compare import pareto_front, tokens_per_s
from ..evaluate import SweepPoint
from . import linked, state

X_AXES = {"parameters": ("params", "parameters (millions)", "low", 1e6),
          "tokens/s": (tokens_per_s, "decoding tokens / s (measured, batch 1)", "high", 1.0)}
Y_AXES = {"perplexity": ("ppl", "perplexity"), "KL to dense": ("kl_mean", "KL(dense || pruned) per token")}


def current_points(points: list, plan, protocol: str, text) -> list:
    """The sweep points of ``plan``; else its latest evaluation under ``protocol`` on ``text`` as a point."""
    if plan.is_empty():
        return []
    sha = plan.sha256()
    mine = [p for p in points if p.plan is not None and p.plan.sha256() == sha]
    if mine:
        return mine
    e = state.latest_eval(plan, complete_only=True)
    if e is None or text is None or e.protocol != protocol or e.text != text.name:
        return []
    return [SweepPoint("current plan", 0.0, "-", e.params, e.pruned_ppl, protocol, "", e.tokens, plan)]


def pareto_panel(points: list, dense, plan, protocol: str, text) -> None:
    """The Pareto view of the sweep ``points`` (not the dense one, given as ``dense``)."""
    xs = ["parameters"] + (["tokens/s"] if any(p.ms_per_token for p in points) else [])
    ys = ["perplexity"] + (["KL to dense"] if any(p.kl_mean is not None for p in points) else [])
    c1, c2 = st.columns(2)
    x_name = c1.segmented_control("Pareto: x", xs, default="parameters", key="ev_pareto_x", required=True,
                                  help="tokens/s appears when the sweep measured latency.") or "parameters"
    y_name = c2.segmented_control("Pareto: y", ys, default="perplexity", key="ev_pareto_y", required=True,
                                  help="KL appears when the sweep measured it.") or "perplexity"
    x, x_label, x_better, x_scale = X_AXES[x_name]
    y, y_label = Y_AXES[y_name]
    current = current_points(points, plan, protocol, text)
    fig = linked.pareto_figure(points, x, y, x_label=x_label, y_label=y_label, x_better=x_better, current=current,
                               dense=dense, log_y=y == "ppl", x_scale=x_scale,
                               title=f"Pareto view: {y_name} vs {x_name}")
    st.plotly_chart(fig, key="ev_pareto_fig", config={"displaylogo": False})
    front = [points[i] for i in pareto_front(points, x, y, x_better=x_better)]
    names = ", ".join(f"{p.criterion} · {p.what} {p.ratio:.0%}" for p in front) or "none"
    st.caption(f"On the front (no other configuration is better on both): {names}. Ringed: the current plan"
               + ("." if current else " (not in this sweep and not evaluated on this text and protocol)."))
