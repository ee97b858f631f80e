"""Block (depth) criteria that need forward passes: leave-one-out perplexity and Block Influence.

- ``ppl`` (Shortened LLaMA, Kim et al., arXiv 2402.02834, ``src/anal_block_sensitivity_ppl.py``): block n's
  score is the perplexity of the calibration windows with block n removed. A block whose removal hurts little
  (low PPL) is unimportant. Removal is done by masking (:func:`pruneviz.surgery.masking`), which makes the block
  the identity on the residual stream, exactly what physically dropping it does.
- ``block_influence`` (ShortGPT, Men et al., arXiv 2403.03853): ``BI_n = 1 - mean_t cos(h_in_t, h_out_t)``, how
  much block n turns its hidden states. A block that barely changes them (BI near 0) is unimportant.

Magnitude and Taylor block scores live in :mod:`.magnitude` and :mod:`.taylor`. The Shortened "+" rule (never
remove blocks {0, 1, 2, 3, L-2, L-1}) is an allocation rule (:mod:`pruneviz.allocate`), not part of the scores.

Both papers score **once**, on the unpruned model, and remove the k lowest blocks in one shot.
:func:`iterative_block_removal` is the iterative variant: remove the lowest block, re-score the remaining blocks
on the model with it removed, repeat. Both criteria accept ``removed_blocks``: blocks masked while scoring (their
score is NaN, "not scored"); other block criteria (magnitude, Taylor) are re-scored with the removed blocks
bypassed.
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..allocate import param_record, plus_rule_protected
from ..arch import adapter_for, geometry_of
from ..errors import CriterionError, PlanError
from ..importance import Calibration, Context, Criterion, ImportanceMap, compute, get, register
from ..offload import clone_model, execution_device
from ..plan import Plan
from ..progress import Cancel, Progress
from ..surgery import masking


def _check_removed(model: nn.Module, removed: tuple[int, ...]) -> tuple[int, ...]:
    n = geometry_of(model).n_layers
    removed = tuple(sorted({int(b) for b in removed}))
    if any(not 0 <= b < n for b in removed):
        raise CriterionError(f"removed_blocks {list(removed)} out of range: the model has blocks 0..{n - 1}")
    if n - len(removed) < 2:
        raise CriterionError(f"removed_blocks leaves {n - len(removed)} block(s); scoring needs at least two "
                             f"kept blocks to compare")
    return removed


def _plan(model: nn.Module, blocks) -> Plan:
    return Plan.empty(model).with_units("block", None, blocks)


# ---- perplexity ------------------------------------------------------------------------------------------------------

@torch.no_grad()
def calibration_nll(model: nn.Module, calib: Calibration, batch_size: int) -> tuple[float, int]:
    """Summed next-token NLL (fp32) over every predicted token of the windows, and the number of tokens."""
    device = execution_device(model)
    total, count = 0.0, 0
    for x in calib.batches(batch_size, device):  # [b, T]
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()  # [b, T-1, V]
        target = x[:, 1:]  # [b, T-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        total += float(nll)
        count += target.numel()
    return total, count


def calibration_ppl(model: nn.Module, calib: Calibration, batch_size: int = 4) -> float:
    """``exp(mean NLL)`` over all predicted tokens (token 0 of each window is not predicted); inf on overflow."""
    total, count = calibration_nll(model, calib, batch_size)
    if count == 0:
        raise CriterionError("calibration windows need at least two tokens each to measure perplexity")
    mean = total / count
    return math.exp(mean) if mean < 700 else math.inf


@dataclass
class PPLOptions:
    """``batch_size``: windows per forward pass (does not change the result). ``removed_blocks``: blocks masked
    while scoring (the iterative variant); they score NaN."""

    batch_size: int = 4
    removed_blocks: tuple[int, ...] = ()


@register
class BlockPPL(Criterion):
    """Leave-one-block-out perplexity; higher PPL when removed = more important."""

    name = "ppl"
    title = "Block perplexity (leave one out)"
    paper = "Shortened LLaMA, arXiv 2402.02834"
    produces = ("blocks",)
    Options = PPLOptions

    def estimate(self, geometry, n_params, samples, seq_len, options) -> dict:
        """One forward pass over the windows per kept block, plus the reference pass(es)."""
        removed = len(set(options.removed_blocks))
        passes = geometry.n_layers - removed + 1 + (1 if removed else 0)
        return {"forward_tokens": passes * samples * seq_len, "backward": False,
                "extra_bytes": 4 * min(options.batch_size, samples) * seq_len * geometry.vocab}

    def score(self, model, calib, options, ctx: Context) -> ImportanceMap:
        removed = _check_removed(model, options.removed_blocks)
        n = geometry_of(model).n_layers
        todo = [b for b in range(n) if b not in removed]
        ctx.step(0.0, "perplexity of the model as it is")
        with masking(model, _plan(model, removed)) as view:
            base = calibration_ppl(view, calib, options.batch_size)
        scores = torch.full((n,), math.nan, dtype=torch.float64)  # [L]
        for i, b in enumerate(todo):
            with masking(model, _plan(model, removed + (b,))) as view:
                scores[b] = calibration_ppl(view, calib, options.batch_size)
            ctx.step((i + 1) / (len(todo) + 1), f"block {b}: PPL {float(scores[b]):.4g} without it")
        dense = base if not removed else calibration_ppl(model, calib, options.batch_size)
        extras = {"dense_ppl": dense, "base_ppl": base, "removed_blocks": list(removed),
                  "ppl_without_block": [None if math.isnan(v) else v for v in scores.tolist()]}
        return ImportanceMap(self.name, geometry_of(model), blocks=scores, extras=extras)


# ---- block influence -------------------------------------------------------------------------------------------------

def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _CosineMeter:
    """Forward hooks on every kept block accumulating Σ_t cos(h_in_t, h_out_t) (fp32) and the token count."""

    def __init__(self, model: nn.Module, skip: tuple[int, ...], skip_first: bool, angular: bool):
        self.adapter = adapter_for(model)
        n = geometry_of(model).n_layers
        self.sums = torch.zeros(n, dtype=torch.float64)  # [L]
        self.counts = torch.zeros(n, dtype=torch.long)  # [L]
        self.skip_first, self.angular = skip_first, angular
        layers = self.adapter.layers(model)
        self.handles = [layers[i].register_forward_hook(self._hook(i), with_kwargs=True)
                        for i in range(n) if i not in skip]

    def _hook(self, i: int):
        def hook(module, args, kwargs, output):
            h_in = self.adapter.block_hidden(args, kwargs).float()  # [b, T, D]
            h_out = _block_output(output).float()  # [b, T, D]
            if self.skip_first:
                h_in, h_out = h_in[:, 1:], h_out[:, 1:]
            cos = F.cosine_similarity(h_in, h_out, dim=-1, eps=1e-8).clamp(-1.0, 1.0)  # [b, T]
            dist = torch.arccos(cos) / math.pi if self.angular else 1.0 - cos
            self.sums[i] += float(dist.double().sum())
            self.counts[i] += dist.numel()
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class BIOptions:
    """``angular``: use the angular distance ``arccos(cos)/pi`` instead of ``1 - cos`` (Gromov et al. 2024; same
    ranking). ``skip_first``: leave out token 0 of each window, whose hidden states are often outliers (ShortGPT
    averages over all tokens, the default). ``removed_blocks``: blocks masked while scoring (they score NaN)."""

    batch_size: int = 4
    angular: bool = False
    skip_first: bool = False
    removed_blocks: tuple[int, ...] = ()


@register
class BlockInfluence(Criterion):
    """ShortGPT Block Influence: 1 - mean cosine similarity of a block's input and output hidden states."""

    name = "block_influence"
    title = "Block Influence (ShortGPT)"
    paper = "ShortGPT, arXiv 2403.03853"
    produces = ("blocks",)
    Options = BIOptions

    def score(self, model, calib, options, ctx: Context) -> ImportanceMap:
        removed = _check_removed(model, options.removed_blocks)
        n_batches = max(math.ceil(calib.tokens.shape[0] / options.batch_size), 1)
        with masking(model, _plan(model, removed)) as view, torch.no_grad():
            meter = _CosineMeter(view, removed, options.skip_first, options.angular)  # hooks on this call's view
            try:
                for i, x in enumerate(calib.batches(options.batch_size, execution_device(model))):  # [b, T]
                    view(input_ids=x, use_cache=False)
                    ctx.step((i + 1) / n_batches, f"batch {i + 1}/{n_batches}")
            finally:
                meter.close()
        if (meter.counts[[b for b in range(len(meter.counts)) if b not in removed]] == 0).any():
            raise CriterionError("block_influence saw no tokens; use windows of at least two tokens")
        scores = meter.sums / meter.counts.clamp(min=1)  # [L]
        scores[list(removed)] = math.nan
        extras = {"removed_blocks": list(removed), "tokens": int(meter.counts.max()),
                  "distance": "angular" if options.angular else "1 - cos"}
        return ImportanceMap(self.name, geometry_of(model), blocks=scores, extras=extras)


