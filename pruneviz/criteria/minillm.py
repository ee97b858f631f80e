"""MINI-LLM: feature-map sensitivity with forward-only (zeroth-order) gradients (Cheng et al., arXiv 2407.11681).

MINI-LLM scores weights by a hybrid of magnitude, activation and gradient ("feature map sensitivity", FMS) and
estimates the gradient from forward passes only, so that scoring needs the memory of inference, not of
training. Its Algorithm 1: estimate ĝ for every weight (SPSA/MeZO, "Eq. 7"), score every weight ("Eq. 9"), sum
scores over a structural group (head, channel) and keep the top ``1 − p`` groups *in each layer*. That last,
uniform-per-layer step is an allocation decision made elsewhere; this criterion produces the maps.

**Gradient estimate.** q queries; query j draws a Gaussian direction ``z_j`` over the perturbed weights and
measures the calibration loss at ``θ ± εz_j``::

    c_j = (L(θ + ε z_j) − L(θ − ε z_j)) / (2ε)        ĝ = (1/q) Σ_j c_j z_j

``z_j`` is never stored (MeZO's seed trick): the slice of ``z_j`` belonging to projection k is regenerated from
the seed ``(seed, j, k)`` whenever it is needed. Instead of writing ``θ ± εz`` into the weights and subtracting
it again (fp32 add/sub is not exactly reversible, and the model is shared), the perturbation is applied *inside
the forward pass*: a forward hook on each perturbed projection adds ``±ε · x zᵀ`` to its output, i.e. computes
``(W ± εz) x``. The model's weights are never written (bit-for-bit unchanged) and the extra memory is one
regenerated ``z`` matrix at a time. Both signs of a query share one forward pass over a doubled batch, and the
vocabulary projection runs one window at a time, so peak memory stays at that of a plain forward pass. Only the
q scalars ``c_j`` are kept; at scoring time ĝ is rebuilt for one weight matrix at a time, scored and freed.
Losses are fp32 (logits upcast), summed in double precision. Every
query evaluates the loss on *all* calibration windows, so ĝ estimates the gradient of the same loss the exact
(backprop) Taylor criterion differentiates.

**Perturbed weights** (``perturb``): "scored" (default) = every projection matrix of the attention and MLP
(biases and norms are not perturbed and get no score); "attention" or "mlp" perturb only those (fewer
perturbed coordinates means less estimator noise for them) and produce only their maps.

**Score "Eq. 9"** (the paper's formula could not be read; see ``/work/shared/research/seeds.md``), ``reading``:

- "A" (default): ``|W_ij · ĝ_ij| · ‖X_j‖₂``, Taylor saliency times the Wanda activation norm of input j:
  literally magnitude × activation × gradient, and the change of the feature map ``Y_i = Σ_j W_ij X_j``;
- "B": ``|mean_t(X_tj · W_ij · ĝ_ij)| = |W_ij ĝ_ij| · |mean_t X_tj|`` (the unofficial spsa-prune reading);
- "taylor_abs": ``|W_ij · ĝ_ij|`` (first-order Taylor with the ZO gradient).

A unit's score is the sum over the weights it owns (as declared in :mod:`pruneviz.arch`).

**Pitfall.** With one query ĝ = c·z, one scalar times noise, so ``|W ⊙ ĝ|`` ranks by ``|W|·|z|``: magnitude times
noise. The per-coordinate noise of ĝ has standard deviation about ``‖∇L‖/√q``, which exceeds single gradient
entries unless q is comparable to the number of perturbed weights; the absolute value keeps that noise from
cancelling in a unit's sum. So with practical q the score behaves like ``Σ |W|·‖X‖·√(g² + ‖∇L‖²/q)``: a
magnitude-times-activation (Wanda-like) score nudged by the gradient. :func:`zo_vs_backprop` measures how far
the ZO maps agree with exact-backprop maps of the same reading, and how far a gradient-free ``|W|·‖X‖`` map
alone already agrees (``without_gradient``); ``compare_backprop=True`` stores it in ``extras``.

**Measured** (tiny random llama of :mod:`pruneviz.testing`, 4×16 calibration tokens, Spearman correlation of the
whole map with the exact-backprop map of the same reading):

- the estimator itself is right: ``cos(ĝ, ∇L)`` = 0.068 / 0.145 / 0.280 at q = 256 / 1024 / 4096 over d = 47,616
  perturbed weights, against the theoretical ``sqrt(q/(d+q))`` = 0.073 / 0.145 / 0.281;
- ``perturb="mlp"`` (d = 23,040), reading A, channels: 0.41 (q=1), 0.39 (64), 0.35 (1024), 0.67 (4096), 0.85
  (16384), 0.94 (65536); the gradient-free ``Σ|W|·‖X‖`` map reaches 0.56;
- ``perturb="scored"``, reading A: channels stay at 0.27-0.41 up to q = 65536 (presumably because the
  attention gradients dominate ``‖∇L‖`` and so the noise of every coordinate), against 0.56 gradient-free;
  "taylor_abs" heads reach 0.73 (16384) and 0.97 (65536) but are ≤ 0.37 below q = 4096;
- SmolLM2-135M-Instruct (d = 106M perturbed weights, 8×64 calibration tokens, reading A): q = 1 / 16 / 64 give
  channels 0.533 / 0.532 / 0.532 (0.81 within layers) and heads 0.33, the same as the gradient-free map
  (0.534, 0.82, 0.33): at this scale the ZO gradient adds nothing that magnitude and activation do not
  (re-measured by ``bench/zo_agreement.py``, 2026-12-02: q = 1 / 4 / 16 give heads 0.327 / 0.325 / 0.324, KV
  groups 0.133 / 0.131 / 0.129, channels 0.533 / 0.533 / 0.532, against 0.325 / 0.133 / 0.534 gradient-free);
- gates (``variables="gates"``, :func:`gates_vs_backprop`, d = units): the estimate itself follows the theory,
  ``cos(ĝ, ∂L/∂m)`` ≈ ``sqrt(q/(d+q))`` (SmolLM2 heads, d = 270: 0.26 / 0.46 at q = 16 / 64, theory 0.24 /
  0.44), but ranking units by ``|ĝ_u|`` well (ρ ≳ 0.9) needs a cosine of about 0.97, i.e. q ≈ 10-25·d. Tiny
  llama, ρ of ``|ĝ|`` with ``|∂L/∂m|``: heads (d = 24) 0.49 / 0.90 / 0.96 / 1.00 at q = 64 / 256 / 1024 / 4096,
  channels (d = 160) 0.45 / 0.70 / 0.92 / 0.98 at q = 256 / 1024 / 4096 / 16384. SmolLM2 (8×64 tokens): heads
  0.05 / 0.11 at q = 1 / 64, KV groups (d = 90) −0.04 / 0.06, channels (d = 46,080) 0.00 / 0.01 at q = 1 / 16.
  One gate query costs 0.8-1.3 times one forward + backward pass on CPU (two losses in one doubled pass), so
  q = 64 per kind takes 60-80 backward passes' time, and the gradient-free ``Σ|W|·‖X‖`` map does not rank like the
  gate map either (−0.34 heads, −0.03 channels).

So agreement with backprop needs q of the order of the number of perturbed variables (weights: d ≈ 10^8 for
SmolLM2; gates: 10-25 times the number of units, several thousand queries for SmolLM2's 270 heads); below that a
per-weight MINI-LLM map is a magnitude-times-activation map plus noise, often ranking worse than that map alone,
and a gate map is mostly noise. The default q = 64 is set by cost (128 loss evaluations of the calibration set),
not by accuracy; at any affordable q, exact backprop (one backward pass, where its memory is available) is
both cheaper and right. Tables: ``bench/results/zo_agreement.md``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import UNITS, adapter_for, geometry_of, get_path, is_conv1d
from ..errors import CriterionError
from ..importance import Calibration, Context, Criterion, ImportanceMap, register
from ..offload import clone_model, execution_device
from ..progress import Span
from .stats import DEFAULT_BATCH_SIZE, CalibrationStats, check_hookable, collect_stats, input_site, token_batches
from .taylor import exact_gradients
from .units import aggregate_units, feature_sums, scale_inputs

READINGS = ("A", "B", "taylor_abs")
VARIABLES = ("weights", "gates")
PERTURB = ("scored", "attention", "mlp")
_KEY_BITS, _QUERY_BITS = 12, 20  # seeds are 32 bits: up to 2**12 perturbed projections, 2**20 queries


# ---- which weights are perturbed ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Perturbed:
    """One perturbed projection: its key (seed component), layer index, path inside the layer and module."""

    key: int
    layer: int
    path: str
    module: nn.Module = field(compare=False, hash=False)


def perturbed_modules(model: nn.Module, perturb: str = "scored") -> list[Perturbed]:
    """The projections whose weights the estimator perturbs, keyed 0..K-1 in layer/module order."""
    adapter = adapter_for(model)
    paths = {"scored": adapter.attn_modules + adapter.mlp_modules, "attention": adapter.attn_modules,
             "mlp": adapter.mlp_modules}[perturb]
    out = []
    for l, layer in enumerate(adapter.layers(model)):
        for path in paths:
            out.append(Perturbed(len(out), l, path, get_path(layer, path)))
    return out


def kinds_for(perturb: str) -> tuple[str, ...]:
    return {"scored": ("head", "kv", "channel"), "attention": ("head", "kv"), "mlp": ("channel",)}[perturb]


# ---- seeded directions --------------------------------------------------------------------------------------------

def z_seed(seed: int, query: int, key: int) -> int:
    """A 32-bit generator seed, distinct for every (query, key) of one ``seed``.

    The CPU generator (mt19937) keeps only the low 32 bits of a seed, so the layout is ``query' << 12 | key`` with
    ``query' = (seed · 1000003 + query) mod 2**20``: unique for up to 2**20 queries and 2**12 perturbed
    projections. Another seed shifts the query sequence by ``Δ = Δseed · 1000003 mod 2**20``, so two seeds share no
    direction while ``q ≤ min(Δ, 2**20 − Δ)`` (48,573 for adjacent seeds). CPU and CUDA generators draw
    different numbers from the same seed.
    """
    return (((seed * 1000003 + query) % (1 << _QUERY_BITS)) << _KEY_BITS) | key


def direction(weight: torch.Tensor, seed: int, query: int, key: int) -> torch.Tensor:
    """The Gaussian direction z (fp32, shaped like ``weight``, on its device) of query ``query``, projection ``key``."""
    gen = torch.Generator(device=weight.device)
    gen.manual_seed(z_seed(seed, query, key))
    return torch.randn(weight.shape, generator=gen, device=weight.device, dtype=torch.float32)


def _runs(slots: list[tuple[int, float]]) -> list[tuple[int, int, int]]:
    """``(start, end, query)`` of each run of consecutive slots that share a query (they share one z)."""
    runs = []
    for i, (query, _) in enumerate(slots):
        if runs and runs[-1][2] == query:
            runs[-1] = (runs[-1][0], i + 1, query)
        else:
            runs.append((i, i + 1, query))
    return runs


class SlotHooks:
    """Hooks of one perturbation context: installed on enter, removed on exit (also on errors and cancellation).

    ``slots`` is a list of ``(query, scale)``: the hooked batch is split into ``len(slots)`` equal parts along
    dimension 0, one perturbation each; with no slots the forward pass is untouched.
    """

    def __init__(self):
        self.slots: list[tuple[int, float]] = []
        self._handles: list = []

    def install(self) -> list:
        """Register this context's hooks; returns their handles."""
        raise NotImplementedError

    def __enter__(self):
        self._handles = self.install()
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.slots = []


