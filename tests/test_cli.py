"""``python -m pruneviz recover`` on tiny models: the plan is applied, LoRA trains with the given options (the result
equals the library's :func:`pruneviz.recovery.recover` bit for bit), the dense / pruned / pruned + LoRA table shows
the library's perplexities, ``--out`` exports the recovered model with its record, and bad input exits with 2."""
import os
import re
import signal

import pytest
import torch

from pruneviz import export
from pruneviz.cli import _StopOnCtrlC, main
from pruneviz.evaluate import perplexity
from pruneviz.loading import load_model
from pruneviz.plan import Plan
from pruneviz.recovery import LoRAOptions, recover
from pruneviz.surgery import apply_plan
from pruneviz.testing import tiny_model, tiny_tokenizer

TRAIN = "the quick brown fox jumps over the lazy dog. " * 40
HELD_OUT = "a lazy dog sleeps while the quick brown fox runs away. " * 30
LORA_ARGS = ["--steps", "3", "--seq-len", "32", "--batch-size", "2", "--lr", "3e-3", "--rank", "4", "--alpha", "8",
             "--seed", "1", "--schedule", "cosine", "--warmup-steps", "1", "--log-every", "1"]
LORA_OPTIONS = LoRAOptions(r=4, alpha=8.0, lr=3e-3, steps=3, batch_size=2, seq_len=32, seed=1, schedule="cosine",
                           warmup_steps=1)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def files(tmp_path_factory, llama):
    """A stock tiny-llama folder, a plan for it, a training text and a held-out text."""
    root = tmp_path_factory.mktemp("cli")
    folder = root / "tiny-llama"
    llama.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    plan = Plan.empty(llama).with_units("channel", 0, range(10)).with_units("kv", 1, [0])
    export.write_plan(plan, root / "plan.json")
    (root / "train.txt").write_text(TRAIN)
    (root / "eval.txt").write_text(HELD_OUT)
    return {"folder": folder, "plan": root / "plan.json", "train": root / "train.txt", "eval": root / "eval.txt",
            "plan_obj": plan}


def run(capsys, argv) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def table(stdout: str) -> dict[str, tuple[str, str]]:
    """Rows of the printed table: name -> (parameters, perplexity) as printed."""
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"^(dense|pruned \+ LoRA|pruned)\s+(\S+)\s+(\S+)", line)
        if m:
            rows[m[1]] = (m[2], m[3])
    return rows


def test_recover_applies_the_plan_trains_as_the_library_and_exports(files, llama, tmp_path, capsys):
    out = tmp_path / "recovered"
    code, stdout, stderr = run(capsys, ["recover", "--model", str(files["folder"]), "--device", "cpu",
                                        "--plan", str(files["plan"]), "--text", str(files["train"]),
                                        "--eval-text", f"file:{files['eval']}", *LORA_ARGS, "--out", str(out)])
    assert code == 0, stderr
    steps = [line.split(":")[0] for line in stderr.splitlines() if line.startswith("LoRA step")]
    assert steps == ["LoRA step 1/3", "LoRA step 2/3", "LoRA step 3/3"] and "3/3 steps" in stdout
    # the same run through the library
    tok, plan = tiny_tokenizer(), files["plan_obj"]
    pruned = apply_plan(llama, plan)
    res = recover(pruned, tok, TRAIN, LORA_OPTIONS)
    expected = {"dense": llama, "pruned": pruned, "pruned + LoRA": res.model}
    rows = table(stdout)
    assert list(rows) == ["dense", "pruned", "pruned + LoRA"]
    for name, model in expected.items():
        ppl = perplexity(model, tok, HELD_OUT, "quick").ppl
        assert rows[name] == (f"{sum(p.numel() for p in model.parameters()):,}", f"{ppl:.3f}"), name
    assert rows["pruned + LoRA"][1] != rows["pruned"][1]
    # the export is the recovered model, with its record and all three perplexities in the card
    reloaded = load_model(str(out), device="cpu").model
    mine, theirs = reloaded.state_dict(), res.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    record = reloaded.config.pruneviz_recovery
    assert record["steps_done"] == 3 and record["r"] == 4 and record["schedule"] == "cosine" and record["lr"] == 3e-3
    card = (out / "README.md").read_text()
    assert "## Recovery fine-tuning" in card and "perplexity (pruned + LoRA)" in card
    assert export.read_plan(out / export.PLAN_FILE).sha256() == plan.sha256()


@pytest.mark.parametrize("layout", ["ragged", "uniform"])
def test_recover_an_exported_pruned_folder(layout, files, llama, tmp_path, capsys):
    plan = (files["plan_obj"] if layout == "ragged" else
            Plan.empty(llama).with_units("block", None, [2]))
    pruned = apply_plan(llama, plan)
    folder = tmp_path / "pruned"
    report = export.save_pruned(pruned, tiny_tokenizer(), folder, plan=plan, check_remote_code=False)
    assert report.format == {"ragged": "pruneviz", "uniform": "stock"}[layout]
    common = ["recover", "--model", str(folder), "--device", "cpu", "--text", str(files["train"]),
              "--eval-text", str(files["eval"]), "--steps", "2", "--seq-len", "32", "--batch-size", "2"]
    code, stdout, stderr = run(capsys, common)
    assert code == 0, stderr
    rows = table(stdout)
    assert rows["dense"] == ("-", "-") and rows["pruned"][1] != "-" and rows["pruned + LoRA"][1] != "-"
    assert f"{perplexity(pruned, tiny_tokenizer(), HELD_OUT, 'quick').ppl:.3f}" == rows["pruned"][1]
    assert plan.summary() in stderr  # the plan was found (config or the folder's plan file)
    code, stdout, stderr = run(capsys, common + ["--base", str(files["folder"])])
    assert code == 0, stderr
    assert table(stdout)["dense"][1] == f"{perplexity(llama, tiny_tokenizer(), HELD_OUT, 'quick').ppl:.3f}"


