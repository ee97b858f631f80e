"""What each family changes beyond shapes (tests/test_surgery.py and tests/test_export.py run the shared invariants on
every family in ``pruneviz.testing.FAMILIES``): generic llama-like detection and refusals, Qwen3's per-head and
OLMo 2's whole-projection q/k norms, Gemma's (1 + w) norms and post-norms, multi-query attention, Phi-3's fused
projections, SmolLM3's layers without rotary embeddings, stock exports, every criterion and offloaded scoring.
"""
import json

import pytest
import torch
import transformers as tf

from pruneviz import importance
from pruneviz.allocate import allocate, effective_attn_unit
from pruneviz.arch import (
    adapter_for,
    family_notes,
    geometry_of,
    get_path,
    norm_offset_of,
    resize_projection_norm,
    unit_params,
)
from pruneviz.criteria.slimgpt import slimgpt_prune
from pruneviz.errors import CriterionError, PlanError
from pruneviz.evaluate import flops_per_token, kv_cache_bytes
from pruneviz.export import save_pruned
from pruneviz.importance import Calibration, make_options
from pruneviz.plan import Plan, dense_params
from pruneviz.surgery import apply_plan, masked_model
from pruneviz.testing import FAMILIES, GENERIC_FAMILIES, tiny_model, tiny_tokenizer

NEW = ("gemma2", "gemma3_text", "phi3", "granite", "olmo2", "smollm3", "olmo3")
CALIB = Calibration(torch.randint(4, 90, (4, 16), generator=torch.Generator().manual_seed(3)), "random")
IDS = torch.randint(4, 90, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


# ---- which adapter, and what is refused ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_an_adapter_and_only_generic_ones_say_so(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    assert model.config.model_type in adapter.model_types
    notes = " ".join(family_notes(model))
    assert ("generic llama-like" in notes) == (family in GENERIC_FAMILIES)


def test_generic_detection_reads_post_norms_and_whole_projection_norms():
    model = tiny_model("olmo3")  # OLMo 3: no adapter written; OLMo 2's layout plus sliding windows
    adapter = adapter_for(model)
    assert adapter.family == "llama-like"
    assert adapter.post_norms == ("post_attention_layernorm", "post_feedforward_layernorm")
    assert adapter.proj_norms == {"self_attn.q_proj": "self_attn.q_norm", "self_attn.k_proj": "self_attn.k_norm"}
    assert adapter.norm_offset == 0.0 and "layer_types" in adapter.layer_lists
    assert adapter_for(model.config) is not None  # config only: read from a weightless skeleton
    assert geometry_of(model.config) == geometry_of(model)


def test_generic_detection_of_a_plain_llama_named_family_prunes_exactly():
    cfg = tf.HeliumConfig(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    adapter = adapter_for(model)
    assert adapter.family == "llama-like" and not adapter.post_norms and not adapter.proj_norms
    assert "generic llama-like" in adapter.note and "'helium'" in adapter.note
    plan = Plan.empty(model).with_units("kv", 0, [1]).with_units("channel", 2, [0, 7, 9])
    assert (logits(apply_plan(model, plan)) - logits(masked_model(model, plan))).abs().max() < 1e-5


@pytest.mark.parametrize("config, words", [
    (lambda: tf.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4),
     ("mixture-of-experts", "experts = 4")),
    (lambda: tf.Qwen2MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                               moe_intermediate_size=16, shared_expert_intermediate_size=16),
     ("mixture-of-experts",)),
    (lambda: tf.MambaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, state_size=4),
     ("state-space",)),
])
def test_mixture_of_experts_and_state_space_layers_are_refused_with_the_reason(config, words):
    cfg = config()
    model = tf.AutoModelForCausalLM.from_config(cfg)
    for target in (model, cfg):
        with pytest.raises(PlanError) as e:
            adapter_for(target)
        assert all(w in str(e.value) for w in words) and "llama" in str(e.value)


def test_a_llama_named_model_with_unknown_block_parameters_is_refused():
    model = tiny_model("llama", num_hidden_layers=2)
    model.model.layers[0].self_attn.register_parameter("sinks", torch.nn.Parameter(torch.zeros(6)))
    model.config.model_type = "llama_with_sinks"
    with pytest.raises(PlanError, match="no pruneviz unit declares.*sinks"):
        adapter_for(model)


# ---- q/k norms -----------------------------------------------------------------------------------------------------

