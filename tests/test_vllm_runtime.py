"""vLLM runs what pruneviz exports (pruneviz.vllm_runtime): the comparison, the remote-code guard and the failure
paths always; the exports in a real vLLM (``-m vllm``) where ``make vllm`` built ``.venv-vllm`` (vLLM's CPU build
in its own environment). Tiny models use ``head_dim=32``: vLLM's CPU attention has kernels for head sizes that
are multiples of 32 (it refuses 6, the other tests' size)."""
import json

import pytest
import torch

from pruneviz.decilm import CONFIG_FILE
from pruneviz.errors import ExportError
from pruneviz.export import save_pruned, write_plan
from pruneviz.plan import Plan
from pruneviz.surgery import apply_plan
from pruneviz.testing import tiny_model, tiny_tokenizer
from pruneviz.vllm_runtime import (
    VllmCheck,
    compare,
    remote_code_needed,
    root_cause,
    run_vllm,
    verify_in_vllm,
    vllm_python,
)

HEADS = {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32}  # 4 KV groups of 2 query heads
needs_vllm = pytest.mark.skipif(vllm_python() is None, reason="no vLLM environment: run `make vllm` first")


def per_layer_plan(model) -> Plan:
    """Per-layer KV heads (2, 4, 2, 2 of 4) and MLP widths, layer 3's attention and layer 1's MLP removed, block 2
    removed: every per-layer shape DeciLM's ``block_configs`` can say, on 3 kept layers."""
    p = Plan.empty(model).with_units("kv", 0, [0, 1]).with_units("head", 1, [0, 2, 4, 6])
    p = p.with_units("kv", 2, [1, 2]).with_units("kv", 3, [2, 3])
    p = p.with_units("channel", 0, [1, 2, 5]).with_units("channel", 3, [9])
    return p.without_attention(3).without_mlp(1).with_units("block", None, [2])


def rows(lp: torch.Tensor, tokens: list[int], k: int = 3) -> list[dict]:
    """vLLM-style results: each position's top ``k`` plus the chosen token."""
    out = []
    for pos, tok in enumerate(tokens):
        top = torch.topk(lp[pos], k).indices.tolist()
        out.append({str(t): float(lp[pos, t]) for t in {*top, tok}})
    return out


def test_compare_agrees_stops_at_near_ties_and_catches_mismatches():
    gen = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(6, 40, generator=gen, dtype=torch.float64) * 3, -1)  # [6, V]
    ref = lp.argmax(-1).tolist()
    same = compare(ref, lp, {"greedy": ref, "logprobs": rows(lp, ref)}, 1e-3)
    assert same == {"greedy_agreed": 6, "greedy_total": 6, "greedy_near_tie_at": None, "max_abs_dlogprob": 0.0,
                    "ok": True}

    off = rows(lp, ref)
    off[2] = {t: v + 0.01 for t, v in off[2].items()}
    shifted = compare(ref, lp, {"greedy": ref, "logprobs": off}, 1e-3)
    assert not shifted["ok"] and shifted["max_abs_dlogprob"] == pytest.approx(0.01)

    other = list(ref)
    other[3] = int(torch.topk(lp[3], 2).indices[1])  # vLLM takes the runner-up at position 3
    wrong = compare(ref, lp, {"greedy": other, "logprobs": rows(lp, other)}, 1e-3)
    assert not wrong["ok"] and wrong["greedy_agreed"] == 3 and wrong["greedy_near_tie_at"] is None

    tied = lp.clone()
    a, b = torch.topk(tied[3], 2).indices.tolist()
    tied[3, b] = tied[3, a] - 1e-4  # a near-tie: either choice is right, the comparison stops there
    other[3] = b
    tie = compare(ref, tied, {"greedy": other, "logprobs": rows(tied, other)}, 1e-3)
    assert tie["ok"] and tie["greedy_agreed"] == 3 and tie["greedy_near_tie_at"] == 3

    short = compare(ref, lp, {"greedy": ref[:4], "logprobs": rows(lp, ref[:4])}, 1e-3)
    assert not short["ok"] and short["greedy_agreed"] == 4


