"""The recommended pipeline: calibration source, criterion, allocation and compensation in one call.

What ``bench/quality.py`` found best *out of domain* on the bundled model (the README's Benchmarks section has
the tables; methods are ranked by perplexity on Penn Treebank, a text neither calibration nor development saw, and
checked on a second one, licence prose):

1. **Calibration the model wrote itself** (:mod:`pruneviz.selfcal`, Ji et al. arXiv 2410.17711): statistics
   of the model's own distribution instead of one narrow domain's; **64 windows** of 128 tokens (one-time
   generation, cached per model and seed).
2. **SlimLLM's scores and layer ratios** (:mod:`pruneviz.criteria.slimllm`: PCA-weighted channel scores, the
   per-layer ratios from each block's input/output cosine) on **MLP channels only** (``attn_share=0``): on
   SmolLM2 every run that removes one of a layer's three KV groups is far worse on other text than the same
   budget taken from MLP channels. The cosine ratios spread over **every layer** (``pruned_layers=1``; the
   official code's 26/32 leaves the least redundant blocks whole): the softmax already gives the blocks of low
   cosine small shares, and a hard cut-off then only makes the other blocks take more.
3. **SlimLLM's official order** (``channel_order="sequential"``,
   :func:`pruneviz.criteria.slimllm.sequential_channels`): block by block, each layer's channels are scored on
   the activations of the model pruned so far and the block is refitted before the next one is scored.
4. **Compensation** (``ridge=1.0``, ``compensation="affine_local"``): at each refit, block by block on the
   pruned model's activations, the kept columns of the output projection first take the **ridge least-squares
   reconstruction** of the removed channels' output from the kept inputs
   (:func:`pruneviz.criteria.slimllm.ridge_reconstruction`, ``λ = 1`` times the mean kept input variance), then
   SlimLLM's per-dimension affine refit to the projection's original output. Unregularised, the reconstruction is
   SlimGPT's OBS update, which overfits the calibration text; the affine refit alone (two numbers per output
   dimension) loses the removed channels' contribution; ``λ = 1`` sits between them (choice, measured on seed 0:
   λ 0 / 0.1 / 0.3 / 1 / 3 / 10 gave 103.6 / 99.4 / 98.0 / 97.2 / 97.2 / 97.6 on PTB and 30.5 / 29.1 / 28.5 / 28.3
   / 28.4 / 28.7 on the licence text, against 98.7 / 29.5 without it; ``bench/results/merge_study.md``), and
   costs a covariance and solve per refit in the refit's single block pass (recipe ~160 s against ~120 s, 2 cores).

Measured at 113.27M (20% of the non-embedding parameters), calibration seeds 0 / 1 / 2: 19.34 / 19.10 / 18.84 in
domain, **97.1 / 97.9 / 100.1 on PTB (1.46x / 1.48x / 1.51x dense, mean 98.4, 1.48x)**, 28.4 / 29.3 / 30.0 on the
licence text. Without the ridge reconstruction (the stop-24 recipe): 19.91 / 19.69 / 19.61, 98.7 / 101.6 / 103.2
(mean 1.53x), 29.5 / 29.7 / 30.9: the reconstruction is better on every text for every seed. With the official
26/32 of the layers (and no reconstruction): 19.97 / 19.70 / 19.71, 100.1 / 101.7 / 103.5, 29.7 / 30.1 / 30.3.
The seed moves PTB by ~3-4%, so a single run's difference under that is within the noise. The previous default
(32 windows, channels ranked once on the dense model, the one-pass ``affine`` refit) gave 20.43 / 101.8 / 33.3;
32 windows give 99.6 on PTB but 31.9 on the licence text; 128 give 100.6 / 29.8, so 64 is the default (with the
stop-24 recipe, 128 windows over seeds 0-2: mean 100.7 on PTB and 30.3 on the licence text against 101.1 / 30.0). The
cosine ratios' sharpness (``alpha``) 5 or 20 instead of the paper's 10 moved no text beyond the seed spread.

Every choice is a field of :class:`Recipe`; :data:`RECOMMENDED` is the default and :func:`run_recipe` the call.
The target is the same stated parameter target as everywhere (:class:`pruneviz.allocate.Target`): the pruned
model lands at or under it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .allocate import Target, allocate, as_target, make_alloc_options
from .data import calibration_windows, get_text, text_hash
from .importance import Calibration, compute, make_options
from .plan import Plan
from .progress import Cancel, Progress, Span, context_of
from .selfcal import SelfGenOptions, self_generated
from .surgery import apply_plan

CALIBRATION_SOURCES = ("self", "text")
CHANNEL_ORDERS = ("dense", "sequential")


@dataclass(frozen=True)
class Recipe:
    """One pruning pipeline. ``calibration``: "self" (the model writes its own, cached) or "text" (windows of
    ``text``, a :func:`pruneviz.data.get_text` spec). ``criterion``/``criterion_options``: the importance
    criterion; ``strategy`` and ``alloc``: :func:`pruneviz.allocate.allocate`'s strategy and options;
    ``compensation``: a registered compensator (or None); ``channel_order``: "dense" (channels ranked once on
    the dense model, as every map) or "sequential" (SlimLLM's official order, re-scored block by block on the
    pruned model: :func:`pruneviz.criteria.slimllm.sequential_channels`); ``ridge``: λ of the ridge
    reconstruction of the removed units' output from the kept ones before each sequential refit
    (:func:`pruneviz.criteria.slimllm.ridge_reconstruction`), or None for the affine refit alone."""

    calibration: str = "self"
    text: str = "default"
    samples: int = 64
    seq_len: int = 128
    seed: int = 0
    criterion: str = "slimllm"
    criterion_options: tuple[tuple[str, object], ...] = (("pruned_layers", 1.0),)
    strategy: str = "slimllm"
    alloc: tuple[tuple[str, object], ...] = (("attn_share", 0.0),)
    compensation: str | None = "affine_local"
    channel_order: str = "sequential"
    ridge: float | None = 1.0

    def __post_init__(self):
        if self.calibration not in CALIBRATION_SOURCES:
            raise ValueError(f"calibration must be one of {CALIBRATION_SOURCES}, not {self.calibration!r}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"channel_order must be one of {CHANNEL_ORDERS}, not {self.channel_order!r}")
        if self.channel_order == "sequential" and (self.criterion, self.compensation) != ("slimllm", "affine_local"):
            raise ValueError("channel_order='sequential' re-scores SlimLLM's channels block by block and refits "
                             "them as it goes: it needs criterion='slimllm' and compensation='affine_local'")
        sequential_refit = self.compensation in ("affine_local", "affine_sequential")
        if self.ridge is not None and (self.ridge < 0 or not sequential_refit):
            raise ValueError("ridge (the reconstruction of the removed channels before the refit) needs a value >= 0 "
                             "and compensation='affine_local' or 'affine_sequential'")
        make_alloc_options(**dict(self.alloc))  # PlanError naming a bad allocation option, before any work

    def with_alloc(self, **options) -> "Recipe":
        """This recipe with allocation ``options`` set (others kept), checked like the rest."""
        return dataclasses.replace(self, alloc=tuple({**dict(self.alloc), **options}.items()))

    def describe(self) -> str:
        cal = "self-generated" if self.calibration == "self" else f"text {self.text!r}"
        alloc = ", ".join(f"{k}={v}" for k, v in self.alloc) or "defaults"
        order = "re-scored block by block on the pruned model" if self.channel_order == "sequential" else \
            "ranked once on the dense model"
        comp = self.compensation or "no"
        if self.ridge is not None:
            comp = f"ridge reconstruction (lambda {self.ridge:g}) then {comp}"
        return (f"{cal} calibration ({self.samples} x {self.seq_len}), {self.criterion} scores {order}, "
                f"{self.strategy} allocation ({alloc}), {comp} compensation")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["criterion_options"], d["alloc"] = dict(self.criterion_options), dict(self.alloc)
        return d


RECOMMENDED = Recipe()


def calibration_label(recipe: dict) -> str:
    """A recipe's calibration in a few words, from its plan provenance (:meth:`Recipe.to_dict`): "64 self-generated
    windows of 128 tokens" or "16 windows of 128 tokens of text 'default'"."""
    n, length = recipe.get("samples", "?"), recipe.get("seq_len", "?")
    if recipe.get("calibration", "self") == "self":
        return f"{n} self-generated windows of {length} tokens"
    return f"{n} windows of {length} tokens of text {recipe.get('text', '?')!r}"


