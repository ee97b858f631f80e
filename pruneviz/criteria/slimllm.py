"""SlimLLM (Guo et al., ICML 2025, arXiv 2505.22689, code ``guojialong1/Slimllm``): the whole method as pieces
that compose with the rest of pruneviz; :func:`slimllm_prune_to` runs them in the paper's order.

**Head score** (criterion ``slimllm``). Per layer, the attention output is the sum of its heads' contributions,
``S = Σ_h o_h`` with ``o_h = x_h · W_o[:, h]`` (``x_h`` the head's ``head_dim`` inputs of the output
projection). Removing head ``h`` leaves ``S − o_h``; SlimLLM keeps the heads whose removal would change the
*direction* of the output most, measured per output dimension ``d`` by the Pearson correlation over calibration
tokens, ``ρ_d(h) = corr(S_d − o_{h,d}, S_d)``, summed as ``Σ_d |ρ_d(h)|``: a head whose removal leaves the
output highly correlated with the dense one is safe to remove. The importance here is ``Σ_d (1 − |ρ_d(h)|)``
(higher = keep). GQA (the paper has none; its code slices k/v rows like q rows): a KV group's contribution is
the sum of its query heads' (``o_g = Σ_{h∈g} o_h``) and is scored the same way.

**Channel score** (option ``channel_score``). ``"pca"`` (default, the paper's MLP score, official
``LlamaMLP.compress``): with ``X`` the MLP input, ``A`` the down projection's input (the channels) and ``Y`` its
output over the calibration tokens, the principal components of ``Y`` (eigenvalues ``λ``, eigenvectors ``V`` of
the centred scatter ``Σ(Y−Ȳ)(Y−Ȳ)ᵀ``) weigh each channel's write direction:
``I(c) = Σ_rows ‖W_in[r, :] ⊙ ‖X‖‖₂ + ‖A_c‖₂ · ‖ |W_d[:, c]ᵀ V| ⊙ σ(|λ| / mean|λ|) ‖₂``, the first sum over the
channel's rows of the input projections (gate and up; one fc row for non-gated MLPs; both halves of a fused
gate_up), norms over tokens. ``Y`` is taken without the projection's bias (the centred scatter does not see it).
``"correlation"`` scores channels by the head score's removal correlation (``o_c = A_c · W_d[:, c]``), pruneviz's
earlier default. ``spare_lowest`` reproduces the official code's quirk of keeping each layer's lowest 1% of
channels (not in the paper's text; default off).

**Greedy swaps** (:func:`refine_heads`, a solver step: it depends on how many units a layer loses). The initial
removal set of a layer is the allocation's (the units of highest single-removal correlation, as in the paper);
then each removed unit in turn is swapped with the kept unit that most raises the *set* objective
``Σ_d |corr(Σ_{u kept} o_{u,d}, S_d)|`` (joint removal, not a sum of singles), if any does. The official code
makes one such pass; here passes repeat until none makes a swap (a local optimum under single swaps) or
``swap_rounds`` passes. The objective for any set comes from per-unit moments ``Σ o_u`` and ``Σ o_u ⊙ o_v``
(:class:`UnitMoments`, one layer at a time). GQA: with ``attn_unit="kv"`` swaps exchange whole KV groups; with
``"head"`` a removed query head swaps only with a kept head of its own KV group, so every group keeps its count.

**Layer ratios** (allocation strategy ``slimllm``): the mean token cosine between each block's input and output
(``extras["layer_cosine"]``, dense model); the most redundant blocks are pruned most,
``r_l = r · n · softmax(α·cos)_l`` over the ``n`` blocks of highest cosine (see
:func:`pruneviz.schedules.cosine_ratios` for the normalisation to the target, the bounds and the choices), unit
totals from the parameter target as for every strategy (so plans land at or under it).

**Affine compensation** (compensator ``"affine"``, usable with a plan from any criterion): for each output
projection of a kept layer that loses units, every output dimension ``d`` is refitted by least squares over the
calibration tokens, ``y_d ≈ a_d · z_d + b_d``, where ``y`` is the dense projection output and ``z`` the output
from the kept inputs only (the paper's ``np.polyfit`` of degree 1), and ``a_d``, ``b_d`` are folded into the
projection's weight rows and bias. FLAP's bias compensation is the special case ``a_d = 1``. Statistics come from
one pass of the dense model (every layer sees dense inputs, as in FLAP); the projection gains a bias where it had
none (counted by :meth:`pruneviz.plan.Plan.param_count`). ``shrink`` (default 0) pulls ``a_d`` toward 1 as a
ridge penalty ``λ = shrink · var(z_d)`` on ``a_d − 1``.

**Sequential refits** (compensators ``"affine_local"`` and ``"affine_sequential"``): the same two numbers per
output dimension, fitted block by block on the *pruned* model's activations (every earlier block pruned and
refitted; attention before MLP in a block), the official code's order. ``affine_local`` fits each projection's
own full output on those activations (the official polyfit); ``affine_sequential`` fits the dense model's
output instead, which also asks each refit to undo the earlier blocks' error. Measured on the bundled model
(bench/results/quality.md): the local fit is a little better than the one-pass fit on every text; the dense
target is far worse: regressing the dense output on drifted inputs attenuates the slope (mean ``a`` over the
MLP refits 0.94, down to 0.78, against 1.005 for the local fit).

**Ridge reconstruction** (choice, pruneviz's; plan provenance ``affine_ridge``, the recipe's ``ridge``): before a
sequential refit, the kept columns of the projection take the ridge least-squares prediction of the removed
columns' output from the kept inputs (:func:`ridge_reconstruction`), so the removed units' contribution is not
simply lost; the affine refit then fits the projection's original output. ``λ = 0`` is SlimGPT's OBS update on
these activations (it overfits the calibration text), a large ``λ`` the affine refit alone; the recipe's ``λ = 1``
was better than the affine refit alone on every text and calibration seed measured, and than smaller ``λ``
(bench/results/quality.md, merge_study.md). Cost per refit: no extra
block pass (the affine fit's sums follow exactly from the same input moments, :meth:`InputMoments.fit_sums`), but
the ``C x C`` input covariance and a ``K x K`` solve (``O(C³)``: seconds for SmolLM2's 1536 channels on
a CPU, minutes per layer for a 14336-channel MLP there; use a GPU for large models).

**Dense statistics** (choice): every statistic (scores, cosines, swap moments, the ``affine`` fit) is taken on
the dense model's activations, block by block through the capture engine (offloaded models work). The official
code prunes block by block, each block calibrated on the outputs of the already pruned ones; pruneviz keeps one
dense pass for the scores so that they are a map like every criterion's and plans can be edited before they are
built, and offers the official order for the refit (above).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..allocate import (
    MAX_LAYER_RATIO,
    Allocation,
    Job,
    Target,
    allocate,
    ladders,
    need_parts,
    ratio_width,
    register_allocator,
    round_half_up,
    vllm_width,
    width_layers,
    width_params,
)
from ..arch import adapter_for, geometry_of, get_path, weight_axis
from ..errors import CriterionError, PlanError
from ..importance import Calibration, Context, Criterion, ImportanceMap, register
from ..offload import clone_model, execution_device, is_offloaded, materialized, resident_copy
from ..plan import Plan
from ..progress import Span, context_of
from ..schedules import cosine_ratios
from ..surgery import masking, register_compensator
from .capture import LayerStream, capture_inputs
from .stats import DEFAULT_BATCH_SIZE, check_hookable

PAPER = "SlimLLM, Guo et al., ICML 2025"
UNIT_CHUNK = 64  # units whose contributions [tokens, units, hidden] are materialised at once
TOKEN_CHUNK = 1024  # tokens whose per-head contributions [tokens, heads, hidden] the swap moments take at once


# ---- streaming sums per output dimension ------------------------------------------------------------------------

@dataclass
class PairSums:
    """Running sums over tokens of two signals ``a`` [k, D] and ``b`` [D] (fp64): enough for corr(a_k, b) per d."""

    n: int = 0
    sa: torch.Tensor | None = None  # [k, D]
    saa: torch.Tensor | None = None
    sab: torch.Tensor | None = None
    sb: torch.Tensor | None = None  # [D]
    sbb: torch.Tensor | None = None

    def add(self, a: torch.Tensor, b: torch.Tensor, offset: int = 0, units: int | None = None) -> None:
        """``a`` [N, k, D] (units ``offset .. offset+k`` of ``units``, all by default) and ``b`` [N, D] for N
        tokens; ``b``'s sums and the token count grow with the chunk at ``offset`` 0 only."""
        a, b = a.double(), b.double()
        k, units = a.shape[1], units or a.shape[1]
        if self.sa is None:
            shape = (units, a.shape[2])
            self.sa, self.saa, self.sab = (torch.zeros(shape, dtype=torch.float64) for _ in range(3))
            self.sb, self.sbb = torch.zeros(a.shape[2], dtype=torch.float64), torch.zeros(a.shape[2],
                                                                                          dtype=torch.float64)
        self.sa[offset:offset + k] += a.sum(0).cpu()
        self.saa[offset:offset + k] += (a * a).sum(0).cpu()
        self.sab[offset:offset + k] += (a * b[:, None]).sum(0).cpu()
        if offset == 0:
            self.sb += b.sum(0).cpu()
            self.sbb += (b * b).sum(0).cpu()
            self.n += a.shape[0]

    def corr(self) -> torch.Tensor:
        """Pearson correlation of ``a_k`` with ``b`` per output dimension: [k, D] (0 where a variance is 0)."""
        n = max(self.n, 1)
        cov = self.sab / n - (self.sa / n) * (self.sb / n)
        va = (self.saa / n - (self.sa / n) ** 2).clamp_min(0)
        vb = (self.sbb / n - (self.sb / n) ** 2).clamp_min(0)
        den = (va * vb).sqrt()
        return torch.where(den > 0, cov / den.clamp_min(1e-300), torch.zeros_like(cov))


