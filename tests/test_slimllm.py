"""SlimLLM (Guo et al., ICML 2025) in full: the PCA-weighted channel score, the greedy head/KV-group swaps on the
joint removal objective, the cosine layer ratios (strategy ``slimllm``) and ``slimllm_prune_to``."""
import itertools
import math

import numpy as np
import pytest
import torch

from pruneviz.allocate import Target, allocate
from pruneviz.arch import adapter_for, geometry_of, get_path
from pruneviz.criteria.slimllm import (
    UnitMoments,
    refine_heads,
    slimllm_prune_to,
    spare_lowest,
    swap_search,
)
from pruneviz.errors import CriterionError, PlanError
from pruneviz.importance import Calibration, compute, make_options
from pruneviz.plan import Plan, dense_params
from pruneviz.schedules import cosine_ratios
from pruneviz.surgery import apply_plan
from pruneviz.testing import FAMILIES, tiny_model

CALIB = Calibration(torch.randint(4, 90, (8, 24), generator=torch.Generator().manual_seed(0)), "random")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _capture(model, paths):
    """Inputs and outputs of the given projections of every block on CALIB (a dense forward): {(l, path): (x, y)}."""
    adapter, seen, handles = adapter_for(model), {}, []
    for l, layer in enumerate(adapter.layers(model)):
        for p in paths:
            def hook(module, args, out, key=(l, p)):
                seen[key] = (args[0].reshape(-1, args[0].shape[-1]).double(), out.reshape(-1, out.shape[-1]).double())
            handles.append(get_path(layer, p).register_forward_hook(hook))
    with torch.no_grad():
        model(CALIB.tokens)
    for h in handles:
        h.remove()
    return seen


def _rows(module):
    w = module.weight.detach().double()
    return w.T if type(module).__name__ == "Conv1D" else w  # [out, in]


# ---- the PCA-weighted channel score -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gpt2"])
def test_pca_channel_score_equals_the_papers_formula(family):
    """The official ``LlamaMLP.compress`` score, written out with numpy's eig on hooked activations: ‖W_g ⊙ ‖X‖‖ +
    ‖W_u ⊙ ‖X‖‖ + ‖A_c‖·‖ |W_dᵀV| ⊙ σ(λ/λ̄) ‖ (fused gate_up: both halves; gpt2: one Conv1D fc row)."""
    model = tiny_model(family)
    adapter, g = adapter_for(model), geometry_of(model)
    ins = [p for p in adapter.mlp_modules if p != adapter.mlp_out]
    seen = _capture(model, [*ins, adapter.mlp_out])
    imap = compute(model, "slimllm", CALIB)
    for l, layer in enumerate(adapter.layers(model)):
        x = seen[(l, ins[0])][0].numpy()  # MLP input [N, D]
        a, y = (t.numpy() for t in seen[(l, adapter.mlp_out)])  # down input [N, C], output [N, D] (with any bias)
        yc = y - y.mean(0, keepdims=True)
        lam, vec = np.linalg.eig(yc.T @ yc)
        lam = np.abs(lam.real)
        w = 1 / (1 + np.exp(-lam / lam.mean()))
        wd = _rows(get_path(layer, adapter.mlp_out)).numpy().T  # [C, D]
        i_d = np.linalg.norm(np.abs(wd @ vec.real) * w * np.linalg.norm(a, axis=0)[:, None], axis=1)
        i_in = np.zeros(g.n_channels)
        for p in ins:
            rows = np.linalg.norm(_rows(get_path(layer, p)).numpy() * np.linalg.norm(x, axis=0), axis=1)
            i_in += rows[:g.n_channels] + (rows[g.n_channels:] if rows.shape[0] == 2 * g.n_channels else 0)
        assert np.allclose(imap.channels[l].numpy(), i_in + i_d, rtol=1e-4), (family, l)


