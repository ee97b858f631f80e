"""The CPU threading policy used for timing, the app's tokens/s, the benchmarks and llama.cpp runs.

Why: with OpenMP's default wait policy each of torch's worker threads spins for a while after every parallel
region. On a machine whose cores are shared (other processes, other agents), the spinning threads steal the cores
the working threads need: one ``generate`` of 64 tokens took 43 s instead of 5 s (8-10x slower). So pruneviz sets,
deliberately and in one place:

- ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep instead of spinning. OpenMP reads it once, when its
  runtime is loaded (``import torch``), so :func:`apply_env` must run before torch is imported: it is the first
  import of every entry point (``app.py``, ``python -m pruneviz``, ``bench/common.py``). ``setdefault``: a value
  the user exported wins (and :func:`policy` reports it).
- ``torch.set_num_threads(n)`` with ``n`` = :func:`default_threads`: ``PRUNEVIZ_THREADS`` if set, else the cores
  this process may run on (``sched_getaffinity``), at most :data:`MAX_THREADS`. Interop threads are left alone.
  With the passive wait policy extra torch threads sleep instead of spinning, so ``n`` need not track the load
  (measured at a load of ~8 on 2 cores: decode 7.6 tokens/s with 2 threads, 6.9 with 1).
- llama.cpp (``n_threads`` and ``n_threads_batch``, :func:`llama_threads`): ``PRUNEVIZ_LLAMA_THREADS`` or
  ``PRUNEVIZ_THREADS`` if set, else the *idle* cores: torch's ``n`` less the one-minute load average (at least 1).
  ggml's own thread pool has no passive mode: its threads spin at the barrier after every operation, so a thread
  more than there are free cores waits for a descheduled partner at every op. Measured on the 2-core machine at a
  load of ~8: decode 5.3 tokens/s with 2 threads, 41 with 1 (SmolLM2-135M f16). Its subprocesses also inherit
  ``OMP_WAIT_POLICY=PASSIVE`` (:func:`subprocess_env`; only an OpenMP build of ggml reads it).

:func:`policy` reports what is in effect (for bench tables and the app's tokens/s captions), :func:`describe` the
same in one line. This module imports no torch at import time.
"""
from __future__ import annotations

import os
import sys

WAIT_POLICY = "PASSIVE"
THREADS_ENV = "PRUNEVIZ_THREADS"
LLAMA_THREADS_ENV = "PRUNEVIZ_LLAMA_THREADS"
MAX_THREADS = 8

_state = {"applied": False, "torch_loaded_before": None, "wait_policy_source": None}


def apply_env() -> None:
    """Set ``OMP_WAIT_POLICY`` (unless the user set it) and record whether torch was already imported (then the
    setting comes too late for this process: :func:`policy` says so). Idempotent; call before ``import torch``."""
    if _state["applied"]:
        return
    _state["torch_loaded_before"] = "torch" in sys.modules
    _state["wait_policy_source"] = "environment" if "OMP_WAIT_POLICY" in os.environ else "pruneviz"
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    _state["applied"] = True


def available_cores() -> int:
    """Cores this process may run on (affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _env_threads(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name} must be a positive whole number of threads, not {raw!r}")
    return int(raw)


def default_threads() -> int:
    """Threads for torch: ``PRUNEVIZ_THREADS`` (a positive whole number) if set, else :func:`available_cores`
    capped at :data:`MAX_THREADS`. ValueError for a malformed ``PRUNEVIZ_THREADS``."""
    n = _env_threads(THREADS_ENV)
    return n if n is not None else min(available_cores(), MAX_THREADS)


def load_average() -> float | None:
    """The one-minute load average (None where the OS has none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def configure(n: int | None = None) -> int:
    """Apply the policy: :func:`apply_env`, then ``torch.set_num_threads(n or default_threads())``; returns ``n``."""
    apply_env()
    import torch

    n = n or default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def llama_threads() -> int:
    """``n_threads`` / ``n_threads_batch`` for llama.cpp: ``PRUNEVIZ_LLAMA_THREADS``, else ``PRUNEVIZ_THREADS``,
    else :func:`default_threads` less the rounded load average, at least 1 (see the module doc: ggml spins)."""
    for name in (LLAMA_THREADS_ENV, THREADS_ENV):
        n = _env_threads(name)
        if n is not None:
            return n
    load = load_average()
    return max(1, default_threads() - (round(load) if load is not None else 0))


def llama_threads_rule() -> str:
    """Where :func:`llama_threads` came from, in words."""
    for name in (LLAMA_THREADS_ENV, THREADS_ENV):
        if os.environ.get(name, "").strip():
            return name
    load = load_average()
    return "idle cores" + (f", load average {load:.1f}" if load is not None else "")


def subprocess_env(extra: dict | None = None) -> dict:
    """The environment for a llama.cpp (or any timing) subprocess: this one plus the wait policy."""
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", WAIT_POLICY), **(extra or {})}


def policy() -> dict:
    """What is in effect now: ``omp_wait_policy`` (the variable, None if unset), ``source`` (pruneviz or the
    user's environment), ``set_before_torch`` (False: torch was imported before :func:`apply_env`, so this
    process's OpenMP did not read it; None: never applied), ``torch_threads`` (None if torch is not imported),
    ``llama_threads`` and ``llama_threads_rule``, ``cores`` (available), ``load_average`` and ``requested``
    (``PRUNEVIZ_THREADS`` or None)."""
    torch = sys.modules.get("torch")
    applied = _state["applied"]
    return {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "source": _state["wait_policy_source"] if applied else "environment",
            "set_before_torch": (not _state["torch_loaded_before"]) if applied else None,
            "torch_threads": torch.get_num_threads() if torch is not None else None,
            "llama_threads": llama_threads(), "llama_threads_rule": llama_threads_rule(),
            "cores": available_cores(), "load_average": load_average(),
            "requested": os.environ.get(THREADS_ENV) or None}


def describe(p: dict | None = None) -> str:
    """:func:`policy` in one line, e.g. ``"OMP_WAIT_POLICY=PASSIVE, 2 torch threads, 1 llama.cpp threads (idle
    cores, load average 1.2; 2 cores)"``; says when the wait policy came too late (torch imported first)."""
    p = p or policy()
    parts = [f"OMP_WAIT_POLICY={p['omp_wait_policy'] or 'unset (OpenMP default: spinning)'}"]
    if p["set_before_torch"] is False:
        parts[0] += " (set after torch loaded: not in effect)"
    if p["torch_threads"] is not None:
        parts.append(f"{p['torch_threads']} torch threads")
    parts.append(f"{p['llama_threads']} llama.cpp threads ({p.get('llama_threads_rule', '')}; {p['cores']} cores)")
    return ", ".join(parts)
