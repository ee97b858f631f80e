"""Command line: inspect, score, plan, prune (SlimGPT), evaluate, export, chat and LoRA recovery, headless
(e.g. on a GPU server).

    python -m pruneviz inspect
    python -m pruneviz score --criterion wanda_sp --samples 16 --seq-len 128 --out scores.json
    python -m pruneviz score --criterion wanda_sp --model path/to/llama-70b --offload disk   # block by block
    python -m pruneviz plan --scores scores.json --ratio 0.2 --strategy global --out plan.json
    python -m pruneviz plan --criterion blockpruner --ratio 0.2 --samples 8 --out plan.json   # iterative search
    python -m pruneviz slimgpt --ratio 0.2 --out plan.json --export out/smol-slimgpt
    python -m pruneviz evaluate --plan plan.json --protocol paper
    python -m pruneviz sweep --criterion magnitude --criterion wanda_sp --ratios 0.1,0.3,0.5 --out sweep.csv
    python -m pruneviz export --plan plan.json --out out/smol-pruned
    python -m pruneviz chat --plan plan.json "Write a haiku about pruning"
    python -m pruneviz recover --plan plan.json --steps 100 --out out/smol-recovered

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

    def update(fraction, message=""):
        bar.n = int(1000 * min(max(float(fraction), 0.0), 1.0))
        bar.set_postfix_str(str(message)[:40])
        bar.refresh()

    update.close = bar.close
    return update


def _load(args):
    from .loading import load_model

    offload = getattr(args, "offload", None)
    if offload:
        from .loading import load_offloaded

        lm = load_offloaded(args.model, device=args.device, dtype=args.dtype, offload=offload,
                            resident_layers=args.resident_layers, offload_folder=args.offload_folder,
                            trust_remote_code=args.trust_remote_code)
    else:
        lm = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    where = f", blocks offloaded to {offload}" if offload else ""
    print(f"loaded {lm.name} on {lm.device} ({str(lm.dtype).replace('torch.', '')}{where}) in "
          f"{lm.load_seconds:.1f} s", file=sys.stderr)
    return lm


def _offload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offload", choices=["disk", "cpu"],
                   help="models larger than the device: keep decoder blocks on disk (or in CPU memory, for a GPU) "
                        "and score them one block at a time (magnitude, wanda_sp, flap, slimgpt)")
    p.add_argument("--resident-layers", type=int, default=0, help="with --offload: blocks kept on the device")
    p.add_argument("--offload-folder", help="with --offload disk: where the blocks are written (default: a temp dir)")


def _calibration(args, tokenizer, model=None):
    from .data import calibration_windows, get_text, text_hash
    from .importance import Calibration

    if args.text == "self":  # the model writes its own calibration text (cached per model and seed)
        from .errors import PrunevizError
        from .selfcal import SelfGenOptions, self_generated

        if model is None:
            raise PrunevizError("--text self needs the loaded model to write its calibration text")
        return self_generated(model, tokenizer,
                              SelfGenOptions(n_samples=args.samples, seq_len=args.seq_len, seed=args.seed))
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
        if Path(path).is_file() and Path(path).stat().st_size > 512 * 1024 * 1024:
            raise CriterionError(f"{path} is larger than 512 MiB, too large for a scores file")
        return map_cls.from_json(Path(path).read_text(encoding="utf-8"))
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
    calib = _calibration(args, lm.tokenizer, lm.model).tokens if plan.compensation else None
    progress = _bar("applying plan")
    try:
        return apply_plan(lm.model, plan, calibration=calib, progress=progress), plan
    finally:
        progress.close()


# ---- commands -----------------------------------------------------------------------------------------------------

def cmd_inspect(args) -> None:
    from .arch import adapter_for, family_notes, geometry_of, unit_params
    from .plan import dense_params

    lm = _load(args)
    g, adapter = geometry_of(lm.model), adapter_for(lm.model)
    print(g.describe())
    for note in family_notes(lm.model):  # generic llama-like, multi-query attention, post-norms, vocabulary share
        print(f"note: {note}")
    print(f"parameters: {dense_params(lm.model):,} total, {dense_params(lm.model, True):,} non-embedding")
    for kind in ("head", "kv", "channel", "block"):
        print(f"  one {kind:8s} owns {unit_params(g, adapter, lm.model, kind):>12,} parameters")
    from .importance import available

    print("criteria: " + ", ".join(f"{n} ({c.title})" for n, c in sorted(available().items())))


def cmd_score(args) -> None:
    from .fsio import atomic_write_text, check_file_target
    from .importance import compute, get, make_options

    crit = get(args.criterion)
    options = make_options(args.criterion, **_parse_options(args.option))
    check_file_target(args.out, what="the scores")  # before loading and scoring, not after
    lm = _load(args)
    calib = _calibration(args, lm.tokenizer, lm.model) if crit.needs_calibration else None
    progress = _bar(args.criterion)
    try:
        imap = compute(lm.model, args.criterion, calib, options, progress=progress)
    finally:
        progress.close()
    atomic_write_text(args.out, imap.to_json(), "the scores")
    print(f"{args.criterion}: maps {', '.join(imap.available())} in {imap.meta['seconds']:.1f} s -> {args.out}")


# searches that re-score after every removal (criterion -> its strategy), run by `plan --criterion`
SEARCHES = {"blockpruner": "sub_blocks"}


def _search_plan(args, lm):
    """The plan of an iterative search (``plan --criterion blockpruner``): it scores as it removes."""
    from .allocate import Target
    from .criteria.blockpruner import BlockPrunerOptions, blockpruner_search

    calib = _calibration(args, lm.tokenizer, lm.model)
    progress = _bar(f"{args.criterion} search")
    try:
        plan, _ = blockpruner_search(lm.model, calib, Target(args.ratio, args.of),
                                     BlockPrunerOptions(score_blocks=False), progress=progress)
    finally:
        progress.close()
    return plan


def cmd_plan(args) -> None:
    from .allocate import Target, allocate
    from .errors import PlanError
    from .export import write_plan
    from .fsio import check_file_target
    from .importance import ImportanceMap

    if bool(args.scores) == bool(args.criterion):
        raise PlanError("plan needs --scores (allocate a stored map) or --criterion (an iterative search: "
                        f"{', '.join(SEARCHES)}), one of them")
    if args.criterion and args.criterion not in SEARCHES:
        raise PlanError(f"--criterion runs an iterative search, which {args.criterion!r} has not; one of "
                        f"{', '.join(SEARCHES)}, or score it first and pass --scores")
    strategy = args.strategy or (SEARCHES[args.criterion] if args.criterion else "uniform")
    if args.criterion and strategy != SEARCHES[args.criterion]:
        raise PlanError(f"the {args.criterion} search allocates with --strategy {SEARCHES[args.criterion]}; "
                        f"for {strategy}, score first and pass --scores")
    _check_compensation(args.compensation)
    if args.criterion and (args.compensation or args.attn_share is not None):
        raise PlanError(f"the {args.criterion} search removes sub-blocks whole: --compensation and --attn-share "
                        f"apply to allocations from --scores")
    imap = _read_scores(args.scores, ImportanceMap) if args.scores else None  # fails before the model loads
    check_file_target(args.out, what="the plan")
    lm = _load(args)
    if args.criterion:
        plan = _search_plan(args, lm)
    else:
        plan = allocate(lm.model, imap, Target(args.ratio, args.of), strategy=strategy,
                        compensation=args.compensation, attn_unit=args.attn_unit, attn_share=args.attn_share,
                        attn_rounding=args.attn_rounding, plus_rule=args.plus_rule, skip_first=args.skip_first,
                        skip_last=args.skip_last, deployable=args.deployable, multiple_of=args.multiple_of or 1)
    write_plan(plan, args.out)
    prov = plan.provenance
    print(f"{plan.summary()}; removes {prov.get('achieved_ratio', 0):.1%} of {args.of} parameters -> {args.out}")


def cmd_slimgpt(args) -> None:
    from .allocate import Target
    from .criteria.slimgpt import slimgpt_prune_to
    from .export import check_export_target, save_pruned, write_plan
    from .fsio import check_file_target

    check_file_target(args.out, what="the plan")  # both targets are checked before the solver runs
    if args.export:
        check_export_target(args.export)
    lm = _load(args)
    calib = _calibration(args, lm.tokenizer, lm.model)
    progress = _bar("slimgpt")
    try:
        plan, pruned = slimgpt_prune_to(lm.model, calib, Target(args.ratio, args.of), schedule=args.schedule,
                                        attn_unit=args.attn_unit, attn_rounding=args.attn_rounding,
                                        update_scale=args.update_scale,
                                        percdamp=args.percdamp, progress=progress)
    finally:
        progress.close()
    write_plan(plan, args.out)
    print(f"{plan.summary()} -> {args.out}")
    if args.export:
        report = save_pruned(pruned, lm.tokenizer, args.export, plan=plan, protect=[lm.path] if lm.path else (),
                             format=args.format, weight_type=args.weight_type)
        _print_export(report)


def cmd_evaluate(args) -> None:
    from .data import domain_note, get_text
    from .evaluate import get_protocol, perplexity
    from .plan import dense_params

    protocol = get_protocol(args.protocol)  # an unknown protocol or a bad plan file fails before the model loads
    if args.plan:
        _read_plan(args.plan)
    text = get_text(args.text, part="eval")
    lm = _load(args)
    model, plan = _pruned(args, lm)
    progress = _bar("perplexity")
    try:
        res = perplexity(model, lm.tokenizer, text, protocol, progress=progress)
    finally:
        progress.close()
    label, shown = _model_label(lm, plan)
    calib_name = (shown.provenance.get("calibration") or {}).get("text") if shown else None
    note, same = domain_note(calib_name, args.text)
    print(f"{label}\n  params {dense_params(model):,}\n  perplexity {res.ppl:.3f} on {res.n_tokens} tokens "
          f"({res.n_windows} windows, {res.seconds:.1f} s)\n  protocol: {protocol.describe()}\n  text: {note}")
    if same:
        print("  note: evaluate on a text from another domain too (--text file:PATH): numbers on the calibration's "
              "domain flatter methods that fit it", file=sys.stderr)
    if args.fidelity:
        _print_fidelity(args, lm, model, text, protocol)
    if args.tasks:
        models = [("dense", lm.model)] + ([("pruned", model)] if plan else [])
        _print_zeroshot(args, lm.tokenizer, models)


def _model_label(lm, plan):
    """(label, plan it states) for a result line: the plan applied here; else the plan an exported model carries
    ("pruned export: ..."); else "dense"."""
    from .export import plan_of

    if plan is not None:
        return plan.summary(), plan
    carried = plan_of(lm.model)
    if carried is not None:
        return f"pruned export: {carried.summary()}", carried
    return ("pruned export" if _is_pruned(lm) else "dense"), None


def _print_fidelity(args, lm, model, text, protocol) -> None:
    from .errors import PrunevizError
    from .fidelity import fidelity

    if not args.plan:
        raise PrunevizError("--fidelity compares the pruned model with the dense one: give a --plan.")
    progress = _bar("fidelity")
    try:
        f = fidelity(lm.model, model, lm.tokenizer, text, protocol, progress=progress)
    finally:
        progress.close()
    print(f"fidelity to the dense model ({f.n_tokens} tokens, {f.seconds:.1f} s)\n"
          f"  KL(dense||pruned) mean {f.kl_mean:.4f} nats, p99 {f.kl_p99:.4f}\n"
          f"  top-1 agreement {100 * f.top1_agreement:.2f}%\n"
          f"  PPL ratio {f.ppl_ratio:.4f} ({f.ppl_dense:.3f} -> {f.ppl_pruned:.3f})")


def _print_zeroshot(args, tokenizer, models) -> None:
    from .zeroshot import paper_average, run_tasks

    results = []
    for label, m in models:
        progress = _bar(f"lm-eval {label}")
        try:
            results.append((label, run_tasks(m, tokenizer, args.tasks, limit=args.limit, task_dir=args.task_dir,
                                             batch_size=args.batch_size, progress=progress)))
        finally:
            progress.close()
    print(f"zero-shot ({results[0][1].protocol()})")
    print(f"  {'task':<16}" + "".join(f"{label + ' acc':>18}{label + ' acc_norm':>20}" for label, _ in results))
    for i, score in enumerate(results[0][1].scores):
        cells = []
        for _, r in results:
            s = r.scores[i]
            cells += [_pm(s.acc, s.acc_stderr, 18), _pm(s.acc_norm, s.acc_norm_stderr, 20)]
        print(f"  {score.task:<16}" + "".join(cells) + f"   (n={score.n})")
    for label, r in results:
        avg = paper_average(r)
        if avg is not None:
            print(f"  seven-task average of the papers ({label}): {100 * avg:.2f}")


def _pm(value, stderr, width: int) -> str:
    text = "-" if value is None else f"{100 * value:.2f}" + (f" ± {100 * stderr:.2f}" if stderr is not None else "")
    return f"{text:>{width}}"


def parse_params(text: str) -> float:
    """A parameter count: ``113.27M``, ``1.2B``, ``350k`` or a plain number."""
    from .errors import PlanError

    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}
    t = str(text).strip().upper()
    try:
        return float(t[:-1]) * scale[t[-1]] if t and t[-1] in scale else float(t)
    except ValueError:
        raise PlanError(f"--params is a parameter count such as 113.27M or 1.2B, not {text!r}") from None


def _recipe_target(args, model):
    from .allocate import Target
    from .errors import PlanError
    from .plan import dense_params

    if (args.params is None) == (args.ratio is None):
        raise PlanError("give exactly one of --params (the pruned model's size, e.g. 113.27M) or --ratio")
    if args.ratio is not None:
        return Target(args.ratio, args.of)
    want, dense, base = parse_params(args.params), dense_params(model), dense_params(model, args.of == "non_embedding")
    if not 0 < want < dense:
        raise PlanError(f"--params {args.params} must be below the dense model's {dense / 1e6:.2f}M parameters")
    return Target((dense - want) / base, args.of)


def _check_compensation(name: str | None, *also: str) -> None:
    """PlanError unless ``name`` is None, one of ``also`` or a registered compensation solver."""
    from .errors import PlanError
    from .surgery import compensators

    if name is not None and name not in also + compensators():
        raise PlanError(f"unknown --compensation {name!r}; one of {', '.join(also + compensators())}")


def _recipe_with(recipe, args):
    """``recipe`` with the CLI's --channel-order, --compensation (``"none"``: no refit) and --multiple-of; the
    recipe checks the combination (before the model loads)."""
    from dataclasses import replace

    from .errors import PlanError

    _check_compensation(args.compensation, "none")
    changes = {}
    if args.compensation is not None:
        changes["compensation"] = None if args.compensation == "none" else args.compensation
    if args.channel_order:
        changes["channel_order"] = args.channel_order
    ridge = getattr(args, "ridge", None)
    if ridge is not None:
        changes["ridge"] = _ridge_value(ridge)
    elif changes.get("compensation", recipe.compensation) not in ("affine_local", "affine_sequential"):
        changes["ridge"] = None  # the reconstruction belongs to the sequential refits: off with another refit
    try:
        recipe = replace(recipe, **changes)
        return recipe.with_alloc(multiple_of=args.multiple_of) if args.multiple_of is not None else recipe
    except ValueError as e:
        if "ridge" in str(e):
            raise PlanError(f"{e}; pass --ridge none with another --compensation") from e
        raise PlanError(f"{e}; with --channel-order sequential pass --compensation affine_local, or "
                        f"--channel-order dense for another --compensation") from e


def _ridge_value(text: str) -> float | None:
    """``--ridge``: "none" or a number >= 0."""
    from .errors import PlanError

    if text == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise PlanError(f"--ridge is a number >= 0 (the ridge reconstruction's lambda) or none, not {text!r}")
    return value


def cmd_prune(args) -> None:
    from dataclasses import replace

    from .errors import TextError
    from .export import check_export_target, save_pruned
    from .plan import dense_params
    from .recipe import RECOMMENDED, run_recipe

    check_export_target(args.out, args.overwrite)  # refused before the model loads
    recipe = RECOMMENDED if args.calibration == "self" else replace(RECOMMENDED, calibration="text", text=args.text)
    recipe = _recipe_with(recipe, args)  # refused before the model loads too
    lm = _load(args)
    target = _recipe_target(args, lm.model)
    if args.samples is not None:
        if args.samples < 1:
            raise TextError(f"--samples is a number of calibration windows (1 or more), not {args.samples}")
        recipe = replace(recipe, samples=args.samples)
    if args.seq_len is not None:
        if args.seq_len < 2:
            raise TextError(f"--seq-len is a number of tokens per window (2 or more), not {args.seq_len}")
        recipe = replace(recipe, seq_len=args.seq_len)
    print(f"recipe: {recipe.describe()}; target {target.describe()}")
    progress = _bar("recommended recipe")
    try:
        result = run_recipe(lm.model, lm.tokenizer, target, recipe, progress=progress)
    finally:
        progress.close()
    report = save_pruned(result.model, lm.tokenizer, args.out, plan=result.plan, overwrite=args.overwrite,
                         protect=[lm.path] if lm.path else (), format=args.format, weight_type=args.weight_type)
    print(f"{result.plan.summary()}; {dense_params(result.model) / 1e6:.2f}M parameters "
          f"(dense {dense_params(lm.model) / 1e6:.2f}M) -> {report.folder}")
    _print_export(report)


def cmd_cache(args) -> None:
    from .llamacpp import clear_compatible_copies, compatible_copies
    from .loading import cache_dir, cached_ggufs, clear_gguf_cache

    entries = cached_ggufs()
    if args.action == "clear":
        print(f"removed {clear_gguf_cache()} cached GGUF conversion(s) and {clear_compatible_copies()} "
              f"glibc-compatible llama.cpp library copy(ies) from {cache_dir()}")
        return
    if not entries:
        print(f"no cached GGUF conversions in {cache_dir()}")
    for e in entries:
        print(f"{e['bytes'] / 2**20:>9,.0f} MiB  {e['folder']}  <- {e['file']} (sha256 {str(e['sha256'])[:16]})")
    for e in compatible_copies():
        print(f"{e['bytes'] / 2**20:>9,.0f} MiB  {e['folder']}  (llama.cpp libraries adapted to this glibc)")


def cmd_runs(args) -> None:
    import json

    from .runs import RunStore

    store = RunStore(args.db)
    if args.action == "list":
        runs = store.list(kind=args.kind)
        runs = [r for r in runs if args.model is None or args.model in r.model_key]
        if not runs:
            print(f"no stored runs in {store.path}" + (" matching the filters" if args.model or args.kind else ""))
        for r in runs:
            ppl = r.metrics.get("ppl", r.metrics.get("pruned_ppl"))
            print(f"#{r.id:<5} {r.when}  {r.kind:<10} {r.model_name[:32]:<32} "
                  f"{('PPL %.4g' % ppl) if isinstance(ppl, (int, float)) else '':<12} {r.label[:60]}")
        return
    if args.action == "compare":
        rows = store.compare(args.ids)
        keys = list(dict.fromkeys(k for row in rows for k in row))
        for k in keys:
            print(f"{k:<24} " + "  ".join(f"{str(row.get(k, '')):<28}"[:28] for row in rows))
        return
    if not args.ids:
        from .runs import RunStoreError

        raise RunStoreError(f"runs {args.action} needs at least one run id (see `python -m pruneviz runs list`)")
    for rid in args.ids:
        if args.action == "show":
            run = store.get(rid)
            print(json.dumps(run.to_dict(), indent=1, sort_keys=True))
            if args.plan_out:
                from .export import write_plan
                from .runs import plan_of_run

                print(f"plan written to {write_plan(plan_of_run(run), args.plan_out)}")
        else:
            run = store.delete(rid)
            print(f"deleted run #{run.id} ({run.kind}, {run.label or run.summary()}) from {store.path}")


def cmd_export(args) -> None:
    from .errors import ExportError
    from .export import check_export_target, save_pruned

    check_export_target(args.out, args.overwrite)  # `--out .`, a non-export folder: refused before loading
    if args.vllm and args.format == "gguf":
        raise ExportError("--vllm runs a folder in vLLM: export with --format decilm (per-layer widths) or hf")
    if args.plan:
        _read_plan(args.plan)
    lm = _load(args)
    model, plan = _pruned(args, lm)
    report = save_pruned(model, lm.tokenizer, args.out, plan=plan, overwrite=args.overwrite,
                         protect=[lm.path] if lm.path else (), format=args.format, weight_type=args.weight_type)
    _print_export(report)
    if args.vllm:
        _check_in_vllm(model, lm.tokenizer, report.folder)


def _check_in_vllm(model, tokenizer, folder) -> None:
    """``export --vllm``: run the written folder in vLLM (pruneviz.vllm_runtime); a mismatch is an ExportError
    (exit 2), the export stays (it passed its reload check)."""
    from .errors import ExportError
    from .vllm_runtime import verify_in_vllm

    got = verify_in_vllm(model, tokenizer, folder)
    print(got.line())
    if not got.ok:
        raise ExportError(f"vLLM does not reproduce the pruned model on {folder} (the folder is kept: it reloads "
                          "in pruneviz)")


def _print_export(report) -> None:
    """One line on what an export wrote and how it was verified."""
    from .gguf_export import kernel_note, verification_line

    if report.gguf:
        g, v = report.gguf, report.gguf["verification"]
        print(f"gguf ({g['arch']}, {g['weight_type']}, {g['bytes'] / 2**20:.1f} MiB) -> {g['path']}; verified in "
              f"{v['runtime']}: {verification_line(v)}")
        if g.get("slow_kernel_layers"):
            print(f"note: {kernel_note(g['slow_kernel_layers'])}")
        return
    print(f"{report.format} checkpoint -> {report.folder} ({len(report.files)} files, {report.params:,} params); "
          f"reload max |Δlogit| {report.reload_max_abs_diff:g}"
          + (f", trust_remote_code {report.remote_code_max_abs_diff:g}"
             if report.remote_code_max_abs_diff is not None else ""))


def cmd_chat(args) -> None:
    from .chat import ReplyStream
    from .errors import TextError

    if args.max_new_tokens < 1:
        raise TextError(f"--max-new-tokens must be at least 1 (the reply's length in tokens), not "
                        f"{args.max_new_tokens}")
    if args.plan:
        _read_plan(args.plan)
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


def _is_pruned(lm) -> bool:
    """True for a model exported by pruneviz (either format) or otherwise carrying a pruneviz plan."""
    from .export import PLAN_FILE

    cfg = lm.model.config
    if any(getattr(cfg, k, None) for k in ("pruneviz_layout", "pruneviz_plan", "pruneviz_plan_sha256")):
        return True
    return lm.path is not None and Path(lm.path, PLAN_FILE).is_file()


def _recover_inputs(args, lm):
    """(dense model or None, pruned model, plan or None) for ``recover``: ``--plan`` applied to ``--model``, or
    ``--model`` itself when it is an already-pruned export (its dense base only when ``--base`` names it)."""
    from .errors import PlanError
    from .export import PLAN_FILE, plan_of

    if args.plan:
        pruned, plan = _pruned(args, lm)
        return lm.model, pruned, plan
    if not _is_pruned(lm):
        raise PlanError(f"{lm.name} is not pruned: pass --plan PLAN.json (applied to --model), or --model a folder "
                        f"written by 'python -m pruneviz export'")
    plan_file = Path(lm.path, PLAN_FILE) if lm.path is not None else None
    plan = _read_plan(plan_file) if plan_file is not None and plan_file.is_file() else plan_of(lm.model)
    dense = None
    if args.base:
        from .loading import load_model

        base = load_model(args.base, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        if plan is not None:
            plan.validate(base.model, physical=False)  # PlanError when --base is not the model the plan was made for
        dense = base.model
    return dense, lm.model, plan


class _StopOnCtrlC:
    """``cancel()`` callback: the first Ctrl-C stops training after the current step (the steps done so far are
    merged and reported), a second one aborts. Only in the main thread (signals cannot be caught elsewhere)."""

    def __init__(self):
        self.hit, self.old = False, None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True
        print("stopping after this step (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return self.hit

    def __exit__(self, *_):
        import signal

        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        return False


def _step_printer(every: int):
    """A recovery progress callback printing one line per ``every`` steps (always the first and last) and every
    phase message."""
    import re

    def show(_fraction, message=""):
        m = re.match(r"LoRA step (\d+)/(\d+)", str(message))
        if m is None or int(m[1]) in (1, int(m[2])) or int(m[1]) % every == 0:
            print(message, file=sys.stderr, flush=True)

    return show


def _ppl(model, tokenizer, text: str, protocol, label: str):
    from .evaluate import perplexity

    progress = _bar(f"perplexity ({label})")
    try:
        return perplexity(model, tokenizer, text, protocol, progress=progress)
    finally:
        progress.close()


def ppl_table(rows: list[tuple[str, int | None, float | None]]) -> str:
    """The dense / pruned / pruned + LoRA table: name, parameters, perplexity and the change against dense."""
    dense = next((ppl for name, _, ppl in rows if name == "dense" and ppl is not None), None)
    lines = [f"{'model':<15}{'parameters':>14}{'perplexity':>13}{'vs dense':>11}"]
    for name, params, ppl in rows:
        p = f"{params:,}" if params is not None else "-"
        v = f"{ppl:.3f}" if ppl is not None else "-"
        d = f"{(ppl / dense - 1):+.1%}" if dense and ppl is not None and name != "dense" else ""
        lines.append(f"{name:<15}{p:>14}{v:>13}{d:>11}")
    return "\n".join(lines)


def cmd_recover(args) -> None:
    from .data import get_text
    from .evaluate import get_protocol
    from .plan import dense_params
    from .recovery import LoRAOptions, recover, training_windows

    options = LoRAOptions(r=args.rank, alpha=args.alpha, lr=args.lr, steps=args.steps, batch_size=args.batch_size,
                          seq_len=args.seq_len, seed=args.seed, schedule=args.schedule, warmup_steps=args.warmup_steps)
    options.validate()  # settings, texts and the output folder are checked before anything slow
    protocol = get_protocol(args.protocol)
    train_text, eval_text = get_text(args.text, part="calib"), get_text(args.eval_text, part="eval")
    if args.out:
        from .export import check_export_target

        check_export_target(args.out, args.overwrite)  # only a previous pruneviz export may be replaced
    lm = _load(args)
    training_windows(lm.tokenizer, train_text, options)  # TextError now if the text is too short, not after PPL
    dense, pruned, plan = _recover_inputs(args, lm)
    print(f"pruned model: {plan.summary() if plan else lm.name}, {dense_params(pruned):,} parameters",
          file=sys.stderr)
    rows = [("dense", dense_params(dense), _ppl(dense, lm.tokenizer, eval_text, protocol, "dense").ppl)
            if dense is not None else ("dense", None, None)]
    rows.append(("pruned", dense_params(pruned), _ppl(pruned, lm.tokenizer, eval_text, protocol, "pruned").ppl))
    with _StopOnCtrlC() as stop:
        res = recover(pruned, lm.tokenizer, train_text, options, progress=_step_printer(max(1, args.log_every)),
                      cancel=stop)
    model = res.model
    rows.append(("pruned + LoRA", dense_params(model), _ppl(model, lm.tokenizer, eval_text, protocol, "LoRA").ppl))
    print(ppl_table(rows))
    losses = (f"loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}" if res.losses else "no step done")
    print(f"LoRA r={options.r} alpha={options.alpha:g} lr={options.lr:g} {options.schedule}: {res.steps_done}/"
          f"{options.steps} steps of {options.batch_size}x{options.seq_len} tokens"
          f"{' (stopped early)' if res.cancelled else ''}, {losses}, {res.trainable_params:,} trainable parameters, "
          f"{res.seconds:.1f} s\nprotocol: {protocol.describe()}")
    if args.out:
        from .export import save_pruned

        evaluation = {f"perplexity ({name})": round(ppl, 4) for name, _, ppl in rows if ppl is not None}
        evaluation.update(text=args.eval_text, protocol=protocol.describe())
        report = save_pruned(model, lm.tokenizer, args.out, plan=plan, evaluation=evaluation,
                             overwrite=args.overwrite, protect=[p for p in (lm.path,) if p])
        print(f"exported {report.format} checkpoint to {report.folder} (reload max |Δlogit| "
              f"{report.reload_max_abs_diff:g})")


def _sweep_maps(args, lm) -> dict:
    """The importance maps a sweep compares: ``--criterion`` names scored here and ``--scores`` files."""
    from .errors import CriterionError
    from .importance import ImportanceMap, compute, get

    if not args.criterion and not args.scores:
        raise CriterionError("a sweep needs scores: pass --criterion NAME (repeatable) or --scores FILE (repeatable)")
    maps = {}
    for path in args.scores or []:
        imap = _read_scores(path, ImportanceMap)
        maps[imap.criterion if imap.criterion not in maps else f"{imap.criterion} ({Path(path).name})"] = imap
    calib = None
    for name in args.criterion or []:
        if get(name).needs_calibration and calib is None:
            calib = _calibration(args, lm.tokenizer, lm.model)
        progress = _bar(f"scoring {name}")
        try:
            maps[name] = compute(lm.model, name, calib, progress=progress)
        finally:
            progress.close()
    return maps


def _ratios(text: str) -> list[float]:
    """``"0.1,0.2"`` or ``"10,20"`` (percent) -> ``[0.1, 0.2]``."""
    from .errors import PlanError

    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as e:
        raise PlanError(f"--ratios takes comma-separated numbers such as 0.1,0.2,0.3 (got {text!r})") from e
    if not values:
        raise PlanError("--ratios is empty; give e.g. 0.1,0.2,0.3")
    return [v / 100 if any(x > 1 for x in values) else v for v in values]


def sweep_table(points) -> str:
    """The sweep as a text table: criterion, ratio, parameters, perplexity (and ms/token when measured)."""
    latency = any(p.ms_per_token is not None for p in points)
    kl = any(p.kl_mean is not None for p in points)
    lines = [f"{'criterion':<18}{'what':<10}{'ratio':>7}{'parameters':>14}{'perplexity':>13}"
             + (f"{'ms/token':>10}" if latency else "") + (f"{'KL':>9}{'top-1':>8}" if kl else "")]
    for p in points:
        ms = f"{p.ms_per_token:>10.2f}" if p.ms_per_token is not None else (f"{'-':>10}" if latency else "")
        fid = (f"{p.kl_mean:>9.4f}{p.top1:>8.3f}" if p.kl_mean is not None else f"{'-':>9}{'-':>8}") if kl else ""
        lines.append(f"{p.criterion:<18}{p.what:<10}{p.ratio:>7.0%}{p.params:>14,}{p.ppl:>13.3f}{ms}{fid}"
                     + ("  (partial)" if not p.complete else ""))
    return "\n".join(lines)


def _write_sweep(points, path: str) -> None:
    """``--out``: the sweep's rows as CSV (``.csv``) or JSON (anything else, plans included), written atomically."""
    import csv
    import io
    import tempfile

    out = Path(path)
    rows = [p.row() for p in points]
    if out.suffix.lower() == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["criterion"])
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    else:
        text = json.dumps([{**r, "plan_json": p.plan.to_json(None) if p.plan is not None else None}
                           for r, p in zip(rows, points)], indent=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-")
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, out)


