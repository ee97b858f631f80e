"""Chatting with a (dense or pruned) model: prompt building, streaming, timing.

Timings (:class:`ReplyResult`) state the CPU threading policy they ran under (:mod:`pruneviz.threads`:
``OMP_WAIT_POLICY=PASSIVE`` set by the entry points before torch loads, a deliberate torch thread count).

Generation always uses the KV cache and an explicit generation config built
from the arguments (the model's own sampling defaults are not used), and
``torch.manual_seed(seed)`` runs right before ``generate``, so the same
arguments give the same reply for a dense and a pruned model of the same
tokenizer (greedy is deterministic anyway).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from .errors import PrunevizError, TextError, is_oom, oom_advice
from .limits import check_context
from .offload import execution_device
from .threads import describe as threading_policy

__all__ = [
    "ReplyResult",
    "ReplyStream",
    "build_inputs",
    "check_lengths",
    "context_window",
    "prompt_tokens",
    "generate_reply",
    "stream_reply",
]

_ROLES = ("system", "user", "assistant")


@dataclass
class ReplyResult:
    """A finished reply: text, number of generated tokens, wall time, overall speed, and (streamed replies) the
    prefill (prompt tokens and time to the first new token) apart from the decoding speed after it."""

    text: str
    n_tokens: int
    seconds: float
    tokens_per_s: float
    stopped: bool = False  # True if stopped by the user before the end
    prompt_tokens: int = 0
    prefill_seconds: float | None = None  # from the start to the first generated token (reads the whole prompt)
    decode_tokens_per_s: float | None = None  # tokens after the first one per second of decoding
    threading: str = ""  # the CPU threading policy the timing ran under (pruneviz.threads.describe)


def _check_messages(messages) -> None:
    if not messages:
        raise TextError("The conversation is empty. Type a message first.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise TextError(
                f"Message {i} must be a dict with 'role' in {_ROLES} and a string 'content', "
                f"got {m!r}."
            )


def prompt_text(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> tuple[str, bool]:
    """The prompt as a string and whether it came from a chat template.

    With a chat template the template renders the messages (it adds its own
    special tokens). Without one, messages become ``"role: content"`` lines,
    plus ``"assistant:"`` when ``add_generation_prompt``.
    """
    _check_messages(messages)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return text, True
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    if add_generation_prompt:
        lines.append("assistant:")
    return "\n".join(lines), False


def build_inputs(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> dict:
    """Tokenized prompt for ``messages``: ``{"input_ids": [1, P], "attention_mask": [1, P]}``.

    Uses the tokenizer's chat template when it has one (no extra special
    tokens are added, the template has them); otherwise a plain
    ``"role: content"`` transcript with the tokenizer's usual special tokens.
    ``messages`` are dicts with ``role`` (system/user/assistant) and ``content``.
    """
    text, templated = prompt_text(tokenizer, messages, add_generation_prompt)
    enc = tokenizer(text, add_special_tokens=not templated, return_tensors="pt", verbose=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _generation_kwargs(model, tokenizer, max_new_tokens, temperature, top_p) -> dict:
    """Explicit generate() settings: greedy if temperature <= 0, else nucleus sampling."""
    from transformers import GenerationConfig

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise TextError(f"max_new_tokens must be a whole number of at least 1 (the reply's length in tokens), "
                        f"not {max_new_tokens!r}")
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sample = temperature is not None and temperature > 0
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=float(temperature) if sample else None,
        top_p=float(top_p) if sample and top_p is not None else None,
        top_k=0 if sample else None,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=True,
    )
    return {"generation_config": cfg}


def context_window(model) -> int | None:
    """The context length the model was trained for (``max_position_embeddings``, GPT-2's ``n_positions``), None
    when its config states none."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def prompt_tokens(tokenizer, messages: list[dict]) -> int:
    """How many tokens the prompt for ``messages`` has (what :func:`build_inputs` feeds the model)."""
    return int(build_inputs(tokenizer, messages)["input_ids"].shape[-1])


def check_lengths(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a prompt, or a prompt plus reply, longer than the model's context before generation starts: learned
    positions (OPT, GPT-2) would fail with an index error part-way (on a GPU a device assert), rotary models run
    past what they were trained for and degrade silently."""
    check_context(model, prompt_tokens, "the prompt", "shorten the conversation")
    check_context(model, prompt_tokens + max_new_tokens, f"the prompt ({prompt_tokens:,} tokens) plus the reply "
                  f"(max_new_tokens {max_new_tokens:,})", "shorten the conversation or lower max_new_tokens")
    window = context_window(model)
    if window is not None and prompt_tokens + max_new_tokens > window:
        raise TextError(f"the prompt ({prompt_tokens:,} tokens) plus the reply (max_new_tokens {max_new_tokens:,}) "
                        f"is longer than this model's context of {window:,} tokens; clear or shorten the "
                        f"conversation, or lower max_new_tokens (at most {window:,} tokens in all)")


class _StopFlag:
    """StoppingCriteria-compatible callable that stops generation on request."""

    def __init__(self):
        self.event = threading.Event()
        self.times: list[float] = []  # perf_counter() after each generated token

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        stop = self.event.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class ReplyStream:
    """Iterator over text chunks of a reply generated in a background thread.

    Iterate it to get decoded text pieces as they are produced. When it is
    exhausted, ``.stats`` holds a :class:`ReplyResult` (full text, generated
    token count, seconds, tokens/s) and ``.text`` the full reply. ``stop()``
    asks generation to end after the current token. Errors in the generation
    thread are re-raised by the iterator.
    """

    def __init__(self, model, tokenizer, messages, max_new_tokens=128, temperature=0.0,
                 top_p=1.0, seed=0, timeout=120.0):
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        enc = build_inputs(tokenizer, messages)
        self._kwargs = _generation_kwargs(model, tokenizer, max_new_tokens, temperature, top_p)
        check_lengths(model, enc["input_ids"].shape[-1], max_new_tokens)
        device = execution_device(model)
        self._inputs = {k: v.to(device) for k, v in enc.items()}  # [1, P]
        self._streamer = TextIteratorStreamer(
            tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout
        )
        self._flag = _StopFlag()
        self._kwargs["stopping_criteria"] = StoppingCriteriaList([self._flag])
        self._model, self._seed, self._timeout = model, seed, timeout
        self._pieces: list[str] = []
        self._error: BaseException | None = None
        self._n_tokens = 0
        self.stats: ReplyResult | None = None
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="pruneviz-generate", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            torch.manual_seed(self._seed)
            with torch.inference_mode():
                out = self._model.generate(**self._inputs, streamer=self._streamer, **self._kwargs)
            self._n_tokens = int(out.shape[1] - self._inputs["input_ids"].shape[1])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer thread
            self._error = exc
            self._streamer.end()  # unblock the consumer

    def stop(self) -> None:
        """Ask generation to stop after the current token."""
        self._flag.event.set()

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    @property
    def n_generated(self) -> int:
        """Tokens generated so far (also while running, and after a stop)."""
        return len(self._flag.times)

    def __iter__(self) -> Iterator[str]:
        import queue

        try:
            for piece in self._streamer:
                if piece:
                    self._pieces.append(piece)
                    yield piece
        except queue.Empty as exc:
            self.stop()
            raise PrunevizError(
                f"The model produced no token for {self._timeout:.0f} s. Try a shorter reply, "
                "a smaller model, or a GPU."
            ) from exc
        self._thread.join()
        if self._error is not None:
            if is_oom(self._error):
                raise oom_advice(self._error, "generating a reply") from self._error
            raise self._error
        seconds = time.perf_counter() - self._start
        times = self._flag.times
        decode = times[-1] - times[0] if len(times) > 1 else 0.0
        self.stats = ReplyResult(
            text=self.text,
            n_tokens=self._n_tokens,
            seconds=seconds,
            tokens_per_s=self._n_tokens / seconds if seconds > 0 else 0.0,
            stopped=self._flag.event.is_set(),
            prompt_tokens=int(self._inputs["input_ids"].shape[-1]),
            prefill_seconds=times[0] - self._start if times else None,
            decode_tokens_per_s=(len(times) - 1) / decode if decode > 0 else None,
            threading=threading_policy(),
        )


def stream_reply(
    model,
    tokenizer,
    messages: list[dict],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    timeout: float = 120.0,
) -> ReplyStream:
    """Start generating a reply and return a :class:`ReplyStream` of text chunks.

    ``temperature <= 0`` is greedy decoding; ``> 0`` samples with ``top_p``
    (nucleus), seeded with ``torch.manual_seed(seed)`` before ``generate``.
    ``timeout`` bounds the wait for each chunk. After iteration, the stream's
    ``.stats`` has tokens/s.
    """
    return ReplyStream(model, tokenizer, messages, max_new_tokens, temperature, top_p, seed, timeout)


def generate_reply(
    model,
    tokenizer,
    messages: list[dict],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> ReplyResult:
    """Generate a whole reply without streaming (same decoding as :func:`stream_reply`)."""
    enc = build_inputs(tokenizer, messages)
    kwargs = _generation_kwargs(model, tokenizer, max_new_tokens, temperature, top_p)
    check_lengths(model, enc["input_ids"].shape[-1], max_new_tokens)
    device = execution_device(model)
    inputs = {k: v.to(device) for k, v in enc.items()}  # [1, P]
    start = time.perf_counter()
    try:
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(**inputs, **kwargs)  # [1, P + n]
    except Exception as exc:  # noqa: BLE001
        if is_oom(exc):
            raise oom_advice(exc, "generating a reply") from exc
        raise
    seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1]:]  # [n]
    text = tokenizer.decode(new, skip_special_tokens=True)
    return ReplyResult(text, int(new.numel()), seconds, new.numel() / seconds if seconds > 0 else 0.0,
                       threading=threading_policy())