def test_correlation_channels_stay_available_and_differ_from_pca(llama):
    model = tiny_model("llama")
    with torch.no_grad():  # channel 5 of layer 1 writes nothing: its removal changes nothing
        get_path(adapter_for(model).layers(model)[1], "mlp.down_proj").weight[:, 5] = 0
    corr = compute(model, "slimllm", CALIB, make_options("slimllm", channel_score="correlation"))
    assert corr.channels[1, 5] == pytest.approx(0.0, abs=1e-6) and bool((corr.channels[1] > -1e-6).all())
    pca = compute(model, "slimllm", CALIB)
    assert not torch.allclose(pca.channels, corr.channels) and torch.equal(pca.heads, corr.heads)
    with pytest.raises(CriterionError, match="channel_score"):
        compute(model, "slimllm", CALIB, make_options("slimllm", channel_score="norm"))


def test_spare_lowest_keeps_the_lowest_share_above_the_rest():
    s = torch.tensor([[5.0, 1.0, 3.0, 0.5, 4.0, 2.0, 6.0, 7.0, 8.0, 9.0]])
    out = spare_lowest(s, 0.2)  # 2 of 10: channels 3 (0.5) and 1 (1.0), in that order, above the maximum 9
    assert out[0, 3] == 10.0 and out[0, 1] == 11.0
    assert torch.equal(out[0, [0, 2, 4, 5, 6, 7, 8, 9]], s[0, [0, 2, 4, 5, 6, 7, 8, 9]])
    assert torch.equal(spare_lowest(s, 0.0), s)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_scores_with_finite_maps_and_cosines(family):
    model = tiny_model(family)
    g = geometry_of(model)
    imap = compute(model, "slimllm", CALIB)
    for m, shape in (("heads", (g.n_layers, g.n_heads)), ("kv", (g.n_layers, g.n_kv)),
                     ("channels", (g.n_layers, g.n_channels))):
        assert tuple(imap.get(m).shape) == shape and torch.isfinite(imap.get(m)).all(), m
    cos = imap.extras["layer_cosine"]
    assert len(cos) == g.n_layers and all(-1 <= c <= 1 for c in cos)
    plan = allocate(model, imap, 0.2, strategy="slimllm", attn_unit="head")
    refine_heads(model, CALIB, plan).validate(model, physical=True)


# ---- the joint objective and the swaps -----------------------------------------------------------------------------

def _corr_objective(contrib, kept):
    """Σ_d |corr(Σ_kept o_u,d, S_d)| by torch.corrcoef, from contributions [N, U, D]."""
    s, k = contrib.sum(1), contrib[:, kept].sum(1)
    return sum(abs(float(torch.corrcoef(torch.stack([k[:, d], s[:, d]]))[0, 1])) for d in range(s.shape[1]))


def _moments(contrib):
    mom = UnitMoments.empty(contrib.shape[1], contrib.shape[2])
    mom.add(contrib)
    return mom


def _head_contributions(model, l):
    """Per-head contributions [N, H, D] to layer ``l``'s o_proj output, from a hooked dense forward."""
    g, adapter = geometry_of(model), adapter_for(model)
    x = _capture(model, [adapter.attn_out])[(l, adapter.attn_out)][0]
    w = _rows(get_path(adapter.layers(model)[l], adapter.attn_out))  # [D, H·hd]
    return torch.einsum("nhk,dhk->nhd", x.view(-1, g.n_heads, g.head_dim), w.view(-1, g.n_heads, g.head_dim))


def test_set_objective_equals_corrcoef_and_the_single_removal_scores(llama):
    g = geometry_of(llama)
    imap = compute(llama, "slimllm", CALIB)
    for l in (0, 2):
        o = _head_contributions(llama, l)
        mom = _moments(o)
        for h in range(g.n_heads):  # removing one head: the criterion's score is hidden − the objective
            kept = [u for u in range(g.n_heads) if u != h]
            mask = torch.ones(g.n_heads, dtype=torch.bool)
            mask[h] = False
            assert mom.objective(mask) == pytest.approx(g.hidden - float(imap.heads[l, h]), rel=1e-4)
            assert mom.objective(mask) == pytest.approx(_corr_objective(o, kept), rel=1e-6)
        groups = mom.grouped(torch.arange(g.n_heads).view(g.n_kv, g.group_size))
        for grp in range(g.n_kv):
            mask = torch.ones(g.n_kv, dtype=torch.bool)
            mask[grp] = False
            assert groups.objective(mask) == pytest.approx(g.hidden - float(imap.kv[l, grp]), rel=1e-4)


