"""Perplexity, size, compute and speed measurements.

Perplexity numbers are only comparable under the same protocol, so every
number carries its :class:`PPLProtocol` and the UI shows
``protocol.describe()`` next to it.

Size / cost helpers work on any HF causal LM by inspecting modules, so they
stay correct after structured pruning changes per-layer widths:

* :func:`flops_per_token` - forward FLOPs per token (approximation documented there).
* :func:`kv_cache_bytes`  - KV-cache size from the actual k/v projection widths.
* :func:`measure_speed`  - greedy decoding latency / throughput with forced length.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .allocate import plan_from_ratios
from .arch import adapter_for, geometry_of, get_path, is_conv1d
from .data import leading_ids, text_hash
from .errors import PlanError, SettingError, TextError, is_oom, oom_advice
from .importance import ImportanceMap
from .limits import check_context
from .offload import execution_device
from .plan import Plan, dense_params
from .progress import Cancel, Progress
from .surgery import apply_plan, masked_model

__all__ = [
    "PROTOCOLS",
    "BatchSpeed",
    "PPLProtocol",
    "PPLResult",
    "SpeedResult",
    "SweepPoint",
    "attention_widths",
    "flops_per_token",
    "get_protocol",
    "kv_cache_bytes",
    "decode_ms_per_token",
    "measure_speed",
    "next_token_top_k",
    "perplexity",
    "ppl_windows",
    "sweep",
    "sweep_plan",
    "token_losses",
]



# ----------------------------------------------------------------------- protocol


@dataclass(frozen=True)
class PPLProtocol:
    """How a text is cut into windows and scored.

    * ``seq_len``: tokens per window (including a BOS token if one is added).
    * ``stride``: offset between window starts. ``stride == seq_len`` gives
      non-overlapping windows; ``stride < seq_len`` gives sliding windows in
      which only the last ``stride`` (new) tokens are scored, except the first
      window, which scores all its tokens but token 0.
    * ``bos``: ``"once"`` = one BOS at the start of the token stream (the
      stream, BOS included, is then cut into windows); ``"per_window"`` = each
      window is ``[BOS] + seq_len-1`` text tokens; ``"none"`` = no BOS.
      Without a BOS token in the tokenizer, "once"/"per_window" act as "none".
    * ``max_windows``: evaluate only the first N windows (None = all).
    * ``batch_size``: windows per forward pass (does not change the result).

    In every window token 0 is never predicted; a trailing remainder shorter
    than a full window is dropped. PPL = exp(mean NLL over all scored tokens).
    """

    name: str
    seq_len: int
    stride: int
    bos: str = "once"
    max_windows: int | None = None
    batch_size: int = 4

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if not 1 <= self.stride <= self.seq_len:
            raise ValueError(f"stride must be in [1, seq_len], got {self.stride}")
        if self.bos not in ("once", "per_window", "none"):
            raise ValueError(f"bos must be 'once', 'per_window' or 'none', got {self.bos!r}")
        if self.max_windows is not None and self.max_windows < 1:
            raise ValueError("max_windows must be None or >= 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")

    @property
    def sliding(self) -> bool:
        return self.stride < self.seq_len

    def describe(self) -> str:
        """One-line, user-facing description shown next to every PPL number."""
        if self.sliding:
            cut = (
                f"sliding {self.seq_len}-token windows, stride {self.stride} "
                f"(only the {self.stride} new tokens of each later window are scored)"
            )
        else:
            cut = f"non-overlapping {self.seq_len}-token windows"
        bos = {
            "once": "one BOS at the start of the text",
            "per_window": "BOS at the start of every window",
            "none": "no BOS",
        }[self.bos]
        count = "all windows" if self.max_windows is None else f"first {self.max_windows} windows"
        return (
            f"PPL protocol '{self.name}': {cut}, {bos}, {count}, remainder dropped; "
            "token 0 of each window not predicted; PPL = exp(mean token NLL, fp32)."
        )


PROTOCOLS: dict[str, PPLProtocol] = {
    # Seconds on CPU for a 135M model: 16 x 128 tokens.
    "quick": PPLProtocol("quick", seq_len=128, stride=128, bos="once", max_windows=16, batch_size=4),
    # LLM-Pruner / Shortened-LLaMA / SlimGPT: non-overlapping 128-token chunks,
    # one BOS at the start of the stream, remainder dropped, all windows.
    "paper": PPLProtocol("paper", seq_len=128, stride=128, bos="once", max_windows=None, batch_size=4),
    # Longer context, sliding: 1024-token windows, 512 new tokens scored per window.
    "long": PPLProtocol("long", seq_len=1024, stride=512, bos="once", max_windows=None, batch_size=1),
}


def get_protocol(protocol: str | PPLProtocol) -> PPLProtocol:
    """A protocol by name (see :data:`PROTOCOLS`) or the protocol itself."""
    if isinstance(protocol, PPLProtocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise SettingError(
            f"Unknown PPL protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}."
        )
    return PROTOCOLS[protocol]


@dataclass
class PPLResult:
    """Perplexity under ``protocol``.

    ``n_tokens`` scored tokens in ``n_windows`` windows (of ``n_windows_total``
    the protocol defines). ``complete`` is False when cancelled early; the
    numbers then cover only the windows done. ``per_token_nll`` holds the
    scored NLLs of the first window (``[n_scored]``, CPU float32).
    """

    ppl: float
    nll_mean: float
    n_tokens: int
    n_windows: int
    protocol: PPLProtocol
    seconds: float
    per_token_nll: torch.Tensor | None = None
    complete: bool = True
    n_windows_total: int = 0

    def describe(self) -> str:
        part = "" if self.complete else f" (PARTIAL: {self.n_windows}/{self.n_windows_total} windows)"
        return f"PPL {self.ppl:.3f}{part} over {self.n_tokens} tokens. {self.protocol.describe()}"


# ------------------------------------------------------------------ perplexity


def ppl_windows(
    ids: list[int], bos_id: int | None, protocol: PPLProtocol
) -> tuple[torch.LongTensor, list[int]]:
    """Cut token ids into the protocol's windows.

    Returns ``(windows [W, T], first_scored)`` where ``first_scored[w]`` is the
    first position of window ``w`` whose token is scored (>= 1; positions
    ``first_scored[w] .. T-1`` are scored). All windows have exactly
    ``seq_len`` tokens; ``max_windows`` is applied.
    """
    T, stride = protocol.seq_len, protocol.stride
    mode = protocol.bos if bos_id is not None else "none"
    if mode == "once":
        stream, prefix, body = [bos_id] + list(ids), [], T
    elif mode == "per_window":
        stream, prefix, body = list(ids), [bos_id], T - 1
    else:
        stream, prefix, body = list(ids), [], T
    # A sliding step never exceeds the text part of a window.
    step = min(stride, body)
    starts = list(range(0, len(stream) - body + 1, step)) if len(stream) >= body else []
    if protocol.max_windows is not None:
        starts = starts[: protocol.max_windows]
    rows = [prefix + stream[s : s + body] for s in starts]
    first = [1 if w == 0 else max(1, T - step) for w in range(len(starts))]
    windows = torch.tensor(rows, dtype=torch.long).view(len(rows), T)  # [W, T]
    return windows, first


def _window_nll(model, batch: torch.LongTensor) -> torch.Tensor:
    """Per-position NLL of ``batch`` [B, T]: returns [B, T-1] fp32 (target = pos 1..T-1)."""
    logits = model(input_ids=batch, use_cache=False).logits  # [B, T, V]
    logits = logits[:, :-1, :].float()  # [B, T-1, V] upcast for a stable log-softmax
    targets = batch[:, 1:]  # [B, T-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape)  # [B, T-1]


def protocol_for(model: nn.Module | None, protocol: str | PPLProtocol) -> PPLProtocol:
    """``protocol`` as ``model``'s family needs it: families whose adapter sets ``bos_per_window`` (Gemma) get a
    BOS at the start of every window, and the protocol's name and description say so."""
    proto = get_protocol(protocol)
    try:
        needs = getattr(model, "config", None) is not None and adapter_for(model).bos_per_window
    except PlanError:  # no adapter: nothing family-specific to apply
        needs = False
    if not needs or proto.bos == "per_window":
        return proto
    return dataclasses.replace(proto, name=f"{proto.name}+bos", bos="per_window")