def cmd_sweep(args) -> None:
    from .data import get_text
    from .evaluate import sweep

    lm = _load(args)
    maps = _sweep_maps(args, lm)
    text = get_text(args.eval_text, part="eval")
    progress = _bar("sweep")
    try:
        with _StopOnCtrlC() as stop:
            points = sweep(lm.model, lm.tokenizer, maps, _ratios(args.ratios), args.what, text, args.protocol,
                           progress=progress, cancel=stop, latency=args.latency)
            if args.kl and not stop.hit:
                from .fidelity import with_fidelity

                points = with_fidelity(lm.model, lm.tokenizer, points, text, args.protocol, progress, stop)
    finally:
        progress.close()
    print(sweep_table(points))
    if stop.hit:
        print("stopped: the points above are the ones finished", file=sys.stderr)
    if args.out:
        _write_sweep(points, args.out)
        print(f"{len(points)} points -> {args.out}", file=sys.stderr)


# ---- parser -------------------------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, calibration: bool = False) -> None:
    p.add_argument("--model", default=os.environ.get("PRUNEVIZ_MODEL", "bundled"),
                   help="'bundled' (SmolLM2-135M-Instruct), a Hugging Face id, a local folder (a GGUF export "
                        "too) or a .gguf file")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cuda, cpu, ...")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16/fp16 on GPU), fp32, bf16, fp16")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code (off)")
    if calibration:
        p.add_argument("--text", default="default",
                       help="default (Python docs, calibration part), file:PATH, or hf:wikitext2 / hf:c4")
        p.add_argument("--samples", type=int, default=16, help="calibration windows")
        p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window")
        p.add_argument("--seed", type=int, default=0)


