"""Zero-shot tasks through lm-evaluation-harness on in-memory models, offline, from local JSONL (pruneviz.zeroshot).

Every run here is a real lm-eval run (``simple_evaluate`` on ``HFLM(pretrained=model)``); the expected numbers come
from pruneviz's own log-likelihoods (:func:`choice_logprobs`), not from lm-eval.
"""
import json
import random

import pytest
import torch

pytest.importorskip("lm_eval")

from pruneviz import zeroshot  # noqa: E402
from pruneviz.progress import Cancelled  # noqa: E402
from pruneviz.testing import tiny_model  # noqa: E402
from pruneviz.zeroshot import (  # noqa: E402
    PAPER_TASKS,
    TaskDataError,
    TaskScore,
    ZeroShotResult,
    accuracy_from_logprobs,
    choice_logprobs,
    paper_average,
    parse_tasks,
    run_tasks,
    write_local_task,
    write_mc_task,
)

ITEMS = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "answer": 0},
    {"question": "Two plus two is", "choices": ["five", "four"], "answer": 1},
    {"question": "Fire is", "choices": ["cold", "hot"], "answer": 1},
    {"question": "Snow is", "choices": ["white", "black", "red", "a song"], "answer": 0},
    {"question": "A cat says", "choices": ["moo", "meow"], "answer": 1},
    {"question": "Water is", "choices": ["dry", "wet", "square"], "answer": 1},
]


@pytest.fixture(autouse=True)
def dataset_cache(tmp_path, monkeypatch):
    """lm-eval's json datasets are cached under the test's tmp folder, not the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def task_dir(tmp_path):
    folder = tmp_path / "tasks"
    write_mc_task(_jsonl(tmp_path / "items.jsonl", ITEMS), folder, "pv_items")
    return folder


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0)


def _expected(model, tok, items):
    lps = [choice_logprobs(model, tok, it["question"], it["choices"]) for it in items]
    return lps, accuracy_from_logprobs(lps, [it["choices"] for it in items], [it["answer"] for it in items])


def test_local_task_end_to_end_matches_pruneviz_loglikelihoods(model, tok, task_dir, one_thread):
    rng_before, pad_before = random.getstate(), tok.pad_token
    seen = []
    res = run_tasks(model, tok, "pv_items", task_dir=task_dir, keep_samples=True, batch_size=4,
                    progress=lambda f, m: seen.append((f, m)))
    assert res.complete and res.tasks == ("pv_items",) and len(res.scores) == 1
    score = res.scores[0]
    assert score.task == "pv_items" and score.n == len(ITEMS) and score.dataset == "json"
    lps, (acc, acc_norm) = _expected(model, tok, ITEMS)
    assert score.acc == acc and score.acc_norm == acc_norm
    assert 0 < acc < 1 or 0 < acc_norm < 1  # a random model gets some right and some wrong: the check can fail
    assert score.acc_stderr is not None and score.acc_stderr >= 0 and score.acc_norm_stderr is not None
    by_doc = {s["doc_id"]: s for s in score.samples}
    for i, lp in enumerate(lps):
        assert by_doc[i]["logprobs"] == pytest.approx(lp, abs=1e-3)
        assert by_doc[i]["target"] == ITEMS[i]["answer"]
    assert seen[-1] == (1.0, "pv_items done") and all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    assert random.getstate() == rng_before and tok.pad_token == pad_before  # lm-eval's seeding is undone
    assert res.rows("dense")[0]["acc"] == acc and "0-shot" in res.protocol()


def test_limit_and_cancel(model, tok, task_dir, tmp_path, one_thread):
    write_mc_task(_jsonl(tmp_path / "more.jsonl", ITEMS[::-1]), task_dir, "pv_more")
    res = run_tasks(model, tok, "pv_items,pv_more", task_dir=task_dir, limit=2)
    assert [s.task for s in res.scores] == ["pv_items", "pv_more"] and all(s.n == 2 for s in res.scores)
    assert res.scores[1].acc == _expected(model, tok, ITEMS[::-1][:2])[1][0]
    # cancel between tasks: the first task's numbers are kept
    done = []
    between = run_tasks(model, tok, ["pv_items", "pv_more"], task_dir=task_dir, limit=2,
                        progress=lambda f, m: done.append(m), cancel=lambda: "pv_items done" in done)
    assert not between.complete and [s.task for s in between.scores] == ["pv_items"]
    # cancel inside a task (polled between chunks of log-likelihood requests): nothing half-done is reported
    inside = run_tasks(model, tok, ["pv_items", "pv_more"], task_dir=task_dir, cancel=lambda: True)
    assert not inside.complete and inside.scores == []
    flag = {"n": 0}

    def cancel_at_first_request():
        flag["n"] += 1
        return flag["n"] > 1  # not before the task starts, but at its first request chunk

    mid = run_tasks(model, tok, "pv_items", task_dir=task_dir, cancel=cancel_at_first_request)
    assert not mid.complete and mid.scores == []


def test_builtin_task_with_local_files_keeps_its_prompts(model, tok, tmp_path, one_thread):
    """hellaswag from a local JSONL in the Hub schema: lm-eval's own YAML, process_docs and acc_norm."""
    rows = [
        {"ind": 1, "activity_label": "Cooking", "ctx_a": "A man cracks an egg.", "ctx_b": "he", "ctx": "",
         "endings": ["fries it.", "sings.", "eats the shell.", "flies away."], "source_id": "a", "split": "val",
         "split_type": "indomain", "label": "0"},
        {"ind": 2, "activity_label": "Running", "ctx_a": "A woman runs.", "ctx_b": "she", "ctx": "",
         "endings": ["stops.", "melts into a puddle.", "is a teapot.", "turns blue."], "source_id": "b",
         "split": "val", "split_type": "indomain", "label": "1"},
        {"ind": 3, "activity_label": "Reading", "ctx_a": "A boy opens a book.", "ctx_b": "he", "ctx": "",
         "endings": ["reads a page.", "eats it.", "swims.", "barks."], "source_id": "c", "split": "val",
         "split_type": "indomain", "label": "2"},
    ]
    folder = tmp_path / "local"
    path = write_local_task("hellaswag", _jsonl(tmp_path / "hs.jsonl", rows), folder)
    assert path.name == "hellaswag.yaml" and "include:" in path.read_text()
    res = run_tasks(model, tok, "hellaswag", task_dir=folder, keep_samples=True)
    score = res.by_task()["hellaswag"]
    assert score.n == 3 and score.dataset == "json"
    items = [{"question": f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}", "choices": r["endings"],
              "answer": int(r["label"])} for r in rows]  # hellaswag's process_docs, by hand
    assert (score.acc, score.acc_norm) == _expected(model, tok, items)[1]


