"""The ratio sweep, the next-token preview and the export helpers in the library (:mod:`pruneviz.evaluate`,
:mod:`pruneviz.export`), the ``sweep`` CLI command, and criteria that declare their capabilities."""
import csv
import json
import math

import pytest
import torch

from pruneviz import export
from pruneviz.allocate import plan_from_ratios
from pruneviz.cli import main
from pruneviz.errors import PlanError, TextError
from pruneviz.evaluate import next_token_top_k, perplexity, sweep, sweep_plan
from pruneviz.importance import available, compute
from pruneviz.plan import Plan, dense_params
from pruneviz.surgery import apply_plan, masked_model
from pruneviz.testing import tiny_model, tiny_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog while a cat watches from the fence. " * 40

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def mag(llama):
    return compute(llama, "magnitude")


def test_sweep_points_are_the_plans_perplexities(llama, mag):
    tok = tiny_tokenizer()
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    seen = []
    points = sweep(llama, tok, {"magnitude": mag}, [0.2, 0.5], "width", TEXT, "quick",
                   progress=lambda f, m: seen.append(f))
    assert [(p.criterion, p.ratio) for p in points] == [("dense", 0.0), ("magnitude", 0.2), ("magnitude", 0.5)]
    assert points[0].plan is None and points[0].params == dense_params(llama)
    assert math.isclose(points[0].ppl, perplexity(llama, tok, TEXT, "quick").ppl, rel_tol=1e-9)
    for p in points[1:]:
        plan = plan_from_ratios(llama, mag, head_ratio=p.ratio, channel_ratio=p.ratio)
        assert p.plan.sha256() == plan.sha256() and p.params == plan.param_count(llama)
        assert math.isclose(p.ppl, perplexity(apply_plan(llama, plan), tok, TEXT, "quick").ppl, rel_tol=1e-5)
        assert p.complete and p.ms_per_token is None and p.protocol == "quick"
    assert points[1].params > points[2].params
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())  # the base is never mutated


def test_sweep_kinds_and_a_given_dense_result(llama, mag):
    tok = tiny_tokenizer()
    blocks = sweep_plan(llama, mag, 0.5, "blocks")
    assert len(blocks.blocks) == 2 and blocks.counts()["channel"] == blocks.counts()["kv"] == 0
    assert sweep_plan(llama, mag, 0.3, "channels").counts()["kv"] == 0
    assert sweep_plan(llama, mag, 0.5, "heads").counts()["channel"] == 0
    dense = perplexity(llama, tok, TEXT, "quick")
    points = sweep(llama, tok, {"magnitude": mag}, [0.25], "channels", TEXT, dense=dense)
    assert points[0].ppl == dense.ppl and len(points) == 2
    assert len(sweep(llama, tok, {"magnitude": mag}, [0.25], "channels", TEXT, dense=False)) == 1
    with pytest.raises(PlanError, match="one of width"):
        sweep_plan(llama, mag, 0.2, "layers")
    with pytest.raises(PlanError, match=r"\[0, 1\)"):
        sweep(llama, tok, {"magnitude": mag}, [20], "width", TEXT)
    wanda = compute(llama, "wanda_sp", _calib(llama))
    with pytest.raises(PlanError, match="no block scores"):
        sweep_plan(llama, wanda, 0.2, "blocks")


def _calib(model):
    from pruneviz.data import calibration_windows, text_hash
    from pruneviz.importance import Calibration

    tok = tiny_tokenizer()
    return Calibration(calibration_windows(tok, TEXT, 2, 32, 0), "t", text_hash(TEXT))


def test_cancelled_sweep_returns_the_points_done(llama, mag):
    tok = tiny_tokenizer()
    polls = []

    def cancel():  # stop after a few batches of windows: inside a pruned point's perplexity
        polls.append(1)
        return len(polls) > 6

    points = sweep(llama, tok, {"magnitude": mag}, [0.1, 0.3, 0.5], "width", TEXT, cancel=cancel)
    assert 2 <= len(points) < 4 and all(p.complete for p in points[:-1])
    assert not points[-1].complete and 0 < points[-1].n_tokens < points[0].n_tokens


