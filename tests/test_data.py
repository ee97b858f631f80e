"""Texts and calibration windows: disjoint split, determinism, BOS, text-file errors."""

import sys
import types

import pytest
import torch
from helpers_text import bpe_tokenizer

from pruneviz import data
from pruneviz.errors import PrunevizError, TextError


@pytest.fixture(scope="module")
def btok():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def split():
    return data.split_default()


# ------------------------------------------------------------------ default text


def test_default_text_is_sorted_topics_joined():
    from pydoc_data.topics import topics

    text = data.default_text()
    assert text == "\n\n".join(topics[k] for k in sorted(topics))
    assert len(text) > 100_000


def test_split_default_is_disjoint_by_whole_topics(split):
    calib, evals = split
    topics = data.default_topics()
    eval_idx = [i for i in range(len(topics)) if (i + 1) % 5 == 0]  # every 5th topic
    assert evals == "\n\n".join(topics[i][1] for i in eval_idx)
    assert calib == "\n\n".join(t for i, (_, t) in enumerate(topics) if i not in set(eval_idx))
    # every topic lands in exactly one part
    assert len(calib) + len(evals) + 2 == len(data.default_text())
    assert data.split_default() == (calib, evals)  # deterministic


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_split_default_rejects_bad_fraction(bad):
    with pytest.raises(TextError, match="between 0 and 1"):
        data.split_default(bad)


def test_text_hash_and_source():
    h = data.text_hash("abc")
    assert len(h) == 16 and all(c in "0123456789abcdef" for c in h)
    assert h == data.text_hash("abc") != data.text_hash("abd")
    src = data.text_source("x", "abc")
    assert src.text_sha256.startswith(h) and len(src.text_sha256) == 64 and src.n_chars == 3
    with pytest.raises(Exception):
        src.name = "y"  # frozen


# --------------------------------------------------------------------- text files


def test_load_text_file_ok_and_bom(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("\ufeffhéllo world".encode("utf-8"))
    assert data.load_text_file(p) == "héllo world"


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "empty"),
        (b"  \n\t ", "empty"),
        (b"abc\x00def", "binary"),
        (b"\xff\xfe\xfa bad", "UTF-8"),
    ],
)
def test_load_text_file_rejects(tmp_path, content, match):
    p = tmp_path / "f.txt"
    p.write_bytes(content)
    with pytest.raises(TextError, match=match):
        data.load_text_file(p)


def test_load_text_file_too_large_and_missing(tmp_path):
    p = tmp_path / "big.txt"
    p.write_text("x" * 1000)
    with pytest.raises(TextError, match="limit"):
        data.load_text_file(p, max_bytes=100)
    with pytest.raises(TextError, match="does not exist"):
        data.load_text_file(tmp_path / "nope.txt")
    assert issubclass(TextError, PrunevizError)


# -------------------------------------------------------------------------- specs


def test_get_text_specs(tmp_path, split):
    assert data.get_text("default", "calib") == split[0]
    assert data.get_text("default", "eval") == split[1]
    p = tmp_path / "t.txt"
    p.write_text("some text here")
    assert data.get_text(f"file:{p}") == "some text here"
    assert data.get_text(str(p), "eval") == "some text here"
    with pytest.raises(TextError, match="Unknown text"):
        data.get_text("nonsense-spec")
    with pytest.raises(TextError, match="part"):
        data.get_text("default", "train")
    with pytest.raises(TextError, match="Unknown dataset"):
        data.get_text("hf:imagenet")


def test_hf_dataset_failure_becomes_text_error(monkeypatch):
    calls = []

    def failing_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("offline")

    fake = types.SimpleNamespace(load_dataset=failing_load_dataset)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(TextError, match="not reachable from this machine"):
        data.get_text("hf:wikitext2", "eval")
    assert calls[-1][0][:2] == ("Salesforce/wikitext", "wikitext-2-raw-v1")
    assert calls[-1][1]["split"] == "test"
    with pytest.raises(TextError, match="not reachable"):
        data.load_hf_dataset("c4", "train")
    assert calls[-1][1]["data_files"] == {"train": "en/c4-train.00000-of-01024.json.gz"}


def test_hf_dataset_join(monkeypatch):
    class FakeDS(dict):
        def __len__(self):
            return len(self["text"])

    fake = types.SimpleNamespace(load_dataset=lambda *a, **k: FakeDS(text=["a", "", "b"]))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert data.load_hf_dataset("wikitext2") == "a\n\n\n\nb"


# ------------------------------------------------------------- calibration windows


def test_windows_shape_bos_and_contiguity(btok, split):
    text = split[0][:20_000]
    ids = btok(text, add_special_tokens=False)["input_ids"]
    w = data.calibration_windows(btok, text, n_samples=8, seq_len=32, seed=0)
    assert w.dtype == torch.long and w.shape == (8, 32)
    assert (w[:, 0] == btok.bos_token_id).all()
    assert not (w[:, 1:] == btok.bos_token_id).any()
    joined = " " + " ".join(map(str, ids)) + " "
    starts = set()
    for row in w[:, 1:].tolist():  # each row is a contiguous slice of the token stream
        needle = " " + " ".join(map(str, row)) + " "
        assert needle in joined
        starts.add(tuple(row))
    assert len(starts) == 8  # distinct windows


def test_windows_deterministic_under_seed(btok, split):
    text = split[0][:20_000]
    a = data.calibration_windows(btok, text, 6, 24, seed=1234)
    b = data.calibration_windows(btok, text, 6, 24, seed=1234)
    c = data.calibration_windows(btok, text, 6, 24, seed=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_windows_without_bos(btok, split):
    text = split[0][:5_000]
    w = data.calibration_windows(btok, text, 4, 16, seed=0, bos=False)
    assert w.shape == (4, 16) and not (w == btok.bos_token_id).any()
    nobos = bpe_tokenizer(bos=False)
    w2 = data.calibration_windows(nobos, text, 4, 16, seed=0, bos=True)
    assert w2.shape == (4, 16)


def test_calibration_windows_come_from_calib_part_only(btok, split):
    calib, evals = split
    w = data.calibration_windows(btok, calib, 16, 64, seed=0)
    for row in w:
        snippet = btok.decode(row[1:].tolist())
        assert snippet in calib
        assert snippet not in evals


def test_windows_text_too_short(btok):
    with pytest.raises(TextError, match=r"only \d+ tokens"):
        data.calibration_windows(btok, "tiny text", 1, 64, seed=0)
    with pytest.raises(TextError, match="empty"):
        data.calibration_windows(btok, "   ", 1, 8, seed=0)
    ids = btok("a few more words here to tokenize", add_special_tokens=False)["input_ids"]
    with pytest.raises(TextError, match="distinct windows"):
        data.calibration_windows(btok, "a few more words here to tokenize", len(ids), 8, seed=0)