def _rows(module: nn.Module) -> torch.Tensor:
    """``module``'s weight as ``[out, in]`` in its dtype (transposes GPT-2 ``Conv1D``)."""
    w = module.weight.detach()
    return w.T if weight_axis(module, "out") == 1 else w


def weight_rows(module: nn.Module) -> torch.Tensor:
    """fp32 ``[out, in]`` copy of ``module``'s weight, also inside a forward pre-hook of an offloaded module (whose
    weight is materialised only by its own forward)."""
    with materialized(module):
        return _rows(module).float().clone()


def _unit_contributions(w: torch.Tensor, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per-unit contributions ``[N, k, D]`` to the output of a projection of weight ``w`` [D, in] (fp32) of input
    columns grouped by ``groups`` [k, w]."""
    xs = x.float()[:, groups]  # [N, k, w]
    return torch.einsum("nkw,dkw->nkd", xs, w[:, groups])


# ---- the PCA-weighted MLP channel score --------------------------------------------------------------------------

@dataclass
class PcaSums:
    """Per layer, sums over tokens for SlimLLM's channel score (fp64): ``Σ X_j²`` of the MLP input [D],
    ``Σ A_c²`` of the down projection's input [C], ``Σ Y`` [D] and ``Σ Y Yᵀ`` [D, D] of its bias-free output."""

    n: int = 0
    x_sq: torch.Tensor | float = 0.0
    a_sq: torch.Tensor | float = 0.0
    y: torch.Tensor | float = 0.0
    yy: torch.Tensor | float = 0.0

    def add_input(self, x: torch.Tensor) -> None:  # [N, D]
        self.x_sq = self.x_sq + x.double().pow(2).sum(0).cpu()

    def add_output(self, a: torch.Tensor, y: torch.Tensor) -> None:  # [N, C], [N, D]
        a, y = a.double(), y.double()
        self.n += a.shape[0]
        self.a_sq = self.a_sq + a.pow(2).sum(0).cpu()
        self.y, self.yy = self.y + y.sum(0).cpu(), self.yy + (y.T @ y).cpu()

    def scatter(self) -> torch.Tensor:
        """Centred scatter matrix ``Σ (Y − Ȳ)(Y − Ȳ)ᵀ`` [D, D] (the paper's ``cov``, not divided by N)."""
        return self.yy - torch.outer(self.y, self.y) / max(self.n, 1)


def pca_down_score(w_down: torch.Tensor, act_sq: torch.Tensor, scatter: torch.Tensor) -> torch.Tensor:
    """SlimLLM's output-side channel term ``I_d(c) = ‖A_c‖ · ‖ |W_d[:, c]ᵀ V| ⊙ σ(|λ| / mean|λ|) ‖₂`` [C].

    ``w_down`` [D, C] (Linear layout), ``act_sq`` [C] = ``Σ A_c²``, ``scatter`` [D, D] of the MLP output; ``λ``, ``V``
    its eigenvalues and eigenvectors (principal components; the score does not depend on their order or signs)."""
    lam, vec = torch.linalg.eigh(scatter.double())  # [D], [D, D]
    lam = lam.abs()
    weight = torch.sigmoid(lam / lam.mean().clamp_min(1e-300))  # [D]
    proj = (w_down.double().T @ vec).abs() * weight  # [C, D]: each channel's write direction in the PCA basis
    return act_sq.double().sqrt() * proj.norm(dim=-1)


def input_side_score(layer: nn.Module, rows: dict[str, torch.Tensor], g, x_sq: torch.Tensor) -> torch.Tensor:
    """``Σ`` over the channel's rows ``r`` of the MLP input projections of ``‖W[r, :] ⊙ ‖X‖‖₂`` [C]: SlimLLM's
    ``I_g + I_u`` (gate and up rows; one fc row for non-gated MLPs, both halves of a fused gate_up)."""
    score = torch.zeros(g.n_channels, dtype=torch.float64)
    xn = x_sq.double().sqrt()  # [D] ‖X_j‖ over tokens
    for path, idx in rows.items():
        norms = (_rows(get_path(layer, path)).double().cpu() * xn).norm(dim=-1)  # [out]
        score += norms[idx].sum(-1)  # idx [C, k]
    return score


def channel_rows(adapter, g) -> dict[str, torch.Tensor]:
    """Output rows [C, k] of each MLP input projection that channel ``c`` owns (from the adapter's slices)."""
    rows: dict[str, list] = {}
    for c in range(g.n_channels):
        per: dict[str, list] = {}
        for s in adapter.channel_slices(g, c):
            if s.axis == "out" and s.module != adapter.mlp_out:
                per.setdefault(s.module, []).extend(s.index)
        for path, idx in per.items():
            rows.setdefault(path, []).append(idx)
    return {p: torch.tensor(r, dtype=torch.long) for p, r in rows.items()}


def pca_channel_score(layer: nn.Module, adapter, g, sums: PcaSums, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """SlimLLM's channel importance ``I_g + I_u + I_d`` [C] of one layer (higher = keep; ``rows`` from
    :func:`channel_rows`); see the module docstring."""
    with materialized(layer):  # an offloaded block's weights, read after its forward passes
        down = _rows(get_path(layer, adapter.mlp_out)).double().cpu()  # [D, C]
        inputs = input_side_score(layer, rows, g, sums.x_sq)
    return inputs + pca_down_score(down, sums.a_sq, sums.scatter())


def spare_lowest(scores: torch.Tensor, share: float) -> torch.Tensor:
    """The official code's quirk (``pruned_m``): the ``round(share·C)`` lowest-scored channels of each layer are
    kept, by lifting their scores above the layer's maximum (in their order). ``scores`` [L, C]."""
    k = int(round(share * scores.shape[-1]))
    if k <= 0:
        return scores
    out = scores.clone()
    low = torch.argsort(scores, dim=-1, stable=True)[:, :k]  # [L, k]
    top = scores.max(-1, keepdim=True).values  # [L, 1]
    out.scatter_(1, low, top + 1 + torch.arange(k, dtype=scores.dtype).expand_as(low))
    return out


# ---- the criterion ----------------------------------------------------------------------------------------------

CHANNEL_SCORES = ("pca", "correlation")


@dataclass
class SlimLLMOptions:
    """SlimLLM's options (stored in the map's meta; ``alpha``/``pruned_layers`` also in its extras for allocation).

    - ``channel_score``: ``"pca"`` (default, the paper's MLP score, see the module docstring) or ``"correlation"``
      (the head score applied to channels, pruneviz's earlier default).
    - ``spare_lowest``: share of each layer's lowest-scored channels kept anyway, as the official code does (1%;
      not in the paper's text); default 0.
    - ``alpha``: sharpness of the cosine layer ratios (paper's ``--alpha``, 10); ``pruned_layers``: share of the
      layers the ``slimllm`` strategy prunes (most redundant first; 26/32, the README's LLaMA-7B 20% command).
      See :func:`pruneviz.schedules.cosine_ratios`.
    - ``batch_size``: calibration windows per block call.
    """

    channel_score: str = "pca"
    spare_lowest: float = 0.0
    alpha: float = 10.0
    pruned_layers: float = 26 / 32
    batch_size: int = DEFAULT_BATCH_SIZE

    def check(self) -> "SlimLLMOptions":
        if self.channel_score not in CHANNEL_SCORES:
            raise CriterionError(f"channel_score must be one of {CHANNEL_SCORES}, got {self.channel_score!r}")
        if not 0.0 <= self.spare_lowest < 1.0 or not 0.0 < self.pruned_layers <= 1.0:
            raise CriterionError("spare_lowest must be in [0, 1) and pruned_layers (a share of layers) in (0, 1]")
        if self.batch_size < 1:
            raise CriterionError("batch_size must be at least 1")
        return self


def _groups(g, kind: str) -> torch.Tensor:
    """Input columns of the output projection per unit: heads [H, hd], KV groups [G, gs·hd], channels [C, 1]."""
    if kind == "channels":
        return torch.arange(g.n_channels).view(-1, 1)
    cols = torch.arange(g.n_heads * g.head_dim).view(g.n_heads, g.head_dim)  # [H, hd]
    return cols if kind == "heads" else cols.view(g.n_kv, -1)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])  # [N, features]


