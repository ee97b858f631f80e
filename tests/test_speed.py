"""pruneviz.speed: one protocol for PyTorch and llama.cpp, interleaved rounds, medians and ratios."""
import dataclasses

import pytest
import torch

from pruneviz import speed
from pruneviz.errors import ExportError
from pruneviz.gguf_export import write_gguf
from pruneviz.testing import tiny_model, tiny_tokenizer

PROTO = speed.SpeedProtocol(prompt_tokens=12, decode_tokens=3, batch_sizes=(1, 2), warmup=1, repeats=2)
needs_llama_cpp = pytest.mark.skipif(not speed.llama_cpp_available(),
                                     reason="no llama.cpp binding is installed (README 'GGUF for llama.cpp')")


def test_protocol_checks_its_fields():
    for bad in ({"prompt_tokens": 0}, {"decode_tokens": 1.5}, {"repeats": 0}, {"batch_sizes": ()}, {"warmup": -1}):
        with pytest.raises(ValueError):
            speed.SpeedProtocol(**bad)
    assert "median of 2" in PROTO.describe() and "batch 1, 2" in PROTO.describe()


def test_prompt_ids_are_fixed_and_of_the_asked_length():
    tok = tiny_tokenizer()
    a, b = speed.prompt_ids(tok, 300), speed.prompt_ids(tok, 300)
    assert a == b and len(a) == 300
    r = speed.prompt_ids(None, 20, 96)
    assert r == speed.prompt_ids(None, 20, 96) and len(r) == 20 and min(r) >= 3 and max(r) < 96
    with pytest.raises(ValueError):
        speed.prompt_ids(None, 5)


