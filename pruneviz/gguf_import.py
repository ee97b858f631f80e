"""Reading back GGUF files that ``transformers`` cannot: llama.cpp's ``deci`` architecture (per-layer widths).

``transformers`` de-quantises ``llama``/``qwen2``/... GGUF files itself (:mod:`pruneviz.loading` uses it), but
has no ``deci`` mapping, so a per-layer GGUF that :func:`pruneviz.gguf_export.write_gguf` wrote (or any ``deci``
file: Nemotron-51B's layout) would not load back. :func:`model_from_deci_gguf` rebuilds it as a LLaMA model with
pruneviz's per-layer layout (``config.pruneviz_layout``, the same skeleton a pruneviz-format or DeciLM folder
loads into, :func:`pruneviz.modeling_pruneviz.apply_layout`), so every page, criterion and export works on it.

Contract:

- **Shapes** come from the per-layer arrays ``deci.attention.head_count[]``, ``head_count_kv[]`` and
  ``deci.feed_forward_length[]``; a layer with ``head_count = 0`` has no attention (pruneviz's stand-in for a
  removed sub-block, its pre-norm the identity), as in llama.cpp's graph. A layer without MLP is refused (the
  writer never makes one; llama.cpp's graph would drop that layer's attention output).
- **Rotary layout.** The ``deci`` rope rotates adjacent pairs; q/k rows are put back in Hugging Face's
  ``rotate_half`` order (the inverse of :func:`rope_permutation`, which the writer applies).
- **Rope scaling.** A file with ``rope_freqs`` (llama3-style scaled frequencies) loads only when it also carries
  the Hugging Face rope parameters (``pruneviz.rope_parameters``, written by pruneviz) and the frequencies they give
  equal the file's; other scalings cannot be recovered from the factors alone, so ModelLoadError says so.
- **Provenance.** ``pruneviz.plan`` / ``pruneviz.base_geometry`` / ``pruneviz.plan_sha256`` (written by pruneviz)
  become the config's ``pruneviz_plan`` / ``pruneviz_base_geometry`` / ``pruneviz_plan_sha256``, as a reloaded
  pruneviz-format folder has them: the model is known to be pruned, and from which base.
- Weights are de-quantised to float32 (``gguf.quants``); nothing from the file is executed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ModelLoadError

ARCH = "deci"
LAYERS = "model.layers"
PROJECTIONS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}


def metadata(reader) -> dict:
    """A ``gguf.GGUFReader``'s metadata as Python values, without the vocabulary (``tokenizer.ggml.*``) and the
    header counts (``GGUF.*``)."""
    return {k: f.contents() for k, f in reader.fields.items()
            if not k.startswith(("tokenizer.ggml.", "GGUF."))}


def file_metadata(path: str | os.PathLike) -> dict:
    """:func:`metadata` of the GGUF file at ``path``; ``{}`` when it cannot be read as GGUF."""
    import gguf

    try:
        return metadata(gguf.GGUFReader(str(path)))
    except (OSError, ValueError, IndexError, KeyError):
        return {}


def _per_layer(meta: dict, key: str, n: int, where: str) -> list[int]:
    v = meta.get(f"{ARCH}.{key}")
    vals = v if isinstance(v, list) else [v] * n
    if len(vals) != n or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in vals):
        raise ModelLoadError(f"{where}: {ARCH}.{key} must give one whole number per layer ({n}), not {v!r}")
    return [int(x) for x in vals]


def _json_field(meta: dict, key: str, where: str):
    if key not in meta:
        return None
    try:
        return json.loads(meta[key])
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{where}: metadata {key} is not valid JSON ({e}); re-export the file") from e


def _layer_specs(heads: list[int], kv: list[int], ff: list[int], hd: int, hidden: int, biases: set[str],
                 where: str) -> dict[str, dict]:
    """``pruneviz_layout["layers"]``: per layer its projection shapes, KV grouping and absent attention."""
    layers = {}
    for i, (h, k, f) in enumerate(zip(heads, kv, ff)):
        if f == 0:
            raise ModelLoadError(f"{where}: layer {i} has no MLP (feed_forward_length 0); llama.cpp's deci graph "
                                 f"drops the attention output of such a layer, and pruneviz does not rebuild it")
        if (h == 0) != (k == 0) or h and h % k:
            raise ModelLoadError(f"{where}: layer {i}: {h} query heads cannot share {k} KV heads evenly")
        spec: dict = {"shapes": {}}
        if h:
            spec["shapes"] |= {"self_attn.q_proj": [h * hd, hidden], "self_attn.k_proj": [k * hd, hidden],
                               "self_attn.v_proj": [k * hd, hidden], "self_attn.o_proj": [hidden, h * hd]}
            spec["attrs"] = {"self_attn.num_key_value_groups": h // k}
        else:
            spec["absent"] = {"self_attn": ["attention"], "input_layernorm": ["norm"]}
        spec["shapes"] |= {"mlp.gate_proj": [f, hidden], "mlp.up_proj": [f, hidden], "mlp.down_proj": [hidden, f]}
        for path, shape in spec["shapes"].items():
            shape.append(f"{i}.{path}" in biases)
        layers[str(i)] = spec
    return layers


def deci_config(meta: dict, tensor_names: set[str], where: str) -> dict:
    """A LLaMA config dict with ``pruneviz_layout`` for a ``deci`` file's metadata and tensor names."""
    a = ARCH
    try:
        n, hidden = int(meta[f"{a}.block_count"]), int(meta[f"{a}.embedding_length"])
        hd = int(meta.get(f"{a}.attention.key_length") or meta[f"{a}.rope.dimension_count"])
        vocab = int(meta.get(f"{a}.vocab_size") or 0)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{where}: the deci metadata lacks {e}; is the file complete?") from e
    if {int(meta.get(f"{a}.attention.value_length", hd)), int(meta.get(f"{a}.rope.dimension_count", hd))} != {hd}:
        raise ModelLoadError(f"{where}: key, value and rotary sizes differ; pruneviz rebuilds LLaMA heads only")
    heads = _per_layer(meta, "attention.head_count", n, where)
    kv = _per_layer(meta, "attention.head_count_kv", n, where)
    ff = _per_layer(meta, "feed_forward_length", n, where)
    biases = {f"{name.split('.')[1]}.{PROJECTIONS[name.split('.')[2]]}" for name in tensor_names
              if name.startswith("blk.") and name.endswith(".bias") and name.split(".")[2] in PROJECTIONS}
    n_heads, theta = max(heads) or 1, float(meta.get(f"{a}.rope.freq_base", 10000.0))
    rope = _json_field(meta, "pruneviz.rope_parameters", where)
    if "rope_freqs.weight" in tensor_names and not rope:
        raise ModelLoadError(f"{where} scales its rotary frequencies (rope_freqs) without the Hugging Face rope "
                             f"parameters they came from, which cannot be recovered from the factors alone; load the "
                             f"Hugging Face checkpoint of this model instead")
    kv_first = next((k for k in kv if k), n_heads)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
           "num_hidden_layers": n, "num_attention_heads": n_heads, "num_key_value_heads": kv_first,
           "head_dim": hd, "intermediate_size": max(ff), "hidden_act": "silu",
           "max_position_embeddings": int(meta.get(f"{a}.context_length") or 2048),
           "rms_norm_eps": float(meta.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
           "rope_parameters": rope or {"rope_type": "default", "rope_theta": theta},
           "tie_word_embeddings": "output.weight" not in tensor_names, "attention_bias": False, "mlp_bias": False,
           "pruneviz_layout": {"layers_path": LAYERS, "n_heads_total": n_heads,
                               "layers": _layer_specs(heads, kv, ff, hd, hidden, biases, where)}}
    if vocab:
        cfg["vocab_size"] = vocab
    return cfg


