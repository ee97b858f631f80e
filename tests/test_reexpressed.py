"""Real weights through every re-expressible family's code path (pruneviz.testing.reexpress).

The bundled SmolLM2-135M rebuilt as Mistral, Qwen2, Phi-3 (fused projections), Granite, SmolLM3 and Helium computes the
same function, so scores, pruned logits and exports must match the LLaMA original's. bench/reexpressed_families.py
runs every criterion and the SlimGPT solver the same way.
"""
import dataclasses

import pytest
import torch

from pruneviz import importance
from pruneviz.arch import adapter_for, geometry_of
from pruneviz.export import save_pruned
from pruneviz.plan import Plan
from pruneviz.surgery import apply_plan, masked_model
from pruneviz.testing import REEXPRESSIBLE, rebased, reexpress, tiny_model


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits.double()


@pytest.mark.parametrize("family", REEXPRESSIBLE)
def test_a_tiny_llama_reexpressed_computes_the_same_function(family):
    src = tiny_model("llama", dtype=torch.float64)  # float64: a layout error shows, rounding does not
    model = reexpress(src, family)
    ids = torch.tensor([[1, 5, 9, 40, 7, 3, 22, 60, 11, 2]])
    assert model.config.model_type == family and adapter_for(model) is not None
    assert next(model.parameters()).dtype == torch.float64
    # 1e-6: Helium's norms compute in float32 whatever the model's dtype
    torch.testing.assert_close(logits(model, ids), logits(src, ids), rtol=0, atol=1e-6)
    assert dataclasses.replace(geometry_of(model), family="", model_type="") == \
        dataclasses.replace(geometry_of(src), family="", model_type="")
    fresh = tiny_model("llama", dtype=torch.float64).state_dict().values()
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), fresh))  # the source is untouched


def test_reexpress_refuses_what_cannot_compute_the_same_function():
    with pytest.raises(ValueError, match="cannot be re-expressed exactly as 'gemma2'"):
        reexpress(tiny_model("llama"), "gemma2")
    with pytest.raises(ValueError, match="starts from a LLaMA model"):
        reexpress(tiny_model("qwen3"), "qwen2")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "phi3", "helium"])  # biases, fused rows, reordered rotary: the layouts
# that change the weights; Mistral, Granite and SmolLM3 are bit-identical in bench/reexpressed_families.py
def test_bundled_model_reexpressed_scores_prunes_and_exports_like_the_original(bundled, family, tmp_path):
    base, tok = bundled.model, bundled.tokenizer
    ids = tok("The quick brown fox jumps over the lazy dog. def f(x):\n    return x", return_tensors="pt").input_ids
    model = reexpress(base, family)
    calib = importance.Calibration(ids.repeat(2, 1), "test sentence", "-", 0)
    for name in ("magnitude", "wanda_sp"):
        want, got = importance.compute(base, name, calib), importance.compute(model, name, calib)
        for kind in want.available():
            torch.testing.assert_close(got.get(kind), want.get(kind), rtol=1e-4, atol=1e-6)
    plan = (Plan.empty(base).with_units("block", None, [11]).with_units("kv", 3, [1])
            .with_units("head", 8, [0, 4, 8]).with_units("channel", 20, range(0, 1536, 3)))
    want = logits(apply_plan(base, plan), ids)
    mine = rebased(plan, model)
    pruned = apply_plan(model, mine)
    torch.testing.assert_close(logits(pruned, ids), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(masked_model(model, mine), ids), want, rtol=1e-4, atol=1e-4)
    report = save_pruned(pruned, tok, tmp_path / family, plan=mine)
    assert report.ok and report.reload_max_abs_diff == 0.0
