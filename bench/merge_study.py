"""Reconstructing the removed MLP channels before the recipe's affine refit: does it help out of domain? (issue 9)

The recipe (:data:`pruneviz.recipe.RECOMMENDED` without its ``ridge``) removes MLP channels and refits each
``down_proj`` with two numbers per output dimension (SlimLLM's local affine fit): the removed channels'
contribution is simply lost. SlimGPT's full least-squares (OBS) update recovers it from the kept channels but
overfits the calibration text. This study measures the middle ground, block by block on the pruned model's
activations (the recipe's order): the **ridge reconstruction**
(:func:`pruneviz.criteria.slimllm.ridge_reconstruction`: the kept columns updated by the ridge least-squares
prediction of the removed columns' output, ``λ`` times the mean kept input variance), then the local affine refit
to the projection's original output. Each variant rebuilds the recipe's plan (channels chosen block by block with
the affine refit alone) with ``affine_ridge = λ`` in its provenance; ``none`` is the plan as the recipe builds it.

    .venv/bin/python bench/merge_study.py --seeds 0 --lambdas none,1,3,10    # about 10 min per seed on 2 cores

Writes ``bench/results/merge_study.md`` and ``.json`` anew. The committed results were measured by this script's
first version (commit b993d5b), which also had two variants since dropped: each removed channel folded into the
one kept channel that predicts it best ("merge1") and the affine refit fitted to the updated projection's own
output ("-u"); both were behind the ridge reconstruction. Not in ``run_all.py``: a study, not a tracked figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import quality as Q
from common import load_bundled, write_table


def main() -> None:
    from pruneviz.allocate import Target
    from pruneviz.plan import dense_params
    from pruneviz.recipe import RECOMMENDED, run_recipe
    from pruneviz.surgery import apply_plan

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--params", type=int, default=113274432)
    ap.add_argument("--lambdas", default="none,1,3,10", help="the ridge reconstruction's lambda per variant")
    ap.add_argument("--name", default="merge_study", help="results file under bench/results/")
    args = ap.parse_args()
    lm = load_bundled()
    model, tok = lm.model, lm.tokenizer
    texts = Q.study_texts(tok, 10)
    dense = [Q.score(model, t, keep_dense=True)["ppl"] for t in texts]
    target = Target((dense_params(model) - args.params) / dense_params(model, True), "non_embedding")
    base = dataclasses.replace(RECOMMENDED, ridge=None)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        res = run_recipe(model, tok, target, dataclasses.replace(base, seed=seed))
        for lam in args.lambdas.split(","):
            plan = res.plan if lam == "none" else res.plan.with_provenance(affine_ridge=float(lam))
            t0 = time.time()
            built = apply_plan(model, plan, calibration=res.calibration.tokens)
            secs = time.time() - t0
            scores = [Q.score(built, t) for t in texts]
            rows.append([seed, "none" if lam == "none" else f"ridge:1:{lam}", round(secs)]
                        + [f"{s['ppl']:.2f} ({s['ppl'] / d:.3f}x) KL {s['kl']:.3f}" for s, d in zip(scores, dense)])
            print(rows[-1], flush=True)
            del built
        del res
    protocol_lines = [
        f"Model: the recipe ({base.describe()}) at {args.params:,} parameters, per seed; its plan rebuilt with the "
        "ridge reconstruction then the local affine refit, block by block.",
        "Variants: ridge:1:lambda (strength 1) = pruneviz.criteria.slimllm.ridge_reconstruction with lambda x the "
        "mean kept input variance; none = the recipe's own affine_local.",
        "Perplexity: bench/quality.py's protocol (40 non-overlapping 512-token windows, no special tokens); ratio "
        f"to dense in brackets (dense {', '.join(f'{d:.2f}' for d in dense)}); KL over the first 10 windows.",
    ]
    write_table(args.name, "Reconstructing the removed MLP channels before the affine refit (issue 9 study)",
                protocol_lines, ["seed", "variant", "build s"] + [t.name for t in texts], rows)


if __name__ == "__main__":
    main()
