"""Export plans and pruned checkpoints; load pruneviz checkpoints back.

Two checkpoint formats, chosen automatically:

- **stock**: every kept layer has the same widths and the family's config can express them (LLaMA family:
  ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``intermediate_size``; OPT ``ffn_dim``; GPT-2
  ``n_inner``). The folder loads with plain ``AutoModelForCausalLM.from_pretrained``.
- **pruneviz**: per-layer widths. ``config.json`` keeps the base family's fields plus ``pruneviz_layout`` and an
  ``auto_map`` to ``modeling_pruneviz.py`` (copied into the folder), so it loads with pruneviz
  (:func:`pruneviz.loading.load_pruned_folder`) and with ``from_pretrained(folder, trust_remote_code=True)`` anywhere.

Whether a config is stock-expressible is decided by building the candidate stock model skeleton and comparing
every parameter shape with the pruned model, so no family-specific guesswork decides it.

A third format is asked for: ``format="gguf"`` writes one GGUF file for llama.cpp into the folder
(:mod:`pruneviz.gguf_export`: the family's llama.cpp architecture, or ``deci`` for per-layer widths), verified by
running it in llama.cpp where ``llama-cpp-python`` is installed (else by reading it back with ``gguf``).

``format="decilm"`` writes DeciLM ``block_configs`` for vLLM's ``DeciLMForCausalLM`` (:mod:`pruneviz.decilm`: per-
layer KV heads and MLP widths, ``no_op`` attention or MLP sub-layers, one query-head count), verified by reloading
it in pruneviz from ``block_configs`` alone and by checking every tensor against the shapes vLLM builds from the
config. :mod:`pruneviz.deploy` says which of these formats (and so which runtimes) can hold a plan.

Every export is written to a temporary folder, reloaded and compared with the in-memory model (identical logits
required), and only then renamed into place: a failed or interrupted export leaves nothing behind
(:mod:`pruneviz.fsio`; a killed export's temporary folder is removed by the next export to the same target).
Every export holds :data:`REPORT_FILE`, the marker by which ``overwrite=True`` recognises a folder it may replace;
any other folder, and any folder that is, contains or lies above the source model, is never replaced.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers as tf
from torch import nn

from . import __version__, decilm, fsio
from .arch import Geometry, adapter_for
from .errors import ExportError
from .loading import cache_dir, load_pruned_folder
from .offload import clone_model, execution_device
from .plan import Plan, dense_params

PLAN_FILE = "pruneviz_plan.json"
REPORT_FILE = "pruneviz_export.json"  # written into every export: the marker overwrite=True looks for
_MODELING = Path(__file__).with_name("modeling_pruneviz.py")


@dataclass
class ExportReport:
    """What an export wrote and how its reload check went."""

    folder: str
    format: str  # "stock" | "pruneviz" | "gguf" | "decilm"
    reload_max_abs_diff: float
    remote_code_max_abs_diff: float | None
    ok: bool
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    params: int = 0
    card: str = ""
    gguf: dict | None = None  # format "gguf": pruneviz.gguf_export.GGUFReport.to_dict() with its verification

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("card")
        return d


# ---- plan files ---------------------------------------------------------------------------------------------------

def write_plan(plan: Plan, path: str | os.PathLike) -> Path:
    """Write ``plan`` as JSON atomically (:func:`pruneviz.fsio.atomic_write_text`: the parent folder must exist)."""
    return fsio.atomic_write_text(path, plan.to_json(), "the plan")


MAX_PLAN_BYTES = 64 * 1024 * 1024


def read_plan(path: str | os.PathLike) -> Plan:
    """The plan in JSON file ``path`` (strictly parsed: :meth:`Plan.from_json`); PlanError/ExportError if not."""
    try:
        if Path(path).is_dir():
            raise ExportError(f"{path} is a folder; choose a .json plan exported by pruneviz")
        if Path(path).stat().st_size > MAX_PLAN_BYTES:
            raise ExportError(f"{path} is larger than {MAX_PLAN_BYTES >> 20} MiB, too large for a plan; choose a "
                              f".json plan exported by pruneviz")
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"cannot read plan file {path}: {e}; choose a .json plan exported by pruneviz") from e
    return Plan.from_json(text)


def _atomic_write_text(path: Path, text: str) -> None:
    fsio.atomic_write_text(path, text)


# ---- deciding the format ------------------------------------------------------------------------------------------

def _stock_updates(model: nn.Module) -> dict | None:
    """Config fields that express a uniformly pruned ``model`` in its stock family, or None if they cannot."""
    layout = getattr(model.config, "pruneviz_layout", None) or {}
    specs = list(layout.get("layers", {}).values())
    if not specs:
        return {}
    n_layers = model.config.num_hidden_layers
    if len(specs) != n_layers or any(s["shapes"] != specs[0]["shapes"] for s in specs):
        return None
    if any(s.get("absent") for s in specs):  # removed sub-blocks: no stock config expresses a layer without them
        return None
    return adapter_for(model).stock_fields(specs[0], Geometry(**model.config.pruneviz_base_geometry))


STRUCTURAL_KEYS = ("pruneviz_layout", "pruneviz_base_geometry", "pruneviz_plan", "pruneviz_masked_plan")


def _clean_config_dict(config) -> dict:
    """The config as a stock dict: structural pruneviz keys dropped (the recovery record and plan hash stay)."""
    d = config.to_dict()
    if d.get("pruneviz_plan"):
        d["pruneviz_plan_sha256"] = Plan.from_dict(d["pruneviz_plan"]).sha256()
    for k in STRUCTURAL_KEYS + ("auto_map", "_name_or_path"):
        d.pop(k, None)
    return d


def stock_config(model: nn.Module):
    """The stock config of the pruned ``model`` if its shapes are expressible, else None."""
    updates = _stock_updates(model)
    if updates is None:
        return None
    d = {**_clean_config_dict(model.config), **updates}
    try:
        cfg = type(model.config).from_dict(d)
        with torch.device("meta"):
            skeleton = tf.AutoModelForCausalLM.from_config(cfg)
    except Exception:  # a config validator refusing the widths means: not stock-expressible
        return None
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return cfg if want == have else None


# ---- writing ------------------------------------------------------------------------------------------------------

def _modeling_source(model: nn.Module) -> str:
    src = _MODELING.read_text(encoding="utf-8")
    # the transformers class (a reloaded pruneviz export is a modeling_pruneviz subclass of it)
    base = next((c for c in type(model).__mro__ if c.__module__.startswith("transformers.")), type(model))
    src = src.replace('BASE_MODEL_CLASS = "LlamaForCausalLM"', f'BASE_MODEL_CLASS = "{base.__name__}"')
    return src.replace('BASE_CONFIG_CLASS = "LlamaConfig"', f'BASE_CONFIG_CLASS = "{type(model.config).__name__}"')


def _write_model(model: nn.Module, tmp: Path) -> str:
    cfg = stock_config(model)
    if cfg is not None:
        view = clone_model(model, share_weights=True)
        view.config = cfg
        view.save_pretrained(tmp)
        return "stock"
    view = clone_model(model, share_weights=True)
    view.config = type(model.config).from_dict(model.config.to_dict())
    view.config.auto_map = {"AutoConfig": "modeling_pruneviz.PrunedConfig",
                            "AutoModelForCausalLM": "modeling_pruneviz.PrunedForCausalLM"}
    view.save_pretrained(tmp)
    (tmp / "modeling_pruneviz.py").write_text(_modeling_source(model), encoding="utf-8")
    return "pruneviz"


def _write_decilm(model: nn.Module, tmp: Path) -> str:
    """The DeciLM folder (:func:`pruneviz.decilm.write_decilm`) over the model's clean config; it keeps the dense
    geometry, so the reloaded model is known to be pruned."""
    base = _clean_config_dict(model.config)
    geometry = getattr(model.config, "pruneviz_base_geometry", None)
    decilm.write_decilm(model, {**base, **({"pruneviz_base_geometry": geometry} if geometry else {})}, tmp)
    return "decilm"


def probe_inputs(model: nn.Module, n: int = 2, length: int = 24) -> torch.Tensor:
    """Fixed token ids for reload checks (deterministic, inside the vocabulary)."""
    gen = torch.Generator().manual_seed(1234)
    vocab = model.config.vocab_size
    return torch.randint(0, vocab, (n, length), generator=gen)


@torch.inference_mode()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = execution_device(model)
    return model(ids.to(device)).logits.float().cpu()


def _max_diff(a: nn.Module, b: nn.Module, ids: torch.Tensor) -> float:
    return float((_logits(a, ids) - _logits(b, ids)).abs().max())


def is_export(folder: str | os.PathLike) -> bool:
    """True if ``folder`` is a checkpoint pruneviz exported (it holds a readable :data:`REPORT_FILE` marker)."""
    try:
        report = json.loads(Path(folder, REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(report, dict) and report.get("format") in ("stock", "pruneviz", "gguf", "decilm")


def source_folders(model: nn.Module, plan: Plan | None = None, extra=()) -> list[Path]:
    """Local folders the model's weights may come from: ``config._name_or_path``, the plan's base name, ``extra``
    (e.g. :attr:`pruneviz.loading.LoadedModel.path`) where they are existing folders, and pruneviz's cache (the
    bundled model). An export may never replace one of them or a folder above one."""
    names = [getattr(model.config, "_name_or_path", None), plan.base.name if plan is not None else None, *extra]
    out = [cache_dir()]
    for name in names:
        if not name:
            continue
        try:
            p = Path(str(name)).expanduser()
            if p.exists():
                out.append(p.resolve())
        except (OSError, ValueError):
            continue
    return out


def check_export_target(folder: str | os.PathLike, overwrite: bool = False, protect=()) -> Path:
    """The absolute export target after every check that needs no model work: a usable name, not a file, and, if
    it exists, ``overwrite`` given and the folder a previous pruneviz export (:func:`is_export`). A folder that is,
    contains or lies above one of ``protect`` (source folders) or the current folder is always refused."""
    if not str(folder).strip():
        raise ExportError("no export folder given; choose a new folder name such as out/model-pruned")
    folder = fsio.check_folder_target(folder)
    real, cwd = folder.resolve(), Path.cwd().resolve()
    for src in [cwd, *protect]:
        src = Path(src).resolve()
        if real == src or real in src.parents:
            what = "the current folder" if src == cwd else f"the source model ({src})"
            rel = "is" if real == src else "lies above"
            raise ExportError(f"{folder} {rel} {what}; an export never replaces it. Choose a new folder")
    if folder.exists():
        if not overwrite:
            raise ExportError(f"{folder} already exists; choose another folder (overwrite=True replaces only a "
                              f"previous pruneviz export)")
        if not is_export(folder):
            raise ExportError(f"{folder} is not a pruneviz export (it has no {REPORT_FILE}), so overwrite will not "
                              f"replace it; choose another folder or remove it yourself")
    return folder


def export_bytes(model: nn.Module) -> int:
    """About what an export of ``model`` writes (weights at their dtype plus tokenizer and small files)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen and t.device.type != "meta":
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total + 4 * 1024 * 1024