def _add_inspect(sub) -> None:
    """The `inspect` subcommand."""
    p = sub.add_parser("inspect", help="geometry, unit sizes and criteria")
    _common(p)
    p.set_defaults(fn=cmd_inspect)


def _add_score(sub) -> None:
    """The `score` subcommand."""
    p = sub.add_parser("score", help="compute an importance map")
    _common(p, calibration=True)
    p.add_argument("--criterion", required=True)
    _offload_args(p)
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="criterion option (repeatable)")
    p.add_argument("--out", default="scores.json")
    p.set_defaults(fn=cmd_score)


def _add_plan(sub) -> None:
    """The `plan` subcommand."""
    p = sub.add_parser("plan", help="allocate a plan from an importance map and a target")
    _common(p, calibration=True)
    p.add_argument("--scores", help="importance map written by `score`")
    p.add_argument("--criterion", help="instead of --scores: an iterative search that re-scores after every "
                                       "removal (blockpruner: sub-blocks by calibration perplexity)")
    p.add_argument("--ratio", type=float, required=True, help="share of parameters to remove, in (0, 1)")
    p.add_argument("--of", default="non_embedding", choices=["non_embedding", "total"])
    p.add_argument("--strategy", default=None,
                   help="uniform (default), incremental (SlimGPT schedule), global (FLAP), depth, combined, "
                        "sub_blocks (BlockPruner: attention / MLP sub-blocks; the default with --criterion "
                        "blockpruner)")
    p.add_argument("--attn-unit", default="kv", choices=["kv", "head"])
    p.add_argument("--attn-share", type=float, default=None,
                   help="share of the width budget taken from attention, in [0, 1] (0: MLP channels only, as the "
                        "recommended recipe; default: in proportion to the parameters)")
    p.add_argument("--compensation", default=None,
                   help="weight update re-run when the plan is applied: affine (SlimLLM's refit), affine_local "
                        "(the same, fitted block by block on the pruned model), affine_sequential, flap_bias, "
                        "slimgpt; `apply`/`export` then need calibration windows (--samples, --text)")
    _attn_rounding_arg(p)
    p.add_argument("--plus-rule", action="store_true", help="depth: keep the first four and last two blocks")
    p.add_argument("--skip-first", type=_layers_or_auto, default="auto",
                   help="width: keep the first N layers whole (default auto: the criterion's own range, LLM-Pruner's "
                        "4 of 30 for taylor, 0 for the others)")
    p.add_argument("--skip-last", type=_layers_or_auto, default="auto",
                   help="width: keep the last N layers whole (default auto: 2 of 30 for taylor, 0 for the others)")
    p.add_argument("--deployable", choices=["stock", "vllm"],
                   help="only plans this runtime loads: stock (same widths in every layer: plain transformers) or "
                        "vllm (one query-head count, per-layer MLP widths: export --format decilm)")
    _multiple_of_arg(p)
    p.add_argument("--out", default="plan.json")
    p.set_defaults(fn=cmd_plan)


