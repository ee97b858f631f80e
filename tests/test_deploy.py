"""Deployable plans: which runtimes load a plan's export (pruneviz.deploy), allocation restricted to a runtime
(``deployable=``), and the DeciLM ``block_configs`` export for vLLM, checked against a reader that rebuilds every
tensor shape the way vLLM's ``nemotron_nas.py`` does."""
import dataclasses
import json

import pytest
import torch
import transformers as tf
from safetensors import safe_open

from pruneviz import decilm, importance
from pruneviz.allocate import Target, allocate, deployable_refusal, plan_from_ratios
from pruneviz.cli import main
from pruneviz.deploy import LLAMA_CPP, REMOTE, RUNTIMES, STOCK, VLLM, runtimes, supported
from pruneviz.errors import ExportError, PlanError
from pruneviz.export import save_pruned, write_plan
from pruneviz.loading import load_pruned_folder
from pruneviz.plan import Plan, dense_params
from pruneviz.surgery import apply_plan
from pruneviz.testing import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
FAMILIES = ("llama", "qwen2")  # 6 query heads in 2 KV groups of 3, 40 channels


def every_layer(plan: Plan, kind: str, units, layers) -> Plan:
    for layer in layers:
        plan = plan.with_units(kind, layer, units)
    return plan


def plans(model) -> dict[str, Plan]:
    """One plan of each kind the runtimes tell apart (4 layers)."""
    e = Plan.empty(model)
    uniform = every_layer(every_layer(e, "kv", [0], range(4)), "channel", [1, 5], range(4))
    return {
        "uniform": uniform,
        "depth": e.with_units("block", None, [1, 2]),
        "mlp per layer": e.with_units("channel", 0, [1, 2, 3]).with_units("channel", 2, [7]),
        "heads per layer": e.with_units("kv", 0, [0]).with_units("channel", 3, [0, 1]),
        "depth + per-layer mlp": e.with_units("block", None, [3]).with_units("channel", 1, range(10)),
    }


EXPECTED = {  # plan kind -> (stock, vLLM, llama.cpp)
    "uniform": (True, True, True),
    "depth": (True, True, True),
    "mlp per layer": (False, True, True),
    "heads per layer": (False, False, True),  # 3 query heads in layer 0, 6 elsewhere: DeciLM has one count
    "depth + per-layer mlp": (False, True, True),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_runtimes_of_each_plan_kind(family):
    model = tiny_model(family)
    for name, plan in plans(model).items():
        got = supported(model, plan)
        assert list(got) == list(RUNTIMES)
        assert (got[STOCK], got[VLLM], got[LLAMA_CPP]) == EXPECTED[name], name
        assert got[REMOTE]  # the pruneviz layout loads every plan


@pytest.mark.parametrize("family", FAMILIES)
def test_judging_the_plan_equals_judging_the_built_model(family):
    """The weightless skeleton gives exactly the answers of the real pruned model (same checks, same shapes)."""
    model = tiny_model(family)
    probe = model.model.layers[0].self_attn.q_proj.weight.clone()
    for name, plan in plans(model).items():
        assert runtimes(model, plan) == runtimes(apply_plan(model, plan)), name
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, probe)  # the base is untouched


def test_added_biases_of_a_compensation_are_seen_without_running_it():
    """FLAP's bias compensation adds output-projection biases: not stock, still DeciLM (biases as zeros)."""
    model = tiny_model("llama")
    plan = dataclasses.replace(plans(model)["uniform"], compensation="flap_bias")
    got = supported(model, plan)
    assert not got[STOCK] and got[VLLM]
    assert supported(model, plans(model)["uniform"])[STOCK]
    assert "bias" in deployable_refusal(model, plan, "stock")


def test_other_families_are_judged_by_their_exporters():
    gemma = tiny_model("gemma2")  # sliding window, GeGLU: neither DeciLM nor llama.cpp
    got = {r.name: r for r in runtimes(gemma, Plan.empty(gemma).with_units("channel", 0, [1]))}
    assert not got[VLLM].ok and "LLaMA graph" in got[VLLM].reason
    assert not got[LLAMA_CPP].ok and not got[STOCK].ok and got[REMOTE].ok


