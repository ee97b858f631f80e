"""GGUF export for llama.cpp: rotary row order, architecture choice (llama / qwen2 / deci), refusals before writing,
pure-Python read-back on tiny models, weight types, save_pruned(format="gguf"), and the bundled model in llama.cpp."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pruneviz import gguf_export as G
from pruneviz.arch import geometry_of
from pruneviz.errors import ExportError
from pruneviz.export import EXPORT_FORMATS, is_export, save_pruned
from pruneviz.plan import Plan
from pruneviz.surgery import apply_plan
from pruneviz.testing import tiny_model

LLAMA_CPP = G.llama_cpp_version()
needs_llama_cpp = pytest.mark.skipif(
    LLAMA_CPP is None, reason="no llama.cpp binding is installed (requirements.txt pins llama-cpp-py-sync; README "
                              "'GGUF for llama.cpp'); the pure-Python read-back tests still run")


def rope_hf(x, pos, theta=10000.0):
    """Hugging Face rotate_half rope on x [heads, d]: pairs (i, i + d/2)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.cat([pos * inv, pos * inv])
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * torch.cos(ang) + torch.cat([-x2, x1], -1) * torch.sin(ang)


def rope_adjacent(x, pos, theta=10000.0):
    """llama.cpp's NORM rope on x [heads, d]: pairs (2i, 2i+1) with frequency theta^(-2i/d)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    c, s = torch.cos(pos * inv), torch.sin(pos * inv)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    return out


def test_rope_permutation_turns_rotate_half_into_adjacent_pairs():
    heads, d = 3, 8
    perm = G.rope_permutation(heads, d)
    assert perm[:8].tolist() == [0, 4, 1, 5, 2, 6, 3, 7] and sorted(perm.tolist()) == list(range(heads * d))
    q, k = torch.randn(heads * d, dtype=torch.float64), torch.randn(heads * d, dtype=torch.float64)
    for pq, pk in ((5, 2), (17, 17), (0, 9)):
        hf = (rope_hf(q.view(heads, d), pq) * rope_hf(k.view(heads, d), pk)).sum(-1)
        cpp = (rope_adjacent(q[perm].view(heads, d), pq) * rope_adjacent(k[perm].view(heads, d), pk)).sum(-1)
        torch.testing.assert_close(hf, cpp, rtol=0, atol=1e-12)
        # and it matters: without the permutation the scores differ (at different positions)
        wrong = (rope_adjacent(q.view(heads, d), pq) * rope_adjacent(k.view(heads, d), pk)).sum(-1)
        assert pq == pk or not torch.allclose(hf, wrong, atol=1e-3)  # equal positions: rope cancels


def per_layer_plan(model):
    g = geometry_of(model)
    return (Plan.empty(model).with_units("channel", 0, [1, 2, 5]).with_units("kv", 1, [0])
            .with_units("head", 2, list(range(0, g.n_heads, g.group_size))).with_units("block", None, [3]))


def uniform_plan(model):
    p = Plan.empty(model)
    for layer in range(geometry_of(model).n_layers):
        p = p.with_units("channel", layer, [0, 3]).with_units("kv", layer, [0])
    return p


def read_back_equal(model, path, ids):
    back = G.read_gguf_into(path, model)
    with torch.no_grad():
        return float((back(ids).logits - model(ids).logits).abs().max())


@pytest.mark.parametrize("family,arch", [("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2")])
def test_dense_tiny_models_write_their_own_architecture(family, arch, tmp_path, ids):
    model = tiny_model(family)
    report = G.write_gguf(model, None, tmp_path / "m.gguf", "f32")
    assert report.arch == arch and report.tokenizer.startswith("none")
    meta, tensors = G.read_gguf_tensors(tmp_path / "m.gguf")
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.attention.head_count"] == 6 and meta[f"{arch}.attention.head_count_kv"] == 2 + (
        family == "mistral")
    assert meta[f"{arch}.attention.key_length"] == 8 and meta[f"{arch}.rope.dimension_count"] == 8
    assert ("output.weight" in tensors) == (family == "mistral")  # tied embeddings write no output tensor
    assert ("blk.0.attn_q.bias" in tensors) == (family == "qwen2")
    assert read_back_equal(model, tmp_path / "m.gguf", ids) == 0.0
    # llama layout permutes q/k rows; qwen2 (NEOX rope) keeps Hugging Face's order
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    want = q if arch == "qwen2" else q[G.rope_permutation(6, 8).numpy()]
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"], want)


def test_per_layer_widths_go_to_deci_with_arrays(tmp_path, ids):
    model = tiny_model("llama")
    pruned = apply_plan(model, per_layer_plan(model))
    report = G.write_gguf(pruned, None, tmp_path / "d.gguf", "f32")
    assert report.arch == "deci" and "deci" in report.arch_reason
    meta, _ = G.read_gguf_tensors(tmp_path / "d.gguf")
    assert meta["deci.block_count"] == 3
    assert list(meta["deci.attention.head_count"]) == [6, 3, 4]
    assert list(meta["deci.attention.head_count_kv"]) == [2, 1, 2]
    assert list(meta["deci.feed_forward_length"]) == [37, 40, 40]
    assert report.widths == [[6, 2, 37], [3, 1, 40], [4, 2, 40]]
    assert read_back_equal(pruned, tmp_path / "d.gguf", ids) == 0.0


def test_qwen2_without_some_heads_is_written_as_llama(tmp_path, ids):
    model = tiny_model("qwen2")
    pruned = apply_plan(model, uniform_plan(model))  # 3 of 6 query heads left: qwen2's loader needs all 6
    report = G.write_gguf(pruned, None, tmp_path / "q.gguf", "f32")
    assert report.arch == "llama" and "query width equal to the hidden size" in report.arch_reason
    assert read_back_equal(pruned, tmp_path / "q.gguf", ids) == 0.0


def test_refusals_come_before_anything_is_written(tmp_path):
    cases = [(tiny_model("gpt2"), "no llama.cpp mapping"),
             (tiny_model("mistral", sliding_window=4), "sliding-window"),
             (tiny_model("llama", hidden_act="gelu"), "SiLU")]
    for model, words in cases:
        with pytest.raises(ExportError, match=words):
            G.write_gguf(model, None, tmp_path / "x.gguf")
    with pytest.raises(ExportError, match="weight type"):
        G.write_gguf(tiny_model("llama"), None, tmp_path / "x.gguf", "q2_k")
    (tmp_path / "x.gguf").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        G.write_gguf(tiny_model("llama"), None, tmp_path / "x.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"] and (tmp_path / "x.gguf").read_text() == "mine"


def test_a_word_level_tokenizer_is_refused_with_the_way_out(tok, tmp_path):
    with pytest.raises(ExportError, match="not byte-level BPE.*tokenizer=None"):
        G.write_gguf(tiny_model("llama"), tok, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path, ids):
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    model = tiny_model("llama", rope_parameters=rope)
    G.write_gguf(model, None, tmp_path / "r.gguf", "f32")
    _, tensors = G.read_gguf_tensors(tmp_path / "r.gguf")
    f = tensors["rope_freqs.weight"]
    inv = model.model.rotary_emb.inv_freq.double()
    base = 1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    np.testing.assert_allclose(f, (base / inv).numpy(), rtol=1e-6)  # llama.cpp divides each frequency by f
    assert f[-1] == pytest.approx(8.0) and f.min() >= 1.0 and len(set(f.tolist())) > 1
    yarn = dict(rope, rope_type="yarn", beta_fast=32.0, beta_slow=1.0)
    yarn.pop("low_freq_factor"), yarn.pop("high_freq_factor")
    with pytest.raises(ExportError, match="yarn"):
        G.write_gguf(tiny_model("llama", rope_parameters=yarn), None, tmp_path / "y.gguf")


def test_quantised_types_fall_back_to_f16_where_rows_do_not_fit_blocks(tmp_path, ids):
    model = tiny_model("llama", hidden_size=64, num_attention_heads=8)  # ffn_down rows: 40, not a 32-multiple
    report = G.write_gguf(model, None, tmp_path / "q8.gguf", "q8_0")
    assert report.f16_fallback == [f"blk.{i}.ffn_down.weight" for i in range(4)]
    meta, _ = G.read_gguf_tensors(tmp_path / "q8.gguf")
    assert meta["general.file_type"] == 7  # MOSTLY_Q8_0
    check = G.verify_gguf(tmp_path / "q8.gguf", model, None, "q8_0", runtime="python")
    assert check["ok"] and check["max_abs_dlogprob_topk"] < 1e-4  # the reference is rounded the same way
    f16 = G.write_gguf(model, None, tmp_path / "f16.gguf", "f16")
    assert f16.bytes < G.write_gguf(model, None, tmp_path / "f32.gguf", "f32").bytes


def test_widths_off_the_kernel_multiple_are_flagged_before_and_after_writing(tmp_path):
    """An MLP width that is not a multiple of 16 keeps llama.cpp's prompt-processing kernel off that layer's MLP
    (bench/results/gguf_alignment.md): the Export page predicts the layers from the plan, the written report
    names them by their index in the file (removed blocks renumber), and the note says what to do."""
    model = tiny_model("llama", hidden_size=64, num_attention_heads=8, intermediate_size=128)
    plan = Plan.empty(model).with_units("channel", 0, range(3)).with_units("channel", 2, range(16))
    plan = plan.with_units("channel", 3, range(5)).with_units("block", None, [1])
    assert G.slow_kernel_layers(model, plan) == {0: 125, 3: 123}  # layer 2 keeps 112 = 16 x 7; block 1 is gone
    assert G.slow_kernel_layers(model, plan, multiple=1) == {}
    report = G.write_gguf(apply_plan(model, plan), None, tmp_path / "p.gguf", "f16", plan=plan)
    assert report.slow_kernel_layers == {0: 125, 2: 123}  # blk.2 of the file is layer 3 of the model
    note = G.kernel_note(G.slow_kernel_layers(model, plan))
    assert note.startswith("2 layer(s)") and "123, 125" in note and "multiple_of=32" in note
    assert G.kernel_note({}) == ""
    assert G.slow_kernel_layers(model, plan.without_mlp(0)) == {3: 123}  # a removed MLP has no width to align
    aligned = Plan.empty(model).with_units("channel", 0, range(32)).with_units("channel", 1, range(48))
    assert G.slow_kernel_layers(model, aligned) == {}
    assert G.write_gguf(apply_plan(model, aligned), None, tmp_path / "a.gguf", "f16",
                        plan=aligned).slow_kernel_layers == {}


def test_widths_aligned_to_32_quantise_every_row(tmp_path):
    """A width-pruned plan falls back to f16 for ``ffn_down`` (rows = kept channels); ``multiple_of=32`` keeps
    every pruned layer's width a whole number of q8_0 blocks, so the whole file quantises and still verifies."""
    from pruneviz.allocate import allocate
    from pruneviz.importance import compute

    model = tiny_model("llama", hidden_size=64, num_attention_heads=8, intermediate_size=128)
    imap = compute(model, "magnitude", None)
    reports = {}
    for m in (1, 32):
        plan = allocate(model, imap, 0.2, "incremental", attn_share=0, multiple_of=m)
        pruned = apply_plan(model, plan)
        reports[m] = G.write_gguf(pruned, None, tmp_path / f"m{m}.gguf", "q8_0")
        widths = [pruned.model.layers[i].mlp.down_proj.in_features for i in range(4)]
        assert all(w % 32 == 0 for w in widths) == (m == 32), widths
        predicted = G.unquantised_layers(model, plan, "q8_0")  # what the Export page warns about beforehand
        assert reports[m].f16_fallback == [f"blk.{i}.ffn_down.weight" for i in predicted]
        assert G.unquantised_layers(model, plan, "f16") == []
    assert reports[1].f16_fallback and reports[32].f16_fallback == []
    assert reports[32].bytes < reports[1].bytes
    check = G.verify_gguf(tmp_path / "m32.gguf", apply_plan(model, plan), None, "q8_0", runtime="python")
    assert check["ok"]


