"""Command line: inspect, score, plan, prune (SlimGPT), evaluate, export and chat, headless (e.g. on a GPU server).

    python -m pruneviz inspect
    python -m pruneviz score --criterion wanda_sp --samples 16 --seq-len 128 --out scores.json
    python -m pruneviz plan --scores scores.json --ratio 0.2 --strategy global --out plan.json
    python -m pruneviz slimgpt --ratio 0.2 --out plan.json --export out/smol-slimgpt
    python -m pruneviz evaluate --plan plan.json --protocol paper
    python -m pruneviz export --plan plan.json --out out/smol-pruned
    python -m pruneviz chat --plan plan.json "Write a haiku about pruning"

Every command takes ``--model`` (bundled default, a Hugging Face id or a folder), ``--device``, ``--dtype``.
Errors print one line that says what to do and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---- shared plumbing ----------------------------------------------------------------------------------------------

def _bar(desc: str):
    """A tqdm progress callback ``(fraction, message)``."""
    from tqdm import tqdm

    bar = tqdm(total=1000, desc=desc, unit="‰", leave=False, file=sys.stderr)

    def update(fraction, message="", *_):
        if isinstance(fraction, int) and isinstance(message, int):  # (done, total) style
            fraction = fraction / max(message, 1)
            message = ""
        bar.n = int(1000 * min(max(float(fraction), 0.0), 1.0))
        bar.set_postfix_str(str(message)[:40])
        bar.refresh()

    update.close = bar.close
    return update


def _load(args):
    from .loading import load_model

    lm = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    print(f"loaded {lm.name} on {lm.device} ({str(lm.dtype).replace('torch.', '')}) in {lm.load_seconds:.1f} s",
          file=sys.stderr)
    return lm


def _calibration(args, tokenizer):
    from .data import calibration_windows, get_text, text_hash
    from .importance import Calibration

    text = get_text(args.text, part="calib")
    tokens = calibration_windows(tokenizer, text, args.samples, args.seq_len, args.seed)
    return Calibration(tokens, text_name=args.text, text_sha256=text_hash(text), seed=args.seed)


def _parse_options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _read_plan(path: str):
    from .export import read_plan

    return read_plan(path)


def _read_scores(path: str, map_cls):
    """An importance map from a ``score --out`` JSON file, or a CriterionError saying what is wrong with it."""
    from .errors import CriterionError, PrunevizError

    try:
        return map_cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except PrunevizError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CriterionError(f"cannot read the scores file {path} ({type(e).__name__}: {e}); "
                             f"pass a JSON file written by 'python -m pruneviz score --out'") from e


def _pruned(args, lm):
    """The model after ``--plan`` (physically pruned), or the dense model when no plan is given."""
    if not getattr(args, "plan", None):
        return lm.model, None
    from .surgery import apply_plan

    plan = _read_plan(args.plan)
    calib = _calibration(args, lm.tokenizer).tokens if plan.compensation else None
    progress = _bar("applying plan")
    try:
        return apply_plan(lm.model, plan, calibration=calib, progress=progress), plan
    finally:
        progress.close()


# ---- commands -----------------------------------------------------------------------------------------------------

def cmd_inspect(args) -> None:
    from .arch import adapter_for, geometry_of, unit_params
    from .plan import dense_params

    lm = _load(args)
    g, adapter = geometry_of(lm.model), adapter_for(lm.model)
    print(g.describe())
    print(f"parameters: {dense_params(lm.model):,} total, {dense_params(lm.model, True):,} non-embedding")
    for kind in ("head", "kv", "channel", "block"):
        print(f"  one {kind:8s} owns {unit_params(g, adapter, lm.model, kind):>12,} parameters")
    from .importance import available

    print("criteria: " + ", ".join(f"{n} ({c.title})" for n, c in sorted(available().items())))


def cmd_score(args) -> None:
    from .importance import compute, get, make_options

    lm = _load(args)
    crit = get(args.criterion)
    calib = _calibration(args, lm.tokenizer) if crit.needs_calibration else None
    progress = _bar(args.criterion)
    try:
        imap = compute(lm.model, args.criterion, calib, make_options(args.criterion, **_parse_options(args.option)),
                       progress=progress)
    finally:
        progress.close()
    Path(args.out).write_text(imap.to_json())
    print(f"{args.criterion}: maps {', '.join(imap.available())} in {imap.meta['seconds']:.1f} s -> {args.out}")


def cmd_plan(args) -> None:
    from .allocate import Target, allocate
    from .export import write_plan
    from .importance import ImportanceMap

    lm = _load(args)
    imap = _read_scores(args.scores, ImportanceMap)
    plan = allocate(lm.model, imap, Target(args.ratio, args.of), strategy=args.strategy,
                    attn_unit=args.attn_unit, plus_rule=args.plus_rule, skip_first=args.skip_first,
                    skip_last=args.skip_last)
    write_plan(plan, args.out)
    prov = plan.provenance
    print(f"{plan.summary()}; removes {prov.get('achieved_ratio', 0):.1%} of {args.of} parameters -> {args.out}")


def cmd_slimgpt(args) -> None:
    from .criteria.slimgpt import slimgpt_prune
    from .export import save_pruned, write_plan

    lm = _load(args)
    calib = _calibration(args, lm.tokenizer)
    progress = _bar("slimgpt")
    try:
        plan, pruned = slimgpt_prune(lm.model, calib, args.ratio, schedule=args.schedule, attn_unit=args.attn_unit,
                                     progress=progress)
    finally:
        progress.close()
    write_plan(plan, args.out)
    print(f"{plan.summary()} -> {args.out}")
    if args.export:
        report = save_pruned(pruned, lm.tokenizer, args.export, plan=plan)
        print(f"exported {report.format} checkpoint to {report.folder} (reload max |Δlogit| "
              f"{report.reload_max_abs_diff:g})")


def cmd_evaluate(args) -> None:
    from .data import get_text
    from .evaluate import get_protocol, perplexity
    from .plan import dense_params

    lm = _load(args)
    model, plan = _pruned(args, lm)
    text = get_text(args.text, part="eval")
    protocol = get_protocol(args.protocol)
    progress = _bar("perplexity")
    try:
        res = perplexity(model, lm.tokenizer, text, protocol, progress=progress)
    finally:
        progress.close()
    label = plan.summary() if plan else "dense"
    print(f"{label}\n  params {dense_params(model):,}\n  perplexity {res.ppl:.3f} on {res.n_tokens} tokens "
          f"({res.n_windows} windows, {res.seconds:.1f} s)\n  protocol: {protocol.describe()}")


def cmd_export(args) -> None:
    from .export import save_pruned

    lm = _load(args)
    model, plan = _pruned(args, lm)
    report = save_pruned(model, lm.tokenizer, args.out, plan=plan, overwrite=args.overwrite)
    print(f"{report.format} checkpoint -> {report.folder} ({len(report.files)} files, {report.params:,} params); "
          f"reload max |Δlogit| {report.reload_max_abs_diff:g}"
          + (f", trust_remote_code {report.remote_code_max_abs_diff:g}"
             if report.remote_code_max_abs_diff is not None else ""))


def cmd_chat(args) -> None:
    from .chat import ReplyStream

    lm = _load(args)
    model, _ = _pruned(args, lm)
    stream = ReplyStream(model, lm.tokenizer, [{"role": "user", "content": args.prompt}],
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    for chunk in stream:
        print(chunk, end="", flush=True)
    stats = getattr(stream, "stats", None)
    print()
    if stats is not None:
        print(f"[{stats.n_tokens} tokens, {stats.tokens_per_s:.1f} tokens/s]", file=sys.stderr)


# ---- parser -------------------------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, calibration: bool = False) -> None:
    p.add_argument("--model", default=os.environ.get("PRUNEVIZ_MODEL", "bundled"),
                   help="'bundled' (SmolLM2-135M-Instruct), a Hugging Face id or a local folder")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cuda, cpu, ...")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16/fp16 on GPU), fp32, bf16, fp16")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code (off)")
    if calibration:
        p.add_argument("--text", default="default",
                       help="default (Python docs, calibration part), file:PATH, or hf:wikitext2 / hf:c4")
        p.add_argument("--samples", type=int, default=16, help="calibration windows")
        p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window")
        p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pruneviz", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="geometry, unit sizes and criteria")
    _common(p)
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("score", help="compute an importance map")
    _common(p, calibration=True)
    p.add_argument("--criterion", required=True)
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="criterion option (repeatable)")
    p.add_argument("--out", default="scores.json")
    p.set_defaults(fn=cmd_score)
    p = sub.add_parser("plan", help="allocate a plan from an importance map and a target")
    _common(p)
    p.add_argument("--scores", required=True)
    p.add_argument("--ratio", type=float, required=True, help="share of parameters to remove, in (0, 1)")
    p.add_argument("--of", default="non_embedding", choices=["non_embedding", "total"])
    p.add_argument("--strategy", default="uniform",
                   help="uniform, incremental (SlimGPT schedule), global (FLAP), depth, combined")
    p.add_argument("--attn-unit", default="kv", choices=["kv", "head"])
    p.add_argument("--plus-rule", action="store_true", help="depth: keep the first four and last two blocks")
    p.add_argument("--skip-first", type=int, default=0, help="width: keep the first N layers whole (LLM-Pruner: 4)")
    p.add_argument("--skip-last", type=int, default=0, help="width: keep the last N layers whole (LLM-Pruner: 2)")
    p.add_argument("--out", default="plan.json")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("slimgpt", help="run the SlimGPT OBS solver (plan + compensated weights)")
    _common(p, calibration=True)
    p.add_argument("--ratio", type=float, required=True)
    p.add_argument("--schedule", default="log_increase")
    p.add_argument("--attn-unit", default="kv", choices=["kv", "head"])
    p.add_argument("--out", default="plan.json")
    p.add_argument("--export", help="also export the pruned checkpoint to this folder")
    p.set_defaults(fn=cmd_slimgpt)
    for name, fn, hlp in (("evaluate", cmd_evaluate, "perplexity of the dense model or of --plan"),
                          ("export", cmd_export, "write a verified checkpoint of --plan"),
                          ("chat", cmd_chat, "one reply from the dense model or --plan")):
        p = sub.add_parser(name, help=hlp)
        _common(p, calibration=True)
        p.add_argument("--plan", help="plan JSON (default: the dense model)")
        if name == "evaluate":
            p.add_argument("--protocol", default="quick", help="quick, paper (LLM-Pruner 128-token windows), long")
        if name == "export":
            p.add_argument("--out", required=True)
            p.add_argument("--overwrite", action="store_true")
        if name == "chat":
            p.add_argument("prompt")
            p.add_argument("--max-new-tokens", type=int, default=96)
            p.add_argument("--temperature", type=float, default=0.0)
        p.set_defaults(fn=fn)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .errors import PrunevizError

    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except PrunevizError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