# ---- deployable allocation ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def deep():
    model = tiny_model("llama", num_hidden_layers=6)
    return model, importance.compute(model, "magnitude")


CASES = [("uniform", "stock", {}), ("depth", "stock", {}), ("combined", "stock", {}),
         ("uniform", "vllm", {}), ("global", "vllm", {"attn_unit": "head", "attn_share": 0.5}),
         ("incremental", "vllm", {"attn_unit": "head", "attn_share": 0.5}), ("combined", "vllm", {"width": "global"}),
         ("global", "vllm", {})]


@pytest.mark.parametrize("strategy, runtime, options", CASES)
def test_deployable_allocations_are_expressible_and_reach_the_target(deep, strategy, runtime, options):
    model, imap = deep
    target = Target(0.2)
    plan = allocate(model, imap, target, strategy=strategy, deployable=runtime, **options)
    removed = dense_params(model, True) - plan.param_count(model, non_embedding=True)
    assert removed >= target.budget(model) - 1e-6  # at or under the target size
    assert deployable_refusal(model, plan, runtime) is None
    assert supported(model, plan)[STOCK if runtime == "stock" else VLLM]
    assert plan.provenance["options"]["deployable"] == runtime


def test_vllm_keeps_the_strategys_per_layer_mlp_and_cuts_attention_alike(deep):
    """Not vacuous: free global allocation varies query heads per layer; deployable='vllm' keeps one count
    (attention really cut) and still varies the MLP widths."""
    model, imap = deep
    free = allocate(model, imap, 0.3, strategy="global", attn_unit="head", attn_share=0.5)
    heads = lambda p: {len(p.kept("head", l)) for l in p.kept_blocks()}  # noqa: E731
    chans = lambda p: {len(p.kept("channel", l)) for l in p.kept_blocks()}  # noqa: E731
    assert len(heads(free)) > 1 and not supported(model, free)[VLLM]
    plan = allocate(model, imap, 0.3, strategy="global", attn_unit="head", attn_share=0.5, deployable="vllm")
    assert heads(plan) == {4} and len(chans(plan)) > 1 and supported(model, plan)[VLLM]


@pytest.mark.parametrize("strategy, options, words", [
    ("global", {}, "use strategy uniform, depth or combined"),
    ("incremental", {}, "use strategy uniform"),
    ("uniform", {"skip_first": 1}, "skip_first/skip_last"),
    ("combined", {"width": "global"}, "global allocation does not give")])
def test_stock_refuses_what_it_cannot_express_and_says_what_to_use(deep, strategy, options, words):
    model, imap = deep
    with pytest.raises(PlanError, match=words):
        allocate(model, imap, 0.2, strategy=strategy, deployable="stock", **options)


def test_vllm_refuses_other_families_and_bad_values(deep):
    gemma = tiny_model("gemma2")
    with pytest.raises(PlanError, match="LLaMA graph"):
        allocate(gemma, importance.compute(gemma, "magnitude"), 0.2, deployable="vllm")
    model, imap = deep
    with pytest.raises(PlanError, match="deployable must be one of"):
        allocate(model, imap, 0.2, deployable="tensorrt")


def test_sliders_with_deployable(deep):
    model, imap = deep
    plan = plan_from_ratios(model, imap, head_ratio=0.5, channel_ratio=0.3, strategy="global", attn_unit="head",
                            deployable="vllm")
    assert len({len(plan.kept("head", l)) for l in plan.kept_blocks()}) == 1 and supported(model, plan)[VLLM]
    assert not plan_from_ratios(model, imap, head_ratio=0.5, strategy="global", attn_unit="head").is_uniform()
    with pytest.raises(PlanError, match="stock"):
        plan_from_ratios(model, imap, channel_ratio=0.3, strategy="global", deployable="stock")


# ---- the DeciLM export -------------------------------------------------------------------------------------------

def find_multiple(n, k):
    return n if n % k == 0 else n + k - n % k