def _format_args(p) -> None:
    """``--format`` and ``--weight-type`` of the commands that export (``export``, ``prune``, ``slimgpt --export``)."""
    p.add_argument("--format", default="hf", choices=["hf", "gguf", "decilm"],
                   help="hf: safetensors folder (default); gguf: one GGUF file for llama.cpp in --out, "
                        "verified in llama.cpp when llama-cpp-python is installed; decilm: DeciLM "
                        "block_configs folder for vLLM (vllm serve --trust-remote-code)")
    p.add_argument("--weight-type", default="f16", choices=["f32", "f16", "q8_0", "q4_0"],
                   help="with --format gguf: type of the 2-D weights (norms and biases stay f32)")


def _multiple_of_arg(p) -> None:
    p.add_argument("--multiple-of", type=_channel_multiple, default=None, metavar="N",
                   help="every pruned layer keeps an MLP width that is a multiple of N (16 or more: llama.cpp's "
                        "fast CPU prompt-processing kernel takes every MLP; 32: every row also quantises in a q8_0 / "
                        "q4_0 GGUF export; 64 or 128 for GPU kernels); default: any width")


def _attn_rounding_arg(p) -> None:
    p.add_argument("--attn-rounding", default="down", choices=["down", "nearest"],
                   help="whole attention units from the attention budget: down (default: never more than its "
                        "share; a KV group is a coarse step) or nearest (the papers' rounding)")


