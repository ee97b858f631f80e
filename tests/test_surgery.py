"""Surgery invariants on tiny models of every family: exactness, non-mutation, parameter arithmetic, KV cache."""
import pytest
import torch

from pruneviz.arch import adapter_for, geometry_of, get_path
from pruneviz.errors import PlanError
from pruneviz.plan import Plan, dense_params
from pruneviz.surgery import apply_plan, masked_model, masking


def mixed_plan(model) -> Plan:
    """Blocks, KV groups, equal-per-group heads and channels, different in every layer."""
    g = geometry_of(model)
    p = Plan.empty(model).with_units("block", None, [1]).with_units("channel", 0, [0, 5, 7])
    p = p.with_units("channel", 2, range(0, g.n_channels, 3))
    if 1 < g.n_kv < g.n_heads:  # GQA (multi-query attention has no KV group to spare: heads as in MHA)
        p = p.with_units("kv", 2, [g.n_kv - 1])
        p = p.with_units("head", 0, [g.heads_of(k)[1] for k in range(g.n_kv)])
    else:
        p = p.with_units("head", 0, [1]).with_units("head", 2, [0, g.n_heads - 1])
    return p


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_empty_plan_gives_identical_logits(tiny, ids):
    out = apply_plan(tiny, Plan.empty(tiny))
    assert torch.equal(out(ids).logits, tiny(ids).logits)
    assert dense_params(out) == dense_params(tiny)


def test_surgery_equals_masking_and_base_untouched(tiny, ids):
    before = state(tiny)
    plan = mixed_plan(tiny)
    pruned, masked = apply_plan(tiny, plan), masked_model(tiny, plan)
    diff = (pruned(ids).logits - masked(ids).logits).abs().max().item()
    assert diff < 1e-5
    # the masked view really masks (differs from dense) and the base is bit-identical afterwards
    assert (masked(ids).logits - tiny(ids).logits).abs().max() > 1e-4
    after = tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not tiny._forward_hooks and all(not m._forward_pre_hooks for m in tiny.modules())


def test_param_count_matches_plan_arithmetic(tiny):
    plan = mixed_plan(tiny)
    pruned = apply_plan(tiny, plan)
    assert dense_params(pruned) == plan.param_count(tiny)
    assert dense_params(pruned, True) == plan.param_count(tiny, non_embedding=True)
    assert dense_params(pruned) < dense_params(tiny)


def test_generate_with_kv_cache_matches_masked(tiny, ids):
    plan = mixed_plan(tiny)
    pruned, masked = apply_plan(tiny, plan), masked_model(tiny, plan)
    a = pruned.generate(ids[:1], max_new_tokens=8, do_sample=False)
    b = masked.generate(ids[:1], max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)
    # incremental decoding with the cache equals a full forward on the whole sequence
    full = pruned(a).logits[0, -2].argmax()
    assert full.item() == a[0, -1].item()


