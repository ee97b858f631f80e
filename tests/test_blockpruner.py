"""BlockPruner (arXiv 2406.10594): removed attention / MLP sub-blocks in plans, surgery, masking, the KV cache, exports
(pruneviz format both ways, GGUF ``deci`` attention-free layers), and the criterion, the one-shot ``sub_blocks``
strategy and the iterative search checked against brute force on tiny models."""
import json
import math

import pytest
import torch
import transformers as tf

from pruneviz.allocate import Target, allocate, param_record
from pruneviz.arch import adapter_for, geometry_of
from pruneviz.cli import main
from pruneviz.criteria.blockpruner import (
    BlockPrunerOptions,
    blockpruner_search,
    removable,
    sub_block_order,
    sub_block_plan,
    sub_block_scores,
)
from pruneviz.criteria.depth import calibration_ppl
from pruneviz.errors import ExportError, PlanError
from pruneviz.export import load_pruned_folder, save_pruned, write_plan
from pruneviz.importance import Calibration, compute
from pruneviz.modeling_pruneviz import AbsentAttention
from pruneviz.plan import Plan, dense_params
from pruneviz.progress import Cancelled
from pruneviz.surgery import apply_plan, masked_model, masking
from pruneviz.testing import tiny_model, tiny_tokenizer

SUB = ("llama", "qwen2", "gemma2", "gemma3_text", "olmo2", "phi3", "opt", "gpt2")  # gemma*/olmo2: post-norms
IDS = torch.randint(4, 90, (2, 14), generator=torch.Generator().manual_seed(1))
CALIB = Calibration(torch.randint(4, 90, (3, 12), generator=torch.Generator().manual_seed(2)), "random")


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def sub_plan(model):
    """Attention gone in layer 0 (the layer whose cache length positions read), MLP gone in layer 1, both gone in
    the last layer (a block), and a few channels of layer 2."""
    g = geometry_of(model)
    last = g.n_layers - 1
    return (Plan.empty(model).without_attention(0).without_mlp(1).with_units("channel", 2, [1, 3])
            .without_attention(last).without_mlp(last))


# ---- plans --------------------------------------------------------------------------------------------------------

def test_normal_form_queries_and_json():
    model = tiny_model("llama")
    g = geometry_of(model)
    plan = sub_plan(model)
    assert plan.blocks == (g.n_layers - 1,)  # both sub-blocks of a layer = the block
    assert plan.attention_removed(0) and not plan.mlp_removed(0)
    assert plan.mlp_removed(1) and not plan.attention_removed(1)
    assert plan.removed_sub_blocks() == ((0, "attn"), (1, "mlp"))
    assert plan.removed_heads_all(0) == tuple(range(g.n_heads)) and plan.removed("head", 0) == ()
    assert "1 attention and 1 MLP sub-blocks removed" in plan.summary()
    assert Plan.from_json(plan.to_json()) == plan and Plan.from_json(plan.to_json()).sha256() == plan.sha256()
    # every head one by one, or every KV group, is the same removed attention
    heads = Plan.empty(model).with_units("head", 0, range(g.n_heads))
    assert heads == Plan.empty(model).without_attention(0) == sub_block_plan(model, [(0, "attn")])
    with pytest.raises(PlanError, match="'attn' or 'mlp'"):
        plan.without_sub_block(0, "norm")


def test_multi_query_attention_removing_the_one_kv_head_removes_the_attention():
    model = tiny_model("gemma3_text")
    g = geometry_of(model)
    assert g.n_kv == 1
    by_heads = Plan.empty(model).with_units("head", 2, range(g.n_heads))
    assert by_heads.attention_removed(2) and by_heads == Plan.empty(model).without_attention(2)
    partial = Plan.empty(model).with_units("head", 2, [0])
    assert not partial.attention_removed(2)