def vllm_shapes(folder) -> dict[str, tuple]:
    """What vLLM's DeciLMForCausalLM (nemotron_nas.py) builds for this folder: the config is read with the folder's
    own config class, as `vllm serve --trust-remote-code` does, and the shapes follow DeciLMDecoderLayer."""
    cfg = tf.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert cfg.model_type == "nemotron-nas" and cfg.architectures == ["DeciLMForCausalLM"]
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or hidden // heads
    attention_bias = getattr(cfg, "attention_bias", False) or getattr(cfg, "bias", False)
    o_bias, qkv_bias = attention_bias, (cfg.qkv_bias if hasattr(cfg, "qkv_bias") else attention_bias)
    mlp_bias = getattr(cfg, "mlp_bias", False)
    # DeciModel.forward starts the residual stream in the first layer's attention norm; the KV-head count vLLM
    # reports is the first attention layer's (NemotronNasModelArchConfigConvertor.get_total_num_kv_heads)
    assert not cfg.block_configs[0].attention.no_op
    first = next(b for b in cfg.block_configs if not b.attention.no_op)
    assert cfg.num_key_value_heads == heads // first.attention.n_heads_in_group
    out = {"model.embed_tokens.weight": (cfg.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, hidden)
    for i in range(cfg.num_hidden_layers):
        block, pre = cfg.block_configs[i], f"model.layers.{i}."
        if not block.attention.no_op:
            kv = heads // block.attention.n_heads_in_group
            for name, rows, cols, bias in (("q_proj", heads * hd, hidden, qkv_bias), ("k_proj", kv * hd, hidden,
                                           qkv_bias), ("v_proj", kv * hd, hidden, qkv_bias),
                                           ("o_proj", hidden, heads * hd, o_bias)):
                out[f"{pre}self_attn.{name}.weight"] = (rows, cols)
                if bias:
                    out[f"{pre}self_attn.{name}.bias"] = (rows,)
            out[f"{pre}input_layernorm.weight"] = (hidden,)
        if not block.ffn.no_op:
            ff = find_multiple(int(2 * block.ffn.ffn_mult * hidden / 3), 256) if hasattr(block.ffn, "ffn_mult") \
                else block.ffn.intermediate_size
            for name, rows, cols in (("gate_proj", ff, hidden), ("up_proj", ff, hidden), ("down_proj", hidden, ff)):
                out[f"{pre}mlp.{name}.weight"] = (rows, cols)
                if mlp_bias:
                    out[f"{pre}mlp.{name}.bias"] = (rows,)
            out[f"{pre}post_attention_layernorm.weight"] = (hidden,)
    return out


def file_shapes(folder) -> dict[str, tuple]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


WIDE = {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 6}  # 4 KV groups of 2 query heads


def ragged_deployable(model) -> Plan:
    """4 query heads in every kept layer, but 2, 4 and 2 KV heads (two whole groups, or one head of every group);
    MLP widths 37, 40, 39; block 2 removed."""
    e = Plan.empty(model).with_units("block", None, [2]).with_units("head", 1, [0, 2, 4, 6])
    e = e.with_units("kv", 0, [0, 1]).with_units("kv", 3, [2, 3])
    return e.with_units("channel", 0, [1, 2, 5]).with_units("channel", 3, [9])


@pytest.mark.parametrize("family", FAMILIES)
def test_decilm_export_reloads_identically_and_matches_vllms_schema(family, tmp_path, ids):
    model = tiny_model(family, **WIDE)
    plan = ragged_deployable(model)
    pruned = apply_plan(model, plan)
    with torch.no_grad():  # a bias in one layer only: the flag is global, other layers get exact zeros
        o = pruned.model.layers[1].self_attn.o_proj
        o.bias = torch.nn.Parameter(0.1 * torch.randn(o.out_features))
    report = save_pruned(pruned, tiny_tokenizer(), tmp_path / "out", plan=plan, format="decilm")
    assert report.format == "decilm" and report.ok and report.reload_max_abs_diff == 0.0
    folder = tmp_path / "out"
    assert file_shapes(folder) == vllm_shapes(folder)  # every tensor vLLM builds, nothing it would skip
    cfg = json.loads((folder / "config.json").read_text())
    assert [b["ffn"]["intermediate_size"] for b in cfg["block_configs"]] == [37, 40, 39]
    assert [b["attention"]["n_heads_in_group"] for b in cfg["block_configs"]] == [2, 1, 2]
    assert cfg["num_attention_heads"] == 4 and cfg["attention_bias"] and cfg["qkv_bias"] == (family == "qwen2")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert torch.count_nonzero(f.get_tensor("model.layers.0.self_attn.o_proj.bias")) == 0
        assert torch.equal(f.get_tensor("model.layers.1.self_attn.o_proj.bias"), o.bias.detach())
    again = load_pruned_folder(folder)
    assert torch.equal(again(ids).logits, pruned(ids).logits)
    assert supported(again)[VLLM]  # the reloaded folder classifies as it was written
    assert "vllm serve" in (folder / "README.md").read_text()


def test_decilm_refusal_writes_nothing(tmp_path):
    model = tiny_model("llama")
    pruned = apply_plan(model, plans(model)["heads per layer"])
    with pytest.raises(ExportError, match="one query-head count"):
        save_pruned(pruned, tiny_tokenizer(), tmp_path / "out", format="decilm")
    qwen3 = tiny_model("qwen3")
    with pytest.raises(ExportError, match="LLaMA graph"):
        save_pruned(qwen3, tiny_tokenizer(), tmp_path / "q3", format="decilm")
    assert list(tmp_path.iterdir()) == []


def test_pruneviz_refuses_decilm_layers_it_does_not_build(tmp_path):
    """replace_with_linear (vLLM's DeciLM class does not implement it either) and weights a no_op sub-layer must not
    have; no_op sub-layers themselves load (tests/test_decilm_noop.py)."""
    model = tiny_model("llama")
    save_pruned(model, None, tmp_path / "out", format="decilm")
    cfg_file = tmp_path / "out" / "config.json"
    good = json.loads(cfg_file.read_text())
    cfg = json.loads(json.dumps(good))
    cfg["block_configs"][1]["attention"]["replace_with_linear"] = True
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="replace_with_linear"):
        load_pruned_folder(tmp_path / "out")
    cfg = json.loads(json.dumps(good))
    cfg["block_configs"][1]["attention"] = {"no_op": True}  # its weights are still in the file
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="have no place in the model"):
        load_pruned_folder(tmp_path / "out")
    assert decilm.schema_mismatch(tmp_path / "out").startswith("extra")
    assert decilm.is_decilm(cfg)