def _synthetic(seed, n=200, units=6, dim=5):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 3, dim, generator=gen, dtype=torch.float64)
    mix = torch.randn(units, 3, generator=gen, dtype=torch.float64)  # correlated units, some nearly cancelling
    return torch.einsum("ur,nrd->nud", mix, base) + 0.3 * torch.randn(n, units, dim, generator=gen,
                                                                      dtype=torch.float64)


def test_swap_objectives_equal_a_full_recomputation():
    o = _synthetic(1)
    mom = _moments(o)
    kept = torch.tensor([True, False, True, True, False, True])
    vals = mom.swap_objectives(kept, 1, [0, 2, 3, 5])
    for v, j in zip(vals, [0, 2, 3, 5]):
        k = kept.clone()
        k[1], k[j] = True, False
        assert float(v) == pytest.approx(mom.objective(k), rel=1e-9)
        assert float(v) == pytest.approx(_corr_objective(o, k.nonzero().flatten().tolist()), rel=1e-6)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_swaps_never_lower_the_objective_and_end_at_a_local_optimum(seed, k):
    o = _synthetic(seed)
    mom, units = _moments(o), o.shape[1]
    full = torch.ones(units, dtype=torch.bool)
    single = [mom.objective(full.clone().index_fill_(0, torch.tensor([u]), False)) for u in range(units)]
    initial = sorted(range(units), key=lambda u: -single[u])[:k]  # the paper's start: the highest single scores
    res = swap_search(mom, initial)
    assert res.converged and len(res.removed) == k and res.after >= res.before - 1e-12

    def value(removed):
        mask = torch.ones(units, dtype=torch.bool)
        mask[list(removed)] = False
        return mom.objective(mask)

    assert res.before == pytest.approx(value(initial)) and res.after == pytest.approx(value(res.removed))
    for i in res.removed:  # no single swap improves: a local optimum
        for j in set(range(units)) - set(res.removed):
            assert value(set(res.removed) - {i} | {j}) <= res.after + 1e-9
    best = max(value(s) for s in itertools.combinations(range(units), k))  # brute force over every set
    assert best >= res.after - 1e-12 and res.after >= value(initial) - 1e-12
    if k == 1:
        assert res.swaps == 0 and res.after == pytest.approx(best)  # one unit: the single score is the set's


