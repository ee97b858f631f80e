"""Integration on the real bundled SmolLM2-135M-Instruct: geometry, surgery exactness, export round trip."""
import pytest
import torch

from pruneviz.arch import geometry_of
from pruneviz.export import save_pruned
from pruneviz.plan import Plan, dense_params
from pruneviz.surgery import apply_plan, masked_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(bundled):
    return bundled.model


@pytest.fixture(scope="module")
def text_ids(bundled):
    return bundled.tokenizer("def f(x):\n    return x * 2  # double it", return_tensors="pt").input_ids


def test_geometry_and_parameter_accounting(model):
    g = geometry_of(model)
    assert (g.n_layers, g.n_heads, g.n_kv, g.head_dim, g.n_channels, g.hidden) == (30, 9, 3, 64, 1536, 576)
    assert dense_params(model) == 134_515_008
    # unit costs from seeds.md section 4: channel 1,728; q-head 73,728; KV group 294,912; block 3,540,096
    p = Plan.empty(model)
    dense = p.param_count(model)
    assert dense - p.with_units("channel", 3, [0]).param_count(model) == 1_728
    assert dense - p.with_units("head", 3, [0, 3, 6]).param_count(model) == 3 * 73_728
    assert dense - p.with_units("kv", 3, [1]).param_count(model) == 294_912
    assert dense - p.with_units("block", None, [3]).param_count(model) == 3_540_096


def test_surgery_equals_masking_on_bundled(model, text_ids):
    before = {k: v.clone() for k, v in list(model.state_dict().items())[:8]}
    plan = (Plan.empty(model).with_units("block", None, [12, 25]).with_units("kv", 4, [2])
            .with_units("head", 7, [0, 3, 6]).with_units("head", 9, [1, 5, 8])
            .with_units("channel", 20, range(0, 1536, 4)))
    pruned, masked = apply_plan(model, plan), masked_model(model, plan)
    with torch.inference_mode():
        diff = (pruned(text_ids).logits - masked(text_ids).logits).abs().max().item()
    assert diff < 1e-5
    assert dense_params(pruned) == plan.param_count(model)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_empty_plan_identical_and_export_round_trip(model, bundled, text_ids, tmp_path):
    with torch.inference_mode():
        same = apply_plan(model, Plan.empty(model))
        assert torch.equal(same(text_ids).logits, model(text_ids).logits)
    plan = Plan.empty(model).with_units("kv", 0, [1]).with_units("block", None, [20])
    pruned = apply_plan(model, plan)
    report = save_pruned(pruned, bundled.tokenizer, tmp_path / "smol-pruned", plan=plan)
    assert report.ok and report.format == "pruneviz" and report.reload_max_abs_diff == 0.0
