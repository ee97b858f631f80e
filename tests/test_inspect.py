"""Inspecting a prompt (pruneviz.inspection), comparing units and configurations (pruneviz.compare), and the
Inspect page.

The invariants: the residual stream is the sum of what every head, attention bias and MLP wrote into it; a unit's
removal effect is what masking that unit with a real plan does to the next token's log-probability; the
attention patterns are those the model computes; a plan's per-token effect is the fidelity of the two models.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers_app import APP, clean
from streamlit.testing.v1 import AppTest

from pruneviz.arch import geometry_of, get_path
from pruneviz.compare import layer_histograms, pareto_front, tokens_per_s, unit_scores
from pruneviz.errors import PlanError, TextError
from pruneviz.evaluate import SweepPoint
from pruneviz.importance import ImportanceMap, compute
from pruneviz.inspection import inspect_prompt, plan_effect, prompt_ids, removal_effects
from pruneviz.offload import clone_model
from pruneviz.plan import Plan
from pruneviz.surgery import apply_plan, install_masks, masked_model, masking
from pruneviz.testing import tiny_model, tiny_tokenizer
from pruneviz.ui import state

PROMPT = "The cat sat on the mat."
GQA = ("llama", "qwen2", "mistral")  # grouped-query attention (2 or 3 KV groups of 6 heads), outputs add up


@pytest.fixture(scope="module")
def tok8():
    return tiny_tokenizer()


def logp_next(model, tok, prompt: str, position: int, target: int) -> float:
    ids = torch.tensor([prompt_ids(tok, prompt)[:position + 1]])  # [1, t]
    with torch.inference_mode():
        return float(F.log_softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), -1)[target])


# ---- contributions ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fam", GQA + ("phi3", "opt", "gpt2", "bloom"))
def test_contributions_sum_to_the_final_hidden_state(fam, tok8):
    model = tiny_model(fam)
    ins = inspect_prompt(model, tok8, PROMPT, keep_vectors=True)
    P, g = ins.parts, geometry_of(model)
    T = ins.n_tokens
    assert ins.attention.shape == (g.n_layers, g.n_heads, T, T)
    assert ins.head_norm.shape == (g.n_layers, g.n_heads, T) and ins.mlp_norm.shape == (g.n_layers, T)
    assert ins.additive
    total = P["embed"] + P["heads"].sum((0, 1)) + P["attn_bias"].sum(0) + P["mlp"].sum(0)  # [T, D]
    assert torch.allclose(total, P["final"], atol=1e-4, rtol=1e-4)
    # the final hidden state is what the final norm reads, captured independently here
    final = {}
    norm = get_path(model, {"opt": "model.decoder.final_layer_norm", "gpt2": "transformer.ln_f",
                            "bloom": "transformer.ln_f"}.get(fam, "model.norm"))
    handle = norm.register_forward_pre_hook(lambda m, a: final.update(x=a[0][0].detach()))  # returns None
    with torch.inference_mode():
        model(input_ids=torch.tensor([list(ins.ids)]), use_cache=False)
    handle.remove()
    assert torch.allclose(total, final["x"], atol=1e-4, rtol=1e-4)
    # norms are the norms of those vectors; the stream norm's last row is the final state's
    assert torch.allclose(ins.head_norm, P["heads"].norm(dim=-1), atol=1e-5)
    assert torch.allclose(ins.stream_norm[-1], P["final"].norm(dim=-1), atol=1e-4)


def test_attention_patterns_are_the_models_and_base_is_untouched(tok8):
    model = tiny_model("qwen2")
    impl = model.config._attn_implementation
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ins = inspect_prompt(model, tok8, PROMPT)
    a = ins.attention  # [L, H, T, T]
    assert torch.allclose(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-5)
    assert float(a.triu(1).abs().max()) == 0.0  # causal
    assert model.config._attn_implementation == impl and not model._forward_hooks
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_post_norm_families_say_their_outputs_do_not_add_up(tok8):
    ins = inspect_prompt(tiny_model("gemma2"), tok8, PROMPT)
    assert not ins.additive and torch.isfinite(ins.head_norm).all()


def test_inspecting_a_pruned_model_or_an_empty_prompt_is_refused(tok8):
    model = tiny_model("llama")
    pruned = apply_plan(model, Plan.empty(model).with_units("head", 0, [0, 3]))
    with pytest.raises(PlanError, match="dense base"):
        inspect_prompt(pruned, tok8, PROMPT)
    with pytest.raises(TextError):
        inspect_prompt(model, tok8, "   ")
    with pytest.raises(TextError, match="outside"):
        removal_effects(model, tok8, "ab", position=7)


# ---- removal effects ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fam", GQA + ("olmo2",))
def test_removal_effect_equals_masking_with_a_real_plan(fam, tok8):
    model = tiny_model(fam)
    g = geometry_of(model)
    pos = 5
    eff = removal_effects(model, tok8, PROMPT, position=pos, batch_size=5)  # chunks cross layers and kinds
    ids = prompt_ids(tok8, PROMPT)
    assert eff.actual and eff.target == ids[pos + 1] and eff.position == pos
    assert math.isclose(eff.logp, logp_next(model, tok8, PROMPT, pos, eff.target), abs_tol=1e-5)
    empty = Plan.empty(model)
    for layer in (0, g.n_layers - 1):
        for kind, n in (("head", g.n_heads), ("kv", g.n_kv)):
            for i in range(n):
                with masking(model, empty.with_units(kind, layer, [i])) as view:
                    want = logp_next(view, tok8, PROMPT, pos, eff.target) - eff.logp
                assert abs(float(eff.get(kind)[layer, i]) - want) < 1e-4, (kind, layer, i)
        # a whole MLP: every channel masked (a plan keeps one at least, so the masks go on a clone directly)
        view = clone_model(model, share_weights=True)
        install_masks(view, empty.with_units("channel", layer, range(g.n_channels)))
        want = logp_next(view, tok8, PROMPT, pos, eff.target) - eff.logp
        assert abs(float(eff.mlp[layer]) - want) < 1e-4
    assert eff.forwards == 1 + math.ceil(g.n_layers * (g.n_heads + g.n_kv + 1) / 5)


def test_removal_effects_at_the_last_position_score_the_dense_guess(tok8):
    model = tiny_model("llama")
    eff = removal_effects(model, tok8, "ab", position=None, kinds=("kv",))
    assert eff.position == 1 and eff.actual and eff.head is None and eff.kv.shape == (4, 2)
    last = removal_effects(model, tok8, "ab", position=2, kinds=("mlp",))
    ids = torch.tensor([prompt_ids(tok8, "ab")])
    with torch.inference_mode():
        guess = int(model(input_ids=ids).logits[0, -1].argmax())
    assert not last.actual and last.target == guess and last.mlp.shape == (4,)
    stopped = removal_effects(model, tok8, "ab", kinds=("head",), batch_size=4, cancel=iter([False, True]).__next__)
    assert stopped.head.isnan().sum() == 24 - 4  # the first pass only
    with pytest.raises(PlanError):
        removal_effects(model, tok8, "ab", kinds=("channel",))


# ---- what a plan removed ------------------------------------------------------------------------------------------

def test_plan_effect_is_the_fidelity_of_the_two_models(tok8):
    model = tiny_model("qwen2")
    plan = Plan.empty(model).with_units("kv", 1, [0]).with_units("channel", 2, range(0, 40, 2))
    pruned = apply_plan(model, plan)
    eff = plan_effect(model, pruned, tok8, PROMPT, k=3)
    ids = prompt_ids(tok8, PROMPT)
    assert len(eff.changes) == len(ids) - 1 and len(eff.by_position) == len(ids) - 1
    deltas = [abs(c.delta) for c in eff.changes]
    assert deltas == sorted(deltas, reverse=True) and deltas[0] > 0
    t = eff.changes[0].position
    dense_lp = logp_next(model, tok8, PROMPT, t, ids[t + 1])
    pruned_lp = logp_next(pruned, tok8, PROMPT, t, ids[t + 1])
    assert math.isclose(eff.changes[0].delta, dense_lp - pruned_lp, abs_tol=1e-4)
    assert eff.changes[0].target == tok8.decode([ids[t + 1]])
    top = eff.by_position[-1].dense_top
    assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
    assert math.isclose(eff.mean_delta, sum(c.delta for c in eff.changes) / len(eff.changes), abs_tol=1e-5)
    same = plan_effect(model, masked_model(model, Plan.empty(model)), tok8, PROMPT)
    assert same.mean_kl < 1e-6 and same.top1_agreement == 1.0
    assert set(eff.changes[0].row()) >= {"reading", "next", "Δ loss", "dense top", "pruned top"}


# ---- comparing units ----------------------------------------------------------------------------------------------

def test_unit_scores_rank_a_unit_under_every_criterion():
    g = geometry_of(tiny_model("llama"))
    heads = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.5, float("nan")]] + [[10.0] * 6] * 3)  # [4, 6]
    a = ImportanceMap("a", g, heads=heads, blocks=torch.tensor([4.0, 1.0, 3.0, 2.0]))
    b = ImportanceMap("b", g, heads=-heads.nan_to_num(0.0))
    rows = unit_scores({"a": a, "b": b, "c": ImportanceMap("c", g, channels=torch.zeros(4, 40))}, 0, "head", 2)
    assert [r["criterion"] for r in rows] == ["a", "b"]
    ra, rb = rows
    assert ra["score"] == 2.0 and ra["rank"] == 2 and ra["of"] == 5  # 3 > 2 = 2 > 1 > 0.5 (nan not scored)
    assert ra["model_rank"] == 18 + 2 and ra["model_of"] == 23
    assert ra["percentile"] == pytest.approx(2 / 4)
    assert rb["rank"] == 4 and rb["of"] == 6  # -3 < -2 = -2 < -1 < -0.5 < 0
    assert unit_scores({"a": a}, 0, "head", 5)[0]["rank"] is None
    block = unit_scores({"a": a, "b": b}, 2, "block", 0)
    assert len(block) == 1 and block[0]["rank"] == 2 and block[0]["of"] == 4
    with pytest.raises(PlanError):
        unit_scores({"a": a}, 0, "head", 6)


def test_layer_histograms_share_their_bins():
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 3.0, 3.0, float("nan")]])
    edges, counts = layer_histograms(scores, bins=3)
    assert edges.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert counts.tolist() == [[1, 1, 2], [0, 0, 3]]
    edges, counts = layer_histograms(torch.tensor([[5.0, 5.0]]), bins=2, log=True)
    assert counts.sum() == 2


# ---- Pareto fronts ------------------------------------------------------------------------------------------------

def sweep_point(crit, params, ppl, ms=None, kl=None):
    return SweepPoint(crit, 0.1, "width", params, ppl, "quick", "x", 10, ms_per_token=ms, kl_mean=kl)


def test_pareto_front_keeps_exactly_the_undominated_points():
    pts = [sweep_point("a", 100, 10.0), sweep_point("a", 80, 12.0), sweep_point("b", 80, 11.0),
           sweep_point("b", 60, 20.0), sweep_point("c", 90, 11.0), sweep_point("c", 60, 20.0),
           sweep_point("d", 50, float("nan")), {"params": 120, "ppl": 9.0}]
    front = pareto_front(pts, "params", "ppl")
    assert front == [3, 5, 2, 0, 7]  # by params; twins (60, 20) both kept; (80, 12) and (90, 11) dominated
    # brute force: nothing on the front is dominated, everything off it is
    vals = [(p["params"], p["ppl"]) if isinstance(p, dict) else (p.params, p.ppl) for p in pts]

    def dominated(i):
        return any(a <= vals[i][0] and b <= vals[i][1] and (a, b) != vals[i] for a, b in vals if not math.isnan(b))
    assert all(not dominated(i) for i in front)
    assert all(dominated(i) for i in range(7) if i not in front and not math.isnan(vals[i][1]))
    # higher is better for speed; points without a measured speed are left out
    fast = [sweep_point("a", 100, 10.0, ms=10.0), sweep_point("a", 80, 12.0, ms=5.0),
            sweep_point("b", 80, 11.0, ms=8.0), sweep_point("b", 70, 13.0)]
    assert tokens_per_s(fast[1]) == 200.0 and tokens_per_s(fast[3]) is None
    assert pareto_front(fast, tokens_per_s, "ppl", x_better="high") == [0, 2, 1]
    assert pareto_front([], "params", "ppl") == []
    with pytest.raises(ValueError):
        pareto_front(fast, "params", "ppl", x_better="small")


# ---- the Inspect page ---------------------------------------------------------------------------------------------



def chart_keys(at: AppTest) -> set[str]:
    return {c.proto.id.rsplit("-", 1)[-1] for c in at.get("plotly_chart")}


def open_page(page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=90)
    clean(at.run())
    clean(at.run())
    return clean(at.switch_page(f"pages/{page}.py").run())


def test_inspect_page_shows_patterns_contributions_effects_and_the_plan(tiny_app):
    at = open_page("inspect")
    assert at.title[0].value == "Inspect"
    assert {"ins_attention", "ins_head_norm", "ins_layer_norm"} <= chart_keys(at)
    assert not at.dataframe and "removes nothing" in at.info[0].value  # the plan is empty
    at.text_area(key="ins_prompt").set_value("abcdef")
    clean(at.run())
    assert at.select_slider(key="ins_pos").value == 5  # the last position with a next token (BOS + 6 tokens)
    at.selectbox(key="ins_layer").set_value(3)
    at.selectbox(key="ins_head").set_value(4)
    clean(at.run())
    clean(at.button(key="ins_effects_run").click().run())
    assert {"ins_eff_head", "ins_eff_kv", "ins_eff_mlp"} <= chart_keys(at)
    eff = at.session_state["inspect_effects"][1]
    assert eff.position == 5 and eff.head.shape == (4, 6) and not eff.head.isnan().any()
    # a plan: the table of tokens whose loss changed most, from the masked preview
    model = state.shared().models[state.ModelSpec(state.TINY).key].model
    at.session_state["plan"] = Plan.empty(model).with_units("kv", 0, [1]).with_units("head", 2, [0, 3])
    clean(at.run())
    dense_top, pruned_top, table = (d.value for d in at.dataframe)  # AppTest keeps no dataframe keys
    assert len(table) == 6 and list(table["Δ loss"].abs()) == sorted(table["Δ loss"].abs(), reverse=True)
    assert list(dense_top.columns) == ["dense: next token", "p"] and len(pruned_top) == 5


def test_inspect_page_says_what_to_do_with_an_empty_prompt(tiny_app):
    at = open_page("inspect")
    at.text_area(key="ins_prompt").set_value("  ")
    at.run()
    assert not at.exception and "empty" in at.error[0].value


def test_importance_linked_views_rank_the_selected_unit_under_every_criterion(tiny_app):
    at = open_page("importance")
    at.pills(key="imp_criteria").set_value(["magnitude", "wanda_sp"])
    clean(at.run())
    at.number_input(key="imp_cal_n").set_value(4)
    at.selectbox(key="imp_cal_seq").set_value(64)
    clean(at.button(key="imp_run").click().run())
    imaps = at.session_state["imaps"]
    assert {"imp_fig_head_magnitude", "imp_fig_head_wanda_sp", "imp_hist_fig_head"} <= chart_keys(at)
    at.number_input(key="imp_sel_head_layer").set_value(2)
    at.number_input(key="imp_sel_head_index").set_value(5)
    clean(at.run())
    table = at.dataframe[1].value  # after the estimate table: the query-head tab's selected unit
    want = unit_scores(imaps, 2, "head", 5)
    assert list(table["rank"]) == [r["rank"] for r in want] and len(table) == 2
    at.toggle(key="imp_linked").set_value(True)
    clean(at.run())
    assert {"imp_linked_head", "imp_linked_kv", "imp_linked_channel"} <= chart_keys(at)
    assert "imp_fig_head_magnitude" not in chart_keys(at)


def test_linked_maps_share_axes_colour_and_clickable_cells():
    from pruneviz.ui import analysis, linked

    model = tiny_model("llama")
    g = geometry_of(model)
    panels = []
    for j in range(2):
        values, raw, removed, layers, cells = analysis.heatmap_data(torch.rand(4, 6).numpy() * (j + 1), "head",
                                                                    None, "score")
        panels.append(dict(title=f"m{j}", values=values, raw=raw, removed=removed, layers=layers, cells=cells))
    fig = linked.linked_maps_figure(panels, unit_label="query head", colorbar="score")
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert [t.coloraxis for t in heat] == ["coloraxis", "coloraxis"]
    assert fig.layout.coloraxis.cmax == pytest.approx(max(float(p["values"].max()) for p in panels))
    assert fig.layout.xaxis2.matches == "x" and fig.layout.yaxis2.matches == "y"
    cells = [t for t in fig.data if t.name == "cells"]
    assert len(cells) == 2 and cells[1].xaxis == "x2" and len(cells[1].customdata) == g.n_layers * g.n_heads
    own = linked.linked_maps_figure(panels, unit_label="query head", colorbar="score", shared_colour=False)
    assert all(t.coloraxis is None and t.showscale is False for t in own.data if t.type == "heatmap"
               and t.name == "scores")


def test_evaluate_pareto_view_marks_the_front_and_the_current_plan(tiny_app):
    from pruneviz.data import text_hash
    from pruneviz.ui import pareto_panel

    at = open_page("evaluate")
    model = state.shared().models[state.ModelSpec(state.TINY).key].model
    sha = text_hash(state.default_texts()[1])
    plans = [Plan.empty(model).with_units("kv", 0, [1]), Plan.empty(model).with_units("head", 1, [0, 3]),
             Plan.empty(model).with_units("channel", 2, range(10))]
    points = [SweepPoint(c, r, "width", p.param_count(model), ppl, "quick", sha, 100, p, ms_per_token=ms, kl_mean=kl)
              for (c, r, ppl, ms, kl), p in zip([("magnitude", 0.1, 20.0, 4.0, 0.1), ("magnitude", 0.2, 30.0, 3.0, 0.2),
                                                 ("wanda_sp", 0.1, 25.0, 5.0, 0.3)], plans)]
    at.session_state["imaps"] = {"magnitude": compute(model, "magnitude")}  # the sweep section needs a map
    at.session_state["sweep"] = points
    at.session_state["plan"] = plans[1]
    clean(at.run())
    assert "ev_pareto_fig" in chart_keys(at)
    assert at.segmented_control(key="ev_pareto_x").options == ["parameters", "tokens/s"]
    at.segmented_control(key="ev_pareto_x").set_value("tokens/s")
    at.segmented_control(key="ev_pareto_y").set_value("KL to dense")
    clean(at.run())
    assert pareto_panel.current_points(points, plans[1], "quick", None) == [points[1]]
    front = pareto_front(points, tokens_per_s, "kl_mean", x_better="high")
    assert front == [0, 1]  # 250 tokens/s at KL 0.1 and 333 at 0.2; 200 at KL 0.3 is dominated
    caption = next(c.value for c in at.caption if c.value.startswith("On the front"))
    assert "magnitude · width 10%, magnitude · width 20%" in caption and "wanda_sp" not in caption


def test_pareto_figure_draws_the_front_and_rings_the_current_plan():
    from pruneviz.ui import linked

    pts = [sweep_point("a", 100e6, 10.0), sweep_point("a", 80e6, 12.0), sweep_point("b", 80e6, 11.0)]
    fig = linked.pareto_figure(pts, "params", "ppl", x_label="M", y_label="ppl", current=[pts[1]], x_scale=1e6)
    by_name = {t.name: t for t in fig.data}
    assert set(by_name) == {"a · width", "b · width", "Pareto front", "current plan"}
    assert list(by_name["Pareto front"].x) == [80.0, 100.0] and list(by_name["Pareto front"].y) == [11.0, 10.0]
    assert list(by_name["current plan"].x) == [80.0] and list(by_name["current plan"].y) == [12.0]