def test_swaps_respect_partners_and_fixed_units():
    o = _synthetic(3)
    mom = _moments(o)
    groups = [[0, 1, 2], [3, 4, 5]]
    res = swap_search(mom, [0, 3], partners=lambda h: groups[h // 3])
    assert sum(h in groups[0] for h in res.removed) == 1 and sum(h in groups[1] for h in res.removed) == 1
    res = swap_search(mom, [0], partners=lambda h: groups[0], fixed=frozenset({1}))
    assert res.removed[0] in (0, 2)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_head_swaps_keep_counts_per_group_and_improve_the_tiny_model(family):
    model = tiny_model(family)
    g = geometry_of(model)
    imap = compute(model, "slimllm", CALIB)
    plan = allocate(model, imap, 0.3, strategy="slimllm", attn_unit="head")
    refined = refine_heads(model, CALIB, plan)
    assert refined.param_count(model) == plan.param_count(model)
    refined.validate(model, physical=True)
    records = refined.provenance["slimllm_swaps"]
    assert records and all(r["head"]["after"] >= r["head"]["before"] - 1e-9 for r in records.values())
    for l in range(g.n_layers):
        for grp in range(g.n_kv):
            count = lambda p: sum(g.kv_of(h) == grp for h in p.removed("head", l))  # noqa: E731
            assert count(refined) == count(plan)
    assert any(r["head"]["swaps"] > 0 and r["head"]["after"] > r["head"]["before"] for r in records.values())
    for l, r in records.items():  # the recorded objective is the refined set's, by an independent computation
        kept = list(refined.kept("head", int(l)))
        assert r["head"]["after"] == pytest.approx(_corr_objective(_head_contributions(model, int(l)), kept),
                                                   rel=1e-4)


def test_kv_swaps_move_whole_groups(llama):
    g = geometry_of(llama)
    plan = Plan.empty(llama).with_units("kv", 1, [0]).with_units("kv", 2, [1])
    refined = refine_heads(llama, CALIB, plan)
    for l in (1, 2):
        assert len(refined.removed("kv", l)) == 1 and not refined.removed("head", l)
    imap = compute(llama, "slimllm", CALIB)
    for l in (1, 2):  # one group removed: the swap search picks the best single group
        assert refined.removed("kv", l) == (int(torch.argmin(imap.kv[l])),)
    assert refined.param_count(llama) == plan.param_count(llama) and g.n_kv == 2


# ---- cosine layer ratios -------------------------------------------------------------------------------------------

def test_cosine_ratios_follow_the_papers_softmax_and_average_to_the_target():
    cos = [0.5, 0.9, 0.95, 0.8, 0.99, 0.7]
    r = cosine_ratios(cos, 0.2, alpha=10.0, pruned_layers=4)
    chosen = [4, 2, 1, 3]  # the four highest cosines
    z = sum(math.exp(10 * cos[i]) for i in chosen)
    for i in chosen:  # r · n · softmax with the paper's r = target · L / n
        assert r[i] == pytest.approx(0.2 * 6 / 4 * 4 * math.exp(10 * cos[i]) / z)
    assert r[0] == r[5] == 0.0 and sum(r) / 6 == pytest.approx(0.2)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target, n", [(0.1, None), (0.3, 5), (0.6, 3), (0.85, 8)])
def test_cosine_ratios_are_monotone_capped_and_average_to_the_target(seed, target, n):
    gen = torch.Generator().manual_seed(seed)
    cos = (0.6 + 0.4 * torch.rand(8, generator=gen)).tolist()
    r = cosine_ratios(cos, target, alpha=10.0, pruned_layers=n, max_ratio=0.9)
    assert sum(r) / 8 == pytest.approx(target) and max(r) <= 0.9 + 1e-12 and min(r) >= 0
    order = sorted(range(8), key=lambda i: cos[i])
    assert all(r[a] <= r[b] + 1e-12 for a, b in zip(order, order[1:]))  # non-decreasing in the cosine
    if n is not None and target * 8 <= 0.9 * n:  # the chosen blocks can take it all: the others stay whole
        assert all(r[i] == 0 for i in order[:8 - n])
    with pytest.raises(CriterionError):
        cosine_ratios(cos, 0.95)


def test_layer_cosine_is_each_blocks_mean_token_cosine(llama):
    imap = compute(llama, "slimllm", CALIB)
    with torch.no_grad():
        hs = llama(CALIB.tokens, output_hidden_states=True).hidden_states  # [L+1]; the last one is normed
    for l in range(len(hs) - 2):
        want = torch.cosine_similarity(hs[l + 1], hs[l], dim=-1).mean()
        assert imap.extras["layer_cosine"][l] == pytest.approx(float(want), abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("unit", ["kv", "head"])
@pytest.mark.parametrize("ratio", [0.15, 0.3])
def test_slimllm_prune_to_is_physical_gqa_correct_and_lands(family, unit, ratio):
    model = tiny_model(family)
    target = Target(ratio)
    plan, pruned = slimllm_prune_to(model, CALIB, target, attn_unit=unit)
    assert plan.compensation == "affine" and plan.provenance["solver"] == "slimllm"
    plan.validate(model, physical=True)  # GQA-correct: equal heads per group, whole groups
    assert dense_params(pruned) == plan.param_count(model)
    assert dense_params(pruned, True) <= dense_params(model, True) - target.budget(model)
    assert dense_params(pruned, True) >= dense_params(model, True) - target.budget(model) - 200  # not far under
    cos = compute(model, "slimllm", CALIB).extras["layer_cosine"]
    lost = [len(plan.removed("channel", l)) for l in range(len(cos))]
    by_cos = sorted(range(len(cos)), key=lambda l: cos[l])
    assert all(lost[a] <= lost[b] for a, b in zip(by_cos, by_cos[1:]))  # more redundant blocks lose more
    assert lost[by_cos[0]] == 0  # 26/32 of 4 blocks = 3 pruned: the least redundant one stays whole
    with torch.no_grad():
        assert torch.isfinite(pruned(CALIB.tokens).logits).all()


def test_slimllm_strategy_needs_cosines_and_refuses_stock(llama):
    with pytest.raises(PlanError, match="cosine"):
        allocate(llama, compute(llama, "magnitude"), 0.2, strategy="slimllm")
    with pytest.raises(PlanError, match="stock"):
        allocate(llama, compute(llama, "slimllm", CALIB), 0.2, strategy="slimllm", deployable="stock")
    plan = allocate(llama, compute(llama, "slimllm", CALIB), 0.2, strategy="slimllm", deployable="vllm")
    assert len({len(plan.kept("head", l)) for l in plan.kept_blocks()}) == 1


def test_uniform_strategy_with_swaps_only(llama):
    """Any strategy works with the swaps: here SlimLLM's scores, uniform allocation, no compensation."""
    plan, pruned = slimllm_prune_to(llama, CALIB, 0.25, strategy="uniform", attn_unit="head", compensation=None)
    assert plan.compensation is None and plan.is_uniform()
    assert dense_params(pruned, True) <= 0.75 * dense_params(llama, True)
    assert apply_plan(llama, plan).state_dict().keys() == pruned.state_dict().keys()


# ---- offloaded models ---------------------------------------------------------------------------------------------

def test_offloaded_model_gives_the_same_scores_cosines_and_swaps(tmp_path):
    from transformers import AutoModelForCausalLM

    from pruneviz.loading import load_offloaded
    from pruneviz.testing import tiny_tokenizer

    tiny_model("llama").save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    resident = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    offloaded = load_offloaded(str(tmp_path / "m"), device="cpu", dtype="float32", offload="disk",
                               resident_layers=0, offload_folder=tmp_path / "off").model
    a, b = compute(resident, "slimllm", CALIB), compute(offloaded, "slimllm", CALIB)
    for m in ("heads", "kv", "channels"):
        assert torch.allclose(a.get(m), b.get(m), rtol=1e-4, atol=1e-5), m
    assert a.extras["layer_cosine"] == pytest.approx(b.extras["layer_cosine"], abs=1e-6)
    plan = allocate(resident, a, 0.3, strategy="slimllm", attn_unit="head")
    assert refine_heads(resident, CALIB, plan) == refine_heads(offloaded, CALIB, plan)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_sequential_channels_keep_the_counts_and_rebuild_with_the_local_refit(family):
    """Block by block channel choice (the official order): per-layer counts, heads and blocks stay the plan's; the
    first pruned layer (dense inputs) removes the map's own lowest channels; the plan names the local refit and
    builds a model of the planned size."""
    from pruneviz.criteria.slimllm import sequential_channels

    model = tiny_model(family)
    imap = compute(model, "slimllm", CALIB)
    plan = allocate(model, imap, 0.3, strategy="uniform", attn_share=0.0)
    seq = sequential_channels(model, CALIB, plan)
    assert seq.compensation == "affine_local" and seq.provenance["channel_order"] == "sequential"
    assert {l: len(c) for l, c in seq.channels} == {l: len(c) for l, c in plan.channels}
    assert seq.kv == plan.kv and seq.heads == plan.heads and seq.blocks == plan.blocks
    first = min(l for l, c in plan.channels if c)
    k = len(plan.removed("channel", first))
    assert set(seq.removed("channel", first)) == set(torch.argsort(imap.channels[first], stable=True)[:k].tolist())
    built = apply_plan(model, seq, calibration=CALIB.tokens)
    assert dense_params(built) == seq.param_count(model)
    with torch.no_grad():
        assert torch.isfinite(built(CALIB.tokens).logits).all()


def test_sequential_channels_refuse_sub_block_plans(llama):
    from pruneviz.criteria.slimllm import sequential_channels

    g = geometry_of(llama)
    plan = Plan.empty(llama).with_units("kv", 1, range(g.n_kv))  # layer 1's whole attention: a sub-block
    with pytest.raises(PlanError, match="without removed sub-blocks"):
        sequential_channels(llama, CALIB, plan)
