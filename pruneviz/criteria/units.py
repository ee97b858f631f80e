"""Unit aggregation: the engine every width criterion scores through.

A criterion supplies, per projection, a per-feature score vector (a sum over that feature's row or column of
some per-weight score: ``|W|`` for magnitude, ``|W|·‖X‖`` for Wanda-sp, ``|W·∇W|`` for Taylor); the score of a
query head, KV group or MLP channel is the sum over the features the unit owns, as declared once in
:mod:`pruneviz.arch`. Because every unit of a kind owns translated copies of the same slices, the sum is a
vectorised gather. The block scores of Shortened LLaMA (arXiv 2402.02834), a sum over every weight tensor of a
block, live here too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from ..arch import UNITS, WIDTH_KINDS, Adapter, Geometry, adapter_for, geometry_of, unit_count, weight_axis
from ..errors import CriterionError
from ..offload import materialized
from ..progress import Span

# (layer index, layer module, projection path) -> {"out": [n_out], "in": [n_in]} per-feature scores
FeatureFn = Callable[[int, nn.Module, str], dict[str, torch.Tensor]]


# ---- per-feature sums -------------------------------------------------------------------------------------------

def feature_sums(module: nn.Module, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums of ``values`` (laid out like ``module.weight``) per output feature and per input feature."""
    return {"out": values.sum(dim=weight_axis(module, "in")),  # [n_out]
            "in": values.sum(dim=weight_axis(module, "out"))}  # [n_in]


def scale_inputs(module: nn.Module, values: torch.Tensor, per_input: torch.Tensor) -> torch.Tensor:
    """``values`` (laid out like ``module.weight``) multiplied by ``per_input[j]`` along the input axis."""
    shape = [1, 1]
    shape[weight_axis(module, "in")] = -1
    return values * per_input.to(values.device, values.dtype).view(shape)


def with_bias(module: nn.Module, feats: dict[str, torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]
              ) -> dict[str, torch.Tensor]:
    """Add ``fn(bias)`` to the output-feature sums (a unit owning row i owns bias i)."""
    bias = getattr(module, "bias", None)
    if bias is None:
        return feats
    return {**feats, "out": feats["out"] + fn(bias.detach().float())}


# ---- aggregation over units -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SliceIndex:
    """Position k of a unit kind's slice list: module, axis and the feature indices of every unit [n_units, w]."""

    module: str
    axis: str
    index: torch.Tensor


def unit_index(adapter: Adapter, g: Geometry, kind: str, modules: Iterable[str] | None = None) -> list[SliceIndex]:
    """Stack the slices of all units of ``kind`` (optionally only those on ``modules``) into gather indices."""
    per_unit = [adapter.unit_slices(g, kind, u) for u in range(unit_count(g, kind))]
    template = [(s.module, s.axis, len(s.index)) for s in per_unit[0]]
    if any([(s.module, s.axis, len(s.index)) for s in sl] != template for sl in per_unit):
        raise CriterionError(f"{adapter.family}: units of kind {kind} do not own slices of the same shape")
    keep = set(modules) if modules is not None else None
    out = []
    for k, (module, axis, _) in enumerate(template):
        if keep is None or module in keep:
            idx = torch.tensor([sl[k].index for sl in per_unit], dtype=torch.long)  # [n_units, w]
            out.append(SliceIndex(module, axis, idx))
    return out


def aggregate_units(model: nn.Module, features: FeatureFn, kinds: Iterable[str] = WIDTH_KINDS,
                    modules: Iterable[str] | None = None, span: Span | None = None) -> dict[str, torch.Tensor]:
    """Unit scores ``{map name: [L, n_units]}``: per layer, the sum over each unit's owned features of ``features``.

    ``features(l, layer, path)`` is called once per layer and projection that some unit owns (restricted to
    ``modules`` if given: slices on other projections contribute nothing). Results are fp32 on the CPU.
    """
    adapter, g = adapter_for(model), geometry_of(model)
    kinds = tuple(kinds)
    index = {kind: unit_index(adapter, g, kind, modules) for kind in kinds}
    paths = sorted({s.module for kind in kinds for s in index[kind]})
    out = {UNITS[k].map: torch.zeros(g.n_layers, unit_count(g, k)) for k in kinds}  # [L, n]
    span = span or Span(None)
    for l, layer in enumerate(adapter.layers(model)):
        with materialized(layer):  # offloaded weights are read one block at a time
            feats = {p: {a: v.detach().float().cpu() for a, v in features(l, layer, p).items()} for p in paths}
        for kind in kinds:
            for s in index[kind]:
                out[UNITS[kind].map][l] += feats[s.module][s.axis][s.index].sum(-1)  # [n]
        span.step((l + 1) / g.n_layers, f"scoring layer {l + 1}/{g.n_layers}")
    return out


# ---- block scores (Shortened LLaMA) -------------------------------------------------------------------------------

def block_tensors(layer: nn.Module, include_norms: bool) -> Iterable[tuple[str, nn.Parameter]]:
    """The weight tensors a Shortened-LLaMA block score sums over: projection matrices and (optionally) norms.

    Biases are left out (the reference keeps names containing "weight"); 1-D weights are norm scales.
    """
    for name, p in layer.named_parameters():
        if not name.endswith("weight"):
            continue
        if p.ndim >= 2 or include_norms:
            yield name, p


def block_scores(model: nn.Module, tensor_of: Callable[[int, str, nn.Parameter], torch.Tensor], power: float,
                 include_norms: bool) -> torch.Tensor:
    """``I_n = Σ_k Σ |T_k|^p`` per block [L], with ``T_k = tensor_of(layer, name, param)`` (e.g. the weight)."""
    layers = adapter_for(model).layers(model)
    scores = torch.zeros(len(layers))  # [L]
    for l, layer in enumerate(layers):
        with materialized(layer):
            for name, p in block_tensors(layer, include_norms):
                scores[l] += tensor_of(l, name, p).detach().float().abs().pow(power).sum().cpu()
    return scores