def test_remote_code_only_for_pruneviz_own_config_file(tmp_path):
    model = tiny_model("llama", **HEADS)
    plan = per_layer_plan(model)
    folder = tmp_path / "decilm"
    save_pruned(apply_plan(model, plan), tiny_tokenizer(), folder, plan=plan, format="decilm")
    assert remote_code_needed(folder)  # nemotron-nas's config class comes from the folder: pruneviz's own file
    plain = tmp_path / "hf"
    save_pruned(model, tiny_tokenizer(), plain)
    assert not remote_code_needed(plain)

    (folder / CONFIG_FILE).write_text((folder / CONFIG_FILE).read_text() + "\nimport os  # changed\n")
    with pytest.raises(ExportError, match="did not write"):
        remote_code_needed(folder)
    assert remote_code_needed(folder, trust_remote_code=True)
    (plain / "modeling_x.py").write_text("raise SystemExit\n")
    with pytest.raises(ExportError, match="modeling_x.py"):
        run_vllm(plain, [1, 2, 3], python=__import__("sys").executable)  # refused before anything runs


def test_missing_or_broken_vllm_is_a_clear_error(tmp_path, monkeypatch):
    model = tiny_model("llama", **HEADS)
    folder = tmp_path / "hf"
    save_pruned(model, tiny_tokenizer(), folder)
    monkeypatch.setenv("PRUNEVIZ_VLLM_PYTHON", str(tmp_path / "nowhere" / "python"))
    assert vllm_python() is None
    with pytest.raises(ExportError, match="make vllm"):
        verify_in_vllm(model, tiny_tokenizer(), folder)
    # an interpreter without vLLM: the runner's own failure comes back as one line
    with pytest.raises(ExportError, match="ModuleNotFoundError: No module named 'vllm'"):
        run_vllm(folder, [1, 2, 3], python=__import__("sys").executable)
    with pytest.raises(ExportError, match="exceed"):
        run_vllm(folder, list(range(120)), new_tokens=16, python=__import__("sys").executable)


def test_root_cause_skips_the_engine_wrappers():
    log = ("(Worker) ERROR RuntimeError: Unsupported CPU attention configuration: head_dim=6\n"
           "RuntimeError: Engine core initialization failed. See root cause above.\n"
           "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.\n")
    assert root_cause(log) == "RuntimeError: Unsupported CPU attention configuration: head_dim=6"
    assert root_cause("") == "no output"


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_per_layer_decilm_export_runs_in_vllm_with_the_same_tokens(family, tmp_path):
    """vLLM's own DeciLMForCausalLM on the export: per-layer KV heads and MLP widths, no_op attention and MLP,
    a removed block (and Qwen2's q/k/v biases): the in-memory model's greedy tokens, log-probabilities within
    1e-3 (fp32 on both sides)."""
    model = tiny_model(family, **HEADS)
    plan = per_layer_plan(model)
    pruned = apply_plan(model, plan)
    folder = tmp_path / "out"
    save_pruned(pruned, tiny_tokenizer(), folder, plan=plan, format="decilm")
    got = verify_in_vllm(pruned, tiny_tokenizer(), folder)
    assert isinstance(got, VllmCheck) and got.ok, got.line()
    assert got.architecture == "DeciLMConfig" and got.greedy_agreed == got.greedy_total == 16
    assert got.tokens == got.reference_tokens and got.max_abs_dlogprob < 1e-3
    assert json.loads(json.dumps(got.to_dict()))["ok"]


@pytest.mark.vllm
@needs_vllm
def test_flap_bias_compensation_runs_in_vllm(tmp_path):
    """FLAP's compensation biases on the output projections of attention and MLP (``attention_bias`` without
    ``qkv_bias``: vLLM's o_proj-only bias path, no q/k/v biases) on a plan cutting KV groups and MLP channels,
    in vLLM."""
    from pruneviz.allocate import Target, allocate
    from pruneviz.importance import Calibration, compute

    model = tiny_model("llama", **HEADS)
    cal = Calibration(torch.randint(4, 90, (4, 16), generator=torch.Generator().manual_seed(0)))
    plan = allocate(model, compute(model, "flap", cal), Target(0.3), strategy="global", deployable="vllm",
                    compensation="flap_bias", attn_share=0.5)
    pruned = apply_plan(model, plan, calibration=cal.tokens)
    folder = tmp_path / "out"
    save_pruned(pruned, tiny_tokenizer(), folder, plan=plan, format="decilm")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["attention_bias"] and cfg["mlp_bias"] and not cfg["qkv_bias"]
    assert any(plan.removed("kv").values()) and any(plan.removed("channel").values())  # both kinds cut
    got = verify_in_vllm(pruned, tiny_tokenizer(), folder)
    assert got.ok and got.greedy_agreed == 16, got.line()


