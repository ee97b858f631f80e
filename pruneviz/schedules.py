"""Per-layer pruning-ratio schedules: SlimGPT's incremental ratio (Ling et al., arXiv 2412.18110, Eq. 6).

Shallow layers are more sensitive to pruning (errors there propagate through every later layer), so SlimGPT
prunes them less: ``r_i = r_0 + (r_{n-1} - r_0)·f_i`` with ``f_i = log(i+1)/log(n)`` (``log_increase``) or
``i/(n-1)`` (``linear_increase``), the end point solved so the mean is the target. Used by the SlimGPT solver
(:func:`pruneviz.criteria.slimgpt.slimgpt_prune`) and by the ``incremental`` allocator (:mod:`pruneviz.allocate`).
:func:`cosine_ratios` holds SlimLLM's ratios from each block's input/output cosine (the ``slimllm`` allocator).
"""
from __future__ import annotations

import math

from .errors import CriterionError

SCHEDULES = ("log_increase", "uniform", "linear_increase", "log_decrease", "linear_decrease")
R0_FRACTION = 0.3125  # paper's README example: 20% mean -> r_0 = 0.0625


# ---- incremental pruning ratio (Eq. 6) ----------------------------------------------------------------------------

def _increase_shape(n: int, schedule: str) -> list[float]:
    """Increasing curve f_i in [0, 1]: log(i+1)/log(n) (log) or i/(n-1) (linear)."""
    if schedule.startswith("log"):
        return [math.log(i + 1) / math.log(n) for i in range(n)]
    return [i / (n - 1) for i in range(n)]


def schedule_curve(n_layers: int, r_first: float, r_last: float, schedule: str = "log_increase") -> list[float]:
    """Per-layer ratios between given end points, unclipped: ``r_i = r_0 + (r_{n−1} − r_0)·f_i``.

    Eq. 6 of the paper with ``log(n)`` for ``n`` layers (the official code hard-codes ``log(32)``). For the
    ``*_decrease`` schedules the increasing curve is reversed (layer 0 gets ``r_last``).
    """
    if schedule not in SCHEDULES:
        raise CriterionError(f"unknown SlimGPT schedule {schedule!r}; one of {', '.join(SCHEDULES)}")
    if schedule == "uniform" or n_layers == 1:
        return [float(r_first)] * n_layers
    f = _increase_shape(n_layers, schedule)
    ratios = [r_first + (r_last - r_first) * x for x in f]
    return ratios[::-1] if schedule.endswith("decrease") else ratios


def layer_ratios(n_layers: int, target: float, schedule: str = "log_increase", r0: float | None = None,
                 max_ratio: float = 0.9) -> list[float]:
    """Pruning ratio of each layer so that their mean is ``target`` (SlimGPT's incremental ratio).

    ``r0`` is the smallest ratio (layer 0 for increasing schedules); default ``target · 0.3125``, which reproduces
    the paper's 20% example (r_0 = 0.0625). The largest ratio is solved so the mean equals ``target``
    (``r_{n−1} = r_0 + (target − r_0)/mean(f)``); ratios are clipped to ``[0, max_ratio]`` and, if clipping moved
    the mean, the largest ratio is re-solved by bisection. ``uniform`` gives ``target`` everywhere.
    """
    if not 0.0 <= target <= max_ratio:
        raise CriterionError(f"the SlimGPT target ratio must be in [0, {max_ratio}], got {target}")
    r0 = target * R0_FRACTION if r0 is None else float(r0)
    if schedule == "uniform" or n_layers == 1 or target == 0:
        return [float(target)] * n_layers
    if not 0.0 <= r0 <= target:
        raise CriterionError(f"r0 (the smallest layer ratio) must be in [0, target={target}], got {r0}")
    f_mean = sum(_increase_shape(n_layers, schedule)) / n_layers
    curve = lambda r_last: [min(max(r, 0.0), max_ratio)  # noqa: E731
                            for r in schedule_curve(n_layers, r0, r_last, schedule)]
    r_last = r0 + (target - r0) / f_mean
    if max(schedule_curve(n_layers, r0, r_last, schedule)) > max_ratio:
        lo, hi = r0, r0 + (target - r0) / f_mean * n_layers + max_ratio
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if sum(curve(mid)) / n_layers < target else (lo, mid)
        r_last = (lo + hi) / 2
    return curve(r_last)


# ---- SlimLLM: ratios from each layer's input/output cosine ----------------------------------------------------------

def cosine_ratios(cosines: list[float], target: float, alpha: float = 10.0, pruned_layers: int | None = None,
                  max_ratio: float = 0.9) -> list[float]:
    """SlimLLM's layer ratios (Guo et al., ICML 2025; official ``hf_prune.py``): a block whose output is most
    similar to its input (mean token cosine ``c_l``) is the most redundant and is pruned the most.

    The ``pruned_layers`` blocks of highest cosine (all by default; ties to the lower index) get
    ``r_l = r · n · softmax(α·c)_l`` (softmax over those ``n`` blocks), the others 0. The paper's ``r`` is the mean
    over the pruned blocks; here it is ``r = target · L / n`` so that the mean over all ``L`` blocks is ``target``
    (the README's LLaMA-7B command, ``r = 0.25`` on 26 of 32 layers, is ``target ≈ 0.2``). The paper has no bound;
    here ratios are capped at ``max_ratio`` and what a capped block cannot take is re-spread over the other pruned
    blocks in proportion to their softmax weights, then (only when every pruned block is capped) over the rest by
    the same rule. Ratios are non-decreasing in the cosine. Raises CriterionError when ``target > max_ratio``.
    """
    n_all = len(cosines)
    if not 0.0 <= target <= max_ratio:
        raise CriterionError(f"the mean layer ratio must be in [0, {max_ratio}], got {target}")
    n = n_all if pruned_layers is None else min(max(int(pruned_layers), 1), n_all)
    order = sorted(range(n_all), key=lambda i: (-float(cosines[i]), i))
    ratios = [0.0] * n_all
    left = target * n_all
    for tier in (order[:n], order[n:]):
        left = _water_fill(ratios, tier, [alpha * float(cosines[i]) for i in tier], left, max_ratio)
    return ratios


def _water_fill(ratios: list[float], idx: list[int], logits: list[float], mass: float, cap: float) -> float:
    """Spread ``mass`` over ``ratios[idx]`` in proportion to ``softmax(logits)``, each at most ``cap``; returns
    what did not fit."""
    open_ = list(range(len(idx)))
    while mass > 1e-12 and open_:
        top = max(logits[k] for k in open_)
        w = {k: math.exp(logits[k] - top) for k in open_}
        total = sum(w.values())
        full = [k for k in open_ if mass * w[k] / total >= cap - ratios[idx[k]]]
        if not full:
            for k in open_:
                ratios[idx[k]] += mass * w[k] / total
            return 0.0
        for k in full:
            mass -= cap - ratios[idx[k]]
            ratios[idx[k]] = cap
        open_ = [k for k in open_ if k not in full]
    return mass
