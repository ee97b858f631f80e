"""Perplexity protocols, parameter / FLOP / KV-cache accounting and speed measurement."""

import math

import pytest
import torch
from helpers_text import FakeLM, bpe_llama, bpe_tokenizer
from torch import nn

from pruneviz import data, evaluate
from pruneviz.errors import TextError
from pruneviz.evaluate import PROTOCOLS, PPLProtocol
from pruneviz.plan import dense_params


@pytest.fixture(scope="module")
def btok():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def text():
    return data.split_default()[1][:6_000]


@pytest.fixture(scope="module")
def stream(btok, text):
    """BOS + text ids: the token stream of the 'once' protocols."""
    return [btok.bos_token_id] + btok(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------- protocols


def test_presets_and_describe():
    assert set(PROTOCOLS) >= {"quick", "paper", "long"}
    paper = PROTOCOLS["paper"]
    assert (paper.seq_len, paper.stride, paper.bos, paper.max_windows) == (128, 128, "once", None)
    assert PROTOCOLS["long"].stride < PROTOCOLS["long"].seq_len
    for p in PROTOCOLS.values():
        d = p.describe()
        assert str(p.seq_len) in d and p.name in d
    assert "one BOS" in paper.describe() and "non-overlapping" in paper.describe()
    with pytest.raises(ValueError):
        PPLProtocol("bad", seq_len=16, stride=32)
    with pytest.raises(ValueError):
        PPLProtocol("bad", seq_len=16, stride=16, bos="twice")


def test_paper_window_count_and_bos_placement(btok, text, stream):
    n_tokens = len(stream) - 1
    windows, first = evaluate.ppl_windows(stream[1:], btok.bos_token_id, PROTOCOLS["paper"])
    assert windows.shape == ((n_tokens + 1) // 128, 128)
    assert windows[0, 0] == btok.bos_token_id
    assert not (windows[1:, 0] == btok.bos_token_id).any()  # one BOS for the whole stream
    assert windows.flatten().tolist() == stream[: windows.numel()]  # contiguous, remainder dropped
    assert first == [1] * windows.shape[0]


def test_per_window_bos(btok, stream):
    proto = PPLProtocol("pw", seq_len=32, stride=32, bos="per_window")
    windows, first = evaluate.ppl_windows(stream[1:], btok.bos_token_id, proto)
    assert (windows[:, 0] == btok.bos_token_id).all()
    assert windows.shape == ((len(stream) - 1) // 31, 32)
    assert windows[:, 1:].flatten().tolist() == stream[1 : 1 + 31 * windows.shape[0]]


def test_uniform_model_ppl_equals_vocab_size(btok, text):
    model = bpe_llama(vocab_size=384, tie=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits 0: uniform over 384 tokens
    res = evaluate.perplexity(model, btok, text, "quick")
    assert res.ppl == pytest.approx(384.0, rel=1e-5)
    assert res.nll_mean == pytest.approx(math.log(384), rel=1e-6)
    assert res.n_windows == 16 and res.n_tokens == 16 * 127 and res.complete
    assert res.per_token_nll.shape == (127,)


def _hand_nll(model: FakeLM, stream, positions):
    vals = [model.bigram_nll(stream[i - 1], stream[i]) for i in positions]
    return sum(vals) / len(vals), len(vals)


def test_nonoverlapping_scores_all_but_window_first_tokens(btok, text, stream):
    model = FakeLM(len(btok))
    proto = PPLProtocol("p64", seq_len=64, stride=64, bos="once", batch_size=3)
    res = evaluate.perplexity(model, btok, text, proto)
    n_win = len(stream) // 64
    positions = [w * 64 + p for w in range(n_win) for p in range(1, 64)]
    mean, n = _hand_nll(model, stream, positions)
    assert res.n_windows == n_win and res.n_tokens == n
    assert res.nll_mean == pytest.approx(mean, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(mean), rel=1e-5)


def test_sliding_scores_every_new_token_once(btok, text):
    text = text[:2_000]
    stream = [btok.bos_token_id] + btok(text, add_special_tokens=False)["input_ids"]
    model = FakeLM(len(btok))
    proto = PPLProtocol("slide", seq_len=64, stride=16, bos="once", batch_size=8)
    res = evaluate.perplexity(model, btok, text, proto)
    n_win = (len(stream) - 64) // 16 + 1
    covered = 64 + (n_win - 1) * 16
    mean, n = _hand_nll(model, stream, range(1, covered))  # every position exactly once
    assert res.n_windows == n_win
    assert res.n_tokens == n == 63 + (n_win - 1) * 16
    assert res.nll_mean == pytest.approx(mean, rel=1e-5)


def test_max_windows_and_batching_do_not_change_result(btok, text):
    model = FakeLM(len(btok))
    a = evaluate.perplexity(model, btok, text, PPLProtocol("a", 32, 32, "once", 5, batch_size=1))
    b = evaluate.perplexity(model, btok, text, PPLProtocol("b", 32, 32, "once", 5, batch_size=4))
    assert a.n_windows == b.n_windows == 5
    assert a.nll_mean == pytest.approx(b.nll_mean, rel=1e-6)


def test_cancel_returns_partial_and_progress(btok, text):
    model = FakeLM(len(btok))
    proto = PPLProtocol("c", 32, 32, "once", None, batch_size=2)
    calls = []
    state = {"n": 0}

    def cancel():
        state["n"] += 1
        return state["n"] > 2  # allow two batches

    res = evaluate.perplexity(model, btok, text, proto, progress=lambda f, m: calls.append((f, m)), cancel=cancel)
    assert not res.complete and res.n_windows == 4 and res.n_windows_total > 4
    assert res.n_tokens == 4 * 31 and math.isfinite(res.ppl)
    n = res.n_windows_total
    assert calls == [(2 / n, f"windows 2/{n}"), (4 / n, f"windows 4/{n}")]
    assert "PARTIAL" in res.describe()
    full = evaluate.perplexity(model, btok, text, proto, progress=lambda f, m: calls.append((f, m)))
    assert full.complete and calls[-1] == (1.0, f"windows {n}/{n}")


def test_text_errors(btok):
    model = FakeLM(len(btok))
    with pytest.raises(TextError, match="empty"):
        evaluate.perplexity(model, btok, "  ", "quick")
    with pytest.raises(TextError, match="tokens"):
        evaluate.perplexity(model, btok, "too short for a window", "paper")
    with pytest.raises(TextError):
        evaluate.token_losses(model, btok, "")


def test_token_losses_align_with_tokens(btok):
    model = FakeLM(len(btok))
    text = "Hello, how are you today?"
    tokens, nll = evaluate.token_losses(model, btok, text)
    ids = btok(text, add_special_tokens=False)["input_ids"]
    assert "".join(tokens) == text and len(nll) == len(ids)
    assert nll[0] == pytest.approx(model.bigram_nll(btok.bos_token_id, ids[0]), rel=1e-5)
    assert nll[3] == pytest.approx(model.bigram_nll(ids[2], ids[3]), rel=1e-5)
    tokens2, nll2 = evaluate.token_losses(model, bpe_tokenizer(bos=False), text, max_tokens=3)
    assert len(tokens2) == 3 and math.isnan(nll2[0])


# ---------------------------------------------------------------- size and cost

D, F, V, L = 64, 128, 320, 2
LAYER = D * D + D * 32 + D * 32 + D * D + 3 * D * F + 2 * D  # q, k, v, o, mlp, 2 norms


def test_dense_params_tied_counted_once():
    tied = bpe_llama(vocab_size=V, tie=True)
    untied = bpe_llama(vocab_size=V, tie=False)
    assert dense_params(tied) == V * D + L * LAYER + D
    assert dense_params(untied) == 2 * V * D + L * LAYER + D
    assert dense_params(tied, non_embedding=True) == L * LAYER + D
    assert dense_params(untied, non_embedding=True) == L * LAYER + D


def test_flops_per_token_hand_computed():
    model = bpe_llama(vocab_size=V)
    linear = L * (D * D + D * 32 + D * 32 + D * D + 3 * D * F) + V * D  # lm_head is a matmul
    attention = L * 2 * 100 * (D + D)  # QK^T and AV with 4 heads x 16 = 64 wide
    assert evaluate.flops_per_token(model, 100) == 2 * linear + attention


def test_kv_cache_bytes_llama_gqa_and_pruned_layer():
    model = bpe_llama(vocab_size=V)
    assert evaluate.kv_cache_bytes(model, 10, batch=3) == L * (32 + 32) * 10 * 3 * 4
    assert evaluate.kv_cache_bytes(model, 10, dtype=torch.bfloat16) == L * 64 * 10 * 2
    attn = model.model.layers[0].self_attn  # prune one kv head in layer 0 by hand
    attn.k_proj = nn.Linear(D, 16, bias=False)
    attn.v_proj = nn.Linear(D, 16, bias=False)
    assert evaluate.kv_cache_bytes(model, 1) == (32 + 64) * 4
    widths = evaluate.attention_widths(model)
    assert [w["k"] for w in widths] == [16, 32] and [w["q"] for w in widths] == [64, 64]


def test_kv_cache_bytes_other_families():
    from transformers import (
        BloomConfig,
        BloomForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        OPTConfig,
        OPTForCausalLM,
    )

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    opt = OPTForCausalLM(
        OPTConfig(vocab_size=V, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                  num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=64)
    )
    bloom = BloomForCausalLM(BloomConfig(vocab_size=V, hidden_size=64, n_layer=2, n_head=4))
    for model in (gpt2, opt, bloom):
        assert evaluate.kv_cache_bytes(model, 5) == 2 * (64 + 64) * 5 * 4, type(model).__name__
        assert [w["o_in"] for w in evaluate.attention_widths(model)] == [64, 64]


# --------------------------------------------------------------------- speed


def test_measure_speed_tiny(btok):
    model = bpe_llama(vocab_size=V)
    btok.padding_side = "right"
    res = evaluate.measure_speed(model, btok, "Hello world", new_tokens=3, batch_sizes=(1, 2),
                                 repeats=2, warmup=0, prefill_tokens=32)
    assert [b.batch_size for b in res.batches] == [1, 2]
    for b in res.batches:
        assert b.latency_s > 0 and len(b.latencies_s) == 2
        assert b.tokens_per_s == pytest.approx(b.batch_size * 3 / b.latency_s)
    assert res.prefill_tokens_per_s > 0 and res.new_tokens == 3
    assert res.peak_memory_bytes is None and "CPU" in res.memory_note
    assert btok.padding_side == "right"  # restored