def test_qwen3_head_removal_keeps_its_per_head_norms_whole():
    model = tiny_model("qwen3")
    g = geometry_of(model)
    plan = Plan.empty(model).with_units("kv", 1, [0]).with_units("head", 2, [g.heads_of(k)[0] for k in range(3)])
    pruned = apply_plan(model, plan)
    for layer in (1, 2):
        attn = adapter_for(pruned).layers(pruned)[layer].self_attn
        assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (g.head_dim,)
    assert (logits(pruned) - logits(masked_model(model, plan))).abs().max() < 1e-5


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_whole_projection_norm_resizing_equals_zeroed_features(offset):
    """RMSNorm over N features with some of them zero == the resized norm over the K others (float64)."""

    class Norm(torch.nn.Module):  # LLaMA-style (offset 0) or Gemma-style (offset 1) RMSNorm
        def __init__(self, n):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(n, dtype=torch.float64))
            self.variance_epsilon = 1e-2  # large, so a wrong epsilon would show

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (offset + self.weight)

    torch.manual_seed(0)
    norm, gone = Norm(24), {1, 2, 3, 17}
    keep = [i for i in range(24) if i not in gone]
    x = torch.randn(5, 24, dtype=torch.float64)
    x[:, sorted(gone)] = 0.0
    want = norm(x)[:, keep]
    assert norm_offset_of(norm) == offset
    entry = resize_projection_norm(norm, gone, offset)
    assert entry == [20, "variance_epsilon", pytest.approx(1e-2 * 24 / 20)]
    torch.testing.assert_close(norm(x[:, keep]), want, rtol=1e-12, atol=1e-12)


def test_olmo2_head_removal_rescales_its_whole_projection_norms_and_exports_pruneviz(tmp_path):
    model = tiny_model("olmo2")
    g = geometry_of(model)
    plan = Plan.empty(model).with_units("kv", 1, [0]).with_units("head", 2, [g.heads_of(k)[2] for k in range(2)])
    pruned = apply_plan(model, plan)
    layers = adapter_for(pruned).layers(pruned)
    assert layers[1].self_attn.q_norm.weight.shape == (3 * g.head_dim,)
    assert layers[1].self_attn.k_norm.weight.shape == (g.head_dim,)
    assert layers[1].self_attn.k_norm.variance_epsilon == pytest.approx(model.config.rms_norm_eps * 2)
    assert layers[0].self_attn.q_norm.variance_epsilon == model.config.rms_norm_eps  # untouched layer
    assert dense_params(pruned) == plan.param_count(model)
    uniform = Plan.empty(model)
    for layer in range(g.n_layers):
        uniform = uniform.with_units("kv", layer, [0])
    report = save_pruned(apply_plan(model, uniform), tiny_tokenizer(), tmp_path / "o", plan=uniform)
    assert report.format == "pruneviz" and report.reload_max_abs_diff == 0.0  # per-layer epsilons: not stock


# ---- Gemma: (1 + w) norms, post-norms, multi-query attention ---------------------------------------------------------

@pytest.mark.parametrize("family, offset", [("llama", 0.0), ("gemma2", 1.0), ("gemma3_text", 1.0)])
def test_magnitude_scores_a_norm_by_the_scale_it_applies(family, offset):
    model = tiny_model(family)
    assert adapter_for(model).norm_offset == offset
    assert norm_offset_of(adapter_for(model).layers(model)[0].input_layernorm) == offset
    blocks = importance.compute(model, "magnitude", None).blocks
    layer = adapter_for(model).layers(model)[1]
    want = sum((p + offset if p.ndim == 1 else p).abs().sum() for n, p in layer.named_parameters()
               if n.endswith("weight"))
    assert blocks[1].item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "olmo2", "olmo3"])
def test_compensations_that_assume_a_plain_residual_refuse_post_norm_families(family):
    import dataclasses

    model = tiny_model(family)
    plan = dataclasses.replace(Plan.empty(model).with_units("channel", 1, [0, 1]), compensation="flap_bias")
    with pytest.raises(CriterionError, match="FLAP's bias compensation.*post_feedforward_layernorm"):
        apply_plan(model, plan, calibration=CALIB.tokens)
    with pytest.raises(CriterionError, match="SlimGPT.*normalise"):
        slimgpt_prune(model, CALIB, 0.2)
    assert "refused" in " ".join(family_notes(model))
    imap = importance.compute(model, "flap", CALIB)  # the scores themselves stay available
    assert torch.isfinite(imap.channels).all()