def test_compare_logprobs_near_ties_and_failures():
    ref = np.log(np.array([[0.7, 0.2, 0.1], [0.5, 0.49, 0.01], [0.6, 0.3, 0.1]]))
    ids = [0, 0, 0, 0]
    same = G.compare_logprobs(ref, ref.copy(), 1, ids, 0.01, top_k=2)
    assert same["ok"] and same["greedy_agreed"] == 2 and same["max_abs_dlogprob_topk"] == 0
    flip = ref.copy()
    flip[1] = np.log([0.49, 0.5, 0.01])  # a near-tie (margin 0.02 <= 2 * 0.05): greedy comparison stops there
    res = G.compare_logprobs(ref, flip, 1, ids, 0.05, top_k=2)
    assert res["greedy_ok"] and res["greedy_near_tie_at"] == 1
    bad = ref.copy()
    bad[0] = np.log([0.1, 0.2, 0.7])  # a clear disagreement fails
    assert not G.compare_logprobs(ref, bad, 1, ids, 0.05)["ok"]


def test_save_pruned_gguf_writes_a_verified_export_folder(tmp_path):
    model = tiny_model("llama")
    plan = per_layer_plan(model)
    pruned = apply_plan(model, plan)
    report = save_pruned(pruned, None, tmp_path / "out", plan=plan, format="gguf", weight_type="f16",
                         gguf_runtime="python")
    assert report.format == "gguf" and report.ok and report.gguf["arch"] == "deci"
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["README.md", "out.f16.gguf", "pruneviz_export.json", "pruneviz_plan.json"]
    assert report.gguf["verification"]["ok"] and is_export(tmp_path / "out")
    # the report (returned and saved) names the installed file, not the temporary folder it was written in
    saved = json.loads((tmp_path / "out" / "pruneviz_export.json").read_text())
    assert report.gguf["path"] == saved["gguf"]["path"] == str(tmp_path / "out" / "out.f16.gguf")
    assert report.folder == saved["folder"] == str(tmp_path / "out") and Path(report.gguf["path"]).is_file()
    assert "library_name: gguf" in report.card and "llama_cpp" in report.card and "load_model(folder)" in report.card
    meta, _ = G.read_gguf_tensors(tmp_path / "out" / "out.f16.gguf")
    assert meta["pruneviz.plan_sha256"] == plan.sha256()
    with pytest.raises(ExportError, match="no llama.cpp mapping"):  # refused before the folder exists
        save_pruned(tiny_model("gpt2"), None, tmp_path / "g", format="gguf")
    with pytest.raises(ExportError, match="unknown export format"):
        save_pruned(model, None, tmp_path / "g", format="onnx")
    assert not (tmp_path / "g").exists()


