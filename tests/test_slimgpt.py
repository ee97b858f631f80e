"""SlimGPT: OBS algebra against least squares, schedules, and the solver/compensator on tiny models."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from pruneviz import obs, schedules
from pruneviz.arch import adapter_for, geometry_of, get_path
from pruneviz.criteria import slimgpt as sg
from pruneviz.criteria.capture import advance, capture_stream
from pruneviz.errors import CriterionError
from pruneviz.importance import Calibration, compute
from pruneviz.plan import Plan
from pruneviz.surgery import apply_plan, masked_model
from pruneviz.testing import tiny_model


def _toy(rows=5, cols=12, n=64, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(cols, n, generator=g, dtype=dtype)  # [cols, N]
    X[1] += 0.8 * X[0]  # correlated inputs, so compensation matters
    W = torch.randn(rows, cols, generator=g, dtype=dtype)  # [rows, cols]
    return W, X, 2 * X @ X.T / n  # H = (2/N) X Xᵀ


def _least_squares(W, X, keep):
    """argmin_W' ‖W X − W' X_keep‖²  (the exact refit of the surviving columns)."""
    Xk = X[keep]  # [k, N]
    return (W @ X @ Xk.T) @ torch.linalg.inv(Xk @ Xk.T)  # [rows, k]


# ---- (a) OBS algebra -------------------------------------------------------------------------------------------------

def test_column_obs_equals_least_squares_refit():
    W, X, H = _toy()
    S = torch.tensor([0, 3, 7])
    keep = [c for c in range(W.shape[1]) if c not in S.tolist()]
    new = obs.obs_remove(W, torch.linalg.inv(H), S)
    assert torch.all(new[:, S] == 0)
    assert torch.allclose(new[:, keep], _least_squares(W, X, keep), atol=1e-4)
    assert torch.allclose(obs.obs_remove_sequential(W, torch.linalg.inv(H), S), new, atol=1e-10)


def test_greedy_steps_with_decoupling_equal_least_squares_in_fp32():
    W, X, H = _toy(rows=6, cols=16, n=200, seed=1)
    prob = obs.ObsProblem.build(W.float(), H.float(), percdamp=0.0)
    removed = obs.greedy_columns(prob, [3, 2, 1])
    blocks = torch.arange(16).view(8, 2)
    free = torch.tensor([not set(b.tolist()) & set(removed) for b in blocks])
    picked = obs.greedy_blocks(prob, blocks, 2, eligible=free)
    gone = set(removed) | {c for b in picked for c in blocks[b].tolist()}
    keep = [c for c in range(16) if c not in gone]
    assert len(gone) == 10 and torch.all(prob.W[:, sorted(gone)] == 0)
    assert torch.allclose(prob.W[:, keep].double(), _least_squares(W, X, keep), atol=1e-4)


def test_closed_form_error_is_the_output_error():
    W, X, H = _toy()
    S = torch.tensor([2, 5])
    new = obs.obs_remove(W, torch.linalg.inv(H), S)
    out_err = ((W - new) @ X).pow(2).sum() / X.shape[1]  # ‖ΔW X‖² / N
    assert torch.allclose(obs.block_obs_error(W, torch.linalg.inv(H), S), out_err, rtol=1e-8)


def test_hessian_accumulates_slimgpt_scaling():
    x = torch.randn(5, 7, 4)  # [b, T, in]
    acc = obs.Hessian(4, "cpu")
    acc.add(x[:2])
    acc.add(x[2:])
    flat = x.reshape(-1, 4).double()
    assert acc.n == 5
    assert torch.allclose(acc.H.double(), 2 * flat.T @ flat / 5, atol=1e-5)


def test_dead_inputs_cost_nothing_and_keep_h_invertible():
    W, X, H = _toy(cols=6)
    H[4, :] = H[:, 4] = 0  # input 4 never fires
    prob = obs.ObsProblem.build(W, H, percdamp=0.01)
    err = prob.column_errors(prob.hinv())
    assert err[4] == 0 and bool((err[[0, 1, 2, 3, 5]] > 0).all())
    assert obs.greedy_columns(prob, [1]) == [4]
    assert torch.equal(prob.W[:, [0, 1, 2, 3, 5]], W[:, [0, 1, 2, 3, 5]])  # decoupled: nothing to compensate


def test_damping_is_percdamp_times_mean_diagonal():
    W, X, H = _toy(cols=4)
    prob = obs.ObsProblem.build(W, H, percdamp=0.1)
    assert torch.allclose(prob.H - H, 0.1 * H.diagonal().mean() * torch.eye(4, dtype=H.dtype))


# ---- (b) grouped Cholesky == block closed form -----------------------------------------------------------------------

def test_grouped_cholesky_head_error_equals_block_closed_form():
    W, X, H = _toy(rows=4, cols=12, n=80, seed=2)
    hinv = torch.linalg.inv(H)
    blocks = torch.arange(12).view(3, 4)
    got = obs.block_errors(W, hinv, blocks, exact=True)
    want = torch.stack([obs.block_obs_error(W, hinv, b) for b in blocks])
    assert torch.allclose(got, want, rtol=1e-8)
    assert not torch.allclose(obs.block_errors(W, hinv, blocks, exact=False), want)  # the paper's shortcut


def test_paper_shortcut_is_exact_for_uncorrelated_block():
    W, _, _ = _toy(rows=3, cols=6)
    hinv = torch.diag(torch.rand(6, dtype=W.dtype) + 0.5)
    blocks = torch.arange(6).view(2, 3)
    assert torch.allclose(obs.block_errors(W, hinv, blocks, exact=False), obs.block_errors(W, hinv, blocks))


def test_dynamic_group_sizes_match_official_schedule():
    llama7b_20 = obs.dgs_sizes(2202)
    assert llama7b_20[:4] == [845, 166, 64, 64] and sum(llama7b_20) == 2202 and len(llama7b_20) == 21
    assert obs.dgs_sizes(5504)[:4] == [1024, 992, 240, 64]
    assert obs.dgs_sizes(307) == [64, 64, 64, 64, 51]  # SmolLM's MLP (1536) at 20%
    assert obs.dgs_sizes(10, min_group=1) == [1] * 10


# ---- (c) incremental ratio -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", sg.SCHEDULES)
@pytest.mark.parametrize("target", [0.1, 0.2, 0.5])
def test_layer_ratios_mean_is_target(schedule, target):
    r = schedules.layer_ratios(30, target, schedule)
    assert len(r) == 30 and math.isclose(sum(r) / 30, target, abs_tol=1e-9)
    assert all(0 <= x <= 0.9 for x in r)


def test_log_increase_uses_log_n_and_is_monotone():
    r = schedules.layer_ratios(30, 0.2, "log_increase", r0=0.0625)
    assert all(a < b for a, b in zip(r, r[1:]))
    assert math.isclose(r[0], 0.0625) and abs(r[-1] - 0.2504) < 5e-4  # log(32) would give 0.2489 here
    assert math.isclose(r[14], 0.0625 + (r[-1] - 0.0625) * math.log(15) / math.log(30))
    assert schedules.layer_ratios(30, 0.2, "log_decrease", r0=0.0625) == r[::-1]


def test_paper_example_for_32_layers():
    r = schedules.schedule_curve(32, 0.0625, 0.25, "log_increase")
    assert math.isclose(r[0], 0.0625) and math.isclose(r[-1], 0.25)
    assert abs(sum(r) / 32 - 0.2004) < 1e-4
    assert math.isclose(schedules.layer_ratios(32, 0.2)[0], 0.0625)  # default r0 = 0.3125 · target


def test_clipped_ratios_still_meet_the_target():
    r = schedules.layer_ratios(12, 0.8, "linear_increase", r0=0.5, max_ratio=0.9)
    assert max(r) <= 0.9 + 1e-12 and math.isclose(sum(r) / 12, 0.8, abs_tol=1e-6)
    with pytest.raises(Exception):
        schedules.layer_ratios(12, 0.95, max_ratio=0.9)


# ---- (d)-(g) solver on tiny models -----------------------------------------------------------------------------------

def _calib(n=16, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randint(4, 96, (n, t), generator=g), "random", "", seed)


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def llama_runs():
    model, calib = tiny_model("llama"), _calib()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    runs = {unit: sg.slimgpt_prune(model, calib, 0.4, schedule="uniform", attn_unit=unit, attn_rounding="nearest")
            for unit in ("kv", "head")}
    return model, calib, state, runs


@pytest.mark.parametrize("unit", ["kv", "head"])
def test_solver_plan_is_physical_and_compensation_helps(llama_runs, unit):
    model, calib, _, runs = llama_runs
    plan, pruned = runs[unit]
    plan.validate(model, physical=True)
    counts = plan.counts()
    assert plan.compensation == "slimgpt" and counts["channel"] == 4 * 16  # round(40 · 0.4) per layer
    assert (counts["kv"], counts["head"]) == ((4, 12) if unit == "kv" else (0, 8))
    assert pruned.generate(calib.tokens[:1, :5], max_new_tokens=4, do_sample=False).shape == (1, 9)
    dense = _logits(model, calib.tokens)
    err = (_logits(pruned, calib.tokens) - dense).pow(2).mean()
    masked = (_logits(masked_model(model, replace(plan, compensation=None)), calib.tokens) - dense).pow(2).mean()
    assert err < 0.7 * masked


@pytest.mark.parametrize("unit", ["kv", "head"])
def test_compensation_only_rerun_reproduces_solver(llama_runs, unit):
    model, calib, _, runs = llama_runs
    plan, pruned = runs[unit]
    again = apply_plan(model, Plan.from_json(plan.to_json()), calibration=calib.tokens)
    assert torch.allclose(_logits(again, calib.tokens), _logits(pruned, calib.tokens), atol=1e-5)
    assert again.config.pruneviz_plan["compensation"] == "slimgpt"


def test_solver_does_not_mutate_the_model(llama_runs):
    model, _, state, _ = llama_runs
    now = model.state_dict()
    assert state.keys() == now.keys() and all(torch.equal(state[k], now[k]) for k in state)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_solver_is_deterministic(llama_runs):
    model, calib, _, runs = llama_runs
    plan, pruned = sg.slimgpt_prune(model, calib, 0.4, schedule="uniform", attn_unit="kv", attn_rounding="nearest")
    assert plan == runs["kv"][0] and plan.sha256() == runs["kv"][0].sha256()
    for a, b in zip(pruned.state_dict().values(), runs["kv"][1].state_dict().values()):
        assert torch.equal(a, b)


def test_head_mode_removes_equal_heads_per_group():
    model = tiny_model("qwen3")  # 6 heads in 3 KV groups of 2
    plan, _ = sg.slimgpt_prune(model, _calib(), 0.5, schedule="uniform", attn_unit="head")
    g = plan.geometry
    for layer in range(g.n_layers):
        per_group = [len(set(plan.removed("head", layer)) & set(g.heads_of(grp))) for grp in range(g.n_kv)]
        assert per_group == [1, 1, 1]


def test_first_pick_matches_dense_scores():
    """Layer 0 sees dense inputs, so the solver's first KV group is the dense criterion's least important one."""
    model, calib = tiny_model("llama"), _calib()
    scores = compute(model, "slimgpt", calib)
    plan, _ = sg.slimgpt_prune(model, calib, 0.3, schedule="uniform", attn_unit="kv", attn_rounding="nearest")
    assert plan.removed("kv", 0) == (int(scores.kv[0].argmin()),)


@pytest.mark.parametrize("ratio, down, nearest", [(0.3, 0, 1), (0.49, 0, 1), (0.5, 1, 1), (0.74, 1, 1)])
def test_attention_rounds_down_by_default(ratio, down, nearest):
    """2 KV groups: a group goes only where the layer ratio pays for a whole one (0.5); channels are unchanged."""
    g = geometry_of(tiny_model("llama"))
    assert g.n_kv == 2
    default, paper = sg.solver_task(g, ratio, "kv"), sg.solver_task(g, ratio, "kv", "nearest")
    assert (default.kv, paper.kv) == (down, nearest) and default.channels == paper.channels
    heads = sg.solver_task(g, ratio, "head")
    assert heads.head_quota == int(g.group_size * ratio + 1e-9)
    with pytest.raises(CriterionError, match="attn_rounding"):
        sg.slimgpt_prune(tiny_model("llama"), _calib(n=2, t=8), 0.2, attn_rounding="up")


@pytest.mark.parametrize("family", ["opt", "gpt2", "bloom", "qwen2"])
def test_other_families_run_and_rerun(family):
    model, calib = tiny_model(family), _calib(n=8, t=16)
    plan, pruned = sg.slimgpt_prune(model, calib, 0.3, schedule="linear_increase")
    plan.validate(model, physical=True)
    again = apply_plan(model, plan, calibration=calib.tokens)
    assert torch.allclose(_logits(again, calib.tokens), _logits(pruned, calib.tokens), atol=1e-5)


def test_edited_plan_reruns_the_solver_for_its_units():
    model, calib = tiny_model("llama"), _calib()
    plan, pruned = sg.slimgpt_prune(model, calib, 0.3, schedule="uniform")
    edited = plan.toggled("channel", 1, plan.removed("channel", 1)[0]).toggled("block", None, 2)
    out = apply_plan(model, edited, calibration=calib.tokens)
    assert out.config.num_hidden_layers == 3
    masked = masked_model(model, replace(edited, compensation=None))
    dense = _logits(model, calib.tokens)
    assert (_logits(out, calib.tokens) - dense).pow(2).mean() < (_logits(masked, calib.tokens) - dense).pow(2).mean()


def test_bf16_model_keeps_dtype_and_runs():
    model = tiny_model("llama", dtype=torch.bfloat16)
    plan, pruned = sg.slimgpt_prune(model, _calib(n=8, t=16), 0.3, exact_channels=True)
    assert next(pruned.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(_logits(pruned, _calib(n=2, t=8).tokens).float()).all()


def test_sliding_window_layers_get_their_own_masks():
    model = tiny_model("qwen2", layer_types=["full_attention", "sliding_attention"] * 2, sliding_window=4,
                       use_sliding_window=True)
    tokens = _calib(n=4, t=16).tokens
    layers = adapter_for(model).layers(model)
    seen = []
    handle = layers[-1].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    _logits(model, tokens)
    handle.remove()
    stream = capture_stream(model, tokens, batch_size=2)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            advance(layer, i, stream)
    assert torch.allclose(torch.cat(stream.hidden), seen[0], atol=1e-6)


# ---- the dense criterion ---------------------------------------------------------------------------------------------

def test_criterion_scores_dense_obs_errors():
    model, calib = tiny_model("llama"), _calib()
    adapter = adapter_for(model)
    with torch.no_grad():  # a head with zero output columns costs nothing to remove
        get_path(adapter.layers(model)[1], adapter.attn_out).weight[:, 8:16] = 0
    m = compute(model, "slimgpt", calib)
    g = m.geometry
    assert m.heads.shape == (g.n_layers, g.n_heads) and m.kv.shape == (g.n_layers, g.n_kv)
    assert m.channels.shape == (g.n_layers, g.n_channels) and bool((m.channels >= 0).all())
    assert m.heads[1, 1] == 0 and bool((m.heads[1, [0, 2, 3, 4, 5]] > 0).all())
    assert bool((m.kv >= m.heads.view(g.n_layers, g.n_kv, -1).max(-1).values - 1e-6).all())
    assert m.meta["calibration"]["samples"] == 16 and "OBS error" in m.meta["higher_is"]


def test_stored_options_drive_the_rerun():
    model, calib = tiny_model("mistral"), _calib(n=8, t=16)
    plan, pruned = sg.slimgpt_prune(model, calib, 0.3, attn_unit="head", percdamp=0.1, head_error="paper",
                                    exact_channels=True)
    stored = plan.provenance["slimgpt_options"]
    assert stored["percdamp"] == 0.1 and stored["head_error"] == "paper" and stored["exact_channels"] is True
    assert plan.provenance["calibration"]["samples"] == 8 and len(plan.provenance["layer_ratios"]) == 4
    again = apply_plan(model, plan, calibration=calib.tokens)
    assert torch.allclose(_logits(again, calib.tokens), _logits(pruned, calib.tokens), atol=1e-5)
    other = apply_plan(model, plan.with_provenance(slimgpt_options={"percdamp": 10.0}), calibration=calib.tokens)
    assert not torch.allclose(_logits(other, calib.tokens), _logits(pruned, calib.tokens), atol=1e-5)


def test_progress_and_cancel():
    from pruneviz.importance import Cancelled

    seen = []
    sg.slimgpt_prune(tiny_model("gpt2"), _calib(n=4, t=8), 0.2, progress=lambda f, msg: seen.append(f))
    assert len(seen) == 3 and seen == sorted(seen)
    with pytest.raises(Cancelled):
        sg.slimgpt_prune(tiny_model("gpt2"), _calib(n=4, t=8), 0.2, cancel=lambda: True)


def test_criterion_on_multi_head_attention_family():
    m = compute(tiny_model("opt"), "slimgpt", _calib(n=8, t=16))
    assert torch.allclose(m.kv, m.heads)  # one head per "group"
    assert bool((m.heads > 0).all())