@pytest.mark.vllm
@needs_vllm
def test_vllm_check_catches_a_wrong_export(tmp_path):
    """The check can fail: the export of one model compared with another (the dense one) is a mismatch."""
    model = tiny_model("llama", **HEADS)
    plan = per_layer_plan(model)
    folder = tmp_path / "out"
    save_pruned(apply_plan(model, plan), tiny_tokenizer(), folder, plan=plan, format="decilm")
    got = verify_in_vllm(model, tiny_tokenizer(), folder)
    assert not got.ok and got.max_abs_dlogprob > 1e-2 and "MISMATCH" in got.line()


def cli_base(tmp_path) -> list[str]:
    model = tiny_model("llama", **HEADS)
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    write_plan(per_layer_plan(model), tmp_path / "plan.json")
    return ["--model", str(folder), "--device", "cpu", "--dtype", "fp32", "--plan", str(tmp_path / "plan.json")]


def test_cli_export_vllm_refuses_a_gguf_before_writing(tmp_path, capsys):
    from pruneviz.cli import main

    assert main(["export", *cli_base(tmp_path), "--format", "gguf", "--vllm", "--out", str(tmp_path / "o")]) != 0
    assert "--format decilm" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.vllm
@needs_vllm
def test_cli_export_decilm_then_vllm(tmp_path, capsys):
    from pruneviz.cli import main

    assert main(["export", *cli_base(tmp_path), "--format", "decilm", "--vllm", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "decilm checkpoint" in out and "greedy 16/16 tokens agree" in out and out.rstrip().endswith(": ok")


# ---- the app: the Export page's "Run in vLLM" ---------------------------------------------------------------------

def export_decilm_in_app(monkeypatch):
    from test_app import clean, pruned_on_export_page

    monkeypatch.setenv("PRUNEVIZ_JOB_WAIT", "300")  # the job ends within the click's run
    at = pruned_on_export_page()
    clean(at.radio(key="ex_format").set_value("decilm").run())
    clean(at.button(key="ex_run").click().run())
    assert at.session_state["export"].report.ok
    return at


def test_export_page_says_how_to_get_vllm(tiny_app, monkeypatch):
    from pruneviz.ui import vllm_panel

    monkeypatch.setattr(vllm_panel, "vllm_python", lambda: None)
    at = export_decilm_in_app(monkeypatch)
    assert not [b for b in at.button if b.key == "ex_vllm"]
    assert any("make vllm" in c.value for c in at.caption)


def test_export_page_runs_the_export_in_vllm_as_a_job(tiny_app, monkeypatch, tmp_path):
    """The button's job reloads the written folder and hands it to the vLLM check (here a recording stand-in: the
    app's tiny model has head_dim 8, which vLLM's CPU attention refuses; the real check is tested above)."""
    from pruneviz.ui import vllm_panel

    seen = {}

    def check(model, tokenizer, folder):
        seen.update(folder=folder, params=sum(p.numel() for p in model.parameters()))
        return VllmCheck(ok=False, greedy_agreed=3, greedy_total=16, greedy_near_tie_at=None, max_abs_dlogprob=0.5,
                         tolerance=1e-3, vllm_version="0.32.0", architecture="DeciLMConfig", load_s=40.0)

    monkeypatch.setattr(vllm_panel, "vllm_python", lambda: tmp_path / "python")
    monkeypatch.setattr(vllm_panel, "verify_in_vllm", check)
    at = export_decilm_in_app(monkeypatch)
    report = at.session_state["export"].report
    clean_run = at.button(key="ex_vllm").click().run()
    assert not clean_run.exception
    assert seen == {"folder": str(report.folder), "params": report.params}
    assert at.session_state["vllm_check"]["folder"] == str(report.folder)
    assert any("greedy 3/16 tokens agree" in e.value and "MISMATCH" in e.value for e in at.error)
