"""Allocation: from an importance map and a parameter target to a :class:`~pruneviz.plan.Plan`.

A criterion only *ranks* units; how many units to remove *where* is a separate decision, and the papers differ
mostly in it. Each strategy here is a small function behind a registry (:func:`register_allocator`):

- ``uniform``: the same number of units in every layer, ranked within each layer (MINI-LLM Algorithm 1 line 8,
  LLM-Pruner, Wanda-sp). Attention and MLP lose the same *fraction of their parameters* unless ``attn_share``
  says otherwise.
- ``incremental``: per-layer ratios that grow with depth (SlimGPT "Incremental Pruning Ratio", Eq. 6), taken
  from :func:`pruneviz.schedules.layer_ratios`.
- ``global``: scores standardised per layer and structure, then ranked across all layers (FLAP "AL-AM"), which
  gives adaptive, non-uniform widths.
- ``depth``: the k least important whole blocks (Shortened LLaMA, ShortGPT), optionally with the Shortened "+"
  rule that never removes the first four and the last two blocks.
- ``combined``: a share of the budget as blocks, the rest as width.

Entry points: :func:`allocate` (a parameter :class:`Target` and a strategy) and :func:`plan_from_ratios` (the
app's sliders: a share of attention units, a share of MLP channels, a number of blocks).

**Targets are stated, never implied**: :class:`Target` says which share of *which* parameters goes (all of them, or
the non-embedding ones, the default, since embeddings are never pruned). Accounting is exact: every plan's size
comes from :meth:`Plan.param_count`, and the plan's provenance records criterion, strategy, target, the achieved
ratio and the parameter counts before and after.

**Units.** Attention is pruned either as whole KV groups (``attn_unit="kv"``: key/value rows plus every query
head reading them, which also shrinks the KV cache) or as query heads (``attn_unit="head"``: the same number of
heads from *every* KV group of a layer, the lowest-scored within each group, so physical surgery stays
possible, see :meth:`Plan.check_gqa`). For multi-head families a KV group *is* a head, and ``"head"`` means
``"kv"``. Every kept layer keeps at least one KV group, one query head per kept group and one MLP channel; a
target that cannot be met under these rules raises :class:`PlanError` saying how far it falls short.

**Rounding** is deterministic: counts round half up, ties between equal scores go to the lower index (lower
layer first), and "closest prefix" choices prefer the smaller removal on a tie.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .arch import geometry_of
from .decilm import family_refusal
from .errors import CriterionError, PlanError
from .importance import ImportanceMap, available, load_builtin_criteria
from .plan import Plan, dense_params
from .schedules import layer_ratios

TARGET_OF = ("total", "non_embedding")
ATTN_UNITS = ("kv", "head")
NORMALIZE = ("auto", "layer", "map", "none")
ATTN_ROUNDING = ("down", "nearest")
WIDTH_STRATEGIES = ("uniform", "incremental", "global")
DEPLOYABLE = ("stock", "vllm")  # runtimes a plan can be restricted to (AllocOptions.deployable)
MAX_LAYER_RATIO = 0.9  # SlimGPT layer_ratios' default ceiling on any one layer's ratio


def plus_rule_protected(n_layers: int) -> frozenset[int]:
    """Blocks the Shortened LLaMA "+" rule never removes: the first four and the last two."""
    return frozenset(b for b in (0, 1, 2, 3, n_layers - 2, n_layers - 1) if 0 <= b < n_layers)


def round_half_up(x: float) -> int:
    """Deterministic rounding (Python's ``round`` rounds half to even)."""
    return int(math.floor(x + 0.5))


def round_units(x: float, rounding: str) -> int:
    """A whole number of units for ``x``: ``"down"`` floors (with a 1e-9 guard against float error such as
    0.6 / 0.2 = 2.9999999999999996), ``"nearest"`` rounds half up."""
    return int(math.floor(x + 1e-9)) if rounding == "down" else round_half_up(x)


# ---- targets ---------------------------------------------------------------------------------------------------------

def check_ratio(ratio: float, what: str = "ratio") -> float:
    """``ratio`` as a float in (0, 1), or a PlanError that says what the number would mean."""
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise PlanError(f"the {what} must be a number between 0 and 1 (exclusive), not {ratio!r}") from None
    if math.isnan(r):
        raise PlanError(f"the {what} is not a number; choose between 0 and 1 (exclusive)")
    if r > 1:
        raise PlanError(f"a {what} of {r:g} would remove more than the model has; choose between 0 and 1 (exclusive)")
    if r == 1:
        raise PlanError(f"a {what} of 1 would remove the whole model; choose between 0 and 1 (exclusive)")
    if r == 0:
        raise PlanError(f"a {what} of 0 removes nothing; choose between 0 and 1 (exclusive)")
    if r < 0:
        raise PlanError(f"a {what} of {r:g} is negative; choose between 0 and 1 (exclusive)")
    return r


@dataclass(frozen=True)
class Target:
    """Remove ``ratio`` of the model's parameters, counted over ``of``: ``"total"`` or ``"non_embedding"``.

    ``non_embedding`` (the default) leaves out input embeddings, the LM head and learned position embeddings,
    which no strategy prunes; ``total`` counts them (so 20% of total is more of the blocks than 20% of
    non-embedding).
    """

    ratio: float
    of: str = "non_embedding"

    def __post_init__(self):
        object.__setattr__(self, "ratio", check_ratio(self.ratio))
        if self.of not in TARGET_OF:
            raise PlanError(f"a target counts parameters of {' or '.join(map(repr, TARGET_OF))}, not {self.of!r}")

    @property
    def non_embedding(self) -> bool:
        return self.of == "non_embedding"

    def dense(self, model: nn.Module) -> int:
        return dense_params(model, self.non_embedding)

    def budget(self, model: nn.Module) -> float:
        """Parameters to remove (a float: the exact share, before rounding to whole units)."""
        return self.ratio * self.dense(model)

    def describe(self) -> str:
        return f"{self.ratio:.1%} of {self.of.replace('_', '-')} parameters"

    def to_dict(self) -> dict:
        return {"ratio": self.ratio, "of": self.of}


def as_target(target) -> Target | None:
    """Accept a :class:`Target`, a bare ratio (non-embedding) or None."""
    if target is None or isinstance(target, Target):
        return target
    return Target(target)


# ---- options and costs -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AllocOptions:
    """Options shared by the strategies (each reads the ones it needs).

    - ``attn_unit``: ``"kv"`` (whole KV groups) or ``"head"`` (equal numbers of query heads per group).
    - ``attn_share``: share of the *width* budget taken from attention, in [0, 1]. ``None`` = proportional to
      parameters for uniform/incremental (attention and MLP lose the same fraction), pooled ranking for global
      (FLAP decides the split). Whole units: attention rounds first, MLP channels fill the remainder.
    - ``attn_rounding`` (uniform, incremental): how the attention budget becomes a whole number of units.
      ``"down"`` (default) never removes more attention than its share of the budget: a KV group or a query head
      per group is a coarse step (on SmolLM2 one KV group is a third of a layer's attention), so attention loses
      a unit only when the ratio pays for a whole one, and MLP channels, which are fine-grained, fill the rest
      exactly. ``"nearest"`` rounds half up (at 20% on SmolLM2 it removes one of the three KV groups in every
      layer). Measured out of domain (``bench/quality.py``: PTB and a licence text), uniform wanda_sp and taylor
      at 20% that remove a KV group or a query head per group in every layer are 3-6x worse than the same
      budget taken from MLP channels, so rounding down is the default.
    - ``normalize`` (global): ``"layer"`` standardises each layer's scores per structure, ``(s - mean) / std``
      (FLAP's choice; with only 2-3 KV groups per layer this flattens differences between layers), ``"map"``
      standardises over the whole map per structure (keeps differences between layers), ``"none"`` ranks raw
      scores. ``"auto"`` (default) is ``"none"`` for maps their criterion already standardised
      (``imap.extras["standardized"]``: FLAP's AL-AM scores, which standardise the *columns* of each layer before
      aggregating, so standardising the aggregated units again over 3 KV groups would count FLAP's per-layer
      normalisation twice and rank a layer's best group like another layer's worst) and ``"layer"`` otherwise.
    - ``schedule``, ``r0`` (incremental): passed to :func:`pruneviz.schedules.layer_ratios`.
    - ``plus_rule`` (depth, combined): never remove blocks {0, 1, 2, 3, L-2, L-1}.
    - ``skip_first``, ``skip_last`` (width, combined): leave the first / last that many layers at full width.
      This is LLM-Pruner's layer range (``--block_attention_layer_start/end``, ``--block_mlp_layer_start/end``;
      its README prunes layers 4-29 of LLaMA-7B's 32, i.e. ``skip_first=4, skip_last=2``). ``"auto"`` (default)
      takes the map's criterion's own range (:attr:`pruneviz.importance.Criterion.kept_whole`, shares of the
      layers rounded to whole layers): LLM-Pruner's for ``taylor`` (4 and 2 of 30 layers), 0 and 0 (every layer
      prunable, as in Wanda-sp, FLAP, MINI-LLM and SlimGPT) for the others and under ``deployable``. The budget
      is spread over the remaining layers, so they lose more each. On SmolLM2-135M the first and last layers are
      by far the most sensitive to width pruning (see ``bench/results/quality.md``).
    - ``n_blocks`` (depth): remove this many blocks instead of deriving the count from the target.
    - ``deployable``: ``None`` (any plan), ``"stock"`` or ``"vllm"``: only plans that runtime expresses (see
      :func:`deployable_refusal`). ``"stock"``: the same widths in every layer (strategies uniform, depth, combined
      with ``width="uniform"``; no ``skip_first``/``skip_last``). ``"vllm"``: attention cut alike in every kept
      layer (one query-head count, vLLM's DeciLM), as many attention parameters as the strategy would cut; MLP
      channels per layer as the strategy chooses.
    - ``depth_share`` (combined): share of the budget removed as whole blocks, in [0, 1]; ``width`` the width
      strategy for the rest.
    - ``multiple_of``: every pruned layer keeps an MLP width that is a multiple of this (1: any width). Quantised
      GGUF types (q8_0, q4_0) store rows in 32-element blocks, so a ``down_proj`` whose input width is not a
      multiple of 32 stays f16 in a quantised export; GPU kernels and tensor cores prefer multiples of 64 or 128.
      Counts are rounded where the strategy makes them (:func:`aligned_counts`): a uniform plan keeps one width
      in every layer, a per-layer plan rounds each layer up or down by the largest remainders so that it removes
      at least what the strategy asked; the landing then brings the plan to its target as usual. Attention
      widths are whole heads (multiples of ``head_dim``) already.
    """

    attn_unit: str = "kv"
    attn_share: float | None = None
    attn_rounding: str = "down"
    normalize: str = "auto"
    schedule: str = "log_increase"
    r0: float | None = None
    plus_rule: bool = False
    skip_first: int | str = "auto"
    skip_last: int | str = "auto"
    n_blocks: int | None = None
    depth_share: float = 0.5
    width: str = "uniform"
    deployable: str | None = None
    multiple_of: int = 1

    def __post_init__(self):
        _one_of("attn_unit", self.attn_unit, ATTN_UNITS)
        _one_of("normalize", self.normalize, NORMALIZE)
        _one_of("attn_rounding", self.attn_rounding, ATTN_ROUNDING)
        _one_of("width", self.width, WIDTH_STRATEGIES)
        if self.deployable is not None:
            _one_of("deployable", self.deployable, DEPLOYABLE)
        for name in ("attn_share", "depth_share"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= float(v) <= 1.0:
                raise PlanError(f"{name} is a share of the budget between 0 and 1, not {v!r}")
        for name in ("skip_first", "skip_last"):
            v = getattr(self, name)
            if v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise PlanError(f"{name} is a number of layers (0 or more) or 'auto', not {v!r}")
        if self.n_blocks is not None and int(self.n_blocks) < 0:
            raise PlanError(f"n_blocks must be 0 or more, not {self.n_blocks}")
        if isinstance(self.multiple_of, bool) or not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise PlanError(f"multiple_of is a whole number of MLP channels (1 or more), not {self.multiple_of!r}")


def _one_of(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise PlanError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def make_alloc_options(**values) -> AllocOptions:
    known = {f.name for f in dataclasses.fields(AllocOptions)}
    unknown = set(values) - known
    if unknown:
        raise PlanError(f"allocation has no option(s) {sorted(unknown)}; its options are {sorted(known)}")
    return AllocOptions(**values)


def resolved_layer_range(options: AllocOptions, criterion: str | None, n_layers: int) -> AllocOptions:
    """``options`` with ``skip_first`` / ``skip_last`` ``"auto"`` resolved to whole layers: the criterion's
    :attr:`~pruneviz.importance.Criterion.kept_whole` shares of ``n_layers`` (0 for an unknown criterion and under
    ``deployable``, whose plans keep every layer alike), never leaving fewer than one layer to prune."""
    crit = available().get(criterion or "")
    shares = crit.kept_whole if crit is not None and options.deployable is None else (0.0, 0.0)
    first, last = (int(round(n_layers * f)) for f in shares)
    if first + last >= n_layers:
        first, last = 0, 0
    return dataclasses.replace(options, skip_first=first if options.skip_first == "auto" else options.skip_first,
                               skip_last=last if options.skip_last == "auto" else options.skip_last)


@dataclass(frozen=True)
class Costs:
    """Parameters one unit owns (exact, from :meth:`Plan.param_count` differences)."""

    kv: int  # a KV group: key/value rows + all of its query heads
    head: int  # one query head (for multi-head families this includes its key/value rows)
    channel: int
    block: int


def unit_costs(model: nn.Module) -> Costs:
    base = Plan.empty(model)
    p0 = base.param_count(model)
    delta = lambda kind, layer: p0 - base.with_units(kind, layer, [0]).param_count(model)  # noqa: E731
    return Costs(delta("kv", 0), delta("head", 0), delta("channel", 0), delta("block", None))


# ---- ladders: per layer and structure, the order in which units go ------------------------------------------------

@dataclass(frozen=True)
class Ladder:
    """Removal order of one structure in one layer: step ``i`` removes ``steps[i]`` (indices of plan ``kind``).

    Steps are least important first; the last step is never taken (a layer keeps at least one unit), so
    ``room = len(steps) - 1``. ``scores`` are per step, normalised for cross-layer ranking, non-decreasing.
    """

    layer: int
    part: str  # "attn" | "mlp"
    kind: str  # plan kind: "kv" | "head" | "channel"
    steps: tuple[tuple[int, ...], ...]
    scores: tuple[float, ...]
    cost: int

    @property
    def room(self) -> int:
        return len(self.steps) - 1


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over all of ``x``; zeros where the std is zero or undefined (one unit)."""
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(x)
    return (x - x.mean()) / std


def resolved_normalize(imap: ImportanceMap, how: str) -> str:
    """``how``, with ``"auto"`` resolved: ``"none"`` for maps their criterion standardised, else ``"layer"``."""
    if how != "auto":
        return how
    return "none" if imap.extras.get("standardized") else "layer"


def normalise(scores: torch.Tensor, how: str, layers: Sequence[int]) -> torch.Tensor:
    """Scores [L, n] made comparable across layers: per layer, over the map's ``layers``, or unchanged.

    Standardised scores are rounded to 9 decimals so that scores equal in exact arithmetic (the same pattern at
    another scale) tie, and the tie goes to the lower layer, instead of to float noise.
    """
    s = scores.double().clone()  # [L, n]
    if how == "layer":
        for l in layers:
            s[l] = _standardise(s[l])
    elif how == "map":
        idx = torch.as_tensor(list(layers), dtype=torch.long)
        s[idx] = _standardise(s[idx].flatten()).view(len(idx), -1)
    return s if how == "none" else torch.round(s, decimals=9)


def _finite(t: torch.Tensor, name: str, criterion: str) -> torch.Tensor:
    if torch.isnan(t).any():
        raise PlanError(f"the {criterion} {name} scores contain NaN (units that were not scored); "
                        f"re-run the criterion on the dense model")
    return t


def attention_scores(imap: ImportanceMap, unit: str) -> torch.Tensor | None:
    """Scores of the attention units: KV groups [L, G] (falling back to the sum of each group's query heads)
    or query heads [L, H]. None if the map has neither."""
    g = imap.geometry
    if unit == "kv":
        if imap.kv is not None:
            return _finite(imap.kv, "KV-group", imap.criterion)
        if imap.heads is None:
            return None
        return _finite(imap.heads, "head", imap.criterion).view(g.n_layers, g.n_kv, g.group_size).sum(-1)
    return None if imap.heads is None else _finite(imap.heads, "head", imap.criterion)


def _order(scores: Sequence[float], indices: Sequence[int]) -> list[int]:
    """Indices sorted by (score, index): least important first, ties to the lower index."""
    return sorted(indices, key=lambda i: (float(scores[i]), i))


def _kv_ladder(layer: int, raw: torch.Tensor, z: torch.Tensor, cost: int) -> Ladder:
    order = _order(raw[layer], range(raw.shape[1]))  # KV groups of this layer
    return Ladder(layer, "attn", "kv", tuple((i,) for i in order), tuple(float(z[layer, i]) for i in order), cost)


def _head_ladder(layer: int, raw: torch.Tensor, z: torch.Tensor, g, cost: int) -> Ladder:
    """Step j removes, in every KV group, its j-th least important query head."""
    per_group = [_order(raw[layer], g.heads_of(grp)) for grp in range(g.n_kv)]
    steps = tuple(tuple(order[j] for order in per_group) for j in range(g.group_size))
    scores = tuple(float(z[layer, list(s)].mean()) for s in steps)
    return Ladder(layer, "attn", "head", steps, tuple(_running_max(scores)), cost)


def _running_max(xs: Sequence[float]) -> list[float]:
    """Keep step scores non-decreasing (a mean of j-th lowest heads already is; guards float noise)."""
    out, m = [], -math.inf
    for x in xs:
        m = max(m, x)
        out.append(m)
    return out


def _channel_ladder(layer: int, raw: torch.Tensor, z: torch.Tensor, cost: int) -> Ladder:
    order = _order(raw[layer], range(raw.shape[1]))
    return Ladder(layer, "mlp", "channel", tuple((i,) for i in order), tuple(float(z[layer, i]) for i in order),
                  cost)


def effective_attn_unit(unit: str, g) -> str:
    """``"head"`` means ``"kv"`` where every KV group has one query head (multi-head attention); ``"kv"`` means
    ``"head"`` under multi-query attention (one KV head: removing it would remove the whole attention)."""
    if g.n_kv == 1 < g.n_heads:
        return "head"
    return "kv" if g.group_size == 1 else unit


def ladders(imap: ImportanceMap, layers: Sequence[int], costs: Costs, attn_unit: str = "kv",
            normalize: str = "auto") -> dict[str, list[Ladder]]:
    """``{"attn": [...], "mlp": [...]}``: one ladder per layer in ``layers`` for each structure the map scores."""
    g = imap.geometry
    unit = effective_attn_unit(attn_unit, g)
    out: dict[str, list[Ladder]] = {"attn": [], "mlp": []}
    raw = attention_scores(imap, unit)
    if raw is not None:
        z = normalise(raw, resolved_normalize(imap, normalize), layers)
        for l in layers:
            out["attn"].append(_kv_ladder(l, raw, z, costs.kv) if unit == "kv"
                               else _head_ladder(l, raw, z, g, costs.head * g.n_kv))
    if imap.channels is not None:
        raw = _finite(imap.channels, "channel", imap.criterion)
        z = normalise(raw, resolved_normalize(imap, normalize), layers)
        out["mlp"] = [_channel_ladder(l, raw, z, costs.channel) for l in layers]
    return out


def plan_with(plan: Plan, taken: dict[tuple[int, str], int], lads: dict[str, list[Ladder]],
              multiple_of: int = 1, alike: bool = False) -> Plan:
    """Add the first ``taken[(layer, part)]`` steps of each ladder to ``plan``; with ``multiple_of`` > 1 the MLP
    counts are first rounded so that every pruned layer keeps a multiple of it (:func:`aligned_counts`; ``alike``:
    a uniform plan, whose counts stay equal)."""
    if multiple_of > 1 and lads["mlp"]:
        keys = [(ld.layer, "mlp") for ld in lads["mlp"]]
        counts = aligned_counts([taken.get(k, 0) for k in keys], len(lads["mlp"][0].steps), multiple_of, alike)
        taken = {**taken, **dict(zip(keys, counts))}
    for part, group in lads.items():
        for ld in group:
            k = taken.get((ld.layer, part), 0)
            if k:
                plan = plan.with_units(ld.kind, ld.layer, [i for step in ld.steps[:k] for i in step])
    return plan


# ---- counting helpers ------------------------------------------------------------------------------------------------

def closest_prefix(costs: Sequence[float], budget: float) -> int:
    """Length t of the prefix of ``costs`` whose sum is closest to ``budget`` (ties: the shorter prefix)."""
    best_t, best_err, cum = 0, abs(budget), 0.0
    for t, c in enumerate(costs, 1):
        cum += c
        err = abs(cum - budget)
        if err < best_err:
            best_t, best_err = t, err
        elif cum > budget:
            break
    return best_t


def _aligned_options(k: int, width: int, multiple: int) -> tuple[int, int | None]:
    """(fewer, more): the nearest removal counts at or below / at or above ``k`` whose kept width is a multiple
    of ``multiple`` (or the whole ``width``); ``more`` is None when it would keep under one multiple."""
    kept = width - k
    up = min(-(-kept // multiple) * multiple, width)
    down = (kept // multiple) * multiple
    return width - up, (width - down if down >= multiple else None)


def aligned_counts(counts: Sequence[int], width: int, multiple: int, alike: bool = False) -> list[int]:
    """Removal counts per layer (of ``width`` units each) rounded so that each pruned layer keeps a multiple of
    ``multiple`` units (a layer left whole keeps ``width``, whatever it is).

    ``alike`` (a uniform plan: equal counts) keeps the counts equal: the nearest aligned count, ties to the larger
    removal (the landing adds a multiple in every layer when that falls short). Otherwise every layer starts at
    its lower aligned count and layers move to the higher one by the largest remainder ``(k - lower) / (higher -
    lower)`` (ties: lower layer index) until at least ``sum(counts)`` are removed, so the plan never removes less
    than it asked (unless a layer would keep under one multiple: it keeps one) and overshoots by under one
    multiple. Raises PlanError when ``multiple`` exceeds ``width``."""
    if multiple > width:
        raise PlanError(f"multiple_of={multiple} is larger than the MLP width ({width} channels); choose at most "
                        f"{width}")
    if multiple == 1 or not any(counts):
        return list(counts)
    opts = [_aligned_options(k, width, multiple) if k else (0, 0) for k in counts]
    if alike:
        if len(set(counts)) != 1:
            raise PlanError(f"aligned_counts(alike=True) needs equal counts, got {list(counts)}")
        lo, hi = opts[0]
        k = counts[0]
        return [hi if hi is not None and hi - k <= k - lo else lo] * len(counts)
    out = [lo for lo, _ in opts]
    movable = [i for i, (lo, hi) in enumerate(opts) if hi is not None and hi > lo]
    for i in sorted(movable, key=lambda i: (-(counts[i] - opts[i][0]) / (opts[i][1] - opts[i][0]), i)):
        if sum(out) >= sum(counts):
            break
        out[i] = opts[i][1]
    return out


def _hamilton(total: int, weights: Sequence[float]) -> list[int]:
    """Largest-remainder split of ``total`` in proportion to ``weights`` (equal if all are zero)."""
    w = [max(float(x), 0.0) for x in weights]
    if sum(w) <= 0:
        w = [1.0] * len(w)
    quotas = [total * x / sum(w) for x in w]
    counts = [int(math.floor(q)) for q in quotas]
    by_remainder = sorted(range(len(w)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def apportion(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Split ``total`` units over layers in proportion to ``weights``, at most ``caps[i]`` each; what a capped
    layer cannot take is re-split over the others. Returns counts summing to ``min(total, sum(caps))``."""
    counts = [0] * len(caps)
    goal = min(int(total), sum(caps))
    open_ = [i for i, c in enumerate(caps) if c > 0]
    while sum(counts) < goal and open_:
        share = _hamilton(goal - sum(counts), [weights[i] for i in open_])
        for i, s in zip(open_, share):
            counts[i] += min(s, caps[i] - counts[i])
        open_ = [i for i in open_ if counts[i] < caps[i]]
    return counts


# ---- the allocation job ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """Everything an allocator needs: the model, the map, the target, options, unit costs, the empty plan."""

    model: nn.Module
    imap: ImportanceMap
    target: Target | None
    options: AllocOptions
    costs: Costs
    empty: Plan
    extra: float = 0.0  # parameters added to the target's budget so that whole units land at or under the target

    @property
    def geometry(self):
        return self.imap.geometry

    @property
    def budget(self) -> float:
        return 0.0 if self.target is None else self.target.budget(self.model) + self.extra


@dataclass(frozen=True)
class Allocation:
    """An allocator's answer: the plan, how close it can get (``tol`` parameters), and why it stops if capped."""

    plan: Plan
    tol: float
    limit: str


ALLOCATORS: dict[str, Callable[[Job], Allocation]] = {}


def register_allocator(name: str):
    """Decorator: register ``fn(job: Job) -> Allocation`` as strategy ``name``."""
    def deco(fn):
        ALLOCATORS[name] = fn
        return fn
    return deco


def allocators() -> dict[str, Callable[[Job], Allocation]]:
    """Registered strategies, name -> function (its docstring's first line describes it)."""
    load_builtin_criteria()  # criteria modules register their own strategies (blockpruner: sub_blocks)
    return dict(ALLOCATORS)


def get_allocator(name: str) -> Callable[[Job], Allocation]:
    if name not in ALLOCATORS:
        load_builtin_criteria()
    if name not in ALLOCATORS:
        raise PlanError(f"unknown allocation strategy {name!r}; available: {', '.join(sorted(ALLOCATORS))}")
    return ALLOCATORS[name]


def _width_limit(job: Job) -> str:
    unit = "KV group" if effective_attn_unit(job.options.attn_unit, job.geometry) == "kv" \
        else "query head in every KV group"
    if job.geometry.n_kv == 1 < job.geometry.n_heads:
        unit = ("query head (multi-query attention: one KV head per layer, so query heads are the attention unit "
                "and removing them does not shrink the KV cache)")
    o = job.options
    skipped = (f" and skip_first={o.skip_first}, skip_last={o.skip_last} keep those layers whole"
               if o.skip_first or o.skip_last else "")
    return f"every kept layer keeps at least one {unit} and one MLP channel{skipped}"


def need_parts(lads: dict[str, list[Ladder]], share_attn: float | None, imap: ImportanceMap) -> None:
    if not lads["attn"] and not lads["mlp"]:
        raise PlanError(f"the {imap.criterion} map has no head, KV-group or channel scores; width allocation "
                        f"needs them (use a width criterion, or the depth strategy for block scores)")
    if share_attn is not None and share_attn > 0 and not lads["attn"]:
        raise PlanError(f"attn_share={share_attn} but the {imap.criterion} map has no attention scores")
    if share_attn is not None and share_attn < 1 and not lads["mlp"]:
        raise PlanError(f"attn_share={share_attn} leaves budget for MLP channels, but the {imap.criterion} map "
                        f"has no channel scores; set attn_share=1")


def _attn_budget(lads: dict[str, list[Ladder]], share: float | None, budget: float) -> float:
    """Budget for attention: ``share`` of it, or (None) the attention share of prunable width parameters."""
    if not lads["mlp"]:
        return budget
    if not lads["attn"]:
        return 0.0
    if share is not None:
        return share * budget
    size = lambda part: sum(ld.cost * len(ld.steps) for ld in lads[part])  # noqa: E731
    return budget * size("attn") / (size("attn") + size("mlp"))


def _part_round(x: float, part: str, options: AllocOptions) -> int:
    """Units for a part: attention by ``options.attn_rounding``; MLP channels (the remainder) to the nearest."""
    return round_units(x, options.attn_rounding if part == "attn" else "nearest")


# ---- width strategies ------------------------------------------------------------------------------------------------

def uniform_width(job: Job, layers: Sequence[int], budget: float, plan: Plan) -> Allocation:
    """Same number of units removed in every layer; attention rounds first, MLP channels fill the rest."""
    o = job.options
    lads = ladders(job.imap, layers, job.costs, o.attn_unit, o.normalize)
    need_parts(lads, o.attn_share, job.imap)
    taken, left = {}, budget
    for part, part_budget in (("attn", _attn_budget(lads, o.attn_share, budget)), ("mlp", None)):
        if not lads[part]:
            continue
        step = sum(ld.cost for ld in lads[part])  # one unit in every layer
        want = left if part_budget is None else part_budget
        k = min(max(_part_round(want / step, part, o), 0), min(ld.room for ld in lads[part]))
        taken.update({(ld.layer, part): k for ld in lads[part]})
        left -= k * step
    fill = lads["mlp"] or lads["attn"]
    return Allocation(plan_with(plan, taken, lads, o.multiple_of, alike=True), sum(ld.cost for ld in fill),
                      _width_limit(job))


def _global_pick(cands: list[tuple], budget: float) -> dict[tuple[int, str], int]:
    """Take the closest-to-budget prefix of candidates sorted by (score, layer, part, rank, cost)."""
    cands = sorted(cands)
    t = closest_prefix([c[-1] for c in cands], budget)
    taken: dict[tuple[int, str], int] = {}
    for _, layer, part, _, _ in cands[:t]:
        taken[(layer, part)] = taken.get((layer, part), 0) + 1
    return taken


def _candidates(lads: list[Ladder]) -> list[tuple]:
    return [(ld.scores[r], ld.layer, ld.part, r, ld.cost) for ld in lads for r in range(ld.room)]


def global_width(job: Job, layers: Sequence[int], budget: float, plan: Plan) -> Allocation:
    """FLAP-style: normalised scores ranked across layers; pooled attention+MLP unless ``attn_share`` is set."""
    o = job.options
    lads = ladders(job.imap, layers, job.costs, o.attn_unit, o.normalize)
    need_parts(lads, o.attn_share, job.imap)
    if o.attn_share is None:
        taken = _global_pick(_candidates(lads["attn"] + lads["mlp"]), budget)
    else:
        taken = _global_pick(_candidates(lads["attn"]), _attn_budget(lads, o.attn_share, budget))
        spent = sum(taken.values()) * lads["attn"][0].cost if lads["attn"] else 0
        taken.update(_global_pick(_candidates(lads["mlp"]), budget - spent))
    costs = [ld.cost for ld in lads["attn"][:1] + lads["mlp"][:1]]
    return Allocation(plan_with(plan, taken, lads, o.multiple_of), max(costs), _width_limit(job))


def schedule_weights(n_layers: int, mean_ratio: float, schedule: str, r0: float | None) -> list[float]:
    """Per-layer ratios of a schedule (SlimGPT Eq. 6 for ``log_increase``) with the given mean.

    Allocation uses them as proportions only (unit totals come from the budget), so a mean above SlimGPT's
    per-layer ceiling of 0.9 is clipped to it; a target that high fails on the one-unit-per-layer rule anyway.
    """
    try:
        ratios = layer_ratios(n_layers, min(mean_ratio, MAX_LAYER_RATIO), schedule, r0=r0)
    except CriterionError as e:
        raise PlanError(f"incremental allocation: {e}") from e
    return [float(r) for r in ratios]


def incremental_width(job: Job, layers: Sequence[int], budget: float, plan: Plan) -> Allocation:
    """SlimGPT: per-layer ratios r_i from the schedule; unit totals split over layers in proportion to r_i."""
    o = job.options
    lads = ladders(job.imap, layers, job.costs, o.attn_unit, o.normalize)
    need_parts(lads, o.attn_share, job.imap)
    weights = schedule_weights(len(layers), min(budget / width_params(lads), 1.0), o.schedule, o.r0)
    return ratio_width(job, lads, layers, budget, plan, weights, schedule=o.schedule)


def width_params(lads: dict[str, list[Ladder]]) -> int:
    """Parameters the ladders can prune at most (every unit of every layer)."""
    return sum(ld.cost * len(ld.steps) for part in lads.values() for ld in part)


def ratio_width(job: Job, lads: dict[str, list[Ladder]], layers: Sequence[int], budget: float, plan: Plan,
                weights: Sequence[float], **extras) -> Allocation:
    """Unit totals from the budget (attention first by ``attn_rounding``, channels fill the rest), split over
    ``layers`` in proportion to ``weights`` (per-layer ratios: SlimGPT's schedule, SlimLLM's cosine ratios) and
    capped at each ladder's room; ``weights`` and ``extras`` go to the plan's provenance."""
    o = job.options
    taken, left = {}, budget
    for part, part_budget in (("attn", _attn_budget(lads, o.attn_share, budget)), ("mlp", None)):
        if not lads[part]:
            continue
        cost = lads[part][0].cost
        want = left if part_budget is None else part_budget
        counts = apportion(max(_part_round(want / cost, part, o), 0), weights, [ld.room for ld in lads[part]])
        taken.update({(ld.layer, part): k for ld, k in zip(lads[part], counts)})
        left -= sum(counts) * cost
    fill = lads["mlp"] or lads["attn"]
    extras = {"layer_ratios": dict(zip(map(int, layers), weights)), **extras}
    alloc = Allocation(plan_with(plan, taken, lads, o.multiple_of), fill[0].cost, _width_limit(job))
    return dataclasses.replace(alloc, plan=alloc.plan.with_provenance(**extras))


def width_layers(n_layers: int, options: AllocOptions, kept: Sequence[int] | None = None) -> list[int]:
    """Layers width pruning may touch: ``kept`` (default all) minus the first ``skip_first`` and the last
    ``skip_last`` layers of the model (LLM-Pruner's layer range). Raises PlanError when none is left."""
    lo, hi = options.skip_first, n_layers - options.skip_last
    layers = [l for l in (range(n_layers) if kept is None else kept) if lo <= l < hi]
    if not layers:
        raise PlanError(f"skip_first={options.skip_first} and skip_last={options.skip_last} leave no layer of "
                        f"{n_layers} to prune in width; lower them")
    return layers


WIDTH = {"uniform": uniform_width, "global": global_width, "incremental": incremental_width}


# ---- deployable plans ------------------------------------------------------------------------------------------------

def width_for(job: Job, name: str) -> Callable[[Job, Sequence[int], float, Plan], Allocation]:
    """Width strategy ``name`` as :attr:`AllocOptions.deployable` allows it: as is, wrapped so attention is cut
    alike in every layer (``"vllm"``), or PlanError naming what to use instead (``"stock"``)."""
    o, fn = job.options, WIDTH[name]
    if o.deployable == "stock":
        if name != "uniform":
            raise PlanError(f"deployable='stock' needs the same widths in every layer, which {name} allocation does "
                            f"not give; use strategy uniform, depth or combined (width uniform), or "
                            f"deployable='vllm' for per-layer MLP widths")
        if o.skip_first or o.skip_last:
            raise PlanError("deployable='stock' needs the same widths in every layer; skip_first/skip_last keep some "
                            "layers whole. Set them to 0, or use deployable='vllm' with attn_share=0")
        return fn
    if o.deployable == "vllm":
        return lambda job_, layers, budget, plan: vllm_width(fn, job_, layers, budget, plan)
    return fn


def vllm_width(fn: Callable, job: Job, layers: Sequence[int], budget: float, plan: Plan) -> Allocation:
    """Width strategy ``fn`` under vLLM's DeciLM rule (one query-head count for every layer): the attention
    parameters ``fn`` would cut are cut alike in every layer (same number of KV groups, or of heads per group,
    least important first within each layer; whole units by ``attn_rounding``), then ``fn`` spends the rest of
    the budget on MLP channels."""
    o = job.options
    lads = ladders(job.imap, layers, job.costs, o.attn_unit, o.normalize)
    free = fn(job, layers, budget, plan).plan  # what the strategy would do unconstrained
    channels = sum(len(free.removed("channel", l)) - len(plan.removed("channel", l)) for l in layers)
    attn_spent = plan.param_count(job.model) - free.param_count(job.model) - channels * job.costs.channel
    taken, spent = {}, 0
    if lads["attn"] and attn_spent > 0:
        step = sum(ld.cost for ld in lads["attn"])  # one unit in every layer
        k = min(_part_round(attn_spent / step, "attn", o), min(ld.room for ld in lads["attn"]))
        if k and len(layers) < len(plan.kept_blocks()):
            raise PlanError("deployable='vllm' keeps one query-head count in every layer, but skip_first/skip_last "
                            "keep some layers' attention whole; set attn_share=0 (MLP channels only) or prune "
                            "every layer")
        taken, spent = {(ld.layer, "attn"): k for ld in lads["attn"]}, k * step
    plan = plan_with(plan, taken, lads)
    if not lads["mlp"]:
        return Allocation(plan, sum(ld.cost for ld in lads["attn"]), _width_limit(job))
    mlp_only = dataclasses.replace(job, options=dataclasses.replace(o, attn_share=0.0, deployable=None))
    return fn(mlp_only, layers, budget - spent, plan)


def deployable_refusal(model: nn.Module, plan: Plan, runtime: str | None) -> str | None:
    """Why ``plan`` is not of the shape ``runtime`` (``"stock"`` or ``"vllm"``) expresses; None if it is (or
    ``runtime`` is None). Structural rules only: :func:`pruneviz.deploy.runtimes` runs the exporters' full checks.

    - ``"stock"``: every kept layer has the same widths, and no compensation adds biases the base lacks;
    - ``"vllm"``: a LLaMA-graph family, the same number of query heads in every kept layer, and attention in the
      first kept layer (vLLM's DeciLM starts the residual there; see :mod:`pruneviz.decilm`)."""
    if runtime is None:
        return None
    _one_of("deployable", runtime, DEPLOYABLE)
    if runtime == "stock":
        if not plan.is_uniform():
            return "deployable='stock' needs the same widths in every kept layer; this plan's layers differ"
        if dataclasses.replace(plan, compensation=None).param_count(model) != plan.param_count(model):
            return (f"the {plan.compensation} compensation adds output-projection biases that a stock config "
                    f"cannot state; export with deployable='vllm' (format decilm) or without that compensation")
        return None
    why = family_refusal(model.config)
    if why:
        return f"deployable='vllm': {why}"
    heads = sorted({len(plan.kept("head", l)) for l in plan.kept_blocks()} - {0})  # 0: no attention sub-layer
    if len(heads) > 1:
        return (f"deployable='vllm' needs the same number of query heads in every kept layer (vLLM's DeciLM reads "
                f"one num_attention_heads); this plan keeps {heads}")
    kept = plan.kept_blocks()
    if kept and plan.attention_removed(kept[0]):
        return (f"deployable='vllm': vLLM's DeciLM needs attention in the first layer (its residual starts there); "
                f"this plan removes layer {kept[0]}'s attention")
    return None


def _check_deployable(model: nn.Module, plan: Plan, runtime: str | None) -> Plan:
    why = deployable_refusal(model, plan, runtime)
    if why:
        raise PlanError(why)
    return plan


@register_allocator("uniform")
def _uniform(job: Job) -> Allocation:
    """The same ratio in every layer, units ranked within each layer (MINI-LLM, LLM-Pruner, Wanda-sp)."""
    return width_for(job, "uniform")(job, width_layers(job.geometry.n_layers, job.options), job.budget, job.empty)


@register_allocator("incremental")
def _incremental(job: Job) -> Allocation:
    """Per-layer ratios growing with depth (SlimGPT Eq. 6, log-increase by default)."""
    return width_for(job, "incremental")(job, width_layers(job.geometry.n_layers, job.options), job.budget,
                                         job.empty)


@register_allocator("global")
def _global(job: Job) -> Allocation:
    """Scores standardised per layer, ranked across all layers (FLAP AL-AM): adaptive widths."""
    return width_for(job, "global")(job, width_layers(job.geometry.n_layers, job.options), job.budget, job.empty)


# ---- depth -----------------------------------------------------------------------------------------------------------

def block_order(imap: ImportanceMap, plus_rule: bool = False) -> list[int]:
    """Removable blocks, least important first (ties to the lower index); NaN scores are not removable."""
    if imap.blocks is None:
        raise PlanError(f"the {imap.criterion} map has no block scores; use a block criterion (ppl, "
                        f"block_influence, magnitude or taylor with block scores) for depth pruning")
    n = imap.geometry.n_layers
    skip = plus_rule_protected(n) if plus_rule else frozenset()
    blocks = imap.blocks  # [L]
    cands = [b for b in range(n) if b not in skip and not math.isnan(float(blocks[b]))]
    return _order(blocks, cands)


def pick_blocks(imap: ImportanceMap, count: int, plus_rule: bool = False) -> list[int]:
    """The ``count`` least important blocks (never all of them; never {0,1,2,3,L-2,L-1} with ``plus_rule``)."""
    n = imap.geometry.n_layers
    order = block_order(imap, plus_rule)
    limit = min(len(order), n - 1)
    if count < 0:
        raise PlanError(f"cannot remove {count} blocks: the block count must be 0 or more (at most {limit})")
    if count > limit:
        why = f" (the + rule protects blocks {sorted(plus_rule_protected(n))})" if plus_rule else ""
        raise PlanError(f"cannot remove {count} blocks of {n}: at most {limit} can go{why}; "
                        f"choose {limit} or fewer")
    return order[:count]


def _depth_count(job: Job, budget: float) -> int:
    n = job.geometry.n_layers
    order = block_order(job.imap, job.options.plus_rule)
    return closest_prefix([job.costs.block] * min(len(order), n - 1), budget)


@register_allocator("depth")
def _depth(job: Job) -> Allocation:
    """The k least important whole blocks (Shortened LLaMA, ShortGPT); k from ``n_blocks`` or the target."""
    o = job.options
    if o.n_blocks is None and job.target is None:
        raise PlanError("depth allocation needs a target ratio or a block count (n_blocks)")
    k = int(o.n_blocks) if o.n_blocks is not None else _depth_count(job, job.budget)
    blocks = pick_blocks(job.imap, k, o.plus_rule)
    limit = "every model keeps at least one block" + (" and the + rule keeps blocks 0-3 and the last two"
                                                      if o.plus_rule else "")
    return Allocation(job.empty.with_units("block", None, blocks), job.costs.block, limit)


@register_allocator("combined")
def _combined(job: Job) -> Allocation:
    """Depth and width together: ``depth_share`` of the budget as blocks, the rest as width."""
    o = job.options
    if job.target is None:
        raise PlanError("combined allocation needs a target ratio")
    k = _depth_count(job, o.depth_share * job.budget) if o.n_blocks is None else int(o.n_blocks)
    blocks = pick_blocks(job.imap, k, o.plus_rule)
    plan = job.empty.with_units("block", None, blocks)
    kept = [l for l in range(job.geometry.n_layers) if l not in set(blocks)]
    rest = job.budget - len(blocks) * job.costs.block
    if rest <= 0:  # the blocks alone reach the target
        return Allocation(plan, job.costs.block, "whole blocks overshoot it")
    alloc = width_for(job, o.width)(job, width_layers(job.geometry.n_layers, o, kept), rest, plan)
    return dataclasses.replace(alloc, plan=alloc.plan.with_provenance(width_strategy=o.width))


# ---- public entry points ---------------------------------------------------------------------------------------------

def _check_map(model: nn.Module, imap: ImportanceMap) -> None:
    g = geometry_of(model)
    if imap.geometry != g:
        raise PlanError(f"the {imap.criterion} scores were computed on a different model ({imap.geometry.describe()})"
                        f" than the loaded one ({g.describe()}); re-run the criterion on this model")
    imap.check_weights(model)  # same shapes, other checkpoint: refused when the scores record a weight probe


def param_record(model: nn.Module, plan: Plan) -> dict:
    """Parameter counts before/after ``plan``, total and non-embedding."""
    return {of: {"before": dense_params(model, of == "non_embedding"),
                 "after": plan.param_count(model, non_embedding=of == "non_embedding")} for of in TARGET_OF}


def _achieved(params: dict, of: str) -> float:
    p = params[of]
    return (p["before"] - p["after"]) / p["before"]


def _check_reached(job: Job, alloc: Allocation, params: dict, strategy: str) -> None:
    t = job.target
    if t is None:
        return
    p = params[t.of]
    short = job.budget - (p["before"] - p["after"])
    if short > alloc.tol:
        raise PlanError(
            f"{strategy} allocation cannot reach {t.describe()}: it stops at {_achieved(params, t.of):.1%} "
            f"({short:,.0f} parameters short) because {alloc.limit}. Choose a lower ratio"
            f"{', or add depth pruning (strategy combined)' if strategy != 'depth' else ''}.")


MAX_LANDING_STEPS = 12


def _removed(job: Job, plan: Plan) -> int:
    p = param_record(job.model, plan)[job.target.of]
    return p["before"] - p["after"]


def _land(fn: Callable[[Job], Allocation], job: Job, compensation: str | None) -> Allocation:
    """Run allocator ``fn`` until its plan (with ``compensation``'s added parameters) removes at least the
    target's budget: the built model lands at or under the stated size. Each step raises the budget by what
    was missing, doubling the raise while the strategy's rounding swallows it; it stops when the strategy
    cannot remove more (then :func:`_check_reached` judges)."""
    alloc = _with_compensation(_run(fn, job), compensation)
    if job.target is None:
        return alloc
    goal, raise_by = job.target.budget(job.model), 0.0
    slack = 1e-9 * job.target.dense(job.model)  # float noise of ratio x count, far below one parameter
    for _ in range(MAX_LANDING_STEPS):
        missing = goal - _removed(job, alloc.plan)
        if missing <= slack:
            return alloc
        raise_by = max(raise_by * 2, missing + 1)
        trial = dataclasses.replace(job, extra=job.extra + raise_by)
        nxt = _with_compensation(_run(fn, trial), compensation)
        if _removed(job, nxt.plan) > _removed(job, alloc.plan):
            job, alloc, raise_by = trial, nxt, 0.0
        elif raise_by > 4 * max(alloc.tol, 1.0) + missing:
            return alloc  # the strategy cannot remove more (its rules cap it)
    return alloc


def _run(fn: Callable[[Job], Allocation], job: Job) -> Allocation:
    """``fn(job)``, its tolerance widened to the step ``multiple_of`` makes (a whole multiple of channels)."""
    alloc = fn(job)
    return dataclasses.replace(alloc, tol=alloc.tol * job.options.multiple_of)


def _with_compensation(alloc: Allocation, compensation: str | None) -> Allocation:
    if compensation is None:
        return alloc
    return dataclasses.replace(alloc, plan=dataclasses.replace(alloc.plan, compensation=compensation))


def allocate(model: nn.Module, imap: ImportanceMap, target: Target | float | None = None,
             strategy: str = "uniform", compensation: str | None = None, **options) -> Plan:
    """A plan removing ``target`` (a :class:`Target` or a ratio of non-embedding parameters) by ``strategy``.

    The plan lands at or under the target: whole units are added until at least the target's share is removed,
    counting what ``compensation`` adds (FLAP's bias compensation creates output-projection biases), so every
    method reaches the same stated size the same way. ``options`` are :class:`AllocOptions` fields. The plan
    passes ``validate(model, physical=True)`` and records criterion, strategy, target, options, achieved ratio
    and parameter counts in its provenance. Raises PlanError when the target is out of (0, 1), the map lacks
    the scores a strategy needs, or the strategy's rules (at least one unit per layer, the + rule) keep it more
    than one unit's worth short of the target.
    """
    _check_map(model, imap)
    fn = get_allocator(strategy)
    opts = resolved_layer_range(make_alloc_options(**options), imap.criterion, geometry_of(model).n_layers)
    job = Job(model, imap, as_target(target), opts, unit_costs(model), Plan.empty(model))
    alloc = _land(fn, job, compensation)
    params = param_record(model, alloc.plan)
    _check_reached(job, alloc, params, strategy)
    of = job.target.of if job.target else "non_embedding"
    plan = alloc.plan.with_provenance(
        criterion=imap.criterion, calibration=imap.meta.get("calibration"), strategy=strategy,
        target=job.target.to_dict() if job.target else None,
        options={**dataclasses.asdict(job.options), "normalize": resolved_normalize(imap, job.options.normalize)},
        achieved_ratio=_achieved(params, of), achieved_of=of,
        params=params)
    return _check_deployable(model, plan, job.options.deployable).validate(model, physical=True)


# ---- sliders ---------------------------------------------------------------------------------------------------------

def _slider(ratio: float, what: str) -> float:
    r = float(ratio)
    if math.isnan(r) or not 0.0 <= r < 1.0:
        raise PlanError(f"the {what} ratio must be at least 0 and below 1 (a layer keeps at least one unit); "
                        f"got {ratio!r}")
    return r


def _slider_counts(lads: list[Ladder], ratio: float, strategy: str, options: AllocOptions) -> tuple[dict, int]:
    """Steps per (layer, part) for a unit ratio under ``strategy``, capped at each ladder's room, and how many
    steps the caps held back."""
    if not lads or ratio == 0:
        return {}, 0
    part, n = lads[0].part, len(lads[0].steps)
    if strategy == "uniform":
        k = round_half_up(ratio * n)
        return {(ld.layer, part): min(k, ld.room) for ld in lads}, sum(max(k - ld.room, 0) for ld in lads)
    total = round_half_up(ratio * n * len(lads))
    if strategy == "global":
        cands = sorted(_candidates(lads))[:total]
        out: dict = {}
        for _, layer, p, _, _ in cands:
            out[(layer, p)] = out.get((layer, p), 0) + 1
        return out, total - len(cands)
    weights = schedule_weights(len(lads), ratio, options.schedule, options.r0)
    counts = apportion(total, weights, [ld.room for ld in lads])
    return {(ld.layer, part): k for ld, k in zip(lads, counts)}, total - sum(counts)


def plan_from_ratios(model: nn.Module, imap: ImportanceMap, head_ratio: float = 0.0, channel_ratio: float = 0.0,
                     block_count: int = 0, attn_unit: str = "kv", strategy: str = "uniform",
                     plus_rule: bool = False, normalize: str = "auto", schedule: str = "log_increase",
                     r0: float | None = None, skip_first: int = 0, skip_last: int = 0,
                     deployable: str | None = None, multiple_of: int = 1) -> Plan:
    """The app's sliders: remove ``head_ratio`` of attention units (KV groups or per-group query heads, see
    ``attn_unit``), ``channel_ratio`` of MLP channels and ``block_count`` whole blocks.

    Blocks are the least important by ``imap.blocks`` (``plus_rule`` protects {0,1,2,3,L-2,L-1}); width ratios
    apply to the kept blocks with ``strategy`` uniform (same count per layer), global (lowest normalised scores
    across layers) or incremental (SlimGPT schedule), skipping the first ``skip_first`` and last ``skip_last``
    layers (LLM-Pruner's layer range). Ratios are in [0, 1) of the units of the layers pruned in width; a layer
    always keeps one unit of each kind, and units that this rule holds back are recorded as ``shortfall`` in the
    provenance. ``deployable`` (``"stock"``, ``"vllm"``) restricts the plan as in :class:`AllocOptions`: attention
    counts are then uniform over the kept layers whatever the strategy, and ``"stock"`` needs strategy uniform
    over every layer when widths are cut; PlanError says what to change. ``multiple_of``: every pruned layer
    keeps an MLP width that is a multiple of it (:attr:`AllocOptions.multiple_of`; the slider's share is then
    approximate).
    """
    _check_map(model, imap)
    if strategy not in WIDTH:
        raise PlanError(f"slider strategy must be one of {', '.join(WIDTH)}; got {strategy!r}")
    ratios = {"attn": _slider(head_ratio, "head"), "mlp": _slider(channel_ratio, "channel")}
    opts = AllocOptions(attn_unit=attn_unit, normalize=normalize, schedule=schedule, r0=r0, plus_rule=plus_rule,
                        skip_first=skip_first, skip_last=skip_last, deployable=deployable, multiple_of=multiple_of)
    if deployable == "stock" and (head_ratio or channel_ratio):
        width_for(Job(model, imap, None, opts, unit_costs(model), Plan.empty(model)), strategy)  # PlanError if not
    blocks = pick_blocks(imap, int(block_count), plus_rule) if block_count else []
    plan = Plan.empty(model).with_units("block", None, blocks)
    kept = [l for l in range(imap.geometry.n_layers) if l not in set(blocks)]
    if head_ratio or channel_ratio:
        kept = width_layers(imap.geometry.n_layers, opts, kept)
    taken, shortfall, lads = _slider_width(imap, kept, unit_costs(model), ratios, strategy, opts)
    plan = plan_with(plan, taken, lads, opts.multiple_of, alike=strategy == "uniform")
    params = param_record(model, plan)
    plan = plan.with_provenance(
        criterion=imap.criterion, strategy=strategy, target=None,
        sliders={"head_ratio": head_ratio, "channel_ratio": channel_ratio, "block_count": int(block_count),
                 "attn_unit": effective_attn_unit(attn_unit, imap.geometry), "plus_rule": plus_rule,
                 "skip_first": skip_first, "skip_last": skip_last},
        options=dataclasses.asdict(opts), achieved_ratio=_achieved(params, "non_embedding"),
        achieved_of="non_embedding", params=params, shortfall=shortfall)
    return _check_deployable(model, plan, deployable).validate(model, physical=True)


def _slider_width(imap: ImportanceMap, kept: list[int], costs: Costs, ratios: dict[str, float], strategy: str,
                  opts: AllocOptions) -> tuple[dict, dict, dict[str, list[Ladder]]]:
    """Steps taken per (layer, part), steps held back per part, and the ladders, for the width sliders."""
    lads = ladders(imap, kept, costs, opts.attn_unit, opts.normalize)
    taken, shortfall = {}, {}
    for part, r in ratios.items():
        if r > 0 and not lads[part]:
            raise PlanError(f"the {imap.criterion} map has no {'attention' if part == 'attn' else 'channel'} "
                            f"scores; set that slider to 0 or use a criterion that scores them")
        alike = part == "attn" and opts.deployable is not None  # one query-head count in every layer
        t, shortfall[part] = _slider_counts(lads[part], r, "uniform" if alike else strategy, opts)
        taken.update(t)
    return taken, shortfall, lads
