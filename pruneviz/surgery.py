"""Apply a :class:`~pruneviz.plan.Plan`: exact physical surgery, and a masked (hook) preview.

Both start from a *copy* of the base model: the shared base is never mutated.

- :func:`apply_plan` slices every projection a removed unit owns (declared once in :mod:`pruneviz.arch`),
  drops removed blocks and re-indexes the survivors (``layer_idx``, ``config.num_hidden_layers``,
  ``config.layer_types``) so ``generate`` with a KV cache works, and records the per-layer shapes in
  ``config.pruneviz_layout`` for export.
- a removed attention or MLP *sub-block* (every KV group, or every channel, of a kept layer: BlockPruner's units)
  is replaced by a stand-in that adds zero to the residual stream and drops the norms only it reads
  (:class:`pruneviz.modeling_pruneviz.AbsentAttention` keeps the KV cache's token count with one zero feature
  per token); the layout records it under ``absent`` so exports rebuild it.
- :func:`masked_model` returns a clone that shares the base's tensors (no memory cost) in which the output
  projections read only the kept heads' and channels' input features (:class:`InputSelect`) and removed blocks
  are skipped (identity on the residual stream). Excluding those input columns is exactly removing the unit
  (biases of those projections stay in both); it equals zeroing the columns (tests check that in float64) and is
  computed with the same reduction as the sliced projection, so masked and pruned logits agree bit for bit.
  A removed sub-block's output is replaced by zeros (a forward hook), which is what its stand-in returns.

Plans with a ``compensation`` (SlimGPT OBS, FLAP bias) re-run their solver on the copy before slicing; the
solver is looked up in :data:`COMPENSATORS` and needs calibration data.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .arch import (
    Adapter,
    Geometry,
    SubBlock,
    adapter_for,
    feature_count,
    geometry_of,
    get_path,
    is_conv1d,
    weight_axis,
)
from .errors import PlanError
from .importance import load_builtin_criteria
from .modeling_pruneviz import absent_module, new_projection
from .offload import clone_model, is_offloaded, resident_copy
from .plan import Plan

# name -> fn(model_copy, plan, calibration, progress) that rewrites surviving weights in place (dense shapes)
COMPENSATORS: dict[str, Callable] = {}


def register_compensator(name: str):
    def deco(fn):
        COMPENSATORS[name] = fn
        return fn
    return deco


def compensators() -> tuple[str, ...]:
    """The names of every registered compensation solver, sorted."""
    _load_compensators()
    return tuple(sorted(COMPENSATORS))


# ---- physical surgery ---------------------------------------------------------------------------------------------

def removed_features(adapter: Adapter, g: Geometry, plan: Plan, layer: int) -> dict[tuple[str, str], set[int]]:
    """(module path, axis) -> feature indices owned by the units ``plan`` removes from ``layer``."""
    slices = []
    for h in plan.removed_heads_all(layer):
        slices += adapter.head_slices(g, h)
    for grp in plan.removed("kv", layer):
        slices += adapter.kv_slices(g, grp)
    for c in plan.removed("channel", layer):
        slices += adapter.channel_slices(g, c)
    out: dict[tuple[str, str], set[int]] = {}
    for s in slices:
        out.setdefault((s.module, s.axis), set()).update(s.index)
    return out


def _slice_module(mod: nn.Module, drop_out: set[int], drop_in: set[int]) -> nn.Module:
    """A new projection holding ``mod``'s weights without the dropped output/input features."""
    n_out, n_in = feature_count(mod, "out"), feature_count(mod, "in")
    keep_out = torch.tensor([i for i in range(n_out) if i not in drop_out], dtype=torch.long)
    keep_in = torch.tensor([i for i in range(n_in) if i not in drop_in], dtype=torch.long)
    has_bias = getattr(mod, "bias", None) is not None
    new = new_projection(mod, len(keep_out), len(keep_in), has_bias)
    w = mod.weight.detach()
    w = w.index_select(weight_axis(mod, "out"), keep_out.to(w.device))
    w = w.index_select(weight_axis(mod, "in"), keep_in.to(w.device))
    with torch.no_grad():
        new.weight.copy_(w)
        if has_bias:
            new.bias.copy_(mod.bias.detach().index_select(0, keep_out.to(w.device)))
    new.weight.requires_grad_(mod.weight.requires_grad)
    return new


