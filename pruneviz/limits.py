"""Sizes that must be refused at once instead of hanging or failing deep inside torch.

- :func:`check_config_sizes`: a ``config.json`` whose sizes are absurd (10^9 layers, a hidden size of 10^7, a
  non-integer or negative count) is refused before any model is built; for a local folder the parameter count it
  describes is compared with the size of the weight files, so a config that does not belong to the weights is
  refused before minutes of allocation.
- :func:`context_limit` / :func:`check_context`: models with *learned absolute* position embeddings (OPT, GPT-2)
  cannot read more tokens than they have positions (torch would fail with an index error, or a CUDA assert);
  a window, prompt or generation longer than that is refused with a message saying the limit.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .errors import ModelLoadError, TextError

__all__ = ["MAX_LAYERS", "check_config_sizes", "config_params", "context_limit", "check_context"]

MAX_LAYERS = 4096
_BOUNDS = {"layers": MAX_LAYERS, "hidden": 1 << 17, "intermediate": 1 << 20, "vocab": 1 << 24, "heads": 1 << 14}
_KEYS = {"layers": ("num_hidden_layers", "n_layer", "num_layers"), "hidden": ("hidden_size", "n_embd", "d_model"),
         "intermediate": ("intermediate_size", "ffn_dim", "n_inner"), "vocab": ("vocab_size",),
         "heads": ("num_attention_heads", "n_head")}


def _sizes(config: dict, where: str) -> dict[str, int]:
    out = {}
    for what, keys in _KEYS.items():
        for key in keys:
            value = config.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelLoadError(f"{where}: config.json has {key} = {value!r}, which is not a positive whole "
                                     f"number; fix config.json or re-save the model")
            if value > _BOUNDS[what]:
                raise ModelLoadError(f"{where}: config.json has {key} = {value:,}, far beyond any real model (at "
                                     f"most {_BOUNDS[what]:,}); fix config.json or re-save the model")
            out.setdefault(what, value)
    return out


def config_params(config: dict) -> int:
    """A rough parameter count of the transformer ``config`` describes (attention + MLP + embeddings)."""
    s = {k: v for k, v in ((w, next((config[k] for k in ks if isinstance(config.get(k), int)), None))
                           for w, ks in _KEYS.items()) if v}
    h = s.get("hidden", 0)
    inner = s.get("intermediate", 4 * h)
    return s.get("layers", 0) * (4 * h * h + 3 * h * inner) + s.get("vocab", 0) * h


def check_config_sizes(config: dict, where: str, folder: Path | None = None) -> None:
    """Refuse absurd sizes in ``config`` (a config.json dict); with ``folder``, also a config describing far more
    parameters than the folder's ``*.safetensors`` files can hold (even at 4 bits per weight)."""
    _sizes(config, where)
    if folder is None:
        return
    files = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    claimed = config_params(config)
    if files and claimed / 2 > 4 * files + (1 << 20):
        raise ModelLoadError(f"{where}: config.json describes about {claimed:,} parameters, but the weight files "
                             f"hold only {files / 1e6:,.1f} MB; config.json does not belong to these weights. Fix "
                             f"config.json or re-save the model with save_pretrained")


def context_limit(model: nn.Module) -> int | None:
    """Most tokens ``model`` can read at once when its positions are learned absolute embeddings (OPT's
    ``max_position_embeddings``, GPT-2's ``n_positions``); None for rotary / ALiBi models (no hard limit)."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0 or not hasattr(model, "get_input_embeddings"):
        return None
    inputs = model.get_input_embeddings()
    learned = any(isinstance(m, nn.Embedding) and m is not inputs and m.num_embeddings >= limit
                  and m.num_embeddings <= limit + 2 for m in model.modules())
    return limit if learned else None


def check_context(model: nn.Module, n_tokens: int, what: str, hint: str = "use fewer tokens") -> None:
    """Raise TextError if ``n_tokens`` exceed the model's :func:`context_limit` (``what`` names the input)."""
    limit = context_limit(model)
    if limit is not None and n_tokens > limit:
        raise TextError(f"{what} is {n_tokens:,} tokens, but this model has learned positions for at most "
                        f"{limit:,} tokens; {hint} (at most {limit:,})")
