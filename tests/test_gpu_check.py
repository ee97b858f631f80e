"""bench/gpu_check.py on CPU: its arguments, the clean exit without CUDA, and the quick dry run of every step."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402


def test_arguments():
    a = gpu_check.parse_args([])
    assert a.device == "cuda" and not a.quick and a.out is None and a.budget < 480
    a = gpu_check.parse_args(["--device", "cpu", "--quick", "--out", "x", "--step-timeout", "5"])
    assert a.device == "cpu" and a.quick and a.out == Path("x") and a.step_timeout == 5
    for bad in (["--device", "tpu"], ["--budget", "0"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_says_so_and_exits_cleanly(tmp_path):
    res = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "no CUDA device" in res.stdout and "nothing was run" in res.stdout
    assert not any(tmp_path.iterdir())


def test_quick_dry_run_runs_every_step(tmp_path):
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = [r["step"] for r in data["rows"]]
    from pruneviz.importance import available

    assert {f"criterion {n}" for n in available()} <= set(steps)
    assert {"load bf16", "load fp16", "SlimGPT solver", "surgery", "export + reload (HF)", "perplexity",
            "decode speed"} <= set(steps)
    assert all(r["status"] == "ok" for r in data["rows"]), data["rows"]
    assert "| decode speed | ok |" in (tmp_path / "gpu_check.md").read_text()


def test_a_step_past_its_timeout_is_recorded_and_the_rest_skipped(monkeypatch):
    import time

    monkeypatch.setattr(gpu_check, "steps", lambda ctx: [("slow", lambda: time.sleep(5)), ("next", lambda: "x")])
    rows = gpu_check.run_steps({"device": "cpu"}, step_timeout=0.5, budget=1.2)
    assert rows[0]["status"] == "TIMEOUT" and rows[0]["seconds"] < 2
    assert rows[1]["status"] == "skipped"
