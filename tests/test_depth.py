"""Depth criteria: leave-one-out perplexity, Block Influence, iterative removal (hand checks on tiny models)."""
import math

import pytest
import torch
import torch.nn.functional as F

from pruneviz.arch import geometry_of
from pruneviz.criteria.depth import _bypassed, _CosineMeter, calibration_ppl, iterative_block_removal
from pruneviz.errors import CriterionError, PlanError
from pruneviz.importance import Calibration, Cancelled, compute, get, make_options
from pruneviz.plan import Plan
from pruneviz.surgery import apply_plan, masking
from pruneviz.testing import tiny_model

CALIB = Calibration(torch.randint(4, 96, (6, 24), generator=torch.Generator().manual_seed(0)), "random", seed=0)


def identity_blocks(model, blocks):
    """Zero the output projections of ``blocks``: each becomes the exact identity on the residual stream."""
    with torch.no_grad():
        for b in blocks:
            layer = model.model.layers[b]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


@pytest.fixture
def llama6():
    return tiny_model("llama", num_hidden_layers=6)


# ---- perplexity ------------------------------------------------------------------------------------------------------

def test_calibration_ppl_is_exp_of_the_mean_token_nll(llama6):
    with torch.no_grad():
        loss = llama6(input_ids=CALIB.tokens, labels=CALIB.tokens).loss  # mean over all predicted tokens
    assert calibration_ppl(llama6, CALIB, batch_size=4) == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_removing_an_identity_block_gives_exactly_the_dense_ppl(llama6):
    identity_blocks(llama6, [2])
    imap = compute(llama6, "ppl", CALIB)
    assert imap.extras["ppl_without_block"][2] == imap.extras["dense_ppl"]  # bit for bit (float64 extras)
    assert float(imap.blocks[2]) == pytest.approx(imap.extras["dense_ppl"], rel=1e-7)  # the map is float32
    others = [float(imap.blocks[b]) for b in (0, 1, 3, 4, 5)]
    assert all(abs(p - imap.extras["dense_ppl"]) > 1e-3 for p in others)  # real blocks do change the PPL


def test_masked_block_ppl_equals_physical_removal(llama6):
    imap = compute(llama6, "ppl", CALIB)
    pruned = apply_plan(llama6, Plan.empty(llama6).with_units("block", None, [3]))
    assert float(imap.blocks[3]) == pytest.approx(calibration_ppl(pruned, CALIB), rel=1e-4)
    assert imap.extras["ppl_without_block"][3] == pytest.approx(float(imap.blocks[3]), rel=1e-6)


def test_ppl_reports_progress_per_block_and_can_be_cancelled(llama6):
    seen = []
    compute(llama6, "ppl", CALIB, progress=lambda f, msg: seen.append((f, msg)))
    assert sum("block" in m for _, m in seen) == 6
    assert [f for f, _ in seen] == sorted(f for f, _ in seen)
    with pytest.raises(Cancelled):
        compute(llama6, "ppl", CALIB, cancel=lambda: True)
    cost = get("ppl").estimate(geometry_of(llama6), 0, 6, 24, make_options("ppl"))
    assert cost["forward_tokens"] == 7 * 6 * 24 and not cost["backward"]  # dense + one pass per block


def test_ppl_with_removed_blocks_scores_the_rest_on_the_shallower_model(llama6):
    imap = compute(llama6, "ppl", CALIB, make_options("ppl", removed_blocks=(1,)))
    assert math.isnan(float(imap.blocks[1]))
    both = Plan.empty(llama6).with_units("block", None, [1, 4])
    assert float(imap.blocks[4]) == pytest.approx(calibration_ppl(apply_plan(llama6, both), CALIB), rel=1e-4)
    assert imap.extras["base_ppl"] != imap.extras["dense_ppl"]
    with pytest.raises(CriterionError, match="at least two"):
        compute(llama6, "ppl", CALIB, make_options("ppl", removed_blocks=(0, 1, 2, 3, 4)))


# ---- block influence -------------------------------------------------------------------------------------------------

def test_block_influence_matches_hidden_states_by_hand(llama6):
    imap = compute(llama6, "block_influence", CALIB)
    with torch.no_grad():
        hs = llama6(input_ids=CALIB.tokens, output_hidden_states=True).hidden_states  # L+1 x [N, T, D]
    for b in range(5):  # the last entry has the final norm applied, so the last block is not comparable
        cos = F.cosine_similarity(hs[b].float(), hs[b + 1].float(), dim=-1)  # [N, T]
        assert float(imap.blocks[b]) == pytest.approx(1 - float(cos.mean()), rel=1e-4, abs=1e-6)
    assert imap.extras["tokens"] == CALIB.tokens.numel()


