"""Configuration class of a pruneviz DeciLM export (needs only transformers), for vLLM's ``DeciLMForCausalLM``.

pruneviz copies this file into every ``format="decilm"`` export. It holds **no model code**: vLLM builds the model
with its own ``vllm/model_executor/models/nemotron_nas.py``; this class only parses ``config.json`` into the
objects that code reads. ``model_type`` is ``"nemotron-nas"``, the type vLLM's ``ModelConfig`` looks for, which
transformers does not ship, so ``vllm serve <folder> --trust-remote-code`` loads it from here.

``block_configs`` holds one entry per decoder layer::

    {"attention": {"n_heads_in_group": 3, "no_op": false, "replace_with_linear": false},
     "ffn": {"intermediate_size": 1536, "no_op": false, "replace_with_linear": false}}

and each entry becomes an object with ``.attention`` and ``.ffn`` whose attributes are exactly the keys written
(so ``hasattr(ffn, "ffn_mult")`` is false and vLLM takes ``ffn.intermediate_size``, any width). The query-head
count is ``num_attention_heads`` in every layer; layer ``i`` has ``num_attention_heads // n_heads_in_group`` KV
heads. ``attention_bias`` gives the attention output projection a bias, ``qkv_bias`` the q/k/v projections,
``mlp_bias`` the three MLP projections (vLLM's reading of these flags).

A removed attention or MLP sub-block is a ``no_op`` sub-layer, which vLLM builds without its weights and without
its pre-norm (``input_layernorm`` / ``post_attention_layernorm``); an attention-free layer has no KV cache, and the
first layer always keeps its attention (vLLM's forward needs it there)::

    {"attention": {"n_heads_in_group": null, "no_op": true, "replace_with_linear": false},
     "ffn": {"intermediate_size": 1536, "no_op": false, "replace_with_linear": false}}
"""
from types import SimpleNamespace

from transformers import LlamaConfig


class SubblockConfig(SimpleNamespace):
    """One sub-layer's settings as attributes (only the keys the file holds)."""

    def to_dict(self) -> dict:
        return dict(vars(self))


class BlockConfig:
    """One decoder layer: ``attention`` and ``ffn`` sub-layer settings."""

    def __init__(self, attention: dict, ffn: dict):
        self.attention, self.ffn = SubblockConfig(**attention), SubblockConfig(**ffn)

    def to_dict(self) -> dict:
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}


class DeciLMConfig(LlamaConfig):
    """A LLaMA config with per-layer ``block_configs`` (see the module docstring)."""

    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in (block_configs or [])]

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["block_configs"] = [b.to_dict() for b in self.block_configs]
        return d
