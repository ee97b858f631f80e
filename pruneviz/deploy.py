"""Which runtimes load the export of a plan: stock transformers, vLLM (DeciLM), llama.cpp, pruneviz remote code.

:func:`runtimes` answers for a model about to be exported (pruned or dense), or for the dense base and a plan
without building it (the plan is applied to a weightless meta-device copy, so the answer costs no memory). Each
answer comes from the check the matching exporter itself runs before writing, so "ok" means that export will
be written (and then verified by reloading it):

- **transformers (stock class)**: :func:`pruneviz.export.stock_config`, the family's own config expresses every
  layer's shapes (same widths in every layer; blocks may be removed). ``format="hf"`` writes it.
- **vLLM (DeciLM block_configs)**: :func:`pruneviz.decilm.refusal`, a LLaMA graph whose layers keep the same
  query-head count (KV heads and MLP widths free per layer); a removed attention or MLP sub-block (BlockPruner) is
  a ``no_op`` sub-layer, except the first layer's attention and both in one layer. ``format="decilm"``.
- **llama.cpp (GGUF)**: :func:`pruneviz.gguf_export.gguf_layout` (``llama``/``qwen2`` for uniform widths, ``deci``
  for per-layer widths, including per-layer query heads). ``format="gguf"``.
- **pruneviz remote code**: every plan; ``format="hf"`` writes the pruneviz layout, loaded by pruneviz or by
  ``from_pretrained(folder, trust_remote_code=True)``.

The allocation side (plans restricted to what a runtime expresses) is ``deployable=`` in
:mod:`pruneviz.allocate` (:func:`pruneviz.allocate.deployable_refusal`).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from . import decilm
from .arch import adapter_for, get_path, weight_axis
from .errors import ExportError
from .export import stock_config
from .gguf_export import gguf_layout
from .plan import ADDS_OUTPUT_BIAS, Plan
from .surgery import apply_plan

STOCK, VLLM, LLAMA_CPP, REMOTE = ("transformers (stock class)", "vLLM (DeciLM block_configs)", "llama.cpp (GGUF)",
                                  "pruneviz remote code")
RUNTIMES = (STOCK, VLLM, LLAMA_CPP, REMOTE)


@dataclass(frozen=True)
class RuntimeSupport:
    """Whether runtime ``name`` loads the export, why (one line), and the export ``format`` that targets it."""

    name: str
    ok: bool
    reason: str
    format: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def runtimes(model: nn.Module, plan: Plan | None = None) -> list[RuntimeSupport]:
    """For each of :data:`RUNTIMES`, whether it loads the export of ``model`` (the model to export), or with
    ``plan``, of the dense base ``model`` pruned by ``plan`` (judged on a weightless skeleton; ``model`` untouched).
    PlanError if ``plan`` does not fit ``model``."""
    target = model if plan is None else pruned_skeleton(model, plan)
    return [_stock(target), _vllm(target), _llama_cpp(target), _remote(target)]


def supported(model: nn.Module, plan: Plan | None = None) -> dict[str, bool]:
    """``{runtime name: ok}`` (see :func:`runtimes`)."""
    return {r.name: r.ok for r in runtimes(model, plan)}


# ---- one check per runtime -----------------------------------------------------------------------------------------

def _layer_specs(model: nn.Module) -> list[dict]:
    return list(((getattr(model.config, "pruneviz_layout", None) or {}).get("layers") or {}).values())


def _stock(model: nn.Module) -> RuntimeSupport:
    try:
        ok = stock_config(model) is not None
    except Exception as e:  # noqa: BLE001 - a family without a stock skeleton: not stock-loadable
        return RuntimeSupport(STOCK, False, f"no stock class builds this model ({type(e).__name__})", "hf")
    if ok:
        return RuntimeSupport(STOCK, True, "every layer has the same widths, which the family's config states: "
                                           "AutoModelForCausalLM.from_pretrained(folder)", "hf")
    specs, n = _layer_specs(model), model.config.num_hidden_layers
    uniform = len(specs) == n and all(s.get("shapes") == specs[0].get("shapes") for s in specs)
    why = ("layers have different widths, and a stock config states one width for all layers" if not uniform else
           "the family's config cannot state these shapes (e.g. added output-projection biases or resized norms)")
    return RuntimeSupport(STOCK, False, why, "hf")


def _vllm(model: nn.Module) -> RuntimeSupport:
    why = decilm.refusal(model)
    if why:
        return RuntimeSupport(VLLM, False, why, "decilm")
    blocks = decilm.blocks_of(model)
    kv = sorted({b.n_kv for b in blocks if b.attention})
    ff = sorted({b.n_ff for b in blocks if b.mlp})
    no_attn = [i for i, b in enumerate(blocks) if not b.attention]
    no_mlp = [i for i, b in enumerate(blocks) if not b.mlp]
    noop = "; ".join(x for x in (f"no_op attention in layers {no_attn} (no KV cache there)" if no_attn else "",
                                 f"no_op MLP in layers {no_mlp}" if no_mlp else "") if x)
    widths = f"MLP widths {ff[0]}..{ff[-1]}" if ff else "no MLP"
    return RuntimeSupport(VLLM, True, f"{blocks[0].n_head} query heads in every attention layer, KV heads {kv}, "
                                      f"{widths}{'; ' + noop if noop else ''}: vllm serve folder "
                                      f"--trust-remote-code (config class only)", "decilm")


def _llama_cpp(model: nn.Module) -> RuntimeSupport:
    try:
        layout = gguf_layout(model)
    except ExportError as e:
        return RuntimeSupport(LLAMA_CPP, False, e.message, "gguf")
    return RuntimeSupport(LLAMA_CPP, True, f"{layout.arch} architecture ({layout.reason})", "gguf")


def _remote(model: nn.Module) -> RuntimeSupport:
    return RuntimeSupport(REMOTE, True, "any plan: pruneviz's loader, or from_pretrained(folder, "
                                        "trust_remote_code=True) with the copied modeling_pruneviz.py", "hf")


# ---- a plan's shapes without its weights ---------------------------------------------------------------------------

def pruned_skeleton(model: nn.Module, plan: Plan) -> nn.Module:
    """The model ``plan`` builds from the dense ``model``, on the meta device: every shape and bias of the real
    pruned model, no weights (so no memory and no calibration). Compensations are not run; the output-projection
    biases of :data:`pruneviz.plan.ADDS_OUTPUT_BIAS` solvers are added as shapes. ``model`` is not changed."""
    plan.validate(model, physical=True)
    skeleton = meta_copy(model)
    pruned = apply_plan(skeleton, dataclasses.replace(plan, compensation=None), allow_other_weights=True)
    if plan.compensation in ADDS_OUTPUT_BIAS:
        _add_output_biases(pruned, plan)
    return pruned


def meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters are meta tensors of the same shapes (buffers such as rotary
    frequencies are shared, so rope checks still read real values); accelerate's offload hooks are removed from
    the copy (their weight stores are shared, never copied)."""
    from accelerate.hooks import remove_hook_from_module

    memo = {id(p): nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
            for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    for m in model.modules():
        store = getattr(getattr(m, "_hf_hook", None), "weights_map", None)
        if store is not None:
            memo[id(store)] = store
    skeleton = copy.deepcopy(model, memo)
    remove_hook_from_module(skeleton, recurse=True)
    return skeleton


def _add_output_biases(pruned: nn.Module, plan: Plan) -> None:
    """The biases FLAP's and SlimLLM's compensations create: on each output projection (attention, MLP) of a kept
    layer that loses units there and has no bias (the rule :meth:`Plan.param_count` counts)."""
    adapter = adapter_for(pruned)
    for new_idx, base_idx in enumerate(plan.kept_blocks()):
        layer = adapter.layers(pruned)[new_idx]
        for path, lost in ((adapter.attn_out, plan.removed_heads_all(base_idx)),
                           (adapter.mlp_out, plan.removed("channel", base_idx))):
            mod = get_path(layer, path)
            if lost and getattr(mod, "bias", None) is None:
                n_out = mod.weight.shape[weight_axis(mod, "out")]
                mod.bias = nn.Parameter(torch.empty(n_out, dtype=mod.weight.dtype, device="meta"),
                                        requires_grad=False)