def _add_slimgpt(sub) -> None:
    """The `slimgpt` subcommand."""
    p = sub.add_parser("slimgpt", help="run the SlimGPT OBS solver (plan + compensated weights)")
    _common(p, calibration=True)
    p.add_argument("--ratio", type=float, required=True,
                   help="share of parameters to remove, in (0, 1), as for `plan` (the layer ratio is solved for it)")
    p.add_argument("--of", default="non_embedding", choices=["non_embedding", "total"])
    p.add_argument("--update-scale", type=float, default=1.0,
                   help="share of the OBS weight update applied, in [0, 1] (1 = the paper; lower fits the "
                        "calibration text less)")
    p.add_argument("--percdamp", type=float, default=0.01, help="Hessian damping (official default 0.01)")
    p.add_argument("--schedule", default="log_increase")
    p.add_argument("--attn-unit", default="kv", choices=["kv", "head"])
    _attn_rounding_arg(p)
    _offload_args(p)
    p.add_argument("--out", default="plan.json")
    p.add_argument("--export", help="also export the pruned checkpoint to this folder")
    _format_args(p)
    p.set_defaults(fn=cmd_slimgpt)


def _add_evaluate_export_chat(sub) -> None:
    """Evaluate, export and chat: a model or --plan, then what to do with it."""
    for name, fn, hlp in (("evaluate", cmd_evaluate, "perplexity of the dense model or of --plan"),
                          ("export", cmd_export, "write a verified checkpoint of --plan"),
                          ("chat", cmd_chat, "one reply from the dense model or --plan")):
        p = sub.add_parser(name, help=hlp)
        _common(p, calibration=True)
        p.add_argument("--plan", help="plan JSON (default: the dense model)")
        if name == "evaluate":
            p.add_argument("--protocol", default="quick", help="quick, paper (LLM-Pruner 128-token windows), long")
            p.add_argument("--fidelity", action="store_true",
                           help="with --plan: KL(dense||pruned), top-1 agreement and PPL ratio on the same windows")
            p.add_argument("--tasks", help="lm-eval zero-shot tasks, e.g. piqa,hellaswag ('paper' = the seven of "
                                           "the papers); dense, and pruned with --plan")
            p.add_argument("--limit", type=float, help="with --tasks: first N documents per task (quick look)")
            p.add_argument("--task-dir", help="with --tasks: folder of task YAMLs for local data (see README)")
            p.add_argument("--batch-size", type=int, default=8, help="with --tasks: requests per forward pass")
        if name == "export":
            p.add_argument("--out", required=True)
            p.add_argument("--overwrite", action="store_true")
            _format_args(p)
            p.add_argument("--vllm", action="store_true",
                           help="then run the folder in vLLM and compare greedy tokens and log-probabilities "
                                "(needs `make vllm`)")
        if name == "chat":
            p.add_argument("prompt")
            p.add_argument("--max-new-tokens", type=int, default=96)
            p.add_argument("--temperature", type=float, default=0.0)
        p.set_defaults(fn=fn)


