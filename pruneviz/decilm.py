"""The DeciLM ``block_configs`` format: per-layer widths that vLLM's ``DeciLMForCausalLM`` loads with its own code.

What vLLM's ``vllm/model_executor/models/nemotron_nas.py`` (``DeciLMDecoderLayer``, ``DeciModel``) builds for layer
``i`` of a config with ``block_configs`` (read there, and reproduced by :func:`expected_shapes`):

- attention, unless ``attention.no_op``: ``num_attention_heads`` query heads, **the same in every layer**, and
  ``num_attention_heads // attention.n_heads_in_group`` KV heads of ``head_dim``; q/k/v biases when ``qkv_bias``
  (else ``attention_bias``), an output-projection bias when ``attention_bias``; LLaMA rotary embedding
  (``rotate_half``, ``rope_parameters``); and its pre-norm ``input_layernorm``;
- MLP, unless ``ffn.no_op``: a SiLU-gated MLP of ``ffn.intermediate_size`` channels (any width; only the older
  ``ffn_mult`` rounds to a multiple of 256), biases on all three projections when ``mlp_bias``; and its pre-norm
  ``post_attention_layernorm``;
- weights under Hugging Face LLaMA names (``model.layers.{i}.self_attn.q_proj.weight`` ...).

**no_op sub-layers** (BlockPruner's removed attention / MLP sub-blocks), as read in vLLM's code:

- ``attention.no_op: true``: the layer builds neither ``self_attn`` nor ``input_layernorm`` (``if not
  self._is_no_op_attention:`` guards both in ``DeciLMDecoderLayer.__init__``), so the checkpoint must hold none of
  their tensors (``DeciModel.load_weights`` looks every checkpoint name up in the model's parameters and fails on
  one it lacks; only stray biases are skipped); ``n_heads_in_group`` is not read (pruneviz writes ``null``, which
  TensorRT-LLM's ``NemotronNASModel`` also reads as a no-op layer's zero KV heads). ``forward`` skips the
  attention: the residual stream passes unchanged. The layer has no ``Attention`` module, hence **no KV cache**:
  vLLM counts the attention layers as ``sum(not bc.attention.no_op for bc in block_configs)``
  (``ModelConfig.get_num_layers_by_block_type``, ``vllm/config/model.py``, for models with the ``HasNoOps``
  interface, as ``DeciLMForCausalLM`` is) and reads ``num_key_value_heads`` from the first block that has
  attention (``NemotronNasModelArchConfigConvertor.get_total_num_kv_heads``,
  ``vllm/transformers_utils/model_arch_config_convertor.py``; with no such block it raises "Couldn't determine
  number of kv heads").
- ``ffn.no_op: true``: neither ``mlp`` nor ``post_attention_layernorm`` is built or loaded; ``forward`` skips the
  MLP.
- the **first layer cannot drop its attention**: ``DeciModel.forward`` starts with ``residual = None`` and the
  first layer's fused norm is expected to set it; an attention-free first layer calls
  ``hidden_states, residual = self.post_attention_layernorm(hidden_states, None)``, and vLLM's ``RMSNorm``
  (``vllm/model_executor/layers/layernorm.py``) returns a single tensor when ``residual`` is None, so that unpacking
  breaks. pruneviz refuses such a model for this format (keep the first layer's attention, or remove its block).
- both ``no_op`` in one layer: vLLM builds an empty layer (the identity). pruneviz's plans never make one (a layer
  without attention and MLP is a removed block, :mod:`pruneviz.plan`), and this format refuses it: remove the
  block instead, which is the same function with one layer fewer.
- ``replace_with_linear`` is not implemented by vLLM's ``nemotron_nas.py`` (it never reads the flag, so such a
  layer would be built as a full attention / MLP and its ``linear_attn`` / ``linear_mlp`` weights would fail to
  load); pruneviz neither writes nor reads it.

(NVIDIA's remote code ``modeling_decilm.py`` of Llama-3_1-Nemotron-51B, read in a public copy, builds the same
modules: no ``input_layernorm``/``self_attn`` for a no_op attention, no ``post_attention_layernorm``/``mlp`` for a
no_op FFN; its ``DeciLMDecoderLayer.forward`` skips an attention-free layer's attention and cache update.)

So a pruned model is expressible when it is a LLaMA graph (families :data:`FAMILIES`, SiLU, no sliding window),
every layer with attention keeps the same number of query heads, and the first layer keeps its attention; KV heads
and MLP widths may differ per layer, and a kept layer may lose its attention or its MLP (not both). Biases the flags
imply but a layer lacks are written as zeros (an exact no-op). Removed blocks are simply absent
(``num_hidden_layers`` counts the kept ones).

``model_type`` is ``"nemotron-nas"`` (what vLLM's ``ModelConfig`` reads per-layer KV heads for); transformers does
not ship that config, so the folder carries ``configuration_decilm.py`` (config only, no model code) and vLLM
loads it with ``--trust-remote-code``. pruneviz reads such folders without running that file
(:func:`llama_config_dict`, used by :func:`pruneviz.loading.load_pruned_folder`), as a LLaMA model with per-layer
shapes; a no_op sub-layer becomes pruneviz's own stand-in (:class:`pruneviz.modeling_pruneviz.AbsentAttention`,
whose one-feature cache entry keeps the token count, or :class:`~pruneviz.modeling_pruneviz.AbsentMLP`).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ExportError
from .modeling_pruneviz import AbsentAttention, AbsentMLP

MODEL_TYPE = "nemotron-nas"
ARCHITECTURE = "DeciLMForCausalLM"
FAMILIES = ("llama", "mistral", "qwen2")  # LLaMA graphs: same blocks, rotate_half rope, RMSNorm, SiLU-gated MLP
CONFIG_FILE = "configuration_decilm.py"
_CONFIG_SOURCE = Path(__file__).with_name(CONFIG_FILE)
QKV = ("q_proj", "k_proj", "v_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LAYERS = "model.layers"
ATTN_PARTS = ("self_attn.", "input_layernorm.")  # what a no_op attention drops (module prefixes in a layer)
FFN_PARTS = ("mlp.", "post_attention_layernorm.")  # what a no_op FFN drops


@dataclass(frozen=True)
class Block:
    """One decoder layer as DeciLM counts it: query heads, KV heads, MLP channels; ``attention`` / ``mlp`` False
    for a ``no_op`` sub-layer (a removed sub-block; its widths are then 0)."""

    n_head: int
    n_kv: int
    n_ff: int
    attention: bool = True
    mlp: bool = True


# ---- what the format can express ---------------------------------------------------------------------------------

def family_refusal(config) -> str | None:
    """Why a model of this config is not a LLaMA graph vLLM's DeciLM class computes (None if it is)."""
    family = getattr(config, "model_type", "?")
    if family not in FAMILIES:
        return (f"vLLM's DeciLM class is a LLaMA graph; pruneviz writes it for the {', '.join(FAMILIES)} families, "
                f"not {family!r}")
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        return f"vLLM's DeciLM MLP is SiLU-gated; this model uses {act!r}"
    window = getattr(config, "sliding_window", None)
    sliding = window and (family == "mistral" or getattr(config, "use_sliding_window", False)) \
        and window < getattr(config, "max_position_embeddings", 0)
    if sliding or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return f"the model uses sliding-window attention (window {window}); DeciLM attends to the whole context"
    return None


