"""Calibration statistics of projection inputs, streamed in one pass: ‖X_j‖₂, Var(X_j) and mean(X_j).

Several width criteria read the same per-feature numbers of the *inputs* of a decoder layer's projections:

- Wanda-sp (FLAP's baseline, arXiv 2312.11983) weighs ``|W_ij|`` by ``‖X_j‖₂``;
- FLAP's fluctuation metric weighs ``‖W_:,j‖²`` by ``Var(X_j)`` and its bias compensation needs ``mean(X_j)``;
- MINI-LLM (arXiv 2407.11681) weighs ``|W ⊙ ĝ|`` by ``‖X_j‖₂`` (reading A) or ``|mean(X_j)|`` (reading B).

They are collected at four *sites* per decoder layer:

======== ====================================================================================================
site      input of
======== ====================================================================================================
attn_in   the first attention projection (``adapter.attn_modules[0]``): the hidden state q/k/v (or fused qkv) read
attn_out  the attention output projection (``adapter.attn_out``): its input columns are the query heads
mlp_in    the first MLP projection (``adapter.mlp_modules[0]``): the hidden state up/gate (or fc1) read
mlp_out   the MLP down projection (``adapter.mlp_out``): its input columns are the MLP channels
======== ====================================================================================================

Every other projection reads the same tensor as the first one of its block (k/v read what q reads, up reads
what gate reads), so :func:`input_site` maps any projection to its site.

Accumulation is fp32 whatever the model dtype. Per feature we keep the token count, the running mean and the
sum of squared deviations ``M2`` merged batch by batch (Chan, Golub & LeVeque's parallel update, which avoids
the cancellation of ``E[x²] − E[x]²``), plus the plain ``Σ x²`` from which ``‖X_j‖₂`` is taken (a sum of
non-negative terms, so no cancellation either). Statistics are over *all calibration tokens* (batch × position),
taken from the unmodified (dense) model in a single forward pass per batch under ``torch.inference_mode``; only
the decoder stack runs (``model.base_model``), the vocabulary projection is skipped. Nothing is cached between
calls: every call runs the calibration batches again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ..arch import Adapter, adapter_for, get_path
from ..errors import CriterionError
from ..importance import Calibration
from ..offload import clone_model, execution_device, is_offloaded
from ..progress import Span
from .capture import capture_inputs

SITES = ("attn_in", "attn_out", "mlp_in", "mlp_out")
DEFAULT_BATCH_SIZE = 8


# ---- per-feature accumulators -----------------------------------------------------------------------------------

@dataclass
class FeatureStats:
    """Streaming fp32 statistics of one input tensor, per feature (last dimension)."""

    count: int = 0  # tokens seen
    mean: torch.Tensor | None = None  # [F]
    m2: torch.Tensor | None = None  # [F] sum of squared deviations from the mean
    sumsq: torch.Tensor | None = None  # [F] Σ x²

    def update(self, x: torch.Tensor) -> None:
        """Merge a batch ``x`` of shape ``[..., F]`` (every leading index is one token)."""
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [n, F]
        n = x.shape[0]
        if n == 0:
            return
        b_mean = x.mean(0)  # [F]
        b_m2 = (x - b_mean).pow(2).sum(0)  # [F]
        b_sq = x.pow(2).sum(0)  # [F]
        if self.count == 0:
            self.count, self.mean, self.m2, self.sumsq = n, b_mean, b_m2, b_sq
            return
        total = self.count + n
        delta = b_mean - self.mean  # [F]
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + b_m2 + delta.pow(2) * (self.count * n / total)
        self.sumsq = self.sumsq + b_sq
        self.count = total

    @property
    def sum(self) -> torch.Tensor:
        """Σ x per feature [F]."""
        return self.mean * self.count

    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens [F]."""
        return self.sumsq.clamp_min(0).sqrt()

    def variance(self, unbiased: bool = True) -> torch.Tensor:
        """Per-feature variance over tokens [F]: ``M2/(n−1)`` (unbiased, default) or ``M2/n`` (population)."""
        denom = self.count - 1 if unbiased and self.count > 1 else max(self.count, 1)
        return self.m2 / denom