def test_torch_sample_times_every_batch_and_leaves_the_model_alone():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = speed.torch_sample(model, speed.prompt_ids(None, 12, 96), PROTO)
    assert set(s["runs"]) == {1, 2}
    assert all(r["prefill_s"] > 0 and r["decode_s"] > 0 and r["decode_cpu_s"] >= 0 for r in s["runs"].values())
    summary = speed.summarise("m", "torch", [s], PROTO)
    assert set(summary.decode_cpu_tps) == {1, 2} and "decode_cpu" in speed.ratios(summary, summary)
    assert s["peak_bytes"] is None or s["peak_bytes"] >= speed.param_bytes(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_interleaved_rotates_the_order_and_drops_the_warmup():
    calls = []

    def sampler(k):
        def f():
            calls.append(k)
            return {"k": k, "n": len(calls)}
        return f

    out = speed.interleaved({"a": sampler("a"), "b": sampler("b"), "c": sampler("c")}, PROTO)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [len(v) for v in out.values()] == [2, 2, 2] and out["a"][0]["n"] == 6  # round 1 (warm-up) dropped


def test_summarise_takes_medians_and_ratios_divide():
    runs = [{"runs": {1: {"prefill_s": t, "decode_s": 2 * t}, 2: {"prefill_s": t, "decode_s": t}},
             "peak_bytes": int(100 * t)} for t in (1.0, 2.0, 4.0)]
    proto = speed.SpeedProtocol(12, 3, (1, 2), 0, 3)
    s = speed.summarise("x", "torch", runs, proto)
    assert s.prefill_tps == {1: 6.0, 2: 12.0} and s.decode_tps == {1: 0.75, 2: 3.0} and s.peak_bytes == 400
    assert s.decode_cpu_tps == {}  # samples without CPU times: no CPU-time rates, no CPU ratios
    half = speed.summarise("y", "torch", [{**r, "runs": {b: {k: v / 2 for k, v in x.items()}
                                                           for b, x in r["runs"].items()}} for r in runs], proto)
    assert speed.ratios(half, s) == {"prefill": {1: 2.0, 2: 2.0}, "decode": {1: 2.0, 2: 2.0}}


def test_ratios_pair_the_rounds_so_a_drifting_machine_cancels():
    # the machine halves its speed for a while: "fast" is 1.25x "slow" in rounds 1 and 3, round 2 caught fast in a
    # slow spell; the ratio of the two medians compares a slow round of one with a fast round of the other
    proto = speed.SpeedProtocol(8, 4, (1,), 0, 3)
    def sample(t):
        return {"runs": {1: {"prefill_s": t, "decode_s": t}}, "peak_bytes": None}
    base = speed.summarise("slow", "torch", [sample(t) for t in (1.0, 1.0, 2.0)], proto)
    fast = speed.summarise("fast", "torch", [sample(t / 1.25) for t in (1.0, 2.0, 2.0)], proto)
    assert speed.ratios(fast, base)["decode"][1] == pytest.approx(1.25)  # median of 1.25, 0.625, 1.25
    assert fast.decode_tps[1] / base.decode_tps[1] == pytest.approx(0.625)  # unpaired medians say slower
    assert speed.ratio_spread(fast, base, 1) == pytest.approx((0.625, 1.25))
    lone = dataclasses.replace(fast, samples=fast.samples[:2])  # not timed in the same rounds: medians' ratio
    assert speed.ratios(lone, base)["decode"][1] == pytest.approx(0.625)


def test_llama_cpp_runner_refuses_without_the_binding(monkeypatch, tmp_path):
    monkeypatch.setattr(speed, "llama_cpp_available", lambda: False)
    with pytest.raises(ExportError, match="no llama.cpp binding is installed"):
        speed.LlamaCppRunner(tmp_path / "x.gguf", [1, 2, 3], PROTO)


@needs_llama_cpp
def test_llama_cpp_runner_times_a_file(tmp_path):
    model = tiny_model("llama", hidden_size=64, num_attention_heads=8, intermediate_size=64)
    write_gguf(model, None, tmp_path / "t.gguf", "f32")
    ids = speed.prompt_ids(None, 12, 96)
    with speed.LlamaCppRunner(tmp_path / "t.gguf", ids, PROTO, threads=1) as r:
        s = r.sample()
    assert set(s["runs"]) == {1, 2} and all(x["decode_s"] > 0 and x["decode_cpu_s"] > 0 for x in s["runs"].values())
    assert s["peak_bytes"] > 0 and r.info["version"]


@needs_llama_cpp
def test_llama_cpp_runner_reports_a_file_that_does_not_load(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ExportError, match="could not time bad.gguf"):
        speed.LlamaCppRunner(tmp_path / "bad.gguf", [1, 2, 3], PROTO, threads=1)


@needs_llama_cpp
def test_interleaved_timing_stops_when_cancelled():
    from pruneviz.progress import Cancelled

    calls = []
    with pytest.raises(Cancelled):
        speed.interleaved({"a": lambda: calls.append("a") or {}, "b": lambda: calls.append("b") or {}}, PROTO,
                          cancel=lambda: len(calls) >= 3)
    assert len(calls) == 3  # asked before every sample


def test_gguf_speedup_compares_with_the_dense_model(tmp_path):
    from pruneviz.allocate import allocate
    from pruneviz.importance import compute
    from pruneviz.surgery import apply_plan

    model = tiny_model("llama", hidden_size=64, num_attention_heads=8, intermediate_size=64)
    plan = allocate(model, compute(model, "magnitude"), 0.3, strategy="uniform", attn_share=0.0)
    write_gguf(apply_plan(model, plan), None, tmp_path / "p.gguf", "f32")
    res = speed.gguf_speedup(model, None, tmp_path / "p.gguf", "f32", PROTO)
    assert set(res["ratio"]["decode"]) == {1, 2} and res["file_bytes"]["pruned"] < res["file_bytes"]["dense"]
    assert "OMP_WAIT_POLICY" in res["threading"]


def _panel_script():
    import types

    import streamlit as st

    from pruneviz.testing import tiny_model
    from pruneviz.ui import state
    from pruneviz.ui.speed_panel import gguf_speed_panel

    st.session_state.setdefault("model_spec", state.default_spec())  # jobs are collected for a loaded model
    gguf_speed_panel(types.SimpleNamespace(model=tiny_model(), tokenizer=None), {"path": "/x.gguf",
                                                                                 "weight_type": "f16"})


def test_export_page_panel_without_llama_cpp_says_how_to_install(monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setattr("pruneviz.ui.speed_panel.llama_cpp_available", lambda: False)
    at = AppTest.from_function(_panel_script, default_timeout=60).run()
    assert not at.exception and not at.button
    assert any("Install a llama.cpp binding" in c.value for c in at.caption)


def test_export_page_panel_measures_and_shows_the_ratio(monkeypatch):
    from streamlit.testing.v1 import AppTest

    calls = []

    def fake(model, tokenizer, path, weight_type, progress=None, cancel=None):
        calls.append((path, weight_type))
        tps = {"dense": ({1: 100.0}, {1: 10.0}), "pruned": ({1: 150.0}, {1: 13.0})}
        return {k: {"prefill_tps": p, "decode_tps": d} for k, (p, d) in tps.items()} | {
            "ratio": {"prefill": {1: 1.5}, "decode": {1: 1.3}}, "protocol": "p", "threading": "t",
            "file_bytes": {"dense": 2**21, "pruned": 2**20}}

    monkeypatch.setattr("pruneviz.ui.speed_panel.llama_cpp_available", lambda: True)
    monkeypatch.setattr("pruneviz.ui.speed_panel.gguf_speedup", fake)
    monkeypatch.setenv("PRUNEVIZ_JOB_WAIT", "60")  # the (background) job ends within the click's run
    at = AppTest.from_function(_panel_script, default_timeout=60).run()
    at.button(key="ex_speed").click().run()
    assert not at.exception and calls == [("/x.gguf", "f16")]
    values = {m.label: m.value for m in at.metric}
    assert values == {"Decode, dense": "10.0 tok/s", "Decode, export": "13.0 tok/s", "Decode speed-up": "1.30x"}
