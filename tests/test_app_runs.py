"""The app's persisted runs, URL state and jobs panel on the tiny model (AppTest; a per-test run store from
conftest). History and evaluations written in one session come back in a new one; the Runs page compares runs and
loads a stored plan (refusing one that does not fit); a link restores model and plan, never remote code; the jobs
panel shows progress, ETA and Cancel, and a reload with the same ``owner`` finds the job and collects its result."""
import threading

import pytest
from helpers_app import APP, clean
from streamlit.testing.v1 import AppTest

from pruneviz.allocate import plan_from_ratios
from pruneviz.importance import compute
from pruneviz.jobs import runner
from pruneviz.runs import RunStore, model_key
from pruneviz.testing import tiny_model, tiny_tokenizer
from pruneviz.ui import state


def open_app(page: str | None = None, **query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params.update(query)
    clean(at.run())
    clean(at.run())
    if page:
        clean(at.switch_page(f"pages/{page}.py").run())
    return at


@pytest.fixture(autouse=True)
def tiny_env(tiny_app):
    """Every test here runs the app on its tiny model (conftest's ``tiny_app``)."""


def tiny_key() -> str:
    return model_key(tiny_model("llama"))  # the app's tiny model (deterministic weights)


def applied_and_evaluated() -> tuple[AppTest, object]:
    at = open_app("prune")
    clean(at.button(key="pr_quick").click().run())
    clean(at.slider(key="pr_channel_pct").set_value(30).run())
    clean(at.button(key="pr_apply").click().run())
    plan = at.session_state["plan"]
    clean(at.switch_page("pages/evaluate.py").run())
    clean(at.button(key="ev_run").click().run())
    assert at.session_state["evals"][-1].sha == plan.sha256()
    return at, plan


def test_history_persists_and_the_runs_page_compares_and_loads_plans():
    at, plan = applied_and_evaluated()
    runs = RunStore().list(tiny_key())
    assert {r.kind for r in runs} == {"plan", "evaluation"} and all(r.plan_sha == plan.sha256() for r in runs)
    (hist_run,) = [r for r in runs if r.kind == "plan"]
    assert hist_run.metrics["ppl"] == at.session_state["evals"][-1].pruned_ppl  # the history row's metrics

    other = open_app("runs")  # a new session (a reload, another tab, a restarted server)
    assert [h.sha for h in other.session_state["history"]] == [plan.sha256()]
    assert other.session_state["evals"][-1].pruned_ppl == at.session_state["evals"][-1].pruned_ppl
    assert other.session_state["plan"].is_empty()
    assert set(other.dataframe[0].value["run"]) == {r.id for r in runs}
    table = other.dataframe[1].value  # the comparison
    assert len(table.columns) == 2 and "removed channels" in table.index and "pruned_ppl" in table.index

    other.selectbox(key="runs_pick").set_value(hist_run.id)
    clean(other.run())
    clean(other.button(key="runs_load").click().run())
    assert other.session_state["plan"].sha256() == plan.sha256()
    assert other.query_params.get("plan") in (str(hist_run.id), [str(hist_run.id)])

    # a stored plan that does not fit the loaded model: a clear message, the session's plan unchanged
    opt = tiny_model("opt")
    foreign = RunStore().record(tiny_key(), "plan", plan_from_ratios(opt, compute(opt, "magnitude"),
                                                                     channel_ratio=0.5), {}, "for another model")
    clean(other.run())
    other.selectbox(key="runs_pick").set_value(foreign)
    clean(other.run())
    other.button(key="runs_load").click().run()
    assert not other.exception
    assert any("does not fit the loaded model" in w.value for w in other.warning)
    assert other.session_state["plan"].sha256() == plan.sha256()


def test_a_link_restores_model_and_plan(tmp_path):
    _, plan = applied_and_evaluated()
    rid = RunStore().find(tiny_key(), plan.sha256(), "plan").id
    at = open_app(model="tiny", plan=str(rid))
    assert at.session_state["model_spec"].is_tiny and at.session_state["plan"].sha256() == plan.sha256()
    assert at.query_params["model"] in ("tiny", ["tiny"])

    # a Hub id is only filled into the picker; a URL never asks for remote code
    hub = AppTest.from_file(APP, default_timeout=60)
    hub.query_params["model"] = "someone/some-model"
    clean(hub.run())  # (one run: AppTest's second run is Streamlit's legacy page mode, with new widget ids)
    assert hub.session_state["model_spec"].source == state.TINY  # the default model, not the link's
    assert any("press **Load model**" in t.value for t in hub.toast)
    assert hub.text_input(key="model_hub_id").value == "someone/some-model"
    assert not hub.checkbox(key="model_trust").value

    folder = tmp_path / "tiny-opt"
    tiny_model("opt").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    at = open_app(model=str(folder), plan=str(rid))  # a local folder loads; the llama plan does not fit it
    spec = at.session_state["model_spec"]
    assert spec.source == str(folder) and not spec.trust_remote_code
    assert at.session_state["plan"].is_empty()
    assert any(f"run {rid} from the link" in t.value and "does not fit" in t.value for t in at.toast)


def blocking_job(owner: str, release: threading.Event):
    def work(progress, cancel):
        progress(0.25, "window 4/16")
        while not release.wait(0.01):
            if cancel():
                return "partial"
        return "all"

    def apply(ss, result):
        ss["probe_result"] = result

    return runner().submit(owner, "evaluation", "Probe job", work,
                           meta={"apply": apply, "model": state.ModelSpec(state.TINY).key, "source": "tiny"})


def test_jobs_panel_shows_progress_and_cancel_and_survives_a_reload():
    at = open_app("evaluate")
    owner = at.session_state["job_owner"]
    assert at.query_params["owner"] in (owner, [owner])
    release = threading.Event()
    job = blocking_job(owner, release)
    try:
        clean(at.run())
        assert "Jobs" in [s.value for s in at.sidebar.subheader]
        assert at.button(key=f"jobs_cancel_{job.id}") is not None
        assert any("window 4/16" in (p.proto.text or "") and "left" in p.proto.text for p in at.get("progress"))
        assert at.button(key="ev_run").disabled  # one evaluation at a time

        reloaded = open_app(owner=owner)  # a reload: new session, same URL
        assert reloaded.session_state["job_owner"] == owner
        stranger = open_app()
        assert not [b for b in stranger.button if b.key == f"jobs_cancel_{job.id}"]  # other owners see nothing

        clean(reloaded.button(key=f"jobs_cancel_{job.id}").click().run())
        assert job.wait(30) and job.snapshot().status == "cancelled"
        clean(reloaded.run())
        assert reloaded.session_state["probe_result"] == "partial"  # collected by the reloaded session
        assert reloaded.session_state["job_log"][-1]["status"] == "cancelled"
        assert runner().jobs(owner) == []
    finally:
        release.set()


def test_evaluation_runs_in_the_background(monkeypatch):
    monkeypatch.setenv("PRUNEVIZ_JOB_WAIT", "0")
    at = open_app("evaluate")
    owner = at.session_state["job_owner"]
    clean(at.button(key="ev_run").click().run())
    for job in runner().jobs(owner):
        assert job.wait(120)
    assert at.session_state["evals"] == [] or len(at.session_state["evals"]) == 1
    clean(at.run())
    (ev,) = at.session_state["evals"]
    assert ev.complete and ev.pruned_ppl == ev.dense_ppl  # the empty plan: pruned is the dense model
    assert [r.kind for r in RunStore().list(tiny_key())] == ["evaluation", "plan"]
