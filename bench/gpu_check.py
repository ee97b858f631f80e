"""GPU check: every step of the pipeline once on CUDA, each timed, into bench/results/gpu_check.md (and .json).

    .venv/bin/python bench/gpu_check.py                      # CUDA, the bundled model (bash bench/gpu_check.sh)
    .venv/bin/python bench/gpu_check.py --device cpu --quick --out /tmp/gc   # dry run: same steps, tiny model

Steps: bf16 and fp16 loading (a forward pass each), every criterion of the registry on the bf16 model, the
SlimGPT solver, surgery (a FLAP plan at 20%), Hugging Face export and reload, GGUF export (pure-Python check),
perplexity of dense and pruned, and prefill/decode tokens/s of dense and pruned (pruneviz.speed). Each step has
its own timeout (``--step-timeout``, SIGALRM) and the whole a budget (``--budget``, steps after it are skipped),
so the check ends in under 8 minutes; a failing step is recorded with its error and the next steps go on. With
``--device cuda`` and no CUDA device the script says so and exits 0 without writing anything (the CPU path never
waits on it). Exit 1 if a step failed.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from common import RESULTS, machine

from pruneviz import threads

QUICK_TEXT = ("Structured pruning removes whole attention heads, groups and channels from a language model. "
              "The pruned model is smaller and faster; how much quality it keeps depends on what was removed. ") * 8


class StepTimeout(Exception):
    """A step ran past its timeout."""


def _alarm(signum, frame):
    raise StepTimeout("step timed out")


def parse_args(argv=None) -> argparse.Namespace:
    """``--device`` (cuda or cpu), ``--quick`` (tiny random model), ``--out`` (folder for gpu_check.md/.json),
    ``--step-timeout`` and ``--budget`` (seconds)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--quick", action="store_true", help="a tiny random model instead of the bundled one")
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu_check.md/.json (default bench/results; "
                    "with --quick a temporary folder)")
    ap.add_argument("--step-timeout", type=float, default=120.0)
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later steps are skipped")
    args = ap.parse_args(argv)
    if args.step_timeout <= 0 or args.budget <= 0:
        ap.error("--step-timeout and --budget must be positive")
    return args