def _add_prune(sub) -> None:
    """The `prune` subcommand."""
    p = sub.add_parser("prune", help="the recommended recipe end to end: calibrate, score, allocate, compensate, "
                                     "export")
    _common(p)
    p.add_argument("--params", help="size of the pruned model, e.g. 113.27M (or give --ratio)")
    p.add_argument("--ratio", type=float, help="share of parameters to remove, in (0, 1)")
    p.add_argument("--of", default="non_embedding", choices=["non_embedding", "total"])
    p.add_argument("--calibration", default="self", choices=["self", "text"],
                   help="self: the model writes its own calibration text (default); text: windows of --text")
    p.add_argument("--text", default="default", help="with --calibration text: default, file:PATH, hf:NAME")
    p.add_argument("--samples", type=int, default=None,
                   help="calibration windows (default 64, self-generated once and cached; measured: 32 is level "
                        "on PTB and 7%% worse on a second out-of-domain text, 128 no better than 64)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per calibration window (default 128)")
    p.add_argument("--channel-order", choices=["dense", "sequential"], default=None,
                   help="sequential (default): SlimLLM's official order, channels re-scored block by block on the "
                        "pruned model and refitted as it goes; dense: ranked once on the dense model")
    p.add_argument("--compensation", default=None,
                   help="the refit (default affine_local; affine: one pass on dense activations; flap_bias; none)")
    p.add_argument("--ridge", default=None,
                   help="lambda of the ridge reconstruction of the removed channels' output from the kept ones "
                        "before each sequential refit (default: the recipe's; none: the affine refit alone)")
    _multiple_of_arg(p)
    p.add_argument("--out", required=True, help="folder for the pruned checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a previous pruneviz export in --out")
    _format_args(p)
    p.set_defaults(fn=cmd_prune)


