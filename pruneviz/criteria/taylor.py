"""First-order Taylor importance by backprop (LLM-Pruner element-wise; Shortened LLaMA's block Taylor).

Removing a weight w changes the loss by about ``−w · ∂L/∂w``, so the element-wise saliency is ``|W ⊙ ∂L/∂W|``
(LLM-Pruner, arXiv 2305.11627, "element-wise"/``param_first``), with L the causal-LM cross-entropy on the
calibration windows.

- Width: a unit's score is ``Σ |W ⊙ G|`` over everything it owns (rows, columns, owned bias entries), as
  declared in :mod:`pruneviz.arch`.
- Depth (Shortened LLaMA, arXiv 2402.02834, ``src/anal_block_sensitivity_taylor.py``): the saliency
  ``W ⊙ G`` is accumulated per tensor, then ``I_n = Σ_k Σ_ij |salience^k_ij|^p`` over the block's weight tensors
  *including its norm weights* (``include_norms=True``, ``p = norm_power = 1``; biases left out as there).

Accumulation over calibration batches (``signed_accumulation``): True (default) sums ``W ⊙ G_b`` signed over
batches and takes the absolute value at the end. That is both LLM-Pruner's reading (its gradients accumulate in
``.grad`` before the abs) and Shortened LLaMA's (it accumulates the signed product): since ``W`` is fixed,
``|Σ_b W⊙G_b| = |W ⊙ Σ_b G_b|``, i.e. the saliency of the gradient of the total loss. False sums ``|W ⊙ G_b|``
per batch instead (never smaller; noisier units score higher). Batches are weighted by their token counts, so
the result is the gradient of the mean loss over all calibration tokens and does not depend on ``batch_size``
(for ``signed_accumulation=True``).

The shared model is never changed: gradients come from :func:`torch.autograd.grad` on the decoder-layer
parameters of a private view (:func:`pruneviz.offload.clone_model` with ``own_parameters``: same storage, its own
``requires_grad`` flags and ``.grad``, so gradient passes on one base model can run in several threads at once and
the base's flags never change), nothing is left in ``.grad``, and the model stays in eval mode (no dropout).
Logits are upcast to fp32 for the loss and saliencies are
accumulated in fp32 (the gradients themselves have the model's dtype). Memory is that of training: the
activations of one batch plus the gradients and one fp32 accumulator of the decoder-layer weights.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import adapter_for, geometry_of, get_path
from ..importance import Calibration, Context, Criterion, ImportanceMap, register
from ..offload import clone_model, execution_device
from ..progress import Span
from .stats import n_batches, token_batches
from .units import aggregate_units, block_scores, feature_sums

ParamFilter = Callable[[str, nn.Parameter], bool]


# ---- loss and gradients -------------------------------------------------------------------------------------------

def lm_loss_sum(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of ``batch`` [b, T] in fp32 (logits upcast), and the token count."""
    logits = model(input_ids=batch, use_cache=False).logits  # [b, T, V]
    pred = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # [b*(T-1), V]
    target = batch[:, 1:].reshape(-1)  # [b*(T-1)]
    return F.cross_entropy(pred, target, reduction="sum"), target.numel()


def decoder_parameters(model: nn.Module, params_filter: ParamFilter | None = None) -> dict[str, nn.Parameter]:
    """Named parameters inside the decoder layers (full model names), optionally filtered."""
    prefix = adapter_for(model).layers_path + "."
    return {n: p for n, p in model.named_parameters()
            if n.startswith(prefix) and (params_filter is None or params_filter(n, p))}


@contextmanager
def gradients_enabled(params: dict[str, nn.Parameter]) -> Iterator[None]:
    """Autograd on (also inside an outer inference/no-grad mode) for ``params``; their flags are restored."""
    before = {n: p.requires_grad for n, p in params.items()}
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for p in params.values():
                p.requires_grad_(True)
            yield
    finally:
        for n, p in params.items():
            p.requires_grad_(before[n])


def for_each_gradient(model: nn.Module, calib: Calibration | torch.Tensor, params: dict[str, nn.Parameter],
                      consume: Callable[[str, torch.Tensor, float], None], batch_size: int,
                      span: Span | None = None) -> None:
    """For every calibration batch b and parameter n call ``consume(n, dL_b/dθ_n, weight_b)``.

    ``L_b`` is batch b's mean token loss and ``weight_b`` its share of all calibration tokens, so
    ``Σ_b weight_b · dL_b/dθ`` is the gradient of the mean loss over the whole calibration set.
    """
    span, device = span or Span(None), execution_device(model)
    tokens = calib.tokens if isinstance(calib, Calibration) else calib
    total_tokens, total = tokens.shape[0] * (tokens.shape[1] - 1), n_batches(calib, batch_size)
    names = list(params)
    with gradients_enabled(params):
        for i, batch in enumerate(token_batches(calib, batch_size, device)):
            loss, n = lm_loss_sum(model, batch.clone())  # a normal tensor even if made under inference mode
            grads = torch.autograd.grad(loss / n, [params[k] for k in names])
            for k, g in zip(names, grads):
                consume(k, g, n / total_tokens)
            del grads, loss
            span.step((i + 1) / total, f"gradients: batch {i + 1}/{total}")


