"""Prefill and decode tokens/s of a PyTorch model and of a GGUF file in llama.cpp, on one protocol.

Contract (:class:`SpeedProtocol`): the same token ids for every model and engine (a fixed text, repeated and
cut to ``prompt_tokens``, or seeded random ids without a tokenizer); for each batch size ``B`` the prompt is
copied into ``B`` sequences and

- **prefill** = one forward pass over the ``B x prompt_tokens`` tokens that fills the KV cache (tokens/s =
  ``B * prompt_tokens / seconds``; the first new token's argmax is not timed);
- **decode** = exactly ``decode_tokens`` greedy steps of ``B`` tokens each, one forward pass per step with the KV
  cache, argmax over the vocabulary included, end-of-sequence ignored (tokens/s = ``B * decode_tokens /
  seconds``).

PyTorch (:func:`torch_sample`) runs in this process (``model(input_ids, past_key_values=...)``, inference mode,
device synchronised); llama.cpp (:class:`LlamaCppRunner`) in a subprocess that keeps the file loaded and answers
one timed sample per request, so a native crash cannot take the caller down and several files can be measured
interleaved. Each phase is timed in wall-clock seconds and in the process's CPU seconds (all threads), so a
shared machine's waiting for a core can be told apart from the work itself. Threads follow
:mod:`pruneviz.threads` (``OMP_WAIT_POLICY=PASSIVE`` and every core for torch; llama.cpp's ``n_threads`` /
``n_threads_batch`` the idle cores, one count for every file of a comparison). :func:`interleaved` takes one
sample of every engine per round (after ``warmup`` untimed rounds), so slow phases of a shared machine hit every
model alike, and :func:`summarise` reports medians over the rounds. Peak memory: llama.cpp's is the subprocess's
peak resident set (VmHWM) minus its resident set before the model was loaded (so: mapped weights, KV cache and compute
buffers); PyTorch's is the parameter bytes plus the peak resident growth during the timed passes (Linux VmHWM
after resetting it; None elsewhere).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import llamacpp
from .errors import ExportError, PrunevizError
from .progress import Cancelled
from .threads import describe as threading_policy
from .threads import llama_threads, policy, subprocess_env

TEXT = ("The Leaning Tower of Pisa is the campanile of Pisa Cathedral. It is known for its nearly four-degree lean, "
        "the result of an unstable foundation. Construction began in 1173 and took almost two hundred years. ")
_START_TIMEOUT_S = 300
_SAMPLE_TIMEOUT_S = 600


@dataclass(frozen=True)
class SpeedProtocol:
    """What is timed: ``prompt_tokens`` prefilled, ``decode_tokens`` decoded greedily, for each of
    ``batch_sizes``; ``warmup`` untimed rounds, then ``repeats`` timed rounds (medians reported)."""

    prompt_tokens: int = 128
    decode_tokens: int = 32
    batch_sizes: tuple[int, ...] = (1, 8)
    warmup: int = 1
    repeats: int = 5

    def __post_init__(self):
        for name in ("prompt_tokens", "decode_tokens", "repeats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, not {v!r}")
        if self.warmup < 0 or not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ValueError("warmup must be 0 or more and batch_sizes a non-empty tuple of sizes >= 1")

    def describe(self) -> str:
        return (f"prompt {self.prompt_tokens} tokens prefilled in one pass, {self.decode_tokens} greedy tokens "
                f"decoded with the KV cache (EOS ignored), batch {', '.join(map(str, self.batch_sizes))}; "
                f"{self.warmup} warm-up round(s), median of {self.repeats} timed rounds")

    def to_dict(self) -> dict:
        return asdict(self)


def prompt_ids(tokenizer, n: int, vocab_size: int | None = None) -> list[int]:
    """``n`` token ids of :data:`TEXT` (repeated as needed, no special tokens); seeded random ids in
    ``[3, vocab_size)`` when ``tokenizer`` is None."""
    if tokenizer is None:
        import torch

        if not vocab_size:
            raise ValueError("without a tokenizer, prompt_ids needs the vocabulary size")
        gen = torch.Generator().manual_seed(1234)
        return torch.randint(3, int(vocab_size), (n,), generator=gen).tolist()
    ids = list(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    if not ids:
        raise PrunevizError("the speed prompt tokenises to nothing")
    return (ids * (-(-n // len(ids))))[:n]


# ---- PyTorch ------------------------------------------------------------------------------------------------------

def param_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (each tensor once)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return int(sum(seen.values()))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _torch_one(model, ids: list[int], batch: int, decode_tokens: int, device) -> dict:
    import torch

    x = torch.tensor([ids] * batch, device=device)  # [B, P]
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = model(input_ids=x, use_cache=True)
    _sync(device)
    t1, c1 = time.perf_counter(), time.process_time()
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
    _sync(device)
    t2, c2 = time.perf_counter(), time.process_time()
    for _ in range(decode_tokens):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    t3, c3 = time.perf_counter(), time.process_time()
    return {"prefill_s": t1 - t0, "decode_s": t3 - t2, "prefill_cpu_s": c1 - c0, "decode_cpu_s": c3 - c2}


def torch_sample(model, ids: list[int], protocol: SpeedProtocol) -> dict:
    """One timed sample of ``model`` (PyTorch, its own device and dtype) for every batch size:
    ``{"runs": {B: {"prefill_s", "decode_s"}}, "peak_bytes": parameter bytes + peak resident growth}``."""
    import torch

    from .importance import peak_memory
    from .offload import execution_device

    device = execution_device(model)
    runs = {}
    with peak_memory(device) as mem, torch.inference_mode():
        for b in protocol.batch_sizes:
            runs[int(b)] = _torch_one(model, ids[: protocol.prompt_tokens], int(b), protocol.decode_tokens, device)
    if device.type == "cuda":
        peak = mem.peak
    else:  # the parameters plus what the timing itself needed above the process's resident set at the start
        peak = None if mem.extra is None else param_bytes(model) + mem.extra
    return {"runs": runs, "peak_bytes": peak}


# ---- llama.cpp ----------------------------------------------------------------------------------------------------

# Runs in a subprocess. argv[1]: {"path", "ids", "batches", "decode", "threads"}. Prints {"ready": ...} once the
# file is loaded, then for every {"op": "run"} line on stdin one {"runs": {B: {prefill_s, decode_s}}, "hwm"} line.
_RUNNER = r"""
import json, sys, time
import numpy as np