def eval_windows(tokenizer, text: str, protocol: str | PPLProtocol,
                 model: nn.Module | None = None) -> tuple[torch.LongTensor, list[int], PPLProtocol]:
    """The windows ``[N, T]`` a protocol scores on ``text`` and, per window, its first scored position.

    Tokenised with ``add_special_tokens=False``; with ``model`` the protocol is adapted to its family
    (:func:`protocol_for`). Raises :class:`TextError` for empty or too-short text.
    """
    proto = protocol_for(model, protocol)
    if not text or not text.strip():
        raise TextError("The evaluation text is empty. Provide text or use the bundled default.")
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    windows, first = ppl_windows(ids, getattr(tokenizer, "bos_token_id", None), proto)
    if windows.shape[0] == 0:
        shorter = [n for n, p in PROTOCOLS.items() if p.seq_len < proto.seq_len]
        raise TextError(
            f"The evaluation text has only {len(ids)} tokens, fewer than one {proto.seq_len}-token "
            f"window of protocol '{proto.name}'. Use a longer text (at least {proto.seq_len} tokens)"
            + (f" or the '{shorter[0]}' protocol." if shorter else ".")
        )
    return windows, first, proto


@dataclass
class _NLLSum:
    """Running sum of scored token NLLs (fp64) and the first window's per-token losses."""

    total: float = 0.0
    tokens: int = 0
    first: torch.Tensor | None = None

    def add(self, scored: torch.Tensor) -> None:  # [n_scored]
        if self.first is None:
            self.first = scored.clone()
        self.total += scored.double().sum().item()
        self.tokens += scored.numel()


