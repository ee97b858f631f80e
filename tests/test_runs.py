"""The run store (:mod:`pruneviz.runs`): round trip, merged history rows, concurrent writers (threads and
processes), foreign and damaged files refused and left untouched, stored plans validated against the model, CLI."""
import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pruneviz.allocate import plan_from_ratios
from pruneviz.cli import main
from pruneviz.errors import PlanError
from pruneviz.importance import compute
from pruneviz.plan import Plan
from pruneviz.runs import SCHEMA_VERSION, RunStore, RunStoreError, model_key, plan_of_run
from pruneviz.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def plan(llama):
    return plan_from_ratios(llama, compute(llama, "magnitude"), head_ratio=0.25, channel_ratio=0.3)


def test_round_trip_list_get_compare_delete(tmp_path, llama, plan):
    store = RunStore(tmp_path / "runs.sqlite")
    key = model_key(llama)
    assert key == model_key(tiny_model("llama")) and key != model_key(tiny_model("opt"))  # fingerprint, not name
    a = store.record(key, "plan", plan, {"params": 123, "ppl": None}, "my plan", extra={"settings": "null"})
    b = store.record(key, "evaluation", plan.to_dict(), {"pruned_ppl": 42.5, "dense_ppl": float("nan")}, "quick")
    c = store.record("other#0", "plan", Plan.empty(llama), {}, "elsewhere")
    run = store.get(a)
    assert run.kind == "plan" and run.label == "my plan" and run.metrics == {"params": 123, "ppl": None}
    assert Plan.from_dict(run.plan).sha256() == plan.sha256() == run.plan_sha
    assert store.get(b).metrics["dense_ppl"] is None  # NaN is stored as null (valid JSON)
    assert [r.id for r in store.list(key)] == [a, b] and [r.id for r in store.list(key, "evaluation")] == [b]
    assert [r.id for r in store.list()] == [a, b, c]
    rows = store.compare([b, a])
    assert [r["run"] for r in rows] == [b, a] and rows[0]["pruned_ppl"] == 42.5 and rows[1]["pruned_ppl"] is None
    assert rows[0]["plan"] == plan.summary() and rows[0]["removed heads"] == plan.counts()["head"]
    assert store.find(key, plan.sha256(), "plan").id == a
    assert store.annotate(a, notes="best so far").notes == "best so far"
    assert store.delete(a).id == a
    with pytest.raises(RunStoreError, match="no run #"):
        store.get(a)
    assert [r.id for r in store.list(key)] == [b]
    with pytest.raises(RunStoreError, match="unknown run kind"):
        store.record(key, "chat", None)


def test_merge_keeps_one_row_per_plan_and_keeps_old_metrics(tmp_path, llama, plan):
    store = RunStore(tmp_path / "runs.sqlite")
    key = model_key(llama)
    first = store.record(key, "plan", plan, {"params": 10, "ppl": None}, "p", merge=True)
    again = store.record(key, "plan", plan, {"ppl": 55.0, "params": None}, "", merge=True)
    assert first == again
    run = store.get(first)
    assert run.metrics == {"params": 10, "ppl": 55.0} and run.label == "p" and run.updated >= run.created
    other = store.record(key, "plan", Plan.empty(llama), {}, "empty", merge=True)
    assert other != first and len(store.list(key, "plan")) == 2


def writers_at_once(path: Path, write, n: int = 2, timeout: float = 120) -> list[Exception]:
    """``write(store, i)`` in ``n`` threads released together, each with its own :class:`RunStore` on ``path``
    (connections are never shared); the exceptions they raised."""
    barrier, errors = threading.Barrier(n), []

    def run(i):
        store = RunStore(path)
        try:
            barrier.wait()
            write(store, i)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return errors


def test_sessions_creating_the_store_at_the_same_moment_both_succeed(tmp_path):
    """Switching a new file to WAL answers SQLITE_BUSY at once (no busy handler) while another connection creates
    the store: before the retry, about 1 in 50 simultaneous first writes failed with "database is locked"
    (reported as a damaged file). 150 fresh stores, two threads each, released together."""
    for k in range(150):
        path = tmp_path / f"runs{k}.sqlite"
        errors = writers_at_once(path, lambda store, i: store.record("m#1", "evaluation", None, {"i": i}, f"w{i}"),
                                 timeout=60)
        assert not errors, (k, errors[:3])
        assert len(RunStore(path).list("m#1", "evaluation")) == 2  # both writes are there