# Export formats (one registry): name -> what it writes. "hf" picks stock or pruneviz by the shapes.
EXPORT_FORMATS = {"hf": "Hugging Face safetensors folder (stock classes, or pruneviz remote code for per-layer widths)",
                  "gguf": "one GGUF file for llama.cpp (f32, f16, q8_0, q4_0), verified in llama.cpp",
                  "decilm": "DeciLM block_configs folder for vLLM's DeciLMForCausalLM (per-layer KV heads and MLP "
                            "widths, one query-head count), see pruneviz.decilm"}


def save_pruned(model: nn.Module, tokenizer, folder: str | os.PathLike, plan: Plan | None = None,
                evaluation: dict | None = None, overwrite: bool = False, check_remote_code: bool = True,
                tolerance: float = 0.0, protect=(), format: str = "hf", weight_type: str = "f16",
                gguf_runtime: str = "auto") -> ExportReport:
    """Write ``model`` (pruned or dense) as a checkpoint folder, verified by reloading it.

    ``format`` is a key of :data:`EXPORT_FORMATS`. ``"gguf"`` writes ``<folder name>.<weight_type>.gguf``
    (:func:`pruneviz.gguf_export.write_gguf`; what llama.cpp cannot express is refused before writing) and verifies
    it with :func:`pruneviz.gguf_export.verify_gguf` (``gguf_runtime``: auto, llama.cpp or python): greedy tokens and
    next-token log-probabilities within the weight type's stated tolerance, else ExportError and nothing is left.
    ``"decilm"`` writes vLLM's DeciLM folder (:func:`pruneviz.decilm.write_decilm`); a model it cannot express is
    refused before anything is written.

    The reloaded model must give logits within ``tolerance`` (default: identical) of ``model`` on fixed inputs;
    otherwise ExportError is raised and nothing is left at ``folder``. ``overwrite`` replaces only a previous
    pruneviz export, never the source model's folder (``protect``, ``config._name_or_path``) or one above it
    (:func:`check_export_target`). Target, name and free space are checked before anything is written.
    """
    t0 = time.perf_counter()
    if format not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {format!r}; one of {', '.join(EXPORT_FORMATS)}")
    if getattr(model.config, "pruneviz_masked_plan", None):
        raise ExportError("this is a masked preview (removed units are zeroed by hooks, the weights are still dense); "
                          "export the physically pruned model instead: apply_plan(base_model, plan)")
    plan = plan or plan_of(model)
    if format == "gguf":
        from .gguf_export import WEIGHT_TYPES, gguf_layout

        if weight_type not in WEIGHT_TYPES:
            raise ExportError(f"unknown GGUF weight type {weight_type!r}; one of {', '.join(WEIGHT_TYPES)}")
        gguf_layout(model)  # refuses what llama.cpp cannot express before anything is written
    if format == "decilm":
        decilm.check(model)  # refuses what vLLM's DeciLM class cannot express before anything is written
    folder = check_export_target(folder, overwrite, source_folders(model, plan, protect))
    fsio.check_space(folder.parent, export_bytes(model), "the export")
    fsio.remove_stale_temporaries(folder)
    try:
        tmp = fsio.temp_folder(folder)
    except OSError as e:
        raise ExportError(fsio.os_error_message(e, folder, "the export")) from e
    try:
        if format == "gguf":
            fmt, gguf_report = "gguf", _write_gguf(model, tokenizer, tmp / f"{folder.name}.{weight_type}.gguf",
                                                   plan, weight_type)
        else:
            fmt = _write_decilm(model, tmp) if format == "decilm" else _write_model(model, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        if plan is not None:
            write_plan(plan, tmp / PLAN_FILE)
        card = model_card(model, plan, evaluation, fmt)
        _atomic_write_text(tmp / "README.md", card)
        if fmt == "gguf":
            report = _verify_gguf(model, tokenizer, gguf_report, gguf_runtime)
        else:
            report = _verify(model, tmp, fmt, check_remote_code, tolerance)
        report.card, report.seconds = card, time.perf_counter() - t0
        report.params = dense_params(model)
        _final_paths(report, tmp, folder)  # the report names where the files will be, not the temporary folder
        _atomic_write_text(tmp / REPORT_FILE, json.dumps(report.to_dict(), indent=1))
        report.files = sorted(p.name for p in tmp.iterdir() if p.name != fsio.TEMP_MARKER)
        fsio.normal_permissions(tmp)
        fsio.install_folder(tmp, folder, replace_existing=overwrite)
        return report
    except OSError as e:  # disk full, permissions, ...: same cleanup, user-facing message
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(fsio.os_error_message(e, folder, "the export") + "; export again when fixed") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _final_paths(report: ExportReport, tmp: Path, folder: Path) -> None:
    """Point ``report`` (its folder and, for GGUF, the file's path) at ``folder``, where :func:`fsio.install_folder`
    puts what was written in ``tmp``: the report saved in the folder and the one returned name files that exist."""
    report.folder = str(folder)
    if report.gguf and report.gguf.get("path"):
        report.gguf = {**report.gguf, "path": str(folder / Path(report.gguf["path"]).relative_to(tmp))}


def _write_gguf(model: nn.Module, tokenizer, path: Path, plan: Plan | None, weight_type: str):
    from .gguf_export import write_gguf

    return write_gguf(model, tokenizer, path, weight_type, plan=plan,
                      name=Path(str(plan.base.name if plan else "") or "model").name)


def _verify_gguf(model: nn.Module, tokenizer, gguf_report, runtime: str) -> ExportReport:
    from .gguf_export import verify_gguf

    check = verify_gguf(gguf_report.path, model, tokenizer, gguf_report.weight_type, runtime=runtime)
    gguf_report.verification = check
    if not check["ok"]:
        bound = (f"tolerance {check['tolerance']:g}" if check.get("tolerance") is not None else
                 f"mean KL {check['kl_mean']:.3g} (bound {check['kl_sanity']:g}); read back exactly: "
                 f"{'yes' if check['read_back']['ok'] else 'no'}")
        raise ExportError(f"the GGUF does not reproduce the model in {check['runtime']} (max |Δ log p| "
                          f"{check['max_abs_dlogprob_topk']:.3g} over the top {check['top_k']} tokens, {bound}; "
                          f"greedy {check['greedy_agreed']}/{check['greedy_total']} tokens agree); nothing was "
                          f"written. Please report this as a bug.")
    return ExportReport(str(Path(gguf_report.path).parent), "gguf", check["max_abs_dlogprob_topk"], None, True,
                        gguf=gguf_report.to_dict())


def _verify(model: nn.Module, tmp: Path, fmt: str, check_remote_code: bool, tolerance: float) -> ExportReport:
    dtype = next(model.parameters()).dtype
    ids = probe_inputs(model)
    if fmt == "stock":
        reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, use_safetensors=True).eval()
    else:
        reloaded = load_pruned_folder(tmp, dtype=dtype)
    reloaded.to(execution_device(model))
    mismatch = decilm.schema_mismatch(tmp) if fmt == "decilm" else None
    if mismatch:
        raise ExportError(f"the DeciLM weights do not match what vLLM builds from the written config ({mismatch}); "
                          f"nothing was written. Please report this as a bug.")
    diff = _max_diff(model, reloaded, ids)
    remote = None
    if fmt == "pruneviz" and check_remote_code:
        remote_model = tf.AutoModelForCausalLM.from_pretrained(tmp, trust_remote_code=True, dtype=dtype,
                                                               use_safetensors=True).eval()
        remote_model.to(execution_device(model))
        remote = _max_diff(model, remote_model, ids)
    ok = diff <= tolerance and (remote is None or remote <= tolerance)
    if not ok:
        raise ExportError(f"the exported checkpoint does not reproduce the model (max |Δlogit| {diff:g}, "
                          f"remote code {remote}); nothing was written. Please report this as a bug.")
    return ExportReport(str(tmp), fmt, diff, remote, ok)


