"""The Streamlit app on the tiny random model (``PRUNEVIZ_MODEL=tiny``): every page with AppTest, session
isolation, the shared base model left untouched, and the pure helpers behind the views.

AppTest cannot click Plotly charts (they are opaque elements), so heatmap selection is tested through the
functions the chart callback calls (:func:`points_to_cells`, :func:`edits_for_cells`) and the figures are checked
for the invisible, clickable overlay; real clicks belong to the browser tests.
"""
import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_app import APP, clean
from streamlit.testing.v1 import AppTest

from pruneviz import speed
from pruneviz.allocate import plan_from_ratios
from pruneviz.errors import TextError
from pruneviz.evaluate import perplexity
from pruneviz.importance import compute
from pruneviz.plan import Plan
from pruneviz.surgery import apply_plan
from pruneviz.testing import tiny_model, tiny_tokenizer
from pruneviz.ui import analysis, figures, state

PAGES = ["model", "importance", "prune", "chat", "evaluate", "export"]
TITLES = {"model": "Model", "importance": "Importance", "prune": "Prune", "chat": "Chat", "evaluate": "Evaluate",
          "export": "Export"}


@pytest.fixture(autouse=True)
def tiny_env(tiny_app):
    """Every test here runs the app on its tiny model (conftest's ``tiny_app``)."""


def open_app(page: str | None = None) -> AppTest:
    """A fresh session. Because the pages live in ``pages/``, AppTest reruns a page file directly (Streamlit's legacy
    multipage mode) after the first run through app.py, and the page then draws the frame itself (see
    ``components.ensure_frame``). The sidebar widgets get new ids in that mode, so a second run settles them
    before a test sets their values."""
    at = AppTest.from_file(APP, default_timeout=60)
    clean(at.run())
    clean(at.run())
    if page:
        clean(at.switch_page(f"pages/{page}.py").run())
    return at


def chart_keys(at: AppTest) -> set[str]:
    """Keys of the Plotly charts on the page (AppTest keeps charts as opaque protos whose id ends with the key)."""
    return {c.proto.id.rsplit("-", 1)[-1] for c in at.get("plotly_chart")}


def base_model():
    return state.shared().models[state.ModelSpec(state.TINY).key].model


def score(at: AppTest, criterion: str, samples: int, seq_len: int) -> AppTest:
    """Score ``criterion`` on the Importance page (open) with ``samples`` calibration windows of ``seq_len``."""
    at.pills(key="imp_criteria").set_value([criterion])
    clean(at.run())
    at.number_input(key="imp_cal_n").set_value(samples)
    at.selectbox(key="imp_cal_seq").set_value(seq_len)
    return clean(at.button(key="imp_run").click().run())


def with_magnitude(at: AppTest) -> AppTest:
    """Score by magnitude through the Prune page's quick start (leaves the app on the Prune page)."""
    clean(at.switch_page("pages/prune.py").run())
    clean(at.button(key="pr_quick").click().run())
    assert "magnitude" in at.session_state["imaps"]
    return at


# ---- pages --------------------------------------------------------------------------------------------------------

def test_every_page_renders_and_navigates():
    at = open_app()
    assert at.title[0].value == "Model"  # the default page
    assert [m.label for m in at.metric][:4] == ["Layers", "Query heads", "KV groups", "MLP channels"]
    assert [m.value for m in at.metric][:4] == ["4", "6", "2", "40"]
    for page in PAGES:
        clean(at.switch_page(f"pages/{page}.py").run())
        assert at.title[0].value == TITLES[page]


def test_importance_computes_magnitude_and_caches_it():
    at = open_app("importance")
    estimate = at.dataframe[0].value
    assert list(estimate["criterion"]) == ["Weight magnitude"] and "≈ time" in estimate.columns
    clean(at.button(key="imp_run").click().run())
    imap = at.session_state["imaps"]["magnitude"]
    assert imap.heads.shape == (4, 6) and imap.channels.shape == (4, 40) and imap.blocks.shape == (4,)
    expected = compute(base_model(), "magnitude")
    assert torch.equal(imap.heads, expected.heads)
    assert {"imp_fig_head_magnitude", "imp_fig_kv_magnitude", "imp_fig_channel_magnitude",
            "imp_fig_block_magnitude"} <= chart_keys(at)
    # a second session gets the map from the process cache (same numbers, its own tensors)
    other = open_app("importance")
    clean(other.button(key="imp_run").click().run())
    again = other.session_state["imaps"]["magnitude"]
    assert torch.equal(again.channels, imap.channels) and again.channels is not imap.channels


def test_importance_compare_needs_two_criteria():
    at = open_app("importance")
    names = ["magnitude", "wanda_sp"]
    at.pills(key="imp_criteria").set_value(names)
    clean(at.run())
    at.number_input(key="imp_cal_n").set_value(4)
    at.selectbox(key="imp_cal_seq").set_value(64)
    clean(at.button(key="imp_run").click().run())
    assert set(names) <= set(at.session_state["imaps"])
    keys = chart_keys(at)
    assert {"imp_corr", "imp_overlap", "imp_fig_head_magnitude", "imp_fig_head_wanda_sp"} <= keys
    assert at.session_state["calib"].tokens.shape == (4, 64)


def test_slimgpt_map_is_labelled_and_solver_builds_a_compensated_model():
    at = open_app("importance")
    score(at, "slimgpt", 4, 64)
    spec = next(c.proto.spec for c in at.get("plotly_chart") if c.proto.id.endswith("imp_fig_head_slimgpt"))
    assert "dense-model OBS error" in spec and "OBS error" in spec
    clean(at.switch_page("pages/prune.py").run())
    clean(at.button(key="pr_slim_run").click().run())
    plan = at.session_state["plan"]
    assert plan.compensation == "slimgpt" and not plan.is_empty()
    assert at.session_state["pruned"].sha == plan.sha256()
    assert any("slimgpt" in c.value for c in at.caption)  # "re-runs the slimgpt weight update when applied"


def test_prune_sliders_change_plan_and_counters():
    at = with_magnitude(open_app())
    assert at.session_state["plan"].is_empty()
    clean(at.slider(key="pr_channel_pct").set_value(30).run())
    plan = at.session_state["plan"]
    imap = at.session_state["imaps"]["magnitude"]
    assert plan.sha256() == plan_from_ratios(base_model(), imap, channel_ratio=0.3).sha256()
    assert plan.counts()["channel"] == 4 * 12
    metrics = {m.label: m for m in at.metric}
    assert metrics["Parameters"].delta.startswith("-")
    clean(at.slider(key="pr_head_pct").set_value(50).run())
    assert at.session_state["plan"].counts()["kv"] == 4  # one of two KV groups in each of 4 layers
    clean(at.slider(key="pr_block_count").set_value(1).run())
    assert len(at.session_state["plan"].blocks) == 1


def test_prune_width_layer_range_keeps_the_other_layers_whole():
    at = with_magnitude(open_app())
    clean(at.slider(key="pr_width_layers").set_value((1, 2)).run())
    clean(at.slider(key="pr_channel_pct").set_value(30).run())
    plan = at.session_state["plan"]
    imap = at.session_state["imaps"]["magnitude"]
    assert plan.sha256() == plan_from_ratios(base_model(), imap, channel_ratio=0.3, skip_first=1,
                                             skip_last=1).sha256()
    assert {l for l, units in plan.channels if units} == {1, 2}


def test_prune_edit_by_list_and_apply():
    at = with_magnitude(open_app())
    at.selectbox(key="pr_list_kind").set_value("head")
    clean(at.run())
    at.multiselect(key="pr_list_head_0").set_value([0, 3])
    clean(at.button(key="pr_list_apply").click().run())
    plan = at.session_state["plan"]
    assert plan.removed_heads_all(0) == (0, 3)
    assert at.session_state["edits"]
    clean(at.button(key="pr_apply").click().run())
    pruned = at.session_state["pruned"].model
    assert pruned.model.layers[0].self_attn.o_proj.weight.shape[1] == 4 * 8  # 4 of 6 heads kept
    # edits survive a slider move (they are re-applied on top of the allocation)
    clean(at.slider(key="pr_channel_pct").set_value(20).run())
    assert at.session_state["plan"].removed_heads_all(0) == (0, 3)


