"""Self-generated calibration: the dense model writes its own calibration text (Ji et al., ICLR 2025, arXiv 2410.17711).

"Beware of Calibration Data for Pruning Large Language Models" finds that calibration text resembling the model's
*training* data gives pruned models that hold up far better than text from one narrow domain, and that when the
training data is unavailable the model itself can synthesise it: start generations from short prefixes, sample
continuations, and drop the low-quality samples (the highest perplexity under the model). This works offline,
for any model, and the text is in the model's own distribution by construction.

pruneviz's reading, with its choices exposed in :class:`SelfGenOptions`:

- prefix: each sample starts at the model's document separator (``<|endoftext|>`` where the vocabulary has it,
  else BOS, else EOS), the token a pretraining corpus puts between documents, so the model continues "a new
  document" of its training mix. The first ``prefix_tokens`` sampled tokens are the short prefix (the paper
  seeds with a few tokens); the separator itself is not part of the window, so windows have no special tokens.
- sampling: ``temperature`` 1 with nucleus ``top_p`` 0.95, exactly ``seq_len`` new tokens (EOS suppressed by
  ``min_new_tokens``), batches of ``batch_size``, seeded (generation uses the global RNG inside
  ``torch.random.fork_rng``, so the caller's RNG state is unchanged).
- filtering: ``oversample`` x ``n_samples`` windows are generated and the ``n_samples`` with the lowest mean
  token NLL under the dense model are kept (the paper removes the highest-perplexity share).
- cache: the token ids are stored under the user cache (``<cache>/selfcal/<key>.json``, written atomically),
  keyed by the model's identity (its name, geometry and weight probe) and every option, so the second call with
  the same model and seed costs nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .data import text_hash
from .errors import PrunevizError, TextError
from .fsio import atomic_write_text
from .importance import Calibration
from .loading import cache_dir
from .offload import execution_device
from .plan import BaseIdentity
from .progress import Cancel, Cancelled, Progress

SEPARATORS = ("<|endoftext|>", "</s>", "<eos>")


@dataclass(frozen=True)
class SelfGenOptions:
    """How the model writes its calibration windows (see the module docstring)."""

    n_samples: int = 32  # windows kept
    seq_len: int = 128  # tokens per window
    oversample: float = 1.25  # windows generated per window kept (>= 1); the rest are filtered by perplexity
    temperature: float = 1.0
    top_p: float = 0.95
    prefix_tokens: int = 4  # tokens of each window that form its sampled "short prefix" (for the description)
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.n_samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise TextError("self-generated calibration needs n_samples >= 1, seq_len >= 2 and batch_size >= 1")
        if not self.oversample >= 1.0:
            raise TextError(f"oversample is how many windows are generated per window kept (>= 1), not "
                            f"{self.oversample!r}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise TextError("temperature must be > 0 and top_p in (0, 1]")

    @property
    def n_generated(self) -> int:
        return math.ceil(self.n_samples * self.oversample)


def start_token(tokenizer) -> int:
    """The document separator the generations start from: ``<|endoftext|>`` (or ``</s>``, ``<eos>``) if the
    vocabulary has it, else BOS, else EOS. Raises TextError if the tokenizer has none of them."""
    vocab = tokenizer.get_vocab()
    for tok in SEPARATORS:
        if tok in vocab:
            return int(vocab[tok])
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise TextError("this tokenizer has no document separator, BOS or EOS token to start self-generation from; "
                    "calibrate on a text instead")


def cache_key(model: nn.Module, options: SelfGenOptions) -> str:
    """A stable key of the model's identity and every option."""
    ident = BaseIdentity.of(model, getattr(model.config, "_name_or_path", "") or "model").to_dict()
    blob = json.dumps({"model": ident, "options": dataclasses.asdict(options), "v": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class CancelStopping:
    """A ``transformers`` stopping criterion that ends ``generate`` at the next token once ``cancel()`` answers True
    (so a cancel is honoured within one decoding step, not after a whole batch of windows)."""

    def __init__(self, cancel: Cancel):
        self.cancel = cancel

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), bool(self.cancel()), dtype=torch.bool, device=input_ids.device)