def rss(name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024

from pruneviz.llamacpp import open_api
args = json.loads(sys.argv[1])
api = open_api(args["binding"])
L = api.lib
api.capture_log()
L.llama_backend_init()
base = rss("VmRSS")
model = L.llama_model_load_from_file(args["path"].encode(), L.llama_model_default_params())
if not model:
    sys.exit("llama.cpp could not load " + args["path"] + ": " + api.log_tail())
n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
ids, B, N = args["ids"], max(args["batches"]), args["decode"]
P = len(ids)
per_seq = -(-(P + N + 16) // 256) * 256
cp = L.llama_context_default_params()
cp.n_ctx, cp.n_seq_max = B * per_seq, B
cp.n_batch = max(512, B * P)
cp.n_threads = cp.n_threads_batch = args["threads"]
cp.no_perf = True
ctx = L.llama_init_from_model(model, cp)
if not ctx:
    sys.exit("llama.cpp could not create a context: " + api.log_tail())
mem = L.llama_get_memory(ctx)
batch = L.llama_batch_init(max(B * P, B), 0, 1)

def fill(items):
    batch.n_tokens = len(items)
    for i, (tok, pos, seq, out) in enumerate(items):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, out
        batch.seq_id[i][0] = seq

def decode():
    rc = L.llama_decode(ctx, batch)
    if rc != 0:
        sys.exit(f"llama_decode returned {rc}")

def argmax(rows):
    return [int(api.floats(L.llama_get_logits_ith(ctx, r), n_vocab).argmax()) for r in rows]

def one(b):
    L.llama_memory_clear(mem, True)
    fill([(ids[p], p, s, p == P - 1) for s in range(b) for p in range(P)])
    t0, c0 = time.perf_counter(), time.process_time()
    decode()
    L.llama_synchronize(ctx)
    t1, c1 = time.perf_counter(), time.process_time()
    toks = argmax([s * P + P - 1 for s in range(b)])
    t2, c2 = time.perf_counter(), time.process_time()
    for step in range(N):
        fill([(toks[s], P + step, s, True) for s in range(b)])
        decode()
        toks = argmax(range(b))
    t3, c3 = time.perf_counter(), time.process_time()
    return {"prefill_s": t1 - t0, "decode_s": t3 - t2, "prefill_cpu_s": c1 - c0, "decode_cpu_s": c3 - c2}

print(json.dumps({"ready": True, "base_rss": base, "loaded_rss": rss("VmRSS"), "n_vocab": n_vocab,
                  "version": api.version, "binding": api.binding, "library": api.library,
                  "adapted": api.adapted}),
      flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd.get("op") != "run":
        break
    runs = {b: one(b) for b in args["batches"]}
    print(json.dumps({"runs": runs, "hwm": rss("VmHWM")}), flush=True)
"""


def llama_cpp_available() -> bool:
    """Whether a llama.cpp binding is installed (:func:`pruneviz.llamacpp.binding`; no native library imported)."""
    return llamacpp.binding() is not None


class LlamaCppRunner:
    """A GGUF file kept loaded in a llama.cpp subprocess; :meth:`sample` times one round (see the module doc).

    Use as a context manager (the subprocess ends on exit). ExportError if no llama.cpp binding is installed, the file
    does not load, or a sample fails or exceeds its timeout."""

    def __init__(self, path: str | os.PathLike, ids: list[int], protocol: SpeedProtocol, threads: int | None = None):
        if not llama_cpp_available():
            raise ExportError(f"no llama.cpp binding is installed; {llamacpp.INSTALL_HINT}")
        self.path, self.threads = Path(path), threads or llama_threads()
        arg = json.dumps({"path": str(self.path), "ids": list(ids[: protocol.prompt_tokens]),
                          "batches": [int(b) for b in protocol.batch_sizes], "decode": protocol.decode_tokens,
                          "threads": self.threads, "binding": llamacpp.prepare()})
        self._err = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen([sys.executable, "-c", _RUNNER, arg], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._err, text=True,
                                      env=llamacpp.runner_env(subprocess_env()))
        self.info = self._read(_START_TIMEOUT_S)
        self.base_rss = int(self.info["base_rss"])

    def _read(self, timeout: float) -> dict:
        import select

        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        line = self._proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            self._err.seek(0)
            tail = " / ".join(self._err.read().strip().splitlines()[-3:])
            why = "timed out" if not ready else f"exit {self._proc.returncode}"
            raise ExportError(f"llama.cpp could not time {self.path.name} ({why}): {tail}")
        return json.loads(line)

    def sample(self) -> dict:
        """One timed round: ``{"runs": {B: {"prefill_s", "decode_s"}}, "peak_bytes"}`` (peak since start)."""
        self._proc.stdin.write(json.dumps({"op": "run"}) + "\n")
        self._proc.stdin.flush()
        res = self._read(_SAMPLE_TIMEOUT_S)
        return {"runs": {int(b): r for b, r in res["runs"].items()}, "peak_bytes": int(res["hwm"]) - self.base_rss}

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self._proc.stdin.close()
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> "LlamaCppRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- rounds and summaries -----------------------------------------------------------------------------------------

@dataclass
class SpeedSummary:
    """Medians over the timed rounds of one model on one engine (tokens/s per batch size), peak memory (max over
    rounds) and every round's raw seconds."""

    label: str
    engine: str
    prefill_tps: dict[int, float]
    decode_tps: dict[int, float]
    peak_bytes: int | None
    samples: list[dict] = field(default_factory=list)
    prefill_cpu_tps: dict[int, float] = field(default_factory=dict)  # tokens per CPU-second (all threads)
    decode_cpu_tps: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def interleaved(samplers: dict[str, Callable[[], dict]], protocol: SpeedProtocol,
                progress: Callable[[float, str], None] | None = None,
                cancel: Callable[[], bool] | None = None) -> dict[str, list[dict]]:
    """Round-robin: ``protocol.warmup`` untimed rounds, then ``protocol.repeats`` rounds, each calling every
    sampler once in turn (the order rotates each round); returns the timed samples per key. ``cancel`` is asked
    before every sample and raises :class:`pruneviz.progress.Cancelled` (a ratio of unequal rounds would mislead,
    so nothing partial is returned)."""
    keys = list(samplers)
    out: dict[str, list[dict]] = {k: [] for k in keys}
    total = (protocol.warmup + protocol.repeats) * len(keys)
    done = 0
    for r in range(protocol.warmup + protocol.repeats):
        shift = r % len(keys)
        for k in keys[shift:] + keys[:shift]:
            if cancel is not None and cancel():
                raise Cancelled("the speed measurement was cancelled")
            s = samplers[k]()
            if r >= protocol.warmup:
                out[k].append(s)
            done += 1
            if progress:
                progress(done / total, f"round {r + 1}: {k}")
    return out


def summarise(label: str, engine: str, samples: list[dict], protocol: SpeedProtocol) -> SpeedSummary:
    """Median tokens/s per batch size of ``samples`` (from :func:`torch_sample` or :meth:`LlamaCppRunner.sample`)."""
    def med(b: int, tokens: int, key: str) -> float:
        return statistics.median(b * tokens / max(s["runs"][b][key], 1e-9) for s in samples)

    pre, dec, pre_cpu, dec_cpu = {}, {}, {}, {}
    for b in map(int, protocol.batch_sizes):
        pre[b], dec[b] = med(b, protocol.prompt_tokens, "prefill_s"), med(b, protocol.decode_tokens, "decode_s")
        if all("decode_cpu_s" in s["runs"][b] for s in samples):
            pre_cpu[b] = med(b, protocol.prompt_tokens, "prefill_cpu_s")
            dec_cpu[b] = med(b, protocol.decode_tokens, "decode_cpu_s")
    peaks = [s["peak_bytes"] for s in samples if s.get("peak_bytes") is not None]
    return SpeedSummary(label, engine, pre, dec, max(peaks) if peaks else None, samples, pre_cpu, dec_cpu)


def ratios(of: SpeedSummary, base: SpeedSummary) -> dict:
    """``of`` / ``base`` tokens/s per batch size: ``prefill``, ``decode`` (wall clock) and, where both were
    timed in CPU time too, ``prefill_cpu``, ``decode_cpu`` (tokens per CPU-second: what the work costs, apart
    from waiting for a core on a shared machine).

    When both were timed in the same rounds (:func:`interleaved`: as many samples, round ``i`` of one beside
    round ``i`` of the other), the ratio is the **median over rounds of the per-round ratio** (paired): a shared
    machine's speed drifts over minutes, by more than a 20% cut changes it, and a pair measured seconds apart
    shares most of the drift, while a ratio of two medians compares different rounds. Otherwise (unpaired
    summaries) it is the ratio of the medians."""
    paired = bool(of.samples) and len(of.samples) == len(base.samples)
    kinds = [("prefill", "prefill_s", of.prefill_tps, base.prefill_tps),
             ("decode", "decode_s", of.decode_tps, base.decode_tps)]
    if of.decode_cpu_tps and base.decode_cpu_tps:
        kinds += [("prefill_cpu", "prefill_cpu_s", of.prefill_cpu_tps, base.prefill_cpu_tps),
                  ("decode_cpu", "decode_cpu_s", of.decode_cpu_tps, base.decode_cpu_tps)]
    out = {}
    for name, key, mine, theirs in kinds:
        out[name] = {b: _paired(of.samples, base.samples, b, key) if paired else mine[b] / theirs[b]
                     for b in mine}
    return out


def _paired(mine: list[dict], theirs: list[dict], b: int, key: str) -> float:
    """Median over rounds of ``theirs``' seconds / ``mine`` (= my tokens/s over theirs, same token counts)."""
    return statistics.median(t["runs"][b][key] / max(m["runs"][b][key], 1e-9) for m, t in zip(mine, theirs))


def ratio_spread(of: SpeedSummary, base: SpeedSummary, b: int, kind: str = "decode") -> tuple[float, float]:
    """The lowest and highest per-round ``kind`` ratio at batch ``b`` of two summaries timed in the same rounds
    (how far one round's ratio strays: the noise a single measurement carries)."""
    key = f"{kind}_s"
    r = [t["runs"][b][key] / max(m["runs"][b][key], 1e-9) for m, t in zip(of.samples, base.samples)]
    return min(r), max(r)


def compare_ggufs(paths: dict[str, str | os.PathLike], ids: list[int], protocol: SpeedProtocol,
                  threads: int | None = None, progress=None, cancel=None) -> dict[str, SpeedSummary]:
    """Every GGUF in ``paths`` (label -> file) loaded in its own llama.cpp subprocess, timed interleaved with
    the same thread count (``threads``, else :func:`pruneviz.threads.llama_threads` once)."""
    runners: dict[str, LlamaCppRunner] = {}
    threads = threads or llama_threads()  # one count for every file, chosen once
    try:
        for label, path in paths.items():
            runners[label] = LlamaCppRunner(path, ids, protocol, threads)
        samples = interleaved({k: r.sample for k, r in runners.items()}, protocol, progress, cancel)
    finally:
        for r in runners.values():
            r.close()
    return {k: summarise(k, "llama.cpp", v, protocol) for k, v in samples.items()}


APP_PROTOCOL = SpeedProtocol(prompt_tokens=64, decode_tokens=32, batch_sizes=(1,), warmup=1, repeats=3)


def gguf_speedup(dense_model, tokenizer, pruned_gguf: str | os.PathLike, weight_type: str,
                 protocol: SpeedProtocol = APP_PROTOCOL, progress=None, cancel=None) -> dict:
    """The llama.cpp speed-up of an exported GGUF: ``dense_model`` is written as a GGUF of the same
    ``weight_type`` into a temporary folder, both files are timed interleaved (:func:`compare_ggufs`) and the
    result says ``dense`` and ``pruned`` (:class:`SpeedSummary` dicts), ``ratio`` (pruned / dense), the protocol,
    the threading policy and the two file sizes."""
    from .gguf_export import write_gguf

    vocab = dense_model.get_input_embeddings().weight.shape[0]
    ids = prompt_ids(tokenizer, protocol.prompt_tokens, vocab)
    with tempfile.TemporaryDirectory(prefix="pruneviz-speed-") as td:
        dense_path = Path(td) / f"dense.{weight_type}.gguf"
        if progress:
            progress(0.02, f"writing the dense model as {weight_type} GGUF")
        write_gguf(dense_model, tokenizer, dense_path, weight_type)
        sizes = {"dense": dense_path.stat().st_size, "pruned": Path(pruned_gguf).stat().st_size}
        res = compare_ggufs({"dense": dense_path, "pruned": pruned_gguf}, ids, protocol, progress=progress,
                            cancel=cancel)
    return {"dense": res["dense"].to_dict(), "pruned": res["pruned"].to_dict(),
            "ratio": ratios(res["pruned"], res["dense"]), "protocol": protocol.describe(),
            "threading": threading_policy(), "policy": policy(), "file_bytes": sizes}