def test_prune_unequal_heads_per_group_warns_and_blocks_apply():
    at = with_magnitude(open_app())
    at.selectbox(key="pr_list_kind").set_value("head")
    clean(at.run())
    at.multiselect(key="pr_list_head_0").set_value([0])  # group 0 keeps 2 heads, group 1 keeps 3
    clean(at.button(key="pr_list_apply").click().run())
    assert any("equal heads per KV group" in w.value for w in at.warning)
    assert at.button(key="pr_apply").disabled


def test_chat_streams_both_sides():
    at = open_app("chat")
    at.slider(key="chat_max_new").set_value(8)
    clean(at.run())
    clean(at.chat_input(key="chat_input").set_value("Hello").run())
    turn = at.session_state["chat"][-1]
    assert isinstance(turn["dense"], str) and isinstance(turn["pruned"], str)
    assert turn["dense_stats"]["tokens"] > 0 and turn["pruned_stats"]["tps"] > 0
    assert [m.name for m in at.chat_message] == ["user", "assistant", "assistant"]  # the prompt shown once
    assert "tokens/s" in at.chat_message[1].caption[0].value


def test_evaluate_ppl_matches_library_and_history_reloads():
    at = with_magnitude(open_app())
    clean(at.slider(key="pr_channel_pct").set_value(40).run())
    planned = at.session_state["plan"]
    clean(at.switch_page("pages/evaluate.py").run())
    clean(at.button(key="ev_run").click().run())
    result = at.session_state["evals"][-1]
    assert result.complete and result.protocol == "quick"
    _, eval_text = state.default_texts()
    expected = perplexity(base_model(), tiny_tokenizer(), eval_text, "quick").ppl
    assert math.isclose(result.dense_ppl, expected, rel_tol=1e-6)
    assert {m.label for m in at.metric} >= {"Dense PPL", "Pruned PPL"}
    assert at.session_state["history"][-1].sha == planned.sha256()
    # per-token losses
    clean(at.button(key="ev_tok_run").click().run())
    assert len(at.session_state["tokdiff"].tokens) > 0
    # move the slider away, then reload the configuration from history
    clean(at.switch_page("pages/prune.py").run())
    clean(at.slider(key="pr_channel_pct").set_value(10).run())
    assert at.session_state["plan"].sha256() != planned.sha256()
    clean(at.switch_page("pages/evaluate.py").run())
    clean(at.button(key="ev_hist_load").click().run())
    assert at.session_state["plan"].sha256() == planned.sha256()
    clean(at.switch_page("pages/prune.py").run())
    assert at.slider(key="pr_channel_pct").value == 40
    assert at.session_state["plan"].sha256() == planned.sha256()


def test_evaluate_sweep_records_points():
    at = with_magnitude(open_app())
    clean(at.switch_page("pages/evaluate.py").run())
    at.pills(key="ev_sweep_ratios").set_value([20, 50])
    clean(at.run())
    clean(at.button(key="ev_sweep_run").click().run())
    points = at.session_state["sweep"]
    crit = [p for p in points if p.criterion == "magnitude"]
    assert [p.ratio for p in crit] == [0.2, 0.5]
    assert crit[0].params > crit[1].params and all(math.isfinite(p.ppl) for p in points)


def pruned_on_export_page() -> AppTest:
    """A fresh session with a magnitude plan (50% of the MLP channels) built, on the Export page."""
    at = with_magnitude(open_app())
    clean(at.slider(key="pr_channel_pct").set_value(50).run())
    clean(at.button(key="pr_apply").click().run())
    return clean(at.switch_page("pages/export.py").run())


def test_export_offers_downloads_after_export(tmp_path):
    at = pruned_on_export_page()
    labels = [b.label for b in at.get("download_button")]
    assert labels == ["Download plan JSON"]
    clean(at.button(key="ex_run").click().run())
    labels = [b.label for b in at.get("download_button")]
    assert labels == ["Download plan JSON", "Download checkpoint (.zip)", "Download model card"]
    report = at.session_state["export"].report
    assert report.ok and report.reload_max_abs_diff == 0.0
    folder = Path(report.folder)
    assert folder.parent == tmp_path / "exports" and (folder / "pruneviz_plan.json").exists()
    assert Plan.from_json((folder / "pruneviz_plan.json").read_text()).sha256() == at.session_state["plan"].sha256()


def test_export_page_says_when_gguf_widths_miss_llama_cpps_fast_kernel():
    """The tiny model keeps 20 of 40 MLP channels per layer: not a multiple of 16, so before a GGUF export the
    page says prompt processing will take llama.cpp's slower path (bench/results/gguf_alignment.md), and how to
    plan around it; the Hugging Face format says nothing of it."""
    at = pruned_on_export_page()
    assert not [i for i in at.info if "not a multiple of 16" in i.value]
    clean(at.radio(key="ex_format").set_value("gguf").run())
    note = [i.value for i in at.info if "not a multiple of 16" in i.value]
    assert len(note) == 1 and note[0].startswith("4 layer(s)") and "(20)" in note[0] and "multiples of 32" in note[0]


@pytest.mark.skipif(not speed.llama_cpp_available(), reason="no llama.cpp binding is installed")
def test_gguf_export_then_its_llama_cpp_speed_from_the_export_page(monkeypatch):
    """The Export page's GGUF path end to end: the file the report names exists (it once named the temporary
    folder the export was written in), and "Measure llama.cpp speed" times that file against the dense model."""
    from pruneviz import gguf_export

    # the tiny model's word-level vocabulary has no GGUF form: files of token ids only, verified on token ids
    write, verify = gguf_export.write_gguf, gguf_export.verify_gguf
    monkeypatch.setattr(gguf_export, "write_gguf", lambda model, tok, *a, **k: write(model, None, *a, **k))
    monkeypatch.setattr(gguf_export, "verify_gguf", lambda p, model, tok, *a, **k: verify(p, model, None, *a, **k))
    monkeypatch.setenv("PRUNEVIZ_JOB_WAIT", "300")  # the timing job ends within the click's run
    at = pruned_on_export_page()
    clean(at.radio(key="ex_format").set_value("gguf").run())
    clean(at.button(key="ex_run").click().run())
    report = at.session_state["export"].report
    path = Path(report.gguf["path"])
    assert report.ok and path.is_file() and path.parent == Path(report.folder)
    clean(at.button(key="ex_speed").click().run())
    assert at.session_state["gguf_speed"]["path"] == str(path)
    values = {m.label: m.value for m in at.metric}
    assert values["Decode speed-up"].endswith("x") and float(values["Decode speed-up"][:-1]) > 0


def test_sessions_are_isolated_and_base_is_never_mutated():
    a, b = with_magnitude(open_app()), with_magnitude(open_app())
    base = base_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    clean(a.slider(key="pr_channel_pct").set_value(30).run())
    clean(b.slider(key="pr_head_pct").set_value(50).run())
    clean(a.button(key="pr_apply").click().run())
    clean(b.button(key="pr_apply").click().run())
    pa, pb = a.session_state["plan"], b.session_state["plan"]
    assert pa.counts()["channel"] == 48 and pa.counts()["kv"] == 0
    assert pb.counts()["kv"] == 4 and pb.counts()["channel"] == 0
    assert a.session_state["pruned"].model is not b.session_state["pruned"].model
    clean(a.switch_page("pages/importance.py").run())  # a gradient criterion on the shared base
    a.pills(key="imp_criteria").set_value(["taylor"])
    clean(a.run())
    a.number_input(key="imp_cal_n").set_value(2)
    a.selectbox(key="imp_cal_seq").set_value(32)
    clean(a.button(key="imp_run").click().run())
    assert "taylor" in a.session_state["imaps"] and "taylor" not in b.session_state["imaps"]
    assert all(p.grad is None for p in base.parameters())
    for at in (a, b):  # chat through masked and physical models must not leave hooks or edits on the base
        clean(at.switch_page("pages/chat.py").run())
        at.slider(key="chat_max_new").set_value(8)
        clean(at.chat_input(key="chat_input").set_value("hi").run())
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not base._forward_hooks and not any(m._forward_pre_hooks for m in base.modules())


