"""Optimal Brain Surgeon for whole input columns of one linear layer: the numerical core of SlimGPT.

SlimGPT (Ling et al., NeurIPS 2024, arXiv 2412.18110) prunes the *input columns* of a layer's output
projections (attention heads = blocks of ``head_dim`` columns, MLP channels = single columns) and compensates the
surviving columns so that the layer output ``W X`` changes as little as possible on calibration inputs ``X``.
With ``H = (2/N) Σ x xᵀ`` (``N`` calibration sequences) the layer-wise loss is ``‖(W − Ŵ) X‖² / N`` and removing
a column set ``S`` with the optimal update of the other columns costs and does (block OBS, Eq. 2-4 of the paper)::

    ΔE = ½ Σ_rows W_{r,S} [(H⁻¹)_SS]⁻¹ W_{r,S}ᵀ           ΔW = − W_{:,S} [(H⁻¹)_SS]⁻¹ (H⁻¹)_{S,:}

The paper computes the same thing column by column through the upper Cholesky factor ``U`` of the permuted
``H⁻¹`` (its Algorithm 1, "grouped Cholesky"): ``E = W_S U_SS⁻¹`` and ``ΔE = ½‖E‖²``. :func:`obs_remove` uses the
closed form (one Cholesky solve); :func:`obs_remove_sequential` is the paper's loop, kept to show (and test) that
the two agree. After a removal the pruned coordinates are *decoupled* in ``H`` (``H[p,:] = H[:,p] = 0``,
``H[p,p] = 1``), so ``H⁻¹`` restricted to the survivors is exactly the inverse of the survivors' Hessian.

Everything here is fp32 and device-agnostic; weights are ``[rows, cols] = [out, in]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import CriterionError

HEAD_ERRORS = ("exact", "paper")


class Hessian:
    """Running ``H = (2/N)·Σ x xᵀ`` over ``N`` sequences in fp32, scaled as SlimGPT's ``add_batch``."""

    def __init__(self, n_in: int, device):
        self.H = torch.zeros(n_in, n_in, dtype=torch.float32, device=device)  # [in, in]
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of module inputs ``x`` ([b, T, in], or [T, in] for one sequence)."""
        b = x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, x.shape[-1]).float()  # [b*T, in]
        self.H.mul_(self.n / (self.n + b))
        self.n += b
        x = x * math.sqrt(2.0 / self.n)
        self.H.addmm_(x.t(), x)


def inverse(H: torch.Tensor) -> torch.Tensor:
    """``H⁻¹`` of a symmetric positive definite matrix through its Cholesky factor (fp32)."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise CriterionError("the calibration Hessian is not positive definite (too few calibration tokens for "
                             "the layer width, or no damping); raise percdamp (e.g. 0.01) or add calibration text")
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.cholesky_solve(eye, L)  # on CPU several times faster than torch.cholesky_inverse


@dataclass
class ObsProblem:
    """One layer's column-pruning state: weights, damped Hessian, and which inputs ever carried signal.

    ``W`` and ``H`` are updated in place by :meth:`remove`. ``live`` marks inputs with ``diag(H) > 0`` on the
    calibration data; dead inputs (always zero) get ``H_pp = 1`` so ``H`` stays invertible, and their weights count
    as zero in every error (removing an input that never fires costs nothing). Unlike SlimGPT's code, the weights
    of dead inputs are not zeroed unless their unit is removed, so kept units keep their weights.
    """

    W: torch.Tensor  # [rows, cols] fp32 (or fp64)
    H: torch.Tensor  # [cols, cols] same dtype, damped, pruned coordinates decoupled
    live: torch.Tensor  # [cols] bool

    @classmethod
    def build(cls, W: torch.Tensor, H: torch.Tensor, percdamp: float) -> "ObsProblem":
        """Copy ``W`` and ``H`` (upcast to at least fp32), fix dead inputs, add ``percdamp · mean(diag H) · I``."""
        dtype = torch.promote_types(torch.promote_types(W.dtype, H.dtype), torch.float32)
        W, H = W.detach().to(dtype, copy=True), H.detach().to(dtype, copy=True)
        diag = H.diagonal()  # view: edits go into H
        live = diag != 0
        diag[~live] = 1.0
        if percdamp > 0:
            diag.add_(percdamp * diag.mean())
        return cls(W, H, live)

    def hinv(self) -> torch.Tensor:
        return inverse(self.H)  # [cols, cols]

    def scored_weights(self) -> torch.Tensor:
        return self.W * self.live  # [rows, cols], dead inputs count as zero

    def block_errors(self, hinv: torch.Tensor, blocks: torch.Tensor, exact: bool = True) -> torch.Tensor:
        """OBS error of removing each block of columns alone, see :func:`block_errors`."""
        return block_errors(self.scored_weights(), hinv, blocks, exact)

    def column_errors(self, hinv: torch.Tensor) -> torch.Tensor:
        """``½ Σ_rows W_{:,p}² / [H⁻¹]_pp`` per column ([cols]): the single-column OBS error (Eq. 4)."""
        return 0.5 * self.scored_weights().pow(2).sum(0) / hinv.diagonal()

    def remove(self, cols: torch.Tensor, hinv: torch.Tensor, downdate: bool = False) -> torch.Tensor | None:
        """Remove columns ``cols`` with OBS compensation of the others; decouple them in ``H``.

        Returns the inverse Hessian of the reduced problem when ``downdate`` (computed by the OBS downdate
        ``H⁻¹ − H⁻¹_{:,S}[(H⁻¹)_SS]⁻¹H⁻¹_{S,:}`` instead of a new inversion), else None.
        """
        self.W = obs_remove(self.W, hinv, cols)
        self.H[cols, :] = 0
        self.H[:, cols] = 0
        self.H[cols, cols] = 1.0
        return hinv_downdate(hinv, cols) if downdate else None