def plan_of(model: nn.Module) -> Plan | None:
    """The plan a pruned model was built with (recorded in its config by surgery), or None."""
    d = getattr(model.config, "pruneviz_plan", None)
    return Plan.from_dict(d) if d else None


def zip_folder(folder: str | os.PathLike) -> bytes:
    """The folder as zip bytes (for downloads)."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as td:
        archive = shutil.make_archive(str(Path(td) / folder.name), "zip", root_dir=folder)
        return Path(archive).read_bytes()


# ---- model card ---------------------------------------------------------------------------------------------------

LIBRARY = {"gguf": "gguf", "decilm": "vllm"}  # the model card's library_name per format
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_MD_SPECIAL = re.compile(r"([\\`*\[\]|~])")  # inline Markdown; HTML brackets become entities


def card_text(value, limit: int = 300) -> str:
    """``value`` as inert one-line Markdown: control characters and line breaks become spaces, HTML brackets
    entities, Markdown punctuation backslash-escaped, at most ``limit`` characters (names and provenance come
    from files the user loaded and must not add headings, links, HTML or front-matter keys)."""
    text = re.sub(r"[\x00-\x1f\x7f\u2028\u2029]+", " ", str(value)).strip()[:limit]
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text)


def _front_matter_base(base: str) -> str:
    """``base_model`` for the Hub when ``base`` is a Hub id (quoted, so YAML reads it as one string), else a
    comment line without line breaks."""
    if HUB_ID.fullmatch(base) and ".." not in base:
        return f"base_model: {json.dumps(base)}"
    return "# base model: " + card_text(base)


def safe_folder_name(name: str, fallback: str = "model") -> str:
    """``name`` reduced to a portable folder name (letters, digits, ``._-``; runs of anything else become one
    ``-``; no leading or trailing ``-`` or ``.``, so never ``..``); ``fallback`` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or fallback


