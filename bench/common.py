"""Shared bench plumbing: the machine and versions, the bundled model, calibration and tables.

Every bench script writes a Markdown table and a JSON file to ``bench/results/`` headed by the machine, the
library versions and the protocol, with medians and ratios against a baseline measured in the same run.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pruneviz import threads  # noqa: E402  (the threading policy, before torch loads)

threads.apply_env()

import torch  # noqa: E402

threads.configure()

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """Where and with what a bench ran."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": _git_commit()}


def _git_commit() -> str:
    """HEAD's short hash; without git (a device machine's copy of the tree) ``$PRUNEVIZ_COMMIT``, which
    bench/gpu_remote.sh sets from the pack's manifest, else "unknown"."""
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("PRUNEVIZ_COMMIT", "unknown")


def load_bundled(device: str = "auto", dtype: str = "auto"):
    from pruneviz.loading import load_model

    return load_model("bundled", device=device, dtype=dtype)


def calibration(tokenizer, samples: int = 16, seq_len: int = 128, seed: int = 0):
    from pruneviz.data import calibration_windows, split_default, text_hash
    from pruneviz.importance import Calibration

    calib_text, _ = split_default()
    tokens = calibration_windows(tokenizer, calib_text, samples, seq_len, seed)
    return Calibration(tokens, "default (pydoc topics, calibration part)", text_hash(calib_text), seed)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def write_table(name: str, title: str, protocol: list[str], columns: list[str], rows: list[list],
                extra: dict | None = None) -> Path:
    """Write ``bench/results/<name>.md`` and ``.json``; returns the Markdown path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    m = machine()
    lines = [f"# {title}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads)"
             + (f", GPU {m['gpu']}" if m["gpu"] else ", no GPU")
             + f"; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}; "
             f"{m['date']}, commit {m['commit']}.", "", "Protocol:", ""]
    lines += [f"- {p}" for p in protocol] + ["", "| " + " | ".join(columns) + " |",
                                             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"machine": m, "protocol": protocol, "columns": columns, "rows": rows, **(extra or {})}, indent=1,
        default=str))
    print(path.read_text())
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "–"
        return f"{v:,.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)