def rope_permutation(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order that turns Hugging Face's ``rotate_half`` layout into llama.cpp's adjacent-pair layout: within
    each head, new row ``2i`` is old row ``i`` and new row ``2i+1`` is old row ``i + d/2``."""
    half = head_dim // 2
    per_head = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)  # [head_dim]
    return (torch.arange(n_heads)[:, None] * head_dim + per_head[None, :]).reshape(-1)  # [n_heads * head_dim]


def unpermute_rows(t: torch.Tensor, n_heads: int, hd: int) -> torch.Tensor:
    """Rows of a q/k projection (or bias) from llama.cpp's adjacent-pair order back to ``rotate_half`` order."""
    return t[torch.argsort(rope_permutation(n_heads, hd))]


def gguf_parameter(model: nn.Module, name: str) -> tuple[torch.Tensor, str | None]:
    """The parameter of a LLaMA-layout ``model`` that the GGUF tensor ``name`` fills, and ``"q"``/``"k"`` for the
    q/k projections (rows to un-permute where the architecture's rope needs it). KeyError/AttributeError/IndexError
    for a name with no place in the model."""
    m = model.model
    fixed = {"token_embd.weight": m.embed_tokens.weight, "output_norm.weight": m.norm.weight}
    if name in fixed:
        return fixed[name], None
    if name == "output.weight":
        return model.get_output_embeddings().weight, None
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blk":
        raise KeyError(name)
    layer, kind, part = m.layers[int(parts[1])], parts[2], parts[3]
    if kind == "attn_norm":
        return layer.input_layernorm.weight, None
    if kind == "ffn_norm":
        return layer.post_attention_layernorm.weight, None
    mod = layer
    for attr in PROJECTIONS[kind].split("."):
        mod = getattr(mod, attr)
    return getattr(mod, part), {"attn_q": "q", "attn_k": "k"}.get(kind)


def _check_rope(model: nn.Module, factors: np.ndarray, theta: float, hd: int, where: str) -> None:
    """The rebuilt model's rotary frequencies must be the file's (``rope_freqs``: divisors of each pair's)."""
    inv = model.model.rotary_emb.inv_freq.detach().double().cpu()  # [hd / 2]
    base = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    got = torch.from_numpy(np.asarray(factors, dtype=np.float64)).reshape(-1)
    if got.numel() != inv.numel() or not torch.allclose(base / inv, got, rtol=1e-5, atol=0):
        raise ModelLoadError(f"{where}: its rope_freqs differ from the frequencies its pruneviz.rope_parameters "
                             f"give; the file is inconsistent, re-export it")


def model_from_deci_gguf(path: str | os.PathLike) -> nn.Module:
    """The ``deci`` GGUF at ``path`` as a float32 LLaMA model with per-layer widths (eval mode, CPU).

    ModelLoadError for what it cannot rebuild (module docstring) and for a file whose tensors do not match its
    metadata (missing, extra or of another shape)."""
    import gguf
    import transformers as tf

    from .modeling_pruneviz import pruned_class

    path, where = Path(path), Path(path).name
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read {path} as GGUF ({e}); is the file complete?") from e
    meta = metadata(reader)
    if meta.get("general.architecture") != ARCH:
        raise ModelLoadError(f"{where} is a {meta.get('general.architecture')!r} file, not {ARCH}")
    tensors = {t.name: t for t in reader.tensors}
    cfg_dict = deci_config(meta, set(tensors), where)
    cfg_dict.setdefault("vocab_size", int(tensors["token_embd.weight"].shape[-1]))
    config = tf.LlamaConfig.from_dict(cfg_dict)
    for key, attr in (("pruneviz.plan", "pruneviz_plan"), ("pruneviz.base_geometry", "pruneviz_base_geometry")):
        value = _json_field(meta, key, where)
        if value is not None:
            setattr(config, attr, value)
    if meta.get("pruneviz.plan_sha256"):
        config.pruneviz_plan_sha256 = str(meta["pruneviz.plan_sha256"])
    torch.manual_seed(0)  # the skeleton's initial values are all overwritten below; fixed anyway
    model = pruned_class(tf.LlamaForCausalLM)(config).eval()
    layout = cfg_dict["pruneviz_layout"]["layers"]
    filled = set()
    with torch.no_grad():
        for name, t in tensors.items():
            if name == "rope_freqs.weight":
                _check_rope(model, gguf.quants.dequantize(t.data, t.tensor_type), config.rope_parameters["rope_theta"],
                            config.head_dim, where)
                continue
            try:
                param, rows = gguf_parameter(model, name)
            except (KeyError, AttributeError, IndexError, ValueError):
                raise ModelLoadError(f"{where}: tensor {name} has no place in the model its metadata describes; "
                                     f"is this a file pruneviz or llama.cpp's deci converter wrote?") from None
            arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            value = torch.from_numpy(np.ascontiguousarray(arr.reshape([int(x) for x in reversed(t.shape)])))
            if tuple(value.shape) != tuple(param.shape):
                raise ModelLoadError(f"{where}: {name} has shape {tuple(value.shape)}, its metadata says "
                                     f"{tuple(param.shape)}; the file is inconsistent")
            if rows:
                shape = layout[name.split(".")[1]]["shapes"][f"self_attn.{rows}_proj"]
                value = unpermute_rows(value, shape[0] // config.head_dim, config.head_dim)
            param.copy_(value)
            filled.add(id(param))
    missing = [n for n, p in model.named_parameters() if id(p) not in filled]
    if missing:
        raise ModelLoadError(f"{where}: {len(missing)} tensors are missing (e.g. {', '.join(missing[:3])}), so they "
                             f"would be random; is the file complete?")
    return model