def test_identity_block_has_zero_influence_and_ranks_last(llama6):
    identity_blocks(llama6, [3])
    imap = compute(llama6, "block_influence", CALIB)
    assert abs(float(imap.blocks[3])) < 1e-6
    assert int(torch.argmin(imap.blocks)) == 3 and float(imap.blocks.sort().values[1]) > 1e-3
    ang = compute(llama6, "block_influence", CALIB, make_options("block_influence", angular=True))
    assert int(torch.argmin(ang.blocks)) == 3 and torch.equal(ang.blocks.argsort(), imap.blocks.argsort())


def test_hook_reads_kwarg_inputs_and_tuple_outputs(llama6):
    meter = _CosineMeter(llama6, skip=(), skip_first=False, angular=False)
    try:
        h = torch.randn(2, 5, 48)
        meter._hook(0)(None, (), {"hidden_states": h}, (h, None))  # identical: distance 0
        meter._hook(1)(None, (h,), {}, -h)  # opposite: 1 - cos = 2
    finally:
        meter.close()
    assert meter.sums[0].item() == pytest.approx(0, abs=1e-5) and meter.counts[0] == 10
    assert meter.sums[1].item() / 10 == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize("family", ["opt", "gpt2", "bloom", "qwen3"])
def test_depth_criteria_run_on_every_family(family):
    model = tiny_model(family)
    n = len(compute(model, "block_influence", CALIB).blocks)
    bi = compute(model, "block_influence", CALIB).blocks
    ppl = compute(model, "ppl", CALIB).blocks
    assert bi.shape == ppl.shape == (n,)
    assert torch.isfinite(bi).all() and ((bi >= 0) & (bi <= 2)).all() and (ppl > 1).all()


# ---- iterative removal -----------------------------------------------------------------------------------------------

def test_iterative_removal_rescores_after_each_removal(llama6):
    identity_blocks(llama6, [2, 4])
    plan, maps = iterative_block_removal(llama6, "block_influence", CALIB, 2)
    first = plan.provenance["removal_order"][0]
    assert set(plan.blocks) == {2, 4} and len(maps) == 2
    assert math.isnan(float(maps[1].blocks[first])) and not torch.isnan(maps[0].blocks).any()
    plan.validate(llama6, physical=True)
    prov = plan.provenance
    assert prov["strategy"] == "iterative_depth" and prov["criterion"] == "block_influence"
    assert prov["params"]["total"]["after"] == plan.param_count(llama6)


def test_iterative_ppl_picks_the_lowest_ppl_block_each_step(llama6):
    plan, maps = iterative_block_removal(llama6, "ppl", CALIB, 2)
    order = plan.provenance["removal_order"]
    for step, imap in enumerate(maps):
        live = [b for b in range(6) if b not in order[:step]]
        assert order[step] == min(live, key=lambda b: (float(imap.blocks[b]), b))
    assert maps[1].extras["base_ppl"] == pytest.approx(float(maps[0].blocks[order[0]]), rel=1e-6)


def test_iterative_removal_respects_the_plus_rule():
    model = identity_blocks(tiny_model("llama", num_hidden_layers=10), [0, 1, 6, 9])
    plan, _ = iterative_block_removal(model, "block_influence", CALIB, 3, plus_rule=True)
    assert plan.provenance["removal_order"][0] == 6
    assert not set(plan.blocks) & {0, 1, 2, 3, 8, 9}
    free, _ = iterative_block_removal(model, "block_influence", CALIB, 2)
    assert set(free.blocks) <= {0, 1, 6, 9}
    with pytest.raises(PlanError, match=r"\+ rule"):
        iterative_block_removal(model, "block_influence", CALIB, 5, plus_rule=True)


def test_iterative_works_with_criteria_without_removed_blocks_option(llama6):
    plan, maps = iterative_block_removal(llama6, "magnitude", None, 2)
    order = plan.provenance["removal_order"]
    assert order[0] == int(torch.argmin(maps[0].blocks)) and math.isnan(float(maps[1].blocks[order[0]]))
    plan, maps = iterative_block_removal(llama6, "taylor", CALIB, 2)  # gradients through bypassed blocks
    order = plan.provenance["removal_order"]
    assert order[1] == min((b for b in range(6) if b != order[0]), key=lambda b: float(maps[1].blocks[b]))
    assert not torch.equal(maps[0].blocks[[order[1]]], maps[1].blocks[[order[1]]])  # re-scored, not reused


def test_bypass_is_the_same_model_as_masking(llama6):
    with torch.no_grad():
        with _bypassed(llama6, [1, 3]):
            bypassed = llama6(input_ids=CALIB.tokens).logits
        with masking(llama6, Plan.empty(llama6).with_units("block", None, [1, 3])) as view:
            masked = view(input_ids=CALIB.tokens).logits
    assert torch.equal(bypassed, masked)


def test_iterative_needs_block_scores(llama6):
    with pytest.raises(CriterionError, match="does not score blocks"):
        iterative_block_removal(llama6, "wanda_sp", CALIB, 1)