def block_errors(W: torch.Tensor, hinv: torch.Tensor, blocks: torch.Tensor, exact: bool = True) -> torch.Tensor:
    """Error ``ΔE`` of removing each block of columns on its own, all blocks at once ([n_blocks]).

    ``blocks`` is ``[n_blocks, k]`` column indices. Grouped Cholesky (SlimGPT Algorithm 1, step 1): ``U`` = upper
    Cholesky factor of each diagonal block ``(H⁻¹)_BB``. ``exact=True`` solves ``E = W_B U⁻¹`` (the columns of a
    block compensate each other while being removed) and equals the block closed form exactly; ``exact=False``
    is the paper's shortcut ``E = W_B / diag(U)`` ("W is not updated within a head").
    """
    Hb = hinv[blocks[:, :, None], blocks[:, None, :]]  # [n, k, k]
    U = torch.linalg.cholesky(Hb, upper=True)  # [n, k, k]
    Wb = W[:, blocks].permute(1, 0, 2)  # [n, rows, k]
    if exact:
        E = torch.linalg.solve_triangular(U, Wb, upper=True, left=False)  # [n, rows, k] = W_B U⁻¹
    else:
        E = Wb / U.diagonal(dim1=-2, dim2=-1)[:, None, :]  # [n, rows, k]
    return 0.5 * E.pow(2).sum((1, 2))  # [n]