def test_cli_choices_follow_the_registries():
    from pruneviz.cli import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "command").choices["export"]
    opts = {a.dest: a for a in sub._actions}
    assert set(opts["format"].choices) == set(EXPORT_FORMATS)
    assert tuple(opts["weight_type"].choices) == G.WEIGHT_TYPES


@needs_llama_cpp
def test_tiny_deci_runs_in_llama_cpp(tmp_path):
    model = tiny_model("llama", hidden_size=64, num_attention_heads=8, intermediate_size=64)
    pruned = apply_plan(model, per_layer_plan(model))
    G.write_gguf(pruned, None, tmp_path / "d.gguf", "f32")
    check = G.verify_gguf(tmp_path / "d.gguf", pruned, None, "f32", runtime="llama.cpp")
    assert check["ok"], check


@needs_llama_cpp
def test_refit_biases_of_the_recipe_run_in_llama_cpp(tmp_path):
    """The recipe's plans (MLP channels only, per-layer widths, the affine refit's new down-projection biases)
    are written as ``deci`` with ``ffn_down.bias`` tensors, and llama.cpp's graph adds them: its log-probabilities
    match the in-memory model's."""
    from pruneviz.allocate import allocate
    from pruneviz.importance import Calibration, compute

    model = tiny_model("llama", hidden_size=64, num_attention_heads=8, intermediate_size=64)
    calib = Calibration(torch.randint(4, 90, (8, 24), generator=torch.Generator().manual_seed(0)), "random")
    plan = allocate(model, compute(model, "slimllm", calib), 0.25, strategy="slimllm", attn_share=0.0,
                    compensation="affine_local")
    pruned = apply_plan(model, plan, calibration=calib.tokens)
    assert G.gguf_layout(pruned).arch == "deci"
    G.write_gguf(pruned, None, tmp_path / "r.gguf", "f32")
    _, tensors = G.read_gguf_tensors(tmp_path / "r.gguf")
    assert any(name.endswith("ffn_down.bias") for name in tensors)
    check = G.verify_gguf(tmp_path / "r.gguf", pruned, None, "f32", runtime="llama.cpp")
    assert check["ok"], check


