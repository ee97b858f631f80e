"""The DeciLM ``block_configs`` format: per-layer widths that vLLM's ``DeciLMForCausalLM`` loads with its own code.

What vLLM's ``vllm/model_executor/models/nemotron_nas.py`` (``DeciLMDecoderLayer``) builds for layer ``i`` of a
config with ``block_configs`` (read there, and reproduced by :func:`expected_shapes`):

- attention (unless ``attention.no_op``): ``num_attention_heads`` query heads, **the same in every layer**, and
  ``num_attention_heads // attention.n_heads_in_group`` KV heads of ``head_dim``; q/k/v biases when ``qkv_bias``
  (else ``attention_bias``), an output-projection bias when ``attention_bias``; LLaMA rotary embedding
  (``rotate_half``, ``rope_parameters``);
- MLP (unless ``ffn.no_op``): a SiLU-gated MLP of ``ffn.intermediate_size`` channels (any width; only the older
  ``ffn_mult`` rounds to a multiple of 256), biases on all three projections when ``mlp_bias``;
- weights under Hugging Face LLaMA names (``model.layers.{i}.self_attn.q_proj.weight`` ...).

So a pruned model is expressible when it is a LLaMA graph (families :data:`FAMILIES`, SiLU, no sliding window)
and every layer keeps the same number of query heads; KV heads and MLP widths may differ per layer. Biases the
flags imply but a layer lacks are written as zeros (an exact no-op). Removed blocks are simply absent
(``num_hidden_layers`` counts the kept ones); pruneviz never writes ``no_op`` sub-layers.

``model_type`` is ``"nemotron-nas"`` (what vLLM's ``ModelConfig`` reads per-layer KV heads for); transformers does
not ship that config, so the folder carries ``configuration_decilm.py`` (config only, no model code) and vLLM
loads it with ``--trust-remote-code``. pruneviz reads such folders without running that file
(:func:`llama_config_dict`, used by :func:`pruneviz.loading.load_pruned_folder`), as a LLaMA model with per-layer
shapes.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ExportError

MODEL_TYPE = "nemotron-nas"
ARCHITECTURE = "DeciLMForCausalLM"
FAMILIES = ("llama", "mistral", "qwen2")  # LLaMA graphs: same blocks, rotate_half rope, RMSNorm, SiLU-gated MLP
CONFIG_FILE = "configuration_decilm.py"
_CONFIG_SOURCE = Path(__file__).with_name(CONFIG_FILE)
QKV = ("q_proj", "k_proj", "v_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LAYERS = "model.layers"


@dataclass(frozen=True)
class Block:
    """One decoder layer as DeciLM counts it: query heads, KV heads, MLP channels."""

    n_head: int
    n_kv: int
    n_ff: int


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


def _projections(layer: nn.Module) -> dict[str, nn.Module] | None:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    mods = {n: getattr(attn, n, None) for n in QKV + ("o_proj",)} | {n: getattr(mlp, n, None) for n in MLP}
    return mods if all(isinstance(m, nn.Linear) for m in mods.values()) else None


def blocks_of(model: nn.Module) -> tuple[Block, ...]:
    """Per-layer widths read from the projection shapes; ExportError if a layer is not a LLaMA block."""
    hd = head_dim_of(model)
    out = []
    for i, layer in enumerate(model.model.layers):
        p = _projections(layer)
        if p is None:
            raise ExportError(f"layer {i} has no LLaMA attention and MLP projections (q/k/v/o, gate/up/down)")
        q, k, ff = p["q_proj"].out_features, p["k_proj"].out_features, p["gate_proj"].out_features
        if q % hd or k % hd:
            raise ExportError(f"layer {i}: projection widths {q}/{k} are not whole heads of {hd}")
        out.append(Block(q // hd, k // hd, ff))
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
    heads = sorted({b.n_head for b in blocks})
    if len(heads) > 1:
        return (f"vLLM's DeciLM reads one query-head count (num_attention_heads) for every layer; this model keeps "
                f"{heads} query heads in different layers. Prune attention alike in every layer (allocation with "
                f"deployable='vllm' does) or export another format")
    for i, b in enumerate(blocks):
        if b.n_head == 0 or b.n_kv == 0 or b.n_ff == 0:
            return f"layer {i} has no attention or no MLP left; pruneviz writes whole sub-layers only"
        if b.n_head % b.n_kv:
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
    has = lambda names: any(_projections(l)[n].bias is not None for l in model.model.layers for n in names)  # noqa: E731
    return {"qkv_bias": has(QKV), "attention_bias": has(("o_proj",)), "mlp_bias": has(MLP)}


def decilm_config(model: nn.Module, base: dict) -> dict:
    """``config.json`` of the DeciLM export: ``base`` (the model's config as a clean dict) with the DeciLM fields."""
    blocks, hd = check(model), head_dim_of(model)
    n_head = blocks[0].n_head
    cfg = {k: v for k, v in base.items() if k not in ("bias", "auto_map", "block_configs")}
    cfg.update(model_type=MODEL_TYPE, architectures=[ARCHITECTURE],
               auto_map={"AutoConfig": "configuration_decilm.DeciLMConfig"}, num_hidden_layers=len(blocks),
               num_attention_heads=n_head, num_key_value_heads=blocks[0].n_kv,
               head_dim=hd, intermediate_size=max(b.n_ff for b in blocks), **_bias_flags(model),
               block_configs=[{"attention": {"n_heads_in_group": b.n_head // b.n_kv, "no_op": False,
                                             "replace_with_linear": False},
                               "ffn": {"intermediate_size": b.n_ff, "no_op": False, "replace_with_linear": False}}
                              for b in blocks])
    return cfg


def decilm_tensors(model: nn.Module, cfg: dict) -> dict[str, torch.Tensor]:
    """The weights under the names vLLM loads, with zero biases where ``cfg``'s flags imply one a layer lacks."""
    out = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        out.pop("lm_head.weight", None)  # vLLM ties it to the embeddings
    wants = {n: cfg["qkv_bias"] for n in QKV} | {"o_proj": cfg["attention_bias"]} | {n: cfg["mlp_bias"] for n in MLP}
    for i, layer in enumerate(model.model.layers):
        for name, mod in _projections(layer).items():
            part = "self_attn" if name in QKV + ("o_proj",) else "mlp"
            if wants[name] and mod.bias is None:
                w = mod.weight
                out[f"{LAYERS}.{i}.{part}.{name}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
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
    ``block_configs``. ExportError for what pruneviz does not rebuild (``no_op`` or ``replace_with_linear``
    sub-layers: vLLM loads those, pruneviz has no such layers)."""
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
        if any(s.get(k) for s in (attn, ffn) for k in ("no_op", "replace_with_linear")):
            raise ExportError(f"{where}: layer {i} drops or linearises a sub-layer (no_op / replace_with_linear); "
                              f"vLLM loads that, pruneviz does not rebuild such layers")
        group = attn.get("n_heads_in_group")
        if isinstance(group, bool) or not isinstance(group, int) or group <= 0 or n_head % group:
            raise ExportError(f"{where}: layer {i}: n_heads_in_group {group!r} does not divide {n_head} heads")
        ff = _find_multiple(int(2 * ffn["ffn_mult"] * hidden / 3), 256) if "ffn_mult" in ffn \
            else ffn.get("intermediate_size")
        if isinstance(ff, bool) or not isinstance(ff, int) or ff <= 0:
            raise ExportError(f"{where}: layer {i}: ffn has no intermediate_size (or ffn_mult)")
        q, kv = n_head * hd, n_head // group * hd
        out.append({"self_attn.q_proj": [q, hidden, qkv_bias], "self_attn.k_proj": [kv, hidden, qkv_bias],
                    "self_attn.v_proj": [kv, hidden, qkv_bias], "self_attn.o_proj": [hidden, q, o_bias],
                    "mlp.gate_proj": [ff, hidden, mlp_bias], "mlp.up_proj": [ff, hidden, mlp_bias],
                    "mlp.down_proj": [hidden, ff, mlp_bias], "group": group})
    return out


def llama_config_dict(raw: dict, where: str = "the folder") -> dict:
    """A DeciLM ``config.json`` as a LLaMA config dict with ``pruneviz_layout`` (per-layer shapes), which
    :func:`pruneviz.modeling_pruneviz.apply_layout` rebuilds; no code from the folder runs."""
    shapes = layer_shapes(raw, where)
    layers = {str(i): {"shapes": {k: v for k, v in s.items() if k != "group"},
                       "attrs": {"self_attn.num_key_value_groups": s["group"]}} for i, s in enumerate(shapes)}
    d = {k: v for k, v in raw.items() if k not in ("block_configs", "auto_map", "qkv_bias", "bias")}
    d.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=False, mlp_bias=False,
             num_key_value_heads=raw["num_attention_heads"] // shapes[0]["group"],
             intermediate_size=max(s["mlp.gate_proj"][0] for s in shapes),
             pruneviz_layout={"layers_path": LAYERS, "n_heads_total": raw["num_attention_heads"], "layers": layers})
    return d


def expected_shapes(raw: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape vLLM's DeciLM model loads for ``config.json`` ``raw``."""
    hidden, vocab = raw["hidden_size"], raw["vocab_size"]
    out = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not raw.get("tie_word_embeddings"):
        out["lm_head.weight"] = (vocab, hidden)
    for i, layer in enumerate(layer_shapes(raw)):
        out[f"{LAYERS}.{i}.input_layernorm.weight"] = (hidden,)
        out[f"{LAYERS}.{i}.post_attention_layernorm.weight"] = (hidden,)
        for path, spec in layer.items():
            if path == "group":
                continue
            n_out, n_in, bias = spec
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