def _add_sweep(sub) -> None:
    """The `sweep` subcommand."""
    p = sub.add_parser("sweep", help="perplexity (and latency) over pruning ratios for one or more criteria")
    _common(p, calibration=True)
    p.add_argument("--criterion", action="append", help="score with this criterion first (repeatable)")
    p.add_argument("--scores", action="append", help="importance map from 'score --out' (repeatable)")
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5", help="comma-separated shares (or percentages)")
    p.add_argument("--what", default="width", choices=["width", "heads", "channels", "blocks"],
                   help="width: attention and MLP at the same ratio; blocks: that share of whole layers")
    p.add_argument("--protocol", default="quick", help="perplexity protocol: quick, paper, long")
    p.add_argument("--eval-text", default="default",
                   help="held-out text: default (Python docs, evaluation part), file:PATH or hf:wikitext2")
    p.add_argument("--latency", action="store_true", help="also measure decoding ms/token (builds each model)")
    p.add_argument("--kl", action="store_true", help="also measure KL(dense||pruned) and top-1 agreement per point")
    p.add_argument("--out", help="write the points: .csv (one row each) or .json (with the plans)")
    p.set_defaults(fn=cmd_sweep)


def _add_cache(sub) -> None:
    """The `cache` subcommand."""
    p = sub.add_parser("cache", help="list or clear the de-quantised copies of user GGUF files")
    p.add_argument("action", choices=["list", "clear"])
    p.set_defaults(fn=cmd_cache)