def test_sweep_latency_measures_the_built_model(llama, mag):
    points = sweep(llama, tiny_tokenizer(), {"magnitude": mag}, [0.5], "width", TEXT, latency=True)
    assert all(p.ms_per_token and p.ms_per_token > 0 for p in points)


def test_next_token_top_k_is_the_softmax_of_the_last_position(llama):
    tok = tiny_tokenizer()
    top = next_token_top_k(llama, tok, "the quick brown", k=3)
    ids = [tok.bos_token_id] + tok("the quick brown", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        probs = llama(input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1)
    p, idx = probs.topk(3)
    assert [t for t, _ in top] == [tok.decode([int(i)]) for i in idx]
    assert [q for _, q in top] == pytest.approx(p.tolist(), rel=1e-6)
    view = masked_model(llama, Plan.empty(llama).with_units("channel", 0, range(20)))
    assert next_token_top_k(view, tok, "the quick brown", k=3) != top
    with pytest.raises(TextError):
        next_token_top_k(llama, tok, "")


def test_export_folder_names_and_card_evaluation(llama):
    plan = Plan.empty(llama).with_units("channel", 0, [1])
    name = export.default_folder_name("SmolLM2 135M/Instruct", plan)
    assert name == f"smollm2-135m-instruct-pruned-{plan.sha256()[:8]}"
    assert export.safe_folder_name("../../etc") == "etc" and export.safe_folder_name("..", "x") == "x"
    assert export.safe_folder_name("a b//c") == "a-b-c"
    card = export.card_evaluation(12.345678, 10.0, "bundled", "quick: 16 windows", lora_ppl=11.11111)
    assert card == {"perplexity (pruned)": 12.3457, "perplexity (dense)": 10.0, "text": "bundled",
                    "protocol": "quick: 16 windows", "perplexity (pruned + LoRA)": 11.1111}
    assert "perplexity (pruned + LoRA)" not in export.card_evaluation(1.0, 1.0, "t", "p")


def test_criteria_declare_their_capabilities():
    crits = available()
    assert [n for n, c in crits.items() if c.is_solver] == ["slimgpt"]
    assert crits["slimgpt"].score_label == "OBS error" and crits["magnitude"].score_label == "score"
    assert crits["taylor"].uses_gradients and not crits["magnitude"].uses_gradients
    assert crits["wanda_sp"].layerwise and not crits["taylor"].layerwise


def test_cli_sweep_prints_a_table_and_writes_csv_and_json(llama, mag, tmp_path, capsys):
    folder = tmp_path / "tiny-llama"
    llama.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (tmp_path / "eval.txt").write_text(TEXT)
    scores = tmp_path / "mag.json"
    scores.write_text(mag.to_json())
    common = ["sweep", "--model", str(folder), "--eval-text", f"file:{tmp_path / 'eval.txt'}", "--ratios", "20,50"]
    assert main(common + ["--scores", str(scores), "--out", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [(r["criterion"], r["ratio"]) for r in rows] == [("dense", "0.0"), ("magnitude", "0.2"),
                                                            ("magnitude", "0.5")]
    expected = sweep(llama, tiny_tokenizer(), {"magnitude": mag}, [0.2, 0.5], "width", TEXT)
    assert [float(r["ppl"]) for r in rows] == pytest.approx([p.ppl for p in expected], rel=1e-6)
    assert "magnitude" in out and f"{expected[1].ppl:.3f}" in out
    assert main(common + ["--criterion", "magnitude", "--what", "channels", "--out", str(tmp_path / "s.json")]) == 0
    data = json.loads((tmp_path / "s.json").read_text())
    written, same = Plan.from_json(data[1]["plan_json"]), sweep_plan(llama, mag, 0.2, "channels")
    assert written.counts() == same.counts() and written.channels == same.channels  # the base's name differs
    assert main(common[:-2] + ["--ratios", "x,y", "--criterion", "magnitude"]) == 2
    assert main(common) == 2 and "--criterion NAME" in capsys.readouterr().err
