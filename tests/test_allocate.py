"""Allocation: hand-computed toy maps -> exact removed units per strategy; accounting; GQA; property tests."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pruneviz import allocate as A
from pruneviz.allocate import (
    Target,
    allocate,
    allocators,
    apportion,
    closest_prefix,
    get_allocator,
    plan_from_ratios,
    register_allocator,
    unit_costs,
)
from pruneviz.arch import geometry_of
from pruneviz.errors import PlanError
from pruneviz.importance import ImportanceMap
from pruneviz.plan import dense_params
from pruneviz.surgery import apply_plan
from pruneviz.testing import tiny_model

LLAMA = tiny_model("llama")  # 4 layers, 6 query heads in 2 KV groups of 3, 40 channels
DEEP = tiny_model("llama", num_hidden_layers=10)
OPT = tiny_model("opt")  # multi-head: 3 layers, 4 heads, 40 channels
G = geometry_of(LLAMA)
COSTS = unit_costs(LLAMA)


def pattern(l, n=40, mult=7):
    """Channel scores of layer l: a permutation of 0..n-1 (value v sits at channel 23*(v-l) mod 40)."""
    return torch.tensor([float((mult * c + l) % n) for c in range(n)])


def lowest_channels(l, k):
    """The k channels of pattern(l) with the lowest scores, by inverting 7c + l = v (mod 40): c = 23 (v - l)."""
    return tuple(sorted((23 * (v - l)) % 40 for v in range(k)))


def toy_map(model=LLAMA, blocks=None, **maps):
    g = geometry_of(model)
    base = dict(heads=torch.arange(g.n_layers * g.n_heads, dtype=torch.float).view(g.n_layers, g.n_heads),
                channels=torch.stack([pattern(l, g.n_channels) for l in range(g.n_layers)]))
    base.update(maps)
    return ImportanceMap("toy", g, blocks=blocks, **{k: v for k, v in base.items() if v is not None})


def ratio_for(model, params):
    return params / dense_params(model, non_embedding=True)


def removed_params(model, plan):
    return dense_params(model, True) - plan.param_count(model, non_embedding=True)


# ---- targets ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio, words", [(0, "removes nothing"), (1, "whole model"),
                                          (1.2, "a ratio of 1.2 would remove more than the model has"),
                                          (-0.1, "negative"), (float("nan"), "not a number")])
def test_target_ratio_out_of_range_is_a_clear_error(ratio, words):
    with pytest.raises(PlanError, match=words) as e:
        Target(ratio)
    assert "between 0 and 1 (exclusive)" in str(e.value)


def test_target_counts_the_stated_parameters():
    assert Target(0.5).budget(LLAMA) == 0.5 * dense_params(LLAMA, True)
    assert Target(0.5, of="total").budget(LLAMA) == 0.5 * dense_params(LLAMA, False)
    with pytest.raises(PlanError, match="non_embedding"):
        Target(0.5, of="blocks")


def test_unit_costs_are_the_parameters_each_unit_owns():
    d, h = G.head_dim, G.hidden  # q rows + o columns; k and v rows; gate, up rows + down column
    assert COSTS.head == 2 * d * h
    assert COSTS.kv == G.group_size * COSTS.head + 2 * d * h
    assert COSTS.channel == 3 * h
    assert COSTS.block == sum(p.numel() for p in LLAMA.model.layers[0].parameters())


# ---- helpers ---------------------------------------------------------------------------------------------------------

def test_closest_prefix_prefers_the_shorter_on_ties():
    assert closest_prefix([3, 3, 3], 4.4) == 1
    assert closest_prefix([3, 3, 3], 4.5) == 1
    assert closest_prefix([3, 3, 3], 4.6) == 2
    assert closest_prefix([3, 3, 3], 100) == 3
    assert closest_prefix([3, 3, 3], 1.4) == 0


def test_apportion_largest_remainder_with_caps():
    assert apportion(10, [1, 1, 2], [5, 5, 5]) == [3, 2, 5]  # quotas 2.5, 2.5, 5: the tie goes to layer 0
    assert apportion(10, [1, 1, 2], [5, 5, 3]) == [4, 3, 3]  # layer 2 capped, its excess re-split
    assert apportion(10, [0, 0, 0], [9, 9, 9]) == [4, 3, 3]
    assert apportion(99, [1, 1], [2, 3]) == [2, 3]


# ---- uniform ---------------------------------------------------------------------------------------------------------

def test_uniform_channels_only_removes_the_k_lowest_in_every_layer():
    k = 5
    plan = allocate(LLAMA, toy_map(), ratio_for(LLAMA, G.n_layers * k * COSTS.channel), "uniform", attn_share=0)
    for l in range(G.n_layers):
        assert plan.removed("channel", l) == lowest_channels(l, k)
        assert plan.removed_heads_all(l) == ()
    assert removed_params(LLAMA, plan) == G.n_layers * k * COSTS.channel


def test_uniform_kv_groups_go_by_their_scores():
    kv = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [5.0, -1.0]])  # layer 2: tie -> group 0
    plan = allocate(LLAMA, toy_map(kv=kv), ratio_for(LLAMA, G.n_layers * COSTS.kv), "uniform", attn_share=1)
    assert [plan.removed("kv", l) for l in range(4)] == [(0,), (1,), (0,), (1,)]
    assert plan.counts()["channel"] == 0


def test_kv_scores_fall_back_to_the_sum_of_the_groups_heads():
    heads = torch.tensor([[1.0, 1, 1, 0, 0, 0]] * 4)  # group 1 sums lower
    heads[2] = torch.tensor([0.0, 0, 0, 1, 1, 1])
    plan = allocate(LLAMA, toy_map(heads=heads), ratio_for(LLAMA, 4 * COSTS.kv), "uniform", attn_share=1)
    assert [plan.removed("kv", l) for l in range(4)] == [(1,), (1,), (0,), (1,)]


def test_head_unit_removes_the_lowest_head_of_every_group():
    heads = torch.tensor([[5.0, 1, 3, 2, 6, 0]] * 4)  # group 0 -> head 1 then 2; group 1 -> head 5 then 3
    imap = toy_map(heads=heads)
    one = allocate(LLAMA, imap, ratio_for(LLAMA, 4 * 2 * COSTS.head), "uniform", attn_share=1, attn_unit="head")
    two = allocate(LLAMA, imap, ratio_for(LLAMA, 4 * 4 * COSTS.head), "uniform", attn_share=1, attn_unit="head")
    for l in range(4):
        assert one.removed("head", l) == (1, 5)
        assert two.removed("head", l) == (1, 2, 3, 5)
        assert one.removed("kv", l) == two.removed("kv", l) == ()
    two.check_gqa()


def test_uniform_proportional_split_and_precision():
    plan = allocate(LLAMA, toy_map(), 0.3, "uniform")
    counts = {(len(plan.removed("kv", l)), len(plan.removed("channel", l))) for l in range(4)}
    assert len(counts) == 1 and plan.is_uniform()  # the same widths in every layer
    target = 0.3 * dense_params(LLAMA, True)
    assert abs(removed_params(LLAMA, plan) - target) <= G.n_layers * COSTS.channel  # one channel per layer


@pytest.mark.parametrize("strategy", ["uniform"])
def test_attention_rounds_down_unless_nearest_is_asked(strategy):
    """Attention's proportional share here is 0.75 of a KV group in every layer: "down" (default) removes none
    and takes the budget from channels; "nearest" removes one per layer. Both land at or under the target."""
    width = 4 * (2 * COSTS.kv + 40 * COSTS.channel)
    share = 2 * COSTS.kv / (2 * COSTS.kv + 40 * COSTS.channel)
    ratio = ratio_for(LLAMA, 0.75 * 4 * COSTS.kv / share)
    assert 0 < ratio * dense_params(LLAMA, True) < width
    down = allocate(LLAMA, toy_map(), ratio, strategy)
    nearest = allocate(LLAMA, toy_map(), ratio, strategy, attn_rounding="nearest")
    assert down.counts()["kv"] == 0 < nearest.counts()["kv"]
    assert down.counts()["channel"] > nearest.counts()["channel"]
    target = ratio * dense_params(LLAMA, True)
    for plan in (down, nearest):
        assert target <= removed_params(LLAMA, plan) < target + 4 * COSTS.channel
    with pytest.raises(PlanError, match="attn_rounding"):
        allocate(LLAMA, toy_map(), ratio, strategy, attn_rounding="up")


# ---- global ----------------------------------------------------------------------------------------------------------

def test_global_raw_scores_take_the_weakest_layer_first():
    channels = torch.stack([pattern(l) + 100 for l in range(4)])
    channels[2] = pattern(2) * 0.01
    plan = allocate(LLAMA, toy_map(channels=channels), ratio_for(LLAMA, 10 * COSTS.channel), "global",
                    attn_share=0, normalize="none")
    assert plan.removed("channel", 2) == lowest_channels(2, 10)
    assert all(plan.removed("channel", l) == () for l in (0, 1, 3))


def test_global_layer_normalisation_ignores_each_layers_scale():
    channels = torch.stack([(pattern(l) + 1) * 10 ** l for l in range(4)])  # same shape, different scales
    plan = allocate(LLAMA, toy_map(channels=channels), ratio_for(LLAMA, 10 * COSTS.channel), "global",
                    attn_share=0, normalize="layer")
    # equal z-scores: values 0 and 1 in every layer, then value 2 in layers 0 and 1 (ties to the lower layer)
    assert [len(plan.removed("channel", l)) for l in range(4)] == [3, 3, 2, 2]
    assert plan.removed("channel", 0) == lowest_channels(0, 3)
    assert plan.removed("channel", 3) == lowest_channels(3, 2)
    raw = allocate(LLAMA, toy_map(channels=channels), ratio_for(LLAMA, 10 * COSTS.channel), "global",
                   attn_share=0, normalize="none")
    assert raw.removed("channel", 0) == lowest_channels(0, 10)  # raw: the smallest scale loses everything


def test_global_pooled_ranks_attention_and_mlp_together():
    kv = torch.full((4, 2), 100.0)
    kv[3, 0] = -100.0
    channels = torch.stack([pattern(0)] * 4)  # value 0 at channel 0 in every layer
    plan = allocate(LLAMA, toy_map(kv=kv, channels=channels), ratio_for(LLAMA, COSTS.kv + 2 * COSTS.channel),
                    "global", normalize="none")
    assert plan.removed("kv", 3) == (0,)
    assert [plan.removed("channel", l) for l in range(4)] == [(0,), (0,), (), ()]


def test_global_keeps_one_unit_per_layer():
    kv = torch.tensor([[-100.0, -99.0]] + [[100.0, 100.0]] * 3)
    plan = allocate(LLAMA, toy_map(kv=kv), ratio_for(LLAMA, 2 * COSTS.kv), "global", attn_share=1,
                    normalize="none")
    assert plan.removed("kv", 0) == (0,)  # group 1 of layer 0 must stay; the next lowest goes elsewhere
    assert plan.counts()["kv"] == 2


# ---- incremental -----------------------------------------------------------------------------------------------------

def test_incremental_removes_more_in_later_layers():
    flat = toy_map(channels=torch.stack([pattern(l) for l in range(10)]),
                   heads=torch.zeros(10, 6), model=DEEP)
    plan = allocate(DEEP, flat, 0.25, "incremental", attn_share=0)
    counts = [len(plan.removed("channel", l)) for l in range(10)]
    assert counts == sorted(counts) and counts[-1] > counts[0]
    for l in range(10):
        assert plan.removed("channel", l) == lowest_channels(l, counts[l])
    target = 0.25 * dense_params(DEEP, True)
    assert abs(removed_params(DEEP, plan) - target) <= COSTS.channel
    assert len(plan.provenance["layer_ratios"]) == 10


# ---- depth and combined ----------------------------------------------------------------------------------------------

BLOCKS10 = torch.tensor([0.0, 1, 2, 3, 9, 8, 7, 6, 4, 5])


def test_depth_removes_the_k_least_important_blocks():
    imap = toy_map(DEEP, blocks=BLOCKS10, heads=torch.zeros(10, 6), channels=torch.zeros(10, 40))
    assert allocate(DEEP, imap, None, "depth", n_blocks=3).blocks == (0, 1, 2)
    by_target = allocate(DEEP, imap, ratio_for(DEEP, 3 * COSTS.block), "depth")
    assert by_target.blocks == (0, 1, 2)
    plus = allocate(DEEP, imap, None, "depth", n_blocks=3, plus_rule=True)
    assert plus.blocks == (5, 6, 7)  # candidates 4..7 score 9, 8, 7, 6


def test_plus_rule_never_removes_protected_blocks_and_says_so_when_short():
    imap = toy_map(DEEP, blocks=BLOCKS10)
    plan = allocate(DEEP, imap, None, "depth", n_blocks=4, plus_rule=True)
    assert plan.blocks == (4, 5, 6, 7)
    with pytest.raises(PlanError, match=r"\+ rule"):
        allocate(DEEP, imap, None, "depth", n_blocks=5, plus_rule=True)
    with pytest.raises(PlanError, match="cannot reach"):
        allocate(DEEP, imap, 0.6, "depth", plus_rule=True)


def test_depth_needs_block_scores():
    with pytest.raises(PlanError, match="no block scores"):
        allocate(LLAMA, toy_map(), 0.2, "depth")


def test_combined_splits_the_budget_between_blocks_and_width():
    imap = toy_map(DEEP, blocks=BLOCKS10, heads=torch.zeros(10, 6),
                   channels=torch.stack([pattern(l) for l in range(10)]))
    budget = 2 * COSTS.block + 8 * 5 * COSTS.channel  # 2 blocks, then 5 channels in each of 8 kept layers
    plan = allocate(DEEP, imap, ratio_for(DEEP, budget), "combined", depth_share=2 * COSTS.block / budget,
                    attn_share=0)
    assert plan.blocks == (0, 1)
    assert all(plan.removed("channel", l) == lowest_channels(l, 5) for l in range(2, 10))
    assert removed_params(DEEP, plan) == budget


# ---- GQA, families, accounting, provenance ---------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["uniform", "global", "incremental"])
@pytest.mark.parametrize("unit", ["kv", "head"])
def test_plans_apply_physically_with_exact_accounting(strategy, unit):
    gen = torch.Generator().manual_seed(1)
    imap = ImportanceMap("rand", G, heads=torch.rand(4, 6, generator=gen), channels=torch.rand(4, 40, generator=gen))
    plan = allocate(LLAMA, imap, 0.35, strategy, attn_unit=unit)
    plan.validate(LLAMA, physical=True)
    pruned = apply_plan(LLAMA, plan)
    assert sum(p.numel() for p in pruned.parameters()) == plan.param_count(LLAMA)


def test_multi_head_family_treats_heads_as_kv_groups():
    g = geometry_of(OPT)
    imap = ImportanceMap("rand", g, heads=torch.tensor([[3.0, 0, 2, 1]] * 3), channels=torch.rand(3, 40))
    for unit in ("kv", "head"):
        plan = allocate(OPT, imap, ratio_for(OPT, 3 * unit_costs(OPT).kv), "uniform", attn_share=1, attn_unit=unit)
        assert [plan.removed_heads_all(l) for l in range(3)] == [(1,)] * 3
    assert sum(p.numel() for p in apply_plan(OPT, plan).parameters()) == plan.param_count(OPT)


def test_provenance_records_the_decision():
    plan = allocate(LLAMA, toy_map(), Target(0.25, of="total"), "global")
    prov = plan.provenance
    assert prov["criterion"] == "toy" and prov["strategy"] == "global"
    assert prov["target"] == {"ratio": 0.25, "of": "total"} and prov["achieved_of"] == "total"
    before, after = prov["params"]["total"]["before"], prov["params"]["total"]["after"]
    assert before == dense_params(LLAMA) and after == plan.param_count(LLAMA)
    assert prov["achieved_ratio"] == pytest.approx((before - after) / before)
    assert prov["options"]["normalize"] == "layer"


def test_unreachable_width_target_reports_the_shortfall():
    with pytest.raises(PlanError, match=r"cannot reach 90.0% .* stops at .* short.* at least one KV group"):
        allocate(LLAMA, toy_map(), 0.9, "uniform")
    with pytest.raises(PlanError, match="no channel scores"):
        allocate(LLAMA, toy_map(channels=None), 0.2, "uniform", attn_share=0.5)
    with pytest.raises(PlanError, match="unknown allocation strategy 'nope'; available: .*uniform"):
        allocate(LLAMA, toy_map(), 0.2, "nope")
    with pytest.raises(PlanError, match="no option"):
        allocate(LLAMA, toy_map(), 0.2, "uniform", attn_shar=0.5)


def test_map_of_another_model_is_rejected():
    with pytest.raises(PlanError, match="different model"):
        allocate(DEEP, toy_map(), 0.2)


def test_registry_lists_and_extends():
    assert {"uniform", "incremental", "global", "depth", "combined"} <= set(allocators())
    assert get_allocator("depth").__doc__

    @register_allocator("first_channels_test")
    def first(job):
        """Remove channel 0 of layer 0."""
        return A.Allocation(job.empty.with_units("channel", 0, [0]), 1e9, "")

    try:
        assert allocate(LLAMA, toy_map(), 0.1, "first_channels_test").removed("channel", 0) == (0,)
    finally:
        A.ALLOCATORS.pop("first_channels_test")


# ---- sliders ---------------------------------------------------------------------------------------------------------

def test_sliders_uniform_exact_units():
    imap = toy_map(DEEP, blocks=BLOCKS10, heads=torch.tensor([[5.0, 1, 3, 2, 6, 0]] * 10),
                   channels=torch.stack([pattern(l) for l in range(10)]))
    plan = plan_from_ratios(DEEP, imap, head_ratio=0.34, channel_ratio=0.25, block_count=2, attn_unit="head")
    assert plan.blocks == (0, 1)
    for l in range(2, 10):
        assert plan.removed("head", l) == (1, 5)  # round(0.34 * 3) = 1 head per group
        assert plan.removed("channel", l) == lowest_channels(l, 10)
    assert plan.provenance["sliders"]["block_count"] == 2
    assert plan.provenance["shortfall"] == {"attn": 0, "mlp": 0}


def test_sliders_cap_at_one_unit_per_layer_and_record_it():
    plan = plan_from_ratios(LLAMA, toy_map(), head_ratio=0.9, attn_unit="kv")  # round(1.8) = 2 of 2 groups
    assert all(len(plan.kept("kv", l)) == 1 for l in range(4))
    assert plan.provenance["shortfall"] == {"attn": 4, "mlp": 0}
    with pytest.raises(PlanError, match="below 1"):
        plan_from_ratios(LLAMA, toy_map(), channel_ratio=1.0)
    with pytest.raises(PlanError, match="slider strategy"):
        plan_from_ratios(LLAMA, toy_map(), channel_ratio=0.5, strategy="depth")


@pytest.mark.parametrize("strategy", ["global", "incremental"])
def test_sliders_take_the_stated_number_of_units(strategy):
    plan = plan_from_ratios(LLAMA, toy_map(), head_ratio=0.5, channel_ratio=0.3, strategy=strategy)
    assert plan.counts()["kv"] == 4 and plan.counts()["channel"] == 48


# ---- properties ------------------------------------------------------------------------------------------------------

def random_map(model, seed: int) -> ImportanceMap:
    g = geometry_of(model)
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    return ImportanceMap("rand", g, heads=r(g.n_layers, g.n_heads), kv=r(g.n_layers, g.n_kv),
                         channels=r(g.n_layers, g.n_channels), blocks=r(g.n_layers))


MODELS = {"llama": DEEP, "opt": OPT}
SLACK = {"uniform": lambda m: geometry_of(m).n_layers * unit_costs(m).channel,  # one channel in every layer
         "incremental": lambda m: unit_costs(m).channel, "global": lambda m: 0, "depth": lambda m: 0,
         "combined": lambda m: 2 * unit_costs(m).kv}


def _try(model, imap, ratio, strategy, unit):
    try:
        return allocate(model, imap, ratio, strategy, attn_unit=unit)
    except PlanError as e:
        assert "cannot reach" in str(e)
        return None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), r1=st.floats(0.01, 0.9), r2=st.floats(0.01, 0.9),
       strategy=st.sampled_from(sorted(SLACK)), unit=st.sampled_from(["kv", "head"]),
       family=st.sampled_from(sorted(MODELS)))
def test_allocation_properties(seed, r1, r2, strategy, unit, family):
    model = MODELS[family]
    imap = random_map(model, seed)
    lo, hi = sorted((r1, r2))
    plans = [_try(model, imap, r, strategy, unit) for r in (lo, hi)]
    g = geometry_of(model)
    for r, plan in zip((lo, hi), plans):
        if plan is None:
            continue
        plan.validate(model, physical=True)  # GQA-consistent; no layer loses every head or channel
        for l in plan.kept_blocks():
            assert plan.kept("kv", l) and plan.kept("head", l) and plan.kept("channel", l)
        assert len(plan.kept_blocks()) >= 1 and len(plan.blocks) < g.n_layers
    if all(plans):
        after = [p.param_count(model, non_embedding=True) for p in plans]
        assert after[1] <= after[0] + SLACK[strategy](model)
    if plans[1] is not None and strategy != "combined":
        assert plans[0] is not None  # a smaller target is reachable whenever a larger one is


# ---- LLM-Pruner's layer range (skip_first / skip_last) -------------------------------------------------------------

def _touched(plan):
    return {l for part in (plan.channels, plan.kv, plan.heads) for l, units in part if units}


@pytest.mark.parametrize("strategy", ["uniform", "global", "incremental"])
def test_skip_layers_keep_those_layers_whole(strategy):
    imap = toy_map(DEEP)
    plan = allocate(DEEP, imap, 0.2, strategy=strategy, skip_first=3, skip_last=2)
    assert _touched(plan) and _touched(plan) <= set(range(3, 8)), _touched(plan)
    assert abs(plan.provenance["achieved_ratio"] - 0.2) < 0.03
    assert _touched(allocate(DEEP, imap, 0.2, strategy=strategy)) - set(range(3, 8))  # without: they are touched


def test_skip_layers_that_leave_nothing_say_so():
    imap = toy_map()
    with pytest.raises(PlanError, match="leave no layer"):
        allocate(LLAMA, imap, 0.1, skip_first=2, skip_last=2)
    with pytest.raises(PlanError, match="skip_first is a number of layers"):
        allocate(LLAMA, imap, 0.1, skip_first=-1)
    plan = plan_from_ratios(LLAMA, imap, channel_ratio=0.5, skip_first=1, skip_last=1)
    assert _touched(plan) == {1, 2}
    assert dict(plan.channels)[1] == lowest_channels(1, 20)
    assert plan.provenance["sliders"]["skip_first"] == 1


def test_auto_layer_range_is_the_criterions_own():
    """skip_first/skip_last "auto": taylor keeps LLM-Pruner's first eighth and last sixteenth whole (round(10/8)=1,
    round(10/16)=1 of DEEP's 10 layers), every other criterion prunes every layer; explicit numbers win, and
    deployable plans keep every layer alike."""
    import dataclasses

    taylor = dataclasses.replace(toy_map(DEEP), criterion="taylor")
    plan = allocate(DEEP, taylor, 0.2)
    assert _touched(plan) == set(range(1, 9))
    assert (plan.provenance["options"]["skip_first"], plan.provenance["options"]["skip_last"]) == (1, 1)
    assert _touched(allocate(DEEP, toy_map(DEEP), 0.2)) == set(range(10))  # "toy" (and magnitude, flap...): 0 / 0
    assert _touched(allocate(DEEP, taylor, 0.2, skip_first=0, skip_last=0)) == set(range(10))
    assert _touched(allocate(DEEP, taylor, 0.2, skip_first=3)) == set(range(3, 9))  # the other end stays auto
    assert _touched(allocate(DEEP, taylor, 0.2, deployable="stock")) == set(range(10))
    small = A.resolved_layer_range(A.AllocOptions(), "taylor", 30)
    assert (small.skip_first, small.skip_last) == (4, 2)  # SmolLM2's 30 layers: LLM-Pruner's 4 and 2
    tiny = A.resolved_layer_range(A.AllocOptions(), "taylor", 1)
    assert (tiny.skip_first, tiny.skip_last) == (0, 0)  # never leaves no layer to prune
    with pytest.raises(PlanError, match="or 'auto'"):
        allocate(DEEP, taylor, 0.2, skip_first="all")


def test_cli_layer_range_arguments():
    from pruneviz.cli import build_parser

    p = build_parser()
    args = p.parse_args(["plan", "--criterion", "taylor", "--ratio", "0.2", "--out", "x.json"])
    assert (args.skip_first, args.skip_last) == ("auto", "auto")
    args = p.parse_args(["plan", "--criterion", "taylor", "--ratio", "0.2", "--out", "x.json", "--skip-first", "3"])
    assert args.skip_first == 3
    with pytest.raises(SystemExit):
        p.parse_args(["plan", "--criterion", "taylor", "--ratio", "0.2", "--out", "x.json", "--skip-last", "-1"])


def test_cli_plan_attn_rounding(tmp_path):
    """``plan --attn-rounding nearest`` removes the KV group the default ("down") leaves to MLP channels."""
    from pruneviz import importance
    from pruneviz.cli import main
    from pruneviz.plan import Plan
    from pruneviz.testing import tiny_tokenizer

    LLAMA.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    (tmp_path / "scores.json").write_text(importance.compute(LLAMA, "magnitude").to_json())
    share = 2 * COSTS.kv / (2 * COSTS.kv + 40 * COSTS.channel)
    ratio = f"{ratio_for(LLAMA, 0.75 * 4 * COSTS.kv / share):.6f}"
    counts = {}
    for rounding in ("down", "nearest"):
        out = tmp_path / f"{rounding}.json"
        assert main(["plan", "--model", str(tmp_path / "base"), "--device", "cpu", "--scores",
                     str(tmp_path / "scores.json"), "--ratio", ratio, "--attn-rounding", rounding,
                     "--out", str(out)]) == 0
        plan = Plan.from_json(out.read_text())
        assert plan.provenance["options"]["attn_rounding"] == rounding
        counts[rounding] = plan.counts()["kv"]
    assert counts == {"down": 0, "nearest": 4}


def test_cli_plan_attn_share_and_compensation(tmp_path, capsys):
    """``plan --attn-share 0 --compensation affine_local`` writes the recipe's kind of plan (MLP channels only, the
    refit named), equal to the library's allocation; an unknown compensation is refused before the model loads."""
    from pruneviz import importance
    from pruneviz.cli import main
    from pruneviz.plan import Plan
    from pruneviz.testing import tiny_tokenizer

    LLAMA.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    imap = importance.compute(LLAMA, "magnitude")
    (tmp_path / "scores.json").write_text(imap.to_json())
    common = ["plan", "--model", str(tmp_path / "base"), "--device", "cpu", "--scores", str(tmp_path / "scores.json"),
              "--ratio", "0.25"]
    out = ["--out", str(tmp_path / "p.json")]
    assert main(common + ["--attn-share", "0", "--compensation", "affine_local"] + out) == 0
    plan = Plan.from_json((tmp_path / "p.json").read_text())
    assert plan.compensation == "affine_local" and plan.counts()["kv"] == plan.counts()["head"] == 0
    expected = allocate(LLAMA, imap, 0.25, attn_share=0.0, compensation="affine_local")
    assert plan.channels == expected.channels and plan.kv == expected.kv
    assert main(common + ["--compensation", "nonsense", "--out", str(tmp_path / "q.json")]) == 2
    assert "unknown --compensation 'nonsense'" in capsys.readouterr().err and not (tmp_path / "q.json").exists()
    assert main(common + ["--attn-share", "0", "--strategy", "incremental", "--multiple-of", "8"] + out) == 0
    plan = Plan.from_json((tmp_path / "p.json").read_text())
    assert plan.channels == allocate(LLAMA, imap, 0.25, "incremental", attn_share=0.0, multiple_of=8).channels
    assert all((40 - len(plan.removed("channel", l))) % 8 == 0 for l in range(4))
    with pytest.raises(SystemExit):
        main(common + ["--multiple-of", "0", "--out", str(tmp_path / "r.json")])
    assert "a whole number of MLP channels" in capsys.readouterr().err