def test_depth_removal_reindexes_layers(tiny):
    plan = Plan.empty(tiny).with_units("block", None, [0])
    pruned = apply_plan(tiny, plan)
    adapter = adapter_for(pruned)
    layers = adapter.layers(pruned)
    g = geometry_of(tiny)
    assert len(layers) == g.n_layers - 1 == pruned.config.num_hidden_layers
    idx = [m.layer_idx for layer in layers for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(set(idx)) == list(range(g.n_layers - 1))
    assert pruned.config.pruneviz_layout["source_layers"] == list(range(1, g.n_layers))


def test_shapes_follow_the_plan(tiny):
    g = geometry_of(tiny)
    plan = Plan.empty(tiny).with_units("channel", 1, [0, 1, 2])
    gqa = 1 < g.n_kv < g.n_heads
    if gqa:
        plan = plan.with_units("kv", 1, [0])
    pruned = apply_plan(tiny, plan)
    adapter = adapter_for(tiny)
    layer = adapter.layers(pruned)[1]
    mlp_out = get_path(layer, adapter.mlp_out)
    in_dim = mlp_out.weight.shape[0] if type(mlp_out).__name__ == "Conv1D" else mlp_out.weight.shape[1]
    assert in_dim == g.n_channels - 3
    if gqa:
        widths = adapter.attention_widths(layer, g)
        assert widths["k"] == widths["v"] == (g.n_kv - 1) * g.head_dim
        assert widths["o_in"] == widths["q"] == (g.n_heads - g.group_size) * g.head_dim


def test_unequal_heads_per_group_rejected_for_surgery_but_masked_ok(ids):
    from pruneviz.testing import tiny_model

    model = tiny_model("llama")  # 6 heads in 2 groups of 3
    plan = Plan.empty(model).with_units("head", 0, [0])  # group 0 keeps 2, group 1 keeps 3
    with pytest.raises(PlanError, match="same number"):
        apply_plan(model, plan)
    masked_model(model, plan)(ids)  # previews accept any pattern


def test_masking_context_removes_hooks(tiny, ids):
    ref = tiny(ids).logits
    plan = mixed_plan(tiny)
    with masking(tiny, plan) as view:
        inside = view(ids).logits
        assert torch.equal(tiny(ids).logits, ref)  # the masks are the view's, never the model's
    assert (inside - ref).abs().max() > 1e-4
    assert torch.equal(tiny(ids).logits, ref)


def test_removing_every_head_removes_the_attention_or_is_refused(tiny, ids):
    """Every KV group of a kept layer gone = its attention sub-block removed (BlockPruner); refused where the family
    cannot drop a sub-block alone (BLOOM)."""
    g = geometry_of(tiny)
    plan = Plan.empty(tiny).with_units("kv", 0, range(g.n_kv))
    assert plan.attention_removed(0) and not plan.blocks
    if adapter_for(tiny).sub_block("attn", tiny.config) is None:
        with pytest.raises(PlanError, match="remove the whole block"):
            apply_plan(tiny, plan)
    else:
        assert torch.equal(apply_plan(tiny, plan)(ids).logits, masked_model(tiny, plan)(ids).logits)


def test_masking_means_zeroing_the_units_columns(tiny, ids):
    """The masked/pruned function is the dense model with every weight the units own zeroed (rows of q/k/v, up and
    gate, columns of the output projections; for most families the columns alone decide it, for OLMo 2's
    whole-projection q/k norms the rows do too), checked in float64, where rounding is far below the tolerance."""
    from pruneviz.arch import weight_axis
    from pruneviz.surgery import clone_model, removed_features

    model = clone_model(tiny).double()
    plan = mixed_plan(model)
    zeroed = clone_model(model)
    adapter, g = adapter_for(model), geometry_of(model)
    layers = adapter.layers(zeroed)
    with torch.no_grad():
        for i in plan.kept_blocks():
            for (path, axis), feats in removed_features(adapter, g, plan, i).items():
                mod = get_path(layers[i], path)
                mod.weight.index_fill_(weight_axis(mod, axis), torch.tensor(sorted(feats), dtype=torch.long), 0.0)
    with masking(zeroed, Plan.empty(zeroed).with_units("block", None, plan.blocks)) as view:
        ref = view(ids).logits
    # whole-projection q/k norms (OLMo 2) compute in float32 whatever the dtype, over K instead of N features
    tol = 1e-6 if adapter.proj_norms else 1e-10
    assert (apply_plan(model, plan)(ids).logits - ref).abs().max() < tol


# ---- property: any physically valid plan, on any family, prunes exactly like masking ---------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pruneviz.testing import FAMILIES, tiny_model  # noqa: E402

FAMILY_MODELS = {f: tiny_model(f) for f in FAMILIES}
IDS = torch.randint(4, 90, (2, 11), generator=torch.Generator().manual_seed(5))


@st.composite
def random_plans(draw):
    """A family and a plan on it: some blocks, KV groups, equal-per-group query heads and channels per layer, and
    now and then a whole attention or MLP sub-block."""
    family = draw(st.sampled_from(FAMILIES))
    model = FAMILY_MODELS[family]
    g = geometry_of(model)
    plan = Plan.empty(model)
    blocks = draw(st.sets(st.integers(0, g.n_layers - 1), max_size=g.n_layers - 1))
    plan = plan.with_units("block", None, sorted(blocks))
    for layer in range(g.n_layers):
        if layer in blocks:
            continue
        chans = draw(st.sets(st.integers(0, g.n_channels - 1), max_size=g.n_channels - 1))
        plan = plan.with_units("channel", layer, sorted(chans))
        if g.n_kv != g.n_heads:
            groups = draw(st.sets(st.integers(0, g.n_kv - 1), max_size=g.n_kv - 1))
            plan = plan.with_units("kv", layer, sorted(groups))
            q = draw(st.integers(0, g.group_size - 1))
            pos = draw(st.permutations(range(g.group_size)))[:q]
            heads = [g.heads_of(k)[p] for k in range(g.n_kv) if k not in groups for p in pos]
        else:
            heads = sorted(draw(st.sets(st.integers(0, g.n_heads - 1), max_size=g.n_heads - 1)))
        plan = plan.with_units("head", layer, heads)
        parts = [p for p in ("attn", "mlp") if adapter_for(model).sub_block(p, model.config) is not None]
        sub = draw(st.sampled_from([None, None] + parts))  # a whole sub-block (BlockPruner) now and then
        if sub:
            plan = plan.without_sub_block(layer, sub)
    return family, plan


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_plans())
def test_any_valid_plan_surgery_equals_masking(case):
    family, plan = case
    model = FAMILY_MODELS[family]
    before = state(model)
    pruned, masked = apply_plan(model, plan), masked_model(model, plan)
    with torch.no_grad():
        diff = (pruned(IDS).logits - masked(IDS).logits).abs().max().item()
    assert diff < 1e-4, (family, plan.summary())
    assert dense_params(pruned) == plan.param_count(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
