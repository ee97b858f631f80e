"""Tiny, download-free tokenizers and models for fast unit tests.

* :func:`bpe_tokenizer` - byte-level BPE trained in memory (any text encodes),
  with ``<s>``/``</s>``/``<pad>`` special tokens and an optional chat template.
* :func:`bpe_llama` - a 2-layer random LLaMA with GQA (4 q-heads, 2 kv-heads).
* :class:`FakeLM` - a bigram "model" whose logits depend only on the current
  token, so NLLs can be hand-computed outside the model.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
from torch import nn

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)

_TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Structured pruning removes heads, channels and whole layers from a model.",
    "def function(argument): return argument + 1  # Python code",
    "Perplexity is the exponential of the mean negative log-likelihood.",
    "Hello, how are you today? I am fine, thank you.",
]


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAIN_TEXT * 4, trainer=trainer)
    return tok.to_str()


def bpe_tokenizer(
    chat_template: bool = True,
    bos: bool = True,
    pad: bool = True,
    vocab_size: int = 320,
):
    """A byte-level BPE ``PreTrainedTokenizerFast`` built in memory (no files, no network).

    Special tokens: ``<pad>`` (id 0), ``<s>`` (BOS, id 1), ``</s>`` (EOS, id 2).
    ``bos=False`` / ``pad=False`` leave those roles unset; ``chat_template``
    installs :data:`CHAT_TEMPLATE`. ``add_special_tokens=True`` adds nothing
    (no post-processor), matching tokenizers whose BOS comes from templates.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token="<s>" if bos else None,
        eos_token="</s>",
        pad_token="<pad>" if pad else None,
    )
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def bpe_llama(vocab_size: int = 320, tie: bool = True, seed: int = 0, **overrides):
    """A random 2-layer LLaMA: hidden 64, MLP 128, 4 q-heads, 2 kv-heads, head_dim 16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


class FakeLM(nn.Module):
    """Bigram LM: ``logits[b, t] = table[input_ids[b, t]]``; records every batch it sees.

    The NLL of token y following token x is ``-log_softmax(table[x])[y]``,
    computable without the model (see :meth:`bigram_nll`).
    """

    def __init__(self, vocab_size: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab_size, vocab_size, generator=gen))
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids, **kwargs):
        self.seen.append(input_ids.detach().cpu().clone())
        return SimpleNamespace(logits=self.table[input_ids])  # [B, T, V]

    def bigram_nll(self, prev: int, nxt: int) -> float:
        if getattr(self, "_logp", None) is None:
            with torch.no_grad():
                self._logp = torch.log_softmax(self.table.double(), dim=-1).tolist()  # [V][V]
        return -self._logp[prev][nxt]
