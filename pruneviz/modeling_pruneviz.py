"""Self-contained loader for pruneviz checkpoints with per-layer widths (needs only torch and transformers).

pruneviz copies this file into every exported folder whose layers have different widths, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

works without pruneviz installed. ``config.json`` keeps the base family's fields (``model_type``, hidden size,
...) plus ``pruneviz_layout``: for each pruned layer, the exact ``[out, in, has_bias]`` shape of every resized
projection, the attention bookkeeping attributes to set, and (BLOOM) the surviving heads' original indices for
ALiBi. ``PrunedForCausalLM`` builds the stock model of the base family, then resizes those modules before the
weights are loaded. pruneviz itself uses :func:`apply_layout` and :func:`install_alibi_hook` from this file, so
the in-process and the exported model are built by the same code.
"""
from __future__ import annotations

import torch
import transformers
from torch import nn

BASE_MODEL_CLASS = "LlamaForCausalLM"  # rewritten by pruneviz.export for the exported family
BASE_CONFIG_CLASS = "LlamaConfig"


def _get(root: nn.Module, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _set(root: nn.Module, path: str, value) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, value)


def new_projection(like: nn.Module, n_out: int, n_in: int, bias: bool) -> nn.Module:
    """An uninitialised projection of the same kind as ``like`` (``nn.Linear`` or HF ``Conv1D``)."""
    device, dtype = like.weight.device, like.weight.dtype
    if type(like).__name__ == "Conv1D":
        new = type(like)(n_out, n_in)  # weight [in, out]
        if not bias:
            new.bias = None
        return new.to(device=device, dtype=dtype)
    meta = nn.Linear(n_in, n_out, bias=bias, device="meta", dtype=dtype)
    return meta.to_empty(device=device)


def install_alibi_hook(attention: nn.Module, kept_heads: list[int], n_heads_total: int) -> None:
    """Make a pruned BLOOM attention read only its surviving heads' rows of the model-wide ALiBi tensor."""
    kept = [int(h) for h in kept_heads]  # a list, not a tensor: skeletons may be built on the meta device
    for handle in getattr(attention, "_pruneviz_alibi_handles", []):
        handle.remove()

    def hook(module, args, kwargs):
        alibi = kwargs.get("alibi")
        if alibi is None or alibi.shape[0] % n_heads_total:
            return None
        b = alibi.shape[0] // n_heads_total
        kept_idx = torch.tensor(kept, device=alibi.device)
        sliced = alibi.view(b, n_heads_total, *alibi.shape[1:])[:, kept_idx]  # [B, h, 1, K]
        return args, {**kwargs, "alibi": sliced.reshape(b * len(kept), *alibi.shape[1:])}

    attention._pruneviz_alibi_handles = [attention.register_forward_pre_hook(hook, with_kwargs=True)]


