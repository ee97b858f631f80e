"""Quality of every criterion on the bundled model: held-out perplexity at 10/20/30/50% of non-embedding
parameters removed (no retraining), plus scoring time and peak memory, against the dense model in the same run.

    .venv/bin/python bench/quality.py            # all methods (about 30-60 min on 2 CPU cores)
    .venv/bin/python bench/quality.py --methods slimgpt,wanda_sp --ratios 0.2

Writes bench/results/quality.md and .json.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

from common import calibration, load_bundled, write_table

# method label -> (criterion, allocation strategy, extra allocation options, compensation)
METHODS = {
    "magnitude": ("magnitude", "uniform", {}, None),
    "wanda_sp": ("wanda_sp", "uniform", {}, None),
    "magnitude (layers 4..L-3)": ("magnitude", "uniform", {"skip_first": 4, "skip_last": 2}, None),
    "wanda_sp (layers 4..L-3)": ("wanda_sp", "uniform", {"skip_first": 4, "skip_last": 2}, None),
    "taylor (layers 4..L-3)": ("taylor", "uniform", {"skip_first": 4, "skip_last": 2}, None),
    "flap": ("flap", "global", {}, "flap_bias"),
    "taylor": ("taylor", "uniform", {}, None),
    "minillm": ("minillm", "uniform", {}, None),
    "slimgpt": ("slimgpt", "solver", {}, "slimgpt"),
    "magnitude+ (depth)": ("magnitude", "depth", {"plus_rule": True}, None),
    "taylor+ (depth)": ("taylor", "depth", {"plus_rule": True}, None),
    "ppl (depth)": ("ppl", "depth", {}, None),
    "block_influence (depth)": ("block_influence", "depth", {}, None),
}


def evaluate(model, tokenizer, text, protocol):
    from pruneviz.evaluate import perplexity

    return perplexity(model, tokenizer, text, protocol).ppl


def plan_for(model, imap, calib, ratio, strategy, options, compensation):
    from pruneviz.allocate import Target, allocate
    from pruneviz.surgery import apply_plan

    plan = allocate(model, imap, Target(ratio, "non_embedding"), strategy=strategy, **options)
    if compensation:
        plan = dataclasses.replace(plan, compensation=compensation)
    return plan, apply_plan(model, plan, calibration=calib.tokens)


def slimgpt_removed_share(model, target: float) -> float:
    """Share of non-embedding parameters SlimGPT removes at mean layer ratio ``target`` (counted, not run)."""
    from pruneviz.arch import adapter_for, geometry_of, unit_params
    from pruneviz.criteria.slimgpt import _solver_task, layer_ratios
    from pruneviz.plan import dense_params

    g, adapter = geometry_of(model), adapter_for(model)
    kv, ch = unit_params(g, adapter, model, "kv"), unit_params(g, adapter, model, "channel")
    tasks = [_solver_task(g, r, "kv") for r in layer_ratios(g.n_layers, target)]
    return sum(t.kv * kv + t.channels * ch for t in tasks) / dense_params(model, non_embedding=True)


def slimgpt_for(model, calib, share):
    """SlimGPT's ratio is the mean per-layer share of heads and channels; bisect it so that the solver removes
    ``share`` of non-embedding parameters (counted from its schedule, without running it), then run it."""
    from pruneviz.criteria.slimgpt import slimgpt_prune

    lo, hi = 0.0, 0.9
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if slimgpt_removed_share(model, mid) < share else (lo, mid)
    return slimgpt_prune(model, calib, hi)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.5")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--protocol", default="paper")
    ap.add_argument("--name", default="quality", help="results file name under bench/results/")
    args = ap.parse_args()

    from pruneviz.data import split_default
    from pruneviz.evaluate import get_protocol
    from pruneviz.importance import compute
    from pruneviz.plan import dense_params

    lm = load_bundled()
    model, tok = lm.model, lm.tokenizer
    calib = calibration(tok, args.samples, args.seq_len)
    _, eval_text = split_default()
    protocol = get_protocol(args.protocol)
    ratios = [float(r) for r in args.ratios.split(",")]
    dense_ppl = evaluate(model, tok, eval_text, protocol)
    dense_ne = dense_params(model, non_embedding=True)
    rows = [["dense", "–", "–", "–"] + [f"{dense_ppl:.2f}"] * len(ratios)]
    protocol_lines = [
        "Model: SmolLM2-135M-Instruct (bundled GGUF, de-quantised to fp32), CPU, fp32.",
        f"Calibration: {calib.describe()}.",
        f"Held-out text: the evaluation part of the default text (pydoc topics, disjoint from calibration); "
        f"{protocol.describe()}",
        "Cells: perplexity (ratio to dense; share of non-embedding parameters actually removed). Targets are "
        "shares of non-embedding parameters (106.2M); whole units make the achieved share differ slightly.",
        "Width methods rank within each layer (uniform) unless stated; 'layers 4..L-3' keeps the first four and "
        "last two layers whole (LLM-Pruner's layer range) and spreads the budget over the rest; FLAP ranks "
        "globally with its bias compensation; SlimGPT runs its OBS solver with log-increasing layer ratios "
        "(its ratio is the mean "
        "per-layer share of heads and channels) and compensates weights; depth methods remove whole blocks "
        "(+ = keep the first four and last two).",
        "Scoring seconds and peak memory (process peak RSS during scoring, MiB) are for one scoring run; "
        "SlimGPT's are one solver run at 20%. No retraining anywhere.",
    ]

    def flush():
        write_table(args.name, "Perplexity after pruning, by criterion (bundled SmolLM2-135M)", protocol_lines,
                    ["method", "allocation", "scoring s", "peak MiB"] + [f"{r:.0%} removed" for r in ratios], rows)

    scoring = {}
    for label in args.methods.split(","):
        crit, strategy, options, comp = METHODS[label]
        imap = None
        if strategy != "solver":
            if crit not in scoring:
                t0 = time.perf_counter()
                scoring[crit] = compute(model, crit, calib)
                print(f"{crit}: scored in {time.perf_counter() - t0:.1f} s", flush=True)
            imap = scoring[crit]
        cells = []
        secs = imap.meta["seconds"] if imap else 0.0
        peak = imap.meta.get("peak_memory_bytes") if imap else None
        for r in ratios:
            t0 = time.perf_counter()
            try:
                if strategy == "solver":
                    plan, pruned = slimgpt_for(model, calib, r)
                    if abs(r - 0.2) < 1e-9 or not secs:
                        secs = time.perf_counter() - t0
                else:
                    plan, pruned = plan_for(model, imap, calib, r, strategy, options, comp)
                ppl = evaluate(pruned, tok, eval_text, protocol)
                got = 1 - dense_params(pruned, non_embedding=True) / dense_ne
                cells.append(f"{ppl:.2f} ({ppl / dense_ppl:.2f}x; {got:.0%})")
            except Exception as e:  # record, don't hide: a failed cell says why
                cells.append(f"failed: {type(e).__name__}: {str(e)[:60]}")
            print(label, r, cells[-1], flush=True)
        mem = f"{peak / 2**20:,.0f}" if peak else "–"
        rows.append([label, strategy + (f" + {comp}" if comp else ""), f"{secs:.1f}", mem] + cells)
        flush()  # partial results survive an interrupted run


if __name__ == "__main__":
    main()