@dataclass
class CalibrationStats:
    """Statistics per site and layer: ``sites[site][layer]`` is a :class:`FeatureStats`."""

    sites: dict[str, list[FeatureStats]] = field(default_factory=dict)
    tokens: int = 0

    def _stack(self, site: str, fn: Callable[[FeatureStats], torch.Tensor]) -> torch.Tensor:
        if site not in self.sites:
            raise KeyError(f"site {site!r} was not collected; collected: {sorted(self.sites)}")
        return torch.stack([fn(s) for s in self.sites[site]])  # [L, F]

    def norms(self, site: str) -> torch.Tensor:
        """‖X_j‖₂ per layer and input feature of ``site`` [L, F]."""
        return self._stack(site, FeatureStats.norm)

    def variances(self, site: str, unbiased: bool = True) -> torch.Tensor:
        """Var(X_j) per layer and input feature of ``site`` [L, F] (unbiased by default)."""
        return self._stack(site, lambda s: s.variance(unbiased))

    def means(self, site: str) -> torch.Tensor:
        """mean(X_j) per layer and input feature of ``site`` [L, F]."""
        return self._stack(site, lambda s: s.mean)


# ---- where the sites are ----------------------------------------------------------------------------------------

def site_module(adapter: Adapter, site: str) -> str:
    """Path (inside a decoder layer) of the projection whose input is ``site``."""
    paths = {"attn_in": adapter.attn_modules[0], "attn_out": adapter.attn_out,
             "mlp_in": adapter.mlp_modules[0], "mlp_out": adapter.mlp_out}
    if site not in paths:
        raise ValueError(f"unknown site {site!r}; one of {SITES}")
    return paths[site]


def input_site(adapter: Adapter, path: str) -> str:
    """The site whose statistics describe the input of projection ``path`` (inside a decoder layer)."""
    if path == adapter.attn_out:
        return "attn_out"
    if path == adapter.mlp_out:
        return "mlp_out"
    if path in adapter.attn_modules:
        return "attn_in"
    if path in adapter.mlp_modules:
        return "mlp_in"
    raise ValueError(f"{path!r} is not one of the scored projections of the {adapter.family} adapter")


# ---- the collector ----------------------------------------------------------------------------------------------

