"""Offloaded models and layer-by-layer passes give the same scores and SlimGPT results as resident ones."""
import pytest
import torch

from pruneviz.criteria.slimgpt import slimgpt_prune
from pruneviz.criteria.stats import collect_stats
from pruneviz.errors import CriterionError
from pruneviz.importance import Calibration, compute
from pruneviz.loading import load_offloaded
from pruneviz.offload import detached_copy, execution_device, is_offloaded, materialized, offload_device_map
from pruneviz.testing import tiny_model, tiny_tokenizer

CALIB = Calibration(torch.randint(4, 90, (6, 24), generator=torch.Generator().manual_seed(3)), "random")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", num_hidden_layers=5).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def resident(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def offloaded(folder, tmp_path_factory):
    lm = load_offloaded(str(folder), device="cpu", dtype="float32", offload="disk", resident_layers=0,
                        offload_folder=tmp_path_factory.mktemp("offload"))
    assert lm.info["offload"] == "disk"
    return lm.model


def test_cpu_offload_on_a_cpu_says_what_to_do(folder):
    from pruneviz.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="offload='disk'"):
        load_offloaded(str(folder), device="cpu", offload="cpu")
    with pytest.raises(ModelLoadError, match="offload must be one of"):
        load_offloaded(str(folder), device="cpu", offload="tape")
    with pytest.raises(ModelLoadError, match="local model folder"):
        load_offloaded(str(folder / "nope"), device="cpu")
    with pytest.raises(ModelLoadError, match="was not found in the local Hugging Face cache"):
        load_offloaded("no-such-org/no-such-model", device="cpu")  # HF_HUB_OFFLINE=1 in tests


def _weights(model):
    out = {}
    for name, mod in model.named_modules():
        if name.count(".") == 2 and ".layers." in name:
            with materialized(mod):
                out.update({f"{name}.{k}": v.detach().clone() for k, v in mod.named_parameters()})
    return out


def test_device_map_puts_layers_off_the_device(folder, offloaded):
    assert is_offloaded(offloaded)
    dm = offloaded.hf_device_map
    assert dm["model.embed_tokens"] == "cpu"
    assert {dm[f"model.layers.{i}"] for i in range(5)} == {"disk"}
    w = offloaded.model.layers[3].mlp.down_proj.weight
    assert w.device.type == "meta"  # off the device between passes
    with materialized(offloaded.model.layers[3]):
        assert offloaded.model.layers[3].mlp.down_proj.weight.device.type == "cpu"
    assert offloaded.model.layers[3].mlp.down_proj.weight.device.type == "meta"
    assert execution_device(offloaded).type == "cpu"


def test_offload_map_names_every_block():
    dm = offload_device_map(tiny_model("llama"), "cpu", "disk", resident_layers=2)
    assert [dm[f"model.layers.{i}"] for i in range(4)] == ["cpu", "cpu", "disk", "disk"]
    assert dm["model.embed_tokens"] == "cpu" and dm["lm_head"] == "cpu"


def test_layerwise_stats_equal_the_full_forward(resident):
    full = collect_stats(resident, CALIB, layerwise=False)
    layered = collect_stats(resident, CALIB, layerwise=True)
    assert layered.tokens == full.tokens == 6 * 24
    for site in full.sites:
        torch.testing.assert_close(layered.norms(site), full.norms(site), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layered.variances(site), full.variances(site), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layered.means(site), full.means(site), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["magnitude", "wanda_sp", "flap", "slimgpt"])
def test_offloaded_scores_equal_resident_scores(name, resident, offloaded):
    before = _weights(offloaded)
    want = compute(resident, name, CALIB)
    got = compute(offloaded, name, CALIB)
    assert got.meta["offloaded"] and not want.meta["offloaded"]
    for kind in want.available():
        torch.testing.assert_close(got.get(kind), want.get(kind), rtol=1e-4, atol=1e-5)
    after = _weights(offloaded)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the offloaded base is untouched


@pytest.mark.parametrize("name", ["taylor", "minillm", "ppl"])
def test_whole_model_criteria_refuse_an_offloaded_model(name, offloaded):
    with pytest.raises(CriterionError, match="needs the whole model in memory"):
        compute(offloaded, name, CALIB)


def test_slimgpt_solver_offloaded_equals_resident(resident, offloaded):
    plan_r, pruned_r = slimgpt_prune(resident, CALIB, 0.3)
    plan_o, pruned_o = slimgpt_prune(offloaded, CALIB, 0.3)
    assert plan_o == plan_r and not plan_o.is_empty()
    assert not is_offloaded(pruned_o) and execution_device(pruned_o).type == "cpu"
    x = CALIB.tokens[:2]
    with torch.no_grad():
        torch.testing.assert_close(pruned_o(x).logits, pruned_r(x).logits, rtol=1e-4, atol=1e-4)
        assert is_offloaded(offloaded)
        offloaded(x)  # the offloaded base still runs


def test_detached_copy_has_real_weights_and_no_hooks(offloaded):
    layer = offloaded.model.layers[2]
    copy = detached_copy(layer)
    assert not hasattr(copy, "_hf_hook") and copy.mlp.down_proj.weight.device.type == "cpu"
    with materialized(layer):
        assert torch.equal(copy.mlp.down_proj.weight, layer.mlp.down_proj.weight)
    assert layer.mlp.down_proj.weight.device.type == "meta"


@pytest.mark.parametrize("compensation", [None, "flap_bias"])
def test_surgery_on_an_offloaded_base_equals_resident(compensation, resident, offloaded):
    import dataclasses

    from pruneviz.plan import Plan
    from pruneviz.surgery import apply_plan

    plan = Plan.empty(resident).with_units("channel", 1, range(7)).with_units("kv", 3, [1])
    plan = plan.with_units("block", None, [2])
    plan = dataclasses.replace(plan, compensation=compensation)
    want = apply_plan(resident, plan, calibration=CALIB.tokens)
    got = apply_plan(offloaded, plan, calibration=CALIB.tokens)
    assert not is_offloaded(got) and is_offloaded(offloaded)
    x = CALIB.tokens[:2]
    with torch.no_grad():
        torch.testing.assert_close(got(x).logits, want(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "bloom", "qwen2"])
def test_offload_map_covers_every_parameter_once(family):
    model = tiny_model(family)
    dm = offload_device_map(model, "cpu", "disk")
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        owners = [k for k in dm if name == k or name.startswith(k + ".")]
        assert len(owners) == 1, (name, owners)
        assert (dm[owners[0]] == "disk") == (".h." in name or ".layers." in name), (name, dm[owners[0]])


@pytest.mark.parametrize("family", ["opt", "gpt2", "bloom"])
def test_other_families_score_the_same_offloaded(family, tmp_path):
    from transformers import AutoModelForCausalLM

    path = tmp_path / family
    tiny_model(family).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    resident = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    off = load_offloaded(str(path), device="cpu", dtype="float32", offload="disk",
                         offload_folder=tmp_path / "off").model
    assert is_offloaded(off)
    want, got = compute(resident, "wanda_sp", CALIB), compute(off, "wanda_sp", CALIB)
    for kind in want.available():
        torch.testing.assert_close(got.get(kind), want.get(kind), rtol=1e-4, atol=1e-5)
