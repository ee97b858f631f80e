"""Per-layer pruning-ratio schedules: SlimGPT's incremental ratio (Ling et al., arXiv 2412.18110, Eq. 6).

Shallow layers are more sensitive to pruning (errors there propagate through every later layer), so SlimGPT
prunes them less: ``r_i = r_0 + (r_{n-1} - r_0)·f_i`` with ``f_i = log(i+1)/log(n)`` (``log_increase``) or
``i/(n-1)`` (``linear_increase``), the end point solved so the mean is the target. Used by the SlimGPT solver
(:func:`pruneviz.criteria.slimgpt.slimgpt_prune`) and by the ``incremental`` allocator (:mod:`pruneviz.allocate`).
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
