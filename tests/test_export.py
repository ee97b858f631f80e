"""Export: stock vs pruneviz format, exact reload (pruneviz and trust_remote_code), atomicity, errors."""
import json

import pytest
import torch
import transformers as tf

from pruneviz.arch import geometry_of
from pruneviz.errors import ExportError
from pruneviz.export import load_pruned_folder, read_plan, save_pruned, write_plan
from pruneviz.plan import Plan
from pruneviz.surgery import apply_plan


def uniform_plan(model):
    g = geometry_of(model)
    p = Plan.empty(model)
    for layer in range(g.n_layers):
        p = p.with_units("channel", layer, [0, 3])
        if 1 < g.n_kv < g.n_heads:
            p = p.with_units("kv", layer, [0])
    return p


def ragged_plan(model):
    g = geometry_of(model)
    p = Plan.empty(model).with_units("channel", 0, [1, 2]).with_units("block", None, [1])
    return p.with_units("kv", 2, [g.n_kv - 1]) if g.n_kv > 1 else p.with_units("head", 2, [0])


def test_ragged_export_reloads_identically_both_ways(tiny, tok, tmp_path, ids):
    plan = ragged_plan(tiny)
    pruned = apply_plan(tiny, plan)
    report = save_pruned(pruned, tok, tmp_path / "out", plan=plan)
    assert report.format == "pruneviz" and report.ok
    assert report.reload_max_abs_diff == 0.0 and report.remote_code_max_abs_diff == 0.0
    again = load_pruned_folder(tmp_path / "out")
    assert torch.equal(again(ids).logits, pruned(ids).logits)
    remote = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert torch.equal(remote(ids).logits, pruned(ids).logits)
    assert read_plan(tmp_path / "out" / "pruneviz_plan.json") == plan
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    saved = json.loads((tmp_path / "out" / "pruneviz_export.json").read_text())
    assert saved["folder"] == report.folder == str(tmp_path / "out")  # where it is, not where it was written


def test_uniform_llama_family_exports_stock(tok, tmp_path, ids):
    from pruneviz.testing import tiny_model

    model = tiny_model("qwen2")
    plan = uniform_plan(model)
    pruned = apply_plan(model, plan)
    report = save_pruned(pruned, tok, tmp_path / "stock", plan=plan)
    assert report.format == "stock"
    cfg = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 1 and cfg["intermediate_size"] == 38 and "auto_map" not in cfg
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "stock")
    assert torch.equal(plain(ids).logits, pruned(ids).logits)


def test_existing_folder_is_not_overwritten(tiny, tok, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        save_pruned(apply_plan(tiny, ragged_plan(tiny)), tok, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_failed_verification_leaves_nothing(monkeypatch, tiny, tok, tmp_path):
    import pruneviz.export as ex

    monkeypatch.setattr(ex, "_max_diff", lambda a, b, ids: 1.0)
    with pytest.raises(ExportError, match="does not reproduce"):
        save_pruned(apply_plan(tiny, ragged_plan(tiny)), tok, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_weights_give_clear_error(tiny, tok, tmp_path):
    plan = ragged_plan(tiny)
    save_pruned(apply_plan(tiny, plan), tok, tmp_path / "out", plan=plan, check_remote_code=False)
    (tmp_path / "out" / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ExportError, match="corrupt"):
        load_pruned_folder(tmp_path / "out")


def test_plan_file_round_trip(tiny, tmp_path):
    plan = ragged_plan(tiny)
    path = write_plan(plan, tmp_path / "p.json")
    assert read_plan(path) == plan
