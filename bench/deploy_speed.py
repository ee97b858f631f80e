"""The speed-up users get: prefill and decode tokens/s of dense and pruned SmolLM2-135M in PyTorch and llama.cpp.

    .venv/bin/python bench/deploy_speed.py [--repeats 3] [--prompt 64] [--decode 32] [--batches 1,8] [--no-llama-cpp]

Models (20% of non-embedding parameters removed, no compensation: speed does not depend on the weights' values):
width (FLAP scores, MLP channels only, the same width in every layer: llama.cpp ``llama``), width per layer (FLAP,
global ranking, MLP channels only: ``deci``), depth (6 of 30 blocks by block influence: ``llama``), combined
(3 blocks by block influence, the rest as uniform MLP width: ``llama``); and depth and combined again at 20% of
*all* parameters (the tied embedding / LM head, 21% of the model, caps a 20% non-embedding cut near 1.19x); and the
three width plans with every kept MLP width a multiple of 32 (``multiple_of=32``). Each
is exported to GGUF f16 and kept in
memory as PyTorch fp32. Every model on both engines is timed interleaved in one run (:mod:`pruneviz.speed`:
warm-up round, then rounds that call every model/engine once in rotating order; medians), so the ratios to the
dense model compare measurements taken side by side. Writes bench/results/deploy_speed.md and .json.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from common import calibration, load_bundled, write_table

from pruneviz import threads
from pruneviz.allocate import Target, allocate
from pruneviz.gguf_export import write_gguf
from pruneviz.importance import compute
from pruneviz.plan import dense_params
from pruneviz.speed import (
    LlamaCppRunner,
    SpeedProtocol,
    interleaved,
    llama_cpp_available,
    param_bytes,
    prompt_ids,
    ratio_spread,
    ratios,
    summarise,
    torch_sample,
)
from pruneviz.surgery import apply_plan

RATIO = 0.2
GOAL = 1.2  # llama.cpp decode tokens/s of depth and combined plans vs dense at 20% removed


def make_plans(model, calib) -> dict:
    """label -> (plan or None, description)."""
    flap = compute(model, "flap", calib)
    bi = compute(model, "block_influence", calib)
    both = dataclasses.replace(flap, criterion="flap+block_influence", blocks=bi.blocks)
    target, total = Target(RATIO), Target(RATIO, "total")
    return {
        "dense": (None, "nothing removed"),
        "width": (allocate(model, flap, target, strategy="uniform", attn_share=0.0),
                  "FLAP, MLP channels, same width in every layer"),
        "width per layer": (allocate(model, flap, target, strategy="global", attn_share=0.0),
                            "FLAP, MLP channels, global ranking (per-layer widths)"),
        "depth": (allocate(model, bi, target, strategy="depth"), "block influence, whole blocks"),
        "combined": (allocate(model, both, target, strategy="combined", attn_share=0.0),
                     "half the budget as blocks (block influence), half as uniform MLP width (FLAP)"),
        # the same plans with every kept MLP width a multiple of 32 (AllocOptions.multiple_of): whole SIMD / quant
        # blocks in every row of ffn_down
        "width, widths x32": (allocate(model, flap, target, strategy="uniform", attn_share=0.0, multiple_of=32),
                              "as width, MLP widths multiples of 32"),
        "width per layer, widths x32": (allocate(model, flap, target, strategy="global", attn_share=0.0,
                                                 multiple_of=32), "as width per layer, MLP widths multiples of 32"),
        "combined, widths x32": (allocate(model, both, target, strategy="combined", attn_share=0.0, multiple_of=32),
                                 "as combined, MLP widths multiples of 32"),
        # the same cuts counted over all parameters: the untouched tied embedding / LM head (21% of the bundled
        # model) caps what 20% of the non-embedding parameters can give at about 1.19x
        "depth, 20% of all parameters": (allocate(model, bi, total, strategy="depth"),
                                         "block influence, whole blocks, 20% of all parameters"),
        "combined, 20% of all parameters": (allocate(model, both, total, strategy="combined", attn_share=0.0),
                                            "as combined, 20% of all parameters"),
    }


def bytes_of(sizes: dict, models: dict, engine: str, label: str) -> int:
    """The bytes a decode step reads: the GGUF file (llama.cpp) or the fp32 parameters (PyTorch)."""
    return sizes[label] if engine == "llama.cpp" else param_bytes(models[label])


def mb(n) -> float:
    return float("nan") if n is None else n / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--no-llama-cpp", action="store_true", help="PyTorch only")
    ap.add_argument("--llama-threads", type=int, default=None, help="default: pruneviz.threads.llama_threads()")
    ap.add_argument("--no-torch", action="store_true", help="llama.cpp only (more rounds in the same time)")
    args = ap.parse_args()
    protocol = SpeedProtocol(args.prompt, args.decode, tuple(int(b) for b in args.batches.split(",")), args.warmup,
                             args.repeats)
    use_llama = not args.no_llama_cpp and llama_cpp_available()
    # the idle cores before this script's own loading and scoring raise the load average
    n_llama = args.llama_threads or threads.llama_threads()  # chosen once, for every file
    pol = threads.policy()
    lm = load_bundled(device="cpu", dtype="float32")
    base, tok = lm.model.eval(), lm.tokenizer
    calib = calibration(tok, 16, 128)
    plans = make_plans(base, calib)
    models = {k: (base if p is None else apply_plan(base, p).eval()) for k, (p, _) in plans.items()}
    ids = prompt_ids(tok, protocol.prompt_tokens)
    runners, sizes, arch = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="pruneviz-deploy-") as td:
        try:
            for k, m in models.items():
                path = Path(td) / f"{k.replace(' ', '_')}.f16.gguf"
                rep = write_gguf(m, tok, path, "f16", plan=plans[k][0])
                sizes[k], arch[k] = rep.bytes, rep.arch
                if use_llama:
                    runners[k] = LlamaCppRunner(path, ids, protocol, threads=n_llama)
            samplers = {} if args.no_torch else \
                {("torch", k): (lambda m=m: torch_sample(m, ids, protocol)) for k, m in models.items()}
            samplers.update({("llama.cpp", k): r.sample for k, r in runners.items()})
            samples = interleaved(samplers, protocol, lambda f, t: print(f"  {f:4.0%} {t}", flush=True))
        finally:
            for r in runners.values():
                r.close()
    summ = {key: summarise(key[1], key[0], s, protocol) for key, s in samples.items()}
    rows, records = [], []
    b_lo = min(protocol.batch_sizes)
    for engine in ("torch", "llama.cpp"):
        for k in models:
            if (engine, k) not in summ:
                continue
            s, d = summ[(engine, k)], summ[(engine, "dense")]
            r = ratios(s, d)
            params = dense_params(models[k])
            rows.append([engine, k, f"{params / 1e6:.2f}M",
                         arch[k] if engine == "llama.cpp" else "fp32",
                         f"{mb(sizes[k] if engine == 'llama.cpp' else param_bytes(models[k])):.1f}",
                         *[f"{s.prefill_tps[b]:,.0f}" for b in protocol.batch_sizes],
                         *[f"{s.decode_tps[b]:,.1f}" for b in protocol.batch_sizes],
                         *[f"{r['prefill'][b]:.2f}x" for b in protocol.batch_sizes],
                         *[f"{r['decode'][b]:.2f}x" for b in protocol.batch_sizes],
                         *[f"{r['decode_cpu'][b]:.2f}x" if "decode_cpu" in r else "–" for b in protocol.batch_sizes],
                         "{:.2f}-{:.2f}x".format(*ratio_spread(s, d, b_lo)),
                         f"{bytes_of(sizes, models, engine, 'dense') / bytes_of(sizes, models, engine, k):.2f}x",
                         f"{mb(s.peak_bytes):,.0f}"])
            records.append({**s.to_dict(), "plan": plans[k][1], "ratio_vs_dense": r, "arch": arch[k],
                            "gguf_bytes": sizes[k], "params": params,
                            "plan_summary": plans[k][0].summary() if plans[k][0] is not None else None})
    bs = protocol.batch_sizes
    columns = ["engine", "model", "params", "format", "size MB",
               *[f"prefill tok/s b{b}" for b in bs], *[f"decode tok/s b{b}" for b in bs],
               *[f"prefill ×dense b{b}" for b in bs], *[f"decode ×dense b{b}" for b in bs],
               *[f"decode ×dense b{b}, CPU time" for b in bs], f"decode ×dense b{b_lo}, rounds' range",
               "bytes bound", "peak MB"]
    info = next(iter(runners.values())).info if runners else {}
    version = (f"{info.get('binding', 'llama-cpp-python')} {info.get('version', '?')}"
               + (", glibc-compatible copy of its libraries" if info.get("adapted") else "")) if runners \
        else "not installed"
    goal = _goal(summ, b_lo) if use_llama else "llama.cpp not installed: PyTorch only"
    proto = [
        "Model: SmolLM2-135M-Instruct (bundled), PyTorch fp32 on CPU and GGUF f16 in llama.cpp "
        f"({version}).",
        f"Plans: {RATIO:.0%} of non-embedding parameters removed (last two rows: of all parameters), no compensation. "
        + "; ".join(f"{k}: {d}" + (f" ({p.summary()})" if p is not None else "") for k, (p, d) in plans.items())
        + ".",
        f"Timing: {protocol.describe()}. Same token ids for every model and engine (a fixed English text). Every "
        f"model on both engines is timed once per round, interleaved, rotating the order; medians over rounds.",
        f"Threading (pruneviz.threads, before the script loaded the model): {threads.describe(pol)}; llama.cpp "
        f"n_threads = n_threads_batch = {n_llama} for every file (the idle cores: ggml's threads spin at every op's "
        f"barrier, so a thread beyond the free cores slows it several-fold); torch keeps every core (its passive "
        f"OpenMP threads sleep).",
        "Sizes: the GGUF f16 file for llama.cpp, the parameter bytes for PyTorch fp32 (in memory). Peak MB: "
        "llama.cpp: the runner process's peak resident set minus its resident set before loading (mapped weights, "
        "KV cache, compute buffers); PyTorch: parameter bytes plus the peak resident growth during a round "
        "(VmHWM after resetting it).",
        f"Ratios (×dense) are against the dense model on the same engine in the same run: tokens/s in wall-clock "
        f"time, and (\"CPU time\") tokens per CPU-second of the process (all its threads), which leaves out the "
        f"waiting for a core on a shared machine. Each ratio is the median over rounds of the ratio within a round "
        f"(pruneviz.speed.ratios: paired, so the machine's drift over minutes cancels); \"rounds' range\" is the "
        f"lowest and highest single-round decode ratio (the noise one measurement carries). \"Bytes bound\": dense "
        f"size / model size, the decode speed-up if decoding one token cost only reading the weights once (batch 1 "
        f"decode is memory-bound); removing whole blocks also saves their fixed per-layer costs, so depth can "
        f"exceed it slightly. At 113.27M parameters the bound is 1.19x for every plan: 1.2x at 20% of the "
        f"non-embedding parameters sits at the bound. Goal: llama.cpp decode b{b_lo} >= {GOAL}x dense for depth and "
        f"combined. Result: {goal}",
    ]
    write_table("deploy_speed", "Deploy speed: dense vs 20% pruned, PyTorch and llama.cpp (bundled model, CPU)",
                proto, columns, rows,
                extra={"policy": pol, "llama_threads": n_llama, "llama_cpp_binding": version,
                       "protocol_fields": protocol.to_dict(), "models": records, "goal": goal})


def _goal(summ: dict, b: int) -> str:
    """The goal per reading of "20% removed": of the non-embedding parameters (the project's target everywhere)
    and of all parameters; width plans are reported beside them."""
    dense, parts, best = summ[("llama.cpp", "dense")], [], {}
    for k in ("depth", "combined", "combined, widths x32", "depth, 20% of all parameters",
              "combined, 20% of all parameters", "width", "width, widths x32", "width per layer",
              "width per layer, widths x32"):
        if ("llama.cpp", k) not in summ:
            continue
        rs = ratios(summ[("llama.cpp", k)], dense)
        r, c = rs["decode"][b], rs["decode_cpu"][b]
        if not k.startswith("width"):  # per reading and kind (depth / combined): the best of its layouts
            reading = "of all parameters" if "all" in k else "of non-embedding parameters"
            kind = best.setdefault(reading, {}).setdefault(k.split(",")[0], (0.0, 0.0))
            best[reading][k.split(",")[0]] = (max(kind[0], r), max(kind[1], c))
        parts.append(f"{k} {r:.2f}x ({c:.2f}x in CPU time)")
    verdict = {reading: (all(w >= GOAL for w, _ in kinds.values()), all(c >= GOAL for _, c in kinds.values()))
               for reading, kinds in best.items()}
    said = "; ".join(f"20% {reading}: {'met' if w else 'NOT met'} in wall-clock tokens/s, "
                     f"{'met' if c else 'NOT met'} in CPU time" for reading, (w, c) in verdict.items())
    said += " (combined: the better of its two width layouts)"
    return f"{said} (llama.cpp decode b{b} vs dense: " + ", ".join(parts) + ")."


if __name__ == "__main__":
    main()