@needs_llama_cpp
def test_quantised_export_in_llama_cpp_needs_an_exact_read_back(tmp_path):
    """q8_0: llama.cpp's 8-bit activations are measured (KL, greedy), the file itself must read back exactly; a
    file whose quantised weights were damaged after writing is refused, although llama.cpp still runs it."""
    model = tiny_model("llama", hidden_size=64, num_attention_heads=8, intermediate_size=64)
    path = tmp_path / "q8.gguf"
    G.write_gguf(model, None, path, "q8_0")
    check = G.verify_gguf(path, model, None, "q8_0", runtime="llama.cpp")
    assert check["ok"] and check["tolerance"] is None and check["read_back"]["ok"], check
    assert 0 <= check["kl_mean"] <= G.QUANT_KL_SANITY and "reads back exactly" in G.verification_line(check)
    import gguf

    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.1.ffn_up.weight")
    data = bytearray(path.read_bytes())
    start = int(t.data_offset)
    for k in range(start + 2, start + int(t.n_bytes), 34):  # every q8_0 block keeps its f16 scale, loses values
        data[k:k + 8] = bytes(8)
    path.write_bytes(data)
    bad = G.verify_gguf(path, model, None, "q8_0", runtime="llama.cpp")
    assert not bad["ok"] and not bad["read_back"]["ok"] and "NOT exactly" in G.verification_line(bad)