def _add_runs(sub) -> None:
    """The `runs` subcommand."""
    p = sub.add_parser("runs", help="list, show, compare or delete the stored runs (plans, evaluations, exports, "
                                    "sweeps) the app and library recorded")
    p.add_argument("action", choices=["list", "show", "compare", "delete"])
    p.add_argument("ids", nargs="*", help="run ids (show, compare, delete)")
    p.add_argument("--db", help="the run store file (default: $PRUNEVIZ_RUNS or <cache>/runs.sqlite)")
    p.add_argument("--kind", choices=["plan", "evaluation", "export", "sweep"], help="list: only this kind")
    p.add_argument("--model", help="list: only models whose key contains this text")
    p.add_argument("--plan-out", help="show: also write the run's plan JSON to this file")
    p.set_defaults(fn=cmd_runs)


def _add_recover(sub) -> None:
    """The `recover` subcommand."""
    p = sub.add_parser("recover", help="LoRA fine-tuning of the pruned model; dense / pruned / + LoRA perplexity")
    _common(p)
    p.add_argument("--plan", help="plan JSON applied to --model (leave out when --model is an exported pruned folder)")
    p.add_argument("--base", help="with an exported pruned --model: its dense base, for the dense row (optional)")
    p.add_argument("--text", default="default",
                   help="training text: default (Python docs, calibration part), file:PATH, PATH or hf:wikitext2")
    p.add_argument("--eval-text", default="default",
                   help="held-out text for perplexity: default (Python docs, evaluation part), file:PATH or PATH")
    p.add_argument("--protocol", default="quick", help="perplexity protocol: quick, paper, long")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha / r)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per step")
    p.add_argument("--seq-len", type=int, default=128,
                   help="tokens per training window (and per calibration window of a plan's compensation step)")
    p.add_argument("--seed", type=int, default=0, help="picks the windows, their order and the LoRA init")
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"],
                   help="learning rate after the warm-up")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear warm-up steps")
    p.add_argument("--samples", type=int, default=16, help="calibration windows for a plan's compensation step")
    p.add_argument("--log-every", type=int, default=10, help="print the loss every N steps")
    p.add_argument("--out", help="export the recovered model (verified checkpoint) to this folder")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_recover)


def _channel_multiple(text: str) -> int:
    """argparse type of --multiple-of: a whole number of MLP channels, 1 or more."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"a whole number of MLP channels (1 or more), not {text!r}")
    return n


def _layers_or_auto(text: str):
    """argparse type of --skip-first/--skip-last: a number of layers (0 or more) or "auto"."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"a number of layers (0 or more) or 'auto', not {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pruneviz", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for add in (_add_inspect, _add_score, _add_plan, _add_slimgpt, _add_evaluate_export_chat, _add_prune,
                _add_sweep, _add_recover, _add_cache, _add_runs):
        add(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .errors import PrunevizError

    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except PrunevizError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RecursionError:  # a pathological input nested too deeply for any parser
        print("error: an input is nested too deeply to be read; check the files you passed", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder the command had to read or write
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}; check the path and free space, then retry", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