class Perturbation(SlotHooks):
    """Forward hooks computing ``(W + scale_s·z_{query_s}) x`` on each perturbed projection: part s of the batch
    gets ``scale_s · x z_{query_s}ᵀ`` added to its output, so one forward pass evaluates several perturbations.
    Weights are never written."""

    def __init__(self, modules: list[Perturbed], seed: int):
        super().__init__()
        self.modules, self.seed = modules, seed

    def _hook(self, item: Perturbed):
        def hook(module, args, kwargs, output):
            if not self.slots:
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            if x.shape[0] % len(self.slots):
                raise CriterionError(f"minillm: {item.path} saw a batch of {x.shape[0]} rows, which does not "
                                     f"split into {len(self.slots)} perturbation slots")
            parts = x.reshape(len(self.slots), -1, x.shape[-1])  # [P, rows, in]
            deltas = []
            for start, end, query in _runs(self.slots):
                z = direction(module.weight, self.seed, query, item.key).to(x.dtype)  # like the weight
                y = parts[start:end] @ (z if is_conv1d(module) else z.T)  # [k, rows, out]
                scales = [s for _, s in self.slots[start:end]]
                deltas.append(y * torch.tensor(scales, dtype=y.dtype, device=y.device).view(-1, 1, 1))
            return output + torch.cat(deltas).reshape(output.shape)
        return hook

    def install(self) -> list:
        return [item.module.register_forward_hook(self._hook(item), with_kwargs=True) for item in self.modules]