def test_multi_query_attention_prunes_query_heads_and_keeps_the_kv_cache():
    model = tiny_model("gemma3_text")
    g = geometry_of(model)
    assert g.n_kv == 1 and "multi-query" in g.describe()
    assert effective_attn_unit("kv", g) == effective_attn_unit("head", g) == "head"
    imap = importance.compute(model, "magnitude", None)
    plan = allocate(model, imap, 0.2, "uniform", attn_unit="kv", attn_rounding="nearest")  # down: MLP only here
    plan.validate(model, physical=True)
    assert any(plan.removed("head", layer) for layer in range(g.n_layers)) and not any(
        plan.removed("kv", layer) for layer in range(g.n_layers))
    heads_only = Plan.empty(model).with_units("head", 0, [1, 3]).with_units("head", 2, [0])
    pruned = apply_plan(model, heads_only)
    assert kv_cache_bytes(pruned, 64) == kv_cache_bytes(model, 64)
    assert flops_per_token(pruned, 64) < flops_per_token(model, 64)
    assert unit_params(g, adapter_for(model), model, "head") == 2 * g.head_dim * g.hidden
    assert any("not the KV cache" in n for n in family_notes(model))
    gone = Plan.empty(model).with_units("kv", 0, [0])  # the one KV head: the whole attention sub-block (BlockPruner)
    assert gone.attention_removed(0)
    assert kv_cache_bytes(apply_plan(model, gone), 64) * g.n_layers == kv_cache_bytes(model, 64) * (g.n_layers - 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_sub_blocks_are_exact_and_keep_the_kv_cache_working(family):
    """A layer without attention and one without MLP (BlockPruner): pruned = masked, exact parameter count, the same
    greedy tokens with and without the KV cache; refused where the family adds the residual inside the sub-block."""
    model = tiny_model(family)
    plan = Plan.empty(model).without_attention(0).without_mlp(1)
    if adapter_for(model).sub_block("attn", model.config) is None:
        with pytest.raises(PlanError, match="alone"):
            apply_plan(model, plan)
        return
    pruned = apply_plan(model, plan)
    assert (logits(pruned) - logits(masked_model(model, plan))).abs().max() < 1e-5
    assert dense_params(pruned) == plan.param_count(model)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(pruned.generate(IDS[:, :4], **kw), pruned.generate(IDS[:, :4], use_cache=False, **kw))


def test_gemma_sliding_window_and_soft_capping_survive_depth_removal():
    model = tiny_model("gemma2")
    plan = Plan.empty(model).with_units("block", None, [0]).with_units("head", 3, [0, 2])
    pruned = apply_plan(model, plan)
    assert pruned.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    assert [layer.self_attn.sliding_window for layer in pruned.model.layers] == [None, 6, None]
    a = pruned.generate(IDS[:1], max_new_tokens=10, do_sample=False)  # past the 6-token window
    b = masked_model(model, plan).generate(IDS[:1], max_new_tokens=10, do_sample=False)
    assert torch.equal(a, b)


def test_large_vocabulary_share_is_stated():
    model = tiny_model("gemma2", vocab_size=2048)  # 2048 x 32 tied embeddings: 2/3 of this tiny model
    share = 2048 * 32 / sum(p.numel() for p in model.parameters())
    note = [n for n in family_notes(model) if "embeddings" in n]
    assert note and f"are {share:.0%} of the parameters" in note[0]
    assert f"20% non-embedding cut removes {0.2 * (1 - share):.0%} of them" in note[0]
    assert not [n for n in family_notes(tiny_model("llama", vocab_size=8)) if "embeddings" in n]


# ---- Phi-3 fused projections, SmolLM3 layers without rotary ---------------------------------------------------------

def test_phi3_fused_rows_and_per_layer_config_view(tmp_path):
    model = tiny_model("phi3")
    g = geometry_of(model)
    plan = Plan.empty(model).with_units("channel", 0, [0, 39]).with_units("kv", 1, [1])
    pruned = apply_plan(model, plan)
    layers = pruned.model.layers
    assert layers[0].mlp.gate_up_proj.weight.shape[0] == 2 * (g.n_channels - 2)
    assert layers[1].self_attn.qkv_proj.weight.shape[0] == (3 + 2 * 1) * g.head_dim
    assert layers[1].self_attn.config.num_attention_heads == 3 and pruned.config.num_attention_heads == 6
    assert layers[2].self_attn.config is pruned.config
    pruned.config._attn_implementation = "eager"  # the view follows the shared config
    assert layers[1].self_attn.config._attn_implementation == "eager"
    kept_gate = torch.cat([model.model.layers[0].mlp.gate_up_proj.weight[1:39],
                           model.model.layers[0].mlp.gate_up_proj.weight[41:79]])
    assert torch.equal(layers[0].mlp.gate_up_proj.weight, kept_gate)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "phi3", "granite", "smollm3", "olmo2"])
