"""SlimLLM (Guo et al., ICML 2025, code ``guojialong1/Slimllm``): head removal by output correlation, and the
per-dimension affine compensation, for any plan.

**Head score.** Per layer, the attention output is the sum of its heads' contributions,
``S = Σ_h o_h`` with ``o_h = x_h · W_o[:, h]`` (``x_h`` the head's ``head_dim`` inputs of the output
projection). Removing head ``h`` leaves ``S − o_h``; SlimLLM keeps the heads whose removal would change the
*direction* of the output most, measured per output dimension ``d`` by the Pearson correlation over calibration
tokens, ``ρ_d(h) = corr(S_d − o_{h,d}, S_d)``, summed as ``Σ_d |ρ_d(h)|``: a head whose removal leaves the
output highly correlated with the dense one is safe to remove. The importance here is ``Σ_d (1 − |ρ_d(h)|)``
(higher = keep). GQA (the paper has none): a KV group's contribution is the sum of its query heads'
(``o_g = Σ_{h∈g} o_h``) and is scored the same way. MLP channels are scored by the same correlation of the down
projection's output with and without the channel (``o_c = act_c · W_d[:, c]``): SlimLLM's PCA-weighted channel
norm is not reproduced (choice; the correlation score keeps one reading for both structures). SlimLLM's greedy
head swaps are not run: allocation ranks the scores.

**Affine compensation** (compensator ``"affine"``, usable with a plan from any criterion): for each output
projection of a kept layer that loses units, every output dimension ``d`` is refitted by least squares over the
calibration tokens, ``y_d ≈ a_d · z_d + b_d``, where ``y`` is the dense projection output and ``z`` the output
from the kept inputs only (the paper's ``np.polyfit`` of degree 1), and ``a_d``, ``b_d`` are folded into the
projection's weight rows and bias. FLAP's bias compensation is the special case ``a_d = 1``. Statistics come from
one pass of the dense model (every layer sees dense inputs, as in FLAP); the projection gains a bias where it had
none (counted by :meth:`pruneviz.plan.Plan.param_count`). ``shrink`` (default 0) pulls ``a_d`` toward 1 as a
ridge penalty ``λ = shrink · var(z_d)`` on ``a_d − 1``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch import adapter_for, geometry_of, get_path, weight_axis
from ..importance import Calibration, Context, Criterion, ImportanceMap, register
from ..offload import clone_model, execution_device
from ..plan import Plan
from ..progress import Span, context_of
from ..surgery import register_compensator
from .stats import DEFAULT_BATCH_SIZE, token_batches

PAPER = "SlimLLM, Guo et al., ICML 2025"
UNIT_CHUNK = 64  # units whose contributions [tokens, units, hidden] are materialised at once


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


def _unit_contributions(module: nn.Module, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per-unit contributions ``[N, k, D]`` to ``module``'s output of input columns grouped by ``groups`` [k, w]."""
    w = module.weight.detach().float()  # Linear [D, in]
    xs = x.float()[:, groups]  # [N, k, w]
    return torch.einsum("nkw,dkw->nkd", xs, w[:, groups])


# ---- the criterion ----------------------------------------------------------------------------------------------

@dataclass
class SlimLLMOptions:
    """batch_size: calibration windows per forward pass."""

    batch_size: int = DEFAULT_BATCH_SIZE


def _groups(g, kind: str) -> torch.Tensor:
    """Input columns of the output projection per unit: heads [H, hd], KV groups [G, gs·hd], channels [C, 1]."""
    if kind == "channels":
        return torch.arange(g.n_channels).view(-1, 1)
    cols = torch.arange(g.n_heads * g.head_dim).view(g.n_heads, g.head_dim)  # [H, hd]
    return cols if kind == "heads" else cols.view(g.n_kv, -1)


