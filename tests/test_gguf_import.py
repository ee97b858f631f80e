"""pruneviz.gguf_import: per-layer (``deci``) GGUF files read back as models with the same logits; the loader finds
the GGUF of an export folder and knows the model is pruned."""
import pytest
import torch

from pruneviz import gguf_export as G
from pruneviz import loading
from pruneviz.arch import geometry_of
from pruneviz.errors import ModelLoadError
from pruneviz.export import plan_of, save_pruned
from pruneviz.gguf_import import model_from_deci_gguf
from pruneviz.plan import Plan
from pruneviz.surgery import apply_plan
from pruneviz.testing import tiny_model, tiny_tokenizer

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def per_layer_plan(model):
    g = geometry_of(model)
    return (Plan.empty(model).with_units("channel", 0, [1, 2, 5]).with_units("kv", 1, [0])
            .with_units("head", 2, list(range(0, g.n_heads, g.group_size))).with_units("block", None, [3]))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_a_per_layer_gguf_reads_back_with_the_same_logits_and_its_plan(family, tmp_path):
    model = tiny_model(family)
    plan = per_layer_plan(model)
    pruned = apply_plan(model, plan)
    report = G.write_gguf(pruned, None, tmp_path / "p.gguf", "f32", plan=plan)
    assert report.arch == "deci"
    again = model_from_deci_gguf(tmp_path / "p.gguf")
    torch.testing.assert_close(logits(again), logits(pruned), rtol=0, atol=1e-5)
    assert plan_of(again) == plan and again.config.pruneviz_plan_sha256 == plan.sha256()
    assert again.config.pruneviz_base_geometry == pruned.config.pruneviz_base_geometry
    assert [p.shape for p in again.parameters()] == [p.shape for p in pruned.parameters()]
    kw = dict(max_new_tokens=5, do_sample=False, min_new_tokens=5, pad_token_id=0)
    assert torch.equal(again.generate(IDS[:1, :4], **kw), pruned.generate(IDS[:1, :4], **kw))  # KV cache
    # a wrong row order would not be noticed by shapes: the q/k un-permutation is what makes the logits agree
    G.write_gguf(pruned, None, tmp_path / "p16.gguf", "f16", plan=plan)
    torch.testing.assert_close(logits(model_from_deci_gguf(tmp_path / "p16.gguf")), logits(pruned), rtol=0,
                               atol=5e-2)


def test_attention_free_layers_and_llama3_rope_read_back(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    model = tiny_model("llama", rope_parameters=rope)
    plan = Plan.empty(model).without_attention(0).with_units("kv", 2, [1])
    pruned = apply_plan(model, plan)
    G.write_gguf(pruned, None, tmp_path / "a.gguf", "f32", plan=plan)
    again = model_from_deci_gguf(tmp_path / "a.gguf")
    assert not hasattr(again.model.layers[0].self_attn, "q_proj")
    assert again.config.rope_parameters["rope_type"] == "llama3"
    torch.testing.assert_close(logits(again), logits(pruned), rtol=0, atol=1e-5)


def test_rope_freqs_without_their_parameters_are_refused(tmp_path, monkeypatch):
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    model = tiny_model("llama", rope_parameters=rope)
    pruned = apply_plan(model, Plan.empty(model).with_units("channel", 0, [1]))
    monkeypatch.setattr(G, "_provenance", lambda cfg: {})  # a deci file another tool wrote: factors only
    G.write_gguf(pruned, None, tmp_path / "r.gguf", "f32")
    with pytest.raises(ModelLoadError, match="rope_freqs"):
        model_from_deci_gguf(tmp_path / "r.gguf")


def test_a_file_whose_tensors_do_not_match_its_metadata_is_refused(tmp_path, monkeypatch):
    model = tiny_model("llama")
    pruned = apply_plan(model, per_layer_plan(model))
    real = G.gguf_tensors
    monkeypatch.setattr(G, "gguf_tensors", lambda m, layout: {k: v for k, v in real(m, layout).items()
                                                              if k != "blk.1.ffn_up.weight"})
    G.write_gguf(pruned, None, tmp_path / "t.gguf", "f32")
    with pytest.raises(ModelLoadError, match="missing"):
        model_from_deci_gguf(tmp_path / "t.gguf")


def test_load_model_takes_a_gguf_export_folder(tmp_path, monkeypatch):
    """``load_model(folder)`` on a GGUF export folder loads its one .gguf (de-quantised once into the cache); a
    folder with several GGUF files and no config.json is refused with their names."""
    monkeypatch.setenv("PRUNEVIZ_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    plan = per_layer_plan(model)
    pruned = apply_plan(model, plan)
    save_pruned(pruned, None, tmp_path / "out", plan=plan, format="gguf", weight_type="f32", gguf_runtime="python")
    seen = []
    monkeypatch.setattr(loading, "_model_from_deci", lambda path, progress: seen.append(path) or (
        model_from_deci_gguf(path), tiny_tokenizer()))  # the tiny files carry no vocabulary: weights only
    lm = loading.load_model(str(tmp_path / "out"))
    assert seen == [tmp_path / "out" / "out.f32.gguf"] or seen == [(tmp_path / "out" / "out.f32.gguf").resolve()]
    torch.testing.assert_close(logits(lm.model), logits(pruned), rtol=0, atol=1e-5)
    assert plan_of(lm.model) == plan  # known to be pruned, and how
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes((tmp_path / "out" / "out.f32.gguf").read_bytes())
    with pytest.raises(ModelLoadError, match="2 GGUF files"):
        loading.load_model(str(tmp_path / "two"))


def test_what_counts_as_a_local_model_for_the_picker_and_shared_links(tmp_path):
    from pruneviz.ui.urlstate import spec_from_url

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "two").mkdir()
    for n in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / n).write_bytes(b"GGUF")
    (tmp_path / "empty").mkdir()
    (tmp_path / "w.bin").write_bytes(b"x")
    yes = [tmp_path / "hf", tmp_path / "g", tmp_path / "g" / "m.gguf"]
    no = [tmp_path / "two", tmp_path / "empty", tmp_path / "w.bin", tmp_path / "missing"]
    assert [loading.is_local_model(p) for p in yes + no] == [True] * 3 + [False] * 4
    for p in yes:
        spec, kind, load_now = spec_from_url(str(p))
        assert spec is not None and spec.source == str(p) and kind == "folder" and load_now
    assert spec_from_url(str(tmp_path / "empty"))[0] is None