def test_two_threads_write_at_once_without_losing_updates(tmp_path, llama, plan):
    path = tmp_path / "runs.sqlite"
    key = model_key(llama)

    def writer(store, i):
        for j in range(25):
            store.record(key, "evaluation", None, {"writer": i, "j": j}, f"w{i}")
            store.record(key, "plan", plan, {f"m{i}_{j}": j}, "", merge=True)  # read-merge-write races

    assert not writers_at_once(path, writer)
    store = RunStore(path)
    evals = store.list(key, "evaluation")
    assert len(evals) == 50 and len({r.id for r in evals}) == 50
    (merged,) = store.list(key, "plan")
    assert set(merged.metrics) == {f"m{i}_{j}" for i in range(2) for j in range(25)}  # no update lost
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


WRITER = """
import sys
from pruneviz.runs import RunStore
store = RunStore(sys.argv[1])
for j in range(40):
    store.record("m#1", "evaluation", None, {"proc": sys.argv[2], "j": j}, "x")
"""


def test_two_processes_write_at_once(tmp_path):
    path = tmp_path / "runs.sqlite"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(i)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    runs = RunStore(path).list("m#1")
    assert len(runs) == 80 and {(r.metrics["proc"], r.metrics["j"]) for r in runs} == {
        (str(i), j) for i in range(2) for j in range(40)}


def test_damaged_or_foreign_file_is_refused_and_left_untouched(tmp_path):
    junk = tmp_path / "runs.sqlite"
    junk.write_bytes(b"this is not a database at all\n" * 100)
    before = junk.read_bytes()
    with pytest.raises(RunStoreError, match="left the file untouched") as info:
        RunStore(junk).list()
    assert "move it away" in str(info.value) and "PRUNEVIZ_RUNS" in str(info.value)
    with pytest.raises(RunStoreError):
        RunStore(junk).record("m#1", "plan", None)
    assert junk.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["runs.sqlite"]

    foreign = tmp_path / "theirs.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER, total REAL)")
        conn.execute("INSERT INTO invoices VALUES (1, 9.5)")
    before = foreign.read_bytes()
    with pytest.raises(RunStoreError, match="not a pruneviz run store"):
        RunStore(foreign).record("m#1", "plan", None)
    assert foreign.read_bytes() == before
    with sqlite3.connect(foreign) as conn:
        assert conn.execute("SELECT * FROM invoices").fetchall() == [(1, 9.5)]


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "runs.sqlite"
    store = RunStore(path)
    store.record("m#1", "plan", None, {}, "x")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE pruneviz_meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(RunStoreError, match="newer pruneviz"):
        RunStore(path).list()


def test_a_stored_plan_is_validated_against_the_model(tmp_path, llama, plan):
    store = RunStore(tmp_path / "runs.sqlite")
    rid = store.record(model_key(llama), "plan", plan, {}, "p")
    assert plan_of_run(store.get(rid), llama).sha256() == plan.sha256()
    with pytest.raises(PlanError, match=f"run #{rid} .* does not fit the loaded model") as info:
        plan_of_run(store.get(rid), tiny_model("opt"))
    assert "Load the model it was made for" in str(info.value)
    sweep = store.record(model_key(llama), "sweep", None, {"points": 3}, "s")
    with pytest.raises(PlanError, match="stores no single plan"):
        plan_of_run(store.get(sweep), llama)


def test_cli_lists_shows_compares_and_deletes(tmp_path, capsys, llama, plan):
    db = tmp_path / "runs.sqlite"
    store = RunStore(db)
    a = store.record(model_key(llama), "plan", plan, {"ppl": 12.5}, "first")
    b = store.record(model_key(llama), "export", plan, {"folder": "/x"}, "stock → /x")
    assert main(["runs", "list", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert f"#{a}" in out and "PPL 12.5" in out and f"#{b}" in out
    assert main(["runs", "show", str(a), "--db", str(db), "--plan-out", str(tmp_path / "p.json")]) == 0
    shown = capsys.readouterr().out
    assert json.loads(shown[:shown.rindex("}") + 1])["label"] == "first"
    assert Plan.from_json((tmp_path / "p.json").read_text()).sha256() == plan.sha256()
    assert main(["runs", "compare", str(a), str(b), "--db", str(db)]) == 0
    assert "folder" in capsys.readouterr().out
    assert main(["runs", "delete", str(a), "--db", str(db)]) == 0
    assert [r.id for r in store.list()] == [b]
    assert main(["runs", "show", str(a), "--db", str(db)]) == 2
    assert "no run" in capsys.readouterr().err