def block_obs_error(W: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Closed form ``ΔE = ½ Σ_rows W_{r,S} [(H⁻¹)_SS]⁻¹ W_{r,S}ᵀ`` for one column set ``S`` (a scalar)."""
    Ws = W[:, cols]  # [rows, k]
    M = hinv[cols][:, cols]  # [k, k]
    return 0.5 * (Ws * torch.linalg.solve(M, Ws.t()).t()).sum()


def obs_remove(W: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``W − W_{:,S} [(H⁻¹)_SS]⁻¹ (H⁻¹)_{S,:}`` with ``W_{:,S} = 0`` exactly: optimal removal of columns ``S``.

    Equals removing the columns one at a time with SlimGPT's sequential OBS updates, and equals the
    least-squares refit of the surviving columns on the calibration inputs.
    """
    L = torch.linalg.cholesky(hinv[cols][:, cols])  # [k, k]
    coef = torch.cholesky_solve(hinv[cols, :], L)  # [k, cols] = (H⁻¹)_SS⁻¹ (H⁻¹)_{S,:}
    W = W - W[:, cols] @ coef  # [rows, cols]
    W[:, cols] = 0
    return W


def obs_remove_sequential(W: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """SlimGPT Algorithm 1 step 2, verbatim: remove ``cols`` column by column through the upper Cholesky factor.

    Kept as the reference for :func:`obs_remove` (they agree to rounding).
    """
    n, k, gone = W.shape[1], len(cols), set(cols.tolist())
    rest = torch.tensor([c for c in range(n) if c not in gone], dtype=torch.long, device=W.device)
    perm = torch.cat([cols.to(W.device), rest])  # [cols]: the removed ones first
    Wp = W[:, perm].clone()
    U = torch.linalg.cholesky(hinv[perm][:, perm], upper=True)[:k]  # [k, cols]
    W1, err = Wp[:, :k].clone(), torch.zeros_like(Wp[:, :k])  # [rows, k]
    for i in range(k):
        err[:, i] = W1[:, i] / U[i, i]
        W1[:, i:] -= err[:, i:i + 1] @ U[i:i + 1, i:k]  # local update inside the block
    Wp[:, :k] = 0
    Wp[:, k:] -= err @ U[:, k:]  # global update of the surviving columns
    return Wp[:, torch.argsort(perm)]


def hinv_downdate(hinv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Inverse of the Hessian with ``cols`` decoupled, from the old inverse (OBS Eq. 3, block form)."""
    L = torch.linalg.cholesky(hinv[cols][:, cols])  # [k, k]
    new = hinv - hinv[:, cols] @ torch.cholesky_solve(hinv[cols, :], L)  # [cols, cols]
    new[cols, :] = 0
    new[:, cols] = 0
    new[cols, cols] = 1.0
    return new


# ---- greedy selection -------------------------------------------------------------------------------------------

def _argmin_allowed(err: torch.Tensor, allowed: torch.Tensor) -> int:
    if not bool(allowed.any()):
        raise CriterionError("SlimGPT ran out of prunable units in a layer; lower the pruning ratio")
    return int(torch.where(allowed, err, torch.full_like(err, math.inf)).argmin())


def greedy_blocks(prob: ObsProblem, blocks: torch.Tensor, n_remove: int, eligible: torch.Tensor | None = None,
                  owner: torch.Tensor | None = None, quota: torch.Tensor | None = None,
                  exact: bool = True) -> list[int]:
    """Batched greedy block pruning (SlimGPT attention): one block per iteration, lowest error first.

    Each iteration inverts the current ``H``, scores every still-allowed block with :func:`block_errors` on the
    compensated weights, removes the cheapest with OBS compensation and decouples it. ``eligible`` ([n_blocks]
    bool) restricts the candidates; ``owner``/``quota`` (block -> group, removals allowed per group) force equal
    per-group counts. Mutates ``prob``; returns the removed block indices in removal order.
    """
    allowed = torch.ones(len(blocks), dtype=torch.bool) if eligible is None else eligible.clone().cpu()
    left = None if quota is None else quota.clone().cpu()
    picked = []
    for _ in range(n_remove):
        hinv = prob.hinv()
        err = prob.block_errors(hinv, blocks, exact).cpu()  # [n_blocks]
        ok = allowed if left is None else allowed & (left[owner.cpu()] > 0)
        b = _argmin_allowed(err, ok)
        prob.remove(blocks[b], hinv)
        allowed[b] = False
        if left is not None:
            left[owner[b]] -= 1
        picked.append(b)
    return picked


def dgs_sizes(n_remove: int, min_group: int = 64, max_group: int = 1024) -> list[int]:
    """SlimGPT's Dynamic Group Size schedule for MLP columns, as in the official code.

    ``bs = (target − 512) // 2``; each step removes ``min(remaining, max(bs, min_group), max_group)`` columns, then
    ``bs = (bs − 512) // 2``. LLaMA-7B's FFN at 20% (2202 columns) gives 845, 166, 64, 64, ...
    """
    sizes, done, bs = [], 0, (n_remove - 512) // 2
    while done < n_remove:
        cnt = min(n_remove - done, max(bs, min_group), max_group)
        sizes.append(cnt)
        done += cnt
        bs = (bs - 512) // 2
    return sizes


def greedy_columns(prob: ObsProblem, sizes: list[int], eligible: torch.Tensor | None = None,
                   downdate: bool = False) -> list[int]:
    """Greedy column pruning in groups (SlimGPT FFN): per step, the ``cnt`` lowest-error columns, OBS-compensated.

    Within a group the removal is the joint block OBS update (equal to SlimGPT's sequential column loop).
    ``H⁻¹`` is recomputed each step, or downdated when ``downdate`` (cheap for group size 1). Ties are broken
    by column index. Mutates ``prob``; returns the removed columns (each group sorted) in removal order.
    """
    n = prob.W.shape[1]
    allowed = torch.ones(n, dtype=torch.bool) if eligible is None else eligible.clone().cpu()
    hinv, picked = None, []
    for cnt in sizes:
        if hinv is None or not downdate:
            hinv = prob.hinv()
        err = torch.where(allowed, prob.column_errors(hinv).cpu(), torch.full((n,), math.inf))  # [cols]
        if int(allowed.sum()) < cnt:
            raise CriterionError("SlimGPT ran out of prunable MLP channels in a layer; lower the pruning ratio")
        cols = torch.sort(err, stable=True).indices[:cnt].sort().values  # [cnt]
        hinv = prob.remove(cols.to(prob.W.device), hinv, downdate)
        allowed[cols] = False
        picked += cols.tolist()
    return picked