def _correlation_hook(sums: dict, maps: tuple[str, ...], groups: dict):
    """Pre-hook on an output projection: removal-correlation sums of each unit kind in ``maps``."""
    def hook(module, args):
        x = _flat(args[0])  # [N, in]
        w = weight_rows(module)  # [D, in]
        total = nn.functional.linear(x.float(), w)  # [N, D] (bias cancels in corr)
        for m in maps:
            for chunk in groups[m].split(UNIT_CHUNK):  # bounded memory: [N, chunk, D] at a time
                contrib = _unit_contributions(w, x, chunk)  # [N, k, D]
                sums[m].add(total[:, None] - contrib, total, offset=int(chunk[0, 0]) // chunk.shape[1],
                            units=groups[m].shape[0])
    return hook


def _pca_hooks(acc: PcaSums):
    def on_input(module, args):
        acc.add_input(_flat(args[0]).float())

    def on_down(module, args):
        a = _flat(args[0]).float()  # [N, C]
        acc.add_output(a, nn.functional.linear(a, weight_rows(module)))  # Y without the bias: [N, D]
    return on_input, on_down


def run_block(layer: nn.Module, i: int, stream: LayerStream, hooks: list[tuple[str, Callable]]) -> list[torch.Tensor]:
    """Block ``i``'s outputs per batch of ``stream`` (its inputs stay), with forward pre-hooks ``(path, fn)``."""
    handles = [get_path(layer, p).register_forward_pre_hook(fn) for p, fn in hooks]
    try:
        return [stream.call(layer, i, b) for b in range(len(stream.hidden))]
    finally:
        for h in handles:
            h.remove()


