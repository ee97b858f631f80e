"""Optional LoRA recovery fine-tuning of a pruned model (then merged back into plain weights).

Structured pruning loses quality that a short low-rank fine-tune on plain text recovers in part. This is the
"LoRA retraining" step of Shortened LLaMA (Kim et al., arXiv 2402.02834, ``src/lora_retrain.py``) and
LLM-Pruner (arXiv 2305.11627), also used by SlimGPT (arXiv 2412.18110) and MINI-LLM (arXiv 2407.11681):

- LoRA on every attention and MLP projection (Shortened LLaMA: ``q,k,v,o,gate,down,up``); here the projections
  the family's :class:`~pruneviz.arch.Adapter` declares (``attn_modules + mlp_modules``), so OPT/BLOOM/GPT-2 and
  pruned models with per-layer widths are covered. Rank 8, alpha 16, dropout 0.05, lr 1e-4, AdamW: the
  Shortened LLaMA / LLM-Pruner recipe.
- The data differs on purpose: those papers train 2 epochs on Alpaca (instruction data, ~1.5k steps of 64); the
  app trains on the calibration-style text the user already has, as random causal-LM windows
  (:func:`pruneviz.data.calibration_windows`), for a few hundred steps at most so it fits a CPU. Defaults are
  therefore ``steps=100, batch_size=4, seq_len=128`` (documented choice, all exposed in :class:`LoRAOptions`).
- Schedule: linear warm-up, then linear decay to 0 (HF Trainer's default, which Shortened LLaMA used); SlimGPT
  uses cosine (``schedule="cosine"``). Gradient clipping at 1.0 (HF Trainer default).

The input model is never mutated: training happens on :func:`pruneviz.offload.clone_model`, and the adapters
are merged (``merge_and_unload``) so the result is the original class with the original parameter shapes, ready
for :func:`pruneviz.export.save_pruned` and ``generate``. Its ``config`` keeps every ``pruneviz_*`` field and
gains ``pruneviz_recovery`` (options, steps done, final loss).

Precision: LoRA weights and AdamW state are always fp32 (peft's ``autocast_adapter_dtype``). On CPU the frozen
base weights are upcast to fp32 for training and the merge, then cast back to the input dtype; on CUDA they stay
in their dtype and the forward runs under bf16 autocast where supported (``autocast="auto"``).
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .arch import adapter_for, feature_count, is_conv1d
from .data import calibration_windows, text_hash, tokenize_text
from .errors import PrunevizError, is_oom, oom_advice
from .offload import clone_model, execution_device
from .progress import Cancel, Progress

__all__ = ["LoRAOptions", "RecoveryResult", "recover", "lora_targets", "training_windows", "batch_order",
           "lr_factor"]

SCHEDULES = ("linear", "cosine", "constant")
AUTOCAST = ("auto", "bf16", "off")


@dataclass
class LoRAOptions:
    """Settings of a LoRA recovery run.

    r, alpha, dropout, lr: Shortened LLaMA / LLM-Pruner (``lora_r 8, lora_alpha 16, lora_dropout 0.05``, lr 1e-4).
    target: ``"projections"`` = the family adapter's attention + MLP projections (Shortened LLaMA's q,k,v,o,gate,
        down,up); ``"all-linear"`` = peft's choice (every linear layer except the output head); or a tuple of leaf
        names such as ``("q_proj", "v_proj")``.
    steps: optimizer steps; batch_size windows of seq_len tokens each step (no gradient accumulation).
    max_windows: at most this many distinct windows are drawn from the text (seeded); steps cycle through them
        in seeded shuffled epochs, so a short text is reused rather than refused.
    warmup_steps: linear warm-up from lr/warmup to lr (SlimGPT uses 10; Shortened LLaMA 100 of ~1.5k steps).
    schedule: after warm-up, "linear" decay to 0 (HF Trainer default), "cosine" (SlimGPT) or "constant".
    max_grad_norm: global gradient-norm clip of the LoRA weights (None = off).
    autocast: "auto" = bf16 autocast on CUDA where supported, fp32 elsewhere; "bf16" forces it on CUDA; "off".
    gradient_checkpointing: recompute activations in backward (less memory, ~30% slower).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target: str | tuple[str, ...] = "projections"
    lr: float = 1e-4
    steps: int = 100
    batch_size: int = 4
    seq_len: int = 128
    seed: int = 0
    warmup_steps: int = 10
    weight_decay: float = 0.0
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    max_windows: int = 4096
    autocast: str = "auto"
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        """Raise PrunevizError with a user-facing message for settings that cannot work."""
        checks = [
            (self.r >= 1, "rank r must be >= 1"),
            (self.steps >= 1, "steps must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.seq_len >= 2, "seq_len must be >= 2"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.max_windows >= 1, "max_windows must be >= 1"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
            (self.autocast in AUTOCAST, f"autocast must be one of {AUTOCAST}"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise PrunevizError(f"Invalid LoRA recovery settings: {'; '.join(bad)}.")

    def to_record(self) -> dict:
        """JSON-friendly dict of the options (tuples become lists)."""
        d = asdict(self)
        d["target"] = d["target"] if isinstance(d["target"], str) else list(d["target"])
        return d


@dataclass
class RecoveryResult:
    """Outcome of :func:`recover`. ``model`` is merged (no peft wrappers); ``losses[i]`` is step i's mean CE."""

    model: nn.Module
    losses: list[float]
    steps_done: int
    seconds: float
    cancelled: bool
    eval_ppl_before: float | None = None
    eval_ppl_after: float | None = None
    trainable_params: int = 0
    n_windows: int = 0
    record: dict = field(default_factory=dict)


# ---- data ---------------------------------------------------------------------------------------------------------

def training_windows(tokenizer, text: str, options: LoRAOptions) -> torch.Tensor:
    """The pool of distinct training windows [N, T]: ``min(max_windows, windows the text has)`` of them.

    The pool does not depend on ``steps``, so step i sees the same batch whatever the run length (a run cancelled
    after N steps trained on the same data as the first N steps of a longer one). Raises TextError (from
    :func:`pruneviz.data.calibration_windows`) if the text is empty or shorter than one window.
    """
    n_tokens = len(tokenize_text(tokenizer, text))
    body = options.seq_len - (1 if getattr(tokenizer, "bos_token_id", None) is not None else 0)
    available = max(1, n_tokens - body + 1)  # <1 means too short: calibration_windows raises TextError
    n = min(options.max_windows, available)
    return calibration_windows(tokenizer, text, n, options.seq_len, options.seed)  # [N, T]


def batch_order(n_windows: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Window indices for every step [steps, batch_size]: seeded shuffled epochs over the pool, concatenated."""
    gen = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    epochs = [torch.randperm(n_windows, generator=gen) for _ in range(math.ceil(need / n_windows))]
    return torch.cat(epochs)[:need].view(steps, batch_size)  # [S, B]


def lr_factor(step: int, options: LoRAOptions) -> float:
    """Multiplier of ``options.lr`` at 0-based ``step``: linear warm-up, then the schedule's decay (never 0)."""
    warm, total = options.warmup_steps, options.steps
    if step < warm:
        return (step + 1) / warm
    if options.schedule == "constant" or total <= warm:
        return 1.0
    left = (total - step) / (total - warm)  # 1 at the first post-warm-up step, 1/(total-warm) at the last
    if options.schedule == "linear":
        return left
    return 0.5 * (1.0 + math.cos(math.pi * (1.0 - left)))  # cosine from 1 towards 0


# ---- peft wrapping ------------------------------------------------------------------------------------------------

def lora_targets(model: nn.Module, target: str | tuple[str, ...] = "projections") -> str | list[str]:
    """peft ``target_modules`` for ``target`` (see :class:`LoRAOptions`).

    "projections" gives the full names of the adapter's projections in every decoder layer, skipping any with a
    zero-width side (a pruned-away unit set), so per-layer widths and dropped blocks need no special casing.
    """
    if target == "all-linear":
        return "all-linear"
    if not isinstance(target, str):
        return list(target)
    if target != "projections":
        raise PrunevizError(f"Unknown LoRA target {target!r}; use 'projections', 'all-linear' or leaf names.")
    adapter = adapter_for(model)
    names = []
    for i, layer in enumerate(adapter.layers(model)):
        for path in adapter.attn_modules + adapter.mlp_modules:
            mod = layer.get_submodule(path)
            if feature_count(mod, "out") > 0 and feature_count(mod, "in") > 0:
                names.append(f"{adapter.layers_path}.{i}.{path}")
    return names


def wrap_lora(model: nn.Module, options: LoRAOptions):
    """``model`` (modified in place) wrapped by peft with LoRA adapters on ``options.target``."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, options.target)
    conv1d = any(is_conv1d(m) for m in model.modules())  # GPT-2 stores projections transposed
    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=targets, fan_in_fan_out=conv1d, bias="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out / tied-embedding notices
        return get_peft_model(model, config)


def _cast_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters only (buffers such as rotary ``inv_freq`` keep their dtype)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


# ---- training -----------------------------------------------------------------------------------------------------

def _autocast(device: torch.device, mode: str):
    """bf16 autocast on CUDA ("auto": only where the GPU supports bf16; "bf16": always); none on CPU."""
    if device.type == "cuda" and (mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported())):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _train_step(model: nn.Module, batch: torch.Tensor, optimizer, params: list, options: LoRAOptions,
                device: torch.device) -> float:
    """One optimizer step of causal-LM cross-entropy on ``batch`` [B, T]; returns the mean loss."""
    optimizer.zero_grad(set_to_none=True)
    with _autocast(device, options.autocast):
        logits = model(input_ids=batch, use_cache=False).logits  # [B, T, V]
    pred = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # [B*(T-1), V]
    loss = F.cross_entropy(pred, batch[:, 1:].reshape(-1))
    if not torch.isfinite(loss):
        raise PrunevizError(f"The training loss became {loss.item()}. Lower the learning rate, or train in fp32 "
                            "(autocast='off', model in float32); the input model is unchanged.")
    loss.backward()
    if options.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
    optimizer.step()
    return float(loss.detach())


def _train(model: nn.Module, windows: torch.Tensor, options: LoRAOptions, device: torch.device,
           report: Progress, cancel: Cancel | None) -> tuple[list[float], bool]:
    """The training loop. ``cancel()`` is polled once before every step. Returns (losses, cancelled)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    order = batch_order(windows.shape[0], options.steps, options.batch_size, options.seed)  # [S, B]
    losses: list[float] = []
    model.train()
    for step in range(options.steps):
        if cancel is not None and cancel():
            return losses, True
        for group in optimizer.param_groups:
            group["lr"] = options.lr * lr_factor(step, options)
        batch = windows[order[step]].to(device)  # [B, T]
        losses.append(_train_step(model, batch, optimizer, params, options, device))
        report((step + 1) / options.steps, f"LoRA step {step + 1}/{options.steps}: loss {losses[-1]:.4f}")
    return losses, False


def _eval_ppl(model: nn.Module, tokenizer, eval_text: str | None) -> float | None:
    if eval_text is None:
        return None
    from .evaluate import PROTOCOLS, perplexity

    model.eval()
    return perplexity(model, tokenizer, eval_text, "quick" if "quick" in PROTOCOLS else "default").ppl


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return execution_device(model), (p.dtype if p is not None else torch.float32)


def _rng_devices(device: torch.device) -> list:
    """CUDA devices whose RNG state :func:`torch.random.fork_rng` must save and restore."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _check_model(model: nn.Module) -> None:
    if getattr(model.config, "pruneviz_masked_plan", None):
        raise PrunevizError("LoRA recovery needs a physically pruned model, not a masked preview. "
                            "Apply the plan first (Prune), then fine-tune the result.")


def recover(model: nn.Module, tokenizer, text: str, options: LoRAOptions | None = None,
            progress: Progress | None = None, cancel: Cancel | None = None,
            eval_text: str | None = None) -> RecoveryResult:
    """LoRA-fine-tune a copy of ``model`` on random windows of ``text``, merge the adapters, return it.

    ``model`` is not changed. ``progress(fraction, message)`` is called after each step and phase; ``cancel()``
    is polled before every step: when it returns True the steps done so far are merged and returned with
    ``cancelled=True``. With ``eval_text``, perplexity under the 'quick' protocol is measured before and after.
    Deterministic under ``options.seed`` on CPU (RNG state of the caller is preserved). Raises TextError for an
    empty or too-short text and OutOfMemoryAdvice when memory runs out.
    """
    options = options or LoRAOptions()
    options.validate()
    _check_model(model)
    windows = training_windows(tokenizer, text, options)  # [N, T]
    try:
        return _recover(model, tokenizer, text, windows, options, progress, cancel, eval_text)
    except Exception as exc:  # noqa: BLE001
        if is_oom(exc):
            raise oom_advice(exc, "LoRA recovery") from exc
        raise


def _recover(model, tokenizer, text, windows, options, progress, cancel, eval_text) -> RecoveryResult:
    t0 = time.perf_counter()
    has_eval = eval_text is not None
    lo, span = (0.05, 0.9) if has_eval else (0.0, 0.95)

    def report(frac: float, msg: str) -> None:
        if progress is not None:
            progress(lo + span * frac, msg)

    work = clone_model(model)
    device, dtype = _device_dtype(work)
    grad_flags = {n: p.requires_grad for n, p in work.named_parameters()}
    before = _eval_ppl(work, tokenizer, eval_text)
    if has_eval:
        report(0.0, f"perplexity before recovery: {before:.3f}")
    if device.type != "cuda":
        _cast_params(work, torch.float32)  # fp32 master weights on CPU
    merged, losses, cancelled, n_trainable = _fit(work, windows, options, device, report, cancel)
    _cast_params(merged, dtype)
    for n, p in merged.named_parameters():
        p.requires_grad_(grad_flags.get(n, True))
    report(1.0, "merged LoRA adapters into the weights")
    after = _eval_ppl(merged, tokenizer, eval_text)
    merged.eval()
    seconds = time.perf_counter() - t0
    record = {**options.to_record(), "steps_done": len(losses), "final_loss": losses[-1] if losses else None,
              "first_loss": losses[0] if losses else None, "cancelled": cancelled, "seconds": round(seconds, 3),
              "text_sha256": text_hash(text), "n_windows": int(windows.shape[0]), "trainable_params": n_trainable,
              "eval_ppl_before": before, "eval_ppl_after": after}
    merged.config.pruneviz_recovery = record
    if progress is not None:
        progress(1.0, f"LoRA recovery done: {len(losses)} steps in {seconds:.1f}s")
    return RecoveryResult(merged, losses, len(losses), seconds, cancelled, before, after, n_trainable,
                          int(windows.shape[0]), record)


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    """Turn (non-reentrant) activation checkpointing on or off; transformers 5 renamed the gradient_* API."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _fit(work, windows, options, device, report, cancel):
    """Wrap, train and merge under a forked, seeded RNG. Returns (merged, losses, cancelled, n_trainable)."""
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(options.seed)
        if options.gradient_checkpointing:
            _set_checkpointing(work, True)
        peft_model = wrap_lora(work, options)
        n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        losses, cancelled = _train(peft_model, windows, options, device, report, cancel)
        merged = peft_model.merge_and_unload()
    if options.gradient_checkpointing:
        _set_checkpointing(merged, False)
    return merged, losses, cancelled, n_trainable
