"""Merging removed MLP channels into kept ones before the recipe's affine refit: does it help out of domain? (issue 9)

The recipe (:data:`pruneviz.recipe.RECOMMENDED`) removes MLP channels and refits each ``down_proj`` with two numbers
per output dimension (SlimLLM's local affine fit): the removed channels' contribution is simply lost. SlimGPT's
full least-squares (OBS) update recovers it from the kept channels but overfits the calibration text. This study
measures the cheap middle ground, fitted block by block on the pruned model's activations (the recipe's order):

- ``merge1``: each removed channel ``j`` is folded into the one kept channel ``k`` whose activation predicts it best
  (centred covariance: ``k = argmax cov(j,k)^2 / var(k)``, ``W[:, k] += s * cov(j,k)/var(k) * W[:, j]``): one
  number per removed channel (neuron merging);
- ``ridge λ``: the least-squares update of the kept columns from every kept channel with a ridge penalty ``λ`` times
  the mean kept variance (``λ → 0`` is the OBS solution, ``λ → ∞`` no update);

then the usual local affine refit of the merged projection. The channels are the recipe's (chosen block by block
with the affine refit only); each variant rebuilds the model from the plan with its own compensator.

    .venv/bin/python bench/merge_study.py --seeds 0,1,2     # about 6 min per seed on 2 cores

Writes ``bench/results/merge_study.md`` and ``.json``. Not in ``run_all.py``: a study, not a tracked figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import quality as Q
import torch
from common import load_bundled, write_table

# the study compensator's setting for the current build
VARIANT = {"mode": "none", "strength": 1.0, "lam": 1.0, "target": "original"}


def merge_update(w: torch.Tensor, cov: torch.Tensor, keep: torch.Tensor, mode: str, strength: float,
                 lam: float) -> torch.Tensor:
    """The change of ``w``'s kept columns [D, K] that folds the removed channels' contribution into them, from the
    centred covariance ``cov`` [C, C] of the projection's inputs (fp64)."""
    c = cov.shape[0]
    gone = torch.tensor([i for i in range(c) if i not in set(keep.tolist())], dtype=torch.long)
    w64 = w.double()
    ckk, crk = cov[keep][:, keep], cov[gone][:, keep]  # [K, K], [R, K]
    if mode == "merge1":
        var = ckk.diagonal().clamp_min(1e-12)  # [K]
        gain = crk.pow(2) / var  # [R, K]: variance of j explained by k
        best = gain.argmax(1)  # [R]
        coef = crk.gather(1, best[:, None]).squeeze(1) / var[best]  # [R]
        delta = torch.zeros(w.shape[0], len(keep), dtype=torch.float64)
        delta.index_add_(1, best, w64[:, gone] * coef * strength)
        return delta
    if mode == "ridge":
        reg = lam * float(ckk.diagonal().mean())
        b = torch.linalg.solve(ckk + reg * torch.eye(len(keep), dtype=torch.float64), crk.T)  # [K, R]
        return strength * (w64[:, gone] @ b.T)  # [D, K]
    raise ValueError(mode)


def register():
    from pruneviz.arch import adapter_for, geometry_of, get_path
    from pruneviz.criteria.capture import LayerStream, capture_inputs
    from pruneviz.criteria.slimllm import (
        DEFAULT_BATCH_SIZE,
        _fit_site,
        _flat,
        _fold,
        _kept_columns,
        ensure_bias,
        run_block,
        weight_rows,
    )
    from pruneviz.surgery import masking, register_compensator

    @register_compensator("merge_local")
    def merge_local(model, plan, calibration, progress=None):
        """affine_local with the MLP channels merged first (VARIANT)."""
        adapter, g = adapter_for(model), geometry_of(model)
        layers = adapter.layers(model)
        path = adapter.mlp_out
        keep = {l: _kept_columns(g, plan, l, "mlp") for l in plan.kept_blocks()}
        keep = {k: v for k, v in keep.items() if v is not None and len(v)}
        for l in keep:
            ensure_bias(get_path(layers[l], path))
        with torch.inference_mode(), masking(model, plan) as view:
            dense = capture_inputs(model, calibration, DEFAULT_BATCH_SIZE)
            pruned = LayerStream(list(dense.hidden), dense.calls, dense.by_keyword)
            view_layers = adapter.layers(view)
            for i, layer in enumerate(layers):
                if i in keep:
                    if VARIANT["mode"] != "none":
                        acc = {"n": 0, "s": 0.0, "ss": 0.0, "y": []}

                        def hook(module, args, acc=acc):
                            x = _flat(args[0]).double()  # [N, C]
                            acc["n"] += x.shape[0]
                            acc["s"] = acc["s"] + x.sum(0)
                            acc["ss"] = acc["ss"] + x.T @ x
                            inner = getattr(module, "inner", module)
                            acc["y"].append(torch.nn.functional.linear(x.float(), weight_rows(inner)))  # [N, D]
                        run_block(view_layers[i], i, pruned, [(path, hook)])
                        mu = acc["s"] / acc["n"]
                        cov = acc["ss"] / acc["n"] - torch.outer(mu, mu)  # [C, C]
                        module = get_path(layer, path)
                        w = weight_rows(module)  # [D, C]
                        delta = merge_update(w, cov, keep[i], VARIANT["mode"], VARIANT["strength"], VARIANT["lam"])
                        with torch.no_grad():
                            module.weight[:, keep[i]] += delta.to(module.weight.dtype)
                    targets = acc["y"] if VARIANT["mode"] != "none" and VARIANT["target"] == "original" else None
                    a, b = _fit_site(view_layers[i], i, pruned, path, keep[i], targets, 0.0)
                    _fold(get_path(layer, path), a, b)
                pruned.hidden = run_block(view_layers[i], i, pruned, [])