def _snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before: dict) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_lora_recovery_adds_a_row_and_keeps_base_and_pruned_model():
    at = with_magnitude(open_app())
    clean(at.slider(key="pr_channel_pct").set_value(40).run())
    clean(at.button(key="pr_apply").click().run())
    base, pruned = base_model(), at.session_state["pruned"].model
    base_before, pruned_before = _snapshot(base), _snapshot(pruned)
    clean(at.switch_page("pages/evaluate.py").run())
    assert "ev_lora_loss" not in chart_keys(at)
    at.number_input(key="ev_lora_steps").set_value(3)
    at.number_input(key="ev_lora_batch").set_value(2)
    at.selectbox(key="ev_lora_seq").set_value(32)
    at.select_slider(key="ev_lora_lr").set_value(3e-3)
    clean(at.run())
    clean(at.button(key="ev_lora_run").click().run())
    rec = at.session_state["pruned"].recovery
    assert rec.record["steps_done"] == 3 and len(rec.losses) == 3 and rec.record["lr"] == 3e-3
    assert rec.record["seq_len"] == 32 and rec.record["batch_size"] == 2 and rec.model is not pruned
    # the perplexity table: dense / pruned / pruned + LoRA, each the library's number for that model
    ev = at.session_state["evals"][-1]
    assert ev.complete and ev.lora == rec.tag
    _, eval_text = state.default_texts()
    for key, model in (("dense_ppl", base), ("pruned_ppl", pruned), ("lora_ppl", rec.model)):
        expected = perplexity(model, tiny_tokenizer(), eval_text, "quick").ppl
        assert math.isclose(getattr(ev, key), expected, rel_tol=1e-6), key
    assert ev.lora_ppl != ev.pruned_ppl
    rows = next(d.value for d in at.dataframe if "vs dense" in d.value.columns)  # read-only tables carry no key
    assert list(rows["model"]) == ["dense", "pruned", "pruned + LoRA"]
    assert list(rows["perplexity"]) == [ev.dense_ppl, ev.pruned_ppl, ev.lora_ppl]
    assert "Pruned + LoRA PPL" in {m.label for m in at.metric} and "ev_lora_loss" in chart_keys(at)
    assert at.session_state["history"][-1].lora_ppl == ev.lora_ppl
    # neither the shared base nor the pruned model changed
    assert _unchanged(base, base_before) and _unchanged(pruned, pruned_before)
    assert all(p.grad is None for p in base.parameters())
    # export writes the recovered model, with its record; discarding brings the pruned model back
    clean(at.switch_page("pages/export.py").run())
    clean(at.button(key="ex_run").click().run())
    card = at.session_state["export"].report.card
    assert "## Recovery fine-tuning" in card and f"perplexity (pruned + LoRA): {round(ev.lora_ppl, 4)}" in card
    clean(at.switch_page("pages/evaluate.py").run())
    clean(at.button(key="ev_lora_discard").click().run())
    assert at.session_state["pruned"].recovery is None and at.session_state["pruned"].model is pruned
    assert "ev_lora_loss" not in chart_keys(at)


def test_load_error_is_a_message_and_keeps_the_model():
    at = open_app()
    at.selectbox(key="model_source").set_value("folder")
    clean(at.run())
    at.text_input(key="model_folder").set_value("/nonexistent/pruneviz-model")
    at.button(key="model_load").click().run()
    assert not at.exception
    assert any("does not exist" in e.value for e in at.error)
    assert at.session_state["model_spec"].is_tiny


def test_offloaded_model_loads_and_offers_only_layerwise_criteria(tmp_path):
    from transformers import AutoModelForCausalLM

    from pruneviz.importance import available
    from pruneviz.offload import is_offloaded

    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    at = open_app()
    at.selectbox(key="model_source").set_value("folder")
    at.selectbox(key="model_offload").set_value("cpu")
    clean(at.run())
    if not torch.cuda.is_available():  # CPU offload needs a GPU: explained before loading, nothing loaded
        assert any("No CUDA GPU" in c.value for c in at.sidebar.caption)
        at.text_input(key="model_folder").set_value(str(folder))
        clean(at.button(key="model_load").click().run())
        assert any("CPU offload needs a CUDA GPU" in w.value for w in at.warning)
        assert at.session_state["model_spec"].is_tiny
    at.selectbox(key="model_offload").set_value("disk")
    at.number_input(key="model_resident").set_value(1)
    at.text_input(key="model_folder").set_value(str(folder))
    clean(at.button(key="model_load").click().run())
    spec = at.session_state["model_spec"]
    assert (spec.source, spec.offload, spec.resident_layers) == (str(folder), "disk", 1)
    assert spec.key != state.ModelSpec(str(folder)).key  # resident and offloaded loads are cached apart
    assert is_offloaded(state.shared().models[spec.key].model)
    clean(at.switch_page("pages/model.py").run())
    note = next(c.value for c in at.caption if "scored one block at a time" in c.value)
    assert "3 of 4 blocks on disk (1 kept on cpu)" in note and "First-order Taylor" in note

    clean(at.switch_page("pages/importance.py").run())
    crits, offered = available(), at.pills(key="imp_criteria").options
    assert crits["wanda_sp"].title in offered and crits["magnitude"].title in offered
    assert crits["taylor"].title not in offered and crits["ppl"].title not in offered
    assert any("only criteria that run one block at a time" in c.value for c in at.caption)
    score(at, "wanda_sp", 4, 64)
    imap = at.session_state["imaps"]["wanda_sp"]
    assert imap.meta["offloaded"] and "imp_fig_channel_wanda_sp" in chart_keys(at)
    resident = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = compute(resident, "wanda_sp", at.session_state["calib"])
    assert torch.allclose(imap.channels, expected.channels, rtol=1e-4, atol=1e-6)
    assert torch.allclose(imap.heads, expected.heads, rtol=1e-4, atol=1e-6)


# ---- pure helpers ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_points_to_cells_reads_streamlit_customdata():
    points = [{"curve_number": 2, "point_index": 7, "x": 1, "y": 2, "customdata": {"0": 2, "1": 16, "2": 24, "3": 0.5,
                                                                                   "4": 0.0}},
              {"customdata": [0, 3, 4, 1.0, 1.0]}, {"x": 1, "y": 1}]
    assert analysis.points_to_cells(points) == [(0, 3, 4), (2, 16, 24)]


def test_selection_edits_toggle_remove_restore(llama):
    plan = Plan.empty(llama)
    cells = [(0, 0, 1), (1, 2, 3)]
    p1 = analysis.apply_edits(plan, analysis.edits_for_cells(plan, "head", cells, "toggle"))
    assert p1.removed_heads_all(0) == (0,) and p1.removed_heads_all(1) == (2,)
    p2 = analysis.apply_edits(p1, analysis.edits_for_cells(p1, "head", [(0, 0, 1), (2, 5, 6)], "toggle"))
    assert p2.removed_heads_all(0) == () and p2.removed_heads_all(2) == (5,)
    p3 = analysis.apply_edits(p2, analysis.edits_for_cells(p2, "channel", [(3, 8, 16)], "remove"))
    assert p3.removed("channel", 3) == tuple(range(8, 16))
    p4 = analysis.apply_edits(p3, analysis.edits_for_cells(p3, "channel", [(3, 12, 20)], "restore"))
    assert p4.removed("channel", 3) == tuple(range(8, 12))
    p5 = analysis.apply_edits(p4, analysis.edits_for_cells(p4, "block", [(1, 1, 2)], "toggle"))
    assert p5.blocks == (1,)


def test_binning_and_masks(llama):
    z = np.arange(10, dtype=float).reshape(1, 10)
    assert analysis.bin_columns(z, 4).tolist() == [[1.5, 5.5, 8.5]]
    assert analysis.bin_edges(2, 10, 4) == [(2, 6), (6, 10)]
    plan = Plan.empty(llama).with_units("kv", 0, [1]).with_units("block", None, [3])
    heads = analysis.removed_mask(plan, "head")
    assert heads[0].tolist() == [False] * 3 + [True] * 3 and heads[3].all() and not heads[1:3].any()
    assert analysis.per_layer_rank(np.array([[3.0, 1.0, 2.0]])).tolist() == [[1.0, 0.0, 0.5]]