def sample_windows(model: nn.Module, start: int, options: SelfGenOptions, progress: Progress | None,
              cancel: Cancel | None) -> torch.Tensor:
    """``options.n_generated`` sampled windows ``[n, seq_len]`` after the start token."""
    from transformers import StoppingCriteriaList

    device, rows = execution_device(model), []
    stopping = StoppingCriteriaList([CancelStopping(cancel)]) if cancel is not None else None
    n, done = options.n_generated, 0
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(options.seed)
        while done < n:
            if cancel is not None and cancel():
                raise Cancelled("self-generated calibration cancelled")
            b = min(options.batch_size, n - done)
            ids = torch.full((b, 1), start, dtype=torch.long, device=device)  # [b, 1]
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=options.temperature, top_p=options.top_p, top_k=0,
                                 max_new_tokens=options.seq_len, min_new_tokens=options.seq_len,
                                 pad_token_id=start, stopping_criteria=stopping)  # [b, 1 + seq_len]
            if cancel is not None and cancel():
                raise Cancelled("self-generated calibration cancelled")
            rows.append(out[:, 1:].cpu())
            done += b
            if progress is not None:
                progress(0.9 * done / n, f"generated {done}/{n} windows")
    return torch.cat(rows)[:n]  # [n, T]


def window_nll(model: nn.Module, windows: torch.Tensor, start: int, batch_size: int) -> torch.Tensor:
    """Mean next-token NLL of each window under ``model``, the start token prepended: ``[n]``."""
    device, out = execution_device(model), []
    with torch.inference_mode():
        for batch in windows.split(batch_size):
            ids = torch.cat([torch.full((batch.shape[0], 1), start), batch], 1).to(device)  # [b, T+1]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # [b, T, V]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            out.append(nll.mean(-1).cpu())  # [b]
    return torch.cat(out)


def generate_windows(model: nn.Module, tokenizer, options: SelfGenOptions | None = None,
                     progress: Progress | None = None, cancel: Cancel | None = None) -> torch.Tensor:
    """Generate and filter: the ``n_samples`` lowest-perplexity of ``n_generated`` sampled windows ``[N, T]``."""
    options = options or SelfGenOptions()
    start = start_token(tokenizer)
    windows = sample_windows(model, start, options, progress, cancel)
    nll = window_nll(model, windows, start, options.batch_size)  # [n]
    keep = torch.argsort(nll)[: options.n_samples].sort().values  # generation order among the kept
    return windows[keep]


def _read_cache(path: Path, options: SelfGenOptions) -> torch.Tensor | None:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["tokens"]
        t = torch.tensor(rows, dtype=torch.long)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return t if tuple(t.shape) == (options.n_samples, options.seq_len) else None


def _write_cache(path: Path, tokens: torch.Tensor, describe: str) -> None:
    """Atomic (temporary file in the same folder, fsync, rename), normal permissions: :mod:`pruneviz.fsio`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"tokens": tokens.tolist(), "describe": describe}), "the calibration cache")


def self_generated(model: nn.Module, tokenizer, options: SelfGenOptions | None = None, use_cache: bool = True,
                   progress: Progress | None = None, cancel: Cancel | None = None) -> Calibration:
    """Calibration windows the dense ``model`` wrote itself (cached per model and options; see module doc)."""
    options = options or SelfGenOptions()
    name = getattr(model.config, "_name_or_path", "") or "the model"
    describe = (f"self-generated by {name} ({options.n_samples} x {options.seq_len} tokens from the document "
                f"separator, T={options.temperature:g}, top-p {options.top_p:g}, lowest-perplexity "
                f"{options.n_samples}/{options.n_generated} kept, seed {options.seed})")
    path = cache_dir() / "selfcal" / f"{cache_key(model, options)}.json"
    tokens = _read_cache(path, options) if use_cache else None
    if tokens is None:
        tokens = generate_windows(model, tokenizer, options, progress, cancel)
        if use_cache:
            try:
                _write_cache(path, tokens, describe)
            except (OSError, PrunevizError):
                pass  # a read-only cache only costs the next call the generation
    if progress is not None:
        progress(1.0, "self-generated calibration ready")
    text = tokenizer.decode(tokens.flatten().tolist())
    return Calibration(tokens, describe, text_hash(text), options.seed)
