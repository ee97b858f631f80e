"""Fidelity of a pruned model to its dense parent: KL divergence, top-1 agreement and perplexity ratio.

Perplexity only says how well a model predicts a text, so it depends on how well the text matches the model's
domain. Fidelity compares the two models' next-token distributions token by token, the measure quantisation tools
report (llama.cpp's ``perplexity --kl-divergence``; "KLD" in the GPTQ/AWQ evaluations): a pruned model that keeps
the dense distributions has KL 0 and top-1 agreement 1 on any text.

The tokens scored are exactly those of :func:`pruneviz.evaluate.perplexity` under the same protocol (same
windows from :func:`pruneviz.evaluate.eval_windows`, same BOS handling, token 0 of each window not predicted), so
``ppl_dense`` equals ``perplexity(dense, ...).ppl`` and the ratio is the one of the Evaluate page.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import TextError, is_oom, oom_advice
from .evaluate import PPLProtocol, eval_windows, get_protocol
from .limits import check_context
from .offload import execution_device
from .progress import Cancel, Progress
from .surgery import masked_model

__all__ = ["FidelityResult", "fidelity", "token_fidelity", "with_fidelity"]


@dataclass
class FidelityResult:
    """KL(dense || pruned) of the next-token distributions and related numbers, under ``protocol``.

    * ``kl_mean``: mean over scored tokens of ``sum_v p_dense(v) (log p_dense(v) - log p_pruned(v))`` (nats).
    * ``kl_p99``: 99th percentile of the per-token KL (linear interpolation, as ``torch.quantile``).
    * ``top1_agreement``: fraction of scored tokens whose argmax next token is the same in both models.
    * ``ppl_dense`` / ``ppl_pruned``: perplexity of each model on the same tokens; ``ppl_ratio`` = pruned / dense.
    * ``per_token_kl``: the per-token KL of every scored token, ``[n_tokens]`` CPU float32, window by window.

    ``complete`` is False when cancelled early; the numbers then cover the ``n_windows`` windows done (of
    ``n_windows_total``); with no window done they are ``nan``.
    """

    kl_mean: float
    kl_p99: float
    top1_agreement: float
    ppl_dense: float
    ppl_pruned: float
    ppl_ratio: float
    n_tokens: int
    n_windows: int
    n_windows_total: int
    protocol: PPLProtocol
    seconds: float
    complete: bool = True
    per_token_kl: torch.Tensor | None = None

    @property
    def protocol_text(self) -> str:
        return self.protocol.describe()

    def describe(self) -> str:
        """One line for the CLI and the app: KL, top-1, PPL ratio, token count and protocol."""
        part = "" if self.complete else f" (PARTIAL: {self.n_windows}/{self.n_windows_total} windows)"
        return (
            f"KL(dense||pruned) mean {self.kl_mean:.4f} nats, p99 {self.kl_p99:.4f}; top-1 agreement "
            f"{100 * self.top1_agreement:.2f}%; PPL {self.ppl_dense:.3f} -> {self.ppl_pruned:.3f} "
            f"(x{self.ppl_ratio:.3f}){part} over {self.n_tokens} tokens. {self.protocol.describe()}"
        )


def token_fidelity(dense_logits: torch.Tensor, pruned_logits: torch.Tensor, targets: torch.Tensor):
    """Per-position fidelity of two models' logits.

    ``dense_logits`` and ``pruned_logits`` are ``[N, V]`` (any float dtype, same device), ``targets`` ``[N]`` the
    next tokens. Log-softmax is taken in fp32. Returns ``(kl [N], agree [N] bool, nll_dense [N], nll_pruned [N])``
    with ``kl = sum_v p_d (log p_d - log p_p)``, clamped at 0 (fp32 rounding can give -1e-8 for equal rows).
    """
    lp_d = F.log_softmax(dense_logits.float(), dim=-1)  # [N, V]
    lp_p = F.log_softmax(pruned_logits.float(), dim=-1)  # [N, V]
    kl = F.kl_div(lp_p, lp_d, reduction="none", log_target=True).sum(-1).clamp_min(0.0)  # [N]
    agree = lp_d.argmax(-1) == lp_p.argmax(-1)  # [N]
    idx = targets.view(-1, 1)  # [N, 1]
    nll_d = -lp_d.gather(-1, idx).squeeze(-1)  # [N]
    nll_p = -lp_p.gather(-1, idx).squeeze(-1)  # [N]
    return kl, agree, nll_d, nll_p


def _scored_logits(model, batch: torch.LongTensor, first: list[int], device: torch.device) -> torch.Tensor:
    """The logits of ``model`` on ``batch`` [B, T] at the scored positions, concatenated: ``[N, V]`` on ``device``.

    Position ``t`` predicts token ``t + 1``; window ``j`` scores targets ``first[j] .. T-1``, i.e. logits
    ``first[j] - 1 .. T-2``.
    """
    logits = model(input_ids=batch.to(execution_device(model)), use_cache=False).logits  # [B, T, V]
    rows = [logits[j, first[j] - 1 : -1] for j in range(batch.shape[0])]  # each [n_j, V]
    return torch.cat(rows).to(device)  # [N, V]


def _check_vocab(dense_logits: torch.Tensor, pruned_logits: torch.Tensor) -> None:
    if dense_logits.shape[-1] != pruned_logits.shape[-1]:
        raise TextError(
            f"The two models predict over different vocabularies ({dense_logits.shape[-1]} vs "
            f"{pruned_logits.shape[-1]} logits), so their next-token distributions cannot be compared. "
            "Compare a pruned model with the dense model it was pruned from."
        )


def fidelity(
    dense,
    pruned,
    tokenizer,
    text: str,
    protocol: str | PPLProtocol = "quick",
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> FidelityResult:
    """KL(dense || pruned), top-1 agreement and the perplexity ratio of ``pruned`` to ``dense`` on ``text``.

    Windows, BOS and scored tokens are those of :func:`pruneviz.evaluate.perplexity` under ``protocol`` (a preset
    name or any :class:`PPLProtocol`). Each batch of ``protocol.batch_size`` windows goes once through each model;
    only that batch's logits are held (``[B, T, V]`` per model, fp32 for the log-softmax), so memory does not grow
    with the text. The per-token KL (one float per scored token) is kept for the percentile. Both models share
    ``tokenizer``; they may sit on different devices (the comparison runs on the dense model's device).

    ``progress(fraction, message)`` after each batch; ``cancel()`` before each batch: a cancelled call returns
    the windows done with ``complete=False`` (:mod:`pruneviz.progress`). Raises :class:`TextError` for empty or
    too-short text, or models with different vocabularies; out-of-memory becomes
    :class:`~pruneviz.errors.OutOfMemoryAdvice`.
    """
    window = get_protocol(protocol)
    for model in (dense, pruned):  # learned positions (OPT, GPT-2) end at the context limit: refuse before any work
        check_context(model, window.seq_len, f"a {window.name!r} fidelity window", "choose a protocol with shorter "
                      "windows (quick or paper)")
    windows, first, proto = eval_windows(tokenizer, text, window, dense)  # [W, T], the windows perplexity() scores
    total = windows.shape[0]
    device = execution_device(dense)
    start = time.perf_counter()
    kls: list[torch.Tensor] = []
    agree_n, nll_d_sum, nll_p_sum, done = 0, 0.0, 0.0, 0
    try:
        with torch.inference_mode():
            for b0 in range(0, total, proto.batch_size):
                if cancel is not None and cancel():
                    break
                batch, fb = windows[b0 : b0 + proto.batch_size], first[b0 : b0 + proto.batch_size]  # [B, T]
                d_logits = _scored_logits(dense, batch, fb, device)  # [N, V]
                p_logits = _scored_logits(pruned, batch, fb, device)  # [N, V]
                _check_vocab(d_logits, p_logits)
                targets = torch.cat([batch[j, fb[j]:] for j in range(batch.shape[0])]).to(device)  # [N]
                kl, agree, nll_d, nll_p = token_fidelity(d_logits, p_logits, targets)
                del d_logits, p_logits
                kls.append(kl.cpu())
                agree_n += int(agree.sum().item())
                nll_d_sum += nll_d.double().sum().item()
                nll_p_sum += nll_p.double().sum().item()
                done += batch.shape[0]
                if progress is not None:
                    progress(done / total, f"windows {done}/{total}")
    except Exception as exc:  # noqa: BLE001
        if is_oom(exc):
            raise oom_advice(exc, "comparing the dense and pruned models (try a smaller batch or seq_len)") from exc
        raise
    return _result(kls, agree_n, nll_d_sum, nll_p_sum, done, total, proto, time.perf_counter() - start)


def _quantile(values: torch.Tensor, q: float) -> float:
    """The ``q`` quantile of ``values`` [n] with linear interpolation (as ``torch.quantile``, without its size cap)."""
    ordered = values.double().sort().values  # [n]
    pos = q * (ordered.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return (ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])).item()


def _result(kls, agree_n, nll_d_sum, nll_p_sum, done, total, proto, seconds) -> FidelityResult:
    per_token = torch.cat(kls) if kls else torch.zeros(0)  # [n_tokens]
    n = per_token.numel()
    nan = float("nan")
    ppl_d = math.exp(nll_d_sum / n) if n else nan
    ppl_p = math.exp(nll_p_sum / n) if n else nan
    return FidelityResult(
        kl_mean=per_token.double().mean().item() if n else nan,
        kl_p99=_quantile(per_token, 0.99) if n else nan,
        top1_agreement=agree_n / n if n else nan,
        ppl_dense=ppl_d,
        ppl_pruned=ppl_p,
        ppl_ratio=ppl_p / ppl_d if n else nan,
        n_tokens=n,
        n_windows=done,
        n_windows_total=total,
        protocol=proto,
        seconds=seconds,
        complete=done == total,
        per_token_kl=per_token,
    )


def with_fidelity(dense, tokenizer, points: list, text: str, protocol: str | PPLProtocol = "quick",
                  progress: Progress | None = None, cancel: Cancel | None = None) -> list:
    """Sweep points (:class:`pruneviz.evaluate.SweepPoint`) with ``kl_mean`` and ``top1`` filled in: each point's
    plan on a masked view of ``dense`` against ``dense`` itself, on ``text`` under ``protocol`` (the dense point
    gets 0 and 1). Cancelling returns the points measured so far followed by the others unchanged."""
    out, todo = [], [p for p in points if p.plan is not None]
    for i, p in enumerate(points):
        if p.plan is None:
            out.append(dataclasses.replace(p, kl_mean=0.0, top1=1.0) if p.criterion == "dense" else p)
            continue
        if cancel is not None and cancel():
            return out + points[i:]
        k = todo.index(p)
        part = None if progress is None else (lambda f, m, k=k: progress((k + f) / len(todo), f"KL: {m}"))
        f = fidelity(dense, masked_model(dense, p.plan), tokenizer, text, protocol, part, cancel)
        if not f.complete:
            return out + points[i:]
        out.append(dataclasses.replace(p, kl_mean=f.kl_mean, top1=f.top1_agreement))
    return out