def test_cli_plan_deployable_and_export_decilm(tmp_path, capsys):
    model = tiny_model("llama", num_hidden_layers=6)
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (tmp_path / "scores.json").write_text(importance.compute(model, "magnitude").to_json())
    common = ["--model", str(folder), "--device", "cpu", "--dtype", "fp32"]
    assert main(["plan", *common, "--scores", str(tmp_path / "scores.json"), "--ratio", "0.2", "--strategy",
                 "global", "--deployable", "vllm", "--out", str(tmp_path / "plan.json")]) == 0
    plan = Plan.from_json((tmp_path / "plan.json").read_text())
    assert plan.provenance["options"]["deployable"] == "vllm" and not plan.is_uniform()
    assert main(["export", *common, "--plan", str(tmp_path / "plan.json"), "--format", "decilm", "--out",
                 str(tmp_path / "out")]) == 0
    assert "decilm checkpoint" in capsys.readouterr().out
    assert file_shapes(tmp_path / "out") == vllm_shapes(tmp_path / "out")
    write_plan(Plan.empty(model).with_units("kv", 0, [0]), tmp_path / "ragged.json")  # 3 heads in layer 0 only
    assert main(["export", *common, "--plan", str(tmp_path / "ragged.json"), "--format", "decilm", "--out",
                 str(tmp_path / "no")]) == 2
    assert "one query-head count" in capsys.readouterr().err and not (tmp_path / "no").exists()


# ---- the app -----------------------------------------------------------------------------------------------------

