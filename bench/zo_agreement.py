"""MINI-LLM honesty check: how well the forward-only (SPSA/MeZO) gradient ranks units like exact backprop, as the
number of queries grows, for both readings of "feature map sensitivity" and what each costs.

- weights: every attention and MLP projection weight is perturbed (the default ``minillm`` criterion,
  ``variables="weights"``, reading A ``Σ|W⊙ĝ|·‖X_j‖``); one estimate yields the head, KV-group and channel maps;
- gates: one multiplicative gate per head, KV group or channel on its feature map (``variables="gates"``, score
  ``|∂L/∂m_u|``); one estimate per unit kind.

Each ZO map is compared with the same reading computed with the exact backprop gradient, on a tiny random llama
and on the bundled SmolLM2-135M, with the wall time of the ZO estimate and of the backprop reference measured in
the same run.

    .venv/bin/python bench/zo_agreement.py [--bundled-gate-queries 1,4,16,64] [--bundled-weight-queries 1,4,16]

Writes bench/results/zo_agreement.md and .json.
"""
from __future__ import annotations

import argparse
import math
import time

from common import calibration, load_bundled, write_table

MAPS = ("heads", "kv", "channels")
KIND_OF = {"heads": "head", "kv": "kv", "channels": "channel"}
SEED = 0
BATCH = 4  # MiniLLMOptions().batch_size: both signs of a query share a pass of 8 windows


def ints(text: str) -> list[int]:
    return [int(q) for q in text.split(",") if q]


def theory(q: int, d: int) -> str:
    return f"{math.sqrt(q / (d + q)):.3f}"


