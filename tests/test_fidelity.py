"""Fidelity to the dense model: KL(dense || pruned), top-1 agreement and the perplexity ratio (pruneviz.fidelity)."""

import math

import numpy as np
import pytest
import torch
from helpers_text import FakeLM, bpe_tokenizer

from pruneviz import data, evaluate
from pruneviz.errors import TextError
from pruneviz.evaluate import PPLProtocol
from pruneviz.fidelity import fidelity, token_fidelity
from pruneviz.testing import tiny_model


@pytest.fixture(scope="module")
def text():
    return data.split_default()[1][:4_000]


@pytest.fixture(scope="module")
def dense():
    return tiny_model("llama", seed=0)


def test_model_against_itself(dense, tok, text, one_thread):
    res = fidelity(dense, dense, tok, text, "quick")
    ppl = evaluate.perplexity(dense, tok, text, "quick")
    assert res.kl_mean == 0.0 and res.kl_p99 == 0.0
    assert res.top1_agreement == 1.0 and res.ppl_ratio == pytest.approx(1.0, abs=1e-12)
    assert res.n_tokens == ppl.n_tokens == 16 * 127 and res.complete and res.n_windows == 16
    assert res.ppl_dense == pytest.approx(ppl.ppl, rel=1e-6)
    assert res.per_token_kl.shape == (res.n_tokens,)
    assert "quick" in res.protocol_text and "KL" in res.describe()


def _direct(d: FakeLM, p: FakeLM, windows, first):
    """Hand computation in fp64 from the bigram tables: per-token KL, agreement, both NLLs."""
    lp_d = torch.log_softmax(d.table.detach().double(), -1)  # [V, V]
    lp_p = torch.log_softmax(p.table.detach().double(), -1)  # [V, V]
    kl, agree, nll_d, nll_p = [], [], [], []
    for w, f in zip(windows.tolist(), first):
        for t in range(f, len(w)):
            x, y = w[t - 1], w[t]
            kl.append(float((lp_d[x].exp() * (lp_d[x] - lp_p[x])).sum()))
            agree.append(bool(lp_d[x].argmax() == lp_p[x].argmax()))
            nll_d.append(-float(lp_d[x, y]))
            nll_p.append(-float(lp_p[x, y]))
    return np.array(kl), np.array(agree), np.array(nll_d), np.array(nll_p)


@pytest.mark.parametrize("proto", [
    "quick",
    PPLProtocol("custom", seq_len=24, stride=10, bos="per_window", max_windows=7, batch_size=3),
])
def test_hand_built_pair_matches_direct_computation(proto, text):
    btok = bpe_tokenizer()
    d, p = FakeLM(len(btok), seed=0), FakeLM(len(btok), seed=1)
    with torch.no_grad():  # the "pruned" table: the dense one plus noise, so some argmaxes move and some stay
        p.table.mul_(0.3).add_(d.table)
    res = fidelity(d, p, btok, text, proto)
    ids = btok(text, add_special_tokens=False)["input_ids"]
    bs = evaluate.get_protocol(proto).batch_size
    windows, first = evaluate.ppl_windows(ids, btok.bos_token_id, evaluate.get_protocol(proto))
    kl, agree, nll_d, nll_p = _direct(d, p, windows, first)
    batches = [windows[i : i + bs] for i in range(0, len(windows), bs)]
    for m in (d, p):  # one forward of each model per batch, on exactly the perplexity windows
        assert [b.tolist() for b in m.seen] == [b.tolist() for b in batches]
    assert res.n_tokens == kl.size == evaluate.perplexity(d, btok, text, proto).n_tokens
    assert res.kl_mean == pytest.approx(kl.mean(), rel=1e-5)
    assert res.kl_p99 == pytest.approx(np.percentile(kl, 99), rel=1e-5)
    np.testing.assert_allclose(res.per_token_kl.numpy(), kl, rtol=1e-4, atol=1e-6)
    assert res.top1_agreement == pytest.approx(agree.mean(), abs=1e-12)
    assert 0.0 < res.top1_agreement < 1.0  # random tables: some argmaxes agree, not all
    assert res.ppl_dense == pytest.approx(math.exp(nll_d.mean()), rel=1e-5)
    assert res.ppl_pruned == pytest.approx(math.exp(nll_p.mean()), rel=1e-5)
    assert res.ppl_ratio == pytest.approx(math.exp(nll_p.mean() - nll_d.mean()), rel=1e-5)