def test_partial_heads_still_need_gqa_uniformity_and_bloom_refuses_sub_blocks():
    model = tiny_model("llama")
    g = geometry_of(model)
    uneven = Plan.empty(model).with_units("head", 0, [0])  # one head of group 0 only
    with pytest.raises(PlanError, match="same number in every kept group"):
        uneven.validate(model, physical=True)
    bloom = tiny_model("bloom")
    for plan in (Plan.empty(bloom).without_attention(0), Plan.empty(bloom).without_mlp(1)):
        with pytest.raises(PlanError, match="cannot drop the .* alone"):
            apply_plan(bloom, plan)
        with pytest.raises(PlanError, match="remove the whole block"):
            masked_model(bloom, plan)
    assert removable(bloom, []) == []
    assert g.n_kv > 1


def test_every_sub_block_removed_would_be_every_block():
    model = tiny_model("opt")
    plan = Plan.empty(model)
    for layer in range(geometry_of(model).n_layers):
        plan = plan.without_attention(layer).without_mlp(layer)
    with pytest.raises(PlanError, match="removes every block"):
        plan.validate(model)


# ---- surgery, masking, arithmetic, KV cache --------------------------------------------------------------------------

@pytest.mark.parametrize("family", SUB)
def test_empty_plan_gives_identical_logits(family):
    model = tiny_model(family)
    assert torch.equal(logits(apply_plan(model, Plan.empty(model))), logits(model))


