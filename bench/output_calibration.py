"""Output-side corrections after the recommended recipe: do they help out of domain? (issue 9, a negative result)

The stop-24 recipe (:data:`pruneviz.recipe.RECOMMENDED` without its ridge reconstruction) at 113.27M leaves its
pruned model a little overconfident on the calibration windows. Two cheap corrections, fitted on the recipe's own
self-generated calibration windows by KL(dense || pruned) of the next-token distributions, were measured on the
peers' protocol (``bench/quality.py``: 40 windows x 512 tokens, no special tokens) in domain (pydoc held-out) and
out of domain (PTB valid, GFDL prose):

- **logit temperature**: one scale ``s`` on the logits (foldable into the final norm's weight, since the
  vocabulary projection is linear); the grid's ratios show where each text's optimum sits, "fitted" is the ``s``
  minimising the calibration KL (golden-section search on [0.8, 1.2]);
- **final-norm refit**: the final RMSNorm's 576 weights rescaled per dimension (L-BFGS on ``--fit-tokens``
  calibration positions, the rest of the model fixed).

    .venv/bin/python bench/output_calibration.py --seeds 0,1     # about 15 min per seed on 2 cores

Writes ``bench/results/output_calibration.md`` and ``.json``. Not in ``run_all.py``: a study, not a tracked figure.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math

import quality as Q
import torch
from common import load_bundled, write_table

GRID = (0.9, 0.95, 0.975, 1.0, 1.05)


def perplexities(model, text: Q.Text, scales) -> list[float]:
    """Perplexity of ``model`` on ``text`` with its logits multiplied by each of ``scales`` (one pass; logits are
    not kept: three texts' worth would not fit in memory)."""
    nll, n = [0.0] * len(scales), 0
    with torch.inference_mode():
        for b0 in range(0, text.windows.shape[0], Q.BATCH):
            batch = text.windows[b0 : b0 + Q.BATCH]  # [B, T]
            logits = model(input_ids=batch, use_cache=False).logits  # [B, T, V]
            for j in range(batch.shape[0]):
                f = text.first[b0 + j]
                lo, y = logits[j, f - 1 : -1].float(), batch[j, f:]  # [T-1, V], [T-1]
                for k, s in enumerate(scales):
                    nll[k] += float(torch.nn.functional.cross_entropy(lo * s, y, reduction="sum"))
                n += y.numel()
    return [math.exp(v / n) for v in nll]


def calib_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token logits on every calibration position but the last [N, V] fp32."""
    with torch.inference_mode():
        lo = torch.cat([model(input_ids=tokens[i : i + 8], use_cache=False).logits.float()
                        for i in range(0, tokens.shape[0], 8)])  # [S, T, V]
    return lo[:, :-1].reshape(-1, lo.shape[-1])


def kl(dense_logp: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(dense || softmax(logits)) over rows."""
    return float((dense_logp.exp() * (dense_logp - logits.log_softmax(-1))).sum(-1).mean())


def fit_scale(dense_logp: torch.Tensor, logits: torch.Tensor, lo: float = 0.8, hi: float = 1.2) -> float:
    """The logit scale minimising the calibration KL (golden-section search; the KL is unimodal in the scale)."""
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    for _ in range(20):
        c, d = b - r * (b - a), a + r * (b - a)
        if kl(dense_logp, logits * c) < kl(dense_logp, logits * d):
            b = d
        else:
            a = c
    return (a + b) / 2


def refit_final_norm(pruned, tokens: torch.Tensor, dense_logp: torch.Tensor, n_tokens: int):
    """A copy of ``pruned`` whose final norm's weights are rescaled per dimension to minimise the KL on
    ``n_tokens`` random calibration positions (L-BFGS, two rounds of 15 iterations)."""
    with torch.inference_mode():
        hidden = torch.cat([pruned.model(input_ids=tokens[i : i + 8], use_cache=False).last_hidden_state.float()
                            [:, :-1].reshape(-1, pruned.config.hidden_size)
                            for i in range(0, tokens.shape[0], 8)])  # [N, D], already weighted by the norm
    pick = torch.randperm(hidden.shape[0], generator=torch.Generator().manual_seed(0))[:n_tokens]
    w0 = pruned.model.norm.weight.detach().float()  # [D]
    x, target = hidden[pick] / w0, dense_logp[pick]  # [n, D] unit-normed, [n, V]
    emb = pruned.lm_head.weight.detach().float()  # [V, D]
    g = torch.ones_like(w0, requires_grad=True)
    opt = torch.optim.LBFGS([g], lr=1, max_iter=15, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        total = 0.0
        for c in range(0, x.shape[0], 1024):
            q = ((x[c : c + 1024] * (w0 * g)) @ emb.T).log_softmax(-1)  # [c, V]
            loss = (target[c : c + 1024].exp() * (target[c : c + 1024] - q)).sum() / x.shape[0]
            loss.backward()
            total += float(loss.detach())
        return torch.tensor(total)

    for _ in range(2):
        opt.step(closure)
    out = copy.deepcopy(pruned)
    with torch.no_grad():
        out.model.norm.weight.mul_(g.detach().to(out.model.norm.weight.dtype))
    return out, (float(g.detach().min()), float(g.detach().max()))


def main() -> None:
    from pruneviz.allocate import Target
    from pruneviz.plan import dense_params
    from pruneviz.recipe import RECOMMENDED, run_recipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0", help="self-generated calibration seeds of the recipe")
    ap.add_argument("--params", type=int, default=113274432)
    ap.add_argument("--fit-tokens", type=int, default=3072)
    args = ap.parse_args()
    lm = load_bundled()
    model, tok = lm.model, lm.tokenizer
    texts = Q.study_texts(tok, 0)
    dense = [perplexities(model, t, [1.0])[0] for t in texts]
    target = Target((dense_params(model) - args.params) / dense_params(model, True), "non_embedding")
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        res = run_recipe(model, tok, target, dataclasses.replace(RECOMMENDED, seed=seed, ridge=None))  # stop 24's
        dense_logp = calib_logits(model, res.calibration.tokens).log_softmax(-1)  # [N, V]
        pruned_logits = calib_logits(res.model, res.calibration.tokens)
        fitted = fit_scale(dense_logp, pruned_logits)
        scales = (*GRID, fitted)
        per_text = [perplexities(res.model, t, scales) for t in texts]  # [texts][scales]
        for k, s in enumerate(scales):
            label = f"logit scale {s:.3f}" + (" (fitted on calibration KL)" if k == len(GRID) else "")
            rows.append([seed, label, round(kl(dense_logp, pruned_logits * s), 4)]
                        + [f"{p[k]:.2f} ({p[k] / d:.3f}x)" for p, d in zip(per_text, dense)])
            print(rows[-1], flush=True)
        del pruned_logits
        refit, (lo, hi) = refit_final_norm(res.model, res.calibration.tokens, dense_logp, args.fit_tokens)
        refit_ppl = [perplexities(refit, t, [1.0])[0] for t in texts]
        rows.append([seed, f"final-norm refit (scales {lo:.2f}-{hi:.2f})",
                     round(kl(dense_logp, calib_logits(refit, res.calibration.tokens)), 4)]
                    + [f"{p:.2f} ({p / d:.3f}x)" for p, d in zip(refit_ppl, dense)])
        print(rows[-1], flush=True)
        del refit, res, dense_logp
    protocol_lines = [
        f"Model: the stop-24 recipe ({dataclasses.replace(RECOMMENDED, ridge=None).describe()}) at "
        f"{args.params:,} parameters, per seed.",
        "Corrections fitted on the recipe's own calibration windows by KL(dense || pruned); calibration KL is over "
        "every calibration position (the final-norm refit saw " + f"{args.fit_tokens} random positions of them).",
        "Perplexity: bench/quality.py's protocol (40 non-overlapping 512-token windows, no special tokens); ratio "
        f"to dense in brackets (dense {', '.join(f'{d:.2f}' for d in dense)}).",
    ]
    write_table("output_calibration", "Output-side corrections after the recipe (temperature, final-norm refit)",
                protocol_lines, ["seed", "correction", "calibration KL"] + [t.name for t in texts], rows)


if __name__ == "__main__":
    main()