def removed_sub_blocks(adapter: Adapter, plan: Plan, layer: int, config) -> list[SubBlock]:
    """The sub-blocks (:class:`pruneviz.arch.SubBlock`) that ``plan`` removes whole from base layer ``layer``."""
    parts = [part for part, gone in (("attn", plan.attention_removed(layer)), ("mlp", plan.mlp_removed(layer)))
             if gone]
    subs = [adapter.sub_block(part, config) for part in parts]
    if any(s is None for s in subs):
        raise PlanError(f"{adapter.family} blocks cannot drop a whole attention or MLP sub-block (layer {layer})")
    return subs


def drop_sub_blocks(layer: nn.Module, subs: list[SubBlock], g: Geometry) -> dict[str, list]:
    """Replace each removed sub-block's modules by stand-ins and its norms by the identity, in ``layer`` (a copy).
    Returns the layout's ``absent`` entries (path -> :func:`pruneviz.modeling_pruneviz.absent_module` spec)."""
    absent: dict[str, list] = {}
    for sub in subs:
        for k, path in enumerate(sub.modules):
            last = k == len(sub.modules) - 1
            absent[path] = ["attention"] if sub.part == "attn" else ["mlp", g.hidden if last else 0]
        for path in sub.norms:
            absent[path] = ["norm"]
    for path, spec in absent.items():
        parent, _, name = path.rpartition(".")
        setattr(get_path(layer, parent) if parent else layer, name, absent_module(spec, get_path(layer, path)))
    return absent


def _inside(path: str, roots) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def prune_layer(layer: nn.Module, adapter: Adapter, g: Geometry, plan: Plan, index: int,
                config=None) -> dict | None:
    """Physically remove ``plan``'s units of base layer ``index`` from ``layer`` (a copy). Returns its layout.

    ``config`` (the model's) is needed when the plan removes a whole sub-block of this layer."""
    subs = removed_sub_blocks(adapter, plan, index, config) if plan.removed_sub_blocks() else []
    gone = [m for sub in subs for m in sub.modules]
    drops = {k: v for k, v in removed_features(adapter, g, plan, index).items() if not _inside(k[0], gone)}
    absent = drop_sub_blocks(layer, subs, g)
    if not drops:
        return {"shapes": {}, "absent": absent} if absent else None
    shapes = {}
    for path in adapter.attn_modules + adapter.mlp_modules:
        drop_out, drop_in = drops.get((path, "out"), set()), drops.get((path, "in"), set())
        if not (drop_out or drop_in):
            continue
        parent, _, name = path.rpartition(".")
        new = _slice_module(get_path(layer, path), drop_out, drop_in)
        setattr(get_path(layer, parent) if parent else layer, name, new)
        shapes[path] = [feature_count(new, "out"), feature_count(new, "in"), new.bias is not None]
    extra = {"absent": absent} if absent else {}
    if plan.attention_removed(index):
        return {"shapes": shapes, **extra}
    kept_heads = list(plan.kept("head", index))
    n_kv = len(plan.kept("kv", index)) if g.n_kv != g.n_heads else len(kept_heads)
    adapter.set_attention_widths(layer, len(kept_heads), n_kv, kept_heads, g)
    return {"shapes": shapes, "attrs": adapter.attention_attrs(len(kept_heads), n_kv, g),
            **adapter.layout_extras(kept_heads), **adapter.resize_norms(layer, drops), **extra}


def drop_blocks(model: nn.Module, adapter: Adapter, keep: tuple[int, ...]) -> None:
    """Keep only blocks ``keep`` (base numbering), renumber them 0..k-1 for the KV cache, update the config."""
    layers = adapter.layers(model)
    adapter.set_layers(model, nn.ModuleList([layers[i] for i in keep]))
    for new_idx, layer in enumerate(adapter.layers(model)):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new_idx
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    for name in adapter.layer_lists:  # per-layer config lists (layer_types, SmolLM3's no_rope_layers)
        if isinstance(getattr(cfg, name, None), (list, tuple)):
            setattr(cfg, name, [getattr(cfg, name)[i] for i in keep])


