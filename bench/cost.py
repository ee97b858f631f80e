"""Cost of scoring on the bundled model: seconds and peak memory per criterion, each in a fresh process,
against a plain forward pass and a forward+backward pass over the same calibration windows (same run).

    .venv/bin/python bench/cost.py [--criteria magnitude,wanda_sp,minillm:batch_size=2,...]

Writes bench/results/cost.md and .json. Peak memory is the process's peak resident set during the measured
step (Linux VmHWM after resetting it), model weights included, so ratios compare like with like.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import calibration, load_bundled, write_table

CRITERIA = "magnitude,wanda_sp,flap,taylor,minillm,minillm:batch_size=2,slimgpt,ppl,block_influence"


def one(name: str, samples: int, seq_len: int) -> dict:
    """Measure one step in this (fresh) process."""
    import torch

    from pruneviz.importance import compute, peak_memory

    lm = load_bundled()  # cuda (bf16) when present, else cpu (fp32)
    device = lm.device
    calib = calibration(lm.tokenizer, samples, seq_len)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with peak_memory(device) as mem:
        if name in ("forward", "backward"):
            for batch in calib.batches(4, device):
                if name == "forward":
                    with torch.inference_mode():
                        lm.model(batch)
                else:
                    lm.model(batch, labels=batch).loss.backward()
        else:
            crit, _, opts = name.partition(":")  # "minillm:batch_size=2,queries=8" -> options
            from pruneviz.importance import make_options

            kwargs = {k: int(v) if v.isdigit() else v for k, v in (o.split("=") for o in opts.split(",") if o)}
            compute(lm.model, crit, calib, make_options(crit, **kwargs))
        sync()
    return {"name": name, "seconds": time.perf_counter() - t0, "peak": mem.peak, "start": mem.start,
            "device": str(device), "dtype": str(lm.dtype).replace("torch.", "")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--criteria", default=CRITERIA)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--one")
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.samples, args.seq_len)))
        return
    results = {}
    for name in ["forward", "backward"] + args.criteria.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", name, "--samples", str(args.samples),
                              "--seq-len", str(args.seq_len)], capture_output=True, text=True)
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        results[name] = json.loads(line[-1][7:]) if line else {"error": out.stderr[-300:]}
        print(name, results[name], flush=True)
    fwd, bwd = results["forward"]["peak"], results["backward"]["peak"]
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, "failed", "–", "–", "–"])
            continue
        rows.append([name, f"{r['seconds']:.1f}", f"{r['peak'] / 2**20:,.0f}", f"{r['peak'] / fwd:.2f}x",
                     f"{r['peak'] / bwd:.2f}x"])
    where = next((f"{r['device']}, {r['dtype']}" for r in results.values() if "device" in r), "cpu, float32")
    peak_kind = ("GPU peak allocated (torch.cuda.max_memory_allocated)" if where.startswith("cuda")
                 else "process peak RSS (VmHWM after a reset)")
    write_table("cost" + ("_gpu" if where.startswith("cuda") else ""),
                f"Scoring cost on the bundled SmolLM2-135M ({where})", [
        f"Calibration: {args.samples} windows × {args.seq_len} tokens of the default text, seed 0; every row runs "
        "in a fresh process that loads the model, then measures only the step.",
        "forward = inference-mode forward passes over the calibration windows (batch 4); backward = the same "
        f"with loss.backward() (what gradient criteria need). Peak = {peak_kind} during the step (MiB), "
        "weights included; ratios against those two baselines measured in this run.",
        "Criteria with their default options (minillm: 64 SPSA queries, ε = 1e-3, reading A, 4 windows per "
        "perturbed loss, so a pass holding both signs has 8). 'minillm:batch_size=2' is the same with 2 windows "
        "per loss, i.e. 4 windows per pass, like the forward and backward baselines and Taylor (batch 4).",
    ], ["step", "seconds", "peak MiB", "vs forward", "vs backward"], rows, extra={"results": results})


if __name__ == "__main__":
    main()