def cuda_missing(device: str) -> str | None:
    """The message to stop with when ``device`` is cuda and torch sees no CUDA device (None otherwise)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return (f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}): the GPU "
                f"check needs one; nothing was run or written. For a dry run on CPU: --device cpu --quick")
    return None


# ---- the steps: each takes the shared context dict and returns a detail string -------------------------------------

def _forward_ok(model, ids) -> float:
    import torch

    with torch.inference_mode():
        logits = model(input_ids=ids.to(model.device)).logits.float()
    if not torch.isfinite(logits).all():
        raise RuntimeError("non-finite logits")
    return float(logits.abs().max())


def _load(ctx, dtype_name: str) -> str:
    import torch

    dtype = getattr(torch, dtype_name)
    if ctx["quick"]:
        from pruneviz.testing import tiny_model, tiny_tokenizer

        model, tok = tiny_model(dtype=dtype).to(ctx["device"]), tiny_tokenizer()
    else:
        from pruneviz.loading import load_model

        lm = load_model("bundled", device=ctx["device"], dtype=dtype_name)
        model, tok = lm.model, lm.tokenizer
    ctx["tokenizer"] = tok
    ctx[dtype_name] = model
    ids = torch.tensor([tok("The capital of France is", add_special_tokens=False).input_ids])
    p = next(model.parameters())
    return f"{p.dtype} on {p.device}, max |logit| {_forward_ok(model, ids):.3g}"


def _calibration(ctx):
    import torch

    from pruneviz.importance import Calibration

    if "calib" not in ctx:
        if ctx["quick"]:
            gen = torch.Generator().manual_seed(0)
            ctx["calib"] = Calibration(torch.randint(4, 96, (4, 32), generator=gen), "random", "", 0)
        else:
            from common import calibration

            ctx["calib"] = calibration(ctx["tokenizer"], 8, 128)
    return ctx["calib"]


def _criterion(ctx, name: str) -> str:
    from pruneviz.importance import compute

    imap = compute(ctx["bfloat16"], name, _calibration(ctx))
    ctx.setdefault("maps", {})[name] = imap
    peak = imap.meta.get("peak_memory_bytes") or imap.meta.get("peak_bytes")
    return f"maps {', '.join(imap.available())}" + (f", peak {peak / 2**20:.0f} MiB" if peak else "")


def _slimgpt(ctx) -> str:
    from pruneviz.criteria.slimgpt import slimgpt_prune_to

    plan, pruned = slimgpt_prune_to(ctx["bfloat16"], _calibration(ctx), 0.2)
    ids = _calibration(ctx).tokens[:1]
    return f"{plan.summary()}; max |logit| {_forward_ok(pruned, ids):.3g}"


def _surgery(ctx) -> str:
    from pruneviz.allocate import allocate
    from pruneviz.importance import compute
    from pruneviz.plan import dense_params
    from pruneviz.surgery import apply_plan

    model = ctx["bfloat16"]
    imap = ctx.get("maps", {}).get("flap") or compute(model, "flap", _calibration(ctx))
    plan = allocate(model, imap, 0.2, strategy="uniform", attn_share=0.0)
    pruned = apply_plan(model, plan)
    ctx["plan"], ctx["pruned"] = plan, pruned
    _forward_ok(pruned, _calibration(ctx).tokens[:1])
    return f"{plan.summary()}; {dense_params(model) / 1e6:.2f}M -> {dense_params(pruned) / 1e6:.2f}M parameters"


def _export_reload(ctx) -> str:
    import torch

    from pruneviz.export import save_pruned
    from pruneviz.loading import load_model

    folder = Path(ctx["tmp"]) / "hf-export"
    rep = save_pruned(ctx["pruned"], ctx["tokenizer"], folder, plan=ctx["plan"])
    back = load_model(str(folder), device=ctx["device"], dtype="bfloat16").model
    ids = _calibration(ctx).tokens[:1].to(ctx["device"])
    with torch.inference_mode():
        diff = float((back(input_ids=ids).logits.float() - ctx["pruned"](input_ids=ids).logits.float()).abs().max())
    return (f"{rep.format} format, verified max |Δ logit| {rep.reload_max_abs_diff:.3g}; reloaded on "
            f"{ctx['device']}: {diff:.3g}")


def _export_gguf(ctx) -> str:
    from pruneviz.export import save_pruned

    if ctx["quick"]:
        tok = None  # the tiny character tokenizer is not byte-level BPE: token ids only
    else:
        tok = ctx["tokenizer"]
    rep = save_pruned(ctx["pruned"], tok, Path(ctx["tmp"]) / "gguf-export", plan=ctx["plan"], format="gguf",
                      gguf_runtime="python")
    g = rep.gguf
    return f"{g['arch']} {g['weight_type']}, {g['bytes'] / 2**20:.1f} MiB, {g['verification']['runtime']}: ok"


def _perplexity(ctx) -> str:
    from pruneviz.data import get_text
    from pruneviz.evaluate import perplexity

    text = QUICK_TEXT if ctx["quick"] else get_text("default", part="eval")
    dense = perplexity(ctx["bfloat16"], ctx["tokenizer"], text, "quick")
    pruned = perplexity(ctx["pruned"], ctx["tokenizer"], text, "quick")
    if not (math.isfinite(dense.ppl) and math.isfinite(pruned.ppl)):
        raise RuntimeError(f"non-finite perplexity (dense {dense.ppl}, pruned {pruned.ppl})")
    return f"quick protocol, {dense.n_tokens} tokens: dense {dense.ppl:.2f}, pruned {pruned.ppl:.2f}"


def _speed(ctx) -> str:
    from pruneviz.speed import SpeedProtocol, interleaved, prompt_ids, ratios, summarise, torch_sample

    proto = SpeedProtocol(16, 4, (1, 2), 1, 2) if ctx["quick"] else SpeedProtocol(128, 32, (1, 8), 1, 3)
    vocab = ctx["bfloat16"].get_input_embeddings().weight.shape[0]
    ids = prompt_ids(None if ctx["quick"] else ctx["tokenizer"], proto.prompt_tokens, vocab)
    models = {"dense": ctx["bfloat16"], "pruned": ctx["pruned"]}
    samples = interleaved({k: (lambda m=m: torch_sample(m, ids, proto)) for k, m in models.items()}, proto)
    s = {k: summarise(k, "torch", v, proto) for k, v in samples.items()}
    r = ratios(s["pruned"], s["dense"])
    parts = [f"b{b}: prefill {s['dense'].prefill_tps[b]:,.0f} -> {s['pruned'].prefill_tps[b]:,.0f} tok/s "
             f"({r['prefill'][b]:.2f}x), decode {s['dense'].decode_tps[b]:,.1f} -> {s['pruned'].decode_tps[b]:,.1f} "
             f"tok/s ({r['decode'][b]:.2f}x)" for b in proto.batch_sizes]
    ctx["speed"] = {k: v.to_dict() for k, v in s.items()}
    return f"bf16, {proto.describe()}; " + "; ".join(parts)


def steps(ctx) -> list[tuple[str, callable]]:
    """The steps in order (names and functions of ``ctx``); criteria from the registry."""
    from pruneviz.importance import available

    out = [("load bf16", lambda: _load(ctx, "bfloat16")), ("load fp16", lambda: _load(ctx, "float16"))]
    out += [(f"criterion {n}", (lambda n=n: _criterion(ctx, n))) for n in sorted(available())]
    out += [("SlimGPT solver", lambda: _slimgpt(ctx)), ("surgery", lambda: _surgery(ctx)),
            ("export + reload (HF)", lambda: _export_reload(ctx)), ("export GGUF", lambda: _export_gguf(ctx)),
            ("perplexity", lambda: _perplexity(ctx)), ("decode speed", lambda: _speed(ctx))]
    return out


def run_steps(ctx, step_timeout: float, budget: float) -> list[dict]:
    """Run every step with its timeout; a failure is recorded (with the error) and the next step runs; once the
    budget is spent the rest are recorded as skipped."""
    import torch

    rows, t_start = [], time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    for name, fn in steps(ctx):
        left = budget - (time.perf_counter() - t_start)
        if left <= 1:
            rows.append({"step": name, "status": "skipped", "seconds": 0.0, "detail": "total budget spent"})
            continue
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, min(step_timeout, left))
        try:
            detail, status = fn(), "ok"
            if ctx["device"] == "cuda":
                torch.cuda.synchronize()
        except StepTimeout:
            detail, status = f"timed out after {min(step_timeout, left):.0f} s", "TIMEOUT"
        except Exception as e:  # noqa: BLE001 - recorded, the check goes on
            detail, status = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", "FAILED"
            traceback.print_exc()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        rows.append({"step": name, "status": status, "seconds": time.perf_counter() - t0, "detail": detail})
        print(f"[{status}] {name} ({rows[-1]['seconds']:.1f} s): {detail}", flush=True)
    return rows


def write_results(out: Path, rows: list[dict], args, seconds: float, ctx) -> Path:
    """``out/gpu_check.md`` and ``.json``: machine, policy, protocol, one row per step."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    m = machine()
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "none (CPU dry run)"
    n_ok = sum(r["status"] == "ok" for r in rows)
    lines = [f"# GPU check{' (quick dry run)' if args.quick else ''}", "",
             f"Device {args.device}, GPU {gpu}; CPU {m['cpu']}, {m['cores']} cores; Python {m['python']}, torch "
             f"{m['torch']} (CUDA {torch.version.cuda or 'none'}), transformers {m['transformers']}; {m['date']}, "
             f"commit {m['commit']}. Threading: {threads.describe()}.", "",
             f"Model: {'tiny random llama (pruneviz.testing)' if args.quick else 'SmolLM2-135M-Instruct (bundled)'}"
             f"; criteria on the bf16 model; plans at 20% of non-embedding parameters. Per-step timeout "
             f"{args.step_timeout:.0f} s, budget {args.budget:.0f} s. **{n_ok}/{len(rows)} steps ok in "
             f"{seconds:.0f} s.**", "", "| step | status | seconds | detail |", "|---|---|---|---|"]
    cell = lambda text: text.replace("|", "\\|")  # noqa: E731 - a Markdown table cell
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']:.1f} | {cell(r['detail'])} |" for r in rows]
    path = out / "gpu_check.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "gpu_check.json").write_text(json.dumps({"machine": m, "device": args.device, "gpu": gpu,
                                                    "quick": args.quick, "policy": threads.policy(),
                                                    "seconds": seconds, "rows": rows, "speed": ctx.get("speed")},
                                                   indent=1, default=str))
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    why = cuda_missing(args.device)
    if why:
        print(f"gpu_check: {why}")
        return 0
    out = args.out or (Path(tempfile.mkdtemp(prefix="pruneviz-gpu-check-")) if args.quick else RESULTS)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pruneviz-gpu-check-work-") as tmp:
        ctx = {"device": args.device, "quick": args.quick, "tmp": tmp}
        rows = run_steps(ctx, args.step_timeout, args.budget)
    path = write_results(out, rows, args, time.perf_counter() - t0, ctx)
    print(path.read_text())
    failed = [r["step"] for r in rows if r["status"] != "ok"]
    if failed:
        print(f"gpu_check: {len(failed)} step(s) not ok: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