@dataclass
class RecipeResult:
    plan: Plan
    model: nn.Module
    calibration: Calibration
    recipe: Recipe


def recipe_calibration(model: nn.Module, tokenizer, recipe: Recipe, progress: Progress | None = None,
                       cancel: Cancel | None = None) -> Calibration:
    """The calibration windows ``recipe`` asks for."""
    if recipe.calibration == "self":
        opts = SelfGenOptions(n_samples=recipe.samples, seq_len=recipe.seq_len, seed=recipe.seed)
        return self_generated(model, tokenizer, opts, progress=progress, cancel=cancel)
    text = get_text(recipe.text, part="calib")
    tokens = calibration_windows(tokenizer, text, recipe.samples, recipe.seq_len, recipe.seed)
    return Calibration(tokens, recipe.text, text_hash(text), recipe.seed)


def run_recipe(model: nn.Module, tokenizer, target: Target | float, recipe: Recipe = RECOMMENDED,
               progress: Progress | None = None, cancel: Cancel | None = None,
               calibration: Calibration | None = None) -> RecipeResult:
    """Prune ``model`` (never mutated) to ``target`` with ``recipe``: calibration, scores, plan, built model.
    ``calibration``: windows to use instead of the recipe's own source (its ``calibration``/``samples`` fields are
    then ignored)."""
    target = as_target(target)
    span = Span(context_of(progress, cancel))
    calib = calibration or recipe_calibration(model, tokenizer, recipe, span.sub(0.0, 0.4).step, cancel)
    options = make_options(recipe.criterion, **dict(recipe.criterion_options))
    imap = compute(model, recipe.criterion, calib, options, progress=span.sub(0.4, 0.8).step, cancel=cancel)
    plan = allocate(model, imap, target, strategy=recipe.strategy, compensation=recipe.compensation,
                    **dict(recipe.alloc))
    if recipe.ridge is not None:  # read by every sequential refit: the channel choice below and the build
        plan = plan.with_provenance(affine_ridge=recipe.ridge)
    if recipe.channel_order == "sequential":
        from .criteria.slimllm import sequential_channels

        span.step(0.8, "choosing the channels block by block")
        plan = sequential_channels(model, calib, plan, progress=span.sub(0.8, 0.85).step)
    plan = plan.with_provenance(recipe=recipe.to_dict(), calibration=calib.describe())
    span.step(0.85, "building the pruned model")
    with torch.no_grad():
        pruned = apply_plan(model, plan, calibration=calib.tokens if recipe.compensation else None)
    span.step(1.0, "done")
    return RecipeResult(plan, pruned, calib, recipe)