def r3(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def secs(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def weight_rows(label: str, res: dict, stats_s: float) -> list[list]:
    d, exact_s = res["perturbed"], res["seconds"]["exact"]
    rows = []
    for m in MAPS:
        for q in res["queries"]:
            s = stats_s + res["seconds"]["estimate"][str(q)] + res["seconds"]["maps"][str(q)]
            rho = res["spearman"][str(q)][m]
            rows.append([label, "weights", m, f"{d:,}", q, r3(rho["all"]), r3(rho["within_layer"]), theory(q, d),
                         "–", 2 * q + 1, secs(s), secs(exact_s), f"{s / exact_s:.1f}×"])
        rho = res["without_gradient"][m]
        rows.append([label, "weights", m, "0", "Σ|W|·‖X‖ (no gradient)", r3(rho["all"]), r3(rho["within_layer"]),
                     "–", "–", 1, secs(stats_s), secs(exact_s), f"{stats_s / exact_s:.1f}×"])
    return rows


def gate_rows(label: str, results: list[dict], stats_s: float) -> list[list]:
    rows = []
    for res in results:
        for m in res["perturbed"]:
            d, exact_s = res["perturbed"][m], res["seconds"]["exact"][m]
            for q in res["queries"]:
                s = res["seconds"]["estimate"][m][str(q)]
                rho = res["spearman"][str(q)][m]
                rows.append([label, "gates", m, f"{d:,}", q, r3(rho["all"]), r3(rho["within_layer"]), theory(q, d),
                             r3(res["cosine"][str(q)][m]), 2 * q, secs(s), secs(exact_s), f"{s / exact_s:.1f}×"])
            rho = res["without_gradient"][m]
            rows.append([label, "gates", m, "0", "Σ|W|·‖X‖ (no gradient)", r3(rho["all"]), r3(rho["within_layer"]),
                         "–", "–", 1, secs(stats_s), secs(exact_s), f"{stats_s / exact_s:.1f}×"])
    return rows


def run_model(label: str, model, calib, weight_queries: list[int], gate_queries: dict[str, list[int]]):
    from pruneviz.criteria.minillm import gates_vs_backprop, zo_vs_backprop
    from pruneviz.criteria.stats import collect_stats
    from pruneviz.progress import Span

    t0 = time.perf_counter()
    stats = collect_stats(model, calib, Span(None), batch_size=BATCH)
    stats_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    weights = zo_vs_backprop(model, calib, weight_queries, reading="A", seed=SEED, perturb="scored",
                             batch_size=BATCH, stats=stats)
    print(f"{label}: weights reading done in {time.perf_counter() - t0:.0f} s", flush=True)
    gates = []
    for qs in sorted({tuple(v) for v in gate_queries.values()}, reverse=True):
        kinds = [k for k, v in gate_queries.items() if tuple(v) == qs]
        t0 = time.perf_counter()
        gates.append(gates_vs_backprop(model, calib, qs, kinds, seed=SEED, batch_size=BATCH, stats=stats))
        print(f"{label}: gates {kinds} done in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = weight_rows(label, weights, stats_s) + gate_rows(label, gates, stats_s)
    return rows, {"stats_seconds": stats_s, "weights": weights, "gates": gates}


def main() -> None:
    import torch

    from pruneviz.importance import Calibration
    from pruneviz.testing import tiny_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny-weight-queries", default="1,16,64,256,1024,4096")
    ap.add_argument("--tiny-gate-queries", default="1,16,64,256,1024,4096", help="heads and KV groups")
    ap.add_argument("--tiny-channel-gate-queries", default="1,16,64,256,1024,4096,16384")
    ap.add_argument("--bundled-weight-queries", default="1,4,16")
    ap.add_argument("--bundled-gate-queries", default="1,4,16,64", help="heads and KV groups")
    ap.add_argument("--bundled-channel-gate-queries", default="1,4,16")
    args = ap.parse_args()
    start = time.perf_counter()

    tiny = tiny_model("llama")
    calib = Calibration(torch.randint(4, 96, (8, 32), generator=torch.Generator().manual_seed(0)), "random", "", 0)
    tq = ints(args.tiny_gate_queries)
    rows, res_tiny = run_model("tiny llama", tiny, calib, ints(args.tiny_weight_queries),
                               {"head": tq, "kv": tq, "channel": ints(args.tiny_channel_gate_queries)})
    lm = load_bundled()
    bq = ints(args.bundled_gate_queries)
    more, res_smol = run_model("SmolLM2-135M", lm.model, calibration(lm.tokenizer, 8, 64),
                               ints(args.bundled_weight_queries),
                               {"head": bq, "kv": bq, "channel": ints(args.bundled_channel_gate_queries)})
    rows += more
    total = time.perf_counter() - start
    write_table("zo_agreement", "MINI-LLM: forward-only gradient vs backprop, per-weight and per-gate readings", [
        "weights: every attention and MLP projection weight perturbed (the default `minillm`, "
        "variables='weights', perturb='scored'), reading A Σ|W⊙ĝ|·‖X_j‖; one estimate gives all three maps, so "
        "its cost is shared by the heads, kv and channels rows. gates: one multiplicative gate per head, KV group "
        "or channel on its feature map (variables='gates'), score |∂L/∂m_u|; one estimate per unit kind.",
        "ρ = Spearman rank correlation of the ZO map with q queries against the same reading with the exact "
        "backprop gradient, over all layers' units (\"within layer\": mean over layers). d = perturbed variables; "
        "√(q/(d+q)) = expected cosine of ĝ with the true gradient; cos(ĝ,g) = that cosine measured (gates; "
        "weights: not measured). 'Σ|W|·‖X‖ (no gradient)' rows correlate the gradient-free map with the exact "
        "map of that reading (weights: Σ|W⊙∇L|·‖X‖; gates: |∂L/∂m_u|).",
        "ε = 1e-3 (the criterion's default), two-sided SPSA, Gaussian directions regenerated from seed 0 "
        "(deterministic: no repeats, no medians), fp32 losses, 1 query per forward pass (both signs in one "
        "pass of 2 × 4 windows), the criterion's defaults (checked separately: ε = 1e-2 gives the same "
        "projected gate gradients c_j to 2-3 digits on SmolLM2's channels and the same cosines on the tiny model, "
        "so fp32 resolution does not limit these gate estimates).",
        "Cost: loss evaluations = calibration-set losses per estimate (weights: 2q + 1 statistics pass; gates: "
        "2q per unit kind); ZO s = wall seconds of one estimate (weights: statistics + queries + rebuilding ĝ "
        "from q seeded directions and scoring; gates: the queries); backprop s = one forward and one backward "
        "pass over the same calibration set giving the exact reference (weights: all projection gradients; "
        "gates: that kind's gate gradients). Same machine, same run; the machine was shared with other jobs, so "
        "seconds are indicative (ratios more than absolute values).",
        "Tiny: random 4-layer llama (tiny_model('llama'), seed 0), 8 × 32 random tokens (seed 0). SmolLM2: "
        "bundled SmolLM2-135M, fp32 CPU, 8 × 64 tokens of the default calibration text (seed 0).",
        f"Queries: tiny weights {args.tiny_weight_queries}, tiny gates heads/kv {args.tiny_gate_queries}, "
        f"channels {args.tiny_channel_gate_queries}; SmolLM2 weights {args.bundled_weight_queries}, gates "
        f"heads/kv {args.bundled_gate_queries}, gates channels "
        f"{args.bundled_channel_gate_queries} (chosen so that the whole run fits about 25 minutes on the shared "
        f"2-core machine). Whole run: {total / 60:.1f} min.",
    ], ["model", "variables", "unit", "d", "queries q", "ρ vs backprop", "ρ within layer", "√(q/(d+q))",
        "cos(ĝ,g)", "loss evaluations", "ZO s", "backprop s", "ZO / backprop"], rows,
        extra={"seed": SEED, "total_seconds": total, "tiny": res_tiny, "smollm2": res_smol})


if __name__ == "__main__":
    main()
