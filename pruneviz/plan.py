"""Pruning plans: plain, immutable data naming the units to remove from one base model.

A :class:`Plan` names removed *blocks* (whole decoder layers), removed *KV groups*, removed *query heads* and
removed *MLP channels* per layer, always in the **base model's** numbering. It also carries the base model's
identity (geometry plus a small weight probe) so that a plan for another model is rejected with a message, and
free-form provenance (criterion, calibration, allocation). Plans round-trip through JSON and are hashable, so
caches can key on them; every edit returns a new plan.

Normal form (applied on construction, so equal plans compare and hash equal):
- indices sorted and unique, layers with nothing removed dropped;
- units inside a removed block are dropped (the block subsumes them);
- query heads inside a removed KV group are dropped (the group subsumes them);
- a KV group whose every query head is removed becomes a removed KV group (its key/value rows are dead);
- a layer whose every KV group is removed has its **attention sub-block removed**, and a layer whose every MLP
  channel is removed has its **MLP sub-block removed** (BlockPruner's units, :meth:`Plan.without_attention`,
  :meth:`Plan.without_mlp`): the sub-block then adds nothing to the residual stream, and surgery drops it whole,
  with its output bias and the norms only it reads (:class:`pruneviz.arch.SubBlock`, counted by
  :meth:`Plan.param_count`); under multi-query attention removing the one KV group (or every query head) is
  removing the attention;
- a layer with both sub-blocks removed is a removed block (the two are the same function).

``compensation`` names a weight-update solver (e.g. ``"slimgpt"``) that must re-run when the plan is applied:
such a plan is not a pure unit toggle, see :func:`pruneviz.surgery.apply_plan`.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

import torch
from torch import nn

from .arch import (
    UNITS,
    WIDTH_KINDS,
    Geometry,
    adapter_for,
    geometry_of,
    get_path,
    owned_params,
    sub_block_params,
    unit_count,
    weight_axis,
)
from .errors import PlanError
from .fsio import strict_json
from .offload import materialized

SCHEMA = "pruneviz.plan/1"
# compensations that create output-projection biases (FLAP's mean, SlimLLM's affine refit)
ADDS_OUTPUT_BIAS = frozenset({"flap_bias", "affine", "affine_sequential", "affine_local"})
Removed = tuple[tuple[int, tuple[int, ...]], ...]  # ((layer, (idx, ...)), ...)


def weight_probe(model: nn.Module, n: int = 16) -> tuple[float, ...]:
    """A few deterministic weight values that identify a base model across dtypes and devices."""
    adapter = adapter_for(model)
    layer = adapter.layers(model)[0]
    with materialized(layer):  # an offloaded block 0 is read from its offload store
        w = get_path(layer, adapter.attn_out).weight.detach().float().flatten()  # [out * in]
        idx = torch.linspace(0, w.numel() - 1, n).long().to(w.device)
        return tuple(round(float(v), 6) for v in w[idx].cpu())


@dataclass(frozen=True)
class BaseIdentity:
    """What a plan was written for: a name, the dense geometry and a weight probe."""

    name: str
    geometry: Geometry
    probe: tuple[float, ...] = ()

    @classmethod
    def of(cls, model: nn.Module, name: str | None = None) -> "BaseIdentity":
        if getattr(model.config, "pruneviz_base_geometry", None):
            raise PlanError("this model is already pruned; make plans against the dense base model it came from")
        name = name or getattr(model.config, "_name_or_path", "") or model.config.model_type
        return cls(str(name), geometry_of(model), weight_probe(model))

    def to_dict(self) -> dict:
        return {"name": self.name, "geometry": self.geometry.to_dict(), "probe": list(self.probe)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "BaseIdentity":
        """Strictly: a name, a geometry of whole numbers, and a non-empty probe of finite numbers (without it a plan
        for another checkpoint with the same shapes could not be told apart). PlanError names the field."""
        if not isinstance(d, Mapping):
            raise PlanError(f"plan field 'base' must be an object (name, geometry, probe), not {type(d).__name__}")
        _known_keys(d, {"name", "geometry", "probe"}, "base")
        if not isinstance(d.get("name"), str):
            raise PlanError("plan field 'base.name' must be a string naming the model the plan was made for")
        probe = d.get("probe")
        if not isinstance(probe, list) or not probe:
            raise PlanError("plan field 'base.probe' (the weight probe of the model the plan was made for) is missing "
                            "or empty, so the plan cannot be checked against the model's weights; re-export it")
        for x in probe:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise PlanError(f"plan field 'base.probe' holds {x!r}, not a finite number; re-export the plan")
        return cls(d["name"], geometry_from_dict(d.get("geometry"), "plan field 'base.geometry'", PlanError),
                   tuple(float(x) for x in probe))


def geometry_from_dict(d, where: str, error=PlanError) -> Geometry:
    """A :class:`Geometry` from JSON, strictly: exactly its fields, names as strings, sizes as positive ints."""
    if not isinstance(d, Mapping):
        raise error(f"{where} must be an object, not {type(d).__name__}")
    want = {f.name: f.type for f in fields(Geometry)}
    missing, extra = sorted(set(want) - set(d)), sorted(set(d) - set(want))
    if missing or extra:
        raise error(f"{where} does not match the plan format ("
                    + "; ".join(x for x in (f"missing {missing}" if missing else "",
                                            f"unknown {extra}" if extra else "") if x) + "); re-export it")
    for key, value in d.items():
        if key in ("family", "model_type"):
            if not isinstance(value, str):
                raise error(f"{where}.{key} must be a string, not {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or not 0 < value < MAX_INDEX:
            raise error(f"{where}.{key} must be a positive whole number, not {value!r}")
    return Geometry(**d)


MAX_INDEX = 1 << 31
PLAN_KEYS = {"schema", "base", "blocks", "kv_groups", "heads", "channels", "compensation", "provenance", "summary"}


def _known_keys(d: Mapping, allowed: set[str], where: str) -> None:
    extra = sorted(str(k) for k in set(d) - allowed)
    if extra:
        raise PlanError(f"plan field '{where}' has unknown keys {extra}; a pruneviz plan has only "
                        f"{sorted(allowed)}. Fix the file or re-export it")


def _index(x, where: str) -> int:
    """A unit or layer index from JSON: a whole number (not a float, not a boolean, not huge)."""
    if isinstance(x, bool) or not isinstance(x, int):
        raise PlanError(f"plan field '{where}' holds {x!r} ({type(x).__name__}); indices must be whole numbers "
                        f"such as 3. Fix the file or re-export it")
    if not -MAX_INDEX < x < MAX_INDEX:
        raise PlanError(f"plan field '{where}' holds the index {x}, far out of range for any model; fix the file")
    return x


def _index_list(v, where: str) -> tuple[int, ...]:
    if not isinstance(v, list):
        raise PlanError(f"plan field '{where}' must be a list of indices, not {type(v).__name__}")
    return tuple(_index(x, f"{where}[{i}]") for i, x in enumerate(v))


def _layer_map(m, where: str) -> Removed:
    """``{"3": [0, 5]}`` from JSON, strictly: layer keys are decimal strings, values lists of whole numbers."""
    if m is None:
        return ()
    if not isinstance(m, Mapping):
        raise PlanError(f"plan field '{where}' must map layers to index lists (e.g. {{\"0\": [1, 2]}}), not "
                        f"{type(m).__name__}")
    out = []
    for key, v in m.items():
        if not isinstance(key, str) or not re.fullmatch(r"-?(0|[1-9][0-9]{0,9})", key):
            raise PlanError(f"plan field '{where}' has the layer key {key!r}; layer keys are whole numbers such as "
                            f"\"0\". Fix the file or re-export it")
        out.append((_index(int(key), f"{where}.{key}"), _index_list(v, f"{where}.{key}")))
    return tuple(out)


def _norm_map(m: Mapping[int, Any] | Removed | None) -> Removed:
    items = m.items() if isinstance(m, Mapping) else (m or ())
    out = {}
    for layer, idx in items:
        idx = tuple(sorted({int(i) for i in idx}))
        if idx:
            out[int(layer)] = tuple(sorted(set(out.get(int(layer), ())) | set(idx)))
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class Plan:
    """Immutable set of removed units of one base model (see module docstring for the normal form)."""

    base: BaseIdentity
    blocks: tuple[int, ...] = ()
    kv: Removed = ()
    heads: Removed = ()
    channels: Removed = ()
    compensation: str | None = None
    provenance_json: str = field(default="{}", compare=False)

    # ---- construction -------------------------------------------------------------------------------------------
    def __post_init__(self):
        g = self.base.geometry
        blocks = tuple(sorted({int(b) for b in self.blocks}))
        kv = dict(_norm_map(self.kv))
        heads = dict(_norm_map(self.heads))
        for layer, hs in list(heads.items()):  # a group with every head removed is a removed group
            full = [grp for grp in range(g.n_kv) if set(g.heads_of(grp)) <= set(hs)]
            if full:
                kv[layer] = tuple(sorted(set(kv.get(layer, ())) | set(full)))
        for layer, hs in list(heads.items()):  # heads in removed groups are implied
            heads[layer] = tuple(h for h in hs if g.kv_of(h) not in kv.get(layer, ()))
        chans = dict(_norm_map(self.channels))
        blocks = tuple(sorted(set(blocks) | {l for l, grp in kv.items() if len(set(grp)) >= g.n_kv
                                             and len(set(chans.get(l, ()))) >= g.n_channels}))
        drop = set(blocks)
        clean = lambda m: tuple((l, i) for l, i in sorted(m.items()) if i and l not in drop)  # noqa: E731
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "kv", clean(kv))
        object.__setattr__(self, "heads", clean(heads))
        object.__setattr__(self, "channels", clean(chans))

    @classmethod
    def empty(cls, model_or_base, **provenance) -> "Plan":
        base = model_or_base if isinstance(model_or_base, BaseIdentity) else BaseIdentity.of(model_or_base)
        return cls(base, provenance_json=json.dumps(provenance, sort_keys=True, default=str))

    @property
    def geometry(self) -> Geometry:
        return self.base.geometry

    @property
    def provenance(self) -> dict:
        return json.loads(self.provenance_json)

    def with_provenance(self, **items) -> "Plan":
        prov = {**self.provenance, **items}
        return replace(self, provenance_json=json.dumps(prov, sort_keys=True, default=str))

    # ---- queries --------------------------------------------------------------------------------------------------
    def removed(self, kind: str, layer: int | None = None):
        """Removed indices of ``kind`` in ``layer`` (a tuple), or for ``kind="block"`` the removed blocks."""
        if kind == "block":
            return self.blocks
        table = dict(getattr(self, _field(kind)))
        return table.get(layer, ()) if layer is not None else table

    def removed_heads_all(self, layer: int) -> tuple[int, ...]:
        """Every removed query head of ``layer``: those named directly plus those of removed KV groups."""
        g = self.geometry
        if layer in self.blocks:
            return tuple(range(g.n_heads))
        from_groups = [h for grp in self.removed("kv", layer) for h in g.heads_of(grp)]
        return tuple(sorted(set(from_groups) | set(self.removed("head", layer))))

    def kept(self, kind: str, layer: int) -> tuple[int, ...]:
        g = self.geometry
        if kind == "head":
            gone = set(self.removed_heads_all(layer))
            return tuple(h for h in range(g.n_heads) if h not in gone)
        gone = set(self.removed(kind, layer))
        return tuple(i for i in range(unit_count(g, kind)) if i not in gone)

    def attention_removed(self, layer: int) -> bool:
        """True if ``layer`` (kept) has lost its whole attention sub-block: every KV group is removed."""
        return layer not in self.blocks and len(self.removed("kv", layer)) == self.geometry.n_kv

    def mlp_removed(self, layer: int) -> bool:
        """True if ``layer`` (kept) has lost its whole MLP sub-block: every MLP channel is removed."""
        return layer not in self.blocks and len(self.removed("channel", layer)) == self.geometry.n_channels

    def removed_sub_blocks(self) -> tuple[tuple[int, str], ...]:
        """``(layer, "attn" | "mlp")`` of every removed sub-block of a kept layer, in layer order."""
        return tuple((l, part) for l in self.kept_blocks() for part, gone in
                     (("attn", self.attention_removed(l)), ("mlp", self.mlp_removed(l))) if gone)

    def without_attention(self, layer: int) -> "Plan":
        """This plan with ``layer``'s attention sub-block removed (every KV group; the block if its MLP is gone)."""
        return self.with_units("kv", layer, range(self.geometry.n_kv))

    def without_mlp(self, layer: int) -> "Plan":
        """This plan with ``layer``'s MLP sub-block removed (every channel; the block if its attention is gone)."""
        return self.with_units("channel", layer, range(self.geometry.n_channels))

    def without_sub_block(self, layer: int, part: str) -> "Plan":
        """:meth:`without_attention` (``part="attn"``) or :meth:`without_mlp` (``"mlp"``)."""
        if part not in ("attn", "mlp"):
            raise PlanError(f"a sub-block is 'attn' or 'mlp', not {part!r}")
        return self.without_attention(layer) if part == "attn" else self.without_mlp(layer)

    def kept_blocks(self) -> tuple[int, ...]:
        return tuple(b for b in range(self.geometry.n_layers) if b not in self.blocks)

    def is_empty(self) -> bool:
        return not (self.blocks or self.kv or self.heads or self.channels) and self.compensation is None

    def is_uniform(self) -> bool:
        """True if every kept layer has the same widths (heads, KV groups, channels)."""
        widths = {(len(self.kept("head", l)), len(self.kept("kv", l)), len(self.kept("channel", l)))
                  for l in self.kept_blocks()}
        return len(widths) <= 1

    def counts(self) -> dict[str, int]:
        """Numbers of removed units of each kind (query heads include those of removed groups)."""
        kept = self.kept_blocks()
        return {"block": len(self.blocks),
                "kv": sum(len(self.removed("kv", l)) for l in kept),
                "head": sum(len(self.removed_heads_all(l)) for l in kept),
                "channel": sum(len(self.removed("channel", l)) for l in kept)}

    def summary(self) -> str:
        c = self.counts()
        g = self.geometry
        kept = max(len(self.kept_blocks()), 1)
        subs = [part for _, part in self.removed_sub_blocks()]
        sub = (f" ({subs.count('attn')} attention and {subs.count('mlp')} MLP sub-blocks removed)"
               if subs else "")
        return (f"{c['block']}/{g.n_layers} blocks, {c['kv']}/{kept * g.n_kv} KV groups, "
                f"{c['head']}/{kept * g.n_heads} query heads, {c['channel']}/{kept * g.n_channels} MLP channels"
                + sub)

    # ---- edits (each returns a new plan) --------------------------------------------------------------------------
    def with_units(self, kind: str, layer: int | None, indices, remove: bool = True) -> "Plan":
        """Add (``remove=True``) or take back units; ``kind`` in block/kv/head/channel."""
        indices = {int(i) for i in indices}
        if kind == "block":
            blocks = set(self.blocks) | indices if remove else set(self.blocks) - indices
            return replace(self, blocks=tuple(blocks))
        base = self._reopened_groups(layer, indices) if kind == "head" and not remove else self
        table = {l: set(i) for l, i in getattr(base, _field(kind))}
        cur = table.setdefault(layer, set())
        table[layer] = cur | indices if remove else cur - indices
        return replace(base, **{_field(kind): tuple((l, tuple(i)) for l, i in table.items())})

    def _reopened_groups(self, layer: int | None, heads: set[int]) -> "Plan":
        """Taking back a head of a removed KV group re-opens the group: its other heads are removed one by one."""
        g = self.geometry
        table_kv = {l: set(i) for l, i in self.kv}
        table = {l: set(i) for l, i in self.heads}
        for h in heads:
            grp = g.kv_of(h)
            if grp in table_kv.get(layer, set()):
                table_kv[layer].discard(grp)
                table.setdefault(layer, set()).update(set(g.heads_of(grp)) - {h})
        return replace(self, kv=tuple((l, tuple(i)) for l, i in table_kv.items()),
                       heads=tuple((l, tuple(i)) for l, i in table.items()))

    def toggled(self, kind: str, layer: int | None, index: int) -> "Plan":
        """Flip one unit: remove it if kept, keep it if removed (a head of a removed group counts as removed)."""
        if kind == "block":
            gone = index in self.blocks
        elif kind == "head":
            gone = index in self.removed_heads_all(layer)
        else:
            gone = index in self.removed(kind, layer)
        return self.with_units(kind, layer, [index], remove=not gone)

    def merged(self, other: "Plan") -> "Plan":
        if other.base.geometry != self.base.geometry:
            raise PlanError("cannot merge plans written for different models")
        return replace(self, blocks=self.blocks + other.blocks, kv=self.kv + other.kv,
                       heads=self.heads + other.heads, channels=self.channels + other.channels,
                       compensation=self.compensation or other.compensation)

    # ---- validation -----------------------------------------------------------------------------------------------
    def check_indices(self) -> None:
        """Raise PlanError if an index is out of range or the plan removes every block. A kept layer may lose all
        of its attention or all of its MLP (a removed sub-block, see the module docstring), not both (that is a
        removed block, which the normal form makes it)."""
        g = self.geometry
        bad = [b for b in self.blocks if not 0 <= b < g.n_layers]
        if bad:
            raise PlanError(f"block indices {bad} are out of range: the model has blocks 0..{g.n_layers - 1}")
        if len(self.blocks) >= g.n_layers:
            raise PlanError("the plan removes every block; keep at least one")
        for kind, n in (("kv", g.n_kv), ("head", g.n_heads), ("channel", g.n_channels)):
            for layer, idx in getattr(self, _field(kind)):
                if not 0 <= layer < g.n_layers:
                    raise PlanError(f"layer {layer} is out of range: the model has layers 0..{g.n_layers - 1}")
                out = [i for i in idx if not 0 <= i < n]
                if out:
                    raise PlanError(f"{kind} indices {out} in layer {layer} are out of range (0..{n - 1})")

    def check_gqa(self) -> None:
        """Raise PlanError unless every kept KV group of a layer keeps the same number of query heads.

        Physical surgery needs it: HF attention maps query head ``i`` to KV head ``i // n_rep`` with one ``n_rep``
        per layer. Masked previews do not need it.
        """
        g = self.geometry
        for layer in self.kept_blocks():
            kept = set(self.kept("head", layer))
            sizes = {grp: len(kept & set(g.heads_of(grp))) for grp in self.kept("kv", layer)}
            if len(set(sizes.values())) > 1:
                raise PlanError(
                    f"layer {layer} keeps {sorted(sizes.values())} query heads in its KV groups {sorted(sizes)}; "
                    f"a physically pruned layer needs the same number in every kept group. Remove the same "
                    f"number of heads from every group, or remove whole KV groups (allocation does this).")

    def validate(self, model: nn.Module, physical: bool = True, allow_other_weights: bool = False) -> "Plan":
        """Check that this plan fits ``model`` (the dense base). Returns self; raises PlanError saying what differs.

        An already pruned model is refused whatever it records: the plan's indices name units of the dense model
        it was made for (``base``), and on a pruned model they would name other units."""
        cfg = model.config
        if any(getattr(cfg, k, None) for k in ("pruneviz_base_geometry", "pruneviz_plan", "pruneviz_plan_sha256")):
            raise PlanError(f"this plan was made for the dense model {self.base.name!r}, but the loaded model is "
                            f"already pruned; its indices would remove other units. Apply the plan to the dense "
                            f"model it was made for")
        mine, theirs = self.base.geometry, geometry_of(model)
        if mine != theirs:
            diff = {k: (v, getattr(theirs, k)) for k, v in mine.to_dict().items() if getattr(theirs, k) != v}
            raise PlanError(f"this plan was made for {self.base.name!r}, which differs from the loaded model in "
                            + ", ".join(f"{k}: plan {a} vs model {b}" for k, (a, b) in diff.items())
                            + ". Load the model the plan was made for, or make a new plan for this one.")
        if self.base.probe and not allow_other_weights:
            probe = weight_probe(model, len(self.base.probe))
            if not torch.allclose(torch.tensor(probe), torch.tensor(self.base.probe), rtol=2e-2, atol=1e-3):
                raise PlanError(f"this plan was made for {self.base.name!r}: same shapes as the loaded model but "
                                f"different weights. Load that model, or pass allow_other_weights=True to apply it "
                                f"anyway (indices will be honoured, scores no longer mean the same).")
        self.check_indices()
        self.check_sub_blocks(model)
        if physical:
            self.check_gqa()
        return self

    def check_sub_blocks(self, model: nn.Module) -> None:
        """Raise PlanError if the plan removes a whole attention or MLP sub-block and ``model``'s family cannot
        drop one alone (:meth:`pruneviz.arch.Adapter.sub_block` is None, e.g. BLOOM)."""
        adapter = adapter_for(model)
        for layer, part in self.removed_sub_blocks():
            if adapter.sub_block(part, model.config) is None:
                what = "attention" if part == "attn" else "MLP"
                raise PlanError(f"layer {layer} would lose its whole {what}; {adapter.family} blocks cannot drop "
                                f"the {what} alone (its forward adds the residual inside it). Keep one "
                                f"{'KV group' if part == 'attn' else 'MLP channel'} or remove the whole block")

    # ---- arithmetic -----------------------------------------------------------------------------------------------
    def param_count(self, model: nn.Module, non_embedding: bool = False) -> int:
        """Parameters of the model after applying this plan, computed from unit sizes (no surgery)."""
        adapter, g = adapter_for(model), self.geometry
        layer0 = adapter.layers(model)[0]
        size = lambda slices: owned_params(adapter, layer0, slices)  # noqa: E731
        head, kv_rows, chan = size(adapter.head_slices(g, 0)), size(adapter.kv_slices(g, 0)), \
            size(adapter.channel_slices(g, 0))
        block = sum(p.numel() for p in layer0.parameters())
        removed = block * len(self.blocks)
        for layer in self.kept_blocks():  # a removed sub-block takes all of its parameters (and its norms)
            removed += sub_block_params(adapter, model, "attn") if self.attention_removed(layer) else \
                head * len(self.removed_heads_all(layer)) + kv_rows * len(self.removed("kv", layer))
            removed += sub_block_params(adapter, model, "mlp") if self.mlp_removed(layer) else \
                chan * len(self.removed("channel", layer))
        return dense_params(model, non_embedding) - removed + self._added_biases(model)

    def _added_biases(self, model: nn.Module) -> int:
        """Parameters a compensation in :data:`ADDS_OUTPUT_BIAS` creates: a bias on each output projection
        (attention, MLP) of a kept layer that loses units there and had no bias before (a removed sub-block has
        no projection left to hold one)."""
        if self.compensation not in ADDS_OUTPUT_BIAS:
            return 0
        adapter = adapter_for(model)
        added = 0
        for l, layer in zip(self.kept_blocks(), [adapter.layers(model)[i] for i in self.kept_blocks()]):
            for path, lost in ((adapter.attn_out, self.removed_heads_all(l)), (adapter.mlp_out,
                                                                               self.removed("channel", l))):
                mod = get_path(layer, path)
                whole = len(lost) == (self.geometry.n_heads if path == adapter.attn_out else self.geometry.n_channels)
                if lost and not whole and getattr(mod, "bias", None) is None:
                    added += mod.weight.shape[weight_axis(mod, "out")]
        return added

    # ---- serialisation --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        as_map = lambda m: {str(l): list(i) for l, i in m}  # noqa: E731
        return {"schema": SCHEMA, "base": self.base.to_dict(), "blocks": list(self.blocks),
                "kv_groups": as_map(self.kv), "heads": as_map(self.heads), "channels": as_map(self.channels),
                "compensation": self.compensation, "provenance": self.provenance, "summary": self.summary()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Plan":
        if not isinstance(d, Mapping) or d.get("schema") != SCHEMA:
            raise PlanError(f"not a pruneviz plan (expected \"schema\": \"{SCHEMA}\"); export a plan from pruneviz "
                            f"and load that file")
        try:
            return cls._from_checked_dict(d)
        except PlanError as e:
            raise PlanError(f"the plan file is malformed: {e.message}") from None

    @classmethod
    def _from_checked_dict(cls, d: Mapping) -> "Plan":
        _known_keys(d, PLAN_KEYS, "(top level)")
        if "base" not in d:
            raise PlanError("plan field 'base' (the model the plan was made for) is missing; re-export the plan")
        comp, prov = d.get("compensation"), d.get("provenance", {})
        if comp is not None and (not isinstance(comp, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", comp)):
            raise PlanError(f"plan field 'compensation' must be null or a solver name such as \"slimgpt\", not "
                            f"{str(comp)[:60]!r}")
        if not isinstance(prov, Mapping):
            raise PlanError(f"plan field 'provenance' must be an object, not {type(prov).__name__}")
        blocks = _index_list(d.get("blocks", []), "blocks")
        try:
            prov_json = json.dumps(prov, sort_keys=True, default=str)
        except (TypeError, ValueError, RecursionError) as e:
            raise PlanError(f"plan field 'provenance' cannot be stored ({type(e).__name__}); fix the file") from e
        return cls(BaseIdentity.from_dict(d["base"]), blocks, _layer_map(d.get("kv_groups"), "kv_groups"),
                   _layer_map(d.get("heads"), "heads"), _layer_map(d.get("channels"), "channels"), comp, prov_json)

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Plan":
        return cls.from_dict(strict_json(text, PlanError, "the plan"))

    def sha256(self) -> str:
        """Content hash of what the plan removes and what it was made for (provenance excluded)."""
        d = self.to_dict()
        for k in ("provenance", "summary"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _field(kind: str) -> str:
    """The plan field of a width unit kind (arch.UNITS)."""
    if kind not in WIDTH_KINDS:
        raise PlanError(f"unit kind must be one of block, kv, head, channel; got {kind!r}")
    return UNITS[kind].map


def dense_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Parameters of ``model`` (tied tensors once); ``non_embedding`` drops input embeddings and lm_head."""
    seen, total = set(), 0
    skip = set()
    if non_embedding:
        skip = {id(model.get_input_embeddings().weight)}
        out = model.get_output_embeddings()
        if out is not None:
            skip.add(id(out.weight))
        for m in model.modules():  # learned absolute positions (OPT, GPT-2) are embeddings too
            if isinstance(m, nn.Embedding):
                skip.add(id(m.weight))
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
    return total
