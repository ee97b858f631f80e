"""SlimGPT: layer-wise structured pruning with OBS compensation (Ling et al., NeurIPS 2024, arXiv 2412.18110).

SlimGPT is a *solver*, not a per-unit score: layer by layer it removes attention heads (input column blocks of
the attention output projection) and MLP channels (input columns of the down projection), greedily and with
Optimal-Brain-Surgeon updates of the surviving columns (:mod:`pruneviz.obs`), on calibration activations that
already flow through the earlier, pruned layers. Three entry points share one sequential pass:

- :func:`slimgpt_prune` selects and compensates in one pass and returns a :class:`~pruneviz.plan.Plan` with
  ``compensation="slimgpt"`` plus the physically pruned model;
- the ``"slimgpt"`` compensator re-runs the pass for the *fixed* units of a plan, so applying an edited SlimGPT
  plan re-runs the solver rather than toggling units (the greedy order is recovered by restricting each greedy
  step to the plan's units: the solver's pick is the cheapest unit overall, so it is also the cheapest of them);
- the ``slimgpt`` criterion scores the *dense* model: the OBS error of removing each unit alone.

Pass per layer (the paper's pipeline, official ``model_slimming.py``): accumulate the Hessian of the attention
output projection's inputs, prune heads, re-run the layer for the down projection's Hessian on the
attention-pruned layer, prune channels, and compute the layer outputs, which are the next layer's inputs.
Layer inputs are captured generically: a forward pre-hook on block 0 stores its arguments (attention mask,
rotary embeddings, ALiBi, ...) and raises to stop the forward.

GQA, which the published code gets wrong (it slices k/v rows like q rows): ``attn_unit="kv"`` removes whole
KV groups (a block of ``group_size·head_dim`` o_proj columns; k/v rows go in surgery); ``attn_unit="head"``
removes the same number of query heads from every KV group of a layer (greedy per step over the heads whose
group still has quota left), so the result stays physically prunable. For multi-head attention both are the same.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable

import torch
from torch import nn

from ..allocate import ATTN_ROUNDING, Target, as_target, round_half_up, round_units
from ..arch import (
    Adapter,
    Geometry,
    adapter_for,
    check_residual_outputs,
    feature_count,
    geometry_of,
    get_path,
    is_conv1d,
)
from ..errors import CriterionError
from ..importance import Calibration, Context, Criterion, ImportanceMap, register
from ..obs import HEAD_ERRORS, Hessian, ObsProblem, dgs_sizes, greedy_blocks, greedy_columns
from ..offload import clone_model, detached_copy, execution_device, is_offloaded, materialized, resident_copy
from ..plan import Plan, dense_params
from ..schedules import SCHEDULES, layer_ratios
from ..surgery import apply_plan, register_compensator
from .capture import LayerStream, Stop, advance, capture_inputs

PAPER = "arXiv:2412.18110"
ATTN_UNITS = ("kv", "head")
# ---- options --------------------------------------------------------------------------------------------------------

@dataclass
class ObsOptions:
    """How the OBS pass computes and compensates (stored in a plan's provenance as ``slimgpt_options``).

    - ``percdamp``: damping ``percdamp · mean(diag H) · I`` added to each Hessian (official default 0.01).
    - ``head_error``: ``"exact"`` scores a head/KV group by its exact block-OBS error (grouped Cholesky with the
      within-block update, equal to the closed form); ``"paper"`` uses the paper's shortcut ``Σ W²/diag(U)²``.
    - ``min_group``: floor of the dynamic MLP group size (official code: 64; the paper mentions 8).
    - ``exact_channels``: remove MLP channels one at a time (exact greedy) instead of dynamic groups; the inverse
      Hessian is then downdated rather than recomputed after each column.
    - ``update_scale``: how much of the OBS update of the surviving columns is applied, in [0, 1]: 1 is the
      paper's full compensation, 0 selects units by OBS error but keeps the surviving weights as they are.
      The update is a least-squares fit to the calibration activations; fitted on a few thousand tokens of one
      domain it also fits that domain's quirks, and shrinking it toward zero (like ridge regression) trades
      in-domain error for error on other text (``bench/quality.py`` measures both).
    - ``batch_size``: calibration sequences per layer call.
    """

    percdamp: float = 0.01
    head_error: str = "exact"
    min_group: int = 64
    exact_channels: bool = False
    batch_size: int = 8
    update_scale: float = 1.0

    def check(self) -> "ObsOptions":
        if self.head_error not in HEAD_ERRORS:
            raise CriterionError(f"head_error must be one of {HEAD_ERRORS}, got {self.head_error!r}")
        if self.percdamp < 0 or self.min_group < 1 or self.batch_size < 1:
            raise CriterionError("percdamp must be >= 0, min_group and batch_size >= 1")
        if not 0.0 <= self.update_scale <= 1.0:
            raise CriterionError(f"update_scale is the share of the OBS update applied, in [0, 1], not "
                                 f"{self.update_scale!r}")
        return self

    @classmethod
    def from_dict(cls, d: dict | None) -> "ObsOptions":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in known}).check()


@dataclass
class SolverOptions(ObsOptions):
    """:class:`ObsOptions` plus the selection settings of :func:`slimgpt_prune`.

    - ``schedule``: per-layer ratio schedule (:data:`SCHEDULES`, default the paper's ``log_increase``).
    - ``attn_unit``: ``"kv"`` removes whole KV groups, ``"head"`` equal numbers of query heads per KV group.
    - ``r0``: smallest layer ratio (default ``target · 0.3125``); ``max_ratio``: cap of any layer's ratio.
    - ``attn_rounding``: ``"down"`` (default) or ``"nearest"``, how ``G·r_i`` becomes a whole number of KV
      groups (or heads per group). The paper rounds; with few KV groups a group is a coarse step (a third of
      a SmolLM2 layer's attention), and rounding to the nearest removes one in 24 of 30 layers at a 20% target,
      which made SlimGPT the worst method out of domain (``bench/quality.py``). Rounding down removes a unit
      only where the layer's ratio pays for a whole one; the channels take the rest of the target. Same
      option and meaning as :class:`pruneviz.allocate.AllocOptions`.

    Per layer ``i`` with ratio ``r_i``: ``round(C·r_i)`` channels, ``G·r_i`` KV groups (``"kv"``) or
    ``group_size·r_i`` heads per KV group (``"head"``) rounded by ``attn_rounding``, always leaving at least
    one of each.
    """

    schedule: str = "log_increase"
    attn_unit: str = "kv"
    r0: float | None = None
    max_ratio: float = 0.9
    attn_rounding: str = "down"

    def check(self) -> "SolverOptions":
        super().check()
        if self.attn_unit not in ATTN_UNITS:
            raise CriterionError(f"attn_unit must be one of {ATTN_UNITS}, got {self.attn_unit!r}")
        if self.attn_rounding not in ATTN_ROUNDING:
            raise CriterionError(f"attn_rounding must be one of {ATTN_ROUNDING}, got {self.attn_rounding!r}")
        if self.schedule not in SCHEDULES:
            raise CriterionError(f"unknown SlimGPT schedule {self.schedule!r}; one of {', '.join(SCHEDULES)}")
        return self

    def obs(self) -> ObsOptions:
        return ObsOptions(**{f.name: getattr(self, f.name) for f in fields(ObsOptions)})


def layer_hessians(layer: nn.Module, i: int, stream: LayerStream, paths: tuple[str, ...],
                   stop: bool) -> tuple[dict[str, torch.Tensor], list[torch.Tensor] | None]:
    """Hessians ``(2/N)Σxxᵀ`` of the inputs of modules ``paths`` of ``layer`` over the stream (fp32).

    With ``stop`` the forward is cut right after the (single) hooked module's input is seen, skipping the rest
    of the block, and no outputs are returned; otherwise the block's outputs per batch come back too.
    """
    accs = {p: Hessian(feature_count(get_path(layer, p), "in"), execution_device(layer)) for p in paths}
    state = {"b": 1}

    def hook_for(path):
        def hook(module, args):
            accs[path].add(args[0].reshape(state["b"], -1, args[0].shape[-1]))
            if stop:
                raise Stop()
        return hook

    handles = [get_path(layer, p).register_forward_pre_hook(hook_for(p)) for p in paths]
    outs = []
    try:
        for b, x in enumerate(stream.hidden):
            state["b"] = x.shape[0]
            try:
                outs.append(stream.call(layer, i, b))
            except Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return {p: a.H for p, a in accs.items()}, (None if stop else outs)


# ---- one layer ------------------------------------------------------------------------------------------------------

def read_weight(module: nn.Module) -> torch.Tensor:
    """``module``'s weight as fp32 ``[out, in]`` (transposes GPT-2 ``Conv1D``)."""
    w = module.weight.detach()
    return (w.t() if is_conv1d(module) else w).float().clone()


def write_weight(module: nn.Module, W: torch.Tensor) -> None:
    with torch.no_grad():
        module.weight.copy_((W.t() if is_conv1d(module) else W).to(module.weight.dtype))


def head_blocks(g: Geometry) -> torch.Tensor:
    return torch.arange(g.n_heads * g.head_dim).view(g.n_heads, g.head_dim)  # [H, d]


def group_blocks(g: Geometry) -> torch.Tensor:
    return torch.arange(g.n_heads * g.head_dim).view(g.n_kv, g.group_size * g.head_dim)  # [G, gs*d]


@dataclass
class LayerTask:
    """What to remove from one layer: counts, optionally restricted to given units (a fixed plan).

    ``head_quota`` (heads per KV group) makes head selection remove equally many heads from every group.
    """

    kv: int = 0
    heads: int = 0
    channels: int = 0
    kv_from: tuple[int, ...] | None = None
    heads_from: tuple[int, ...] | None = None
    channels_from: tuple[int, ...] | None = None
    head_quota: int | None = None
    skip: bool = False  # the whole block is removed: identity, nothing to solve


@dataclass
class LayerResult:
    """Units one layer lost (base numbering) and the relative output error of each pruned projection."""

    kv: tuple[int, ...] = ()
    heads: tuple[int, ...] = ()
    channels: tuple[int, ...] = ()
    rel_error: dict = field(default_factory=dict)  # {"attn"|"mlp": ‖ΔW X‖²/‖W X‖² on calibration}


def _mask(n: int, chosen: tuple[int, ...] | None, exclude: set[int] = frozenset()) -> torch.Tensor:
    m = torch.ones(n, dtype=torch.bool) if chosen is None else torch.zeros(n, dtype=torch.bool)
    if chosen is not None:
        m[list(chosen)] = True
    m[list(exclude)] = False
    return m  # [n]


def _rel_error(W0: torch.Tensor, W1: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``: relative squared output error of the layer on the calibration data."""
    dW = W1 - W0  # [rows, cols]
    return float((dW @ H * dW).sum() / (W0 @ H * W0).sum().clamp_min(1e-30))


def _scaled_update(W0: torch.Tensor, W1: torch.Tensor, scale: float) -> torch.Tensor:
    """``W0 + scale·(W1 − W0)``: the OBS-compensated weights with the update shrunk toward the dense ones (the
    removed columns are sliced away afterwards, whatever they hold)."""
    return W1 if scale == 1.0 else W0.to(W1.dtype) + scale * (W1 - W0.to(W1.dtype))


def _solve_attention(layer, i, stream, task: LayerTask, opts: ObsOptions, adapter: Adapter, g: Geometry):
    """Greedy OBS on the attention output projection: KV groups first (block = the group's columns), then query
    heads (block = ``head_dim`` columns, with the per-group quota if any). Returns (kv, heads, relative error)."""
    mod = get_path(layer, adapter.attn_out)
    H = layer_hessians(layer, i, stream, (adapter.attn_out,), stop=True)[0][adapter.attn_out]
    W0 = read_weight(mod)
    prob = ObsProblem.build(W0, H, opts.percdamp)
    exact = opts.head_error == "exact"
    kv = greedy_blocks(prob, group_blocks(g).to(H.device), task.kv, _mask(g.n_kv, task.kv_from), exact=exact)
    gone = {h for grp in kv for h in g.heads_of(grp)}
    owner = torch.arange(g.n_heads) // g.group_size  # [H]
    quota = None if task.head_quota is None else torch.full((g.n_kv,), task.head_quota)
    heads = greedy_blocks(prob, head_blocks(g).to(H.device), task.heads,
                          _mask(g.n_heads, task.heads_from, gone), owner, quota, exact)
    write_weight(mod, _scaled_update(W0, prob.W, opts.update_scale))
    return tuple(sorted(kv)), tuple(sorted(heads)), _rel_error(W0, prob.W, H)


def _solve_mlp(layer, i, stream, task: LayerTask, opts: ObsOptions, adapter: Adapter, g: Geometry):
    """Greedy OBS on the down projection's columns in dynamic groups (or one by one). Returns (channels, error)."""
    mod = get_path(layer, adapter.mlp_out)
    H = layer_hessians(layer, i, stream, (adapter.mlp_out,), stop=True)[0][adapter.mlp_out]
    W0 = read_weight(mod)
    prob = ObsProblem.build(W0, H, opts.percdamp)
    sizes = [1] * task.channels if opts.exact_channels else dgs_sizes(task.channels, opts.min_group)
    cols = greedy_columns(prob, sizes, _mask(g.n_channels, task.channels_from), downdate=opts.exact_channels)
    write_weight(mod, _scaled_update(W0, prob.W, opts.update_scale))
    return tuple(sorted(cols)), _rel_error(W0, prob.W, H)


def solve_layer(layer: nn.Module, i: int, stream: LayerStream, task: LayerTask, opts: ObsOptions,
                adapter: Adapter, g: Geometry) -> LayerResult:
    """Prune ``task``'s units from ``layer`` (dense-shaped, modified in place) with OBS compensation."""
    res = LayerResult()
    if task.kv or task.heads:
        res.kv, res.heads, res.rel_error["attn"] = _solve_attention(layer, i, stream, task, opts, adapter, g)
    if task.channels:
        res.channels, res.rel_error["mlp"] = _solve_mlp(layer, i, stream, task, opts, adapter, g)
    return res


def run_sequential(model: nn.Module, tokens: torch.Tensor, tasks: list[LayerTask], opts: ObsOptions,
                   ctx: Context, in_place: bool) -> tuple[list[nn.Module], list[LayerResult]]:
    """The layer-by-layer OBS pass over ``model``'s blocks; returns the processed blocks and what each removed.

    ``in_place`` edits ``model``'s own blocks (a copy handed over by surgery); otherwise each block is deep-copied
    just before it is processed and ``model`` is left untouched. Hessians and solves are fp32 whatever the dtype.
    Refused on families that normalise the projection outputs (the OBS objective is the output's error).
    """
    check_residual_outputs(model, "the SlimGPT solver (OBS compensation)")
    adapter, g = adapter_for(model), geometry_of(model)
    src = adapter.layers(model)
    offloaded = is_offloaded(model)
    if offloaded and in_place:
        raise CriterionError("SlimGPT compensation in place needs a resident model; run slimgpt_prune on the "
                             "offloaded model instead (it copies one block at a time)")
    with torch.no_grad():
        stream = capture_inputs(model, tokens, opts.batch_size)
        out_layers, results = [], []
        for i, task in enumerate(tasks):
            ctx.step(i / len(tasks), f"SlimGPT: block {i + 1}/{len(tasks)}")
            if task.skip:
                out_layers.append(detached_copy(src[i], torch.device("cpu")) if offloaded else src[i])
                results.append(LayerResult())
                continue
            layer = src[i] if in_place else detached_copy(src[i]) if offloaded else copy.deepcopy(src[i])
            results.append(solve_layer(layer, i, stream, task, opts, adapter, g))
            out_layers.append(layer)
            if i < len(tasks) - 1:
                advance(layer, i, stream)
            if offloaded:
                layer.to("cpu")  # finished blocks leave the execution device
    return out_layers, results


# ---- the solver ----------------------------------------------------------------------------------------------------

def solver_task(g: Geometry, r: float, attn_unit: str, attn_rounding: str = "down") -> LayerTask:
    """Counts for a layer with ratio ``r`` (see :class:`SolverOptions`): channels rounded half up like
    allocation, attention units by ``attn_rounding``; MHA always prunes single heads."""
    channels = min(round_half_up(g.n_channels * r), g.n_channels - 1)
    if attn_unit == "kv" or g.n_kv == g.n_heads:
        return LayerTask(kv=min(round_units(g.n_kv * r, attn_rounding), g.n_kv - 1), channels=channels)
    q = min(round_units(g.group_size * r, attn_rounding), g.group_size - 1)
    return LayerTask(heads=q * g.n_kv, head_quota=q, channels=channels)


def planned_removal(model: nn.Module, layer_ratio: float, schedule: str = "log_increase",
                    attn_unit: str = "kv", r0: float | None = None, max_ratio: float = 0.9,
                    attn_rounding: str = "down") -> Plan:
    """The unit counts :func:`slimgpt_prune` removes at mean layer ratio ``layer_ratio``, as a plan of the first
    units of each layer (which units the solver picks changes nothing in the parameter count)."""
    g = geometry_of(model)
    plan = Plan.empty(model)
    for i, r in enumerate(layer_ratios(g.n_layers, layer_ratio, schedule, r0, max_ratio)):
        t = solver_task(g, r, attn_unit, attn_rounding)
        heads = [h for grp in range(g.n_kv) for h in list(g.heads_of(grp))[:t.head_quota or 0]]
        plan = plan.with_units("kv", i, range(t.kv)).with_units("head", i, heads)
        plan = plan.with_units("channel", i, range(t.channels))
    return plan


def layer_ratio_for(model: nn.Module, target: Target | float, schedule: str = "log_increase",
                    attn_unit: str = "kv", r0: float | None = None, max_ratio: float = 0.9,
                    attn_rounding: str = "down") -> float:
    """The smallest mean layer ratio at which SlimGPT removes at least ``target`` (a :class:`Target`, or a
    share of non-embedding parameters): the same parameter target every other method takes, so the pruned
    model lands at or under the stated size. Bisection over the counted removal (no solver run)."""
    target = as_target(target)
    budget, of = target.budget(model), target.non_embedding
    dense = dense_params(model, of)

    def removed(r: float) -> float:
        first = None if r0 is None else min(r0, r)
        kept = planned_removal(model, r, schedule, attn_unit, first, max_ratio, attn_rounding)
        return dense - kept.param_count(model, of)

    if removed(max_ratio) < budget:
        raise CriterionError(f"SlimGPT cannot remove {target.describe()} with layer ratios capped at {max_ratio}; "
                             f"choose a lower target or raise max_ratio")
    lo, hi = 0.0, max_ratio
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed(mid) < budget else (lo, mid)
    return hi


def slimgpt_prune_to(model: nn.Module, calib: Calibration, target: Target | float, schedule: str = "log_increase",
                     attn_unit: str = "kv", **options) -> tuple[Plan, nn.Module]:
    """:func:`slimgpt_prune` at the mean layer ratio that removes at least ``target`` of the parameters (see
    :func:`layer_ratio_for`): what the CLI, the app and the benchmarks call, so that ``--ratio 0.2`` means 20% of
    the non-embedding parameters for SlimGPT as for every allocation strategy."""
    ratio = layer_ratio_for(model, target, schedule, attn_unit, options.get("r0"), options.get("max_ratio", 0.9),
                            options.get("attn_rounding", "down"))
    plan, pruned = slimgpt_prune(model, calib, ratio, schedule, attn_unit, **options)
    t = as_target(target)
    plan = plan.with_provenance(target=t.to_dict())
    pruned.config.pruneviz_plan = plan.to_dict()
    return plan, pruned


def _plan_task(plan: Plan, i: int) -> LayerTask:
    """Exactly ``plan``'s units of layer ``i``: greedy steps restricted to them reproduce the solver's order."""
    if i in plan.blocks:
        return LayerTask(skip=True)
    kv, heads, ch = plan.removed("kv", i), plan.removed("head", i), plan.removed("channel", i)
    return LayerTask(len(kv), len(heads), len(ch), kv, heads, ch)


def _plan_from(model: nn.Module, results: list[LayerResult], **provenance) -> Plan:
    plan = Plan.empty(model, **provenance)
    for i, res in enumerate(results):
        plan = plan.with_units("kv", i, res.kv).with_units("head", i, res.heads)
        plan = plan.with_units("channel", i, res.channels)
    return replace(plan, compensation="slimgpt")


def slimgpt_prune(model: nn.Module, calib: Calibration, target_ratio: float, schedule: str = "log_increase",
                  attn_unit: str = "kv", percdamp: float = 0.01, progress: Callable | None = None,
                  cancel: Callable | None = None, **options) -> tuple[Plan, nn.Module]:
    """Run SlimGPT on ``model`` (never mutated): returns ``(plan, pruned_model)``.

    ``target_ratio`` is the mean per-layer ratio of removed heads and channels (the paper's "sparsity"), spread
    over layers by ``schedule`` (:func:`layer_ratios`). Other :class:`SolverOptions` fields may be passed as
    keywords. The plan has ``compensation="slimgpt"`` and records the options, ratios, calibration and per-layer
    relative output errors in its provenance; ``apply_plan(model, plan, calib.tokens)`` rebuilds the same model.
    The pruned model is sliced by :func:`~pruneviz.surgery.apply_plan` from the weights compensated here.
    """
    opts = SolverOptions(schedule=schedule, attn_unit=attn_unit, percdamp=percdamp, **options).check()
    g, t0 = geometry_of(model), time.perf_counter()
    ratios = layer_ratios(g.n_layers, target_ratio, schedule, opts.r0, opts.max_ratio)
    tasks = [solver_task(g, r, attn_unit, opts.attn_rounding) for r in ratios]
    layers, results = run_sequential(model, calib.tokens, tasks, opts.obs(), Context(progress, cancel), False)
    plan = _plan_from(model, results, solver="slimgpt", paper=PAPER, target_ratio=target_ratio,
                      schedule=schedule, attn_unit=attn_unit, attn_rounding=opts.attn_rounding,
                      layer_ratios=[round(r, 6) for r in ratios],
                      slimgpt_options=asdict(opts.obs()), calibration=calib.describe(),
                      layer_rel_error=[r.rel_error for r in results])
    pruned = _slice_compensated(model, layers, plan)
    plan = plan.with_provenance(seconds=round(time.perf_counter() - t0, 2))
    pruned.config.pruneviz_plan = plan.to_dict()
    return plan, pruned


def _slice_compensated(model: nn.Module, layers: list[nn.Module], plan: Plan) -> nn.Module:
    """Physically prune a tensor-sharing clone of ``model`` whose blocks are the compensated ``layers``."""
    if is_offloaded(model):  # the blocks are plain CPU copies: gather everything on the CPU, without hooks
        dense = resident_copy(model, layers)
    else:
        dense = clone_model(model, share_weights=True)
        adapter_for(model).set_layers(dense, nn.ModuleList(layers))
    return apply_plan(dense, replace(plan, compensation=None), allow_other_weights=True)


@register_compensator("slimgpt")
def compensate(model: nn.Module, plan: Plan, calibration: torch.Tensor, progress: Callable | None = None) -> None:
    """Re-run SlimGPT's sequential OBS pass for exactly ``plan``'s units on ``model`` (a dense copy, in place).

    Options come from ``plan.provenance["slimgpt_options"]`` (defaults otherwise). Removed blocks pass the
    activations through unchanged. For a plan made by :func:`slimgpt_prune` with the same calibration this
    reproduces the solver's weights.
    """
    opts = ObsOptions.from_dict(plan.provenance.get("slimgpt_options"))
    tasks = [_plan_task(plan, i) for i in range(plan.geometry.n_layers)]
    run_sequential(model, calibration, tasks, opts, Context(progress, None), True)


# ---- the criterion: dense OBS errors ------------------------------------------------------------------------------

@dataclass
class SlimGPTScoreOptions:
    """Options of the ``slimgpt`` importance map (see :class:`ObsOptions` for their meaning)."""

    percdamp: float = 0.01
    head_error: str = "exact"
    batch_size: int = 8


def _dense_layer_scores(layer, i, stream, opts, adapter: Adapter, g: Geometry) -> tuple[torch.Tensor, ...]:
    """OBS errors of removing each head, KV group and channel of one dense layer alone ([H], [G], [C]).

    Advances ``stream`` to the layer's outputs (the same forward pass feeds the Hessians).
    """
    paths = (adapter.attn_out, adapter.mlp_out)
    hs, stream.hidden = layer_hessians(layer, i, stream, paths, stop=False)
    exact = opts.head_error == "exact"
    with materialized(layer):  # an offloaded block's weights, read after its forward pass
        w_attn, w_mlp = read_weight(get_path(layer, adapter.attn_out)), read_weight(get_path(layer, adapter.mlp_out))
    attn = ObsProblem.build(w_attn, hs[adapter.attn_out], opts.percdamp)
    hinv = attn.hinv()
    heads = attn.block_errors(hinv, head_blocks(g).to(hinv.device), exact)  # [H]
    kv = attn.block_errors(hinv, group_blocks(g).to(hinv.device), exact)  # [G]
    mlp = ObsProblem.build(w_mlp, hs[adapter.mlp_out], opts.percdamp)
    channels = mlp.column_errors(mlp.hinv())  # [C]
    return heads.cpu(), kv.cpu(), channels.cpu()


@register
class SlimGPTCriterion(Criterion):
    """Dense-model OBS error per unit, the quantity SlimGPT's greedy steps rank by (higher = more important).

    Heads and KV groups: block-OBS error of the unit's o_proj column block; channels: ``½Σ W²/[H⁻¹]_pp`` of the
    down-projection column. Every layer's inputs come from the dense model. SlimGPT itself is a solver that
    re-scores after every removal on compensated weights: use :func:`slimgpt_prune` for its plans.
    """

    name = "slimgpt"
    title = "SlimGPT (OBS error, dense)"
    paper = PAPER
    produces = ("heads", "kv", "channels")
    needs_calibration = True
    layerwise = True
    is_solver = True  # plans come from slimgpt_prune; this map is the dense-model OBS error
    score_label = "OBS error"
    Options = SlimGPTScoreOptions

    def score(self, model, calib, options, ctx) -> ImportanceMap:
        opts = ObsOptions(percdamp=options.percdamp, head_error=options.head_error,
                          batch_size=options.batch_size).check()
        adapter, g = adapter_for(model), geometry_of(model)
        view = model if is_offloaded(model) else clone_model(model, share_weights=True)  # hooks are temporary
        maps = ([], [], [])
        with torch.no_grad():
            stream = capture_inputs(model, calib.tokens, opts.batch_size)
            for i, layer in enumerate(adapter.layers(view)):
                ctx.step(i / g.n_layers, f"SlimGPT scores: block {i + 1}/{g.n_layers}")
                for acc, t in zip(maps, _dense_layer_scores(layer, i, stream, opts, adapter, g)):
                    acc.append(t)
        heads, kv, channels = (torch.stack(m) for m in maps)  # [L, H], [L, G], [L, C]
        meta = {"higher_is": "larger OBS error: the layer-output squared error per calibration sequence if the "
                             "unit alone were removed with optimal compensation (dense model)",
                "hessian": "H = (2/N) sum x x^T, damped by percdamp * mean(diag H)", "solver": "slimgpt_prune"}
        return ImportanceMap(self.name, g, heads=heads, kv=kv, channels=channels, meta=meta)