def test_plan_costs_equal_the_built_model(llama):
    plan = (Plan.empty(llama).with_units("channel", 0, range(10)).with_units("kv", 1, [0])
            .with_units("head", 2, [0, 3]).with_units("block", None, [3]))
    dense = analysis.dense_costs(llama, 256)
    assert analysis.plan_costs(llama, plan, dense) == analysis.dense_costs(apply_plan(llama, plan), 256)
    assert analysis.plan_costs(llama, Plan.empty(llama), dense) == dense


def test_comparison_helpers():
    a = np.array([[1.0, 2.0, 3.0, 4.0]])
    names, corr = analysis.rank_correlations({"a": a, "b": -a, "c": a * 10})
    assert names == ["a", "b", "c"] and np.allclose(corr, [[1, -1, 1], [-1, 1, -1], [1, -1, 1]])
    names, over = analysis.prune_overlaps({"a": a, "b": -a}, 0.5)
    assert over[0, 1] == 0.0 and over[0, 0] == 1.0  # {0,1} vs {2,3}


def test_heatmap_has_clickable_overlay_and_removed_layer(llama):
    imap = compute(llama, "magnitude")
    plan = Plan.empty(llama).with_units("channel", 1, range(0, 8))
    fig = figures.importance_figure(imap, "channel", plan, "rank", analysis.View(bin=4), selectable=True)
    cells = [t for t in fig.data if t.name == "cells"]
    assert len(cells) == 1 and cells[0].hoverinfo != "skip" and cells[0].hovertemplate
    custom = np.asarray(cells[0].customdata)
    assert custom.shape == (4 * 10, 5)  # 4 layers x 10 bins of 4 channels
    row = custom[(custom[:, 0] == 1) & (custom[:, 1] == 0)][0]
    assert row[2] == 4 and row[4] == 1.0  # bin 0..3 of layer 1 is fully removed
    assert any(t.name == "removed" for t in fig.data)
    assert fig.layout.clickmode == "event+select"
    assert figures.importance_figure(imap, "block", plan, selectable=True).data[1].customdata is not None


def test_token_diff_html_escapes_and_colours():
    html = figures.token_diff_html(["<b>", " ok"], [1.0, 1.0], [3.0, 0.5])
    assert "&lt;b&gt;" in html and "<b>" not in html.replace("&lt;b&gt;", "")
    assert "rgba(229,72,77" in html and "rgba(0,144,255" in html


def test_upload_limit():
    class Upload:
        name, size = "big.txt", 25_000_000

        def getvalue(self):
            return b"x"

    with pytest.raises(TextError, match="limit"):
        state.read_upload(Upload())

    class Small(Upload):
        size = 10

        def getvalue(self):
            return "héllo wörld".encode()

    assert state.read_upload(Small()) == "héllo wörld"


def test_job_keeps_work_and_reraises_interrupt():
    from streamlit.runtime.scriptrunner_utils.exceptions import RerunException

    from pruneviz.ui.work import Job

    class Bar:
        calls = 0

        def progress(self, *a, **k):
            Bar.calls += 1
            if Bar.calls == 3:
                raise RerunException(None)

    done = []
    with pytest.raises(RerunException):
        with Job("Work…", key="t") as job:
            job.bar = Bar()
            for i in range(10):
                if job.cancelled():
                    break
                job.progress(i / 10, "step")
                done.append(i)
    assert done == [0, 1, 2] and not job.ok


def test_plan_json_round_trip_through_history_format(llama):
    plan = Plan.empty(llama).with_units("channel", 0, [1, 2])
    assert Plan.from_json(json.loads(json.dumps(plan.to_json(None)))).sha256() == plan.sha256()


def test_number_formatting():
    from pruneviz.ui.components import fmt_ppl, ppl_delta, split_front_matter

    assert fmt_ppl(23.2312) == "23.231" and fmt_ppl(1742856.6) == "1.743e+06"
    assert ppl_delta(25.0, 20.0) == "+25.0%" and ppl_delta(2000.0, 20.0) == "×100"
    assert ppl_delta(7e5, 20.0) == "×35,000"
    assert split_front_matter("---\nbase_model: x\n---\n\n# Title\n") == ("base_model: x", "# Title\n")


def test_results_of_a_superseded_run_reach_the_next_run(monkeypatch):
    """A stopped run cannot touch session state; save() queues the update and drain() applies it next run."""
    from streamlit.runtime.scriptrunner_utils.exceptions import StopException

    class Stopped:
        def __getitem__(self, key):
            raise StopException()

        __setitem__ = setdefault = __getitem__

    class Session(dict):
        pass

    class Fake:
        session_state = Stopped()

    monkeypatch.setattr(state, "st", Fake)
    monkeypatch.setattr(state, "session_id", lambda: "s1")
    state.save(lambda ss: ss["sweep"].append("point"))
    assert len(state.shared().mailbox["s1"]) == 1
    Fake.session_state = Session(sweep=[])
    assert state.drain() == 1 and Fake.session_state["sweep"] == ["point"]
    assert "s1" not in state.shared().mailbox


def test_switching_model_resets_the_session(tmp_path):
    folder = tmp_path / "tiny-opt"
    tiny_model("opt").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    at = with_magnitude(open_app())
    clean(at.slider(key="pr_block_count").set_value(3).run())  # more blocks than the next model may lose
    assert len(at.session_state["plan"].blocks) == 3
    at.selectbox(key="model_source").set_value("folder")
    clean(at.run())
    at.text_input(key="model_folder").set_value(str(folder))
    clean(at.button(key="model_load").click().run())
    assert at.session_state["model_spec"].source == str(folder)
    assert at.session_state["imaps"] == {} and at.session_state["plan"].geometry.n_layers == 3
    clean(at.switch_page("pages/prune.py").run())
    clean(at.button(key="pr_quick").click().run())
    assert at.slider(key="pr_block_count").value == 0 and at.slider(key="pr_block_count").max == 2


# ---- issue 11: bugs that broke a session ----------------------------------------------------------------------------

def test_chat_shows_model_text_verbatim_unless_markdown_is_asked_for():
    """Bug 3: a reply of ``#`` lines rendered as empty Markdown headings; model text is text unless toggled."""
    at = open_app("chat")
    at.slider(key="chat_max_new").set_value(8)
    clean(at.run())
    clean(at.chat_input(key="chat_input").set_value("# not a heading").run())
    turn = at.session_state["chat"][-1]
    user, dense = at.chat_message[0], at.chat_message[1]
    assert [t.value for t in user.text] == ["# not a heading"] and not user.markdown
    assert [t.value for t in dense.text] == [turn["dense"].strip()] and not dense.markdown  # st.text trims the ends
    at.toggle(key="chat_markdown").set_value(True)
    clean(at.run())
    assert at.chat_message[0].markdown[0].value == "# not a heading" and not at.chat_message[0].text


def test_evaluate_on_a_too_short_text_says_what_to_do_once():
    """Bug 4: a short pasted text gave "use the quick protocol" while quick was chosen, plus UnboundLocalError."""
    at = open_app("evaluate")
    at.selectbox(key="ev_text_text_kind").set_value("paste")
    clean(at.run())
    at.text_area(key="ev_text_paste").set_value("only a few words here")
    at.run()
    at.button(key="ev_run").click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "at least 128 tokens" in errors[0] and "'quick' protocol" not in errors[0]
    assert "Unexpected error" not in errors[0] and at.session_state["evals"] == []


def test_importance_shows_maps_computed_later():
    """Bug 5: after computing more criteria the Show selection kept the old one, hiding the new maps."""
    at = open_app("importance")
    clean(at.button(key="imp_run").click().run())
    assert at.pills(key="imp_show").value == ["magnitude"]
    score(at, "wanda_sp", 2, 32)
    assert at.pills(key="imp_show").value == ["magnitude", "wanda_sp"]
    assert {"imp_fig_head_magnitude", "imp_fig_head_wanda_sp"} <= chart_keys(at)
    at.pills(key="imp_show").set_value(["wanda_sp"])  # a choice the user makes is kept
    clean(at.run())
    assert at.pills(key="imp_show").value == ["wanda_sp"]