# ---- the zeroth-order estimate --------------------------------------------------------------------------------------

@dataclass
class ZOEstimate:
    """q projected gradients ``c_j`` and the seed: everything needed to rebuild ĝ, one matrix at a time."""

    seed: int
    epsilon: float
    projected: torch.Tensor  # [q] float64: (L(θ+εz_j) − L(θ−εz_j)) / 2ε
    seconds: list[float] | None = None  # wall seconds from the start until query j was measured (None: not timed)

    @property
    def queries(self) -> int:
        return int(self.projected.numel())

    def seconds_for(self, queries: int) -> float | None:
        """Wall seconds the first ``queries`` queries took (None when not timed)."""
        return None if not self.seconds else self.seconds[min(queries, len(self.seconds)) - 1]

    def gradient(self, item: Perturbed, queries: int | None = None) -> torch.Tensor:
        """ĝ for projection ``item``'s weight from the first ``queries`` queries (all by default), fp32."""
        q = self.queries if queries is None else min(queries, self.queries)
        w = item.module.weight
        g = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for j in range(q):
            g.add_(direction(w, self.seed, j, item.key), alpha=float(self.projected[j]) / q)
        return g


def slot_losses(model: nn.Module, batches: list[torch.Tensor], n_slots: int) -> torch.Tensor:
    """Mean next-token loss over all ``batches`` for each of ``n_slots`` copies of the data [n_slots], float64.

    Each batch is repeated ``n_slots`` times along dimension 0 (one copy per :class:`Perturbation` slot); token
    losses are fp32 (logits upcast) and summed in double precision. The vocabulary projection runs one window at
    a time, so the full ``[rows, T, V]`` logits never exist (less memory than a plain forward pass).
    """
    totals, tokens = torch.zeros(n_slots, dtype=torch.float64), 0
    head = model.get_output_embeddings()
    for batch in batches:
        ids = batch.repeat(n_slots, 1)  # [n_slots * b, T]
        hidden = model.base_model(input_ids=ids, use_cache=False)[0]  # [n_slots * b, T, hidden]
        rows = torch.stack([F.cross_entropy(head(hidden[r, :-1]).float(), ids[r, 1:], reduction="sum")
                            for r in range(ids.shape[0])])  # [n_slots * b]
        totals += rows.view(n_slots, -1).sum(1).double().cpu()
        tokens += batch[:, 1:].numel()
    return totals / max(tokens, 1)


