"""Exception hierarchy for pruneviz.

Every error raised on purpose by pruneviz derives from :class:`PrunevizError`.
Its message is meant for the end user: it says what went wrong *and what to do
about it*, so the CLI and the app can show ``str(exc)`` as-is.

Subclasses tell callers which stage failed:

* :class:`ModelLoadError`  - a model or tokenizer could not be loaded.
* :class:`TextError`       - calibration / evaluation text is missing or unusable.
* :class:`PlanError`       - a pruning plan is invalid for the model.
* :class:`ExportError`     - writing or re-reading a pruned model failed.
* :class:`CriterionError`  - an importance criterion could not be computed.
* :class:`SettingError`    - a setting has a value no function accepts (unknown perplexity protocol, ...); also a
  ``ValueError``.
* :class:`OutOfMemoryAdvice` - the machine ran out of memory; the message says
  how to make the job smaller (see :func:`oom_advice`).
"""

from __future__ import annotations

__all__ = [
    "PrunevizError",
    "ModelLoadError",
    "TextError",
    "PlanError",
    "ExportError",
    "CriterionError",
    "SettingError",
    "OutOfMemoryAdvice",
    "is_oom",
    "oom_advice",
]


class PrunevizError(Exception):
    """Base class of all pruneviz errors.

    ``message`` is user-facing and must say what to do next.
    ``hint`` is an optional extra sentence (kept separate so UIs can style it).
    """

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} {hint}")


class ModelLoadError(PrunevizError):
    """A model, its config or its tokenizer could not be loaded."""


class TextError(PrunevizError):
    """Text for calibration or evaluation is missing, empty, binary or too short."""


class PlanError(PrunevizError):
    """A pruning plan does not fit the model (unknown unit, bad ratio, ...)."""


class ExportError(PrunevizError):
    """A pruned model could not be written or read back."""


class CriterionError(PrunevizError):
    """An importance criterion failed (bad settings, non-finite scores, ...)."""


class SettingError(PrunevizError, ValueError):
    """A setting names something that does not exist (an unknown protocol, ...)."""


class OutOfMemoryAdvice(PrunevizError):
    """The machine ran out of memory; the message says how to shrink the job."""


_OOM_MARKERS = (
    "out of memory",
    "defaultcpuallocator: can't allocate",
    "can't allocate memory",
    "cannot allocate memory",
)


def is_oom(exc: BaseException) -> bool:
    """True if ``exc`` is a torch / allocator out-of-memory error.

    Recognises ``torch.OutOfMemoryError`` (CUDA / MPS), ``MemoryError`` and any
    ``RuntimeError`` whose text mentions "out of memory" or the CPU allocator's
    "DefaultCPUAllocator: can't allocate".
    """
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        oom_type = getattr(torch, "OutOfMemoryError", None)
        if oom_type is not None and isinstance(exc, oom_type):
            return True
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(marker in text for marker in _OOM_MARKERS)
    return False


def oom_advice(exc: BaseException, what: str) -> OutOfMemoryAdvice:
    """Turn an out-of-memory exception into a user-facing :class:`OutOfMemoryAdvice`.

    ``what`` names the job that failed (e.g. "computing Taylor scores").
    The returned exception is meant to be raised ``from exc``::

        try:
            ...
        except Exception as e:
            if is_oom(e):
                raise oom_advice(e, "computing perplexity") from e
            raise

    It works for any exception (the advice is the same), but callers should
    check :func:`is_oom` first so unrelated bugs are not disguised.
    """
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if len(detail) > 200:
        detail = detail[:197] + "..."
    device_hint = "GPU" if "cuda" in str(exc).lower() or "gpu" in str(exc).lower() else "machine"
    message = (
        f"Ran out of memory while {what} on this {device_hint} ({detail}). "
        "To fix it: use fewer calibration samples, shorter windows (seq_len) or a smaller "
        "batch size; or switch dtype (bf16/fp16 halve memory on GPU) or device "
        "(CPU has more memory than a small GPU). Close other programs using memory and retry."
    )
    return OutOfMemoryAdvice(message)