def perplexity(
    model,
    tokenizer,
    text: str,
    protocol: str | PPLProtocol = "quick",
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> PPLResult:
    """Perplexity of ``model`` on ``text`` under ``protocol``.

    The text is tokenized with ``add_special_tokens=False``; BOS handling and
    windowing follow the protocol (see :class:`PPLProtocol`). Logits are
    upcast to fp32 and NLLs summed in fp64. ``progress(fraction, message)`` is
    called after each batch of windows; if ``cancel()`` returns True the loop
    stops and a partial result with ``complete=False`` is returned (the
    protocol of :mod:`pruneviz.progress`). Inputs go to the model's device.
    Raises :class:`TextError` for empty or too-short text.
    """
    window = get_protocol(protocol)
    check_context(model, window.seq_len, f"a {window.name!r} perplexity window", "choose a protocol with shorter "
                  "windows (quick or paper)")  # at once, before tokenizing: OPT / GPT-2 positions end there
    windows, first, proto = eval_windows(tokenizer, text, window, model)
    total, device, start = windows.shape[0], execution_device(model), time.perf_counter()
    acc, done = _NLLSum(), 0
    try:
        with torch.inference_mode():
            for b0 in range(0, total, proto.batch_size):
                if cancel is not None and cancel():
                    break
                batch = windows[b0 : b0 + proto.batch_size].to(device)  # [B, T]
                nll = _window_nll(model, batch).cpu()  # [B, T-1]
                for j in range(batch.shape[0]):
                    acc.add(nll[j, first[b0 + j] - 1 :])  # [n_scored]
                done += batch.shape[0]
                if progress is not None:
                    progress(done / total, f"windows {done}/{total}")
    except Exception as exc:  # noqa: BLE001
        if is_oom(exc):
            raise oom_advice(exc, "computing perplexity (try a smaller batch or seq_len)") from exc
        raise
    mean = acc.total / acc.tokens if acc.tokens else float("nan")
    return PPLResult(ppl=math.exp(mean) if acc.tokens else float("nan"), nll_mean=mean, n_tokens=acc.tokens,
                     n_windows=done, protocol=proto, seconds=time.perf_counter() - start, per_token_nll=acc.first,
                     complete=done == total, n_windows_total=total)


def token_losses(model, tokenizer, text: str, max_tokens: int = 256) -> tuple[list[str], list[float]]:
    """Per-token NLL of the first ``max_tokens`` text tokens, for display.

    Returns ``(tokens, nll)`` of equal length: ``tokens[i]`` is the decoded text
    of token i, ``nll[i]`` the loss of predicting it. A BOS token (if the
    tokenizer has one) is prepended so every text token is predicted; without
    BOS the first token's NLL is ``nan``.
    """
    ids, bos_id = leading_ids(tokenizer, text, max_tokens,
                              "The text is empty. Type or paste some text to see per-token losses.",
                              "The text produced no tokens. Type some words.")
    seq = ([bos_id] if bos_id is not None else []) + ids
    if len(seq) < 2:
        return [tokenizer.decode([ids[0]])], [float("nan")]
    batch = torch.tensor([seq], dtype=torch.long, device=execution_device(model))  # [1, T]
    with torch.inference_mode():
        nll = _window_nll(model, batch)[0].cpu().tolist()  # [T-1]
    if bos_id is None:
        nll = [float("nan")] + nll
    tokens = [tokenizer.decode([i]) for i in ids]
    return tokens, nll


# ------------------------------------------------------------- size and compute


def attention_widths(model: nn.Module) -> list[dict]:
    """Per decoder block, the actual attention widths, as the family's adapter declares them (:mod:`pruneviz.arch`).

    Widths are read from weight shapes, so pruned layers are measured as they are (also after depth pruning);
    layers whose attention sub-block was removed have none and are left out. Returns dicts
    ``{layer, q, k, v, o_in, dtype}``: query, key and value features, the output projection's input width, and the
    dtype of the attention weights (the activation dtype).
    """
    adapter, g = adapter_for(model), geometry_of(model)
    found = []
    for i, layer in enumerate(adapter.layers(model)):
        if not adapter.has_attention(layer):  # a removed attention sub-block: no widths, no KV cache
            continue
        dtype = get_path(layer, adapter.attn_out).weight.dtype
        found.append({"layer": i, **adapter.attention_widths(layer, g), "dtype": dtype})
    return found


def flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Approximate forward FLOPs to process one token with ``seq_len`` tokens of context.

    Approximation (PaLM-style, forward only, no causal halving):

    * matmuls: 2 x (weights + biases) of every ``nn.Linear`` / ``Conv1D``,
      including ``lm_head`` (a tied ``lm_head`` is still a matmul); embedding
      lookups, norms, activations and softmax are ignored;
    * attention, per attention module: ``2 * seq_len * q_width`` for the
      scores Q K^T plus ``2 * seq_len * o_in`` for weighting the values, with
      widths read from the actual projections (see :func:`attention_widths`).
    """
    linear = 0
    seen: set[int] = set()
    for module in model.modules():
        if (isinstance(module, nn.Linear) or is_conv1d(module)) and id(module) not in seen:
            seen.add(id(module))
            linear += sum(p.numel() for p in module.parameters(recurse=False))
    attention = sum(2 * seq_len * (w["q"] + w["o_in"]) for w in attention_widths(model))
    return int(2 * linear + attention)


def kv_cache_bytes(model: nn.Module, seq_len: int, batch: int = 1, dtype: torch.dtype | None = None) -> int:
    """Bytes of KV cache for ``batch`` sequences of ``seq_len`` tokens.

    Sum over attention modules of ``(k_width + v_width) * seq_len * batch *
    element size``, widths from the actual projections (LLaMA/OPT ``k_proj`` /
    ``v_proj``; BLOOM fused ``query_key_value`` = 1/3 each; GPT-2 ``c_attn``
    Conv1D weight [in, 3w]). Element size is that of ``dtype`` if given, else
    of the k/v projection weights (the activation dtype).
    """
    total = 0
    for w in attention_widths(model):
        size = torch.tensor([], dtype=dtype or w["dtype"]).element_size()
        total += (w["k"] + w["v"]) * seq_len * batch * size
    return int(total)


# ------------------------------------------------------------------------ speed


@dataclass
class BatchSpeed:
    """Decoding speed for one batch size (median over repeats)."""

    batch_size: int
    latency_s: float  # seconds for the whole generate() call
    tokens_per_s: float  # batch_size * new_tokens / latency
    new_tokens: int
    latencies_s: list[float] = field(default_factory=list)


@dataclass
class SpeedResult:
    """Output of :func:`measure_speed`.

    ``peak_memory_bytes`` is ``torch.cuda.max_memory_allocated`` on CUDA and
    None elsewhere; on CPU ``process_peak_rss_bytes`` is the whole process's
    peak resident memory (model and everything loaded before included), see
    ``memory_note``.
    """

    device: str
    dtype: str
    prompt_tokens: int
    new_tokens: int
    batches: list[BatchSpeed]
    prefill_tokens: int
    prefill_tokens_per_s: float
    peak_memory_bytes: int | None
    process_peak_rss_bytes: int | None
    memory_note: str
    protocol: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _peak_rss_bytes() -> int | None:
    try:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):  # pragma: no cover
        return None
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS bytes, Linux KiB


def _timed(fn, device: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _decode_speed(model, tokenizer, prompt: str, bs: int, new_tokens: int, pad_id: int, device,
                  repeats: int, warmup: int) -> BatchSpeed:
    """Median greedy-decoding latency of ``bs`` copies of ``prompt`` with exactly ``new_tokens`` new tokens."""
    # identical prompts need no padding; left padding is set for safety
    enc = tokenizer([prompt] * bs, return_tensors="pt", padding=tokenizer.pad_token is not None)
    enc = {k: v.to(device) for k, v in enc.items()}  # input_ids [B, P]

    def run():
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=pad_id)

    times = _timed(run, device, repeats, warmup)
    median = statistics.median(times)
    return BatchSpeed(bs, median, bs * new_tokens / median, new_tokens, times)


def _prefill_times(model, prompt_ids: list[int], prefill_tokens: int, device, repeats: int,
                   warmup: int) -> list[float]:
    """Latencies of one forward pass over ``prefill_tokens`` tokens (the prompt repeated) at batch 1."""
    reps = -(-prefill_tokens // len(prompt_ids))
    pre = torch.tensor([(prompt_ids * reps)[:prefill_tokens]], device=device)  # [1, P]
    return _timed(lambda: model(input_ids=pre, use_cache=False), device, repeats, warmup)


def _peak_memory(device) -> tuple[int | None, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    return None, (f"{device.type.upper()}: per-run peak memory is not measurable; "
                  "process_peak_rss_bytes is the whole process's peak resident memory.")


def measure_speed(
    model,
    tokenizer,
    prompt: str = "The Leaning Tower of Pisa is known for",
    new_tokens: int = 32,
    batch_sizes: tuple[int, ...] = (1, 4),
    repeats: int = 3,
    warmup: int = 1,
    prefill_tokens: int = 128,
) -> SpeedResult:
    """Greedy decoding speed with forced output length (Shortened-LLaMA style).

    For each batch size the prompt is replicated (left padding, KV cache on)
    and ``generate`` runs with ``min_new_tokens = max_new_tokens = new_tokens``
    so EOS cannot end it early; ``warmup`` untimed runs precede ``repeats``
    timed ones and the median latency is reported. Prefill throughput is one
    forward pass over ``prefill_tokens`` tokens (the prompt repeated) at batch 1.
    Timing uses ``time.perf_counter`` with device synchronisation.
    """
    if new_tokens < 1 or repeats < 1 or not batch_sizes:
        raise ValueError("new_tokens and repeats must be >= 1 and batch_sizes non-empty")
    device = execution_device(model)
    dtype = next(model.parameters()).dtype
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True, verbose=False)["input_ids"])
    if not prompt_ids:
        raise TextError("The speed-test prompt is empty. Provide a short prompt.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    old_side = getattr(tokenizer, "padding_side", "right")
    try:
        tokenizer.padding_side = "left"
        with torch.inference_mode():
            rows = [_decode_speed(model, tokenizer, prompt, bs, new_tokens, pad_id, device, repeats, warmup)
                    for bs in batch_sizes]
            pre_times = _prefill_times(model, prompt_ids, prefill_tokens, device, repeats, warmup)
    except Exception as exc:  # noqa: BLE001
        if is_oom(exc):
            raise oom_advice(exc, "measuring speed (use smaller batch sizes)") from exc
        raise
    finally:
        tokenizer.padding_side = old_side
    peak, note = _peak_memory(device)
    return SpeedResult(
        device=str(device), dtype=str(dtype).removeprefix("torch."), prompt_tokens=len(prompt_ids),
        new_tokens=new_tokens, batches=rows, prefill_tokens=prefill_tokens,
        prefill_tokens_per_s=prefill_tokens / statistics.median(pre_times), peak_memory_bytes=peak,
        process_peak_rss_bytes=_peak_rss_bytes(), memory_note=note,
        protocol=(f"greedy, forced {new_tokens} new tokens, prompt {len(prompt_ids)} tokens, "
                  f"median of {repeats} after {warmup} warm-up"),
    )


# ------------------------------------------------------------------------ sweep

SWEEP_WHAT = ("width", "heads", "channels", "blocks")


@dataclass(frozen=True)
class SweepPoint:
    """One point of a ratio sweep: the plan ``criterion`` makes at ``ratio`` of ``what``, its size and perplexity.

    ``criterion`` is ``"dense"`` (ratio 0, no plan) for the unpruned reference. ``complete`` is False for a point
    whose perplexity was cut short by ``cancel()`` (it covers only the windows done, see :mod:`pruneviz.progress`).
    ``ms_per_token`` is the measured decoding latency (only when the sweep measured latency).
    """

    criterion: str
    ratio: float
    what: str
    params: int
    ppl: float
    protocol: str
    text_sha256: str
    n_tokens: int
    plan: Plan | None = None
    ms_per_token: float | None = None
    complete: bool = True
    kl_mean: float | None = None  # KL(dense || this point) per token, when the sweep measured fidelity
    top1: float | None = None  # top-1 agreement with the dense model, idem

    def row(self) -> dict:
        """A flat, JSON-able row (the plan as its sha256 and summary) for tables and CSV files."""
        plan = self.plan
        return {"criterion": self.criterion, "what": self.what, "ratio": self.ratio, "params": self.params,
                "ppl": self.ppl, "ms_per_token": self.ms_per_token, "kl_mean": self.kl_mean, "top1": self.top1,
                "protocol": self.protocol,
                "tokens": self.n_tokens, "complete": self.complete, "text_sha256": self.text_sha256,
                "plan_sha256": plan.sha256() if plan is not None else None,
                "plan": (plan.summary() if not plan.is_empty() else "nothing removed") if plan is not None else None}


def sweep_plan(model: nn.Module, imap: ImportanceMap, ratio: float, what: str) -> Plan:
    """The plan a sweep evaluates: ``ratio`` of ``what`` removed by ``imap``'s scores with the slider allocation
    (:func:`pruneviz.allocate.plan_from_ratios`, uniform per layer). ``width`` removes that share of attention
    units (KV groups) and of MLP channels, ``heads`` / ``channels`` only one of them, ``blocks`` the nearest whole
    number of blocks."""
    if what not in SWEEP_WHAT:
        raise PlanError(f"a sweep prunes one of {', '.join(SWEEP_WHAT)}; got {what!r}")
    if what == "blocks":
        if imap.blocks is None:
            raise PlanError(f"{imap.criterion} has no block scores; sweep width, heads or channels instead")
        return plan_from_ratios(model, imap, block_count=int(round(ratio * imap.geometry.n_layers)))
    head = ratio if what in ("width", "heads") else 0.0
    chan = ratio if what in ("width", "channels") else 0.0
    return plan_from_ratios(model, imap, head_ratio=head, channel_ratio=chan)


def decode_ms_per_token(model, tokenizer, new_tokens: int = 16) -> float:
    """Median greedy decoding latency per token at batch 1 (forced length, KV cache on; :func:`measure_speed`)."""
    res = measure_speed(model, tokenizer, new_tokens=new_tokens, batch_sizes=(1,), repeats=2, warmup=1,
                        prefill_tokens=32)
    return 1000.0 / res.batches[0].tokens_per_s


def _point(model, tokenizer, res: PPLResult, criterion: str, ratio: float, what: str, params: int, text: str,
           plan: Plan | None, latency: bool) -> SweepPoint:
    ms = decode_ms_per_token(model, tokenizer) if latency and res.complete else None
    return SweepPoint(criterion, ratio, what, params, res.ppl, res.protocol.name, text_hash(text), res.n_tokens,
                      plan, ms, res.complete)


def _part(progress: Progress | None, i: int, n: int, label: str) -> Progress | None:
    """``progress`` for step ``i`` of ``n`` equal steps, messages prefixed with ``label``."""
    if progress is None:
        return None
    return lambda fraction, message="": progress((i + fraction) / n, f"{label}: {message}")


def sweep(
    model: nn.Module,
    tokenizer,
    imaps: dict[str, ImportanceMap],
    ratios: list[float],
    what: str,
    text: str,
    protocol: str | PPLProtocol = "quick",
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    latency: bool = False,
    dense: bool | PPLResult = True,
) -> list[SweepPoint]:
    """Perplexity (and, with ``latency``, decoding ms/token) of every criterion of ``imaps`` at every ratio.

    For each criterion and ratio the plan is :func:`sweep_plan`; it is evaluated on a masked view of ``model``
    (:func:`pruneviz.surgery.masked_model`, the same outputs as the physically pruned model) or, with ``latency``,
    on the physically pruned model, whose speed is what latency measures. ``model`` is never mutated. With
    ``dense`` (True, or an already computed :class:`PPLResult` of ``model`` on ``text`` under ``protocol``) the
    first point is the dense model. Points come criterion by criterion, ratios in the given order.

    ``progress(fraction, message)`` covers the whole sweep. When ``cancel()`` returns True the points done so far
    are returned: fewer than asked for, the last one with ``complete=False`` if its perplexity was cut short.
    """
    proto = get_protocol(protocol)
    pairs = [(name, float(r)) for name in imaps for r in ratios]
    for r in {r for _, r in pairs}:
        if not 0.0 <= r < 1.0:
            raise PlanError(f"sweep ratios are shares in [0, 1); got {r}")
    steps = len(pairs) + (dense is True)
    points: list[SweepPoint] = []
    if dense is not False:
        res = dense if isinstance(dense, PPLResult) else perplexity(model, tokenizer, text, proto,
                                                                    _part(progress, 0, steps, "dense"), cancel)
        if res.n_windows:
            points.append(_point(model, tokenizer, res, "dense", 0.0, "-", dense_params(model), text, None, latency))
        if not res.complete:
            return points
    for i, (name, ratio) in enumerate(pairs, start=int(dense is True)):
        if cancel is not None and cancel():
            break
        plan = sweep_plan(model, imaps[name], ratio, what)
        pruned = apply_plan(model, plan) if latency else masked_model(model, plan)
        res = perplexity(pruned, tokenizer, text, proto, _part(progress, i, steps, f"{name} {ratio:.0%}"), cancel)
        if res.n_windows:
            points.append(_point(pruned, tokenizer, res, name, ratio, what, plan.param_count(model), text, plan,
                                 latency))
        if not res.complete:
            break
    return points


# ------------------------------------------------------------ next-token preview


def next_token_top_k(model, tokenizer, text: str, k: int = 5, max_tokens: int = 64) -> list[tuple[str, float]]:
    """The ``k`` most likely next tokens after the first ``max_tokens`` tokens of ``text`` and their probabilities.

    The text is tokenized like :func:`token_losses` (no special tokens, a BOS token prepended if the tokenizer has
    one); one forward pass; probabilities in fp32. Returns ``[(decoded token, probability), ...]``, most likely
    first. Raises :class:`TextError` for a text without tokens.
    """
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])[:max_tokens]
    if not ids:
        raise TextError("The text produced no tokens. Type some words.")
    bos = getattr(tokenizer, "bos_token_id", None)
    seq = torch.tensor([([bos] if bos is not None else []) + ids], device=execution_device(model))  # [1, T]
    with torch.inference_mode():
        probs = model(input_ids=seq, use_cache=False).logits[0, -1].float().softmax(-1)  # [V]
    p, idx = probs.topk(min(k, probs.shape[-1]))  # [k] each
    return [(tokenizer.decode([int(i)]), float(q)) for q, i in zip(p, idx)]