def zo_estimate(model: nn.Module, calib: Calibration | torch.Tensor, modules: list[Perturbed], queries: int,
                epsilon: float, seed: int, batch_size: int = DEFAULT_BATCH_SIZE, queries_per_pass: int = 1,
                span: Span | None = None) -> ZOEstimate:
    """Evaluate ``2·queries`` perturbed losses over the calibration set (two-sided SPSA). Model unchanged.

    ``queries_per_pass`` queries (both signs each) share one forward pass over a ``2·queries_per_pass``-times
    repeated batch: fewer, larger passes (faster for small models, more activation memory).
    """
    _check_queries(queries)
    if len(modules) > (1 << _KEY_BITS):
        raise CriterionError(f"minillm: at most {1 << _KEY_BITS} perturbed projections (got {len(modules)})")
    check_hookable(model)
    batches = list(token_batches(calib, batch_size, execution_device(model)))
    with Perturbation(modules, seed) as pert:
        projected, seconds = _spsa_queries(model, batches, pert, queries, epsilon, queries_per_pass,
                                           span or Span(None), "zeroth-order gradient")
    return ZOEstimate(seed, epsilon, projected, seconds)


def _check_queries(queries: int) -> None:
    if not 0 < queries <= (1 << _QUERY_BITS):
        raise CriterionError(f"minillm: queries must be in 1..{1 << _QUERY_BITS}")


def _spsa_queries(model: nn.Module, batches: list[torch.Tensor], pert: SlotHooks, queries: int, epsilon: float,
                  queries_per_pass: int, span: Span, label: str) -> tuple[torch.Tensor, list[float]]:
    """The two-sided SPSA loop shared by weights and gates: ``(L(+εz_j) − L(−εz_j)) / 2ε`` for each query j
    [q] (float64) and the wall seconds until each was measured; ``queries_per_pass`` queries (both signs each)
    share one forward pass through ``pert``'s slots."""
    step, t0 = max(1, int(queries_per_pass)), time.perf_counter()
    projected, seconds = torch.zeros(queries, dtype=torch.float64), []  # [q]
    with torch.inference_mode():
        for start in range(0, queries, step):
            js = range(start, min(start + step, queries))
            pert.slots = [(j, sign * epsilon) for j in js for sign in (1.0, -1.0)]
            losses = slot_losses(model, batches, len(pert.slots)).view(-1, 2)  # [chunk, (+, -)]
            projected[start:start + len(js)] = (losses[:, 0] - losses[:, 1]) / (2 * epsilon)
            seconds += [time.perf_counter() - t0] * len(js)
            span.step((js[-1] + 1) / queries, f"{label}: query {js[-1] + 1}/{queries}")
    return projected, seconds


# ---- scores -------------------------------------------------------------------------------------------------------

def fms_maps(model: nn.Module, modules: list[Perturbed], grad_of: Callable[[Perturbed], torch.Tensor],
             reading: str, stats: CalibrationStats | None, kinds: Iterable[str],
             span: Span | None = None) -> dict[str, torch.Tensor]:
    """Unit maps of the feature-map-sensitivity score ``reading`` with gradients ``grad_of(projection)``."""
    adapter = adapter_for(model)
    by_place = {(m.layer, m.path): m for m in modules}
    per_input = {}

    def features(l: int, layer: nn.Module, path: str) -> dict[str, torch.Tensor]:
        item = by_place[(l, path)]
        s = (item.module.weight.detach().float() * grad_of(item)).abs()  # like the weight
        if reading != "taylor_abs":
            site = input_site(adapter, path)
            if site not in per_input:
                per_input[site] = stats.norms(site) if reading == "A" else stats.means(site).abs()  # [L, F]
            s = scale_inputs(item.module, s, per_input[site][l])
        return feature_sums(item.module, s)
    with torch.no_grad():
        return aggregate_units(model, features, kinds, modules={m.path for m in modules}, span=span)


def _stats_for(model, calib, reading, batch_size, span) -> CalibrationStats | None:
    return None if reading == "taylor_abs" else collect_stats(model, calib, span, batch_size=batch_size)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> dict[str, float | None]:
    """Spearman rank correlation over the whole map and averaged over layers (None where undefined)."""
    from scipy.stats import spearmanr

    def rho(x, y):
        r = spearmanr(x.flatten().numpy(), y.flatten().numpy()).statistic
        return None if r is None or math.isnan(r) else float(r)
    layers = [r for r in (rho(a[l], b[l]) for l in range(a.shape[0])) if r is not None]
    return {"all": rho(a, b), "within_layer": sum(layers) / len(layers) if layers else None}