def removal_correlations(model: nn.Module, calib: Calibration, batch_size: int, span: Span) -> dict:
    """``Σ_d |corr(S_d − o_{u,d}, S_d)|`` per unit: {"heads": [L, H], "kv": [L, G], "channels": [L, C]}."""
    adapter, g = adapter_for(model), geometry_of(model)
    view = clone_model(model, share_weights=True)  # hooks live on this call's own clone
    layers = adapter.layers(view)
    plan = {"heads": adapter.attn_out, "kv": adapter.attn_out, "channels": adapter.mlp_out}
    sums = {(l, m): PairSums() for l in range(g.n_layers) for m in plan}
    groups = {m: _groups(g, m) for m in plan}

    def hook_for(l, maps):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])  # [N, in]
            total = nn.functional.linear(x.float(), module.weight.float())  # [N, D] (bias cancels in corr)
            for m in maps:
                for chunk in groups[m].split(UNIT_CHUNK):  # bounded memory: [N, chunk, D] at a time
                    contrib = _unit_contributions(module, x, chunk)  # [N, k, D]
                    sums[(l, m)].add(total[:, None] - contrib, total, offset=int(chunk[0, 0]) // chunk.shape[1],
                                     units=groups[m].shape[0])
        return hook

    handles = []
    for l, layer in enumerate(layers):
        handles.append(get_path(layer, adapter.attn_out).register_forward_pre_hook(hook_for(l, ("heads", "kv"))))
        handles.append(get_path(layer, adapter.mlp_out).register_forward_pre_hook(hook_for(l, ("channels",))))
    try:
        device = execution_device(view)
        batches = list(token_batches(calib, batch_size, device))
        with torch.inference_mode():
            for i, batch in enumerate(batches):
                view(input_ids=batch, use_cache=False)
                span.step((i + 1) / len(batches), f"SlimLLM correlations: batch {i + 1}/{len(batches)}")
    finally:
        for h in handles:
            h.remove()
    return {m: torch.stack([sums[(l, m)].corr().abs().sum(-1) for l in range(g.n_layers)]).float()
            for m in plan}


@register
class SlimLLM(Criterion):
    name = "slimllm"
    title = "SlimLLM removal correlation"
    paper = PAPER
    produces = ("heads", "kv", "channels")
    Options = SlimLLMOptions

    def score(self, model: nn.Module, calib: Calibration, options: SlimLLMOptions, ctx: Context) -> ImportanceMap:
        g = geometry_of(model)
        corr = removal_correlations(model, calib, options.batch_size, Span(ctx, 0.0, 1.0))
        maps = {m: g.hidden - c for m, c in corr.items()}  # Σ_d (1 − |ρ_d|): higher = keep
        return ImportanceMap(self.name, g, **maps,
                             extras={"higher_is": "more change of the output's direction when removed"})


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
        if getattr(module, "bias", None) is None:
            module.bias = nn.Parameter(torch.zeros(a.shape[0], dtype=w.dtype, device=w.device),
                                       requires_grad=w.requires_grad)
        module.bias.add_(b.to(w.dtype))


@register_compensator("affine")
def affine(model: nn.Module, plan: Plan, calibration: torch.Tensor, progress=None, shrink: float = 0.0) -> None:
    """SlimLLM's per-dimension affine refit of every output projection that loses units, in place on ``model``
    (the dense-shaped copy about to be sliced); see the module docstring."""
    adapter, g = adapter_for(model), geometry_of(model)
    span = Span(context_of(progress), 0.0, 1.0)
    sites = {"attn": adapter.attn_out, "mlp": adapter.mlp_out}
    keep = {(l, s): _kept_columns(g, plan, l, s) for l in plan.kept_blocks() for s in sites}
    keep = {k: v for k, v in keep.items() if v is not None}
    sums = {k: FitSums() for k in keep}
    layers = adapter.layers(model)

    def hook_for(key):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # [N, in]
            w = module.weight.detach().float()
            y = nn.functional.linear(x, w)  # [N, D]
            z = nn.functional.linear(x[:, keep[key]], w[:, keep[key]])  # [N, D]
            sums[key].add(z, y)
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
