"""Tiny random models of every supported family, built from configs (no downloads), plus a tiny tokenizer.

Used by the tests and by ``PRUNEVIZ_MODEL=tiny`` (the app's test mode). Shapes are chosen so that grouped
queries, biases, fused projections and ALiBi are all exercised, and a forward pass takes milliseconds.
"""
from __future__ import annotations

import torch
import transformers as tf

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "granite", "olmo2", "smollm3",
            "olmo3", "opt", "bloom", "gpt2")
GENERIC_FAMILIES = ("olmo3",)  # no adapter written: accepted as generic llama-like (arch.detect_llama_like)
VOCAB = 96
SLIDING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def tiny_config(family: str = "llama", **overrides):
    """A small config of ``family``: 3-4 layers, GQA (6 query heads in 2 or 3 KV groups) where the family has it.

    Gemma 2 has an explicit head_dim (12) unrelated to its hidden size (32), soft-capping and a sliding window
    (6 tokens) shorter than the test sequences; Gemma 3 text has one KV head (multi-query attention); SmolLM3 has
    no rotary embedding in every second layer; Granite non-trivial multipliers.
    """
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama_like = dict(hidden_size=48, intermediate_size=40, num_hidden_layers=4, num_attention_heads=6,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=True)
    gemma = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4, head_dim=12,
                 query_pre_attn_scalar=12, sliding_window=6, layer_types=SLIDING, max_position_embeddings=128)
    kwargs = {
        "llama": (tf.LlamaConfig, llama_like),
        "mistral": (tf.MistralConfig, {**llama_like, "num_key_value_heads": 3, "tie_word_embeddings": False}),
        "qwen2": (tf.Qwen2Config, llama_like),
        "qwen3": (tf.Qwen3Config, {**llama_like, "num_key_value_heads": 3}),
        "gemma2": (tf.Gemma2Config, {**gemma, "num_key_value_heads": 2, "attn_logit_softcapping": 5.0,
                                     "final_logit_softcapping": 3.0}),
        "gemma3_text": (tf.Gemma3TextConfig, {**gemma, "num_key_value_heads": 1}),
        "phi3": (tf.Phi3Config, {**llama_like, "tie_word_embeddings": False}),
        "granite": (tf.GraniteConfig, {**llama_like, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                                       "attention_multiplier": 0.2, "logits_scaling": 4.0}),
        "olmo2": (tf.Olmo2Config, {**llama_like, "tie_word_embeddings": False}),
        "smollm3": (tf.SmolLM3Config, {**llama_like, "no_rope_layer_interval": 2}),
        "olmo3": (tf.Olmo3Config, {**llama_like, "sliding_window": 6, "layer_types": SLIDING}),
        "opt": (tf.OPTConfig, dict(hidden_size=32, ffn_dim=40, num_hidden_layers=3, num_attention_heads=4,
                                   max_position_embeddings=128, word_embed_proj_dim=32)),
        "bloom": (tf.BloomConfig, dict(hidden_size=32, n_layer=3, n_head=4)),
        "gpt2": (tf.GPT2Config, dict(n_embd=32, n_layer=3, n_head=4, n_positions=128, n_inner=40)),
    }
    if family not in kwargs:
        raise ValueError(f"unknown tiny family {family!r}; one of {FAMILIES}")
    cls, fields = kwargs[family]
    return cls(**{**common, **fields, **overrides})  # overrides go through the constructor (derived fields)


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """A randomly initialised causal LM of ``family`` in eval mode (deterministic under ``seed``)."""
    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    cfg._name_or_path = f"tiny-{family}"
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():  # make norms and biases non-trivial so their slicing is exercised
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_tokenizer():
    """A character-level fast tokenizer over printable ASCII with BOS/EOS/PAD and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = [chr(i) for i in range(32, 127)][: VOCAB - 4]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    return fast
