"""Tiny random models of every supported family, built from configs (no downloads), plus a tiny tokenizer.

Used by the tests and by ``PRUNEVIZ_MODEL=tiny`` (the app's test mode). Shapes are chosen so that grouped
queries, biases, fused projections and ALiBi are all exercised, and a forward pass takes milliseconds.
"""
from __future__ import annotations

import dataclasses

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


# ---- real weights in other families' layouts ---------------------------------------------------------------------

REEXPRESSIBLE = ("mistral", "qwen2", "phi3", "granite", "smollm3", "helium")
"""Families whose config can compute exactly what a LLaMA model computes, so a real LLaMA checkpoint (the bundled
SmolLM2-135M) can be re-expressed in their layout: Mistral without a sliding window, Qwen2 with zero q/k/v biases,
Phi-3 with q/k/v and gate/up fused into ``qkv_proj`` / ``gate_up_proj``, Granite with neutral multipliers
(``attention_multiplier = head_dim^-1/2``), SmolLM3 with rotary embeddings in every layer, Helium (no adapter: the
generic llama-like path) with its interleaved rotary (q/k rows of each head reordered ``[0, d/2, 1, d/2+1, ...]``).
Gemma 2/3, OLMo 2/3 and Qwen3 cannot: their post-norms or q/k norms are not identities for any parameter values."""


def _family_config(cfg, family: str):
    fields = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id, rope_parameters=dict(cfg.rope_parameters))
    extra = {
        "mistral": (tf.MistralConfig, dict(sliding_window=None)),
        "qwen2": (tf.Qwen2Config, dict(use_sliding_window=False)),
        "phi3": (tf.Phi3Config, dict(rope_parameters={**cfg.rope_parameters, "partial_rotary_factor": 1.0},
                                     original_max_position_embeddings=cfg.max_position_embeddings)),
        "granite": (tf.GraniteConfig, dict(attention_multiplier=cfg.head_dim ** -0.5, embedding_multiplier=1.0,
                                           residual_multiplier=1.0, logits_scaling=1.0)),
        "smollm3": (tf.SmolLM3Config, dict(no_rope_layers=[1] * cfg.num_hidden_layers, use_sliding_window=False)),
        "helium": (tf.HeliumConfig, dict(attention_bias=False, mlp_bias=False)),
    }
    if family not in extra:
        raise ValueError(f"a LLaMA model cannot be re-expressed exactly as {family!r}; one of {REEXPRESSIBLE}")
    cls, more = extra[family]
    return cls(**{**fields, **more})


def _family_state(state: dict, family: str, n_layers: int, head_dim: int) -> dict:
    """The LLaMA state dict renamed / fused / reordered for ``family`` (fused rows: q, k, v and gate, up)."""
    from pruneviz.gguf_export import rope_permutation

    out = dict(state)
    if family == "helium":
        for k in [k for k in out if k.endswith(("q_proj.weight", "k_proj.weight"))]:
            out[k] = out[k][rope_permutation(out[k].shape[0] // head_dim, head_dim)]  # llama.cpp's pair order
    if family != "phi3":
        return out
    for i in range(n_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out[a + "qkv_proj.weight"] = torch.cat([out.pop(a + f"{p}_proj.weight") for p in "qkv"])  # [(H+2G)d, D]
        out[m + "gate_up_proj.weight"] = torch.cat([out.pop(m + "gate_proj.weight"),
                                                    out.pop(m + "up_proj.weight")])  # [2F, D]
    return out


def reexpress(model, family: str, probe_rtol: float = 1e-3):
    """``model`` (a dense LLaMA causal LM, never mutated) rebuilt as a ``family`` model computing the same function.

    Real weights in another family's layout: every adapter, criterion, surgery and export path of that family then
    runs on a real checkpoint's weights (outliers, norms, widths), and everything it computes can be compared with
    the LLaMA original's. It is not a checkpoint of that family (no family-specific training): the README says so.
    The new model's logits are checked against ``model``'s on a probe sequence: max |difference| at most
    ``probe_rtol`` times the largest |logit|, else ValueError. Not zero: fused or reordered products round differently
    in fp32 (on the probe the bundled SmolLM2's own fp32 logits differ from its fp64 ones by 1e-4 of the largest
    logit); a wrongly fused or ordered matrix moves them by 1e-3 or more even in a tiny random model. Qwen2's q/k/v
    biases are zero.
    """
    if model.config.model_type != "llama":
        raise ValueError(f"re-expression starts from a LLaMA model, not {model.config.model_type!r}")
    cfg = _family_config(model.config, family)
    dtype = next(model.parameters()).dtype
    new = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=model.config._attn_implementation)
    state = _family_state({k: v.detach().clone() for k, v in model.state_dict().items()}, family,
                          cfg.num_hidden_layers, cfg.head_dim)
    for k, v in new.state_dict().items():
        if k not in state and k.endswith("_proj.bias"):  # Qwen2's q/k/v biases: zero
            state[k] = torch.zeros_like(v)
    new.load_state_dict(state, strict=True)
    new.config._name_or_path = f"{model.config._name_or_path or 'llama'} (as {family})"
    new.eval()
    ids = torch.arange(1, 33).remainder(cfg.vocab_size).view(1, -1)  # [1, 32]
    with torch.inference_mode():
        want = model(input_ids=ids).logits.double()  # [1, 32, V]
        diff = float((new(input_ids=ids).logits.double() - want).abs().max())
    bound = probe_rtol * float(want.abs().max())
    if not diff <= bound:
        raise ValueError(f"the {family} re-expression does not compute the LLaMA model's function "
                         f"(max logit difference {diff:.3g} > {bound:.3g}, {probe_rtol:g} of the largest logit)")
    return new


def rebased(plan, model):
    """The same removed units as ``plan`` for ``model``, a re-expression of the plan's base (same geometry, another
    family's layout)."""
    from pruneviz.plan import BaseIdentity

    return dataclasses.replace(plan, base=BaseIdentity.of(model))
