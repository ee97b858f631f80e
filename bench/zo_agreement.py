"""MINI-LLM honesty check: how well the forward-only (SPSA/MeZO) gradient ranks units like exact backprop, as the
number of queries grows, on a tiny random llama (d = 23k perturbed MLP weights) and on the bundled SmolLM2.

    .venv/bin/python bench/zo_agreement.py [--bundled-queries 1,4,16]

Writes bench/results/zo_agreement.md and .json.
"""
from __future__ import annotations

import argparse

from common import calibration, load_bundled, write_table


def rows_for(label, res, maps):
    rows = []
    for q in res["queries"]:
        rows.append([label, q] + [f"{res['spearman'][str(q)][m]['all']:.3f}" for m in maps])
    rows.append([label, "Σ|W|·‖X‖ (no gradient)"] + [f"{res['without_gradient'][m]['all']:.3f}" for m in maps])
    return rows


def main() -> None:
    import torch

    from pruneviz.criteria.minillm import zo_vs_backprop
    from pruneviz.importance import Calibration
    from pruneviz.testing import tiny_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny-queries", default="1,64,1024,4096,16384")
    ap.add_argument("--bundled-queries", default="1,4,16")
    args = ap.parse_args()
    maps = ["channels"]
    tiny = tiny_model("llama")
    calib = Calibration(torch.randint(4, 96, (8, 32), generator=torch.Generator().manual_seed(0)), "random", "", 0)
    q_tiny = [int(q) for q in args.tiny_queries.split(",")]
    res_tiny = zo_vs_backprop(tiny, calib, q_tiny, perturb="mlp")
    rows = rows_for("tiny llama, MLP perturbed (23,040 weights)", res_tiny, maps)
    lm = load_bundled()
    res_smol = zo_vs_backprop(lm.model, calibration(lm.tokenizer, 8, 64), [int(q) for q in
                                                                            args.bundled_queries.split(",")],
                              perturb="mlp")
    rows += rows_for("SmolLM2-135M, MLP perturbed (79.6M weights)", res_smol, maps)
    write_table("zo_agreement", "MINI-LLM: forward-only gradient vs backprop (Spearman ρ of channel maps)", [
        "Reading A (Σ|W⊙ĝ|·‖X_j‖), ε = 1e-3, Gaussian perturbations regenerated from seeds, fp32 loss differences.",
        "ρ = Spearman rank correlation over all layers' channel scores between the ZO map with q queries and the "
        "same reading with the exact backprop gradient; the last row of each model drops the gradient entirely.",
        "Tiny: random 4-layer llama, 8 × 32 random tokens. SmolLM2: 8 × 64 tokens of the default calibration text.",
    ], ["model", "queries q", "ρ channels"], rows, extra={"tiny": res_tiny, "smollm2": res_smol})


if __name__ == "__main__":
    main()