def app_run(thing):
    """Run the app (``thing``: the AppTest or a widget just set); no exception or error message may show."""
    at = thing.run()
    assert not at.exception and not at.error, [e.value for e in list(at.exception) + list(at.error)]
    return at


def test_app_deployable_toggle_and_runtime_table(monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    from pruneviz.ui import state

    monkeypatch.setenv("PRUNEVIZ_MODEL", "tiny")
    monkeypatch.setenv("PRUNEVIZ_EXPORT_DIR", str(tmp_path / "exports"))
    at = app_run(app_run(AppTest.from_file(str(repo_root() / "app.py"), default_timeout=60)))
    at = app_run(app_run(at.switch_page("pages/prune.py")).button(key="pr_quick").click())
    at.selectbox(key="pr_strategy").set_value("global")
    at.segmented_control(key="pr_attn_unit").set_value("head")
    at.selectbox(key="pr_deployable").set_value("vllm")
    at.slider(key="pr_channel_pct").set_value(30)
    at = app_run(at.slider(key="pr_head_pct").set_value(50))
    plan, base = at.session_state["plan"], state.shared().models[state.ModelSpec(state.TINY).key].model
    want = plan_from_ratios(base, at.session_state["imaps"]["magnitude"], head_ratio=0.5, channel_ratio=0.3,
                            strategy="global", attn_unit="head", deployable="vllm")
    assert plan.sha256() == want.sha256()
    at = app_run(at.switch_page("pages/export.py"))  # before building: judged on the plan's shapes
    table = at.dataframe[0].value  # the only table on the page: "Which runtimes load this plan"
    assert dict(zip(table["Runtime"], table["Loads"])) == {STOCK: "no", VLLM: "yes", LLAMA_CPP: "yes", REMOTE: "yes"}
    at = app_run(at.button(key="ex_build").click())
    at = app_run(at.radio(key="ex_format").set_value("decilm"))
    at = app_run(at.button(key="ex_run").click())
    report = at.session_state["export"].report
    assert report.format == "decilm" and report.ok
    folder = tmp_path / "exports" / report.folder.rsplit("/", 1)[-1]
    assert file_shapes(folder) == vllm_shapes(folder)


def test_app_aligned_mlp_widths(monkeypatch, tmp_path):
    """The Prune page's "MLP widths in multiples of" selectbox gives the library's aligned slider plan."""
    from streamlit.testing.v1 import AppTest

    from pruneviz.arch import geometry_of
    from pruneviz.ui import state

    monkeypatch.setenv("PRUNEVIZ_MODEL", "tiny")
    at = app_run(app_run(AppTest.from_file(str(repo_root() / "app.py"), default_timeout=60)))
    at = app_run(app_run(at.switch_page("pages/prune.py")).button(key="pr_quick").click())
    at.selectbox(key="pr_strategy").set_value("incremental")
    at.selectbox(key="pr_multiple_of").set_value(8)
    at = app_run(at.slider(key="pr_channel_pct").set_value(30))
    plan, base = at.session_state["plan"], state.shared().models[state.ModelSpec(state.TINY).key].model
    want = plan_from_ratios(base, at.session_state["imaps"]["magnitude"], channel_ratio=0.3, strategy="incremental",
                            multiple_of=8)
    assert plan.sha256() == want.sha256()
    g = geometry_of(base)
    widths = [g.n_channels - len(plan.removed("channel", l)) for l in range(g.n_layers)]
    assert all(w % 8 == 0 for w in widths) and min(widths) < g.n_channels, widths
    at = app_run(app_run(at.switch_page("pages/export.py")).button(key="ex_build").click())
    at = app_run(at.radio(key="ex_format").set_value("gguf"))
    assert not [i for i in at.info if "ffn_down stays f16" in i.value]  # f16: nothing to say
    at = app_run(at.selectbox(key="ex_wtype").set_value("q8_0"))
    from pruneviz.gguf_export import unquantised_layers

    off = unquantised_layers(base, plan, "q8_0")
    notes = [i.value for i in at.info if "ffn_down stays f16" in i.value]
    assert off and notes and notes[0].startswith(f"{len(off)} layer(s)")


def repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]