@pytest.mark.parametrize("family", SUB)
def test_removed_sub_blocks_prune_exactly_like_masking(family):
    """float64: pruned = masked, the parameter count is exact, the base is untouched, and the removed sub-block is
    gone with its norms (post-norms too)."""
    model = tiny_model(family).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = sub_plan(model)
    pruned = apply_plan(model, plan)
    assert (logits(pruned) - logits(masked_model(model, plan))).abs().max() < 1e-12
    assert (logits(pruned) - logits(model)).abs().max() > 1e-3  # it did remove something
    assert dense_params(pruned) == plan.param_count(model)
    assert dense_params(pruned, True) == plan.param_count(model, non_embedding=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    adapter = adapter_for(model)
    layers = adapter.layers(pruned)
    attn, mlp = adapter.sub_block("attn", model.config), adapter.sub_block("mlp", model.config)
    names0 = {n for n, _ in layers[0].named_parameters()}
    names1 = {n for n, _ in layers[1].named_parameters()}
    assert not any(n.startswith(tuple(p + "." for p in attn.modules + attn.norms)) for n in names0)
    assert not any(n.startswith(tuple(p + "." for p in mlp.modules + mlp.norms)) for n in names1)
    assert not adapter.has_attention(layers[0]) and adapter.has_attention(layers[1])
    layout = pruned.config.pruneviz_layout["layers"]
    assert set(layout["0"]["absent"]) == set(attn.modules + attn.norms)


@pytest.mark.parametrize("family", SUB)
def test_generate_with_the_kv_cache_matches_no_cache_and_masking(family):
    model = tiny_model(family)
    plan = sub_plan(model)
    pruned = apply_plan(model, plan)
    prompt = IDS[:, :5]
    kw = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    cached = pruned.generate(prompt, **kw)
    assert torch.equal(cached, pruned.generate(prompt, use_cache=False, **kw))
    assert torch.equal(cached, masked_model(model, plan).generate(prompt, **kw))
    out = pruned(prompt, use_cache=True)
    cache = getattr(out.past_key_values, "self_attention_cache", out.past_key_values)
    assert cache.get_seq_length(0) == 5  # the attention-free layer 0 keeps the token count ...
    assert cache.layers[0].keys.shape[1::2] == (1, 1)  # ... and stores one zero feature per token


def test_post_norms_of_removed_sub_blocks_go_with_them():
    model = tiny_model("gemma2")
    pruned = apply_plan(model, sub_plan(model))
    layer0, layer1 = pruned.model.layers[0], pruned.model.layers[1]
    assert isinstance(layer0.self_attn, AbsentAttention)
    assert isinstance(layer0.input_layernorm, torch.nn.Identity)
    assert isinstance(layer0.post_attention_layernorm, torch.nn.Identity)
    assert isinstance(layer1.pre_feedforward_layernorm, torch.nn.Identity)
    assert isinstance(layer1.post_feedforward_layernorm, torch.nn.Identity)
    assert not isinstance(layer1.post_attention_layernorm, torch.nn.Identity)


# ---- export ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gemma3_text", "opt", "gpt2"])
def test_export_reloads_identically_in_the_pruneviz_format(family, tmp_path):
    model = tiny_model(family)
    uniform = Plan.empty(model)
    for layer in range(geometry_of(model).n_layers):  # the same in every layer: stock still cannot express it
        uniform = uniform.without_attention(layer)
    for i, plan in enumerate((sub_plan(model), uniform)):
        pruned = apply_plan(model, plan)
        report = save_pruned(pruned, tiny_tokenizer(), tmp_path / f"out{i}", plan=plan)
        assert report.format == "pruneviz" and report.reload_max_abs_diff == 0.0
        assert torch.equal(logits(load_pruned_folder(tmp_path / f"out{i}")), logits(pruned))
        remote = tf.AutoModelForCausalLM.from_pretrained(tmp_path / f"out{i}", trust_remote_code=True)
        assert torch.equal(logits(remote), logits(pruned))
        kw = dict(max_new_tokens=5, do_sample=False, min_new_tokens=5)
        assert torch.equal(remote.generate(IDS[:, :4], **kw), pruned.generate(IDS[:, :4], **kw))


def test_gguf_writes_attention_free_layers_as_deci_and_refuses_mlp_free_ones(tmp_path):
    import pruneviz.gguf_export as G

    model = tiny_model("llama")
    plan = Plan.empty(model).without_attention(0).with_units("kv", 2, [1])
    pruned = apply_plan(model, plan)
    report = G.write_gguf(pruned, None, tmp_path / "a.gguf", "f32")
    assert report.arch == "deci" and report.widths[0] == [0, 0, 40] and report.widths[2] == [3, 1, 40]
    meta, tensors = G.read_gguf_tensors(tmp_path / "a.gguf")
    assert list(meta["deci.attention.head_count"])[:3] == [0, 6, 3]
    assert list(meta["deci.attention.head_count_kv"])[:3] == [0, 2, 1]
    assert not [t for t in tensors if t.startswith("blk.0.attn")] and "blk.1.attn_norm.weight" in tensors
    assert torch.equal(logits(G.read_gguf_into(tmp_path / "a.gguf", pruned)), logits(pruned))
    uniform = Plan.empty(model)
    for layer in range(4):
        uniform = uniform.without_attention(layer)
    assert G.gguf_layout(apply_plan(model, uniform)).arch == "deci"  # uniform, but llama has no n_head = 0
    with pytest.raises(ExportError, match="no MLP left"):
        G.write_gguf(apply_plan(model, Plan.empty(model).without_mlp(1)), None, tmp_path / "b.gguf", "f32")
    assert not (tmp_path / "b.gguf").exists()


# ---- criterion, strategy, search -------------------------------------------------------------------------------------

def brute_force(model, removed):
    """Perplexity with each remaining sub-block removed on top of ``removed``, one masked model at a time."""
    out = {}
    for cand in removable(model, removed):
        with masking(model, sub_block_plan(model, list(removed) + [cand])) as view:
            out[cand] = calibration_ppl(view, CALIB)
    return out


def test_criterion_scores_every_sub_block_by_its_perplexity_when_removed_alone():
    model = tiny_model("qwen2")
    imap = compute(model, "blockpruner", CALIB)
    assert sub_block_scores(imap) == pytest.approx(brute_force(model, []), rel=1e-12)
    g = geometry_of(model)
    with masking(model, Plan.empty(model).with_units("block", None, [1])) as view:
        assert float(imap.blocks[1]) == pytest.approx(calibration_ppl(view, CALIB), rel=1e-6)
    assert imap.extras["base_ppl"] == pytest.approx(calibration_ppl(model, CALIB), rel=1e-12)
    again = type(imap).from_json(imap.to_json())  # the map round-trips with its sub-block table
    assert sub_block_scores(again) == sub_block_scores(imap)
    part = compute(model, "blockpruner", CALIB, BlockPrunerOptions(removed=((0, "attn"),), score_blocks=False))
    scores = sub_block_scores(part)
    assert (0, "attn") not in scores and len(scores) == 2 * g.n_layers - 1 and part.blocks.isnan().all()
    assert scores == pytest.approx(brute_force(model, [(0, "attn")]), rel=1e-12)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_search_removes_the_least_harmful_sub_block_and_rescores_each_step(family):
    model = tiny_model(family)
    target = Target(0.35)
    seen = []
    plan, maps = blockpruner_search(model, CALIB, target, progress=lambda f, msg="": seen.append(f))
    order = [tuple(s) for s in plan.provenance["removal_order"]]
    assert len(maps) == len(order) >= 2
    for k, pick in enumerate(order):  # step k: brute force over the model with the first k removed
        brute = brute_force(model, order[:k])
        assert pick == min(brute, key=lambda s: (brute[s], s[0], s[1] != "attn"))
        assert sub_block_scores(maps[k]) == pytest.approx(brute, rel=1e-12)
    assert plan == sub_block_plan(model, order)
    removed = param_record(model, plan)["non_embedding"]
    before_last = param_record(model, sub_block_plan(model, order[:-1]))["non_embedding"]
    goal = target.budget(model)
    assert removed["before"] - removed["after"] >= goal > before_last["before"] - before_last["after"]
    assert plan.provenance["achieved_ratio"] >= 0.35 and plan.validate(model, physical=True)
    assert seen and all(0 <= f <= 1 for f in seen) and seen == sorted(seen)


def test_search_cancels_and_refuses_what_it_cannot_reach():
    model = tiny_model("llama")
    with pytest.raises(Cancelled):
        blockpruner_search(model, CALIB, 0.3, cancel=lambda: True)
    with pytest.raises(PlanError, match="cannot reach .* bloom blocks cannot drop"):
        blockpruner_search(tiny_model("bloom"), CALIB, 0.2)
    with pytest.raises(PlanError, match="cannot reach .* only one is left"):
        blockpruner_search(tiny_model("opt"), CALIB, Target(0.99))


def test_sub_blocks_strategy_takes_the_lowest_perplexities_at_or_under_the_target():
    model = tiny_model("gemma2")
    imap = compute(model, "blockpruner", CALIB)
    for ratio in (0.1, 0.3, 0.6):
        plan = allocate(model, imap, Target(ratio), strategy="sub_blocks")
        assert plan.provenance["achieved_ratio"] >= ratio
        order = sub_block_order(sub_block_scores(imap))
        k = next(k for k in range(len(order) + 1) if sub_block_plan(model, order[:k]) == plan)
        assert sub_block_plan(model, order[:k - 1]).param_count(model, True) > \
            (1 - ratio) * dense_params(model, True)  # one fewer would miss the target
    with pytest.raises(PlanError, match="no sub-block scores"):
        allocate(model, compute(model, "magnitude"), Target(0.2), strategy="sub_blocks")


# ---- CLI ------------------------------------------------------------------------------------------------------------

def test_cli_plan_runs_the_search_and_allocates_stored_scores(tmp_path, capsys):
    model = tiny_model("llama")
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    common = ["--model", str(folder), "--device", "cpu", "--text", f"file:{tmp_path / 'calib.txt'}",
              "--samples", "3", "--seq-len", "12"]
    assert main(["plan", *common, "--criterion", "blockpruner", "--ratio", "0.3",
                 "--out", str(tmp_path / "p.json")]) == 0
    plan = Plan.from_json((tmp_path / "p.json").read_text())
    assert plan.provenance["search"] == "iterative" and plan.removed_sub_blocks()
    assert main(["score", *common, "--criterion", "blockpruner", "--out", str(tmp_path / "s.json")]) == 0
    assert main(["plan", *common, "--scores", str(tmp_path / "s.json"), "--strategy", "sub_blocks", "--ratio",
                 "0.3", "--out", str(tmp_path / "q.json")]) == 0
    assert json.loads((tmp_path / "q.json").read_text())["provenance"]["strategy"] == "sub_blocks"
    capsys.readouterr()
    assert main(["plan", *common, "--criterion", "ppl", "--ratio", "0.3", "--out", str(tmp_path / "r.json")]) == 2
    assert "iterative search" in capsys.readouterr().err
    write_plan(plan, tmp_path / "again.json")
    assert not math.isnan(plan.provenance["ppl_after_step"][0])