def test_unreachable_and_unknown_tasks_say_what_to_do(model, tok):
    with pytest.raises(TaskDataError) as err:
        run_tasks(model, tok, "piqa", limit=2)
    text = str(err.value)
    assert "'piqa'" in text and "baber/piqa" in text and "write_local_task" in text and "--task-dir" in text
    with pytest.raises(TaskDataError, match="no task named 'piqaa'.*Did you mean.*piqa"):
        run_tasks(model, tok, "piqaa")
    with pytest.raises(TaskDataError, match="does not exist"):
        run_tasks(model, tok, "x", task_dir="/nonexistent/folder")


def test_write_mc_task_rejects_bad_files(tmp_path):
    cases = [
        ("not json\n", "line 1 is not JSON"),
        ('{"question": "q", "choices": ["a", "b"]}\n', "lacks the field"),
        ('{"question": "q", "choices": ["a"], "answer": 0}\n', "at least two"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 2}\n', r"index \(0..1\)"),
        ('{"question": "", "choices": ["a", "b"], "answer": 0}\n', "non-empty text"),
        ("\n\n", "no items"),
    ]
    for i, (body, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(body)
        with pytest.raises(TaskDataError, match=message):
            write_mc_task(path, tmp_path / "t", "bad")
    with pytest.raises(TaskDataError, match="does not exist"):
        write_mc_task(tmp_path / "missing.jsonl", tmp_path / "t", "x")
    with pytest.raises(TaskDataError, match="not usable"):
        write_mc_task(_jsonl(tmp_path / "ok.jsonl", ITEMS), tmp_path / "t", "has space")
    assert not (tmp_path / "t").exists() or not list((tmp_path / "t").glob("*.yaml"))
    custom = _jsonl(tmp_path / "q.jsonl", [{"q": "x", "opts": ["a", "b"], "gold": 1}])
    text = write_mc_task(custom, tmp_path / "t", "custom", question="q", choices="opts", answer="gold").read_text()
    assert "'{{q}}'" in text and "'{{opts}}'" in text and "'{{gold}}'" in text


def test_write_local_task_checks(tmp_path):
    with pytest.raises(TaskDataError, match="does not exist"):
        write_local_task("piqa", tmp_path / "missing.jsonl", tmp_path)
    with pytest.raises(TaskDataError, match="Unknown split"):
        write_local_task("piqa", {"dev": str(_jsonl(tmp_path / "p.jsonl", [{}]))}, tmp_path)
    with pytest.raises(TaskDataError, match="not a single lm-eval YAML task"):
        write_local_task("no_such_task_here", tmp_path / "p.jsonl", tmp_path)
    import yaml

    cfg = yaml.safe_load(write_local_task("arc_challenge", tmp_path / "p.jsonl", tmp_path / "o").read_text())
    assert cfg["test_split"] == "test" and cfg["training_split"] is None and cfg["validation_split"] is None
    assert cfg["dataset_path"] == "json" and cfg["dataset_kwargs"]["data_files"]["test"].endswith("p.jsonl")


def test_parse_tasks_and_paper_average():
    assert parse_tasks("piqa, hellaswag,,piqa") == ["piqa", "hellaswag"]
    assert parse_tasks("paper") == list(PAPER_TASKS) and len(PAPER_TASKS) == 7
    with pytest.raises(TaskDataError, match="No tasks"):
        parse_tasks(" , ")
    scores = [TaskScore(t, 10, acc=0.5, acc_norm=0.7) for t in PAPER_TASKS]
    res = ZeroShotResult(scores=scores, tasks=tuple(PAPER_TASKS), limit=None, num_fewshot=0, seconds=0.0)
    assert paper_average(res) == pytest.approx((4 * 0.5 + 3 * 0.7) / 7)  # acc_norm for hellaswag, arc_c, obqa
    res.scores.pop()
    assert paper_average(res) is None


def test_accuracy_rule_ties_and_normalisation():
    # item 0: tie -> first choice (np.argmax); item 1: acc picks 'a', acc_norm picks the long choice
    acc, norm = accuracy_from_logprobs([[-1.0, -1.0], [-2.0, -3.0]], [["x", "y"], ["a", "bbbbbb"]], [0, 1])
    assert acc == 0.5 and norm == 1.0


def test_choice_logprobs_by_hand(model, tok):
    lp = choice_logprobs(model, tok, "Fire is ", ["hot"], delimiter="")[0]  # the trailing space moves to "hot"
    ids = tok("Fire is hot")["input_ids"]
    n_ctx = len(tok("Fire is")["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    assert lp == pytest.approx(sum(float(logp[t - 1, ids[t]]) for t in range(n_ctx, len(ids))), abs=1e-4)


@pytest.mark.slow
def test_bundled_model_exact_accuracy_on_hand_made_items(bundled, tmp_path):
    """SmolLM2-135M on hand-made items (some with a deliberately wrong gold answer): lm-eval's acc and acc_norm
    equal those from pruneviz's own log-likelihoods exactly, and the accuracy is not trivially 0 or 1."""
    items = [
        {"question": "The capital of France is", "choices": ["Paris", "a banana", "Jupiter"], "answer": 0},
        {"question": "Two plus two equals", "choices": ["four", "seventeen"], "answer": 0},
        {"question": "The opposite of hot is", "choices": ["cold", "purple"], "answer": 0},
        {"question": "Ice is made of frozen", "choices": ["water", "fire"], "answer": 1},  # gold wrong on purpose
        {"question": "A week has seven", "choices": ["days", "elephants"], "answer": 1},  # gold wrong on purpose
        {"question": "The sun rises in the", "choices": ["east", "basement", "teapot"], "answer": 0},
        {"question": "Dogs are a kind of", "choices": ["animal", "mineral"], "answer": 0},
        {"question": "Python is a programming", "choices": ["language", "sandwich"], "answer": 0},
    ]
    folder = tmp_path / "tasks"
    write_mc_task(_jsonl(tmp_path / "hand.jsonl", items), folder, "pv_hand")
    res = run_tasks(bundled.model, bundled.tokenizer, "pv_hand", task_dir=folder, keep_samples=True)
    score = res.scores[0]
    lps, (acc, acc_norm) = _expected(bundled.model, bundled.tokenizer, items)
    assert score.n == len(items) and (score.acc, score.acc_norm) == (acc, acc_norm)
    assert 0 < acc < 1 and acc == pytest.approx(6 / 8)  # the model knows all eight; two golds are wrong
    for s in score.samples:
        assert s["logprobs"] == pytest.approx(lps[s["doc_id"]], abs=2e-3)


def test_cancelled_is_the_progress_protocol_exception():
    assert issubclass(Cancelled, Exception) and zeroshot.LM_EVAL_VERSION == "0.4.13"


def test_cli_tasks_dense_and_pruned(tmp_path, capsys, task_dir, one_thread):
    from pruneviz import export
    from pruneviz.cli import main
    from pruneviz.loading import load_model
    from pruneviz.plan import Plan
    from pruneviz.surgery import apply_plan
    from pruneviz.testing import tiny_tokenizer

    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    plan = Plan.empty(base).with_units("channel", 0, range(20)).with_units("kv", 1, [0])
    export.write_plan(plan, tmp_path / "plan.json")
    code = main(["evaluate", "--model", str(tmp_path / "m"), "--device", "cpu", "--dtype", "fp32", "--plan",
                 str(tmp_path / "plan.json"), "--tasks", "pv_items", "--task-dir", str(task_dir), "--limit", "4"])
    out = capsys.readouterr().out
    assert code == 0 and "limit 4 documents per task" in out
    lm = load_model(str(tmp_path / "m"), device="cpu", dtype="fp32")
    rows = [line for line in out.splitlines() if line.strip().startswith("pv_items")]
    assert len(rows) == 1 and "(n=4)" in rows[0]
    for m in (lm.model, apply_plan(lm.model, plan)):
        acc, acc_norm = _expected(m, lm.tokenizer, ITEMS[:4])[1]
        assert f"{100 * acc:.2f} ±" in rows[0] and f"{100 * acc_norm:.2f} ±" in rows[0]
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--tasks", "pv_nope", "--task-dir", str(task_dir)]) == 2
    assert "no task named 'pv_nope'" in capsys.readouterr().err


def test_app_panel_fidelity_and_zeroshot(monkeypatch, tmp_path, task_dir):
    """The Evaluate page's panel on the tiny app model: fidelity of the plan's model and lm-eval for dense + pruned."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from pruneviz.fidelity import fidelity
    from pruneviz.plan import Plan
    from pruneviz.testing import tiny_tokenizer
    from pruneviz.ui import state

    monkeypatch.setenv("PRUNEVIZ_MODEL", "tiny")
    monkeypatch.setenv("PRUNEVIZ_EXPORT_DIR", str(tmp_path / "exports"))
    monkeypatch.setenv("PRUNEVIZ_JOB_WAIT", "300")  # the background jobs end within the click's run
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=120)
    at.run()
    at.run()
    base = tiny_model("llama")
    plan = Plan.empty(base).with_units("channel", 0, range(20)).with_units("kv", 1, [0])
    at.session_state["plan"] = plan
    at.switch_page("pages/evaluate.py").run()
    assert not at.exception and not at.error
    at.button(key="ev_fid_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    rec = at.session_state["fidelity"][-1]
    _, eval_text = state.default_texts()
    from pruneviz.surgery import masked_model

    want = fidelity(base, masked_model(base, plan), tiny_tokenizer(), eval_text, "quick")
    assert rec.label == "pruned" and rec.result.kl_mean == pytest.approx(want.kl_mean, rel=1e-5)
    assert {"Top-1 agreement", "PPL ratio"} <= {m.label for m in at.metric}
    at.text_input(key="ev_zs_dir").set_value(str(task_dir))
    at.text_input(key="ev_zs_tasks").set_value("pv_items")
    at.number_input(key="ev_zs_limit").set_value(0)
    at.run()
    at.button(key="ev_zs_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    records = at.session_state["zeroshot"]
    assert [r.label for r in records] == ["dense", "pruned"] and all(r.result.complete for r in records)
    dense = records[0].result.scores[0]
    assert (dense.acc, dense.acc_norm) == _expected(base, tiny_tokenizer(), ITEMS)[1]
    shown = [df for df in at.dataframe if "pv_items" in df.value.to_string()]
    assert shown and {"dense acc", "pruned acc_norm"} <= set(shown[0].value.columns)


def test_app_fidelity_and_zeroshot_run_in_the_jobs_panel(monkeypatch, tmp_path, task_dir):
    """Fidelity and lm-eval are jobs of the jobs panel: the click returns at once (the job listed with Cancel, the
    button disabled while it runs), the results arrive in the session on a later run."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from pruneviz.jobs import runner
    from pruneviz.plan import Plan
    from pruneviz.ui import state

    monkeypatch.setenv("PRUNEVIZ_MODEL", "tiny")
    monkeypatch.setenv("PRUNEVIZ_EXPORT_DIR", str(tmp_path / "exports"))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=120)
    at.run()
    at.run()
    at.session_state["plan"] = Plan.empty(tiny_model("llama")).with_units("channel", 0, range(20))
    at.switch_page("pages/evaluate.py").run()
    owner = at.session_state[state.OWNER_KEY]
    monkeypatch.setenv("PRUNEVIZ_JOB_WAIT", "0")
    for button, kind in (("ev_fid_run", "fidelity"), ("ev_zs_run", "zeroshot")):
        if kind == "zeroshot":
            at.text_input(key="ev_zs_dir").set_value(str(task_dir))
            at.text_input(key="ev_zs_tasks").set_value("pv_items")
            at.run()
        at.button(key=button).click().run()
        assert not at.exception, [e.value for e in at.exception]
        jobs = runner().jobs(owner)
        assert [j.kind for j in jobs] == [kind]
        if jobs[0].snapshot().status == "running":
            assert at.button(key=button).disabled
        assert jobs[0].wait(300)
        at.run()
        assert not at.exception and runner().jobs(owner) == []  # collected
    assert at.session_state["fidelity"][-1].label == "pruned"
    assert [r.label for r in at.session_state["zeroshot"]] == ["dense", "pruned"]