def layer_cosine(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """Mean over tokens of ``cos(h_in, h_out)`` of one block (the paper's layer redundancy)."""
    total, count = 0.0, 0
    for x, y in zip(inputs, outputs):
        c = torch.cosine_similarity(y.float(), x.float(), dim=-1)  # [b, T]
        total, count = total + float(c.double().sum()), count + c.numel()
    return total / max(count, 1)


def blocks_stream(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> tuple[nn.Module, LayerStream]:
    """A tensor-sharing view of ``model`` (per-call hooks) and its block-0 calibration inputs (capture engine;
    works on offloaded models)."""
    check_hookable(model)
    view = clone_model(model, share_weights=True)
    return view, capture_inputs(view, tokens, batch_size)


def slimllm_statistics(model: nn.Module, calib: Calibration, options: SlimLLMOptions, span: Span) -> dict:
    """One dense pass, block by block: ``Σ_d |corr(S_d − o_{u,d}, S_d)|`` per head [L, H] and KV group [L, G], the
    channel score [L, C] (removal correlation, or the PCA score) and the mean input/output cosine per block [L]."""
    adapter, g = adapter_for(model), geometry_of(model)
    groups = {m: _groups(g, m) for m in ("heads", "kv", "channels")}
    rows = channel_rows(adapter, g) if options.channel_score == "pca" else {}
    out: dict[str, list] = {"heads": [], "kv": [], "channels": [], "cosine": []}
    with torch.inference_mode():
        view, stream = blocks_stream(model, calib.tokens, options.batch_size)
        layers = adapter.layers(view)
        for i, layer in enumerate(layers):
            sums = {m: PairSums() for m in groups}
            hooks = [(adapter.attn_out, _correlation_hook(sums, ("heads", "kv"), groups))]
            pca = PcaSums()
            if options.channel_score == "pca":
                on_input, on_down = _pca_hooks(pca)
                hooks += [(adapter.mlp_modules[0], on_input), (adapter.mlp_out, on_down)]
            else:
                hooks.append((adapter.mlp_out, _correlation_hook(sums, ("channels",), groups)))
            outputs = run_block(layer, i, stream, hooks)
            out["cosine"].append(layer_cosine(stream.hidden, outputs))
            stream.hidden = outputs
            for m in ("heads", "kv"):
                out[m].append(sums[m].corr().abs().sum(-1))
            out["channels"].append(pca_channel_score(layer, adapter, g, pca, rows) if options.channel_score == "pca"
                                   else g.hidden - sums["channels"].corr().abs().sum(-1))
            span.step((i + 1) / len(layers), f"SlimLLM statistics: block {i + 1}/{len(layers)}")
    return {m: torch.stack(v).float() if m != "cosine" else v for m, v in out.items()}


def removal_correlations(model: nn.Module, calib: Calibration, batch_size: int, span: Span) -> dict:
    """``Σ_d |corr(S_d − o_{u,d}, S_d)|`` per unit: {"heads": [L, H], "kv": [L, G], "channels": [L, C]}."""
    stats = slimllm_statistics(model, calib, SlimLLMOptions(channel_score="correlation", batch_size=batch_size), span)
    g = geometry_of(model)
    return {"heads": stats["heads"], "kv": stats["kv"], "channels": g.hidden - stats["channels"]}


@register
class SlimLLM(Criterion):
    name = "slimllm"
    title = "SlimLLM (removal correlation, PCA channels)"
    paper = PAPER
    produces = ("heads", "kv", "channels")
    layerwise = True
    Options = SlimLLMOptions

    def score(self, model: nn.Module, calib: Calibration, options: SlimLLMOptions, ctx: Context) -> ImportanceMap:
        options.check()
        g = geometry_of(model)
        stats = slimllm_statistics(model, calib, options, Span(ctx, 0.0, 1.0))
        channels = spare_lowest(stats["channels"], options.spare_lowest)
        extras = {"higher_is": "more change of the output's direction when removed (heads, KV groups); "
                               + ("the PCA-weighted channel norm" if options.channel_score == "pca"
                                  else "the same correlation (channels)"),
                  "layer_cosine": [round(c, 8) for c in stats["cosine"]], "alpha": options.alpha,
                  "pruned_layers": options.pruned_layers, "channel_score": options.channel_score}
        return ImportanceMap(self.name, g, heads=g.hidden - stats["heads"], kv=g.hidden - stats["kv"],
                             channels=channels, extras=extras)


# ---- the affine compensator -------------------------------------------------------------------------------------

@dataclass
class FitSums:
    """Per output dimension: sums over tokens of z, y, z², z·y (fp64), for the 1-D least-squares fit."""

    n: int = 0
    sz: torch.Tensor | float = 0.0
    sy: torch.Tensor | float = 0.0
    szz: torch.Tensor | float = 0.0
    szy: torch.Tensor | float = 0.0

    def add(self, z: torch.Tensor, y: torch.Tensor) -> None:  # [N, D] each
        z, y = z.double(), y.double()
        self.n += z.shape[0]
        self.sz, self.sy = self.sz + z.sum(0), self.sy + y.sum(0)
        self.szz, self.szy = self.szz + (z * z).sum(0), self.szy + (z * y).sum(0)

    def fit(self, shrink: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` [D] of ``y ≈ a·z + b``; ``a → 1`` as the ridge penalty ``shrink·var(z)`` on ``a − 1`` grows."""
        n = max(self.n, 1)
        mz, my = self.sz / n, self.sy / n
        vz = (self.szz / n - mz * mz).clamp_min(0)
        cov = self.szy / n - mz * my
        a = (cov + shrink * vz) / (vz * (1 + shrink)).clamp_min(1e-12)
        a = torch.where(vz > 1e-12, a, torch.ones_like(a))
        return a, my - a * mz


def _kept_columns(g, plan: Plan, l: int, site: str) -> torch.Tensor | None:
    """Kept input columns of layer ``l``'s output projection ``site`` ("attn"/"mlp"), or None if none is lost."""
    if site == "attn":
        gone = plan.removed_heads_all(l)
        keep = [h * g.head_dim + i for h in range(g.n_heads) if h not in gone for i in range(g.head_dim)]
        total = g.n_heads * g.head_dim
    else:
        gone = plan.removed("channel", l)
        keep = [c for c in range(g.n_channels) if c not in set(gone)]
        total = g.n_channels
    return torch.tensor(keep, dtype=torch.long) if gone and len(keep) < total else None


def _fold(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    """``W[d, :] *= a_d`` and ``bias_d += b_d`` (a bias is created if the projection had none): the output becomes
    ``a·z + b + bias``, the fit of the bias-free outputs plus the projection's own bias."""
    w = module.weight
    shape = [1, 1]
    shape[weight_axis(module, "out")] = -1
    with torch.no_grad():
        w.mul_(a.to(w.dtype).view(shape))
        ensure_bias(module).add_(b.to(w.dtype))


def ensure_bias(module: nn.Module) -> torch.Tensor:
    """``module``'s bias, created as zeros [out] if the projection had none."""
    if getattr(module, "bias", None) is None:
        w = module.weight
        module.bias = nn.Parameter(torch.zeros(w.shape[weight_axis(module, "out")], dtype=w.dtype, device=w.device),
                                   requires_grad=w.requires_grad)
    return module.bias


@register_compensator("affine")
def affine(model: nn.Module, plan: Plan, calibration: torch.Tensor, progress=None, shrink: float = 0.0) -> None:
    """SlimLLM's per-dimension affine refit of every output projection that loses units, in place on ``model``
    (the dense-shaped copy about to be sliced); see the module docstring."""
    if plan_ridge(plan) is not None:
        raise PlanError("the ridge reconstruction (affine_ridge) is fitted block by block on the pruned model; use "
                        "compensation affine_local or affine_sequential, not the one-pass affine")
    adapter, g = adapter_for(model), geometry_of(model)
    span = Span(context_of(progress), 0.0, 1.0)
    sites = {"attn": adapter.attn_out, "mlp": adapter.mlp_out}
    keep = {(l, s): _kept_columns(g, plan, l, s) for l in plan.kept_blocks() for s in sites}
    keep = {k: v for k, v in keep.items() if v is not None}
    sums = {k: FitSums() for k in keep}
    layers = adapter.layers(model)

    def hook_for(key):
        def hook(module, args):
            sums[key].add(*kept_and_full(module, _flat(args[0]).float(), keep[key]))
        return hook

    handles = [get_path(layers[l], sites[s]).register_forward_pre_hook(hook_for((l, s))) for (l, s) in keep]
    try:
        device = execution_device(model)
        batches = list(calibration.split(DEFAULT_BATCH_SIZE))
        with torch.inference_mode():
            for i, batch in enumerate(batches):
                model(input_ids=batch.to(device), use_cache=False)
                span.step(0.9 * (i + 1) / len(batches), f"affine compensation: batch {i + 1}/{len(batches)}")
    finally:
        for h in handles:
            h.remove()
    for (l, s), acc in sums.items():
        a, b = acc.fit(float(plan.provenance.get("affine_shrink", shrink)))
        _fold(get_path(layers[l], sites[s]), a, b)
    span.step(1.0, "affine compensation done")


def kept_and_full(module: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W[:, keep] x[keep], W x)`` [N, D] each for projection ``module`` (no bias) and inputs ``x`` [N, in]: the
    output from the kept inputs only and the full output, the pair every affine refit fits (one weight read)."""
    return kept_output(module, x, keep), nn.functional.linear(x, weight_rows(module))


def kept_output(module: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``W[:, keep] x[keep]`` [N, D] for projection ``module`` (no bias) and inputs ``x`` [N, in]."""
    return nn.functional.linear(x[:, keep], weight_rows(module)[:, keep])


@dataclass
class InputMoments:
    """Sums over tokens of a projection's inputs ``x`` [N, C]: count, ``Σx`` [C] and ``Σxxᵀ`` [C, C], and with
    per-token targets ``t`` [N, D] also ``Σt`` [D] and ``Σxtᵀ`` [C, D]. Each batch's products are taken in the
    inputs' own precision, at least fp32 (half the cost of fp64 products for an fp32 model), and summed over batches
    in fp64."""

    n: int = 0
    s: torch.Tensor | float = 0.0
    ss: torch.Tensor | float = 0.0
    st: torch.Tensor | float = 0.0
    sxt: torch.Tensor | float = 0.0

    def add(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> None:  # [N, C], [N, D]
        x = x if x.dtype == torch.float64 else x.float()
        self.n += x.shape[0]
        self.s = self.s + x.double().sum(0)
        self.ss = self.ss + (x.T @ x).double()
        if targets is not None:
            t = targets.to(x.dtype)
            self.st, self.sxt = self.st + t.double().sum(0), self.sxt + (x.T @ t).double()

    def covariance(self) -> torch.Tensor:
        """The centred covariance [C, C] of the inputs."""
        mu = self.s / max(self.n, 1)  # [C]
        return self.ss / max(self.n, 1) - torch.outer(mu, mu)

    def fit_sums(self, v: torch.Tensor, w: torch.Tensor | None = None) -> "FitSums":
        """The affine fit's sums for ``z = v x`` (``v`` [D, C]) against ``y = w x`` (``w`` [D, C], e.g. the
        projection's original weight) or, with ``w`` None, against the targets given to :meth:`add`; exact from
        the moments, so the fit needs no second pass over the tokens."""
        v = v.double()
        vs = v @ self.ss  # [D, C]
        if w is None:
            sy, szy = self.st, (v * self.sxt.T).sum(1)
        else:
            w = w.double()
            sy, szy = w @ self.s, (vs * w).sum(1)
        return FitSums(self.n, v @ self.s, sy, (vs * v).sum(1), szy)


def ridge_reconstruction(w: torch.Tensor, cov: torch.Tensor, keep: torch.Tensor, ridge: float) -> torch.Tensor:
    """The change ``Δ`` [D, K] of projection ``w``'s kept columns [D, C] → ``w[:, keep] + Δ`` that best predicts the
    removed columns' output ``W_R x_R`` from the kept inputs ``x_K``, by ridge least squares over the calibration
    tokens (``cov`` [C, C]: the centred input covariance; the affine refit that follows takes the mean):

        Δ = W_R C_RK (C_KK + λ·mean(diag C_KK)·I)⁻¹

    ``λ → 0`` is the unregularised least-squares (OBS) update SlimGPT's solver makes, which overfits the
    calibration text (bench/results/quality.md); ``λ → ∞`` no update. ``ridge`` is λ, relative to the mean kept
    input variance so that it means the same at every layer and scale."""
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, not {ridge}")
    kept = set(keep.tolist())
    gone = torch.tensor([c for c in range(cov.shape[0]) if c not in kept], dtype=torch.long)
    ckk, crk = cov[keep][:, keep], cov[gone][:, keep]  # [K, K], [R, K]
    reg = ridge * float(ckk.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(len(keep), dtype=cov.dtype, device=cov.device)
    b = torch.linalg.solve(ckk + reg * eye, crk.T)  # [K, R]
    return w.double()[:, gone] @ b.T  # [D, K]


def _ridge_refit(view_layer: nn.Module, i: int, stream: LayerStream, module: nn.Module, path: str,
                 keep: torch.Tensor, targets: list[torch.Tensor] | None, shrink: float, ridge: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of block ``i`` on ``stream`` gathers site ``path``'s input moments (with ``targets`` per batch,
    their cross moments too); :func:`ridge_reconstruction` is added to ``module``'s kept columns, then the affine
    fit of the updated kept output to the projection's original output (or the targets) comes from the same
    moments (:meth:`InputMoments.fit_sums`)."""
    moments, batch = InputMoments(), [0]

    def hook(site, args):
        moments.add(_flat(args[0]), None if targets is None else targets[batch[0]])  # [N, C]
        batch[0] += 1
    run_block(view_layer, i, stream, [(path, hook)])
    original = weight_rows(module)  # [D, C], before the update
    delta = ridge_reconstruction(original, moments.covariance(), keep, ridge)  # [D, K]
    axis = weight_axis(module, "in")
    with torch.no_grad():
        module.weight.index_add_(axis, keep.to(module.weight.device),
                                 (delta if axis == 1 else delta.T).to(module.weight.dtype))
    kept = torch.zeros_like(original)
    kept[:, keep] = weight_rows(module)[:, keep]  # [D, C]: the updated kept columns, zero where removed
    return moments.fit_sums(kept, original if targets is None else None).fit(shrink)


def _refit(view_layer: nn.Module, i: int, stream: LayerStream, module: nn.Module, path: str, keep: torch.Tensor,
           targets: list[torch.Tensor] | None, shrink: float, ridge: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The site's sequential refit, one block pass: with ``ridge`` (not None) the ridge reconstruction first and
    the affine fit to the projection's original outputs unless ``targets`` are given (:func:`_ridge_refit`),
    otherwise the affine fit alone (:func:`_fit_site`)."""
    if ridge is not None:
        return _ridge_refit(view_layer, i, stream, module, path, keep, targets, shrink, ridge)
    return _fit_site(view_layer, i, stream, path, keep, targets, shrink)


def plan_ridge(plan: Plan) -> float | None:
    """The ridge reconstruction's λ a plan asks its sequential refits for (provenance ``affine_ridge``), or None."""
    value = plan.provenance.get("affine_ridge")
    return None if value is None else float(value)


def _dense_site_outputs(layer: nn.Module, i: int, stream: LayerStream, paths: dict[str, str]
                        ) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
    """Layer ``i`` (unchanged) on the dense stream: per site, ``W x`` per batch, and the layer's outputs."""
    ys: dict[str, list[torch.Tensor]] = {s: [] for s in paths}

    def grab(site):
        return lambda module, args: ys[site].append(nn.functional.linear(_flat(args[0]).float(), weight_rows(module)))
    outputs = run_block(layer, i, stream, [(paths[s], grab(s)) for s in paths])
    return ys, outputs


def _fit_site(view_layer: nn.Module, i: int, stream: LayerStream, path: str, keep: torch.Tensor,
              targets: list[torch.Tensor] | None, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``y ≈ a·z + b`` at one site of the masked layer on the pruned stream; ``targets`` per batch (dense
    outputs) or None for the layer's own full output on the same inputs."""
    acc, batch = FitSums(), [0]

    def hook(module, args):
        inner = getattr(module, "inner", module)  # the masked view wraps the projection (InputSelect)
        x = _flat(args[0]).float()
        if targets is not None:  # the full output is not needed: only the kept one is fitted to the targets
            acc.add(kept_output(inner, x, keep), targets[batch[0]])
        else:
            acc.add(*kept_and_full(inner, x, keep))  # [N, D] each
        batch[0] += 1
    run_block(view_layer, i, stream, [(path, hook)])
    return acc.fit(shrink)


@register_compensator("affine_sequential")
def affine_sequential(model: nn.Module, plan: Plan, calibration: torch.Tensor, progress=None, shrink: float = 0.0,
                      target: str = "dense") -> None:
    """The affine refit calibrated block by block on the *pruned* model's activations, in place on ``model``.

    Each kept layer's output projections are refitted on the inputs that reach them once every earlier layer is
    pruned and already refitted (the official SlimLLM code's order), attention before MLP within a layer. The
    fitted ``y`` is, with ``target="dense"`` (default), the dense model's projection output on the dense
    activations, so each fit also corrects the error the earlier layers left; with ``target="local"``, the
    layer's own full output on the pruned activations (the official code's polyfit). Same two numbers per output
    dimension as :func:`affine`; 2-4 block passes per layer instead of one model pass.

    A plan whose provenance names ``affine_ridge`` (λ) first adds :func:`ridge_reconstruction` to each fitted
    projection's kept columns (same single block pass per site), then fits the affine refit to the projection's
    original output (``"local"``) or the dense one.
    """
    if target not in ("dense", "local"):
        raise ValueError(f"target must be 'dense' or 'local', not {target!r}")
    adapter, g = adapter_for(model), geometry_of(model)
    span = Span(context_of(progress), 0.0, 1.0)
    shrink, ridge = float(plan.provenance.get("affine_shrink", shrink)), plan_ridge(plan)
    sites = {"attn": adapter.attn_out, "mlp": adapter.mlp_out}
    layers = adapter.layers(model)
    keep = {(l, s): _kept_columns(g, plan, l, s) for l in plan.kept_blocks() for s in sites}
    keep = {k: v for k, v in keep.items() if v is not None and len(v)}  # a removed sub-block is dropped whole
    for l, s in keep:  # every fitted projection gets its bias before the view is cloned, so folds are shared
        ensure_bias(get_path(layers[l], sites[s]))
    with torch.inference_mode(), masking(model, plan) as view:
        dense = capture_inputs(model, calibration, DEFAULT_BATCH_SIZE)
        pruned = LayerStream(list(dense.hidden), dense.calls, dense.by_keyword)
        view_layers = adapter.layers(view)
        for i, layer in enumerate(layers):
            fitted = {s: sites[s] for s in sites if (i, s) in keep}
            ys = {}
            if target == "dense":  # layer i is still unchanged: its dense outputs first
                ys, dense.hidden = _dense_site_outputs(layer, i, dense, fitted)
            for s, path in fitted.items():
                module = get_path(layer, path)
                a, b = _refit(view_layers[i], i, pruned, module, path, keep[(i, s)], ys.get(s), shrink, ridge)
                _fold(module, a, b)
            pruned.hidden = run_block(view_layers[i], i, pruned, [])
            span.step((i + 1) / len(layers), f"sequential affine compensation: block {i + 1}/{len(layers)}")


@register_compensator("affine_local")
def affine_local(model: nn.Module, plan: Plan, calibration: torch.Tensor, progress=None) -> None:
    """:func:`affine_sequential` with ``target="local"``: the official SlimLLM code's fit (each projection's own
    full output on the pruned model's activations)."""
    affine_sequential(model, plan, calibration, progress, target="local")


# ---- the official order: channels chosen block by block on the pruned model ----------------------------------------

def _zero_inputs(module: nn.Module, cols: list[int]) -> None:
    """Zero the input columns ``cols`` of projection ``module``: the units reading them contribute nothing."""
    if cols:
        with torch.no_grad():
            module.weight.index_fill_(weight_axis(module, "in"), torch.tensor(cols, device=module.weight.device), 0)


def _refit_and_remove(layer: nn.Module, i: int, stream: LayerStream, path: str, keep: torch.Tensor,
                      total: int, ridge: float | None = None) -> None:
    """Local refit of projection ``path`` on ``stream`` (its own full output, see :func:`affine_local`; with
    ``ridge``, the ridge reconstruction first), then its removed input columns zeroed and the fit folded in: the
    block now computes what the sliced one will."""
    module = get_path(layer, path)
    a, b = _refit(layer, i, stream, module, path, keep, None, 0.0, ridge)
    kept = set(keep.tolist())
    _zero_inputs(module, [c for c in range(total) if c not in kept])
    _fold(module, a, b)


def sequential_channels(model: nn.Module, calib: Calibration, plan: Plan, batch_size: int = DEFAULT_BATCH_SIZE,
                        progress: Callable | None = None) -> Plan:
    """Re-choose each layer's removed MLP channels in the official SlimLLM order: block by block, the PCA channel
    score is taken on the activations of the model pruned *so far* (every earlier block pruned and refitted), the
    layer's lowest ``len(plan.removed("channel", l))`` channels are removed, the block is refitted
    (:func:`affine_local`) and its pruned outputs feed the next block.

    ``plan`` (an allocation: its per-layer channel counts, removed heads, KV groups and blocks) keeps everything
    but which channels; the result names ``compensation="affine_local"``, so :func:`pruneviz.surgery.apply_plan`
    with the same calibration rebuilds the model this pass computed (the plan's ``affine_ridge``, if any, is applied
    at every refit here as there). ``model`` is never changed (the pass works
    on its own copy). Plans that remove attention or MLP sub-blocks are refused (they have no channels to choose).
    """
    if plan.removed_sub_blocks():
        raise PlanError("sequential channel choice needs a plan without removed sub-blocks (BlockPruner plans "
                        "remove whole attention or MLP parts, which have no channels to choose)")
    adapter, g = adapter_for(model), geometry_of(model)
    span = Span(context_of(progress), 0.0, 1.0)
    ridge = plan_ridge(plan)
    work = resident_copy(model) if is_offloaded(model) else clone_model(model, share_weights=False)
    rows = channel_rows(adapter, g)
    layers = adapter.layers(work)
    with torch.inference_mode():
        stream = capture_inputs(work, calib.tokens, batch_size)
        for i, layer in enumerate(layers):
            if i in plan.blocks:  # a removed block passes its input through
                continue
            keep_a = _kept_columns(g, plan, i, "attn")
            if keep_a is not None:  # heads stay the plan's; their refit comes first, as in the compensator
                _refit_and_remove(layer, i, stream, adapter.attn_out, keep_a, g.n_heads * g.head_dim, ridge)
            k = len(plan.removed("channel", i))
            if k:
                pca = PcaSums()
                on_input, on_down = _pca_hooks(pca)
                run_block(layer, i, stream, [(adapter.mlp_modules[0], on_input), (adapter.mlp_out, on_down)])
                scores = pca_channel_score(layer, adapter, g, pca, rows)  # [C] on the pruned model's activations
                gone = torch.argsort(scores, stable=True)[:k].tolist()
                plan = plan.with_units("channel", i, plan.removed("channel", i), remove=False)
                plan = plan.with_units("channel", i, gone)
                _refit_and_remove(layer, i, stream, adapter.mlp_out, _kept_columns(g, plan, i, "mlp"), g.n_channels,
                                  ridge)
            stream.hidden = run_block(layer, i, stream, [])
            span.step((i + 1) / len(layers), f"sequential channel choice: block {i + 1}/{len(layers)}")
    return dataclasses.replace(plan, compensation="affine_local").with_provenance(channel_order="sequential")


# ---- layer ratios from the input/output cosine: the ``slimllm`` allocation strategy --------------------------------

def cosine_width(job: Job, layers: list[int], budget: float, plan: Plan) -> Allocation:
    """Per-layer ratios from the map's block cosines (:func:`pruneviz.schedules.cosine_ratios` with the map's
    ``alpha`` and ``pruned_layers``), unit totals from the budget as in the incremental strategy."""
    o, extras = job.options, job.imap.extras
    cos = extras.get("layer_cosine")
    if not isinstance(cos, list) or len(cos) != job.geometry.n_layers:
        raise PlanError(f"the slimllm strategy needs each block's input/output cosine, which the {job.imap.criterion} "
                        f"map lacks; score with the slimllm criterion")
    lads = ladders(job.imap, layers, job.costs, o.attn_unit, o.normalize)
    need_parts(lads, o.attn_share, job.imap)
    mean = min(budget / width_params(lads), MAX_LAYER_RATIO)
    n = max(1, round_half_up(float(extras.get("pruned_layers", 1.0)) * len(layers)))
    weights = cosine_ratios([cos[l] for l in layers], mean, float(extras.get("alpha", 10.0)), n, MAX_LAYER_RATIO)
    return ratio_width(job, lads, layers, budget, plan, weights, schedule="slimllm_cosine",
                       cosine_alpha=extras.get("alpha", 10.0), cosine_pruned_layers=n)


@register_allocator("slimllm")
def _slimllm_strategy(job: Job) -> Allocation:
    """SlimLLM: blocks whose output is most like their input lose the most (ratios from the cosine)."""
    if job.options.deployable == "stock":
        raise PlanError("deployable='stock' needs the same widths in every layer, which slimllm allocation does not "
                        "give; use strategy uniform, or deployable='vllm'")
    layers = width_layers(job.geometry.n_layers, job.options)
    if job.options.deployable == "vllm":
        return vllm_width(cosine_width, job, layers, job.budget, job.empty)
    return cosine_width(job, layers, job.budget, job.empty)


# ---- greedy swaps of the removed attention units -----------------------------------------------------------------

@dataclass
class UnitMoments:
    """Sums over calibration tokens of each unit's contribution ``o_u`` [D] to an output projection (fp64):
    ``m1`` [U, D] = ``Σ o_u`` and ``m2`` [U, U, D] = ``Σ o_u ⊙ o_v``, enough for ``corr(Σ_{u∈K} o_u, S)`` per
    output dimension for any kept set ``K`` (``S`` the sum over every unit)."""

    n: int
    m1: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def empty(cls, units: int, dim: int) -> "UnitMoments":
        z = torch.zeros
        return cls(0, z(units, dim, dtype=torch.float64), z(units, units, dim, dtype=torch.float64))

    def add(self, o: torch.Tensor) -> None:  # [N, U, D]
        o = o.double()
        self.n += o.shape[0]
        self.m1 += o.sum(0).cpu()
        self.m2 += torch.einsum("nud,nvd->uvd", o, o).cpu()

    def grouped(self, groups: torch.Tensor) -> "UnitMoments":
        """Moments of unit groups ``groups`` [G, k] (KV groups from query heads)."""
        p = torch.zeros(groups.shape[0], self.m1.shape[0], dtype=torch.float64)  # [G, U]
        p.scatter_(1, groups, 1.0)
        return UnitMoments(self.n, p @ self.m1, torch.einsum("gu,uvd,hv->ghd", p, self.m2, p))

    def _objective(self, ek: torch.Tensor, ekk: torch.Tensor, eks: torch.Tensor) -> torch.Tensor:
        """``Σ_d |corr(K_d, S_d)|`` from sums of ``K``, ``K²``, ``K·S`` ([..., D]): [...] (0 where a variance is 0)."""
        n = max(self.n, 1)
        es, ess = self.m1.sum(0) / n, self.m2.sum((0, 1)) / n  # [D]
        ek, ekk, eks = ek / n, ekk / n, eks / n
        cov = eks - ek * es
        den = ((ekk - ek * ek).clamp_min(0) * (ess - es * es).clamp_min(0)).sqrt()
        return torch.where(den > 0, cov / den.clamp_min(1e-300), torch.zeros_like(cov)).abs().sum(-1)

    def objective(self, kept: torch.Tensor) -> float:
        """SlimLLM's set objective (higher = better set to keep) for the kept mask ``kept`` [U] (bool)."""
        k = kept.double()
        mk = torch.einsum("uvd,v->ud", self.m2, k)  # [U, D]
        return float(self._objective(k @ self.m1, k @ mk, k @ self.m2.sum(1)))

    def swap_objectives(self, kept: torch.Tensor, i: int, js: list[int]) -> torch.Tensor:
        """The objective after keeping removed unit ``i`` instead of each kept unit ``j`` of ``js``: [len(js)].
        With ``k' = k + e_i − e_j``: ``k'ᵀMk' = kᵀMk + 2(Mk)_i − 2(Mk)_j + M_ii + M_jj − 2M_ij``."""
        k = kept.double()
        mk = torch.einsum("uvd,v->ud", self.m2, k)  # [U, D]
        ms = self.m2.sum(1)  # [U, D] Σ o_u S
        j = torch.tensor(js, dtype=torch.long)
        ek = (k @ self.m1 + self.m1[i]) - self.m1[j]  # [J, D]
        ekk = (k @ mk + 2 * mk[i] + self.m2[i, i]) - 2 * mk[j] + self.m2[j, j] - 2 * self.m2[i, j]
        eks = (k @ ms + ms[i]) - ms[j]
        return self._objective(ek, ekk, eks)


@dataclass
class SwapResult:
    """Removed units after the search, the objective before and after, swaps made, and whether it converged (no
    single swap improves the objective)."""

    removed: tuple[int, ...]
    before: float
    after: float
    swaps: int
    converged: bool


def swap_search(mom: UnitMoments, removed: list[int], partners: Callable[[int], list[int]] | None = None,
                fixed: frozenset[int] = frozenset(), max_rounds: int = 100) -> SwapResult:
    """SlimLLM's greedy search: for each removed unit in turn, the best swap with a kept unit (``partners(i)``,
    default all) is made when it raises the objective of the *kept set*; passes repeat until one makes no swap
    (a local optimum under single swaps) or ``max_rounds`` passes (the official code makes one). ``fixed`` units
    are removed and never swapped (heads of removed KV groups). Ties go to the lower unit index."""
    units = mom.m1.shape[0]
    kept = torch.ones(units, dtype=torch.bool)
    kept[list(removed) + list(fixed)] = False
    cur = before = mom.objective(kept)
    order, swaps = list(removed), 0
    partners = partners or (lambda i: list(range(units)))
    for _ in range(max_rounds):
        changed = False
        for pos, i in enumerate(order):
            js = [j for j in partners(i) if kept[j] and j not in fixed]
            if not js:
                continue
            vals = mom.swap_objectives(kept, i, js)
            best = int(torch.argmax(vals))  # first maximum: the lowest index
            if float(vals[best]) > cur + 1e-12 * max(1.0, abs(cur)):
                j = js[best]
                kept[i], kept[j], order[pos] = True, False, j
                cur, swaps, changed = float(vals[best]), swaps + 1, True
        if not changed:
            return SwapResult(tuple(sorted(order)), before, cur, swaps, True)
    return SwapResult(tuple(sorted(order)), before, cur, swaps, False)


def _attention_moments(layer: nn.Module, i: int, stream: LayerStream, adapter, g) -> tuple[UnitMoments, list]:
    """Per-head moments of layer ``i``'s attention output on the stream, and the block's outputs."""
    mom = UnitMoments.empty(g.n_heads, g.hidden)
    heads = _groups(g, "heads")

    def hook(module, args):
        x, w = _flat(args[0]), weight_rows(module)  # [N, H·hd], [D, H·hd]
        for rows in x.split(TOKEN_CHUNK):
            mom.add(_unit_contributions(w, rows, heads))  # [n, H, D]
    return mom, run_block(layer, i, stream, [(adapter.attn_out, hook)])


def refine_layer(mom: UnitMoments, plan: Plan, l: int, max_rounds: int) -> tuple[Plan, dict]:
    """Swaps in layer ``l``: between removed and kept KV groups (if the plan removes groups there), then between
    removed and kept query heads of the same KV group (if it removes heads; counts per group stay equal)."""
    g, record = plan.geometry, {}
    kv = list(plan.removed("kv", l))
    if kv and len(kv) < g.n_kv:
        res = swap_search(mom.grouped(torch.arange(g.n_heads).view(g.n_kv, g.group_size)), kv,
                          max_rounds=max_rounds)
        plan = plan.with_units("kv", l, kv, remove=False).with_units("kv", l, res.removed)
        record["kv"] = _record(res)
    heads = list(plan.removed("head", l))
    if heads:
        gone = frozenset(h for grp in plan.removed("kv", l) for h in g.heads_of(grp))
        res = swap_search(mom, heads, lambda h: list(g.heads_of(g.kv_of(h))), gone, max_rounds)
        plan = plan.with_units("head", l, heads, remove=False).with_units("head", l, res.removed)
        record["head"] = _record(res)
    return plan, record


def _record(res: SwapResult) -> dict:
    return {"before": round(res.before, 6), "after": round(res.after, 6), "swaps": res.swaps,
            "converged": res.converged}


def refine_heads(model: nn.Module, calib: Calibration, plan: Plan, max_rounds: int = 100,
                 batch_size: int = DEFAULT_BATCH_SIZE, progress: Callable | None = None) -> Plan:
    """``plan`` with each kept layer's removed attention units improved by SlimLLM's greedy swaps
    (:func:`swap_search` on the set objective ``Σ_d |corr(Σ_{kept} o_u,d, S_d)|``, dense calibration activations
    through the capture engine, so offloaded models work). Unit counts per layer (and per KV group) do not change,
    so the parameter count does not either; what each layer's search did goes to ``provenance["slimllm_swaps"]``."""
    adapter, g = adapter_for(model), geometry_of(model)
    todo = [l for l in plan.kept_blocks() if plan.removed("head", l)
            or 0 < len(plan.removed("kv", l)) < g.n_kv]
    if not todo:
        return plan.with_provenance(slimllm_swaps={})
    span, records = Span(context_of(progress), 0.0, 1.0), {}
    with torch.inference_mode():
        view, stream = blocks_stream(model, calib.tokens, batch_size)
        layers = adapter.layers(view)
        for i in range(max(todo) + 1):
            if i in todo:
                mom, outputs = _attention_moments(layers[i], i, stream, adapter, g)
                plan, records[i] = refine_layer(mom, plan, i, max_rounds)
            else:
                outputs = run_block(layers[i], i, stream, [])
            stream.hidden = outputs
            span.step((i + 1) / (max(todo) + 1), f"SlimLLM swaps: block {i + 1}/{max(todo) + 1}")
    return plan.with_provenance(slimllm_swaps=records)


# ---- the whole method ------------------------------------------------------------------------------------------------

def slimllm_prune_to(model: nn.Module, calib: Calibration, target: Target | float, strategy: str = "slimllm",
                     attn_unit: str = "kv", compensation: str | None = "affine", swaps: bool = True,
                     swap_rounds: int = 100, criterion_options: dict | None = None, progress: Callable | None = None,
                     **alloc_options) -> tuple[Plan, nn.Module]:
    """SlimLLM end to end: score (:class:`SlimLLM`, PCA channels by default), allocate ``target`` with
    ``strategy`` (default the cosine ratios), refine the removed heads/KV groups by greedy swaps
    (:func:`refine_heads`), build with ``compensation`` (default the affine refit). Returns ``(plan, pruned)``;
    the plan lands at or under the target like every allocation (swaps keep the counts) and passes
    ``validate(model, physical=True)``. ``alloc_options`` are :class:`pruneviz.allocate.AllocOptions` fields,
    ``criterion_options`` :class:`SlimLLMOptions` fields."""
    from ..importance import compute, make_options
    from ..surgery import apply_plan

    opts = make_options("slimllm", **(criterion_options or {}))
    imap = compute(model, "slimllm", calib, opts)
    plan = allocate(model, imap, target, strategy=strategy, compensation=compensation, attn_unit=attn_unit,
                    **alloc_options)
    if swaps:
        plan = refine_heads(model, calib, plan, swap_rounds, opts.batch_size, progress)
    plan = plan.with_provenance(solver="slimllm", paper=PAPER, swaps=swaps, swap_rounds=swap_rounds).validate(model)
    pruned = apply_plan(model, plan, calibration=calib.tokens if compensation else None)
    return plan, pruned
