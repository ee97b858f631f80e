"""Texts for calibration and evaluation, and calibration windows.

Text specs understood by :func:`get_text`:

* ``"default"`` (or ``"bundled"``, ``""``): Python's own documentation topics
  (``pydoc_data.topics``, shipped with every CPython, ~465k characters of
  English technical prose). It is split by whole topics into a calibration
  part and a disjoint evaluation part, see :func:`split_default`.
* ``"file:PATH"``: a UTF-8 text file (the whole file is used for either part;
  pass different files for calibration and evaluation to keep them disjoint).
* ``"hf:wikitext2"``, ``"hf:c4"``, ``"hf:ptb"`` (optionally ``"hf:NAME:SPLIT"``):
  Hugging Face datasets, only when they are cached or reachable. The
  calibration part uses the train split, the evaluation part the test split
  (WikiText-2) or validation split (C4, PTB), as in LLM-Pruner / Wanda.

Nothing here touches the network unless an ``hf:`` spec is requested.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import random
from dataclasses import dataclass
from fractions import Fraction

import torch

from .errors import TextError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "TextSource",
    "calibration_windows",
    "default_text",
    "default_topics",
    "get_text",
    "load_hf_dataset",
    "load_text_file",
    "split_default",
    "text_hash",
    "text_source",
    "tokenize_text",
]

DEFAULT_MAX_BYTES = 50_000_000  # 50 MB of text is far more than any protocol needs
_TOPIC_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class TextSource:
    """Identity of a text used for calibration or evaluation (for reproducibility)."""

    name: str
    text_sha256: str
    n_chars: int


def text_hash(text: str, n: int = 16) -> str:
    """First ``n`` hex characters of the SHA-256 of ``text`` encoded as UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def text_source(name: str, text: str) -> TextSource:
    """Describe ``text`` as a :class:`TextSource` (full SHA-256 hex)."""
    return TextSource(name=name, text_sha256=text_hash(text, 64), n_chars=len(text))


# ------------------------------------------------------------------ default text


def default_topics() -> list[tuple[str, str]]:
    """Python's bundled documentation topics as ``(topic, text)`` in sorted key order."""
    from pydoc_data.topics import topics

    return [(key, topics[key]) for key in sorted(topics)]


def default_text() -> str:
    """All of ``pydoc_data.topics.topics`` joined in sorted key order with ``"\\n\\n"``."""
    return _TOPIC_SEPARATOR.join(text for _, text in default_topics())