@needs_llama_cpp
def test_the_check_runs_llama_cpp_at_f32_cache_precision_unless_asked_for_its_defaults(tmp_path):
    model = tiny_model("llama", hidden_size=64, num_attention_heads=8, intermediate_size=64)
    G.write_gguf(model, None, tmp_path / "f.gguf", "f32")
    exact = G.verify_gguf(tmp_path / "f.gguf", model, None, "f32", runtime="llama.cpp")
    served = G.verify_gguf(tmp_path / "f.gguf", model, None, "f32", runtime="llama.cpp", runtime_defaults=True)
    assert exact["ok"] and not exact["runtime_defaults"] and served["runtime_defaults"]
    assert exact["max_abs_dlogprob_topk"] < 1e-4 < served["max_abs_dlogprob_topk"]  # the f16 KV cache shows


# ---- the bundled model -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol20(bundled):
    from pruneviz.allocate import Target, allocate
    from pruneviz.importance import compute

    scores = compute(bundled.model, "magnitude")
    plan = allocate(bundled.model, scores, Target(0.2, "non_embedding"), strategy="uniform")
    assert plan.is_uniform()
    return plan, apply_plan(bundled.model, plan)


@pytest.mark.slow
def test_bundled_dense_export_reproduces_the_original_gguf_rows(bundled, tmp_path):
    """The bundled weights came from a llama GGUF (transformers un-permuted q/k on load): writing them back must
    give the original file's dequantised tensors exactly, which checks the row permutation on real weights."""
    import gguf

    from pruneviz.loading import bundled_gguf

    report = G.write_gguf(bundled.model, bundled.tokenizer, tmp_path / "dense.gguf", "f32")
    assert report.arch == "llama" and report.tokenizer.startswith("copied from")
    mine = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "dense.gguf")).tensors}
    orig = gguf.GGUFReader(str(bundled_gguf()))
    for t in orig.tensors:
        if t.name.startswith(("blk.0.", "blk.29.")) and t.name.endswith("weight"):
            np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type),
                                          np.asarray(mine[t.name].data), err_msg=t.name)
    src = {k: f.contents() for k, f in orig.fields.items() if k.startswith("tokenizer.")}
    out = {k: f.contents() for k, f in gguf.GGUFReader(str(tmp_path / "dense.gguf")).fields.items()
           if k.startswith("tokenizer.")}
    assert out == src  # the whole tokenizer and chat template