def test_per_token_kl_is_non_negative_and_positive_for_different_models(dense, tok, text, one_thread):
    other = tiny_model("llama", seed=3)
    res = fidelity(dense, other, tok, text, PPLProtocol("p", seq_len=64, stride=64, max_windows=6, batch_size=4))
    assert (res.per_token_kl >= 0).all() and res.kl_mean > 0 and res.kl_p99 >= res.kl_mean
    assert res.top1_agreement < 1.0 and res.complete and res.n_windows == 6


def test_token_fidelity_kl_direction_and_clamp():
    d = torch.tensor([[0.0, 2.0, -1.0], [1.0, 1.0, 1.0]])  # [N=2, V=3]
    p = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    kl, agree, nll_d, nll_p = token_fidelity(d, p, torch.tensor([1, 0]))
    pd, pp = torch.softmax(d[0].double(), -1), torch.softmax(p[0].double(), -1)
    assert kl[0].item() == pytest.approx(float((pd * (pd / pp).log()).sum()), rel=1e-5)
    assert kl[1].item() == 0.0 and agree.tolist() == [False, True]
    assert nll_d[0].item() == pytest.approx(-float(pd.log()[1]), rel=1e-6)
    assert nll_p[1].item() == pytest.approx(math.log(3), rel=1e-6)


def test_cancel_returns_partial_and_progress_reports(dense, tok, text, one_thread):
    seen: list[tuple[float, str]] = []
    res = fidelity(dense, dense, tok, text, "quick", progress=lambda f, m: seen.append((f, m)),
                   cancel=lambda: len(seen) >= 1)
    assert not res.complete and res.n_windows == 4 and res.n_windows_total == 16
    assert res.n_tokens == 4 * 127 and "PARTIAL" in res.describe()
    assert seen == [(0.25, "windows 4/16")]
    empty = fidelity(dense, dense, tok, text, "quick", cancel=lambda: True)
    assert empty.n_tokens == 0 and math.isnan(empty.kl_mean) and not empty.complete


def test_bad_text_and_mismatched_vocabularies(dense, tok):
    for bad in ("", "   \n"):
        with pytest.raises(TextError, match="empty"):
            fidelity(dense, dense, tok, bad)
    with pytest.raises(TextError, match="fewer than one"):
        fidelity(dense, dense, tok, "short text", "paper")
    with pytest.raises(TextError, match="different vocabularies"):
        fidelity(dense, tiny_model("llama", vocab_size=100), tok, "x" * 400, "quick")


def test_cli_fidelity_prints_the_library_numbers(tmp_path, capsys, one_thread):
    from pruneviz import export
    from pruneviz.cli import main
    from pruneviz.loading import load_model
    from pruneviz.plan import Plan
    from pruneviz.surgery import apply_plan
    from pruneviz.testing import tiny_tokenizer

    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    plan = Plan.empty(base).with_units("channel", 0, range(10)).with_units("kv", 1, [0])
    export.write_plan(plan, tmp_path / "plan.json")
    (tmp_path / "eval.txt").write_text(data.split_default()[1][:3_000])
    args = ["evaluate", "--model", str(tmp_path / "m"), "--device", "cpu", "--dtype", "fp32",
            "--text", f"file:{tmp_path / 'eval.txt'}"]
    assert main(args + ["--plan", str(tmp_path / "plan.json"), "--fidelity"]) == 0
    out = capsys.readouterr().out
    lm = load_model(str(tmp_path / "m"), device="cpu", dtype="fp32")
    want = fidelity(lm.model, apply_plan(lm.model, plan), lm.tokenizer, (tmp_path / "eval.txt").read_text())
    assert f"KL(dense||pruned) mean {want.kl_mean:.4f} nats, p99 {want.kl_p99:.4f}" in out
    assert f"top-1 agreement {100 * want.top1_agreement:.2f}%" in out and f"PPL ratio {want.ppl_ratio:.4f}" in out
    assert want.kl_mean > 0
    assert main(args + ["--fidelity"]) == 2
    assert "give a --plan" in capsys.readouterr().err