def _input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The input tensor of a projection call (positional, or its only keyword argument)."""
    return args[0] if args else next(iter(kwargs.values()))


class StatsCollector:
    """Context manager: forward pre-hooks on each site's projection stream its input statistics.

    The hooks live only inside the ``with`` block (they are removed on exit, also on errors and cancellation);
    the model's weights are never touched. Read the result with :meth:`result` after the forward passes.
    """

    def __init__(self, model: nn.Module, sites: Iterable[str] = SITES):
        self.model = model
        self.adapter = adapter_for(model)
        self.sites = tuple(sites)
        n_layers = len(self.adapter.layers(model))
        self.stats = CalibrationStats({s: [FeatureStats() for _ in range(n_layers)] for s in self.sites})
        self._handles: list = []

    def _hook(self, acc: FeatureStats):
        def hook(module, args, kwargs):
            acc.update(_input_of(args, kwargs))
        return hook

    def __enter__(self) -> "StatsCollector":
        for i, layer in enumerate(self.adapter.layers(self.model)):
            for site in self.sites:
                mod = get_path(layer, site_module(self.adapter, site))
                acc = self.stats.sites[site][i]
                self._handles.append(mod.register_forward_pre_hook(self._hook(acc), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def result(self) -> CalibrationStats:
        first = self.stats.sites[self.sites[0]][0] if self.sites else None
        self.stats.tokens = first.count if first is not None else 0
        return self.stats


def token_batches(calib: Calibration | torch.Tensor, batch_size: int, device) -> Iterator[torch.Tensor]:
    """Batches ``[b, T]`` of a :class:`Calibration` or of a plain ``[N, T]`` token tensor, on ``device``."""
    if isinstance(calib, Calibration):
        yield from calib.batches(batch_size, device)
        return
    for i in range(0, calib.shape[0], batch_size):
        yield calib[i:i + batch_size].to(device)


def n_batches(calib: Calibration | torch.Tensor, batch_size: int) -> int:
    tokens = calib.tokens if isinstance(calib, Calibration) else calib
    return max(1, -(-tokens.shape[0] // batch_size))


def check_hookable(model: nn.Module) -> None:
    """Refuse models whose projections are bypassed by the forward pass, so hooks would never see them.

    BLOOM with ``slow_but_exact`` and ``pretraining_tp > 1`` multiplies slices of the output projections' weights
    directly instead of calling the modules.
    """
    cfg = model.config
    if getattr(cfg, "slow_but_exact", False) and getattr(cfg, "pretraining_tp", 1) > 1:
        raise CriterionError("this model computes its output projections by slices (config.slow_but_exact with "
                             "pretraining_tp > 1), which activation statistics cannot observe; set "
                             "model.config.slow_but_exact = False (same results up to rounding) and score again")


def collect_stats(model: nn.Module, calib: Calibration | torch.Tensor, span: Span | None = None,
                  sites: Iterable[str] = SITES, batch_size: int = DEFAULT_BATCH_SIZE,
                  layerwise: bool | None = None) -> CalibrationStats:
    """Run the calibration windows once through ``model``'s decoder and return per-site input statistics.

    ``calib``: a :class:`Calibration` or ``[N, T]`` token ids. The model is not modified (inference mode,
    hooks removed afterwards). Reports progress on ``span`` and stops with ``Cancelled`` if asked to.
    ``layerwise``: stream the windows one block at a time (:func:`layerwise_stats`: peak
    memory one block + the activations); None (default) does so exactly when the model is offloaded.
    """
    check_hookable(model)
    if layerwise or (layerwise is None and is_offloaded(model)):
        return layerwise_stats(model, calib, span, sites, batch_size)
    span = span or Span(None)
    device, total = execution_device(model), n_batches(calib, batch_size)
    model = clone_model(model, share_weights=True)  # the hooks go on a view: other passes on model never see them
    with StatsCollector(model, sites) as collector, torch.inference_mode():
        for i, batch in enumerate(token_batches(calib, batch_size, device)):
            model.base_model(input_ids=batch, use_cache=False)
            span.step((i + 1) / total, f"calibration statistics: batch {i + 1}/{total}")
    return collector.result()


def layerwise_stats(model: nn.Module, calib, span=None, sites=None, batch_size: int = 8):
    """The statistics of :func:`collect_stats`, computed one block at a time.

    Same numbers as the full forward pass (same dense inputs, same fp32 accumulation) up to floating-point
    summation order; peak memory is one block plus the calibration activations.
    """
    span = span or Span(None)
    model = clone_model(model, share_weights=True)  # per-call hooks (accelerate's offload stores are shared)
    layers = adapter_for(model).layers(model)
    tokens = calib.tokens if isinstance(calib, Calibration) else calib
    with torch.inference_mode():
        stream = capture_inputs(model, tokens, batch_size)
        # every block's hooks are in place, but a block's only fire while it streams
        with StatsCollector(model, sites or SITES) as collector:
            for i, layer in enumerate(layers):
                for b in range(len(stream.hidden)):
                    stream.hidden[b] = stream.call(layer, i, b)  # the next block's inputs, in place
                span.step((i + 1) / len(layers), f"calibration statistics: block {i + 1}/{len(layers)}")
    return collector.result()