def zo_vs_backprop(model: nn.Module, calib: Calibration | torch.Tensor, queries_list: Iterable[int] = (1, 4, 16, 64),
                   reading: str = "A", epsilon: float = 1e-3, seed: int = 0, perturb: str = "scored",
                   batch_size: int = DEFAULT_BATCH_SIZE, queries_per_pass: int = 1,
                   estimate: ZOEstimate | None = None, stats: CalibrationStats | None = None,
                   span: Span | None = None) -> dict:
    """How well ZO-gradient unit maps rank like exact-backprop maps of the same ``reading``, per query count.

    Runs one ZO estimate with ``max(queries_list)`` queries (or reuses ``estimate`` if it has enough) and uses its
    first q queries for each q. Returns ``{"reading", "queries", "spearman": {str(q): {map: {"all",
    "within_layer"}}}, "without_gradient": {map: ...}, "perturbed", "loss_evaluations", "seconds"}``:
    ``without_gradient`` correlates the exact map with the same score where the gradient is replaced by 1
    (``Σ|W|·‖X‖`` for reading A), the floor that magnitude and activation alone reach. ``perturbed`` is the number
    of perturbed weights d, ``loss_evaluations[str(q)]`` = 2q (calibration-set losses of a q-query estimate; readings
    A and B add one statistics pass), ``seconds`` the wall time of the statistics pass ("stats", None when
    ``stats`` was given), of the first q queries ("estimate", None for an untimed ``estimate``), of building the
    map from them ("maps": ĝ is rebuilt from q seeded directions, so this grows with q·d) and of the exact
    gradients ("exact": one forward and one backward pass). Needs backprop memory for the exact gradients.
    """
    span, qs = span or Span(None), sorted({int(q) for q in queries_list})
    modules, kinds = perturbed_modules(model, perturb), kinds_for(perturb)
    t0, stats_seconds = time.perf_counter(), None
    if stats is None and reading != "taylor_abs":
        stats = _stats_for(model, calib, reading, batch_size, span.sub(0, .1))
        stats_seconds = time.perf_counter() - t0
    if estimate is None or estimate.queries < qs[-1]:
        estimate = zo_estimate(model, calib, modules, qs[-1], epsilon, seed, batch_size, queries_per_pass,
                               span.sub(.1, .7))
    prefix = adapter_for(model).layers_path
    names = {f"{prefix}.{m.layer}.{m.path}.weight": m for m in modules}
    t0 = time.perf_counter()
    exact = exact_gradients(model, calib, lambda n, p: n in names, span=span.sub(.7, .8))
    exact_seconds = time.perf_counter() - t0
    name_of = {m.key: n for n, m in names.items()}
    truth = fms_maps(model, modules, lambda m: exact[name_of[m.key]], reading, stats, kinds)
    out = {"reading": reading, "queries": qs, "spearman": {}, "without_gradient": {},
           "perturbed": sum(m.module.weight.numel() for m in modules),
           "loss_evaluations": {str(q): 2 * q for q in qs},
           "seconds": {"stats": stats_seconds, "estimate": {str(q): estimate.seconds_for(q) for q in qs},
                       "maps": {}, "exact": exact_seconds}}
    for i, q in enumerate(qs):
        t0 = time.perf_counter()
        zo = fms_maps(model, modules, lambda m: estimate.gradient(m, q), reading, stats, kinds)
        out["seconds"]["maps"][str(q)] = time.perf_counter() - t0
        out["spearman"][str(q)] = {k: _spearman(zo[k], truth[k]) for k in truth}
        span.sub(.8, 1.0).step((i + 1) / len(qs), f"comparing with backprop: q={q}")
    flat = fms_maps(model, modules, lambda m: torch.ones_like(m.module.weight, dtype=torch.float32), reading,
                    stats, kinds)
    out["without_gradient"] = {k: _spearman(flat[k], truth[k]) for k in truth}
    return out


# ---- feature-map gates: the perturbed variables are the units' outputs -------------------------------------------

def gate_groups(model: nn.Module, kind: str) -> tuple[str, torch.Tensor]:
    """Where a unit kind's gates act and which input columns of that output projection each gate scales:
    ``(path, [n_units, w] column indices)`` (heads: head_dim columns; KV groups: their query heads'; channels: 1)."""
    adapter, g = adapter_for(model), geometry_of(model)
    if kind == "channel":
        return adapter.mlp_out, torch.arange(g.n_channels).view(-1, 1)
    cols = torch.arange(g.n_heads * g.head_dim).view(g.n_heads, g.head_dim)  # [H, hd]
    return adapter.attn_out, cols if kind == "head" else cols.view(g.n_kv, -1)