def _bad_cases(files, tmp_path) -> dict[str, list[str]]:
    (tmp_path / "exists").mkdir()
    other = tmp_path / "other-llama"
    tiny_model("llama", seed=5).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    pruned_folder = tmp_path / "pruned"
    export.save_pruned(apply_plan(tiny_model("llama"), files["plan_obj"]), tiny_tokenizer(), pruned_folder,
                       check_remote_code=False)
    base = ["recover", "--model", str(files["folder"]), "--device", "cpu", "--steps", "1", "--seq-len", "32"]
    plan = ["--plan", str(files["plan"])]
    return {
        "dense_without_plan": base,
        "zero_steps": [*base, *plan, "--steps", "0"],
        "bad_lr": [*base, *plan, "--lr", "-1"],
        "missing_text": [*base, *plan, "--text", str(tmp_path / "none.txt")],
        "missing_eval_text": [*base, *plan, "--eval-text", f"file:{tmp_path / 'none.txt'}"],
        "short_text": [*base, *plan, "--text", "file:" + str(_write(tmp_path / "short.txt", "too short"))],
        "out_exists": [*base, *plan, "--out", str(tmp_path / "exists")],
        "wrong_base": ["recover", "--model", str(pruned_folder), "--device", "cpu", "--base", str(other)],
        "missing_plan": [*base, "--plan", str(tmp_path / "none.json")],
    }


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", ["dense_without_plan", "zero_steps", "bad_lr", "missing_text", "missing_eval_text",
                                  "short_text", "out_exists", "wrong_base", "missing_plan"])
def test_recover_bad_input_exits_2_with_one_line(case, files, tmp_path, capsys):
    argv = _bad_cases(files, tmp_path)[case]
    code, stdout, stderr = run(capsys, argv)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and len(errors[0]) > 30, (case, stderr[-2000:])
    assert "LoRA step" not in stderr and "perplexity" not in stderr  # refused before any slow work
    assert list((tmp_path / "exists").iterdir()) == []


def test_ctrl_c_stops_after_the_step_then_aborts():
    before = signal.getsignal(signal.SIGINT)
    with _StopOnCtrlC() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


# ---- score / slimgpt with the blocks offloaded to disk ---------------------------------------------------------------

def test_score_and_slimgpt_offloaded_equal_resident(files, tmp_path, capsys):
    from pruneviz.importance import ImportanceMap

    common = ["--model", str(files["folder"]), "--device", "cpu", "--text", f"file:{files['train']}",
              "--samples", "4", "--seq-len", "16"]
    outs = {}
    for mode, extra in (("resident", []), ("offloaded", ["--offload", "disk", "--offload-folder",
                                                          str(tmp_path / "off")])):
        code, out, err = run(capsys, ["score", *common, "--criterion", "wanda_sp", *extra,
                                      "--out", str(tmp_path / f"{mode}.json")])
        assert code == 0, err
        outs[mode] = ImportanceMap.from_dict(__import__("json").loads((tmp_path / f"{mode}.json").read_text()))
        code, out, err = run(capsys, ["slimgpt", *common, "--ratio", "0.3", *extra,
                                      "--out", str(tmp_path / f"{mode}-plan.json")])
        assert code == 0, err
    assert "blocks offloaded to disk" in err
    assert outs["offloaded"].meta["offloaded"] and not outs["resident"].meta["offloaded"]
    torch.testing.assert_close(outs["offloaded"].channels, outs["resident"].channels, rtol=1e-4, atol=1e-5)
    plans = [export.read_plan(tmp_path / f"{m}-plan.json") for m in ("resident", "offloaded")]
    assert plans[0] == plans[1] and not plans[0].is_empty()
    code, out, err = run(capsys, ["score", *common, "--criterion", "taylor", "--offload", "disk",
                                  "--offload-folder", str(tmp_path / "off2")])
    assert code == 2 and "needs the whole model in memory" in err


def test_slimgpt_exports_in_the_format_asked(files, tmp_path, capsys):
    common = ["--model", str(files["folder"]), "--device", "cpu", "--text", f"file:{files['train']}",
              "--samples", "4", "--seq-len", "16", "--ratio", "0.3", "--out", str(tmp_path / "p.json")]
    code, out, err = run(capsys, ["slimgpt", *common, "--export", str(tmp_path / "x"), "--format", "gguf"])
    assert code == 2 and "tokenizer" in err and not (tmp_path / "x").exists()  # word-level vocabulary: refused
    code, out, err = run(capsys, ["slimgpt", *common, "--export", str(tmp_path / "hf"), "--format", "hf"])
    assert code == 0, err
    assert "checkpoint -> " + str(tmp_path / "hf") in out and "reload max |Δlogit| 0" in out
