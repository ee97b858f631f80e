"""Chat prompt building, greedy/sampled generation, streaming and its statistics."""

import pytest
from helpers_text import bpe_llama, bpe_tokenizer

from pruneviz import chat
from pruneviz.errors import OutOfMemoryAdvice, TextError

MSGS = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture(scope="module")
def ctok():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def cmodel():
    return bpe_llama(vocab_size=320)


def test_build_inputs_uses_chat_template(ctok):
    enc = chat.build_inputs(ctok, MSGS)
    ids = enc["input_ids"]
    assert ids.shape[0] == 1 and enc["attention_mask"].shape == ids.shape
    assert ctok.decode(ids[0]) == "<s>user: Hello, how are you today?</s>\n<s>assistant: "
    assert ids[0, 0] == ctok.bos_token_id and ids[0, 1] != ctok.bos_token_id  # no double BOS
    no_prompt = chat.build_inputs(ctok, MSGS, add_generation_prompt=False)["input_ids"]
    assert no_prompt.shape[1] < ids.shape[1]


def test_build_inputs_without_template():
    plain = bpe_tokenizer(chat_template=False)
    enc = chat.build_inputs(plain, MSGS + [{"role": "assistant", "content": "Fine."}])
    assert plain.decode(enc["input_ids"][0]) == (
        "user: Hello, how are you today?\nassistant: Fine.\nassistant:"
    )


@pytest.mark.parametrize("bad", [[], [{"role": "robot", "content": "x"}], [{"role": "user"}], ["hi"]])
def test_bad_messages(ctok, bad):
    with pytest.raises(TextError):
        chat.build_inputs(ctok, bad)


def test_greedy_reply_is_deterministic_and_matches_stream(cmodel, ctok):
    a = chat.generate_reply(cmodel, ctok, MSGS, max_new_tokens=12)
    b = chat.generate_reply(cmodel, ctok, MSGS, max_new_tokens=12, seed=99)  # seed irrelevant
    assert a.text == b.text and 1 <= a.n_tokens <= 12
    assert a.tokens_per_s == pytest.approx(a.n_tokens / a.seconds)
    stream = chat.stream_reply(cmodel, ctok, MSGS, max_new_tokens=12)
    assert stream.stats is None
    pieces = list(stream)
    assert "".join(pieces) == stream.text == a.text
    assert stream.stats.n_tokens == a.n_tokens and stream.stats.text == a.text
    assert stream.stats.tokens_per_s > 0 and not stream.stats.stopped


def test_sampling_same_seed_same_text(cmodel, ctok):
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.95)
    a = chat.generate_reply(cmodel, ctok, MSGS, seed=7, **kw)
    b = chat.generate_reply(cmodel, ctok, MSGS, seed=7, **kw)
    s = chat.stream_reply(cmodel, ctok, MSGS, seed=7, **kw)
    streamed = "".join(s)
    assert a.text == b.text == streamed
    others = {chat.generate_reply(cmodel, ctok, MSGS, seed=k, **kw).text for k in range(3)}
    assert len(others) > 1  # sampling actually samples


def test_same_seed_same_output_after_weight_copy(cmodel, ctok):
    """A model with identical weights (e.g. a 0%-pruned copy) replies identically."""
    twin = bpe_llama(vocab_size=320, seed=123)
    twin.load_state_dict(cmodel.state_dict())
    kw = dict(max_new_tokens=10, temperature=0.7, top_p=0.9, seed=3)
    assert chat.generate_reply(cmodel, ctok, MSGS, **kw).text == chat.generate_reply(twin, ctok, MSGS, **kw).text


def test_stream_stop(cmodel, ctok):
    stream = chat.stream_reply(cmodel, ctok, MSGS, max_new_tokens=300)
    stream.stop()
    list(stream)
    assert stream.stats.stopped and stream.stats.n_tokens < 300


def test_stream_reraises_generation_errors(cmodel, ctok, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("generation exploded")

    monkeypatch.setattr(cmodel, "generate", boom)
    with pytest.raises(RuntimeError, match="exploded"):
        list(chat.stream_reply(cmodel, ctok, MSGS, timeout=5))

    def oom(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB")

    monkeypatch.setattr(cmodel, "generate", oom)
    with pytest.raises(OutOfMemoryAdvice):
        list(chat.stream_reply(cmodel, ctok, MSGS, timeout=5))
    with pytest.raises(OutOfMemoryAdvice):
        chat.generate_reply(cmodel, ctok, MSGS)