class AbsentAttention(nn.Module):
    """Stands in for a removed attention sub-block (BlockPruner): adds nothing to the residual stream.

    Returns zeros shaped like ``hidden_states`` [B, T, D] and no attention weights, as every decoder layer reading
    ``out, _ = self_attn(...)`` expects. It still writes a one-feature zero entry ([B, 1, T, 1]) per token to the KV
    cache under its ``layer_idx``, so the cache's token count (read from layer 0 for positions and masks; an empty
    entry would read as 0) stays right while the layer stores next to nothing. ``layer_idx`` is renumbered with the
    other layers when blocks are dropped.
    """

    def __init__(self, layer_idx: int | None):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states=None, *args, past_key_values=None, **kwargs):
        if hidden_states is None:
            hidden_states = args[0]
        cache = getattr(past_key_values, "self_attention_cache", past_key_values)  # GPT-2's EncoderDecoderCache
        if cache is not None and self.layer_idx is not None:
            b, t = hidden_states.shape[0], hidden_states.shape[1]
            marker = hidden_states.new_zeros(b, 1, t, 1)  # [B, 1, T, 1]
            cache.update(marker, marker, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class AbsentMLP(nn.Module):
    """Stands in for a module of a removed MLP sub-block: zeros of ``width`` features, [..., width]. The last module
    of the sub-block has ``width`` = hidden size (the zero residual update); earlier ones (OPT's ``fc1``) width 0."""

    def __init__(self, width: int):
        super().__init__()
        self.width = int(width)

    def forward(self, x, *args, **kwargs):
        return x.new_zeros(*x.shape[:-1], self.width)


def absent_module(spec: list, old: nn.Module | None = None) -> nn.Module:
    """The stand-in a layout's ``absent`` entry names: ``["attention"]``, ``["mlp", width]`` or
    ``["norm"]`` (an unused pre-norm, or a post-norm of zeros: the identity)."""
    kind = spec[0]
    if kind == "attention":
        return AbsentAttention(getattr(old, "layer_idx", None))
    if kind == "mlp":
        return AbsentMLP(spec[1])
    return nn.Identity()


class LayerConfig:
    """One layer's view of the model config: ``overrides`` win, every other attribute is the shared config's (so a
    later change of the model config, e.g. the attention implementation, still reaches the layer).

    For families whose modules read widths from the config at every call (Phi-3's ``num_attention_heads``).
    """

    def __init__(self, base, overrides: dict):
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", dict(overrides))

    def __getattr__(self, name):
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_base"), name, value)


def install_layer_config(module: nn.Module, overrides: dict) -> None:
    """Give ``module`` its own :class:`LayerConfig` over the config it already reads."""
    base = module.config
    while isinstance(base, LayerConfig):
        base = object.__getattribute__(base, "_base")
    module.config = LayerConfig(base, overrides)


def resize_norm(norm: nn.Module, size: int, eps_attr: str, eps: float) -> None:
    """Give an RMSNorm an uninitialised weight of ``size`` features and epsilon ``eps`` (loaded afterwards)."""
    w = norm.weight
    norm.weight = nn.Parameter(torch.empty(size, dtype=w.dtype, device=w.device), requires_grad=w.requires_grad)
    setattr(norm, eps_attr, eps)


def apply_layout(model: nn.Module, layout: dict, layers_path: str | None = None) -> None:
    """Resize the projections of ``model``'s layers in place to the shapes recorded in ``layout``.

    Also replays, per layer: removed sub-blocks (``absent``: path -> stand-in spec, :func:`absent_module`),
    attribute values (``attrs``), whole-projection norms resized with their epsilon
    (``norms``: path -> [size, epsilon attribute, epsilon]), per-layer config views (``config``: module path ->
    overrides) and ALiBi head lists. The new modules are uninitialised: this is for building a skeleton whose
    weights are loaded afterwards.
    """
    layers = _get(model, layers_path or layout["layers_path"])
    for idx, spec in layout.get("layers", {}).items():
        layer = layers[int(idx)]
        for path, absent in spec.get("absent", {}).items():  # removed sub-blocks (BlockPruner)
            _set(layer, path, absent_module(absent, _get(layer, path)))
        for path, (n_out, n_in, bias) in spec["shapes"].items():
            _set(layer, path, new_projection(_get(layer, path), n_out, n_in, bool(bias)))
        for path, value in spec.get("attrs", {}).items():
            _set(layer, path, value)
        for path, (size, eps_attr, eps) in spec.get("norms", {}).items():
            resize_norm(_get(layer, path), size, eps_attr, eps)
        for path, overrides in spec.get("config", {}).items():
            install_layer_config(_get(layer, path), overrides)
        if spec.get("alibi_heads") is not None:
            attn = _get(layer, spec["alibi_module"])
            install_alibi_hook(attn, spec["alibi_heads"], layout["n_heads_total"])


def pruned_class(base: type) -> type:
    """A subclass of the causal-LM class ``base`` whose ``__init__`` applies ``config.pruneviz_layout``."""

    def __init__(self, config):
        base.__init__(self, config)
        apply_layout(self, config.pruneviz_layout)

    return type(f"Pruned{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})


class PrunedConfig(getattr(transformers, BASE_CONFIG_CLASS)):
    """The base family's config; ``pruneviz_layout`` travels as an extra attribute."""


class PrunedForCausalLM(pruned_class(getattr(transformers, BASE_MODEL_CLASS))):
    """The base family's causal LM with the per-layer widths of ``config.pruneviz_layout``."""

    config_class = PrunedConfig