def _accumulators(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """fp32 zeros shaped like ``params`` (normal tensors, also when called under inference mode)."""
    with torch.inference_mode(False):
        return {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}


def exact_gradients(model: nn.Module, calib: Calibration | torch.Tensor, params_filter: ParamFilter | None = None,
                    batch_size: int = 4, span: Span | None = None) -> dict[str, torch.Tensor]:
    """Exact gradients (fp32) of the mean calibration loss for the decoder parameters passing ``params_filter``.

    Keys are full parameter names (``model.named_parameters()``). Leaves no ``.grad`` and no flag changed.
    """
    model = clone_model(model, share_weights=True, own_parameters=True)  # flags and grads of this call only
    params = decoder_parameters(model, params_filter)
    acc = _accumulators(params)

    def consume(name: str, g: torch.Tensor, w: float) -> None:
        acc[name].add_(g.float(), alpha=w)
    for_each_gradient(model, calib, params, consume, batch_size, span)
    return acc


def taylor_saliency(model: nn.Module, calib: Calibration | torch.Tensor, signed_accumulation: bool,
                    batch_size: int, span: Span | None = None) -> dict[str, torch.Tensor]:
    """``|Σ_b W⊙G_b|`` (signed accumulation) or ``Σ_b |W⊙G_b|`` per decoder parameter, fp32, by full name.

    ``W`` is the value whose removal the score estimates: the weight itself, except for norm scales of a family
    whose norms multiply by ``(1 + w)`` (Gemma, :attr:`pruneviz.arch.Adapter.norm_offset`). Removing such a
    norm's scale takes ``1 + w`` to zero, not ``w``, so its first-order loss change is ``(1 + w)·G``; with
    ``w`` the near-zero stored parameter would score a norm that still scales by about 1 as almost free."""
    adapter = adapter_for(model)
    model = clone_model(model, share_weights=True, own_parameters=True)  # flags and grads of this call only
    params = decoder_parameters(model)
    acc = _accumulators(params)

    def value(name: str) -> torch.Tensor:
        w = params[name].detach().float()
        return adapter.norm_weight(name, w) if name.endswith("weight") else w

    def consume(name: str, g: torch.Tensor, w: float) -> None:
        s = value(name) * g.float()
        acc[name].add_(s if signed_accumulation else s.abs(), alpha=w)
    for_each_gradient(model, calib, params, consume, batch_size, span)
    return {n: a.abs_() for n, a in acc.items()}


# ---- the criterion ----------------------------------------------------------------------------------------------

@dataclass
class TaylorOptions:
    """signed_accumulation: |Σ_b W⊙G_b| (default; LLM-Pruner and Shortened LLaMA agree) or Σ_b |W⊙G_b|.
    norm_power: p of the block score Σ|salience|^p (Shortened LLaMA: 1). include_norms: add the norm weights'
    saliency to the block score (Shortened LLaMA does). batch_size: windows per backward pass (memory only)."""

    signed_accumulation: bool = True
    norm_power: float = 1.0
    include_norms: bool = True
    batch_size: int = 4


def saliency_features(model: nn.Module, saliency: dict[str, torch.Tensor]):
    """Per-feature Σ |W⊙G| of each projection (weight, plus the owned bias entries for output features)."""
    prefix = adapter_for(model).layers_path

    def features(l: int, layer: nn.Module, path: str) -> dict[str, torch.Tensor]:
        mod, name = get_path(layer, path), f"{prefix}.{l}.{path}"
        feats = feature_sums(mod, saliency[f"{name}.weight"])
        if f"{name}.bias" in saliency:
            feats = {**feats, "out": feats["out"] + saliency[f"{name}.bias"]}
        return feats
    return features


@register
class Taylor(Criterion):
    name = "taylor"
    title = "First-order Taylor |W·∂L/∂W|"
    paper = "LLM-Pruner (arXiv 2305.11627) element-wise Taylor; Shortened LLaMA (arXiv 2402.02834) block Taylor"
    produces = ("heads", "kv", "channels", "blocks")
    uses_gradients = True
    # LLM-Pruner prunes layers 4..29 of LLaMA-7B's 32 (README: --block_*_layer_start 4 --block_*_layer_end 30):
    # the first eighth and the last sixteenth stay whole, i.e. 4 and 2 of SmolLM2's 30 layers. On the bundled model
    # that range is what brings the default level with LLM-Pruner's code (bench/results/quality_121m.md).
    kept_whole = (1 / 8, 1 / 16)
    Options = TaylorOptions

    def score(self, model: nn.Module, calib: Calibration, options: TaylorOptions, ctx: Context) -> ImportanceMap:
        saliency = taylor_saliency(model, calib, options.signed_accumulation, options.batch_size,
                                   Span(ctx, 0.0, 0.9))
        prefix = adapter_for(model).layers_path
        with torch.no_grad():
            maps = aggregate_units(model, saliency_features(model, saliency), span=Span(ctx, 0.9, 1.0))
            blocks = block_scores(model, lambda l, n, p: saliency[f"{prefix}.{l}.{n}"], options.norm_power,
                                  options.include_norms)
        return ImportanceMap(self.name, geometry_of(model), blocks=blocks, **maps)

    def estimate(self, geometry, n_params, samples, seq_len, options) -> dict:
        return {"forward_tokens": samples * seq_len, "backward": True, "extra_bytes": 8 * n_params}
