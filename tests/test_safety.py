"""Nothing lost, nothing silently wrong (issue 10): data safety of exports and writes, safetensors-only loading,
model-card escaping, strict plan/scores parsing, plans on pruned models, configs that disagree with their weights
or are absurd, context limits, and one-line CLI errors for each of those. Every case failed before its fix.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pruneviz import export, fsio, importance
from pruneviz.allocate import Target, allocate
from pruneviz.chat import generate_reply
from pruneviz.cli import main as cli_main
from pruneviz.errors import CriterionError, ExportError, ModelLoadError, PlanError, PrunevizError, TextError
from pruneviz.evaluate import perplexity
from pruneviz.importance import Calibration, ImportanceMap
from pruneviz.loading import load_model, load_offloaded, load_pruned_folder
from pruneviz.plan import Plan
from pruneviz.surgery import apply_plan
from pruneviz.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def plan(llama):
    return Plan.empty(llama).with_units("channel", 1, range(8))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, llama):
    folder = tmp_path_factory.mktemp("src") / "tiny-llama"
    llama.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ragged_folder(tmp_path_factory, llama):
    plan = Plan.empty(llama).with_units("channel", 0, range(10)).with_units("kv", 1, [0])
    folder = tmp_path_factory.mktemp("ragged") / "tiny-ragged"
    export.save_pruned(apply_plan(llama, plan), tiny_tokenizer(), folder, plan=plan, check_remote_code=False)
    return folder


def one_line(exc: BaseException, *words: str) -> None:
    text = str(exc)
    assert len(text) > 30 and "\n" not in text.strip(), text
    for w in words:
        assert w.lower() in text.lower(), (w, text)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(capsys, argv) -> tuple[int, list[str]]:
    code = cli_main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error:")]


# ---- data loss: overwrite -------------------------------------------------------------------------------------------

def test_overwrite_refuses_a_folder_that_is_not_an_export(tmp_path, llama, plan):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ExportError) as e:
        export.save_pruned(apply_plan(llama, plan), tiny_tokenizer(), target, plan=plan, overwrite=True)
    one_line(e.value, "not a pruneviz export")
    assert snapshot(target) == {"holiday.jpg": b"precious"}


def test_overwrite_replaces_a_previous_export(tmp_path, llama, plan):
    target = tmp_path / "out"
    export.save_pruned(apply_plan(llama, plan), tiny_tokenizer(), target, plan=plan)
    other = Plan.empty(llama).with_units("channel", 2, range(4))
    report = export.save_pruned(apply_plan(llama, other), tiny_tokenizer(), target, plan=other, overwrite=True)
    assert report.ok and export.read_plan(target / export.PLAN_FILE) == other
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_never_replaces_the_source_model(tmp_path, model_folder, plan):
    src = tmp_path / "model"
    shutil.copytree(model_folder, src)
    lm = load_model(str(src), device="cpu")
    before = snapshot(src)
    pruned = apply_plan(lm.model, Plan.empty(lm.model).with_units("channel", 1, range(8)))
    for target in (src, tmp_path):  # the model's folder, and the folder above it
        (target / export.REPORT_FILE).write_text(json.dumps({"format": "stock"}))  # even if it looks like an export
        with pytest.raises(ExportError) as e:
            export.save_pruned(pruned, lm.tokenizer, target, overwrite=True)
        one_line(e.value, "source model")
        (target / export.REPORT_FILE).unlink()
    assert snapshot(src) == before


def test_cli_export_to_the_current_folder_and_over_the_model(tmp_path, model_folder, capsys, monkeypatch):
    src = tmp_path / "model"
    shutil.copytree(model_folder, src)
    monkeypatch.chdir(tmp_path)
    for out, extra in ((".", []), (".", ["--overwrite"]), (str(src), ["--overwrite"])):
        code, errors = cli(capsys, ["export", "--model", src, "--device", "cpu", "--out", out, *extra])
        assert code == 2 and len(errors) == 1, (out, extra, errors)
    assert (src / "model.safetensors").is_file()


def test_stale_temporaries_of_a_killed_export_are_removed(tmp_path, llama, plan):
    target = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = fsio.temp_folder(target)
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    mark = json.loads((stale / fsio.TEMP_MARKER).read_text())
    (stale / fsio.TEMP_MARKER).write_text(json.dumps({**mark, "pid": int(dead.stdout)}))
    not_ours = tmp_path / ".out.tmp-mine"  # same name pattern, no marker: never touched
    not_ours.mkdir()
    live = fsio.temp_folder(target)  # made by this (running) process: another export in progress
    export.save_pruned(apply_plan(llama, plan), tiny_tokenizer(), target, plan=plan)
    assert not stale.exists() and not_ours.exists() and live.exists()


# ---- data loss: atomic files, checks before slow work, permissions -------------------------------------------------

def test_atomic_write_keeps_the_old_file_on_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    path.write_text("old")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ExportError) as e:
        fsio.atomic_write_text(path, "new")
    one_line(e.value, "disk is full")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["plan.json"]


@pytest.mark.parametrize("case", ["missing_parent", "is_a_dir", "too_long", "no_space"])
def test_write_targets_are_checked_first(tmp_path, plan, monkeypatch, case):
    path = {"missing_parent": tmp_path / "nope" / "plan.json", "is_a_dir": tmp_path,
            "too_long": tmp_path / ("p" * 300 + ".json"), "no_space": tmp_path / "plan.json"}[case]
    if case == "no_space":
        monkeypatch.setattr(fsio, "free_bytes", lambda folder: 10)
    with pytest.raises(ExportError) as e:
        export.write_plan(plan, path)
    one_line(e.value)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_export_checks_free_space_before_writing(tmp_path, llama, plan, monkeypatch):
    monkeypatch.setattr(fsio, "free_bytes", lambda folder: 1000)
    calls = []
    monkeypatch.setattr(export, "_write_model", lambda *a: calls.append(a))
    with pytest.raises(ExportError) as e:
        export.save_pruned(apply_plan(llama, plan), tiny_tokenizer(), tmp_path / "out", plan=plan)
    one_line(e.value, "free space")
    assert calls == [] and list(tmp_path.iterdir()) == []


def test_exports_and_plans_get_normal_permissions(tmp_path, llama, plan):
    old = os.umask(0o022)
    try:
        export.save_pruned(apply_plan(llama, plan), tiny_tokenizer(), tmp_path / "out", plan=plan)
        export.write_plan(plan, tmp_path / "plan.json")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert set(modes.values()) == {0o644}, modes
    assert (tmp_path / "plan.json").stat().st_mode & 0o777 == 0o644


# ---- security -------------------------------------------------------------------------------------------------------

class _Evil:
    def __reduce__(self):
        return (open, (os.environ["PRUNEVIZ_TEST_SENTINEL"], "w"))


def test_pruneviz_folder_with_a_pickle_never_unpickles_it(tmp_path, ragged_folder, monkeypatch):
    folder = tmp_path / "m"
    shutil.copytree(ragged_folder, folder)
    sentinel = tmp_path / "unpickled"
    monkeypatch.setenv("PRUNEVIZ_TEST_SENTINEL", str(sentinel))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil()))
    lm = load_model(str(folder), device="cpu")
    load_pruned_folder(folder)
    assert not sentinel.exists()
    assert torch.isfinite(lm.model(torch.tensor([[1, 5, 6]])).logits).all()
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as e:
        load_model(str(folder), device="cpu")
    one_line(e.value, "pickle")
    assert not sentinel.exists()


def test_model_card_cannot_inject_yaml_or_markdown(llama, plan):
    evil = "org/x\nlicense: mit\n# Hacked\n<script>alert(1)</script> [link](http://evil)"
    bad = Plan(plan.base.__class__(evil, plan.base.geometry, plan.base.probe), channels=plan.channels,
               provenance_json=json.dumps({"criterion": "x\n## Injected\n- pwned", "strategy": "![i](http://e)"}))
    card = export.model_card(apply_plan(llama, plan), bad, {"note\n# H": "a\n---\nb: c"}, "stock")
    front = card.split("---")[1]
    keys = [line.split(":")[0] for line in front.splitlines() if line and not line.startswith(("-", "#", " "))]
    assert keys == ["tags", "library_name"]
    body = card.split("---", 2)[2]
    assert "<script>" not in card and "[link](" not in card and "![i](" not in body  # escaped: inert text
    assert not any(line.startswith(("## Injected", "# H", "# Hacked")) for line in body.splitlines())


def test_unknown_model_type_in_a_pruneviz_folder_is_one_line(tmp_path, ragged_folder):
    folder = tmp_path / "m"
    shutil.copytree(ragged_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "my_secret_lm"}))
    with pytest.raises(ModelLoadError) as e:
        load_model(str(folder), device="cpu")
    one_line(e.value, "trust_remote_code")


def test_offloading_a_remote_code_folder_is_one_line(tmp_path, model_folder):
    folder = tmp_path / "custom"
    shutil.copytree(model_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="my_custom_lm", auto_map={"AutoModelForCausalLM": "modeling_custom.X"})
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        load_offloaded(str(folder), device="cpu", offload="disk", offload_folder=tmp_path / "off")
    one_line(e.value, "trust_remote_code")


# ---- wrong results: plans on pruned models, strict parsing ----------------------------------------------------------

def test_a_dense_plan_on_a_pruned_model_is_refused(tmp_path, llama, plan, ragged_folder, capsys):
    pruned = apply_plan(llama, plan)
    with pytest.raises(PlanError) as e:
        apply_plan(pruned, plan)
    one_line(e.value, "already pruned")
    dense_plan = Plan.empty(llama).with_units("channel", 0, [1])
    export.write_plan(dense_plan, tmp_path / "plan.json")
    code, errors = cli(capsys, ["evaluate", "--model", ragged_folder, "--device", "cpu", "--plan",
                                tmp_path / "plan.json"])
    assert code == 2 and "already pruned" in errors[0]


def _plan_dict(plan):
    return json.loads(plan.to_json())


PLAN_BREAKS = {
    "float_index": (lambda d: {**d, "channels": {"1": [0.7, 1]}}, "channels.1[0]"),
    "bool_index": (lambda d: {**d, "blocks": [True]}, "blocks[0]"),
    "float_layer": (lambda d: {**d, "heads": {"1.5": [0]}}, "heads"),
    "huge_index": (lambda d: {**d, "blocks": [10 ** 30]}, "blocks[0]"),
    "no_probe": (lambda d: {**d, "base": {k: v for k, v in d["base"].items() if k != "probe"}}, "base.probe"),
    "empty_probe": (lambda d: {**d, "base": {**d["base"], "probe": []}}, "base.probe"),
    "bool_geometry": (lambda d: {**d, "base": {**d["base"], "geometry": {**d["base"]["geometry"], "n_layers": True}}},
                      "n_layers"),
    "compensation_list": (lambda d: {**d, "compensation": ["slimgpt"]}, "compensation"),
    "provenance_list": (lambda d: {**d, "provenance": [1, 2]}, "provenance"),
    "unknown_field": (lambda d: {**d, "kv": {"0": [1]}}, "unknown"),
}


@pytest.mark.parametrize("how", sorted(PLAN_BREAKS))
def test_plans_are_parsed_strictly(plan, how):
    fn, field = PLAN_BREAKS[how]
    with pytest.raises(PlanError) as e:
        Plan.from_json(json.dumps(fn(_plan_dict(plan))))
    one_line(e.value, field)


@pytest.mark.parametrize("text,word", [
    ('{"schema": "pruneviz.plan/1", "schema": "pruneviz.plan/1"}', "twice"),
    ("[" * 100000 + "]" * 100000, "nested"),
    ('{"a": ' * 70 + "1" + "}" * 70, "nested"),
    ('{"blocks": [' + "9" * 5000 + "]}", "json"),
])
def test_pathological_plan_json(text, word):
    with pytest.raises(PlanError) as e:
        Plan.from_json(text)
    one_line(e.value, word)


def test_duplicate_layer_keys_are_refused(plan):
    text = plan.to_json().replace('"channels": {', '"channels": {"1": [0], ', 1)
    with pytest.raises(PlanError, match="twice"):
        Plan.from_json(text)


@pytest.fixture(scope="module")
def scores(llama):
    return importance.compute(llama, "magnitude")


def test_scores_are_parsed_strictly(scores, plan):
    d = json.loads(scores.to_json())
    for bad, word in (({**d, "heads": [[True] * 6] * 4}, "numbers"), ({**d, "criterion": 3}, "criterion"),
                      (_plan_dict(plan), "plan"), ([d], "list")):
        with pytest.raises(CriterionError) as e:
            ImportanceMap.from_json(json.dumps(bad))
        one_line(e.value, word)
    with pytest.raises(CriterionError, match="twice"):
        ImportanceMap.from_json(scores.to_json().replace('{"criterion": "magnitude"', '{"criterion": "x", '
                                                         '"criterion": "magnitude"', 1))
    assert torch.equal(ImportanceMap.from_json(scores.to_json()).heads, scores.heads)  # a good file still loads


def test_scores_of_another_checkpoint_are_refused(scores):
    other = tiny_model("llama", seed=1)  # same shapes, other weights
    with pytest.raises(PrunevizError) as e:
        allocate(other, ImportanceMap.from_json(scores.to_json()), Target(0.2))
    one_line(e.value, "different weights")


# ---- wrong results: configs ---------------------------------------------------------------------------------------

def _with_config(tmp_path, model_folder, edit) -> Path:
    folder = tmp_path / "m"
    shutil.copytree(model_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(cfg)))
    return folder


def test_config_with_fewer_layers_than_the_weights_is_refused(tmp_path, model_folder):
    folder = _with_config(tmp_path, model_folder, lambda c: {**c, "num_hidden_layers": 2})
    with pytest.raises(ModelLoadError) as e:
        load_model(str(folder), device="cpu")
    one_line(e.value, "config.json", "truncated")


@pytest.mark.parametrize("edit", [lambda c: {**c, "num_hidden_layers": 10 ** 9}, lambda c: {**c, "hidden_size": -4},
                                  lambda c: {**c, "num_hidden_layers": 400}, lambda c: [c], lambda c: None,
                                  lambda c: {k: v for k, v in c.items() if k != "model_type"}],
                         ids=["1e9_layers", "negative", "too_big_for_weights", "list", "null", "no_model_type"])
def test_absurd_or_broken_configs_fail_at_once(tmp_path, model_folder, edit):
    folder = _with_config(tmp_path, model_folder, edit)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        load_model(str(folder), device="cpu")
    assert time.perf_counter() - t0 < 10
    one_line(e.value, "config.json")


# ---- wrong results: context limits --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def opt():
    return tiny_model("opt")  # learned positions: 128 tokens


def test_inputs_beyond_learned_positions_fail_at_once(opt):
    tok = tiny_tokenizer()
    with pytest.raises(TextError) as e:
        perplexity(opt, tok, "some text " * 500, "long")
    one_line(e.value, "128")
    with pytest.raises(TextError):
        generate_reply(opt, tok, [{"role": "user", "content": "x" * 300}], max_new_tokens=4)
    with pytest.raises(TextError):
        generate_reply(opt, tok, [{"role": "user", "content": "hi"}], max_new_tokens=500)
    with pytest.raises(TextError):
        importance.compute(opt, "wanda_sp", Calibration(torch.randint(4, 96, (2, 200))))
    assert generate_reply(opt, tok, [{"role": "user", "content": "hi"}], max_new_tokens=3).n_tokens <= 3


# ---- CLI: one line, exit 2, before slow work ----------------------------------------------------------------------

@pytest.fixture
def no_loading(monkeypatch):
    import pruneviz.cli as cli_mod

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cli_mod, "_load", refuse)


def test_cli_checks_inputs_before_loading(tmp_path, model_folder, scores, plan, capsys, no_loading):
    common = ["--model", model_folder, "--device", "cpu"]
    export.write_plan(plan, tmp_path / "plan.json")
    (tmp_path / "scores.json").write_text(scores.to_json())
    (tmp_path / "deep.json").write_text("[" * 50000 + "]" * 50000)
    (tmp_path / "taken").mkdir()
    cases = {
        "protocol": ["evaluate", *common, "--protocol", "no_such_protocol"],
        "max_new_tokens_0": ["chat", *common, "--max-new-tokens", "0", "hi"],
        "max_new_tokens_neg": ["chat", *common, "--max-new-tokens", "-3", "hi"],
        "plan_as_scores": ["plan", *common, "--scores", tmp_path / "plan.json", "--ratio", "0.2",
                           "--out", tmp_path / "p.json"],
        "deep_plan": ["export", *common, "--plan", tmp_path / "deep.json", "--out", tmp_path / "o"],
        "long_name": ["score", *common, "--criterion", "magnitude", "--out", tmp_path / ("s" * 300 + ".json")],
        "missing_parent": ["plan", *common, "--scores", tmp_path / "scores.json", "--ratio", "0.2",
                           "--out", tmp_path / "no" / "p.json"],
        "slimgpt_existing_export": ["slimgpt", *common, "--ratio", "0.2", "--out", tmp_path / "p.json",
                                    "--export", tmp_path / "taken"],
    }
    for case, argv in cases.items():
        code, errors = cli(capsys, argv)
        assert code == 2 and len(errors) == 1 and len(errors[0]) > 20, (case, errors)
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "o").exists()