# ---- aligned MLP widths (multiple_of) --------------------------------------------------------------------------------

def test_aligned_counts_round_equal_counts_alike_and_per_layer_counts_by_remainders():
    assert A.aligned_counts([5, 5, 5], 40, 8, alike=True) == [8, 8, 8]  # kept 35 -> 32 (3 away), not 40 (5)
    assert A.aligned_counts([3, 3], 40, 8, alike=True) == [0, 0]  # kept 37 -> 40: the layers stay whole
    assert A.aligned_counts([4, 4], 40, 8, alike=True) == [8, 8]  # a tie goes to the larger removal
    assert A.aligned_counts([36, 36], 40, 8, alike=True) == [32, 32]  # a layer keeps at least one multiple
    assert A.aligned_counts([25, 25, 25], 40, 8) == [32, 24, 24]  # per layer: at least the 75 asked
    # per layer: each at its lower aligned count, then the largest remainders move up until >= the asked 20
    assert A.aligned_counts([5, 6, 9, 0], 40, 8) == [8, 8, 8, 0]
    assert A.aligned_counts([1, 2, 3, 4], 40, 8) == [0, 0, 8, 8]
    with pytest.raises(PlanError, match="larger than the MLP width"):
        A.aligned_counts([1, 2], 40, 64)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 39), min_size=2, max_size=8), st.sampled_from([2, 3, 8, 16, 32]))