class GatePerturbation(SlotHooks):
    """Forward pre-hooks scaling each unit's feature map (its input columns of the output projection) by
    ``1 + scale_s·z_{query_s}[unit]`` in part s of the batch, as :class:`Perturbation` does for weights. ``z`` is
    a Gaussian vector over one layer's units, regenerated from ``(seed, query, layer)``. The model is never
    written."""

    def __init__(self, model: nn.Module, kind: str, seed: int):
        super().__init__()
        self.path, self.groups = gate_groups(model, kind)
        self.layers = adapter_for(model).layers(model)
        self.seed = seed
        self.template = torch.zeros(self.groups.shape[0])

    def _hook(self, l: int):
        def hook(module, args):
            if not self.slots:
                return None
            x = args[0]
            parts = x.reshape(len(self.slots), -1, x.shape[-1]).clone()  # [P, rows, in]
            for s, (query, scale) in enumerate(self.slots):
                z = direction(self.template, self.seed, query, l).to(x.device, x.dtype)  # [n_units]
                gate = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
                gate[self.groups.flatten().to(x.device)] += scale * z.repeat_interleave(self.groups.shape[1])
                parts[s] = parts[s] * gate
            return (parts.reshape(x.shape),) + tuple(args[1:])
        return hook

    def install(self) -> list:
        return [get_path(layer, self.path).register_forward_pre_hook(self._hook(l))
                for l, layer in enumerate(self.layers)]


@dataclass
class GateEstimate:
    """q projected gate gradients ``c_j`` of one unit kind and the seed: ĝ of every prefix of the queries."""

    kind: str
    seed: int
    epsilon: float
    shape: tuple[int, int]  # (layers, units per layer)
    projected: torch.Tensor  # [q] float64: (L(1+εz_j) − L(1−εz_j)) / 2ε
    seconds: list[float] | None = None  # wall seconds from the start until query j was measured

    @property
    def queries(self) -> int:
        return int(self.projected.numel())

    def seconds_for(self, queries: int) -> float | None:
        return None if not self.seconds else self.seconds[min(queries, len(self.seconds)) - 1]

    def gradient(self, queries: int | None = None) -> torch.Tensor:
        """ĝ ``[L, n]`` (fp32) from the first ``queries`` queries (all by default)."""
        q = self.queries if queries is None else min(queries, self.queries)
        template = torch.zeros(self.shape[1])
        grad = torch.zeros(self.shape, dtype=torch.float64)  # [L, n]
        for j in range(q):
            c = float(self.projected[j])
            for l in range(self.shape[0]):
                grad[l] += c * direction(template, self.seed, j, l).double()
        return (grad / max(q, 1)).float()


def gate_zo(model: nn.Module, calib: Calibration | torch.Tensor, kind: str, queries: int, epsilon: float,
            seed: int, batch_size: int = DEFAULT_BATCH_SIZE, queries_per_pass: int = 1,
            span: Span | None = None) -> GateEstimate:
    """The ``2·queries`` perturbed losses of the gate estimate (two-sided SPSA over the gates of ``kind``), kept
    as projected gradients; ``queries_per_pass`` queries share one forward pass as in :func:`zo_estimate`."""
    _check_queries(queries)
    check_hookable(model)
    view = clone_model(model, share_weights=True)  # the hooks live on this call's own view
    batches = list(token_batches(calib, batch_size, execution_device(view)))
    n_layers = len(adapter_for(view).layers(view))
    with GatePerturbation(view, kind, seed) as pert:
        shape = (n_layers, int(pert.groups.shape[0]))
        projected, seconds = _spsa_queries(view, batches, pert, queries, epsilon, queries_per_pass,
                                           span or Span(None), f"feature-map gates ({kind})")
    return GateEstimate(kind, seed, epsilon, shape, projected, seconds)


def gate_estimate(model: nn.Module, calib: Calibration | torch.Tensor, kind: str, queries: int, epsilon: float,
                  seed: int, batch_size: int = DEFAULT_BATCH_SIZE, span: Span | None = None) -> torch.Tensor:
    """SPSA estimate of ``∂L/∂m_u`` for every unit gate ``m_u`` (all 1 in the model) of ``kind``: ``[L, n]``.

    The perturbed dimension is the number of units (SmolLM2: 270 heads, 90 KV groups, 46,080 channels) instead
    of the number of weights (10^8), so the estimator's signal-to-noise ratio ``≈ sqrt(q / d)`` is orders of
    magnitude better at the same query count.
    """
    return gate_zo(model, calib, kind, queries, epsilon, seed, batch_size, span=span).gradient()