def _eval_topic_indices(n_topics: int, eval_fraction: float) -> list[int]:
    """Indices of topics that go to evaluation: evenly spread, deterministic.

    Topic ``i`` is an evaluation topic when ``floor((i+1)*f) > floor(i*f)``,
    computed with exact fractions. For ``f = 0.2`` that is every 5th topic
    (indices 4, 9, 14, ...).
    """
    frac = Fraction(eval_fraction).limit_denominator(1000)
    return [i for i in range(n_topics) if (i + 1) * frac // 1 > i * frac // 1]


def split_default(eval_fraction: float = 0.2) -> tuple[str, str]:
    """Split :func:`default_text` into disjoint ``(calib_text, eval_text)``.

    The split is by whole topics (sorted by key), so no paragraph appears in
    both parts: with the default ``eval_fraction=0.2`` every 5th topic
    (indices 4, 9, 14, ...) goes to evaluation and the others to calibration.
    Each part is joined with ``"\\n\\n"`` in topic order. Deterministic.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise TextError(
            f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}. "
            "Use e.g. 0.2 to keep a fifth of the topics for evaluation."
        )
    topics = default_topics()
    eval_idx = set(_eval_topic_indices(len(topics), eval_fraction))
    if not eval_idx or len(eval_idx) == len(topics):
        raise TextError(
            f"eval_fraction={eval_fraction} leaves one part of the default text empty. "
            "Use a value between 0.05 and 0.95."
        )
    calib = [text for i, (_, text) in enumerate(topics) if i not in eval_idx]
    evals = [text for i, (_, text) in enumerate(topics) if i in eval_idx]
    return _TOPIC_SEPARATOR.join(calib), _TOPIC_SEPARATOR.join(evals)


# --------------------------------------------------------------------- text files


def load_text_file(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Read a UTF-8 text file (a UTF-8 BOM is accepted and removed).

    Raises :class:`TextError` if the file is missing, larger than ``max_bytes``,
    empty / whitespace-only, or binary (contains NUL bytes or is not valid UTF-8).
    """
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise TextError(f"Text file {str(p)!r} does not exist. Check the path.")
    size = p.stat().st_size
    if size > max_bytes:
        raise TextError(
            f"Text file {p.name} is {size / 1e6:.1f} MB, more than the {max_bytes / 1e6:.1f} MB "
            "limit. Use a smaller excerpt (a few MB are plenty for calibration and evaluation)."
        )
    data = p.read_bytes()
    if not data.strip():
        raise TextError(f"Text file {p.name} is empty. Choose a file that contains text.")
    if b"\x00" in data:
        raise TextError(
            f"{p.name} looks like a binary file (it contains NUL bytes). "
            "Choose a plain UTF-8 text file (.txt, .md)."
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TextError(
            f"{p.name} is not valid UTF-8 text (byte {exc.start} cannot be decoded). "
            "Save it as UTF-8 or choose a plain text file."
        ) from exc
    if not text.strip():
        raise TextError(f"Text file {p.name} is empty. Choose a file that contains text.")
    return text


# -------------------------------------------------------------------- HF datasets

# name -> (path, config, data_files per split or None, text field, joiner, default split)
_HF_DATASETS = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", None, "text", "\n\n", "test"),
    "c4": (
        "allenai/c4",
        None,
        {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
        "text",
        "\n\n",
        "validation",
    ),
    "ptb": ("ptb_text_only", "penn_treebank", None, "sentence", " ", "validation"),
}
_HF_ALIASES = {
    "wikitext": "wikitext2",
    "wikitext-2": "wikitext2",
    "wikitext2-raw": "wikitext2",
    "ptb_text_only": "ptb",
    "penn_treebank": "ptb",
}
# Split used for each part when the spec gives none.
_PART_SPLITS = {
    "wikitext2": {"calib": "train", "eval": "test"},
    "c4": {"calib": "train", "eval": "validation"},
    "ptb": {"calib": "train", "eval": "validation"},
}


def _hf_name(name: str) -> str:
    key = name.strip().lower()
    key = _HF_ALIASES.get(key, key)
    if key not in _HF_DATASETS:
        raise TextError(
            f"Unknown dataset {name!r}. Known: {', '.join(sorted(_HF_DATASETS))}; "
            "or use the bundled text ('default') or a text file ('file:PATH')."
        )
    return key


def load_hf_dataset(name: str, split: str | None = None, max_docs: int | None = None) -> str:
    """Text of a Hugging Face dataset split, joined like the papers do.

    ``name``: ``"wikitext2"`` (``Salesforce/wikitext``, ``wikitext-2-raw-v1``,
    documents joined with ``"\\n\\n"``; default split ``test``), ``"c4"``
    (``allenai/c4``, first shard of ``en`` train or validation; default
    ``validation``) or ``"ptb"`` (script-based; fails with ``datasets>=4``).
    ``max_docs`` keeps only the first N records. ``datasets`` is imported lazily.
    Any failure (offline, not cached, removed script) raises :class:`TextError`.
    """
    key = _hf_name(name)
    path, config, data_files, field_name, joiner, default_split = _HF_DATASETS[key]
    split = split or default_split
    try:
        import datasets  # lazy: slow import, optional at runtime

        kwargs = {}
        if data_files is not None:
            if split not in data_files:
                raise TextError(
                    f"Dataset {key} has no split {split!r} here; use one of {sorted(data_files)}."
                )
            kwargs["data_files"] = {split: data_files[split]}
        ds = datasets.load_dataset(path, config, split=split, **kwargs)
        if max_docs is not None:
            ds = ds.select(range(min(max_docs, len(ds))))
        text = joiner.join(ds[field_name])
    except TextError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, missing cache, removed scripts...
        raise TextError(
            f"Dataset {key} ({path}, split {split}) is not reachable from this machine "
            f"(offline?) [{type(exc).__name__}]; use the bundled text ('default') or a text "
            "file ('file:PATH')."
        ) from exc
    if not text.strip():
        raise TextError(f"Dataset {key} split {split} is empty; use another split or text.")
    return text


# ------------------------------------------------------------------------ specs


def get_text(spec: str = "default", part: str = "calib") -> str:
    """Resolve a text spec (see module docstring) to text for ``part``.

    ``part`` is ``"calib"`` or ``"eval"``. ``"default"`` gives the matching half of
    :func:`split_default`; ``"file:PATH"`` (or an existing file path) the file;
    ``"hf:NAME"`` / ``"hf:NAME:SPLIT"`` a dataset split.
    """
    if part not in ("calib", "eval"):
        raise TextError(f"part must be 'calib' or 'eval', got {part!r}.")
    text_spec = (spec or "").strip()
    if text_spec.lower() in ("", "default", "bundled", "pydoc"):
        calib, evals = split_default()
        return calib if part == "calib" else evals
    if text_spec.lower().startswith("file:"):
        return load_text_file(text_spec[5:])
    if text_spec.lower().startswith("hf:"):
        parts = text_spec[3:].split(":", 1)
        key = _hf_name(parts[0])
        split = parts[1] if len(parts) > 1 and parts[1] else _PART_SPLITS[key][part]
        return load_hf_dataset(key, split)
    if pathlib.Path(text_spec).expanduser().is_file():
        return load_text_file(text_spec)
    raise TextError(
        f"Unknown text {spec!r}. Use 'default' (bundled Python docs), 'file:PATH' "
        "or 'hf:wikitext2' / 'hf:c4'."
    )


# ------------------------------------------------------------ calibration windows


def tokenize_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (no BOS/EOS added)."""
    if not text or not text.strip():
        raise TextError("The text is empty. Provide some text (or use the bundled default).")
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def leading_ids(tokenizer, text: str, max_tokens: int, empty: str, no_tokens: str) -> tuple[list[int], int | None]:
    """The first ``max_tokens`` token ids of ``text`` (no special tokens) and the tokenizer's BOS id (None without
    one): how a short text is read for per-token views (:func:`pruneviz.evaluate.token_losses`,
    :func:`pruneviz.inspection.prompt_ids`), which prepend the BOS so every text token is predicted. Raises
    :class:`TextError` with ``empty`` for an empty text and ``no_tokens`` for one that yields no token."""
    if not text or not text.strip():
        raise TextError(empty)
    ids = tokenize_text(tokenizer, text)[:max_tokens]
    if not ids:
        raise TextError(no_tokens)
    return ids, getattr(tokenizer, "bos_token_id", None)


def calibration_windows(
    tokenizer,
    text: str,
    n_samples: int,
    seq_len: int,
    seed: int,
    bos: bool = True,
    offsets: str = "random",
) -> torch.LongTensor:
    """Sample ``n_samples`` distinct windows of ``seq_len`` tokens.

    The text is tokenized once (``add_special_tokens=False``). With
    ``offsets="random"`` start offsets are drawn without replacement with
    ``random.Random(seed)``, so the result is deterministic under ``seed``
    (windows may overlap, but no two share a start); ``offsets="even"`` spaces
    them evenly from the first to the last possible start (the calibration
    tensor the peers' benchmark uses; ``seed`` is then unused). If ``bos`` and
    the tokenizer has a BOS token, each window is
    ``[BOS] + seq_len-1`` text tokens, so every row still has ``seq_len`` tokens.

    Returns a LongTensor ``[n_samples, seq_len]`` on CPU. Raises
    :class:`TextError` if the text is shorter than one window or has fewer
    distinct windows than ``n_samples``.
    """
    if n_samples < 1 or seq_len < 2:
        raise TextError(
            f"Need n_samples >= 1 and seq_len >= 2 (got {n_samples}, {seq_len})."
        )
    ids = tokenize_text(tokenizer, text)
    bos_id = getattr(tokenizer, "bos_token_id", None) if bos else None
    body = seq_len - 1 if bos_id is not None else seq_len  # text tokens per window
    n_starts = len(ids) - body + 1
    if n_starts < 1:
        raise TextError(
            f"The calibration text has only {len(ids)} tokens, shorter than one window of "
            f"{body} tokens. Use a longer text or a smaller seq_len."
        )
    if n_starts < n_samples:
        raise TextError(
            f"The calibration text ({len(ids)} tokens) has only {n_starts} distinct windows of "
            f"{body} tokens but {n_samples} were requested. Use fewer samples, a smaller seq_len "
            "or a longer text."
        )
    if offsets == "even":
        starts = [round(i * (n_starts - 1) / max(n_samples - 1, 1)) for i in range(n_samples)]
    elif offsets == "random":
        starts = random.Random(seed).sample(range(n_starts), n_samples)
    else:
        raise TextError(f"offsets must be 'random' or 'even', not {offsets!r}")
    rows = [ids[s : s + body] for s in starts]
    if bos_id is not None:
        rows = [[bos_id] + row for row in rows]
    return torch.tensor(rows, dtype=torch.long)  # [N, T]


# ------------------------------------------------------- what a number means

def domain_note(calibration: str | None, evaluation: str) -> tuple[str, bool]:
    """How an evaluation text relates to the calibration text: ``(note, same_domain)``.

    A perplexity measured on the calibration's own domain flatters every method that fits the calibration
    (SlimGPT's OBS update most): on SmolLM2 the default Python-docs calibration ranks methods differently on
    held-out Python docs than on general English (``bench/results/quality.md``). ``calibration`` is a
    :class:`~pruneviz.importance.Calibration` ``text_name`` (or None when unknown), ``evaluation`` a text spec
    or name as the app and CLI show it.
    """
    cal, ev = (calibration or "").strip().lower(), (evaluation or "").strip().lower()
    default = ("", "default", "bundled", "pydoc")
    if not cal:
        return f"{evaluation}: calibration text unknown", False
    if cal.startswith("self-generated"):
        return f"{evaluation}: not the calibration source (the model wrote its own calibration text)", False
    parts = ("default", "pydoc", "bundled:pydoc")  # the app names the bundled text's parts bundled:pydoc-calib/-eval
    cal_default = cal.split(" ")[0] in default or cal.startswith(parts)
    ev_default = ev.split(" ")[0] in default or ev.startswith(parts)
    if cal_default and ev_default:
        return (f"{evaluation}: held-out part of the calibration's own domain (Python docs), so it flatters "
                f"methods that fit the calibration; also evaluate on a text from elsewhere"), True
    if cal.split(" ")[0] == ev.split(" ")[0]:
        return f"{evaluation}: same source as the calibration text, so it flatters methods that fit it", True
    return f"{evaluation}: a different source from the calibration text ({calibration})", False