def test_uniform_plans_export_in_the_stock_format(family, tmp_path):
    model = tiny_model(family)
    g = geometry_of(model)
    plan = Plan.empty(model)
    for layer in range(g.n_layers):
        plan = plan.with_units("channel", layer, [0, 3])
        if family != "olmo2":  # OLMo 2's resized q/k norms are not stock-expressible (tested above)
            heads = [0, 1] if g.n_kv == 1 else [g.heads_of(k)[0] for k in range(g.n_kv)]  # hidden % heads == 0
            plan = plan.with_units("head", layer, heads)
    pruned = apply_plan(model, plan)
    report = save_pruned(pruned, tiny_tokenizer(), tmp_path / "s", plan=plan)
    assert report.format == "stock" and report.reload_max_abs_diff == 0.0
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["intermediate_size"] == g.n_channels - 2 and "auto_map" not in cfg
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert torch.equal(logits(plain), logits(pruned))


def test_smollm3_depth_removal_reindexes_its_no_rope_layers(tmp_path):
    model = tiny_model("smollm3")
    assert model.config.no_rope_layers == [1, 0, 1, 0]
    plan = Plan.empty(model).with_units("block", None, [0])
    pruned = apply_plan(model, plan)
    assert pruned.config.no_rope_layers == [0, 1, 0]
    assert [layer.self_attn.use_rope for layer in pruned.model.layers] == [0, 1, 0]
    report = save_pruned(pruned, tiny_tokenizer(), tmp_path / "d", plan=plan)
    assert report.reload_max_abs_diff == 0.0


# ---- every criterion and the offloaded path on the new families ---------------------------------------------------

@pytest.mark.parametrize("family", NEW)
def test_every_criterion_scores_the_new_families(family):
    model = tiny_model(family)
    g = geometry_of(model)
    want = {"heads": (g.n_layers, g.n_heads), "kv": (g.n_layers, g.n_kv), "channels": (g.n_layers, g.n_channels),
            "blocks": (g.n_layers,)}
    fast = {"minillm": dict(queries=2, queries_per_pass=2)}
    for name in ("magnitude", "wanda_sp", "flap", "taylor", "minillm", "slimgpt", "block_influence", "blockpruner"):
        imap = importance.compute(model, name, CALIB, make_options(name, **fast.get(name, {})))
        for m in imap.available():
            assert tuple(imap.get(m).shape) == want[m] and torch.isfinite(imap.get(m)).all(), (name, m)


@pytest.mark.parametrize("family", ["phi3", "granite", "smollm3"])
def test_slimgpt_solver_runs_on_families_without_post_norms(family):
    model = tiny_model(family)
    plan, pruned = slimgpt_prune(model, CALIB, 0.3)
    plan.validate(model, physical=True)
    again = apply_plan(model, plan, calibration=CALIB.tokens)
    torch.testing.assert_close(logits(again), logits(pruned), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", NEW)
def test_offloaded_scores_equal_resident_scores(family, tmp_path):
    from pruneviz.loading import load_offloaded
    from pruneviz.offload import is_offloaded

    path = tmp_path / family
    tiny_model(family).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    resident = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    off = load_offloaded(str(path), device="cpu", dtype="float32", offload="disk",
                         offload_folder=tmp_path / "off").model
    assert is_offloaded(off)
    for name in ("magnitude", "wanda_sp"):
        want, got = importance.compute(resident, name, CALIB), importance.compute(off, name, CALIB)
        for kind in want.available():
            torch.testing.assert_close(got.get(kind), want.get(kind), rtol=1e-4, atol=1e-5)
    plan = Plan.empty(resident).with_units("channel", 1, range(5)).with_units("block", None, [2])
    torch.testing.assert_close(logits(apply_plan(off, plan)), logits(apply_plan(resident, plan)), rtol=1e-5,
                               atol=1e-5)


def test_config_lists_of_layers_are_what_generic_depth_removal_reindexes():
    model = tiny_model("olmo3")
    pruned = apply_plan(model, Plan.empty(model).with_units("block", None, [1]))
    assert pruned.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert [get_path(layer, "self_attn").sliding_window for layer in pruned.model.layers] == [6, 6, None]