def export_per_layer(at: AppTest) -> Path:
    """Prune 8 MLP channels of layer 0 only (per-layer widths), build and export; the folder written."""
    with_magnitude(at)
    at.selectbox(key="pr_list_kind").set_value("channel")
    clean(at.run())
    at.multiselect(key="pr_list_channel_0").set_value(list(range(8)))
    clean(at.button(key="pr_list_apply").click().run())
    clean(at.button(key="pr_apply").click().run())
    clean(at.switch_page("pages/export.py").run())
    clean(at.button(key="ex_run").click().run())
    return Path(at.session_state["export"].report.folder)


def load_folder(at: AppTest, folder) -> AppTest:
    at.selectbox(key="model_source").set_value("folder")
    clean(at.run())
    at.text_input(key="model_folder").set_value(str(folder))
    return clean(at.button(key="model_load").click().run())


def test_exported_checkpoint_loads_and_is_explored_through_its_base():
    """Bug 1: loading an exported per-layer checkpoint raised PlanError ("already pruned") on every page."""
    at = open_app()
    folder = export_per_layer(at)
    made = at.session_state["plan"]
    load_folder(at, folder)
    assert at.session_state["model_spec"].source == str(folder)
    clean(at.switch_page("pages/model.py").run())
    assert any("structurally pruned with pruneviz" in m.value for m in at.markdown)  # the model card
    assert any(made.summary() in m.value for m in at.markdown)  # the plan it carries
    assert any("An exported, already pruned checkpoint" in c.value for c in at.sidebar.caption)
    for page in ("importance", "prune"):
        clean(at.switch_page(f"pages/{page}.py").run())
        assert any("explored through its base" in i.value for i in at.info)
        assert at.button(key=f"{page[:3] if page == 'importance' else 'pr'}_load_base").label == \
            "Load its base with this plan"
    clean(at.switch_page("pages/chat.py").run())
    at.slider(key="chat_max_new").set_value(8)
    clean(at.run())
    clean(at.chat_input(key="chat_input").set_value("Hello").run())
    turn = at.session_state["chat"][-1]
    assert turn["dense"] is not None and turn["pruned"] is None  # one column: the export itself
    clean(at.switch_page("pages/evaluate.py").run())
    clean(at.button(key="ev_run").click().run())
    ev = at.session_state["evals"][-1]
    _, eval_text = state.default_texts()
    exported = state.shared().models[at.session_state["model_spec"].key].model
    assert math.isclose(ev.pruned_ppl, perplexity(exported, tiny_tokenizer(), eval_text, "quick").ppl, rel_tol=1e-6)
    assert {m.label: m.value for m in at.metric}["Fidelity to dense"] == "N/A"
    clean(at.switch_page("pages/export.py").run())
    at.text_input(key="ex_name").set_value("again")
    clean(at.run())
    clean(at.button(key="ex_run").click().run())
    again = at.session_state["export"].report
    carried = Plan.from_json((Path(again.folder) / "pruneviz_plan.json").read_text())
    assert again.ok and carried.sha256() == made.sha256()
    # the base with the carried plan: the same plan, editable again; the export's work is kept aside
    clean(at.switch_page("pages/prune.py").run())
    clean(at.button(key="pr_load_base").click().run())
    assert at.session_state["model_spec"].is_tiny and at.session_state["plan"].sha256() == made.sha256()
    assert at.selectbox(key="model_source").value == "tiny"  # the picker follows
    clean(at.switch_page("pages/prune.py").run())
    assert at.session_state["plan"].sha256() == made.sha256()  # not rebuilt from the sliders
    assert at.session_state["pruned"].sha == made.sha256()  # the tiny model's own work came back
    assert any(made.summary() in c.value for c in at.sidebar.caption)


def tab_container(at: AppTest, key: str):
    """The proto of the tab container whose widget id ends with ``key`` (None if there is none)."""
    def walk(node):
        if getattr(node, "type", None) == "tab_container" and node.proto.tab_container.id.endswith(key):
            return node.proto.tab_container
        for child in getattr(node, "children", {}).values():
            found = walk(child)
            if found is not None:
                return found
        return None
    return walk(at._tree)


def test_query_head_tab_survives_the_gqa_warning():
    """Bug 2: the warning appearing above the tabs sent the view back to KV groups (the next click hit a group).
    The tabs are a keyed widget: the browser keeps the open tab by id, and the server reopens it."""
    at = with_magnitude(open_app())
    at.session_state["pr_tabs"] = "Query heads"  # what clicking the tab sets
    clean(at.run())
    labels = [t.label for t in at.tabs]
    at.selectbox(key="pr_list_kind").set_value("head")
    clean(at.run())
    at.multiselect(key="pr_list_head_0").set_value([0])  # unequal heads per group: the warning appears
    clean(at.button(key="pr_list_apply").click().run())
    assert any("equal heads per KV group" in w.value for w in at.warning)
    tabs = tab_container(at, "pr_tabs")
    assert tabs is not None and labels[tabs.default_tab_index] == "Query heads"
    at.multiselect(key="pr_list_head_0").set_value([])  # and disappears
    clean(at.button(key="pr_list_apply").click().run())
    assert not any("equal heads per KV group" in w.value for w in at.warning)
    assert labels[tab_container(at, "pr_tabs").default_tab_index] == "Query heads"


def test_importance_heatmaps_show_values_on_hover(llama):
    """Bug 6: the Importance heatmaps (not selectable) had no hover at all."""
    imap = compute(llama, "magnitude")
    plan = Plan.empty(llama).with_units("head", 1, [2])
    fig = figures.importance_figure(imap, "head", plan, "rank")
    scores = fig.data[0]
    assert scores.hoverinfo != "skip" and "score %{customdata[3]" in scores.hovertemplate
    custom = np.asarray(scores.customdata)
    assert custom.shape == (4, 6, 5) and custom[1, 2, 4] == 1.0
    assert np.isclose(custom[1, 2, 3], float(imap.heads[1, 2]))  # the raw score, not the rank colour
    at = open_app("importance")
    clean(at.button(key="imp_run").click().run())
    spec = next(c.proto.spec for c in at.get("plotly_chart") if c.proto.id.endswith("imp_fig_channel_magnitude"))
    assert "customdata[3]" in spec


def test_sidebar_plan_line_follows_the_sliders_in_the_same_run():
    """Bug 7: the sidebar's plan line showed the plan before the slider move (one rerun behind)."""
    at = with_magnitude(open_app())
    clean(at.slider(key="pr_channel_pct").set_value(30).run())
    summary = at.session_state["plan"].summary()
    assert [c.value for c in at.sidebar.caption if c.value.startswith("Plan:")] == [f"Plan: {summary}"]


def test_clear_goes_back_to_the_solver_plan_and_allocation_says_where_it_came_from():
    """Bug 7: "Clear" replaced a SlimGPT plan (and its model) with one rebuilt from stale sliders, and the
    Allocation panel showed those sliders as if they had made the solver's plan."""
    at = with_magnitude(open_app())
    clean(at.slider(key="pr_channel_pct").set_value(30).run())
    clean(at.switch_page("pages/importance.py").run())
    score(at, "wanda_sp", 4, 32)
    clean(at.switch_page("pages/prune.py").run())
    clean(at.button(key="pr_slim_run").click().run())
    slim = at.session_state["plan"]
    assert slim.compensation == "slimgpt"
    assert any("comes from the SlimGPT solver" in i.value for i in at.info)
    assert at.slider(key="pr_channel_pct").value == 30 and at.session_state["plan"].sha256() == slim.sha256()
    at.selectbox(key="pr_list_kind").set_value("block")
    clean(at.run())
    at.multiselect(key="pr_list_block_None").set_value([3])
    clean(at.button(key="pr_list_apply").click().run())
    assert at.session_state["plan"].blocks == (3,)
    clean(at.button(key="pr_clear_edits").click().run())
    assert at.session_state["plan"].sha256() == slim.sha256() and at.session_state["edits"] == []
    assert at.session_state["pruned"].sha == slim.sha256()  # its compensated model is the built one again
    clean(at.slider(key="pr_channel_pct").set_value(20).run())  # a slider move does replace it
    assert at.session_state["plan"].compensation is None
    assert not any("comes from the SlimGPT solver" in i.value for i in at.info)