def apply_plan(model: nn.Module, plan: Plan, calibration: torch.Tensor | None = None,
               progress: Callable | None = None, allow_other_weights: bool = False) -> nn.Module:
    """A new, physically smaller model: ``model`` (the dense base, never mutated) with ``plan`` applied.

    ``calibration`` ([N, T] token ids) is needed only for plans with a ``compensation`` solver. An offloaded base
    (:mod:`pruneviz.offload`) gives a pruned model in CPU memory.
    The result's ``config.pruneviz_layout`` records the per-layer shapes; ``config.pruneviz_plan`` the plan.
    """
    plan.validate(model, physical=True, allow_other_weights=allow_other_weights)
    adapter, g = adapter_for(model), geometry_of(model)
    # an offloaded base is materialised on the CPU block by block; the pruned model lives there
    pruned = resident_copy(model) if is_offloaded(model) else clone_model(model, share_weights=False)
    if plan.compensation:
        if plan.compensation not in COMPENSATORS:
            _load_compensators()
        if plan.compensation not in COMPENSATORS:
            raise PlanError(f"unknown compensation {plan.compensation!r}; known: {sorted(COMPENSATORS)}")
        if calibration is None:
            raise PlanError(f"this plan re-runs the {plan.compensation} solver when applied; pass calibration "
                            f"token windows (the plan's provenance says which text and sizes it used)")
        COMPENSATORS[plan.compensation](pruned, plan, calibration, progress)
    layers = adapter.layers(pruned)
    layout_layers = {}
    kept = plan.kept_blocks()
    for new_idx, base_idx in enumerate(kept):
        spec = prune_layer(layers[base_idx], adapter, g, plan, base_idx, pruned.config)
        if spec:
            layout_layers[str(new_idx)] = spec
    drop_blocks(pruned, adapter, kept)
    cfg = pruned.config
    cfg.pruneviz_base_geometry = g.to_dict()
    cfg.pruneviz_layout = {"layers_path": adapter.layers_path, "n_heads_total": g.n_heads,
                           "source_layers": list(kept), "layers": layout_layers}
    cfg.pruneviz_plan = plan.to_dict()
    return pruned.eval()


def _load_compensators() -> None:
    """The built-in criteria register their compensation solvers when :mod:`pruneviz.criteria` is imported."""
    load_builtin_criteria()


# ---- masked preview -----------------------------------------------------------------------------------------------

class InputSelect(nn.Module):
    """Wraps an output projection so it only reads the kept input features: ``inner(x[..., keep])`` with the
    weight's kept columns. This *is* removing the other units' contributions, computed with exactly the
    reduction a physically sliced projection performs, so masked and pruned logits agree bit for bit (zeroing
    the columns instead is the same function but differs by float rounding: ~4e-5 on SmolLM2's logits).
    No weights are copied at construction; the inner module is the (shared) original.
    """

    def __init__(self, inner: nn.Module, keep: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("keep", keep, persistent=False)  # [k] kept input feature indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.keep.to(x.device)
        w = self.inner.weight
        if is_conv1d(self.inner):  # weight [in, out]
            out = torch.addmm(self.inner.bias, x[..., keep].reshape(-1, len(keep)), w.index_select(0, keep))
            return out.view(*x.shape[:-1], w.shape[1])
        return nn.functional.linear(x.index_select(-1, keep), w.index_select(1, keep), self.inner.bias)


class OutputZero(nn.Module):
    """Wraps a projection so that its output features ``drop`` read zero: masking a unit's rows where a norm over
    the whole projection follows (OLMo 2's q/k norms), so the removed features enter its statistics as zeros."""

    def __init__(self, inner: nn.Module, drop: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("drop", drop, persistent=False)  # [k] removed output feature indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).index_fill(-1, self.drop.to(x.device), 0.0)


def _skip_block_hook(adapter: Adapter):
    def hook(module, args, kwargs, output):
        hidden = adapter.block_hidden(args, kwargs)
        if isinstance(output, tuple):
            return (hidden,) + tuple(output[1:])
        return hidden
    return hook


def _zero_output_hook(module, args, output):
    """A removed sub-block's module: its output becomes zeros (the attention's weights stay as they are)."""
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]),) + tuple(output[1:])
    return torch.zeros_like(output)


