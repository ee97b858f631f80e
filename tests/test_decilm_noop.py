"""DeciLM ``no_op`` sub-layers: BlockPruner plans (a kept layer without attention, or without MLP) exported for vLLM's
``DeciLMForCausalLM`` with per-layer widths, read back without the folder's code (identical logits, ``generate`` with
the KV cache), checked against the tensor shapes vLLM builds (tests/test_deploy.py's ``vllm_shapes``), and the
refusals: an attention-free first layer (vLLM's forward needs it) and a layer with both sub-blocks removed (a block)."""
import json

import pytest
import torch
from test_deploy import WIDE, file_shapes, vllm_shapes

from pruneviz.deploy import REMOTE, VLLM, runtimes, supported
from pruneviz.errors import ExportError
from pruneviz.export import save_pruned
from pruneviz.loading import load_pruned_folder
from pruneviz.modeling_pruneviz import AbsentAttention, AbsentMLP
from pruneviz.plan import Plan
from pruneviz.surgery import apply_plan
from pruneviz.testing import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
IDS = torch.randint(4, 90, (2, 14), generator=torch.Generator().manual_seed(3))


def widths(model) -> Plan:
    """4 of 8 query heads in every layer, as 2, 4, 2 and 2 KV heads (whole groups, or one head of every group);
    MLP widths 37, 40, 40, 39."""
    e = Plan.empty(model).with_units("kv", 0, [0, 1]).with_units("head", 1, [0, 2, 4, 6])
    e = e.with_units("kv", 2, [1, 2]).with_units("kv", 3, [2, 3])
    return e.with_units("channel", 0, [1, 2, 5]).with_units("channel", 3, [9])