def test_switching_model_keeps_each_models_work(tmp_path):
    """Bug 8: switching model silently wiped maps, plans, evaluations, history and chat."""
    folder = tmp_path / "tiny-opt"
    tiny_model("opt").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    at = with_magnitude(open_app())
    clean(at.slider(key="pr_channel_pct").set_value(30).run())
    clean(at.button(key="pr_apply").click().run())
    plan = at.session_state["plan"]
    load_folder(at, folder)
    assert at.session_state["imaps"] == {} and at.session_state["history"] == []
    assert any("set aside with its work" in t.value and "1 map" in t.value for t in at.toast)
    at.selectbox(key="model_source").set_value("tiny")
    clean(at.run())
    clean(at.button(key="model_load").click().run())
    assert at.session_state["model_spec"].is_tiny
    assert "magnitude" in at.session_state["imaps"] and at.session_state["plan"].sha256() == plan.sha256()
    assert at.session_state["pruned"].sha == plan.sha256() and at.session_state["history"][-1].sha == plan.sha256()
    clean(at.switch_page("pages/prune.py").run())
    assert at.slider(key="pr_channel_pct").value == 30 and at.session_state["plan"].sha256() == plan.sha256()


def test_estimates_come_from_the_last_run_of_each_criterion():
    """Bug 9: estimates came from one tiny timing (15-20x off); a finished run's seconds per token replace it."""
    at = open_app("importance")
    at.pills(key="imp_criteria").set_value(["wanda_sp"])
    clean(at.run())
    at.number_input(key="imp_cal_n").set_value(4)
    at.selectbox(key="imp_cal_seq").set_value(32)
    clean(at.run())
    assert "from your last run" not in at.dataframe[0].value["≈ time"][0]
    clean(at.button(key="imp_run").click().run())
    imap = at.session_state["imaps"]["wanda_sp"]
    rate = at.session_state["cost_rates"]["wanda_sp"]
    tokens = at.dataframe[0].value["forward tokens"][0]
    assert math.isclose(rate * tokens, imap.meta["seconds"], rel_tol=1e-9)
    clean(at.run())  # the next estimate (e.g. for other settings) uses it
    assert at.dataframe[0].value["≈ time"][0].endswith("(from your last run)")
    at.number_input(key="imp_cal_n").set_value(8)
    clean(at.run())
    assert at.dataframe[0].value["forward tokens"][0] == 2 * tokens


def test_chat_checks_the_context_and_times_decoding_apart_from_prefill():
    """Bug 10: a prompt past the model's context ran silently; tokens/s mixed the prefill into decoding."""
    at = open_app("chat")
    at.slider(key="chat_max_new").set_value(16)
    clean(at.run())
    assert any("of 128 tokens" in c.value for c in at.caption)  # the context budget is shown
    at.chat_input(key="chat_input").set_value("x" * 200).run()
    assert not at.exception and at.session_state["chat"] == []  # refused before anything ran
    assert any("longer than this model's context of 128 tokens" in e.value for e in at.error)
    clean(at.chat_input(key="chat_input").set_value("Hello").run())
    stats = at.session_state["chat"][-1]["dense_stats"]
    assert stats["tokens"] == 16 and 0 < stats["prefill"] < stats["seconds"] and stats["decode_tps"] > 0
    assert stats["prompt"] > 0
    line = at.chat_message[1].caption[0].value
    assert "first token after" in line and "tokens/s** decoding" in line


def test_chat_stop_keeps_what_was_generated(monkeypatch):
    """Bug 10: no Stop button. Stop reruns the page mid-stream: the partial reply is kept and marked stopped."""
    from streamlit.runtime.scriptrunner_utils.exceptions import RerunException
    from streamlit.runtime.scriptrunner_utils.script_requests import RerunData

    import pruneviz.chat

    class Stopped:  # what a click on Stop does to the running stream: a rerun at its next element update
        def __init__(self, *args, **kwargs):
            self.text, self.n_generated, self.stopped = "", 0, False

        def __iter__(self):
            self.text, self.n_generated = "part of a rep", 3
            yield self.text
            raise RerunException(RerunData())

        def stop(self):
            self.stopped = True

    at = open_app("chat")
    monkeypatch.setattr(pruneviz.chat, "stream_reply", Stopped)
    clean(at.chat_input(key="chat_input").set_value("Hello").run())
    turn = at.session_state["chat"][-1]
    assert turn["dense"] == "part of a rep" and turn["dense_stats"]["stopped"] and turn["pruned"] is None
    clean(at.run())  # the run the click started
    assert [t.value for t in at.chat_message[1].text] == ["part of a rep"]
    assert "stopped" in at.chat_message[1].caption[0].value
    assert any("stopped before this side started" in c.value for c in at.caption)


def test_smaller_items_block_colour_loss_ticks_captions_and_empty_columns(llama):
    """Bug 11: the blocks chart ignored "Colour by" (one outlier flattened the rest); fractional step ticks on the
    LoRA loss chart; "llama/llama" captions; Importance coloured linearly while Prune ranks; empty table columns."""
    from pruneviz.arch import geometry_of

    imap = compute(llama, "magnitude")
    raw = imap.blocks.numpy()
    ranked = figures.importance_figure(imap, "block", scale="rank").data[1]
    assert sorted(ranked.y) == pytest.approx(np.linspace(0, 1, len(raw)).tolist())
    assert np.allclose(np.asarray(ranked.customdata)[:, 3], raw)  # hover keeps the raw score
    logged = figures.importance_figure(imap, "block", scale="log10").data[1]
    assert np.allclose(logged.y, np.log10(np.abs(raw)))
    assert figures.loss_figure([3.0, 2.5, 2.2]).layout.xaxis.dtick == 1
    assert geometry_of(llama).describe().startswith("llama: ")
    at = open_app("importance")
    clean(at.button(key="imp_run").click().run())
    assert at.segmented_control(key="imp_scale").value == "rank"
    at = with_magnitude(open_app())
    clean(at.slider(key="pr_channel_pct").set_value(20).run())
    clean(at.switch_page("pages/evaluate.py").run())
    clean(at.button(key="ev_run").click().run())
    table = next(d.value for d in at.dataframe if "pruned_ppl" in d.value.columns)
    assert "lora_ppl" not in table.columns and not table.isna().any().any()


def test_evaluate_says_when_the_text_shares_the_calibration_domain():
    """The Evaluate page names the text relative to the calibration and warns on the calibration's own domain."""
    at = open_app("importance")
    score(at, "wanda_sp", 2, 32)
    clean(at.switch_page("pages/evaluate.py").run())
    assert any("held-out part of the calibration's own domain" in c.value for c in at.caption)
    assert any("shares the calibration's domain" in w.value for w in at.warning)
    at.selectbox(key="ev_text_text_kind").set_value("paste")
    clean(at.run())
    at.text_area(key="ev_text_paste").set_value("some text from elsewhere " * 40)
    clean(at.run())
    assert any("a different source from the calibration text" in c.value for c in at.caption)
    assert not any("shares the calibration's domain" in w.value for w in at.warning)