def kept_inputs(g: Geometry, plan: Plan, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept input features of the attention output projection [k_a] and of the MLP down projection [k_m]."""
    gone = set(plan.removed_heads_all(layer))
    heads = [h * g.head_dim + i for h in range(g.n_heads) if h not in gone for i in range(g.head_dim)]
    chans = [c for c in range(g.n_channels) if c not in set(plan.removed("channel", layer))]
    return torch.tensor(heads, dtype=torch.long), torch.tensor(chans, dtype=torch.long)


def install_masks(model: nn.Module, plan: Plan) -> Callable[[], None]:
    """Mask ``plan``'s units on ``model`` (dense) in place; returns a function that undoes it exactly."""
    adapter, g = adapter_for(model), geometry_of(model)
    undo = []
    for i, layer in enumerate(adapter.layers(model)):
        if i in plan.blocks:
            undo.append(layer.register_forward_hook(_skip_block_hook(adapter), with_kwargs=True).remove)
            continue
        subs = removed_sub_blocks(adapter, plan, i, model.config) if plan.removed_sub_blocks() else []
        for sub in subs:  # the sub-block's update (its last module's output) reads zero
            undo.append(get_path(layer, sub.modules[-1]).register_forward_hook(_zero_output_hook).remove)
        whole = {"attn": adapter.attn_out, "mlp": adapter.mlp_out}
        gone = {whole[sub.part] for sub in subs}
        for path, keep, full in zip((adapter.attn_out, adapter.mlp_out), kept_inputs(g, plan, i),
                                    (g.n_heads * g.head_dim, g.n_channels)):
            if len(keep) == full or path in gone:
                continue
            parent, _, name = path.rpartition(".")
            owner, original = get_path(layer, parent) if parent else layer, get_path(layer, path)
            setattr(owner, name, InputSelect(original, keep))
            undo.append(lambda owner=owner, name=name, original=original: setattr(owner, name, original))
        drops = removed_features(adapter, g, plan, i) if adapter.proj_norms else {}
        for path in adapter.proj_norms:  # rows feeding a whole-projection norm: zero, as removal means
            if drops.get((path, "out")):
                parent, _, name = path.rpartition(".")
                owner, original = get_path(layer, parent), get_path(layer, path)
                setattr(owner, name, OutputZero(original, torch.tensor(sorted(drops[(path, "out")]))))
                undo.append(lambda owner=owner, name=name, original=original: setattr(owner, name, original))
    return lambda: [u() for u in reversed(undo)]


@contextmanager
def masking(model: nn.Module, plan: Plan) -> Iterator[nn.Module]:
    """``with masking(model, plan) as view:`` a masked clone sharing ``model``'s tensors, for the block only.

    ``model`` itself is never changed (its masks would be seen by every thread using it): use the yielded view.
    """
    plan.validate(model, physical=False, allow_other_weights=True)
    view = clone_model(model, share_weights=True)
    undo = install_masks(view, plan)
    try:
        yield view
    finally:
        undo()


def masked_model(model: nn.Module, plan: Plan) -> nn.Module:
    """A preview of ``plan``: a clone sharing ``model``'s tensors, with removed units masked. Instant; base
    untouched.

    Unlike :func:`apply_plan` it accepts any head pattern (no equal-heads-per-KV-group rule). Compensation
    solvers are not run: a SlimGPT plan previews as the same units removed without weight updates.
    """
    plan.validate(model, physical=False, allow_other_weights=True)
    view = clone_model(model, share_weights=True)
    install_masks(view, plan)
    view.config = copy.deepcopy(model.config)
    view.config.pruneviz_masked_plan = plan.sha256()
    return view