CASES = {  # name -> plan on top of the per-layer widths
    "attention": lambda p: p.without_attention(2),
    "mlp": lambda p: p.without_mlp(1),
    "both kinds and a block": lambda p: p.without_attention(3).without_mlp(1).with_units("block", None, [2]),
}


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("case", list(CASES))
def test_no_op_sub_layers_export_reload_and_match_vllms_schema(family, case, tmp_path):
    model = tiny_model(family, **WIDE)
    plan = CASES[case](widths(model))
    assert plan.removed_sub_blocks()
    pruned = apply_plan(model, plan)
    got = {r.name: r for r in runtimes(model, plan)}
    assert got[VLLM].ok and got[VLLM].format == "decilm" and "no_op" in got[VLLM].reason and got[REMOTE].ok
    assert runtimes(model, plan) == runtimes(pruned)  # the skeleton's answer is the built model's

    folder = tmp_path / "out"
    report = save_pruned(pruned, tiny_tokenizer(), folder, plan=plan, format="decilm")
    assert report.format == "decilm" and report.ok and report.reload_max_abs_diff == 0.0
    cfg = json.loads((folder / "config.json").read_text())
    kept = plan.kept_blocks()
    assert [b["attention"]["no_op"] for b in cfg["block_configs"]] == [plan.attention_removed(l) for l in kept]
    assert [b["ffn"]["no_op"] for b in cfg["block_configs"]] == [plan.mlp_removed(l) for l in kept]
    for b, layer in zip(cfg["block_configs"], kept):
        assert b["attention"]["n_heads_in_group"] == (None if plan.attention_removed(layer) else
                                                      4 // len(plan.kept("kv", layer)))
        assert b["ffn"]["intermediate_size"] == (None if plan.mlp_removed(layer) else len(plan.kept("channel", layer)))
        assert not b["attention"]["replace_with_linear"] and not b["ffn"]["replace_with_linear"]
    assert cfg["num_attention_heads"] == 4 and cfg["num_hidden_layers"] == len(kept)

    have = file_shapes(folder)
    assert have == vllm_shapes(folder)  # every tensor vLLM builds, nothing it would refuse
    for i, layer in enumerate(kept):  # a no_op sub-layer: neither its weights nor its pre-norm
        attn = [k for k in have if k.startswith((f"model.layers.{i}.self_attn.", f"model.layers.{i}.input_layernorm"))]
        mlp = [k for k in have if k.startswith((f"model.layers.{i}.mlp.",
                                                f"model.layers.{i}.post_attention_layernorm"))]
        assert (not attn) == plan.attention_removed(layer) and (not mlp) == plan.mlp_removed(layer)

    again = load_pruned_folder(folder)  # no folder code runs: LLaMA with pruneviz's stand-ins
    diff = (logits(again) - logits(pruned)).abs().max().item()
    assert diff == 0.0
    for i, layer in enumerate(kept):
        assert isinstance(again.model.layers[i].self_attn, AbsentAttention) == plan.attention_removed(layer)
        assert isinstance(again.model.layers[i].mlp, AbsentMLP) == plan.mlp_removed(layer)
    assert supported(again)[VLLM]  # the reloaded folder classifies as it was written

    prompt, kw = IDS[:, :5], dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    cached = again.generate(prompt, **kw)
    assert torch.equal(cached, again.generate(prompt, use_cache=False, **kw))
    assert torch.equal(cached, pruned.generate(prompt, **kw))
    out = again(prompt, use_cache=True)
    assert out.past_key_values.get_seq_length() == 5


def test_an_attention_free_first_layer_is_refused_before_writing(tmp_path):
    model = tiny_model("llama")
    plan = Plan.empty(model).without_attention(0).without_mlp(2)
    got = supported(model, plan)
    assert not got[VLLM] and got[REMOTE]
    assert "first layer" in {r.name: r for r in runtimes(model, plan)}[VLLM].reason
    with pytest.raises(ExportError, match="first layer has no attention"):
        save_pruned(apply_plan(model, plan), tiny_tokenizer(), tmp_path / "out", plan=plan, format="decilm")
    assert list(tmp_path.iterdir()) == []
    shifted = Plan.empty(model).with_units("block", None, [0]).without_attention(1)  # block 0 gone: layer 1 first
    assert not supported(model, shifted)[VLLM]
    assert supported(model, Plan.empty(model).with_units("block", None, [0]).without_attention(2))[VLLM]
    from pruneviz.allocate import deployable_refusal  # allocation's structural rule says the same

    assert "first layer" in deployable_refusal(model, plan, "vllm")
    assert "first layer" in deployable_refusal(model, shifted, "vllm")
    assert deployable_refusal(model, Plan.empty(model).without_attention(1), "vllm") is None


def test_a_layer_with_both_sub_blocks_removed_is_refused_with_remove_the_block(tmp_path):
    model = tiny_model("llama")
    g_hidden = model.config.hidden_size
    plan = Plan.empty(model).without_attention(2)
    assert Plan.empty(model).without_attention(2).without_mlp(2).blocks == (2,)  # plans make it a block
    pruned = apply_plan(model, plan)
    layer = pruned.model.layers[2]  # by hand: the MLP of the attention-free layer as well
    layer.mlp, layer.post_attention_layernorm = AbsentMLP(g_hidden), torch.nn.Identity()
    assert not supported(pruned)[VLLM]
    with pytest.raises(ExportError, match="remove the block"):
        save_pruned(pruned, tiny_tokenizer(), tmp_path / "out", plan=plan, format="decilm")
    assert list(tmp_path.iterdir()) == []


def test_reader_refuses_what_it_does_not_build(tmp_path):
    model = tiny_model("llama")
    plan = Plan.empty(model).without_attention(1)
    save_pruned(apply_plan(model, plan), None, tmp_path / "out", plan=plan, format="decilm")
    cfg_file = tmp_path / "out" / "config.json"
    good = json.loads(cfg_file.read_text())
    assert load_pruned_folder(tmp_path / "out") is not None
    for edit, words in ((lambda c: c["block_configs"][1]["ffn"].update(no_op=True), "remove the block"),
                        (lambda c: c["block_configs"][2]["ffn"].update(replace_with_linear=True),
                         "replace_with_linear")):
        cfg = json.loads(json.dumps(good))
        edit(cfg)
        cfg_file.write_text(json.dumps(cfg))
        with pytest.raises(ExportError, match=words):
            load_pruned_folder(tmp_path / "out")
