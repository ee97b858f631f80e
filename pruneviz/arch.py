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

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

import torch
import transformers as tf
from torch import nn

from .errors import CriterionError, PlanError
from .modeling_pruneviz import AbsentAttention, install_alibi_hook, install_layer_config


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
        gqa = "multi-query: one KV head" if self.n_kv == 1 < self.n_heads else gqa
        name = self.family if self.family == self.model_type else f"{self.family}/{self.model_type}"
        return (f"{name}: {self.n_layers} blocks, {self.n_heads} query heads "
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
    # what a family changes beyond shapes (see the module docstring's last section)
    norm_offset: ClassVar[float] = 0.0  # its norms scale by (norm_offset + w): Gemma's (1 + w) RMSNorm has 1
    post_norms: ClassVar[tuple[str, ...]] = ()  # norms of the attention / MLP *outputs* before the residual add
    proj_norms: ClassVar[dict[str, str]] = {}  # projection -> norm over its whole output (OLMo 2's q/k norms)
    layer_lists: ClassVar[tuple[str, ...]] = ("layer_types",)  # per-layer config lists that depth pruning re-indexes
    note: ClassVar[str] = ""  # said wherever the family is shown (the generic llama-like adapter says so)
    bos_per_window: ClassVar[bool] = False  # perplexity windows need a BOS at position 0 (Gemma breaks down without)
    # residual sub-blocks (BlockPruner): the modules a removed sub-block's stand-in replaces (the last one must return
    # the residual update) and the norms only that sub-block reads (its pre-norm, and its post-norm where the family
    # normalises outputs); None: the family's sub-blocks cannot be removed alone
    attn_block: ClassVar[tuple[str, ...] | None] = ("self_attn",)
    attn_block_norms: ClassVar[tuple[str, ...]] = ("input_layernorm",)
    mlp_block: ClassVar[tuple[str, ...] | None] = ("mlp",)
    mlp_block_norms: ClassVar[tuple[str, ...]] = ("post_attention_layernorm",)

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

    def sub_block(self, part: str, config) -> SubBlock | None:
        """The residual sub-block ``part`` (``"attn"`` or ``"mlp"``) of a decoder layer: the modules that a removed
        sub-block's stand-in replaces and the norms that only it reads, or None where the family cannot drop it
        alone (its forward adds the residual inside the sub-block, as BLOOM's does)."""
        modules = self.attn_block if part == "attn" else self.mlp_block
        if modules is None:
            return None
        return SubBlock(part, modules, self.attn_block_norms if part == "attn" else self.mlp_block_norms)

    def has_attention(self, layer: nn.Module) -> bool:
        """False for a (pruned) layer whose attention sub-block was removed: it has no projections, no KV cache."""
        return self.attn_block is None or not isinstance(get_path(layer, self.attn_block[0]), AbsentAttention)

    def block_hidden(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The hidden-state input of a decoder layer call (used to skip a block as the identity)."""
        return args[0] if args else kwargs["hidden_states"]

    # ---- what surgery does beyond slicing projections ---------------------------------------------------------
    def resize_norms(self, layer: nn.Module, drops: dict[tuple[str, str], set[int]]) -> dict:
        """After surgery sliced ``layer``'s projections (``drops``: (path, axis) -> removed features), resize the
        whole-projection norms of :attr:`proj_norms` exactly (:func:`resize_projection_norm`); returns the layout
        entries that :func:`pruneviz.modeling_pruneviz.apply_layout` replays on reload."""
        norms = {}
        for proj, norm in self.proj_norms.items():
            gone = drops.get((proj, "out"))
            if gone:
                norms[norm] = resize_projection_norm(get_path(layer, norm), gone, self.norm_offset)
        return {"norms": norms} if norms else {}

    def norm_slices(self, slices: list[Slice]) -> list[Slice]:
        """Entries of whole-projection norms (:attr:`proj_norms`) that go with a unit's ``slices``: a unit owning rows
        of a normed projection owns the same entries of its norm's weight."""
        return [Slice(self.proj_norms[s.module], "out", s.index) for s in slices
                if s.axis == "out" and s.module in self.proj_norms]

    def stock_fields(self, spec: dict, g: Geometry) -> dict | None:
        """Config fields that express layer layout ``spec`` (every layer pruned alike) in the family's stock config,
        or None when the config cannot (then the export uses the pruneviz format)."""
        return None

    def norm_weight(self, name: str, p: torch.Tensor) -> torch.Tensor:
        """The scale a block parameter ``name`` applies: ``norm_offset + w`` for 1-D norm weights, else ``p``."""
        return p + self.norm_offset if p.ndim == 1 and self.norm_offset else p


@dataclass(frozen=True)
class SubBlock:
    """One residual sub-block of a decoder layer (``h + f(norm(h))``): ``part`` is ``"attn"`` or ``"mlp"``,
    ``modules`` the paths its stand-in replaces (the last returns the residual update ``f``; earlier ones feed it),
    ``norms`` the norms only it reads (pre-norm, and post-norm where the family normalises outputs). Removing the
    sub-block (BlockPruner) makes ``f`` zero: the norms' outputs are then unused (pre) or zero (post, an RMSNorm
    of zeros), so surgery drops them with the sub-block and :meth:`pruneviz.plan.Plan.param_count` counts them."""

    part: str
    modules: tuple[str, ...]
    norms: tuple[str, ...]


def sub_block_params(adapter: Adapter, model: nn.Module, part: str) -> int:
    """Parameters a removed sub-block ``part`` takes with it in one (dense) layer: its modules and norms."""
    sub = adapter.sub_block(part, model.config)
    if sub is None:
        return 0
    layer = adapter.layers(model)[0]
    return sum(p.numel() for path in sub.modules + sub.norms for p in get_path(layer, path).parameters())


def get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def norm_eps_attr(norm: nn.Module) -> str:
    """Name of an RMSNorm's epsilon attribute (``variance_epsilon`` in LLaMA-style code, ``eps`` in Gemma's)."""
    return "variance_epsilon" if hasattr(norm, "variance_epsilon") else "eps"


def resize_projection_norm(norm: nn.Module, gone: set[int], offset: float = 0.0) -> list:
    """Remove features ``gone`` from an RMSNorm over a whole projection output (OLMo 2's q/k norms), exactly.

    Removing a unit means zeroing everything it owns, so in the dense model its features enter the norm's mean
    square as zeros: ``y_i = x_i·s_i / sqrt(S/N + eps)`` with ``S`` the kept features' sum of squares, ``N`` all
    features, ``s = offset + w``. Over the ``K`` kept features alone that is ``y_i = x_i·s_i·sqrt(N/K) /
    sqrt(S/K + eps·N/K)``: the kept scales times ``sqrt(N/K)`` and ``eps·N/K`` reproduce it for every input. Mutates
    ``norm``; returns its layout entry ``[K, eps attribute, new eps]``.
    """
    w = norm.weight.detach()
    n = w.shape[0]
    keep = torch.tensor([i for i in range(n) if i not in gone], dtype=torch.long, device=w.device)
    ratio = n / len(keep)
    scaled = (w.index_select(0, keep).double() + offset) * ratio ** 0.5 - offset  # [K]
    norm.weight = nn.Parameter(scaled.to(w.dtype), requires_grad=norm.weight.requires_grad)
    attr = norm_eps_attr(norm)
    setattr(norm, attr, float(getattr(norm, attr)) * ratio)
    return [len(keep), attr, getattr(norm, attr)]


class LlamaAdapter(Adapter):
    """LLaMA family with grouped-query attention: llama, mistral, qwen2 (q/k/v biases), qwen3 (q/k norms), granite
    (embedding, residual, attention and logit multipliers: constants of the config that no unit owns).

    Query head ``h`` reads KV group ``h // group_size`` (HF ``repeat_kv``). Per-head q/k norms (qwen3) act on
    ``head_dim`` and are shared by all heads, so they are not sliced.
    """

    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "granite")
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

    def kv_width(self, shapes: dict, g: Geometry) -> int:
        """Key features of a layer whose resized projections have ``shapes`` (path -> [out, in, bias])."""
        return shapes.get(self.kv_proj, [g.n_kv * g.head_dim])[0]

    def stock_fields(self, spec, g):
        if set(spec) - {"shapes", "attrs"}:  # resized norms: the config has one epsilon for every norm
            return None
        shapes = spec["shapes"]
        o_in = shapes.get(self.attn_out, [g.hidden, g.n_heads * g.head_dim])[1]
        kv = self.kv_width(shapes, g)
        return {"num_attention_heads": o_in // g.head_dim, "num_key_value_heads": kv // g.head_dim,
                "head_dim": g.head_dim, "intermediate_size": shapes.get(self.mlp_out, [g.hidden, g.n_channels])[1]}


class SmolLM3Adapter(LlamaAdapter):
    """SmolLM3: LLaMA names; every fourth layer has no rotary embedding (``config.no_rope_layers``, read by each
    attention at construction), so depth pruning re-indexes that list with ``layer_types``."""

    family = "smollm3"
    model_types = ("smollm3",)
    layer_lists = ("layer_types", "no_rope_layers")


class GemmaAdapter(LlamaAdapter):
    """Gemma 2 and Gemma 3 text models (``gemma2``, ``gemma3_text``): LLaMA names; beyond shapes:

    - ``head_dim`` is explicit and unrelated to the hidden size (read from the config, as every adapter does);
    - RMSNorms scale by ``1 + w`` (:attr:`norm_offset`), which is what a magnitude score of a norm reads;
    - four norms per block: ``post_attention_layernorm`` and ``post_feedforward_layernorm`` normalise the attention
      and MLP outputs before the residual add, so compensations that assume the output projection adds straight to
      the residual (FLAP's bias, SlimGPT's OBS objective) are refused (:func:`check_residual_outputs`);
    - embeddings scaled by ``sqrt(hidden)``, sliding/global ``layer_types``, attention-logit soft-capping
      (Gemma 2), per-head q/k norms shared by all heads (Gemma 3), GeGLU MLP: nothing a unit owns;
    - small models use multi-query attention (one KV head): query heads are then the attention unit, and removing
      them leaves the KV cache as it is.
    """

    family = "gemma"
    model_types = ("gemma2", "gemma3_text")
    norm_offset = 1.0
    post_norms = ("post_attention_layernorm", "post_feedforward_layernorm")
    bos_per_window = True  # Gemma scores windows without BOS at position 0 5-20x worse
    attn_block_norms = ("input_layernorm", "post_attention_layernorm")
    mlp_block_norms = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


class Olmo2Adapter(LlamaAdapter):
    """OLMo 2: LLaMA names, norms *after* attention and MLP (``post_attention_layernorm`` normalises the attention
    output here, not the MLP input), and q/k RMSNorms over the *whole* projection (``H·d`` and ``G·d`` features).

    Removing a head changes that norm's statistics for the heads that stay. Surgery keeps the meaning "the dense
    model with everything the unit owns zeroed" (its q/k features enter the mean square as zeros): the kept
    scales are multiplied by ``sqrt(N/K)`` and epsilon by ``N/K`` (:func:`resize_projection_norm`), which is exact
    for every input; the masked preview zeroes the removed features before the norm. Per-layer epsilons are not
    expressible in the stock config, so such exports use the pruneviz format.
    """

    family = "olmo2"
    model_types = ("olmo2",)
    post_norms = ("post_attention_layernorm", "post_feedforward_layernorm")
    attn_block_norms = ("post_attention_layernorm",)  # no pre-norms: the post-norm of each output only
    mlp_block_norms = ("post_feedforward_layernorm",)
    proj_norms = {"self_attn.q_proj": "self_attn.q_norm", "self_attn.k_proj": "self_attn.k_norm"}


class Phi3Adapter(LlamaAdapter):
    """Phi-3 / Phi-4 (``phi3``): fused ``qkv_proj`` (output features ``[q: H·d | k: G·d | v: G·d]``) and fused
    ``gate_up_proj`` (``[gate: C | up: C]``, split by ``chunk(2)``): a unit's rows live in two or three parts of one
    matrix. Its attention reads the query width from ``config.num_attention_heads`` at every call, so a pruned
    layer's attention gets its own view of the config (:func:`pruneviz.modeling_pruneviz.install_layer_config`).
    """

    family = "phi3"
    model_types = ("phi3",)
    kv_proj = None
    attn_modules = ("self_attn.qkv_proj", "self_attn.o_proj")
    mlp_modules = ("mlp.gate_up_proj", "mlp.down_proj")

    def q_slices(self, g, head):
        return [Slice("self_attn.qkv_proj", "out", _span(head * g.head_dim, g.head_dim))]

    def kv_slices(self, g, group):
        k0, v0 = g.n_heads * g.head_dim, (g.n_heads + g.n_kv) * g.head_dim
        return [Slice("self_attn.qkv_proj", "out", _span(k0 + group * g.head_dim, g.head_dim)),
                Slice("self_attn.qkv_proj", "out", _span(v0 + group * g.head_dim, g.head_dim))]

    def channel_slices(self, g, channel):
        return [Slice("mlp.gate_up_proj", "out", (channel,)),
                Slice("mlp.gate_up_proj", "out", (g.n_channels + channel,)), Slice("mlp.down_proj", "in", (channel,))]

    def attention_widths(self, layer, g):
        o_in = feature_count(get_path(layer, self.attn_out), "in")
        kv = (feature_count(layer.self_attn.qkv_proj, "out") - o_in) // 2
        return {"q": o_in, "k": kv, "v": kv, "o_in": o_in}

    def kv_width(self, shapes, g):
        qkv, o_in = shapes.get("self_attn.qkv_proj"), shapes.get(self.attn_out)
        return (qkv[0] - o_in[1]) // 2 if qkv and o_in else g.n_kv * g.head_dim

    def attention_attrs(self, n_heads, n_kv, g):
        return {"self_attn.num_key_value_groups": n_heads // n_kv, "self_attn.num_key_value_heads": n_kv}

    def set_attention_widths(self, layer, n_heads, n_kv, kept_heads, g):
        super().set_attention_widths(layer, n_heads, n_kv, kept_heads, g)
        layer.self_attn.num_key_value_heads = n_kv
        install_layer_config(layer.self_attn, {"num_attention_heads": n_heads})

    def layout_extras(self, kept_heads):
        return {"config": {"self_attn": {"num_attention_heads": len(kept_heads)}}}

    def stock_fields(self, spec, g):  # every layer alike: the stock num_attention_heads is each layer's view
        return super().stock_fields({k: v for k, v in spec.items() if k != "config"}, g)


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
    mlp_block = ("fc1", "fc2")  # no MLP module: fc1 gives [N, 0], fc2 the zero update
    attn_block_norms = ("self_attn_layer_norm",)
    mlp_block_norms = ("final_layer_norm",)

    def sub_block(self, part, config):
        sub = super().sub_block(part, config)
        # post-LN OPT (opt-350m) normalises the residual sum: that norm is not the sub-block's to drop
        return sub if getattr(config, "do_layer_norm_before", True) else dataclasses.replace(sub, norms=())

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

    def stock_fields(self, spec, g):
        shapes = spec["shapes"]
        return {"ffn_dim": shapes["fc1"][0]} if set(shapes) <= {"fc1", "fc2"} else None


class GPT2Adapter(Adapter):
    """GPT-2: fused ``c_attn`` (HF ``Conv1D``, output features laid out ``[q | k | v]``), GELU MLP."""

    family = "gpt2"
    model_types = ("gpt2",)
    layers_path = "transformer.h"
    attn_out = "attn.c_proj"
    mlp_out = "mlp.c_proj"
    attn_modules = ("attn.c_attn", "attn.c_proj")
    mlp_modules = ("mlp.c_fc", "mlp.c_proj")
    attn_block = ("attn",)
    attn_block_norms = ("ln_1",)
    mlp_block_norms = ("ln_2",)

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

    def stock_fields(self, spec, g):
        shapes = spec["shapes"]
        return {"n_inner": shapes["mlp.c_fc"][0]} if set(shapes) <= {"mlp.c_fc", "mlp.c_proj"} else None


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
    attn_block = mlp_block = None  # its attention and MLP add the residual themselves (dropout_add)

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
        layer.self_attention.num_heads = n_heads
        install_alibi_hook(layer.self_attention, kept_heads, g.n_heads)


ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    """Register an adapter for each of its ``model_types`` (the architecture registry)."""
    for t in adapter.model_types:
        ADAPTERS[t] = adapter
    return adapter


for _a in (LlamaAdapter(), SmolLM3Adapter(), GemmaAdapter(), Olmo2Adapter(), Phi3Adapter(), OPTAdapter(),
           GPT2Adapter(), BloomAdapter()):
    register_adapter(_a)


# ---- generic llama-like detection and what is refused -------------------------------------------------------------

LLAMA_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
SSM_WORDS = ("mamba", "ssm", "linear_attention", "recurrent", "deltanet", "rwkv", "retention")


def unsupported_layers(config, model: nn.Module | None = None) -> str | None:
    """Why a model cannot be pruned by unit slices at all (mixture-of-experts or state-space layers), or None."""
    for name in MOE_FIELDS:
        n = getattr(config, name, None)
        if isinstance(n, int) and n > 1:
            return (f"it has mixture-of-experts layers (config.{name} = {n}): its MLP capacity lives in routed "
                    f"experts, which are not the MLP channels pruneviz removes")
    kinds = {str(t) for t in (getattr(config, "layer_types", None) or [])}
    classes = {type(m).__name__ for m in model.modules()} if model is not None else set()
    moe = sorted(c for c in classes if "moe" in c.lower() or "expert" in c.lower())
    if moe:
        return f"it has mixture-of-experts layers ({', '.join(moe[:3])}): experts and routers are not pruneviz units"
    ssm = sorted(t for t in kinds | classes if any(w in t.lower() for w in SSM_WORDS))
    if ssm:
        return (f"it has state-space or linear-recurrent layers ({', '.join(ssm[:3])}): they have no attention heads "
                f"or KV groups for pruneviz to remove")
    return None


def norm_offset_of(norm: nn.Module) -> float | None:
    """0 when ``norm`` scales by ``w``, 1 when by ``1 + w`` (Gemma), None if it is neither: measured by running a
    copy with its weight zeroed (works for modules on the meta device too)."""
    probe = copy.deepcopy(norm).to_empty(device="cpu").float()
    if not isinstance(getattr(probe, "weight", None), torch.Tensor) or probe.weight.ndim != 1:
        return None
    for p in probe.parameters():
        nn.init.zeros_(p)
    x = torch.randn(3, probe.weight.shape[0], generator=torch.Generator().manual_seed(0))  # [3, n]
    with torch.no_grad():
        y = probe(x)
    if y.abs().max() == 0:
        return 0.0
    eps = float(getattr(probe, norm_eps_attr(probe), 1e-6))
    unit = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return 1.0 if torch.allclose(y, unit, rtol=1e-4, atol=1e-5) else None


class GenericLlamaAdapter(LlamaAdapter):
    """A family without a written adapter whose module tree follows LLaMA's names (:func:`detect_llama_like`).

    The unit slices are LLaMA's. What names cannot say is read from the modules: norms after the output
    projections (a ``post_feedforward_layernorm`` means the attention and MLP outputs are normalised, as in OLMo 2
    and Gemma), q/k norms over the whole projection (then handled as OLMo 2's) and a ``(1 + w)`` norm
    parametrisation (measured). The family's forward was not reviewed: :attr:`note` says so wherever it is shown.
    """

    family = "llama-like"

    def __init__(self, model_type: str, post_norms: tuple[str, ...], proj_norms: dict[str, str],
                 norm_offset: float, layer_lists: tuple[str, ...]):
        self.model_types, self.post_norms, self.proj_norms = (model_type,), post_norms, proj_norms
        self.norm_offset, self.layer_lists = norm_offset, layer_lists
        found = [f"norms after the output projections ({', '.join(post_norms)})"] if post_norms else []
        found += [f"q/k norms over the whole projection ({', '.join(proj_norms.values())})"] if proj_norms else []
        found += ["(1 + w) norms"] if norm_offset else []
        self.note = (f"generic llama-like: pruneviz has no adapter written for model_type {model_type!r}; its "
                     f"module tree follows the LLaMA names (model.layers[i].self_attn.{{q,k,v,o}}_proj, "
                     f"mlp.{{gate,up,down}}_proj), so heads, KV groups and channels are LLaMA's"
                     + (f"; detected: {'; '.join(found)}" if found else "")
                     + ". Its forward code was not reviewed: check the masked preview against the built model "
                       "and the perplexity before trusting a plan.")


def extra_params(module: nn.Module, known: Iterable[str]) -> list[str]:
    """Parameter names of ``module`` outside the submodules ``known`` (paths inside ``module``)."""
    prefixes = tuple(k + "." for k in known)
    return [n for n, _ in module.named_parameters() if not n.startswith(prefixes)]


def detect_llama_like(model: nn.Module) -> GenericLlamaAdapter | None:
    """A :class:`GenericLlamaAdapter` if ``model``'s tree follows LLaMA's names, None if it does not.

    Refuses (PlanError) a LLaMA-named model whose layers hold parameters that no declared unit could slice
    consistently (a per-head norm with one weight per head, an unknown attention submodule).
    """
    config = model.config
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return None
    layer = layers[0]
    try:
        projections = [get_path(layer, p) for p in LLAMA_PROJECTIONS]
    except AttributeError:
        return None
    if not all(isinstance(m, nn.Linear) for m in projections):
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    proj_norms = {}
    for proj, width in ((projections[0], "q"), (projections[1], "k")):
        mod = getattr(layer.self_attn, f"{width}_norm", None)
        size = getattr(getattr(mod, "weight", None), "shape", (None,))[0]
        if mod is None or size == head_dim:
            continue
        if size != proj.out_features:
            raise PlanError(f"model_type {config.model_type!r} follows the LLaMA names but its {width}_norm has "
                            f"{size} features (neither head_dim {head_dim} nor the whole projection): pruneviz "
                            f"cannot tell which of them a head owns")
        proj_norms[f"self_attn.{width}_proj"] = f"self_attn.{width}_norm"
    odd = extra_params(layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"))
    odd += extra_params(layer.mlp, ("gate_proj", "up_proj", "down_proj"))
    if odd:
        raise PlanError(f"model_type {config.model_type!r} follows the LLaMA names but its blocks hold parameters "
                        f"no pruneviz unit declares ({', '.join(odd[:4])}); write an Adapter for it in "
                        f"pruneviz/arch.py")
    post = ("post_attention_layernorm", "post_feedforward_layernorm") \
        if hasattr(layer, "post_feedforward_layernorm") and hasattr(layer, "post_attention_layernorm") else ()
    norm = next((m for n, m in layer.named_children() if "norm" in n), None)
    offset = (norm_offset_of(norm) if norm is not None else 0.0) or 0.0
    lists = tuple(k for k, v in config.to_dict().items() if isinstance(v, list) and len(v) == len(layers)
                  and "layer" in k)
    found = GenericLlamaAdapter(config.model_type, post, proj_norms, offset, lists)
    names = {n for n, _ in layer.named_children()}
    if post:  # Gemma / OLMo 2 naming: post_attention_layernorm normalises the attention output
        found.attn_block_norms = tuple(n for n in ("input_layernorm", "post_attention_layernorm") if n in names)
        found.mlp_block_norms = tuple(n for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm")
                                      if n in names)
    return found


DETECTED: dict[tuple[str, str], Adapter] = {}  # (model_type, model class) -> detected adapter


def weightless_skeleton(config) -> nn.Module | None:
    """A meta-device model built from ``config`` to read its module tree (no weights allocated), or None."""
    try:
        with torch.device("meta"):
            return tf.AutoModelForCausalLM.from_config(config)
    except Exception:  # unknown or remote-code classes: nothing to read
        return None


def adapter_for(model_or_config) -> Adapter:
    """The adapter for a model (or config); a clear error naming the supported families otherwise.

    A model_type without a written adapter is accepted as generic llama-like when its module tree follows the
    LLaMA names (read from the model, or from a weightless skeleton of the config); mixture-of-experts and
    state-space layers are refused with that reason.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "pruneviz_base_model_type", None) or getattr(config, "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    model = model_or_config if isinstance(model_or_config, nn.Module) else None
    key = (str(model_type), type(model).__name__ if model is not None else "")
    if key not in DETECTED:
        DETECTED[key] = detect_adapter(config, model)
    return DETECTED[key]


def detect_adapter(config, model: nn.Module | None) -> Adapter:
    """The generic llama-like adapter for an unregistered model_type, or PlanError saying why there is none."""
    model_type = getattr(config, "model_type", None)
    model = model if model is not None else weightless_skeleton(config)
    reason = unsupported_layers(config, model)
    if reason:
        raise PlanError(f"pruneviz cannot prune model_type {model_type!r}: {reason}. Supported: "
                        f"{', '.join(sorted(ADAPTERS))} and generic llama-like models.")
    found = detect_llama_like(model) if model is not None else None
    if found is None:
        raise PlanError(
            f"pruneviz has no architecture adapter for model_type {model_type!r}, and its modules do not "
            f"follow the LLaMA names (model.layers[i].self_attn.q/k/v/o_proj, mlp.gate/up/down_proj). "
            f"Supported: {', '.join(sorted(ADAPTERS))}. Load a model of one of these families, or add an "
            f"Adapter (pruneviz/arch.py) that declares its heads, KV groups and MLP channels.")
    return found


def geometry_of(model_or_config) -> Geometry:
    """Dense geometry of a model. For a pruned model this is the geometry of the base it was pruned from."""
    config = getattr(model_or_config, "config", model_or_config)
    stored = getattr(config, "pruneviz_base_geometry", None)
    if stored:
        return Geometry(**stored)
    return adapter_for(model_or_config).geometry(config)


def check_residual_outputs(model: nn.Module, method: str) -> None:
    """Refuse ``method``, a compensation that assumes each output projection's result adds straight to the residual
    stream (FLAP's bias restores its mean, SlimGPT's OBS minimises its error), on families that normalise the
    attention / MLP output first (Gemma 2/3, OLMo 2): there what reaches the residual is a normalised vector, and
    neither update is exact or optimal for it."""
    adapter = adapter_for(model)
    if adapter.post_norms:
        raise CriterionError(
            f"{method} is not applicable to {model.config.model_type}: its blocks normalise the attention and MLP "
            f"outputs ({', '.join(adapter.post_norms)}) before adding them to the residual stream, so correcting "
            f"the output projection's result does not correct what reaches the residual. Prune without "
            f"compensation (any criterion, then apply the plan).")


def family_notes(model: nn.Module) -> list[str]:
    """What the family changes beyond shapes, in sentences for the app and the CLI (empty for plain families)."""
    adapter, g = adapter_for(model), geometry_of(model)
    notes = [adapter.note] if adapter.note else []
    if g.n_kv == 1 and g.n_heads > 1:
        notes.append(f"multi-query attention: every layer has one KV head shared by its {g.n_heads} query heads, "
                     f"so KV-group pruning is impossible and query heads are the attention unit; removing them "
                     f"shrinks q_proj and o_proj but not the KV cache")
    if adapter.post_norms:
        notes.append(f"norms after the output projections ({', '.join(adapter.post_norms)}): FLAP's bias "
                     f"compensation and the SlimGPT solver are refused")
    if adapter.proj_norms:
        notes.append("q/k norms over the whole projection: removing heads rescales the kept features' norm "
                     "exactly as if the removed features were zero")
    if adapter.norm_offset:
        notes.append(f"norms scale by ({adapter.norm_offset:g} + w): magnitude scores of norms read that scale")
    notes += embedding_note(model, g)
    return notes


def embedding_note(model: nn.Module, g: Geometry) -> list[str]:
    """A sentence when embeddings and the vocabulary projection are over a quarter of the parameters."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    vocab = emb.numel() + (0 if head is None or head.weight is emb else head.weight.numel())
    total = sum(p.numel() for p in model.parameters())
    if not total or vocab / total <= 0.25:
        return []
    return [f"embeddings and the vocabulary projection are {vocab / total:.0%} of the parameters (vocabulary "
            f"{g.vocab:,}): a 20% non-embedding cut removes {0.2 * (1 - vocab / total):.0%} of them, and the "
            f"vocabulary projection's compute per token stays"]


def unit_count(g: Geometry, kind: str) -> int:
    """Units of ``kind`` (or of the map field ``kind``) per layer; blocks per model."""
    return unit_kind(kind).count(g)


def unit_params(g: Geometry, adapter: Adapter, model: nn.Module, kind: str) -> int:
    """Parameters owned by one unit of ``kind`` in layer 0 (biases included), for budget arithmetic."""
    if kind == "block":
        return sum(p.numel() for p in adapter.layers(model)[0].parameters())
    return owned_params(adapter, adapter.layers(model)[0], adapter.unit_slices(g, kind, 0))


def owned_params(adapter: Adapter, layer: nn.Module, slices: list[Slice]) -> int:
    """Parameters that ``slices`` own in ``layer``: weights, biases and the entries of whole-projection norms."""
    return sum(t.numel() for s in slices + adapter.norm_slices(slices)
               for t in slice_params(get_path(layer, s.module), s.axis, s.index))