def default_folder_name(name: str, plan: Plan) -> str:
    """The folder an export of ``plan`` on the model named ``name`` is proposed under: ``<model>-pruned-<sha8>``."""
    return f"{safe_folder_name(name).lower()}-pruned-{plan.sha256()[:8]}"


def card_evaluation(pruned_ppl: float, dense_ppl: float, text: str, protocol: str,
                    lora_ppl: float | None = None) -> dict:
    """The model card's ``## Evaluation`` entries (see :func:`model_card`): pruned and dense perplexity (rounded to
    4 decimals), the text and the protocol description they were measured with, and pruned + LoRA perplexity when
    the exported model is the recovered one."""
    out = {"perplexity (pruned)": round(pruned_ppl, 4), "perplexity (dense)": round(dense_ppl, 4), "text": text,
           "protocol": protocol}
    if lora_ppl is not None:
        out["perplexity (pruned + LoRA)"] = round(lora_ppl, 4)
    return out


def model_card(model: nn.Module, plan: Plan | None, evaluation: dict | None, fmt: str) -> str:
    """README.md with Hub front matter, the plan summary, parameter counts and evaluation with its protocol.

    Every name and value taken from the model, the plan or the caller goes through :func:`card_text` (Markdown)
    or is quoted (the front matter), so it cannot inject YAML keys or Markdown."""
    base = str(plan.base.name if plan else getattr(model.config, "_name_or_path", "") or "unknown")
    lines = ["---", _front_matter_base(base),
             "tags:", "- pruned", "- structured-pruning", "- pruneviz", *(["- gguf"] if fmt == "gguf" else []),
             f"library_name: {LIBRARY.get(fmt, 'transformers')}", "---", "",
             f"# {card_text(Path(base).name or base)} (structurally pruned with pruneviz {__version__})", ""]
    if plan is not None:
        prov = plan.provenance
        lines += ["## Plan", "", f"- removed: {plan.summary()}",
                  f"- criterion: {card_text(prov.get('criterion', 'manual'))}; allocation: "
                  f"{card_text(prov.get('strategy', 'manual'))}",
                  f"- compensation: {card_text(plan.compensation or 'none')}", f"- plan sha256: `{plan.sha256()}`",
                  ""]
    lines += ["## Parameters", "", f"- total: {dense_params(model):,}",
              f"- non-embedding: {dense_params(model, non_embedding=True):,}", ""]
    if evaluation:
        lines += ["## Evaluation", ""] + [f"- {card_text(k)}: {card_text(v)}" for k, v in evaluation.items()] + [""]
    rec = getattr(model.config, "pruneviz_recovery", None)
    if rec:
        lines += ["## Recovery fine-tuning", "", "LoRA, merged into the weights:", ""]
        lines += [f"- {card_text(k)}: {card_text(v)}" for k, v in rec.items()] + [""]
    else:
        lines += ["No recovery fine-tuning was done.", ""]
    if fmt == "gguf":
        lines += ["## Loading", "", "A GGUF file for llama.cpp (`deci` architecture for per-layer widths):", "",
                  "```bash", "llama-cli -m *.gguf -p \"Hello\"", "```", "", "```python",
                  "from llama_cpp import Llama", "llm = Llama(model_path=path_to_gguf)", "```", "",
                  "pruneviz loads the folder back as a PyTorch model (de-quantised to float32, per-layer widths "
                  "included):", "", "```python", "from pruneviz.loading import load_model",
                  "lm = load_model(folder)  # lm.model, lm.tokenizer", "```", ""]
        return "\n".join(lines)
    if fmt == "decilm":
        lines += ["## Loading", "", "DeciLM `block_configs` (per-layer KV heads and MLP widths; `no_op` attention "
                  "or MLP sub-layers) for vLLM's own "
                  "`DeciLMForCausalLM`; `configuration_decilm.py` is the config class only (no model code):", "",
                  "```bash", "vllm serve <folder> --trust-remote-code", "```", "",
                  "Stock transformers has no DeciLM model class; pruneviz loads the folder without running its code:",
                  "", "```python", "from pruneviz.loading import load_pruned_folder",
                  "model = load_pruned_folder(folder)", "```", ""]
        return "\n".join(lines)
    lines += ["## Loading", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(folder)",
              ("model = AutoModelForCausalLM.from_pretrained(folder)" if fmt == "stock" else
               "model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)  "
               "# per-layer widths: modeling_pruneviz.py"), "```", ""]
    return "\n".join(lines)
