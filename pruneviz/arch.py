"""Architecture adapters: each model family's prunable, coupled units, declared once.

A *unit* is something pruning removes as a whole. Four kinds exist in every decoder-only family:

- ``head``: one query head: its rows of the query projection and its columns of the attention output projection;
- ``kv``: one key/value group (grouped-query attention): its key and value rows *plus* every query head that
  reads it (so removing a KV group removes ``group_size`` heads and shrinks the KV cache);
- ``channel``: one MLP intermediate channel: its rows of the up (and gate) projection and its column of the
  down projection;
- ``block``: a whole decoder layer (depth pruning).

Each adapter states, for one decoder layer, which feature indices of which module a unit owns
(:class:`Slice`). Everything else (magnitude scores, Taylor scores, surgery, masking, export) reads that one
declaration. Multi-head attention (OPT, GPT-2, BLOOM) is the special case ``n_kv == n_heads``.

The attention output projection's *input columns* for head ``h`` are always ``[h*d, (h+1)*d)`` and the MLP
down projection's input column for channel ``c`` is ``c``: zeroing those columns is exactly removing the unit
(see :mod:`pruneviz.surgery`), which is why masking hooks sit on the inputs of those two modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

import torch
from torch import nn

from .errors import PlanError


@dataclass(frozen=True)
class Geometry:
    """Shape facts of a (dense) model that plans and importance maps are written against."""

    family: str
    model_type: str
    n_layers: int
    n_heads: int  # query heads per layer
    n_kv: int  # key/value heads (groups) per layer; == n_heads for multi-head attention
    head_dim: int
    n_channels: int  # MLP intermediate size
    hidden: int
    vocab: int

    @property
    def group_size(self) -> int:
        """Query heads per KV group."""
        return self.n_heads // self.n_kv

    def kv_of(self, head: int) -> int:
        return head // self.group_size

    def heads_of(self, group: int) -> range:
        return range(group * self.group_size, (group + 1) * self.group_size)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def describe(self) -> str:
        gqa = f"{self.n_kv} KV groups of {self.group_size}" if self.n_kv != self.n_heads else "multi-head"
        return (f"{self.family}/{self.model_type}: {self.n_layers} blocks, {self.n_heads} query heads "
                f"({gqa}), head_dim {self.head_dim}, MLP {self.n_channels}, hidden {self.hidden}")


# ---- the unit vocabulary: one table that every module reads --------------------------------------------------------

@dataclass(frozen=True)
class UnitKind:
    """One kind of prunable unit: its plan/allocation name, importance-map field, labels and count per layer."""

    name: str  # the name plans, allocation and the CLI use: "head", "kv", "channel", "block"
    map: str  # the ImportanceMap / Plan field: "heads", "kv", "channels", "blocks"
    label: str  # "query head"
    plural: str  # "query heads"
    count: Callable[[Geometry], int]  # units per layer (per model for blocks)
    width: bool = True  # a unit inside a block (False: whole blocks)


UNITS: dict[str, UnitKind] = {u.name: u for u in (
    UnitKind("head", "heads", "query head", "query heads", lambda g: g.n_heads),
    UnitKind("kv", "kv", "KV group", "KV groups", lambda g: g.n_kv),
    UnitKind("channel", "channels", "MLP channel", "MLP channels", lambda g: g.n_channels),
    UnitKind("block", "blocks", "block", "blocks", lambda g: g.n_layers, width=False),
)}
KINDS = tuple(UNITS)  # ("head", "kv", "channel", "block")
WIDTH_KINDS = tuple(k for k, u in UNITS.items() if u.width)  # ("head", "kv", "channel")
MAP_NAMES = tuple(u.map for u in UNITS.values())  # ("heads", "kv", "channels", "blocks")


def unit_kind(kind_or_map: str) -> UnitKind:
    """The :class:`UnitKind` named ``kind_or_map`` (a kind, "head", or its map field, "heads")."""
    for u in UNITS.values():
        if kind_or_map in (u.name, u.map):
            return u
    raise PlanError(f"unknown unit kind {kind_or_map!r}; one of {', '.join(KINDS)}")


@dataclass(frozen=True)
class Slice:
    """Feature indices ``index`` of module ``module`` (path inside a decoder layer) along ``axis``.

    ``axis="out"`` means output features (rows of an ``nn.Linear`` weight, the bias too); ``axis="in"`` means input
    features (columns of an ``nn.Linear`` weight). HF ``Conv1D`` (GPT-2) stores the weight transposed; the
    adapter-independent helpers below take care of that.
    """

    module: str
    axis: str
    index: tuple[int, ...]


def _span(start: int, length: int) -> tuple[int, ...]:
    return tuple(range(start, start + length))


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def weight_axis(module: nn.Module, axis: str) -> int:
    """Dimension of ``module.weight`` that holds ``axis`` features (Linear: [out, in]; Conv1D: [in, out])."""
    out_dim = 1 if is_conv1d(module) else 0
    return out_dim if axis == "out" else 1 - out_dim


def feature_count(module: nn.Module, axis: str) -> int:
    return module.weight.shape[weight_axis(module, axis)]


def slice_params(module: nn.Module, axis: str, index: Iterable[int]) -> list[torch.Tensor]:
    """Views of the parameters of ``module`` owned by ``index`` along ``axis`` (weight, plus bias for ``out``)."""
    idx = torch.as_tensor(list(index), dtype=torch.long, device=module.weight.device)
    parts = [module.weight.index_select(weight_axis(module, axis), idx)]
    if axis == "out" and getattr(module, "bias", None) is not None:
        parts.append(module.bias.index_select(0, idx))
    return parts


class Adapter:
    """How one model family lays out its prunable units. Subclasses fill in the class attributes and slices."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    layers_path: ClassVar[str]  # attribute path from the CausalLM to the nn.ModuleList of blocks
    attn_out: ClassVar[str]  # attention output projection (input columns = heads)
    mlp_out: ClassVar[str]  # MLP down projection (input columns = channels)
    attn_modules: ClassVar[tuple[str, ...]]  # every attention projection touched by head/kv slices
    kv_proj: ClassVar[str | None] = None  # key projection, when separate (None: fused qkv of multi-head attention)
    mlp_modules: ClassVar[tuple[str, ...]]

    # ---- geometry -------------------------------------------------------------------------------------------
    def geometry(self, config) -> Geometry:
        raise NotImplementedError

    # ---- unit ownership ---------------------------------------------------------------------------------------
    def q_slices(self, g: Geometry, head: int) -> list[Slice]:
        """Rows of the query (and fused) projection owned by query head ``head``."""
        raise NotImplementedError

    def kv_slices(self, g: Geometry, group: int) -> list[Slice]:
        """Rows of the key and value projections owned by KV group ``group`` (not its query heads)."""
        raise NotImplementedError

    def channel_slices(self, g: Geometry, channel: int) -> list[Slice]:
        raise NotImplementedError

    def head_slices(self, g: Geometry, head: int) -> list[Slice]:
        """Everything a query head owns: query rows and its output-projection input columns."""
        return self.q_slices(g, head) + [Slice(self.attn_out, "in", _span(head * g.head_dim, g.head_dim))]

    def group_slices(self, g: Geometry, group: int) -> list[Slice]:
        """Everything a KV group owns: key/value rows and all of its query heads."""
        out = self.kv_slices(g, group)
        for h in g.heads_of(group):
            out += self.head_slices(g, h)
        return out

    def attention_widths(self, layer: nn.Module, g: Geometry) -> dict[str, int]:
        """Actual widths of ``layer``'s attention (pruned layers as they are): query, key and value features and
        the output projection's input width ``o_in`` (= concatenated head outputs)."""
        o_in = feature_count(get_path(layer, self.attn_out), "in")
        kv = feature_count(get_path(layer, self.kv_proj), "out") if self.kv_proj else o_in
        return {"q": o_in, "k": kv, "v": kv, "o_in": o_in}

    def unit_slices(self, g: Geometry, kind: str, index: int) -> list[Slice]:
        if kind == "head":
            return self.head_slices(g, index)
        if kind == "kv":
            return self.group_slices(g, index)
        if kind == "channel":
            return self.channel_slices(g, index)
        raise ValueError(f"unit kind must be head, kv or channel, not {kind!r}")

    # ---- module access ----------------------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return get_path(model, self.layers_path)

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        parent, name = self.layers_path.rsplit(".", 1)
        setattr(get_path(model, parent), name, layers)

    def set_attention_widths(self, layer: nn.Module, n_heads: int, n_kv: int, kept_heads: list[int],
                             g: Geometry) -> None:
        """Update the attention module's bookkeeping attributes after its projections were sliced."""
        raise NotImplementedError

    def attention_attrs(self, n_heads: int, n_kv: int, g: Geometry) -> dict[str, int]:
        """Attribute values (path inside a layer -> value) that describe a pruned attention's width."""
        raise NotImplementedError

    def layout_extras(self, kept_heads: list[int]) -> dict:
        """Family-specific entries of a pruned layer's recorded layout (e.g. BLOOM's ALiBi slopes of kept heads)."""
        return {}

    def block_hidden(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The hidden-state input of a decoder layer call (used to skip a block as the identity)."""
        return args[0] if args else kwargs["hidden_states"]


def get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class LlamaAdapter(Adapter):
    """LLaMA family with grouped-query attention: llama, mistral, qwen2 (q/k/v biases), qwen3 (q/k norms).

    Query head ``h`` reads KV group ``h // group_size`` (HF ``repeat_kv``). Per-head q/k norms (qwen3) act on
    ``head_dim`` and are shared by all heads, so they are not sliced.
    """

    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    layers_path = "model.layers"
    attn_out = "self_attn.o_proj"
    kv_proj = "self_attn.k_proj"
    mlp_out = "mlp.down_proj"
    attn_modules = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    mlp_modules = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

    def geometry(self, c) -> Geometry:
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return Geometry(self.family, c.model_type, c.num_hidden_layers, c.num_attention_heads,
                        c.num_key_value_heads or c.num_attention_heads, head_dim, c.intermediate_size,
                        c.hidden_size, c.vocab_size)

    def q_slices(self, g, head):
        return [Slice("self_attn.q_proj", "out", _span(head * g.head_dim, g.head_dim))]

    def kv_slices(self, g, group):
        rows = _span(group * g.head_dim, g.head_dim)
        return [Slice("self_attn.k_proj", "out", rows), Slice("self_attn.v_proj", "out", rows)]

    def channel_slices(self, g, channel):
        return [Slice("mlp.gate_proj", "out", (channel,)), Slice("mlp.up_proj", "out", (channel,)),
                Slice("mlp.down_proj", "in", (channel,))]

    def attention_attrs(self, n_heads, n_kv, g):
        return {"self_attn.num_key_value_groups": n_heads // n_kv}

    def set_attention_widths(self, layer, n_heads, n_kv, kept_heads, g):
        if n_heads % n_kv:
            raise PlanError(f"{n_heads} query heads cannot share {n_kv} KV groups equally")
        layer.self_attn.num_key_value_groups = n_heads // n_kv


class OPTAdapter(Adapter):
    """OPT (MINI-LLM's family): multi-head attention with biases, ReLU MLP ``fc1``/``fc2``."""

    family = "opt"
    model_types = ("opt",)
    layers_path = "model.decoder.layers"
    attn_out = "self_attn.out_proj"
    kv_proj = "self_attn.k_proj"
    mlp_out = "fc2"
    attn_modules = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
    mlp_modules = ("fc1", "fc2")

    def geometry(self, c) -> Geometry:
        d = c.hidden_size // c.num_attention_heads
        return Geometry(self.family, c.model_type, c.num_hidden_layers, c.num_attention_heads,
                        c.num_attention_heads, d, c.ffn_dim, c.hidden_size, c.vocab_size)

    def q_slices(self, g, head):
        return [Slice("self_attn.q_proj", "out", _span(head * g.head_dim, g.head_dim))]

    def kv_slices(self, g, group):
        rows = _span(group * g.head_dim, g.head_dim)
        return [Slice("self_attn.k_proj", "out", rows), Slice("self_attn.v_proj", "out", rows)]

    def channel_slices(self, g, channel):
        return [Slice("fc1", "out", (channel,)), Slice("fc2", "in", (channel,))]

    def attention_attrs(self, n_heads, n_kv, g):
        return {"self_attn.num_heads": n_heads}

    def set_attention_widths(self, layer, n_heads, n_kv, kept_heads, g):
        layer.self_attn.num_heads = n_heads


class GPT2Adapter(Adapter):
    """GPT-2: fused ``c_attn`` (HF ``Conv1D``, output features laid out ``[q | k | v]``), GELU MLP."""

    family = "gpt2"
    model_types = ("gpt2",)
    layers_path = "transformer.h"
    attn_out = "attn.c_proj"
    mlp_out = "mlp.c_proj"
    attn_modules = ("attn.c_attn", "attn.c_proj")
    mlp_modules = ("mlp.c_fc", "mlp.c_proj")

    def geometry(self, c) -> Geometry:
        d = c.n_embd // c.n_head
        return Geometry(self.family, c.model_type, c.n_layer, c.n_head, c.n_head, d,
                        c.n_inner or 4 * c.n_embd, c.n_embd, c.vocab_size)

    def q_slices(self, g, head):
        return [Slice("attn.c_attn", "out", _span(head * g.head_dim, g.head_dim))]

    def kv_slices(self, g, group):
        return [Slice("attn.c_attn", "out", _span(g.hidden + group * g.head_dim, g.head_dim)),
                Slice("attn.c_attn", "out", _span(2 * g.hidden + group * g.head_dim, g.head_dim))]

    def channel_slices(self, g, channel):
        return [Slice("mlp.c_fc", "out", (channel,)), Slice("mlp.c_proj", "in", (channel,))]

    def attention_attrs(self, n_heads, n_kv, g):
        return {"attn.num_heads": n_heads, "attn.split_size": n_heads * g.head_dim}

    def set_attention_widths(self, layer, n_heads, n_kv, kept_heads, g):
        layer.attn.num_heads = n_heads
        layer.attn.split_size = n_heads * g.head_dim


class BloomAdapter(Adapter):
    """BLOOM (MINI-LLM's family): fused ``query_key_value`` laid out per head as ``[H, 3, d]``, ALiBi positions.

    ALiBi slopes belong to the *original* head index, so a pruned layer keeps a list of its surviving heads and
    slices the model-wide ALiBi tensor to those heads (see ``modeling_pruneviz.alibi_hook``).
    """

    family = "bloom"
    model_types = ("bloom",)
    layers_path = "transformer.h"
    attn_out = "self_attention.dense"
    mlp_out = "mlp.dense_4h_to_h"
    attn_modules = ("self_attention.query_key_value", "self_attention.dense")
    mlp_modules = ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")

    def geometry(self, c) -> Geometry:
        d = c.hidden_size // c.n_head
        return Geometry(self.family, c.model_type, c.n_layer, c.n_head, c.n_head, d,
                        4 * c.hidden_size, c.hidden_size, c.vocab_size)

    def q_slices(self, g, head):
        return [Slice("self_attention.query_key_value", "out", _span(head * 3 * g.head_dim, g.head_dim))]

    def kv_slices(self, g, group):
        base = group * 3 * g.head_dim
        return [Slice("self_attention.query_key_value", "out", _span(base + g.head_dim, 2 * g.head_dim))]

    def channel_slices(self, g, channel):
        return [Slice("mlp.dense_h_to_4h", "out", (channel,)), Slice("mlp.dense_4h_to_h", "in", (channel,))]

    def attention_attrs(self, n_heads, n_kv, g):
        return {"self_attention.num_heads": n_heads}

    def layout_extras(self, kept_heads):
        return {"alibi_heads": kept_heads, "alibi_module": "self_attention"}

    def set_attention_widths(self, layer, n_heads, n_kv, kept_heads, g):
        from .modeling_pruneviz import install_alibi_hook

        layer.self_attention.num_heads = n_heads
        install_alibi_hook(layer.self_attention, kept_heads, g.n_heads)


ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    """Register an adapter for each of its ``model_types`` (the architecture registry)."""
    for t in adapter.model_types:
        ADAPTERS[t] = adapter
    return adapter


for _a in (LlamaAdapter(), OPTAdapter(), GPT2Adapter(), BloomAdapter()):
    register_adapter(_a)


def adapter_for(model_or_config) -> Adapter:
    """The adapter for a model (or config); a clear error naming the supported families otherwise."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "pruneviz_base_model_type", None) or getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise PlanError(
            f"pruneviz has no architecture adapter for model_type {model_type!r}. Supported: "
            f"{', '.join(sorted(ADAPTERS))}. Load a model of one of these families, or add an Adapter "
            f"(pruneviz/arch.py) that declares its heads, KV groups and MLP channels.")
    return ADAPTERS[model_type]


def geometry_of(model_or_config) -> Geometry:
    """Dense geometry of a model. For a pruned model this is the geometry of the base it was pruned from."""
    config = getattr(model_or_config, "config", model_or_config)
    stored = getattr(config, "pruneviz_base_geometry", None)
    if stored:
        return Geometry(**stored)
    return adapter_for(config).geometry(config)


def unit_count(g: Geometry, kind: str) -> int:
    """Units of ``kind`` (or of the map field ``kind``) per layer; blocks per model."""
    return unit_kind(kind).count(g)


def unit_params(g: Geometry, adapter: Adapter, model: nn.Module, kind: str) -> int:
    """Parameters owned by one unit of ``kind`` in layer 0 (biases included), for budget arithmetic."""
    if kind == "block":
        return sum(p.numel() for p in adapter.layers(model)[0].parameters())
    layer = adapter.layers(model)[0]
    total = 0
    for s in adapter.unit_slices(g, kind, 0):
        mod = get_path(layer, s.module)
        total += sum(t.numel() for t in slice_params(mod, s.axis, s.index))
    return total
