"""Bad inputs and faults: every one ends in a clear PrunevizError subclass whose message says what to do, leaves
nothing half-written on disk, and leaves the library working (a valid tiny model still loads afterwards).

All models are tiny (pruneviz.testing); nothing touches the network (HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
import torch
import transformers as tf

from pruneviz import allocate, export, importance, schedules
from pruneviz.cli import main as cli_main
from pruneviz.data import calibration_windows, get_text, load_text_file
from pruneviz.errors import (
    CriterionError,
    ExportError,
    ModelLoadError,
    OutOfMemoryAdvice,
    PlanError,
    PrunevizError,
    TextError,
)
from pruneviz.evaluate import perplexity
from pruneviz.loading import load_model
from pruneviz.plan import Plan
from pruneviz.surgery import apply_plan, masked_model
from pruneviz.testing import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")


# ---- shared fixtures ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory, llama):
    """A valid stock tiny-llama folder (safetensors + tokenizer)."""
    folder = tmp_path_factory.mktemp("good") / "tiny-llama"
    llama.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ragged_folder(tmp_path_factory, llama):
    """A pruneviz-format export (per-layer widths) of the tiny llama."""
    plan = Plan.empty(llama).with_units("channel", 0, range(10)).with_units("kv", 1, [0])
    pruned = apply_plan(llama, plan)
    folder = tmp_path_factory.mktemp("ragged") / "tiny-ragged"
    report = export.save_pruned(pruned, tiny_tokenizer(), folder, plan=plan, check_remote_code=False)
    assert report.format == "pruneviz"
    return folder


@pytest.fixture(scope="module")
def imap(llama):
    return importance.compute(llama, "magnitude")


def still_works(folder: Path) -> None:
    """After a failure the library keeps working: a valid folder loads and runs."""
    lm = load_model(str(folder), device="cpu")
    with torch.no_grad():
        out = lm.model(torch.tensor([[1, 5, 6, 7]])).logits
    assert torch.isfinite(out).all()


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_actionable(exc: PrunevizError, *words: str) -> None:
    """The message is one paragraph, non-trivial, and mentions each of ``words`` (case-insensitive)."""
    text = str(exc)
    assert len(text) > 30 and "\n" not in text.strip(), text
    for w in words:
        assert w.lower() in text.lower(), (w, text)


# ---- loading --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("repo_id", ["no-such-org/no-such-model-xyz", "surely-not-a-model-42"])
def test_unreachable_hub_id(repo_id, monkeypatch, good_folder):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_model(repo_id, device="cpu")
    assert_actionable(e.value, repo_id, "folder")
    still_works(good_folder)


def test_missing_folder_path(tmp_path, good_folder):
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path / "nope" / "model"), device="cpu")
    assert_actionable(e.value, "does not exist")
    still_works(good_folder)


def test_folder_without_weights(tmp_path, llama, good_folder):
    llama.config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path), device="cpu")
    assert_actionable(e.value, "no weights", "safetensors")
    still_works(good_folder)


def test_folder_without_config(tmp_path, good_folder):
    shutil.copy(good_folder / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path), device="cpu")
    assert_actionable(e.value, "config.json")


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path, llama, good_folder, monkeypatch):
    llama.config.save_pretrained(tmp_path)
    torch.save(llama.state_dict(), tmp_path / "pytorch_model.bin")

    def no_unpickling(*a, **k):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path), device="cpu")
    assert_actionable(e.value, "pickle", "safetensors", "allow_pickle")
    monkeypatch.undo()
    still_works(good_folder)


def test_not_a_causal_lm(tmp_path, good_folder):
    cfg = tf.BertConfig(vocab_size=96, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    tf.BertModel(cfg).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path), device="cpu")
    assert_actionable(e.value, "BertModel", "causal")
    still_works(good_folder)


def test_unsupported_family_loads_but_cannot_be_pruned(tmp_path):
    cfg = tf.GPTNeoXConfig(vocab_size=96, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=64)
    tf.GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device="cpu")
    from pruneviz.arch import adapter_for

    with pytest.raises(PlanError) as e:
        adapter_for(lm.model)
    assert_actionable(e.value, "gpt_neox", "llama", "gpt2", "opt")
    with pytest.raises(PlanError):
        Plan.empty(lm.model)


CORRUPTIONS = {
    "truncated": lambda b: b[: len(b) // 2],
    "garbage": lambda b: b"\x89garbage\x00\xff" * 64,
    "empty": lambda b: b"",
    "bad_header": lambda b: (10**12).to_bytes(8, "little") + b[8:],
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
@pytest.mark.parametrize("kind", ["stock", "pruneviz"])
def test_corrupt_safetensors(kind, how, tmp_path, good_folder, ragged_folder):
    folder = copy_folder(good_folder if kind == "stock" else ragged_folder, tmp_path / "m")
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(CORRUPTIONS[how](weights.read_bytes()))
    with pytest.raises(ModelLoadError) as e:
        load_model(str(folder), device="cpu")
    assert_actionable(e.value, str(folder.name))
    assert any(w in str(e.value).lower() for w in ("corrupt", "complete", "truncated", "re-export")), str(e.value)
    still_works(good_folder)
    still_works(ragged_folder)


AUTO_MAPS = {
    "config_and_model": {"AutoConfig": "modeling_custom.MyConfig",
                         "AutoModelForCausalLM": "modeling_custom.MyCustomForCausalLM"},
    "model_only": {"AutoModelForCausalLM": "modeling_custom.MyCustomForCausalLM"},
}


@pytest.mark.parametrize("auto_map", sorted(AUTO_MAPS))
def test_remote_code_folder_is_refused_without_running_it(tmp_path, good_folder, auto_map):
    folder = copy_folder(good_folder, tmp_path / "custom")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="my_custom_lm", architectures=["MyCustomForCausalLM"], auto_map=AUTO_MAPS[auto_map])
    (folder / "config.json").write_text(json.dumps(cfg))
    sentinel = tmp_path / "code-ran"
    (folder / "modeling_custom.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    with pytest.raises(ModelLoadError) as e:
        load_model(str(folder), device="cpu")
    assert_actionable(e.value, "trust_remote_code")
    assert not sentinel.exists()
    still_works(good_folder)


def test_native_family_with_leftover_auto_map_still_loads(tmp_path, good_folder):
    folder = copy_folder(good_folder, tmp_path / "native")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = AUTO_MAPS["model_only"]  # model_type stays "llama": transformers has it built in
    (folder / "config.json").write_text(json.dumps(cfg))
    still_works(folder)


def test_streamlit_server_is_local_and_uploads_are_capped():
    cfg = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    server = cfg.get("server", {})
    assert server.get("address") == "127.0.0.1", "the app must listen on localhost only by default"
    assert isinstance(server.get("maxUploadSize"), int) and 0 < server["maxUploadSize"] <= 200


# ---- plans ----------------------------------------------------------------------------------------------------------

def test_plan_for_another_geometry(llama):
    plan = Plan.empty(tiny_model("mistral")).with_units("channel", 0, [1])
    with pytest.raises(PlanError) as e:
        plan.validate(llama)
    assert_actionable(e.value, "n_kv", "load the model")
    with pytest.raises(PlanError):
        apply_plan(llama, plan)


def test_plan_for_same_geometry_other_weights(llama):
    plan = Plan.empty(tiny_model("llama", seed=1)).with_units("channel", 0, [1])
    with pytest.raises(PlanError) as e:
        plan.validate(llama)
    assert_actionable(e.value, "different weights", "allow_other_weights")
    assert plan.validate(llama, allow_other_weights=True) is plan


@pytest.mark.parametrize("kind,layer,idx", [
    ("block", None, 4), ("block", None, -1), ("head", 9, 0), ("head", -1, 0), ("head", 0, 6), ("head", 0, -2),
    ("kv", 0, 2), ("kv", 7, 0), ("channel", 0, 40), ("channel", 0, -1), ("channel", 4, 0),
])
def test_out_of_range_units(llama, kind, layer, idx):
    plan = Plan.empty(llama).with_units(kind, layer, [idx])
    with pytest.raises(PlanError) as e:
        plan.validate(llama)
    assert_actionable(e.value, "out of range")
    with pytest.raises(PlanError):
        apply_plan(llama, plan)
    with pytest.raises(PlanError):
        masked_model(llama, plan)
    again = Plan.from_json(plan.to_json())  # from a file: same verdict
    with pytest.raises(PlanError):
        again.validate(llama)


def whole_model_gone(llama, how: str) -> Plan:
    """Every block (directly, or as every layer's attention and MLP sub-blocks, BlockPruner's units)."""
    plan = Plan.empty(llama)
    if how == "blocks":
        return plan.with_units("block", None, range(4))
    for layer in range(4):
        plan = plan.with_units("kv", layer, range(2)).with_units("channel", layer, range(40))
    return plan


@pytest.mark.parametrize("how", ["blocks", "sub_blocks"])
def test_removing_everything(llama, how):
    """Removing a layer's every head, KV group or channel is legal (its attention or MLP sub-block goes); removing
    every block, directly or as all sub-blocks, is refused with a message."""
    for kind, layer, count in (("head", 1, 6), ("kv", 2, 2), ("channel", 3, 40)):
        Plan.empty(llama).with_units(kind, layer, range(count)).validate(llama, physical=True)
    plan = whole_model_gone(llama, how)
    with pytest.raises(PlanError) as e:
        plan.validate(llama, physical=False)
    assert_actionable(e.value, "every")
    with pytest.raises(PlanError):
        apply_plan(llama, plan)
    with pytest.raises(PlanError):
        masked_model(llama, plan)


@pytest.mark.parametrize("text", ["{not json", "", "\x00\x01", "[1, 2", "nul"])
def test_malformed_plan_json(text):
    with pytest.raises(PlanError) as e:
        Plan.from_json(text)
    assert_actionable(e.value, "json")


def _good_plan_dict(llama) -> dict:
    return Plan.empty(llama).with_units("head", 0, [1]).to_dict()


SCHEMA_BREAKS = {
    "list": lambda d: [d],
    "number": lambda d: 3,
    "no_schema": lambda d: {k: v for k, v in d.items() if k != "schema"},
    "other_schema": lambda d: {**d, "schema": "someone.else/9"},
    "no_base": lambda d: {k: v for k, v in d.items() if k != "base"},
    "base_not_dict": lambda d: {**d, "base": "llama"},
    "geometry_extra_key": lambda d: {**d, "base": {**d["base"], "geometry": {**d["base"]["geometry"], "x": 1}}},
    "geometry_missing_key": lambda d: {**d, "base": {**d["base"], "geometry": {"n_layers": 4}}},
    "heads_list": lambda d: {**d, "heads": [1, 2]},
    "heads_str": lambda d: {**d, "heads": {"0": "ab"}},
    "heads_int": lambda d: {**d, "heads": {"0": 3}},
    "layer_key_word": lambda d: {**d, "channels": {"first": [1]}},
    "blocks_str": lambda d: {**d, "blocks": ["x"]},
    "blocks_null_item": lambda d: {**d, "blocks": [None]},
    "probe_str": lambda d: {**d, "base": {**d["base"], "probe": ["a"]}},
}


@pytest.mark.parametrize("how", sorted(SCHEMA_BREAKS))
def test_wrong_plan_schema(llama, how, tmp_path):
    bad = SCHEMA_BREAKS[how](_good_plan_dict(llama))
    with pytest.raises(PlanError) as e:
        Plan.from_json(json.dumps(bad))
    assert_actionable(e.value, "plan")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(PrunevizError):
        export.read_plan(path)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary", None])
def test_unreadable_plan_file(tmp_path, content):
    path = tmp_path / "plan.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PrunevizError) as e:
        export.read_plan(path)
    assert_actionable(e.value, "plan")


# ---- ratios ---------------------------------------------------------------------------------------------------------

BAD_RATIOS = [0.0, 1.0, 1.5, -0.1, NAN, float("inf"), "abc", None]


@pytest.mark.parametrize("ratio", BAD_RATIOS, ids=repr)
def test_target_ratio(ratio):
    with pytest.raises(PlanError) as e:
        allocate.Target(ratio)
    assert_actionable(e.value, "between 0 and 1")


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, NAN, float("inf")], ids=repr)
@pytest.mark.parametrize("which", ["head_ratio", "channel_ratio"])
def test_slider_ratio(llama, imap, which, ratio):
    with pytest.raises(PlanError) as e:
        allocate.plan_from_ratios(llama, imap, **{which: ratio})
    assert_actionable(e.value, "ratio", "below 1")


@pytest.mark.parametrize("which", ["head_ratio", "channel_ratio"])
def test_slider_ratio_zero_removes_nothing(llama, imap, which):
    plan = allocate.plan_from_ratios(llama, imap, **{which: 0.0})
    assert plan.counts() == {"block": 0, "kv": 0, "head": 0, "channel": 0}


@pytest.mark.parametrize("count", [-1, 4, 99])
def test_slider_block_count(llama, imap, count):
    with pytest.raises(PlanError):
        allocate.plan_from_ratios(llama, imap, block_count=count)


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, NAN], ids=repr)
def test_slimgpt_layer_ratios(ratio):
    with pytest.raises(CriterionError) as e:
        schedules.layer_ratios(4, ratio)
    assert_actionable(e.value, "ratio")


def test_slimgpt_layer_ratios_zero():
    assert schedules.layer_ratios(4, 0.0) == [0.0] * 4


# ---- texts ----------------------------------------------------------------------------------------------------------

TEXT_FILES = {
    "empty": (b"", "empty"),
    "whitespace": (b"  \n\t \r\n   ", "empty"),
    "nul_bytes": (b"hello\x00world" * 10, "binary"),
    "not_utf8": ("café olé".encode("latin-1") * 10, "utf-8"),
    "png": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "binary"),
}


@pytest.mark.parametrize("name", sorted(TEXT_FILES))
def test_bad_text_file(tmp_path, name):
    data, word = TEXT_FILES[name]
    path = tmp_path / f"{name}.txt"
    path.write_bytes(data)
    with pytest.raises(TextError) as e:
        load_text_file(path)
    assert_actionable(e.value, word)
    with pytest.raises(TextError):
        get_text(f"file:{path}")


def test_too_large_text_file(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("word " * 100)
    with pytest.raises(TextError) as e:
        load_text_file(path, max_bytes=64)
    assert_actionable(e.value, "limit", "smaller")
    assert load_text_file(path, max_bytes=10_000).startswith("word")


def test_missing_text_file(tmp_path):
    with pytest.raises(TextError) as e:
        get_text(f"file:{tmp_path / 'none.txt'}")
    assert_actionable(e.value, "does not exist")


@pytest.mark.parametrize("text", ["", "   \n  ", "short text"])
def test_text_shorter_than_a_calibration_window(text):
    with pytest.raises(TextError) as e:
        calibration_windows(tiny_tokenizer(), text, n_samples=2, seq_len=32, seed=0)
    assert_actionable(e.value, "text")


def test_text_with_too_few_windows():
    with pytest.raises(TextError) as e:
        calibration_windows(tiny_tokenizer(), "x" * 40, n_samples=20, seq_len=32, seed=0)
    assert_actionable(e.value, "fewer samples")


@pytest.mark.parametrize("text", ["", "  \n ", "a short evaluation text"])
def test_text_shorter_than_a_ppl_window(llama, text):
    with pytest.raises(TextError) as e:
        perplexity(llama, tiny_tokenizer(), text, "quick")
    assert_actionable(e.value, "text")


# ---- out of memory during scoring -----------------------------------------------------------------------------------

OOMS = {
    "torch_oom": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "cuda_runtime": lambda: RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"),
    "cpu_allocator": lambda: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB"),
    "memory_error": lambda: MemoryError(),
}


@pytest.fixture
def failing_criterion():
    """A registered criterion (unique name) whose score raises ``box[0]``; removed afterwards."""
    box: list[BaseException] = []

    class Failing(importance.Criterion):
        name = "test_bad_inputs_failing"
        title = "always fails"
        produces = ("heads",)
        needs_calibration = False

        def score(self, model, calib, options, ctx):
            ctx.step(0.1, "working")
            raise box[0]

    importance.register(Failing)
    yield Failing.name, box
    importance.REGISTRY.pop(Failing.name, None)


@pytest.mark.parametrize("kind", sorted(OOMS))
def test_oom_during_scoring(llama, failing_criterion, kind):
    name, box = failing_criterion
    box.append(OOMS[kind]())
    with pytest.raises(OutOfMemoryAdvice) as e:
        importance.compute(llama, name)
    assert_actionable(e.value, "fewer calibration samples", "shorter windows", "dtype", "device")
    assert importance.compute(llama, "magnitude").heads is not None  # still works


@pytest.mark.parametrize("kind", sorted(OOMS))
def test_oom_inside_a_real_criterion(llama, monkeypatch, kind):
    crit = importance.get("magnitude")

    def boom(*a, **k):
        raise OOMS[kind]()

    monkeypatch.setattr(crit, "score", boom)  # instance attribute, removed by monkeypatch
    with pytest.raises(OutOfMemoryAdvice):
        importance.compute(llama, "magnitude")
    monkeypatch.undo()
    assert importance.compute(llama, "magnitude").heads is not None


def test_other_errors_are_not_disguised_as_oom(llama, failing_criterion):
    name, box = failing_criterion
    box.append(RuntimeError("shape mismatch in matmul"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        importance.compute(llama, name)


# ---- export ---------------------------------------------------------------------------------------------------------

def _pruned(llama):
    plan = Plan.empty(llama).with_units("channel", 1, range(8))
    return apply_plan(llama, plan), plan


def test_export_into_existing_folder_is_refused(tmp_path, llama):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    model, plan = _pruned(llama)
    with pytest.raises(ExportError) as e:
        export.save_pruned(model, tiny_tokenizer(), target, plan=plan)
    assert_actionable(e.value, "already exists", "overwrite")
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("fault", ["mismatch", "interrupt", "disk"])
def test_export_failure_leaves_nothing(tmp_path, llama, monkeypatch, fault):
    model, plan = _pruned(llama)
    if fault == "mismatch":
        monkeypatch.setattr(export, "_max_diff", lambda a, b, ids: 1.0)
        expected = ExportError
    elif fault == "interrupt":
        def interrupted(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(export, "model_card", interrupted)
        expected = KeyboardInterrupt
    else:
        def disk_full(*a, **k):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(export, "_atomic_write_text", disk_full)
        expected = PrunevizError
    with pytest.raises(expected) as e:
        export.save_pruned(model, tiny_tokenizer(), tmp_path / "out", plan=plan)
    if expected is not KeyboardInterrupt:
        assert_actionable(e.value)
    assert list(tmp_path.iterdir()) == []  # no folder, no .out.tmp-*
    monkeypatch.undo()
    report = export.save_pruned(model, tiny_tokenizer(), tmp_path / "out", plan=plan)
    assert report.ok


def test_export_of_masked_preview_is_refused(tmp_path, llama):
    plan = Plan.empty(llama).with_units("head", 0, [0]).with_units("channel", 2, [3, 4])
    preview = masked_model(llama, plan)
    with pytest.raises(ExportError) as e:
        export.save_pruned(preview, tiny_tokenizer(), tmp_path / "out", plan=plan)
    assert_actionable(e.value, "preview", "apply_plan")
    assert list(tmp_path.iterdir()) == []


# ---- CLI ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scores_file(tmp_path_factory, imap):
    path = tmp_path_factory.mktemp("scores") / "scores.json"
    path.write_text(imap.to_json())
    return path


def _run_cli(capsys, argv) -> tuple[int, list[str]]:
    code = cli_main(argv)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error:")]


def _cli_cases(tmp: Path, folder: Path, scores: Path) -> dict[str, list[str]]:
    (tmp / "bad.json").write_text("{oops")
    (tmp / "schema.json").write_text(json.dumps({"schema": "nope"}))
    (tmp / "bad_scores.json").write_text("[1, 2")
    common = ["--model", str(folder), "--device", "cpu"]
    return {
        "missing_plan": ["export", *common, "--plan", str(tmp / "none.json"), "--out", str(tmp / "o")],
        "malformed_plan": ["export", *common, "--plan", str(tmp / "bad.json"), "--out", str(tmp / "o")],
        "wrong_schema": ["evaluate", *common, "--plan", str(tmp / "schema.json")],
        "ratio_1.5": ["plan", *common, "--scores", str(scores), "--ratio", "1.5", "--out", str(tmp / "p.json")],
        "ratio_0": ["plan", *common, "--scores", str(scores), "--ratio", "0", "--out", str(tmp / "p.json")],
        "ratio_nan": ["plan", *common, "--scores", str(scores), "--ratio", "nan", "--out", str(tmp / "p.json")],
        "missing_scores": ["plan", *common, "--scores", str(tmp / "none.json"), "--ratio", "0.2"],
        "malformed_scores": ["plan", *common, "--scores", str(tmp / "bad_scores.json"), "--ratio", "0.2"],
        "missing_model": ["inspect", "--model", str(tmp / "no-model"), "--device", "cpu"],
        "bad_device": ["inspect", "--model", str(folder), "--device", "tpu"],
        "bad_text": ["score", *common, "--criterion", "wanda_sp", "--text", f"file:{tmp / 'none.txt'}"],
        "bad_criterion": ["score", *common, "--criterion", "no_such_criterion"],
    }


CLI_CASES = ["missing_plan", "malformed_plan", "wrong_schema", "ratio_1.5", "ratio_0", "ratio_nan",
             "missing_scores", "malformed_scores", "missing_model", "bad_device", "bad_text", "bad_criterion"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_errors_exit_2_with_one_line(case, tmp_path, good_folder, scores_file, capsys):
    argv = _cli_cases(tmp_path, good_folder, scores_file)[case]
    code, errors = _run_cli(capsys, argv)
    assert code == 2, case
    assert len(errors) == 1 and len(errors[0]) > 20, errors
    assert not (tmp_path / "o").exists() and not (tmp_path / "p.json").exists()