def exact_gate_gradients(model: nn.Module, calib: Calibration | torch.Tensor, kind: str,
                         batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """Backprop ``∂L/∂m_u`` of the same loss (the reference the ZO gates are compared with): ``[L, n]``.

    ``∂L/∂m_u = Σ_tokens Σ_{columns of u} x · ∂L/∂x`` at the output projection's input (first-order Taylor of
    scaling the unit's feature map), accumulated by hooks on a tensor-sharing view.
    """
    view = clone_model(model, share_weights=True)
    path, groups = gate_groups(view, kind)
    layers = adapter_for(view).layers(view)
    grad = torch.zeros(len(layers), groups.shape[0], dtype=torch.float64)  # [L, n]
    tokens = 0

    def hook_for(l):
        def hook(module, args):
            x = args[0]
            if not x.requires_grad:
                return

            def accumulate(g, x=x.detach()):  # g = ∂L/∂x [b, T, in]; returns None: the gradient is unchanged
                grad[l].add_((x * g).reshape(-1, x.shape[-1])[:, groups].sum((0, 2)).double().cpu())
            x.register_hook(accumulate)
        return hook

    handles = [get_path(layer, path).register_forward_pre_hook(hook_for(l)) for l, layer in enumerate(layers)]
    params = [p for p in view.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        view.get_input_embeddings().weight.requires_grad_(True)  # something upstream must need a gradient
        for batch in token_batches(calib, batch_size, execution_device(view)):
            logits = view(input_ids=batch, use_cache=False).logits[:, :-1].float()  # [b, T-1, V]
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").backward()
            tokens += batch[:, 1:].numel()
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
    return (grad / max(tokens, 1)).float()


def gate_maps(model: nn.Module, calib: Calibration | torch.Tensor, kinds: Iterable[str], queries: int,
              epsilon: float, seed: int, batch_size: int, span: Span) -> dict[str, torch.Tensor]:
    """Feature-map sensitivity taken literally: ``|∂L/∂m_u|`` per unit, one ZO estimate per unit kind."""
    kinds = tuple(kinds)
    out = {}
    for i, kind in enumerate(kinds):
        sub = span.sub(i / len(kinds), (i + 1) / len(kinds))
        out[UNITS[kind].map] = gate_estimate(model, calib, kind, queries, epsilon, seed, batch_size, sub).abs()
    return out


def gates_vs_backprop(model: nn.Module, calib: Calibration | torch.Tensor, queries_list: Iterable[int] = (1, 4, 16, 64),
                      kinds: Iterable[str] = ("head", "kv", "channel"), epsilon: float = 1e-3, seed: int = 0,
                      batch_size: int = DEFAULT_BATCH_SIZE, queries_per_pass: int = 1,
                      stats: CalibrationStats | None = None, span: Span | None = None) -> dict:
    """How well the ZO gate maps ``|ĝ_u|`` rank like the exact-backprop gate maps ``|∂L/∂m_u|``, per query count:
    the gate counterpart of :func:`zo_vs_backprop`.

    Runs one gate estimate per kind with ``max(queries_list)`` queries and uses its first q queries for each q.
    Returns ``{"variables": "gates", "queries", "perturbed": {map: d}, "spearman": {str(q): {map: {"all",
    "within_layer"}}}, "cosine": {str(q): {map: cos(ĝ, ∂L/∂m)}}, "without_gradient": {map: ...},
    "loss_evaluations": {str(q): 2q}, "seconds": {"estimate": {map: {str(q): s}}, "exact": {map: s}}}``.
    ``cosine`` is signed (the estimator's direction; theory ``≈ sqrt(q/(d+q))``); ``without_gradient`` correlates
    the exact gate map with the gradient-free ``Σ|W|·‖X‖`` map (reading A over all scored projections);
    ``loss_evaluations`` counts calibration-set losses per kind (the criterion runs one estimate per kind);
    ``seconds["exact"]`` is one forward and one backward pass per kind. Needs backprop memory.
    """
    span, qs, kinds = span or Span(None), sorted({int(q) for q in queries_list}), tuple(kinds)
    if stats is None:
        stats = collect_stats(model, calib, span.sub(0, .05), batch_size=batch_size)
    modules = perturbed_modules(model, "scored")
    flat = fms_maps(model, modules, lambda m: torch.ones_like(m.module.weight, dtype=torch.float32), "A", stats,
                    kinds)
    out = {"variables": "gates", "queries": qs, "perturbed": {}, "spearman": {str(q): {} for q in qs},
           "cosine": {str(q): {} for q in qs}, "without_gradient": {},
           "loss_evaluations": {str(q): 2 * q for q in qs}, "seconds": {"estimate": {}, "exact": {}}}
    for i, kind in enumerate(kinds):
        sub, name = span.sub(.05 + .95 * i / len(kinds), .05 + .95 * (i + 1) / len(kinds)), UNITS[kind].map
        est = gate_zo(model, calib, kind, qs[-1], epsilon, seed, batch_size, queries_per_pass, sub.sub(0, .9))
        t0 = time.perf_counter()
        exact = exact_gate_gradients(model, calib, kind, batch_size)  # [L, n]
        out["seconds"]["exact"][name] = time.perf_counter() - t0
        out["seconds"]["estimate"][name] = {str(q): est.seconds_for(q) for q in qs}
        out["perturbed"][name] = int(exact.numel())
        for q in qs:
            g = est.gradient(q)
            out["spearman"][str(q)][name] = _spearman(g.abs(), exact.abs())
            out["cosine"][str(q)][name] = float(F.cosine_similarity(g.flatten().double(), exact.flatten().double(),
                                                                    dim=0))
        out["without_gradient"][name] = _spearman(flat[name], exact.abs())
        sub.step(1.0, f"gates ({kind}): compared with backprop")
    return out


# ---- the criterion ----------------------------------------------------------------------------------------------

@dataclass
class MiniLLMOptions:
    """queries: SPSA queries q (2q loss evaluations over the calibration set; see the module docstring for why
    64: cost, not accuracy, sets it). epsilon: perturbation scale (MeZO's 1e-3). reading: "A" |W·ĝ|·‖X‖ (default),
    "B" |W·ĝ|·|mean X| (spsa-prune), "taylor_abs" |W·ĝ|. seed: seed of the directions. perturb: "scored" (all
    attention and MLP projections), "attention" or "mlp". batch_size: calibration windows per perturbed loss
    (default 4, so a pass with both signs holds 8 windows, as the other criteria's forward passes; measured on
    SmolLM2-135M, CPU, 8×128 tokens: 0.8× the extra memory of a plain forward over 8 windows, whose logits are
    never materialised here). queries_per_pass:
    queries sharing one forward (each pass holds 2·queries_per_pass·batch_size windows: speed versus activation
    memory; same result up to rounding). compare_backprop: also compute exact gradients and store the
    ZO-vs-backprop rank correlation in extras (needs backprop memory, so off by default; the recorded peak memory
    then is that of backprop). variables: "weights" (the per-weight reading above) or "gates" (one multiplicative
    gate per head, KV group and channel on its feature map, score ``|∂L/∂m_u|``; ``reading`` is then unused)."""

    queries: int = 64
    epsilon: float = 1e-3
    reading: str = "A"
    seed: int = 0
    perturb: str = "scored"
    batch_size: int = DEFAULT_BATCH_SIZE // 2  # + and − share a pass: as many windows as a plain forward
    queries_per_pass: int = 1
    compare_backprop: bool = False
    variables: str = "weights"


def _check(options: MiniLLMOptions) -> None:
    if options.reading not in READINGS:
        raise CriterionError(f"minillm: reading must be one of {READINGS}, not {options.reading!r}")
    if options.perturb not in PERTURB:
        raise CriterionError(f"minillm: perturb must be one of {PERTURB}, not {options.perturb!r}")
    if not options.epsilon > 0:
        raise CriterionError("minillm: epsilon must be positive")
    if options.variables not in VARIABLES:
        raise CriterionError(f"minillm: variables must be one of {VARIABLES}, not {options.variables!r}")


@register
class MiniLLM(Criterion):
    name = "minillm"
    title = "MINI-LLM (forward-only gradients)"
    paper = "MINI-LLM, Cheng et al., arXiv 2407.11681"
    produces = ("heads", "kv", "channels")
    Options = MiniLLMOptions

    def score(self, model: nn.Module, calib: Calibration, options: MiniLLMOptions, ctx: Context) -> ImportanceMap:
        _check(options)
        span = Span(ctx)
        if options.variables == "gates":
            maps = gate_maps(model, calib, kinds_for(options.perturb), options.queries, options.epsilon,
                             options.seed, options.batch_size, span)
            return ImportanceMap(self.name, geometry_of(model), **maps,
                                 extras={"queries": options.queries, "variables": "gates",
                                         "perturbed_gates": {k: int(v.numel()) for k, v in maps.items()}})
        modules, kinds = perturbed_modules(model, options.perturb), kinds_for(options.perturb)
        stats = _stats_for(model, calib, options.reading, options.batch_size, span.sub(0.0, 0.05))
        est = zo_estimate(model, calib, modules, options.queries, options.epsilon, options.seed,
                          options.batch_size, options.queries_per_pass, span.sub(0.05, 0.8))
        maps = fms_maps(model, modules, est.gradient, options.reading, stats, kinds, span.sub(0.8, 0.9))
        extras = {"queries": est.queries, "epsilon": est.epsilon, "projected_gradients": est.projected.tolist(),
                  "perturbed_weights": sum(m.module.weight.numel() for m in modules)}
        if options.compare_backprop:
            diag = zo_vs_backprop(model, calib, (options.queries,), options.reading, options.epsilon, options.seed,
                                  options.perturb, options.batch_size, options.queries_per_pass, est, stats,
                                  span.sub(0.9, 1.0))
            extras["zo_vs_backprop"] = {"spearman": diag["spearman"][str(options.queries)],
                                        "without_gradient": diag["without_gradient"]}
        return ImportanceMap(self.name, geometry_of(model), **maps, extras=extras)

    def estimate(self, geometry, n_params, samples, seq_len, options) -> dict:
        g = geometry
        largest = g.hidden * max(g.n_channels, (g.n_heads + 2 * g.n_kv) * g.head_dim)
        return {"forward_tokens": (2 * options.queries + 1) * samples * seq_len,
                "backward": bool(options.compare_backprop), "extra_bytes": 8 * largest}
