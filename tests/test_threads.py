"""The threading policy (pruneviz.threads): what it reports, and that the entry points set it before torch loads."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pruneviz import threads

ROOT = Path(__file__).resolve().parents[1]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", threads.THREADS_ENV, threads.LLAMA_THREADS_ENV)}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def run_py(code: str, **env) -> dict:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=clean_env(**env), timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


REPORT = "import json; from pruneviz import threads; print(json.dumps(threads.policy()))"


def test_policy_reports_what_is_set(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv(threads.THREADS_ENV, "3")
    monkeypatch.delenv(threads.LLAMA_THREADS_ENV, raising=False)
    p = threads.policy()
    assert p["omp_wait_policy"] == "PASSIVE" and p["llama_threads"] == 3 and p["requested"] == "3"
    assert p["cores"] == threads.available_cores()
    import torch

    assert p["torch_threads"] == torch.get_num_threads()
    line = threads.describe(p)
    assert "OMP_WAIT_POLICY=PASSIVE" in line and "3 llama.cpp threads" in line


def test_default_threads_and_bad_values(monkeypatch):
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    assert threads.default_threads() == min(threads.available_cores(), threads.MAX_THREADS)
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(threads.THREADS_ENV, bad)
        with pytest.raises(ValueError, match=threads.THREADS_ENV):
            threads.default_threads()


def test_llama_threads_follow_the_idle_cores_unless_set(monkeypatch):
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    monkeypatch.delenv(threads.LLAMA_THREADS_ENV, raising=False)
    monkeypatch.setattr(threads, "default_threads", lambda: 4)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert threads.llama_threads() == 1 and "load average 2.6" in threads.llama_threads_rule()
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert threads.llama_threads() == 1
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert threads.llama_threads() == 4
    monkeypatch.setenv(threads.THREADS_ENV, "3")
    assert threads.llama_threads() == 3 and threads.llama_threads_rule() == threads.THREADS_ENV
    monkeypatch.setenv(threads.LLAMA_THREADS_ENV, "2")
    assert threads.llama_threads() == 2 and threads.llama_threads_rule() == threads.LLAMA_THREADS_ENV


def test_subprocess_env_carries_the_wait_policy(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert threads.subprocess_env()["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert threads.subprocess_env()["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's choice wins


def test_configure_sets_torch_threads_in_a_fresh_process():
    p = run_py("import json; from pruneviz import threads; threads.configure(); print(json.dumps(threads.policy()))",
               PRUNEVIZ_THREADS="1")
    assert p["torch_threads"] == 1 and p["omp_wait_policy"] == "PASSIVE" and p["set_before_torch"] is True
    assert p["source"] == "pruneviz"


def test_a_user_setting_wins_and_late_application_is_reported():
    p = run_py(REPORT.replace("print(", "threads.apply_env(); print("), OMP_WAIT_POLICY="ACTIVE")
    assert p["omp_wait_policy"] == "ACTIVE" and p["source"] == "environment"
    late = run_py("import json, torch; from pruneviz import threads; threads.apply_env(); "
                  "print(json.dumps({'p': threads.policy(), 'd': threads.describe()}))")
    assert late["p"]["set_before_torch"] is False and "not in effect" in late["d"]


def test_python_m_pruneviz_sets_the_policy_before_torch():
    code = ("import json, runpy, sys; sys.argv = ['pruneviz', '--help']\n"
            "try:\n    runpy.run_module('pruneviz', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "from pruneviz import threads; print(json.dumps(threads.policy()))")
    p = run_py(code)
    assert p["omp_wait_policy"] == "PASSIVE" and p["set_before_torch"] is True


def test_bench_common_sets_the_policy_before_torch():
    p = run_py("import json, sys; sys.path.insert(0, 'bench'); import common; from pruneviz import threads; "
               "print(json.dumps(threads.policy()))")
    assert p["omp_wait_policy"] == "PASSIVE" and p["set_before_torch"] is True and p["torch_threads"]


def test_app_applies_the_policy_before_any_other_import():
    import ast

    tree = ast.parse((ROOT / "app.py").read_text())
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    first, second = body[0], body[1]
    assert isinstance(first, ast.ImportFrom) and first.module == "pruneviz.threads"
    assert isinstance(second, ast.Expr) and second.value.func.id == "apply_env"


def test_chat_timings_state_the_policy():
    from pruneviz.chat import generate_reply
    from pruneviz.testing import tiny_model, tiny_tokenizer

    res = generate_reply(tiny_model(), tiny_tokenizer(), [{"role": "user", "content": "hi"}], max_new_tokens=3)
    assert res.threading == threads.describe() and "OMP_WAIT_POLICY" in res.threading