def main() -> None:
    from pruneviz.allocate import Target
    from pruneviz.evaluate import PPLProtocol
    from pruneviz.plan import dense_params
    from pruneviz.recipe import RECOMMENDED, run_recipe
    from pruneviz.surgery import apply_plan

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--params", type=int, default=113274432)
    ap.add_argument("--variants", default="none,merge1:1,merge1:0.5,ridge:1:1,ridge:0.1:1",
                    help="mode[:strength[:lambda]] per variant; a mode ending in -u fits the affine refit to "
                         "the updated projection's own full output instead of the original one")
    args = ap.parse_args()
    register()
    lm = load_bundled()
    model, tok = lm.model, lm.tokenizer
    protocol = PPLProtocol("peers", 512, 512, bos="none", max_windows=40, batch_size=1)
    _, heldout = Q.peer_halves()
    texts = [Q.make_text("pydoc held-out (in domain)", tok, heldout, protocol, 10),
             Q.make_text("PTB valid (out of domain)", tok, Q.ptb_text(), protocol, 10),
             Q.make_text("GFDL (out of domain)", tok, Q.GFDL.read_text(), protocol, 10)]
    dense = [Q.score(model, t, keep_dense=True)["ppl"] for t in texts]
    target = Target((dense_params(model) - args.params) / dense_params(model, True), "non_embedding")
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        res = run_recipe(model, tok, target, dataclasses.replace(RECOMMENDED, seed=seed))
        for spec in args.variants.split(","):
            mode, *rest = spec.split(":")
            target = "updated" if mode.endswith("-u") else "original"
            mode = mode.removesuffix("-u")
            VARIANT.update(mode=mode, target=target, strength=float(rest[0]) if rest else 1.0,
                           lam=float(rest[1]) if len(rest) > 1 else 1.0)
            t0 = time.time()
            built = apply_plan(model, dataclasses.replace(res.plan, compensation="merge_local"),
                               calibration=res.calibration.tokens)
            secs = time.time() - t0
            scores = [Q.score(built, t) for t in texts]
            rows.append([seed, spec, round(secs)] + [f"{s['ppl']:.2f} ({s['ppl'] / d:.3f}x) KL {s['kl']:.3f}"
                                                     for s, d in zip(scores, dense)])
            print(rows[-1], flush=True)
            del built
        del res
    protocol_lines = [
        f"Model: the recommended recipe ({RECOMMENDED.describe()}) at {args.params:,} parameters, per seed; its "
        "plan rebuilt with each variant's compensation (merge, then the local affine refit, block by block).",
        "Variants: mode:strength[:lambda] (none = the recipe's own affine_local; merge1 = each removed channel "
        "folded into its best kept predictor; ridge = least-squares update with ridge lambda x mean kept variance).",
        "Perplexity: bench/quality.py's protocol (40 non-overlapping 512-token windows, no special tokens); ratio "
        f"to dense in brackets (dense {', '.join(f'{d:.2f}' for d in dense)}); KL over the first 10 windows.",
    ]
    write_table("merge_study", "Merging removed MLP channels before the affine refit (issue 9 study)",
                protocol_lines, ["seed", "variant", "build s"] + [t.name for t in texts], rows)


if __name__ == "__main__":
    main()