def test_recommended_recipe_builds_its_plan_and_model(monkeypatch):
    """Prune page: the recommended recipe (self-generated calibration, SlimLLM scores and ratios, MLP channels,
    affine compensation) to a share of the non-embedding parameters, in one click (a smaller calibration here, to
    stay quick)."""
    import dataclasses

    import pruneviz.recipe
    from pruneviz.plan import dense_params

    small = dataclasses.replace(pruneviz.recipe.RECOMMENDED, samples=4, seq_len=32)
    monkeypatch.setattr(pruneviz.recipe, "RECOMMENDED", small)
    at = open_app("prune")  # no maps needed
    assert any(small.describe() in c.value for c in at.caption)
    assert at.slider(key="pr_recipe_target").value == 20
    assert at.number_input(key="pr_recipe_samples").value == 4  # the recipe's own windows to start with
    at.slider(key="pr_recipe_target").set_value(30)
    at.number_input(key="pr_recipe_samples").set_value(3)
    clean(at.run())
    clean(at.button(key="pr_recipe_run").click().run())
    plan, rec = at.session_state["plan"], at.session_state["pruned"]
    assert plan.compensation == "affine_local" and plan.provenance["recipe"]["samples"] == 3
    assert rec.sha == plan.sha256() and at.session_state["calib"].tokens.shape == (3, 32)
    assert any("from this recipe, on 3 self-generated windows of 32 tokens" in c.value for c in at.caption)
    base = base_model()
    assert dense_params(rec.model, True) <= 0.7 * dense_params(base, True)
    assert at.session_state["history"][-1].sha == plan.sha256()
    clean(at.switch_page("pages/evaluate.py").run())
    assert any("not the calibration source" in c.value for c in at.caption)


def test_recommended_recipe_on_a_text_uses_its_windows_and_generates_nothing(monkeypatch):
    """Prune page: "Calibration: a text" runs the recipe on windows of the chosen text (the recipe's samples, length
    and seed; the CLI's ``prune --calibration text``): the model writes nothing, and the plan records the text."""
    import dataclasses

    import pruneviz.recipe

    small = dataclasses.replace(pruneviz.recipe.RECOMMENDED, samples=4, seq_len=32)
    monkeypatch.setattr(pruneviz.recipe, "RECOMMENDED", small)
    monkeypatch.setattr(pruneviz.recipe, "self_generated", lambda *a, **k: pytest.fail("generated calibration"))
    at = open_app("prune")
    at.selectbox(key="pr_recipe_source").set_value("text")
    clean(at.run())
    assert at.selectbox(key="pr_recipe_text_kind").value == "default"  # the bundled Python docs to start with
    at.selectbox(key="pr_recipe_text_kind").set_value("paste")
    clean(at.run())
    assert at.button(key="pr_recipe_run").disabled  # no text yet
    at.text_area(key="pr_recipe_paste").set_value("too short")
    clean(at.run())
    at.button(key="pr_recipe_run").click().run()
    plan = at.session_state["plan"]
    assert not at.exception and (plan is None or "recipe" not in plan.provenance)  # nothing started
    assert at.error and all("shorter than one window" in e.value for e in at.error)  # ... and it says why
    at.selectbox(key="pr_recipe_text_kind").set_value("default")
    at.number_input(key="pr_recipe_samples").set_value(5)
    clean(at.run())
    clean(at.button(key="pr_recipe_run").click().run())
    plan, calib = at.session_state["plan"], at.session_state["calib"]
    assert plan.provenance["recipe"]["calibration"] == "text" and plan.provenance["recipe"]["samples"] == 5
    assert plan.provenance["calibration"]["text"] == "bundled:pydoc-calib" == calib.text_name
    assert calib.tokens.shape == (5, 32) and plan.compensation == "affine_local"
    assert any("from this recipe, on 5 windows of 32 tokens of text 'bundled:pydoc-calib'" in c.value
               for c in at.caption)


# ---- issue 11: bug 8 (reload mid-computation), bug 11 (None in tables) ---------------------------------------------