def test_aligned_counts_keep_multiples_and_never_remove_less(counts, multiple):
    alike = len(set(counts)) == 1
    out = A.aligned_counts(counts, 40, multiple, alike)
    for k, a in zip(counts, out):
        assert a == 0 if k == 0 else (a == 0 or ((40 - a) % multiple == 0 and 40 - a >= multiple))
    capped = any(40 - k < multiple for k in counts if k)  # a layer that cannot keep less than one multiple
    if not alike and not capped:
        assert sum(counts) <= sum(out) < sum(counts) + multiple
    elif alike:
        assert abs(out[0] - counts[0]) <= multiple


@pytest.mark.parametrize("strategy", ["uniform", "global", "incremental"])
def test_allocations_with_multiple_of_keep_aligned_widths_and_land_at_the_target(strategy):
    ratio = 0.3
    plan = allocate(DEEP, toy_map(DEEP), ratio, strategy, attn_share=0, multiple_of=8)
    widths = [40 - len(plan.removed("channel", l)) for l in range(10)]
    assert all(w % 8 == 0 for w in widths), widths
    assert removed_params(DEEP, plan) >= ratio * dense_params(DEEP, True)
    assert plan.provenance["options"]["multiple_of"] == 8
    if strategy == "uniform":
        assert len(set(widths)) == 1
    free = allocate(DEEP, toy_map(DEEP), ratio, strategy, attn_share=0)
    assert any(w % 8 for w in (40 - len(free.removed("channel", l)) for l in range(10)))  # the option did it
    over = removed_params(DEEP, plan) - ratio * dense_params(DEEP, True)
    assert over < 8 * COSTS.channel * (10 if strategy == "uniform" else 1)


def test_sliders_and_bad_multiples():
    plan = plan_from_ratios(DEEP, toy_map(DEEP), channel_ratio=0.3, strategy="incremental", multiple_of=8)
    assert all((40 - len(plan.removed("channel", l))) % 8 == 0 for l in range(10))
    for bad in (0, -8, 2.5, True):
        with pytest.raises(PlanError, match="multiple_of is a whole number"):
            allocate(DEEP, toy_map(DEEP), 0.2, attn_share=0, multiple_of=bad)
    with pytest.raises(PlanError, match="larger than the MLP width"):
        allocate(DEEP, toy_map(DEEP), 0.2, attn_share=0, multiple_of=64)