@pytest.mark.slow
@needs_llama_cpp
def test_bundled_pruned_20_percent_runs_in_llama_cpp(bundled, smol20, tmp_path):
    plan, pruned = smol20
    report = save_pruned(pruned, bundled.tokenizer, tmp_path / "smol20", plan=plan, format="gguf",
                         weight_type="f16", gguf_runtime="llama.cpp")
    v = report.gguf["verification"]
    assert report.gguf["arch"] == "llama" and v["runtime"].startswith("llama.cpp")
    assert v["ok"] and v["tokenizer_agrees"] and v["greedy_agreed"] >= 6
    assert v["max_abs_dlogprob_topk"] <= G.TOLERANCE["f16"] and math.isfinite(v["max_abs_dlogprob_topk"])
    assert report.gguf["slow_kernel_layers"] == G.slow_kernel_layers(bundled.model, plan)  # no block removed


@pytest.mark.slow
def test_bundled_per_layer_gguf_export_folder_loads_back(bundled, tmp_path, monkeypatch):
    """The export folder of a per-layer (deci) GGUF of the bundled model loads with ``load_model``: the logits of the
    model rounded as the file was (f16), the bundled tokenizer and chat template, and the plan it was pruned with."""
    from pruneviz.allocate import Target, allocate
    from pruneviz.export import plan_of
    from pruneviz.importance import compute
    from pruneviz.loading import load_model

    monkeypatch.setenv("PRUNEVIZ_CACHE", str(tmp_path / "cache"))
    plan = allocate(bundled.model, compute(bundled.model, "magnitude"), Target(0.1, "non_embedding"),
                    strategy="global")
    pruned = apply_plan(bundled.model, plan)
    (tmp_path / "pl").mkdir()  # as save_pruned(format="gguf") lays it out (its verification is tested above)
    assert G.write_gguf(pruned, bundled.tokenizer, tmp_path / "pl" / "pl.f16.gguf", "f16", plan=plan).arch == "deci"
    lm = load_model(str(tmp_path / "pl"), device="cpu", dtype="fp32")
    text = "def f(x):\n    return x + 1  # the capital of France is Paris"
    ids = bundled.tokenizer(text, return_tensors="pt").input_ids
    assert lm.tokenizer(text).input_ids == ids[0].tolist()
    assert lm.tokenizer.chat_template == bundled.tokenizer.chat_template
    assert lm.tokenizer.eos_token == bundled.tokenizer.eos_token
    with torch.no_grad():
        want = G.rounded_like_gguf(pruned, "f16")(ids).logits
        got = lm.model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
    assert plan_of(lm.model) == plan