def test_tables_show_missing_values_as_a_dash_never_none():
    """Bug 11: tables showed the literal "None" (the dense row's "vs dense", history rows not yet evaluated, LoRA
    columns before a LoRA run). Every table passes ``placeholder`` (checked in the source, so new tables do too),
    and the perplexity table's missing cell is shown with it."""
    import ast

    root = Path(APP).parent
    bare = []
    for path in sorted([*root.glob("pages/*.py"), *root.glob("pruneviz/ui/*.py"), Path(APP)]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("dataframe", "table"):
                if "placeholder" not in {k.arg for k in node.keywords}:
                    bare.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not bare, f"tables without placeholder=ui.MISSING (they would show 'None'): {bare}"
    at = with_magnitude(open_app())
    clean(at.slider(key="pr_channel_pct").set_value(20).run())
    clean(at.switch_page("pages/evaluate.py").run())
    clean(at.button(key="ev_run").click().run())
    table = next(d for d in at.dataframe if "vs dense" in d.value.columns)
    assert table.value["vs dense"].isna().any()  # the dense row has no change against itself
    assert table.proto.placeholder == analysis.MISSING == "–"
    assert all(d.proto.placeholder == analysis.MISSING for d in at.dataframe)


def test_job_stops_when_the_page_that_started_it_is_gone(monkeypatch):
    """Bug 8: a reload (or a closed tab) ends the browser session; its job answers cancel() at once instead of
    keeping a core busy, and says why on the page that comes back."""
    from pruneviz.ui import work
    from pruneviz.ui.compat import StopException

    alive = {"now": True}
    monkeypatch.setattr(state, "session_alive", lambda sid: alive["now"])
    monkeypatch.setattr(work, "ALIVE_EVERY", 0.0)
    notes = []
    monkeypatch.setattr(state, "notify", lambda message, icon="": notes.append(message))
    done = []
    with pytest.raises(StopException):
        with work.Job("Work…", key="gone") as job:
            for i in range(10):
                if job.cancelled():
                    break
                if i == 3:
                    alive["now"] = False  # the websocket closed
                done.append(i)
    assert done == [0, 1, 2, 3] and job.gone and not job.ok
    assert notes and "page was reloaded or closed" in notes[0]


def test_a_reloaded_page_gets_its_work_back(monkeypatch):
    """Bug 8: after a reload the page is a new session; it takes over the maps, plan and history of the session
    that is gone (same owner token in the URL), and the results that session's job still queues. A page of another
    token (a new tab) starts empty."""
    page = {"sid": "page-1"}
    gone = set()
    monkeypatch.setattr(state, "session_id", lambda: page["sid"])
    monkeypatch.setattr(state, "session_alive", lambda sid: sid not in gone)
    at = with_magnitude(open_app())
    clean(at.slider(key="pr_channel_pct").set_value(20).run())
    plan, token = at.session_state["plan"], at.session_state[state.OWNER_KEY]
    assert not plan.is_empty()

    other = AppTest.from_file(APP, default_timeout=60)  # a new tab while the first is open: its own, empty work
    page["sid"] = "tab-2"
    clean(other.run())
    assert not other.session_state["imaps"] and other.session_state[state.OWNER_KEY] != token

    gone.add("page-1")  # the reload: the old session disconnects, a new one opens the same URL
    state.shared().mailbox["page-1"] = [lambda ss: ss["notices"].append(("late result of the old page", "ℹ️"))]
    page["sid"] = "page-2"
    again = AppTest.from_file(APP, default_timeout=60)
    again.query_params[state.OWNER_PARAM] = token
    clean(again.run())
    assert "magnitude" in again.session_state["imaps"]
    assert again.session_state["plan"].sha256() == plan.sha256()
    assert any("from before the page was reloaded" in t.value for t in again.toast)
    assert any("late result of the old page" in t.value for t in again.toast)  # its job's queued result
    assert state.heir("page-1") == "page-2" and "page-1" not in state.shared().mailbox
    clean(again.switch_page("pages/prune.py").run())
    assert again.session_state["plan"].sha256() == plan.sha256()


def test_model_page_states_what_the_family_changes(tmp_path):
    """Issue 12: the Model page says what a family changes (multi-query attention, post-norms, (1 + w) norms)."""
    folder = tmp_path / "gemma3"
    tiny_model("gemma3_text").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    at = open_app()
    load_folder(at, folder)
    clean(at.switch_page("pages/model.py").run())
    notes = " ".join(i.value for i in at.info)
    assert "multi-query attention" in notes and "not the KV cache" in notes
    assert "norms after the output projections" in notes and "(1 + w)" in notes


# ---- issue 11: the solver, the recipe and LoRA are background jobs (jobs panel) ------------------------------------

def hold(monkeypatch, module, name: str, until=lambda message: True) -> threading.Event:
    """Make the library call ``module.name`` (called with ``progress=`` and ``cancel=``) wait, at its first progress
    message ``until`` accepts ("held by the test" comes first), until the returned event is set or its job is
    cancelled; then it carries on as usual."""
    real, release = getattr(module, name), threading.Event()

    def held(*args, progress, cancel, **kwargs):
        def report(fraction, message=""):
            progress(fraction, message)
            if until(message):
                while not release.wait(0.01) and not cancel():
                    pass
        report(0.0, "held by the test")
        return real(*args, progress=report, cancel=cancel, **kwargs)

    monkeypatch.setattr(module, name, held)
    return release


def reopen(owner: str) -> AppTest:
    """The page after a reload: a new session with the same ``?owner=`` token in the URL."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params[state.OWNER_PARAM] = owner
    clean(at.run())
    clean(at.run())
    return at


def reloads(monkeypatch):
    """Session ids under the test's control, so a "reload" ends the first session as a real one does (the new page
    then takes over its work, see :func:`pruneviz.ui.state.restore_work`). Returns ``reload()``."""
    page, gone = {"sid": "page-1"}, set()
    monkeypatch.setattr(state, "session_id", lambda: page["sid"])
    monkeypatch.setattr(state, "session_alive", lambda sid: sid not in gone)

    def reload():
        gone.add(page["sid"])
        page["sid"] += "'"

    return reload


def wait_for(cond, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_solver_runs_in_the_background_and_the_reloaded_page_gets_its_plan(monkeypatch):
    """The SlimGPT solver is a job of the jobs panel: the page says it runs (its button disabled: one at a time),
    a reload mid-solver does not stop it (the page that started it is gone), the reloaded page lists it and, when
    it ends, gets its plan, compensated model, calibration and history entry."""
    from pruneviz.jobs import runner
    from pruneviz.ui import background

    reload = reloads(monkeypatch)
    at = open_app("importance")
    score(at, "wanda_sp", 4, 64)
    calib = at.session_state["calib"]
    clean(at.switch_page("pages/prune.py").run())
    owner = at.session_state[state.OWNER_KEY]
    release = hold(monkeypatch, background, "slimgpt_prune")
    monkeypatch.setenv("PRUNEVIZ_JOB_WAIT", "0")
    try:
        clean(at.button(key="pr_slim_run").click().run())
        (job,) = runner().running(owner, "solver")
        assert job.label == "Running the SlimGPT solver (20%)"
        assert at.button(key="pr_slim_run").disabled and at.button(key=f"jobs_cancel_{job.id}") is not None
        assert any(job.label in c.value and "one at a time" in c.value for c in at.caption)
        assert at.session_state["plan"].is_empty()

        reload()
        again = reopen(owner)
        assert "wanda_sp" in again.session_state["imaps"]  # the work of the page before the reload
        assert again.button(key=f"jobs_cancel_{job.id}") is not None  # ... and its job, still running
        release.set()
        assert job.wait(120)
        snap = job.snapshot()
        assert snap.status == "done" and not snap.cancel_requested
        clean(again.run())
    finally:
        release.set()
    plan, rec = again.session_state["plan"], again.session_state["pruned"]
    assert plan.compensation == "slimgpt" and plan.provenance["strategy"] == "slimgpt solver" and not plan.is_empty()
    assert rec.sha == plan.sha256() and rec.plan is plan
    assert torch.equal(again.session_state["calib"].tokens, calib.tokens)
    assert again.session_state["plan_settings"] is None and again.session_state["prune_seen"] == state.KEEP_PLAN
    assert again.session_state["history"][-1].sha == plan.sha256()
    assert again.session_state["job_log"][-1]["status"] == "done" and runner().jobs(owner) == []


def test_recipe_runs_in_the_background_and_cancel_stops_it(monkeypatch):
    """The recommended recipe is a job of the jobs panel: Cancel stops it and leaves the session's plan as it was;
    run again, its plan, built model, calibration and history entry reach the session when it ends."""
    import dataclasses

    import pruneviz.recipe
    from pruneviz.jobs import runner

    monkeypatch.setattr(pruneviz.recipe, "RECOMMENDED", dataclasses.replace(pruneviz.recipe.RECOMMENDED, samples=4,
                                                                            seq_len=32))
    at = open_app("prune")
    owner = at.session_state[state.OWNER_KEY]
    release = hold(monkeypatch, pruneviz.recipe, "run_recipe")
    monkeypatch.setenv("PRUNEVIZ_JOB_WAIT", "0")
    try:
        clean(at.button(key="pr_recipe_run").click().run())
        (job,) = runner().running(owner, "recipe")
        assert at.button(key="pr_recipe_run").disabled
        assert any("Its plan replaces the current one" in c.value for c in at.caption)
        assert any("held by the test" in (p.proto.text or "") for p in at.get("progress"))  # the panel
        clean(at.button(key=f"jobs_cancel_{job.id}").click().run())
        assert job.wait(120) and job.snapshot().status == "cancelled" and not job.snapshot().has_result
        clean(at.run())
        assert at.session_state["plan"].is_empty() and at.session_state["pruned"] is None
        assert at.session_state["job_log"][-1]["status"] == "cancelled" and runner().jobs(owner) == []
        assert not at.button(key="pr_recipe_run").disabled

        clean(at.button(key="pr_recipe_run").click().run())  # again, to the end
        (job,) = runner().running(owner, "recipe")
        release.set()
        assert job.wait(120) and job.snapshot().status == "done"
        clean(at.run())
    finally:
        release.set()
    plan, rec = at.session_state["plan"], at.session_state["pruned"]
    assert plan.compensation == "affine_local" and plan.provenance["recipe"]["samples"] == 4
    assert rec.sha == plan.sha256() and at.session_state["calib"].tokens.shape == (4, 32)
    assert at.session_state["history"][-1].sha == plan.sha256() and runner().jobs(owner) == []


def test_lora_runs_in_the_background_and_cancel_after_a_reload_keeps_the_steps_done(monkeypatch):
    """LoRA recovery is a job of the jobs panel whose progress carries each step's loss; a reload does not stop
    it, the reloaded page cancels it, and the steps done so far reach that page (merged, marked stopped early,
    not evaluated), with the loss curve."""
    from pruneviz.jobs import runner
    from pruneviz.ui import background

    reload = reloads(monkeypatch)
    at = with_magnitude(open_app())
    clean(at.slider(key="pr_channel_pct").set_value(40).run())
    clean(at.button(key="pr_apply").click().run())
    pruned = at.session_state["pruned"]
    clean(at.switch_page("pages/evaluate.py").run())
    at.number_input(key="ev_lora_steps").set_value(5)
    at.number_input(key="ev_lora_batch").set_value(2)
    at.selectbox(key="ev_lora_seq").set_value(32)
    clean(at.run())
    owner = at.session_state[state.OWNER_KEY]
    release = hold(monkeypatch, background, "recover", until=lambda message: message.startswith("LoRA step 2/"))
    monkeypatch.setenv("PRUNEVIZ_JOB_WAIT", "0")
    try:
        clean(at.button(key="ev_lora_run").click().run())
        (job,) = runner().running(owner, "lora")
        wait_for(lambda: job.snapshot().message.startswith("LoRA step 2/5: loss "))
        clean(at.run())
        assert any("LoRA step 2/5: loss" in (p.proto.text or "") for p in at.get("progress"))  # the panel
        assert at.button(key="ev_lora_run").disabled
        assert any(job.label in c.value and "loss curve shows here" in c.value for c in at.caption)

        reload()
        again = reopen(owner)
        assert again.session_state["pruned"].sha == pruned.sha
        assert not job.snapshot().cancel_requested and job.snapshot().status == "running"
        clean(again.button(key=f"jobs_cancel_{job.id}").click().run())
        assert job.wait(120) and job.snapshot().status == "cancelled"
        clean(again.run())
    finally:
        release.set()
    rec = again.session_state["pruned"].recovery
    assert rec is not None and rec.cancelled and rec.record["steps_done"] == 2 and len(rec.losses) == 2
    assert again.session_state["evals"] == [] and "lora" in again.session_state["cost_rates"]
    clean(again.switch_page("pages/evaluate.py").run())
    assert "ev_lora_loss" in chart_keys(again) and any("stopped early" in c.value for c in again.caption)
    assert not again.button(key="ev_lora_run").disabled and runner().jobs(owner) == []