# ---- iterative removal -----------------------------------------------------------------------------------------------

@contextmanager
def _bypassed(model: nn.Module, blocks: list[int]) -> Iterator[None]:
    """Make ``blocks`` the identity while keeping their parameters in the autograd graph.

    Each block's output becomes ``h_in + 0 * h_out``: bit for bit ``h_in`` (for finite outputs), but a
    gradient-based criterion that differentiates with respect to every parameter still finds the bypassed
    blocks' parameters used (with zero gradient), which masking, by skipping the block, would not give it.
    """
    adapter = adapter_for(model)
    layers = adapter.layers(model)

    def hook(module, args, kwargs, output):
        h_in = adapter.block_hidden(args, kwargs)
        if isinstance(output, tuple):
            return (h_in + 0 * output[0],) + tuple(output[1:])
        return h_in + 0 * output

    handles = [layers[b].register_forward_hook(hook, with_kwargs=True) for b in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _score_with_removed(model, name: str, calib, removed: list[int], options, progress, cancel) -> ImportanceMap:
    """Block scores of ``name`` with ``removed`` taken out: passed as ``removed_blocks`` where the criterion has
    that option (ppl, block_influence mask them), otherwise by bypassing them around the whole computation
    (:func:`_bypassed`). Removed blocks score NaN."""
    crit = get(name)
    opts = options if options is not None else crit.Options()
    if "removed_blocks" in {f.name for f in dataclasses.fields(opts)}:
        imap = compute(model, name, calib, dataclasses.replace(opts, removed_blocks=tuple(removed)),
                       progress, cancel)
    else:
        view = clone_model(model, share_weights=True)  # the bypass hooks are this call's, never on model
        with _bypassed(view, removed):
            imap = compute(view, name, calib, opts, progress, cancel)
    if imap.blocks is None:
        raise CriterionError(f"{name} does not score blocks; iterative removal needs a block criterion")
    imap.blocks[list(removed)] = math.nan
    imap.extras = {**imap.extras, "removed_blocks": list(removed)}
    return imap


def _step_progress(progress: Callable | None, step: int, n: int):
    if progress is None:
        return None
    return lambda f, msg="": progress((step + f) / n, f"step {step + 1}/{n}: {msg}")


def iterative_block_removal(model: nn.Module, criterion_name: str, calib: Calibration | None, n_remove: int,
                            plus_rule: bool = False, progress: Progress | None = None,
                            options=None, cancel: Cancel | None = None
                            ) -> tuple[Plan, list[ImportanceMap]]:
    """Remove ``n_remove`` blocks one at a time, re-scoring the remaining blocks after each removal.

    Step k scores the model with the k blocks removed so far masked and removes the lowest-scored remaining
    block (ties to the lower index; with ``plus_rule`` never one of {0, 1, 2, 3, L-2, L-1}). Returns the plan
    (provenance: removal order, parameter counts) and the map of every step (removed blocks NaN). The papers
    (Shortened LLaMA, ShortGPT) score once instead; ``n_remove=1`` is that one-shot choice.

    Works with any criterion that produces block scores: ``options`` (that criterion's Options) go to every
    step; criteria with a ``removed_blocks`` option get it, others run with the removed blocks bypassed.
    ``progress(fraction, message)`` spans all steps; ``cancel()`` returning True raises ``Cancelled``.
    """
    n = geometry_of(model).n_layers
    protected = plus_rule_protected(n) if plus_rule else frozenset()
    allowed = min(n - 1, n - len(protected))
    if not 1 <= int(n_remove) <= allowed:
        why = f" (the + rule protects {sorted(protected)})" if plus_rule else ""
        raise PlanError(f"n_remove must be between 1 and {allowed} for a {n}-block model{why}; got {n_remove}")
    removed: list[int] = []
    maps: list[ImportanceMap] = []
    for step in range(int(n_remove)):
        imap = _score_with_removed(model, criterion_name, calib, removed, options,
                                   _step_progress(progress, step, int(n_remove)), cancel)
        cands = [b for b in range(n) if b not in removed and b not in protected
                 and not math.isnan(float(imap.blocks[b]))]
        if not cands:
            raise CriterionError(f"{criterion_name} left no scored block to remove at step {step + 1}")
        removed.append(min(cands, key=lambda b: (float(imap.blocks[b]), b)))
        maps.append(imap)
    plan = _plan(model, removed)
    params = param_record(model, plan)
    ne = params["non_embedding"]
    plan = plan.with_provenance(criterion=criterion_name, strategy="iterative_depth", removal_order=removed,
                                n_remove=int(n_remove), plus_rule=plus_rule, params=params,
                                achieved_ratio=(ne["before"] - ne["after"]) / ne["before"],
                                achieved_of="non_embedding")
    return plan, maps
