"""BlockPruner (Zhong et al. 2024, arXiv 2406.10594, ``MrGGLS/BlockPruner``): residual sub-blocks by perplexity.

Each decoder layer is two residual sub-blocks, ``h + attn(norm(h))`` and ``h + mlp(norm(h))``. The paper removes
them one at a time: at every step it measures the calibration perplexity with each remaining sub-block removed
(the ones removed so far stay removed), removes the sub-block with the lowest perplexity, and repeats until the
target. Removing a sub-block makes it add zero to the residual stream; a plan states it as "every KV group" or
"every MLP channel" of a kept layer (:meth:`pruneviz.plan.Plan.without_attention`, ``without_mlp``), and surgery
drops the sub-block with its norms (:mod:`pruneviz.surgery`).

- ``blockpruner`` (criterion): one step of that search. ``extras["sub_blocks"]`` holds, per layer, the perplexity
  with its attention (``"attn"``) or MLP (``"mlp"``) sub-block removed, ``None`` for sub-blocks already removed
  (option ``removed``) or not removable; a low perplexity means unimportant. With ``score_blocks`` (default) the
  ``blocks`` map is the leave-one-block-out perplexity, as the ``ppl`` criterion's, so the map also serves depth
  allocation; otherwise it is NaN.
- ``sub_blocks`` (allocation strategy): the lowest-perplexity sub-blocks of one such map until the target, one-shot
  (no re-scoring; the map's ``removed`` sub-blocks are not removable).
- :func:`blockpruner_search`: the paper's iterative search, re-scoring after every removal, until the plan lands at
  or under a parameter :class:`~pruneviz.allocate.Target`. Cost: ``Σ_k (2L - k + 1)`` perplexity passes over the
  windows (the paper: 64 Alpaca samples; any calibration windows here).

Perplexity is :func:`pruneviz.criteria.depth.calibration_ppl` on a masked view (:func:`pruneviz.surgery.masking`),
which computes exactly what the physically pruned model computes. Unlike the paper, which counts sub-blocks, the
target here is a parameter share: the search stops at the first step where at least that share is removed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..allocate import Allocation, Job, Target, as_target, closest_prefix, param_record, register_allocator
from ..arch import adapter_for, geometry_of
from ..errors import CriterionError, PlanError
from ..importance import Calibration, Context, Criterion, ImportanceMap, compute, register
from ..plan import Plan
from ..progress import Cancel, Progress, Span, context_of
from ..surgery import masking
from .depth import calibration_ppl

PARTS = ("attn", "mlp")
SubBlockId = tuple[int, str]  # (layer, "attn" | "mlp")


def sub_block_plan(model_or_plan, removed: Sequence[SubBlockId]) -> Plan:
    """The plan removing sub-blocks ``removed`` (a layer with both removed is a removed block)."""
    plan = model_or_plan if isinstance(model_or_plan, Plan) else Plan.empty(model_or_plan)
    for layer, part in removed:
        plan = plan.without_sub_block(int(layer), str(part))
    return plan


def _removed_ids(model: nn.Module, removed) -> tuple[SubBlockId, ...]:
    """``removed`` (pairs ``[layer, part]``) checked against the model: layers in range, parts attn/mlp."""
    n = geometry_of(model).n_layers
    out = []
    for item in removed:
        if not isinstance(item, (list, tuple)) or len(item) != 2 or item[1] not in PARTS:
            raise CriterionError(f"removed sub-blocks are pairs [layer, 'attn' | 'mlp'], not {item!r}")
        layer = int(item[0])
        if not 0 <= layer < n:
            raise CriterionError(f"removed sub-block layer {layer} is out of range 0..{n - 1}")
        out.append((layer, item[1]))
    return tuple(sorted(set(out)))


def removable(model: nn.Module, removed: Sequence[SubBlockId]) -> list[SubBlockId]:
    """Sub-blocks that can still go: not removed, supported by the family, and not the last one standing."""
    adapter, n = adapter_for(model), geometry_of(model).n_layers
    gone = set(removed)
    cands = [(l, p) for l in range(n) for p in PARTS
             if (l, p) not in gone and adapter.sub_block(p, model.config) is not None]
    if len(gone) + 1 >= 2 * n:  # removing it would remove every block
        return []
    return cands


@dataclass
class BlockPrunerOptions:
    """``batch_size``: windows per forward pass (does not change the result). ``removed``: sub-blocks
    (pairs ``[layer, "attn" | "mlp"]``) removed while scoring, the search's state; they score None.
    ``score_blocks``: also score whole blocks (L more passes) into the ``blocks`` map."""

    batch_size: int = 4
    removed: tuple = ()
    score_blocks: bool = True


@register
class BlockPruner(Criterion):
    """Leave-one-sub-block-out perplexity (BlockPruner): attention and MLP of every layer, removed alone."""

    name = "blockpruner"
    title = "Sub-block perplexity (BlockPruner)"
    paper = "BlockPruner, arXiv 2406.10594"
    produces = ("blocks",)
    score_label = "PPL without it"
    Options = BlockPrunerOptions

    def estimate(self, geometry, n_params, samples, seq_len, options) -> dict:
        """One pass per remaining sub-block (and block, with ``score_blocks``), plus the reference pass."""
        passes = 2 * geometry.n_layers - len(options.removed) + 1
        passes += geometry.n_layers if options.score_blocks else 0
        return {"forward_tokens": passes * samples * seq_len, "backward": False,
                "extra_bytes": 4 * min(options.batch_size, samples) * seq_len * geometry.vocab}

    def score(self, model, calib, options, ctx: Context) -> ImportanceMap:
        g = geometry_of(model)
        removed = _removed_ids(model, options.removed)
        base_plan = sub_block_plan(model, removed)
        cands = removable(model, removed)
        kept = base_plan.kept_blocks()
        blocks = list(kept) if options.score_blocks and len(kept) > 1 else []
        total = len(cands) + len(blocks) + 1
        ppl = lambda plan: _ppl(model, plan, calib, options.batch_size)  # noqa: E731
        ctx.step(0.0, "perplexity with the removed sub-blocks")
        base = ppl(base_plan)
        table = {p: [None] * g.n_layers for p in PARTS}
        for i, (layer, part) in enumerate(cands):
            table[part][layer] = ppl(base_plan.without_sub_block(layer, part))
            ctx.step((i + 1) / total, f"layer {layer} {part}: PPL {table[part][layer]:.4g} without it")
        scores = torch.full((g.n_layers,), math.nan, dtype=torch.float64)  # [L]
        for i, b in enumerate(blocks):
            scores[b] = ppl(base_plan.with_units("block", None, [b]))
            ctx.step((len(cands) + i + 1) / total, f"block {b}: PPL {float(scores[b]):.4g} without it")
        extras = {"sub_blocks": table, "base_ppl": base, "removed": [list(r) for r in removed],
                  "ppl_without_block": [None if math.isnan(v) else v for v in scores.tolist()]}
        return ImportanceMap(self.name, g, blocks=scores, extras=extras)


def _ppl(model: nn.Module, plan: Plan, calib: Calibration, batch_size: int) -> float:
    with masking(model, plan) as view:
        return calibration_ppl(view, calib, batch_size)


# ---- selection -------------------------------------------------------------------------------------------------------

def sub_block_scores(imap: ImportanceMap) -> dict[SubBlockId, float]:
    """``(layer, part) -> perplexity without it`` for every scored sub-block of a ``blockpruner`` map."""
    table = imap.extras.get("sub_blocks") if isinstance(imap.extras, dict) else None
    if not isinstance(table, dict) or set(table) != set(PARTS):
        raise PlanError(f"the {imap.criterion} map has no sub-block scores; score with the blockpruner criterion "
                        f"for sub-block allocation")
    out = {}
    for part in PARTS:
        for layer, v in enumerate(table[part]):
            if v is not None and not math.isnan(float(v)):
                out[(layer, part)] = float(v)
    return out


def sub_block_order(scores: dict[SubBlockId, float]) -> list[SubBlockId]:
    """Least important first: lowest perplexity; ties to the lower layer, attention before MLP."""
    return sorted(scores, key=lambda s: (scores[s], s[0], PARTS.index(s[1])))


def _cost(model: nn.Module, plan: Plan, of: str) -> int:
    """Parameters ``plan`` removes, counted over ``of`` (total or non_embedding)."""
    p = param_record(model, plan)[of]
    return p["before"] - p["after"]


@register_allocator("sub_blocks")
def _sub_blocks(job: Job) -> Allocation:
    """The lowest-perplexity attention / MLP sub-blocks of a blockpruner map (BlockPruner, one-shot)."""
    if job.target is None:
        raise PlanError("sub-block allocation needs a target ratio")
    order = sub_block_order(sub_block_scores(job.imap))
    plans, costs, prev = [job.empty], [], 0
    for sb in order:
        nxt = plans[-1].without_sub_block(*sb)
        if len(nxt.blocks) >= job.geometry.n_layers:
            break
        removed = _cost(job.model, nxt, job.target.of)
        plans.append(nxt)
        costs.append(removed - prev)
        prev = removed
    k = closest_prefix(costs, job.budget)
    return Allocation(plans[k], max(costs, default=0), "every model keeps at least one block (one sub-block)")


# ---- the iterative search --------------------------------------------------------------------------------------------

def blockpruner_search(model: nn.Module, calib: Calibration, target: Target | float,
                       options: BlockPrunerOptions | None = None, progress: Progress | None = None,
                       cancel: Cancel | None = None) -> tuple[Plan, list[ImportanceMap]]:
    """BlockPruner's greedy search: remove the sub-block whose removal gives the lowest calibration perplexity,
    re-score the remaining ones on the model with it removed, repeat until the plan removes at least ``target``
    (a :class:`Target` or a non-embedding ratio), so the built model lands at or under it.

    Ties go to the lower layer, attention first. Returns the plan (provenance: removal order, perplexity after
    each step, parameter counts) and the map of every step. ``options`` go to every step (``removed`` is the
    search's own; ``score_blocks`` is off unless set). ``progress(fraction, message)`` spans the search (the
    fraction is the share of the target removed so far); ``cancel()`` returning True raises ``Cancelled``.
    PlanError if the family cannot drop sub-blocks or the target cannot be reached with at least one block kept.
    """
    target = as_target(target)
    if not removable(model, []):
        raise PlanError(f"BlockPruner cannot reach {target.describe()}: {adapter_for(model).family} blocks cannot "
                        f"drop their attention or MLP alone (their forward adds the residual inside them)")
    opts = options if options is not None else BlockPrunerOptions(score_blocks=False)
    goal = target.budget(model)
    slack = 1e-9 * target.dense(model)
    ctx = context_of(progress, cancel)
    plan, order, ppls, maps = Plan.empty(model), [], [], []
    floor = 0.0  # progress never goes back: a step's share of the bar is unknown until it is done
    while _cost(model, plan, target.of) < goal - slack:
        if not removable(model, order):
            raise PlanError(f"BlockPruner cannot reach {target.describe()}: with {len(order)} sub-blocks removed "
                            f"only one is left (every model keeps at least one block)")
        lo = max(floor, min(1.0, _cost(model, plan, target.of) / goal))
        span = Span(ctx, lo, lo + (1.0 - lo) / 2)
        floor = span.hi
        imap = compute(model, "blockpruner", calib, dataclasses.replace(opts, removed=tuple(order)),
                       lambda f, msg="", span=span: span.step(f, f"step {len(order) + 1}: {msg}"), cancel)
        pick = sub_block_order(sub_block_scores(imap))[0]
        order.append(pick)
        ppls.append(sub_block_scores(imap)[pick])
        plan = plan.without_sub_block(*pick)
        maps.append(imap)
    ctx.step(1.0, f"{len(order)} sub-blocks removed")
    params = param_record(model, plan)
    p = params[target.of]
    plan = plan.with_provenance(
        criterion="blockpruner", strategy="sub_blocks", search="iterative", target=target.to_dict(),
        calibration=calib.describe(), removal_order=[list(s) for s in order], ppl_after_step=ppls,
        achieved_ratio=(p["before"] - p["after"]) / p["before"], achieved_of=target.of, params=params)
    return plan.validate(model, physical=True), maps