def head_dim_of(model: nn.Module) -> int:
    """Head size of a (pruned or dense) LLaMA-family model."""
    cfg = model.config
    base = getattr(cfg, "pruneviz_base_geometry", None)
    if base:
        return int(base["head_dim"])
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _attention_removed(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, "self_attn", None), AbsentAttention)


def _mlp_removed(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, "mlp", None), AbsentMLP)


def _projections(layer: nn.Module) -> dict[str, nn.Module] | None:
    """The layer's LLaMA projections by name (those of a removed sub-block left out), or None if one is missing."""
    mods = {}
    if not _attention_removed(layer):
        attn = getattr(layer, "self_attn", None)
        mods |= {n: getattr(attn, n, None) for n in QKV + ("o_proj",)}
    if not _mlp_removed(layer):
        mlp = getattr(layer, "mlp", None)
        mods |= {n: getattr(mlp, n, None) for n in MLP}
    return mods if all(isinstance(m, nn.Linear) for m in mods.values()) else None


def blocks_of(model: nn.Module) -> tuple[Block, ...]:
    """Per-layer widths read from the projection shapes (a removed attention or MLP sub-block, pruneviz's
    :class:`~pruneviz.modeling_pruneviz.AbsentAttention` / ``AbsentMLP``, as ``no_op``); ExportError if a layer is
    not a LLaMA block."""
    hd = head_dim_of(model)
    out = []
    for i, layer in enumerate(model.model.layers):
        p = _projections(layer)
        if p is None:
            raise ExportError(f"layer {i} has no LLaMA attention and MLP projections (q/k/v/o, gate/up/down)")
        attn, mlp = not _attention_removed(layer), not _mlp_removed(layer)
        q, k = (p["q_proj"].out_features, p["k_proj"].out_features) if attn else (0, 0)
        if q % hd or k % hd:
            raise ExportError(f"layer {i}: projection widths {q}/{k} are not whole heads of {hd}")
        out.append(Block(q // hd, k // hd, p["gate_proj"].out_features if mlp else 0, attn, mlp))
    return tuple(out)


def refusal(model: nn.Module) -> str | None:
    """Why ``model`` (pruned or dense) cannot be written as DeciLM ``block_configs`` for vLLM (None if it can)."""
    why = family_refusal(model.config)
    if why:
        return why
    try:
        blocks = blocks_of(model)
    except (ExportError, AttributeError) as e:
        return str(e) if isinstance(e, ExportError) else "the model has no model.layers of LLaMA blocks"
    for i, b in enumerate(blocks):
        if not (b.attention or b.mlp):
            return (f"layer {i} has neither attention nor MLP left (both sub-blocks removed): that layer is the "
                    f"identity, which is a removed block; remove the block instead (plan.with_units('block', None, "
                    f"[layer])), the same function with one layer fewer")
    if not blocks[0].attention:
        return ("the first layer has no attention (its attention sub-block is removed); vLLM's DeciLM forward "
                "cannot start with an attention-free layer (its first fused norm gets no residual, "
                "nemotron_nas.py). Keep the first kept layer's attention, or remove that block")
    heads = sorted({b.n_head for b in blocks if b.attention})
    if len(heads) > 1:
        return (f"vLLM's DeciLM reads one query-head count (num_attention_heads) for every layer; this model keeps "
                f"{heads} query heads in different layers. Prune attention alike in every layer (allocation with "
                f"deployable='vllm' does) or export another format")
    for i, b in enumerate(blocks):
        if (b.attention and (b.n_head == 0 or b.n_kv == 0)) or (b.mlp and b.n_ff == 0):
            return (f"layer {i} has an attention or MLP of zero width; pruneviz writes a removed sub-block as a "
                    f"no_op sub-layer only when surgery replaced it whole (plan.without_attention / without_mlp)")
        if b.attention and b.n_head % b.n_kv:
            return f"layer {i}: {b.n_head} query heads cannot share {b.n_kv} KV heads evenly (n_heads_in_group)"
    return None


def check(model: nn.Module) -> tuple[Block, ...]:
    """The per-layer widths of ``model``, or ExportError saying why DeciLM cannot express it."""
    why = refusal(model)
    if why:
        raise ExportError(f"cannot write a DeciLM (vLLM) checkpoint: {why}. The 'hf' format loads every plan "
                          f"(pruneviz remote code); 'gguf' writes per-layer widths for llama.cpp")
    return blocks_of(model)


# ---- writing ------------------------------------------------------------------------------------------------------

def _bias_flags(model: nn.Module) -> dict[str, bool]:
    """vLLM's bias flags: any layer with a q/k/v, output-projection or MLP bias sets the flag for all layers."""
    def has(names):
        return any(getattr(p.get(n), "bias", None) is not None
                   for p in map(_projections, model.model.layers) for n in names)
    return {"qkv_bias": has(QKV), "attention_bias": has(("o_proj",)), "mlp_bias": has(MLP)}


def block_config(b: Block) -> dict:
    """One ``block_configs`` entry (a ``no_op`` sub-layer for a removed sub-block)."""
    attn = {"n_heads_in_group": b.n_head // b.n_kv if b.attention else None, "no_op": not b.attention,
            "replace_with_linear": False}
    ffn = {"intermediate_size": b.n_ff if b.mlp else None, "no_op": not b.mlp, "replace_with_linear": False}
    return {"attention": attn, "ffn": ffn}


def decilm_config(model: nn.Module, base: dict) -> dict:
    """``config.json`` of the DeciLM export: ``base`` (the model's config as a clean dict) with the DeciLM fields."""
    blocks, hd = check(model), head_dim_of(model)
    first = blocks[0]  # check(): the first layer has attention, which is where vLLM reads num_key_value_heads
    widths = [b.n_ff for b in blocks if b.mlp]
    cfg = {k: v for k, v in base.items() if k not in ("bias", "auto_map", "block_configs")}
    cfg.update(model_type=MODEL_TYPE, architectures=[ARCHITECTURE],
               auto_map={"AutoConfig": "configuration_decilm.DeciLMConfig"}, num_hidden_layers=len(blocks),
               num_attention_heads=first.n_head, num_key_value_heads=first.n_kv, head_dim=hd,
               intermediate_size=max(widths) if widths else int(base.get("intermediate_size") or 1),
               **_bias_flags(model), block_configs=[block_config(b) for b in blocks])
    return cfg


def decilm_tensors(model: nn.Module, cfg: dict) -> dict[str, torch.Tensor]:
    """The weights under the names vLLM loads, with zero biases where ``cfg``'s flags imply one a layer lacks, and
    nothing of a ``no_op`` sub-layer (its modules and its pre-norm)."""
    out = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        out.pop("lm_head.weight", None)  # vLLM ties it to the embeddings
    wants = {n: cfg["qkv_bias"] for n in QKV} | {"o_proj": cfg["attention_bias"]} | {n: cfg["mlp_bias"] for n in MLP}
    for i, (layer, block) in enumerate(zip(model.model.layers, cfg["block_configs"])):
        pre = f"{LAYERS}.{i}."
        gone = (ATTN_PARTS if block["attention"]["no_op"] else ()) + (FFN_PARTS if block["ffn"]["no_op"] else ())
        for k in [k for k in out if k.startswith(pre) and k[len(pre):].startswith(gone)]:
            del out[k]
        for name, mod in _projections(layer).items():
            part = "self_attn" if name in QKV + ("o_proj",) else "mlp"
            if wants[name] and mod.bias is None:
                w = mod.weight
                out[f"{pre}{part}.{name}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    return out


def write_decilm(model: nn.Module, base: dict, folder: Path) -> dict:
    """Write ``config.json``, ``model.safetensors`` and ``configuration_decilm.py`` into ``folder``; the config."""
    from safetensors.torch import save_file

    cfg = decilm_config(model, base)
    if any(t.device.type == "meta" for t in model.state_dict().values()):
        raise ExportError("the model has weights on the meta device (offloaded); export a model in memory")
    tensors = {k: v.cpu() for k, v in decilm_tensors(model, cfg).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n",
                                        encoding="utf-8")
    shutil.copyfile(_CONFIG_SOURCE, folder / CONFIG_FILE)
    return cfg


# ---- reading ------------------------------------------------------------------------------------------------------

def is_decilm(raw: dict) -> bool:
    """True for a ``config.json`` (as a dict) in the DeciLM ``block_configs`` format."""
    return raw.get("model_type") == MODEL_TYPE or ARCHITECTURE in (raw.get("architectures") or [])


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def _whole(raw: dict, key: str, where: str) -> int:
    v = raw.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ExportError(f"{where}: config.json field {key!r} must be a positive whole number, not {v!r}")
    return v


def layer_shapes(raw: dict, where: str = "the folder") -> list[dict[str, list]]:
    """Per layer, ``{module path: [out, in, has_bias]}`` as vLLM's ``DeciLMDecoderLayer`` builds it from
    ``block_configs``, plus ``"group"`` (``n_heads_in_group``, None for a ``no_op`` attention) and ``"no_op"``
    (the sub-layers it drops: ``"attention"``, ``"ffn"``). A ``no_op`` sub-layer has no projections. ExportError for
    what pruneviz does not rebuild: ``replace_with_linear`` sub-layers (vLLM's DeciLM class does not implement them
    either) and a layer whose attention and FFN are both ``no_op`` (a removed block)."""
    hidden, n_head = _whole(raw, "hidden_size", where), _whole(raw, "num_attention_heads", where)
    hd = raw.get("head_dim") or hidden // n_head
    blocks = raw.get("block_configs")
    n = _whole(raw, "num_hidden_layers", where)
    if not isinstance(blocks, list) or len(blocks) != n:
        raise ExportError(f"{where}: block_configs must list one entry per layer ({n}); re-export the folder")
    o_bias = bool(raw.get("attention_bias") or raw.get("bias"))
    qkv_bias, mlp_bias = bool(raw.get("qkv_bias", o_bias)), bool(raw.get("mlp_bias"))
    out = []
    for i, b in enumerate(blocks):
        attn, ffn = (b.get("attention") or {}, b.get("ffn") or {}) if isinstance(b, dict) else ({}, {})
        no_op = tuple(name for name, s in (("attention", attn), ("ffn", ffn)) if s.get("no_op"))
        if any(s.get("replace_with_linear") and not s.get("no_op") for s in (attn, ffn)):
            raise ExportError(f"{where}: layer {i} linearises a sub-layer (replace_with_linear); vLLM's DeciLM class "
                              f"does not implement that and pruneviz does not rebuild such layers")
        if len(no_op) == 2:
            raise ExportError(f"{where}: layer {i} drops both its attention and its MLP (no_op): that layer is the "
                              f"identity; remove the block instead (one layer fewer in num_hidden_layers and "
                              f"block_configs)")
        shapes: dict = {"group": None, "no_op": no_op}
        if "attention" not in no_op:
            group = attn.get("n_heads_in_group")
            if isinstance(group, bool) or not isinstance(group, int) or group <= 0 or n_head % group:
                raise ExportError(f"{where}: layer {i}: n_heads_in_group {group!r} does not divide {n_head} heads")
            q, kv = n_head * hd, n_head // group * hd
            shapes |= {"self_attn.q_proj": [q, hidden, qkv_bias], "self_attn.k_proj": [kv, hidden, qkv_bias],
                       "self_attn.v_proj": [kv, hidden, qkv_bias], "self_attn.o_proj": [hidden, q, o_bias],
                       "group": group}
        if "ffn" not in no_op:
            ff = _find_multiple(int(2 * ffn["ffn_mult"] * hidden / 3), 256) if "ffn_mult" in ffn \
                else ffn.get("intermediate_size")
            if isinstance(ff, bool) or not isinstance(ff, int) or ff <= 0:
                raise ExportError(f"{where}: layer {i}: ffn has no intermediate_size (or ffn_mult)")
            shapes |= {"mlp.gate_proj": [ff, hidden, mlp_bias], "mlp.up_proj": [ff, hidden, mlp_bias],
                       "mlp.down_proj": [hidden, ff, mlp_bias]}
        out.append(shapes)
    return out


def _projection_shapes(s: dict) -> dict[str, list]:
    return {k: v for k, v in s.items() if k not in ("group", "no_op")}


def llama_config_dict(raw: dict, where: str = "the folder") -> dict:
    """A DeciLM ``config.json`` as a LLaMA config dict with ``pruneviz_layout`` (per-layer shapes; a ``no_op``
    sub-layer as pruneviz's stand-in for a removed sub-block, its pre-norm as the identity), which
    :func:`pruneviz.modeling_pruneviz.apply_layout` rebuilds; no code from the folder runs."""
    shapes = layer_shapes(raw, where)
    hidden = raw["hidden_size"]
    layers = {}
    for i, s in enumerate(shapes):
        spec: dict = {"shapes": _projection_shapes(s)}
        if s["group"] is not None:
            spec["attrs"] = {"self_attn.num_key_value_groups": s["group"]}
        absent = {}
        if "attention" in s["no_op"]:
            absent |= {"self_attn": ["attention"], "input_layernorm": ["norm"]}
        if "ffn" in s["no_op"]:
            absent |= {"mlp": ["mlp", hidden], "post_attention_layernorm": ["norm"]}
        if absent:
            spec["absent"] = absent
        layers[str(i)] = spec
    groups = [s["group"] for s in shapes if s["group"] is not None]
    widths = [s["mlp.gate_proj"][0] for s in shapes if "mlp.gate_proj" in s]
    d = {k: v for k, v in raw.items() if k not in ("block_configs", "auto_map", "qkv_bias", "bias")}
    d.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=False, mlp_bias=False,
             num_key_value_heads=raw["num_attention_heads"] // groups[0] if groups else raw["num_attention_heads"],
             intermediate_size=max(widths) if widths else raw.get("intermediate_size") or 1,
             pruneviz_layout={"layers_path": LAYERS, "n_heads_total": raw["num_attention_heads"], "layers": layers})
    return d


def expected_shapes(raw: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape vLLM's DeciLM model loads for ``config.json`` ``raw`` (a ``no_op`` attention:
    no ``self_attn`` and no ``input_layernorm``; a ``no_op`` FFN: no ``mlp`` and no ``post_attention_layernorm``)."""
    hidden, vocab = raw["hidden_size"], raw["vocab_size"]
    out = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not raw.get("tie_word_embeddings"):
        out["lm_head.weight"] = (vocab, hidden)
    for i, layer in enumerate(layer_shapes(raw)):
        if "attention" not in layer["no_op"]:
            out[f"{LAYERS}.{i}.input_layernorm.weight"] = (hidden,)
        if "ffn" not in layer["no_op"]:
            out[f"{LAYERS}.{i}.post_attention_layernorm.weight"] = (hidden,)
        for path, (n_out, n_in, bias) in _projection_shapes(layer).items():
            out[f"{LAYERS}.{i}.{path}.weight"] = (n_out, n_in)
            if bias:
                out[f"{LAYERS}.{i}.{path}.bias"] = (n_out,)
    return out


def schema_mismatch(folder: Path) -> str | None:
    """Where the folder's weights differ from what vLLM builds from its config (None if every name and shape
    matches exactly: nothing missing, nothing extra that vLLM would skip)."""
    from safetensors import safe_open

    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    want = expected_shapes(raw)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if not (missing or extra or wrong):
        return None
    return "; ".join(x for x in (f"missing {missing[:4]}" if missing else "", f"extra {extra[:4]}" if extra else "",
                                 f"shape differs for {[(k, have[k], want[k]) for k in wrong[:4]]}" if wrong else "")
                     if x)
